//! The health, readiness and metrics endpoints over real HTTP on loopback.
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;

use dataplane_agent::metrics::{MapUsage, Status};

fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: agent\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    let code = reply.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = reply.split_once("\r\n\r\n").unwrap().1.to_owned();
    (code, body)
}

#[test]
fn healthz_readyz_and_metrics() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Status::default()));
    let (explain_tx, _explain_rx) = tokio::sync::mpsc::channel(1);
    rt.spawn(dataplane_agent::http::serve(listener, rx, explain_tx));

    assert_eq!(request(addr, "GET", "/healthz"), (200, "ok\n".to_owned()));
    // A malformed explain query is answered with what is wrong, without reaching the agent.
    let (code, body) = request(addr, "GET", "/explain?from=web&to=10.0.0.1:80/tcp");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("expected NAMESPACE/POD"), "{body}");
    let (code, body) = request(addr, "GET", "/readyz");
    assert_eq!(code, 503, "not ready before the first sync: {body}");

    let mut status = Status {
        generation: 1,
        ..Status::default()
    };
    status.objects.insert("Service".into(), 3);
    status.maps.insert(
        "SERVICES_V1".into(),
        MapUsage {
            entries: 7,
            capacity: 1 << 20,
        },
    );
    status.errors.insert("malformed_object".into(), 2);
    status.sync_latency.observe(0.0004);
    tx.send_replace(Arc::new(status));

    assert_eq!(request(addr, "GET", "/readyz").0, 200);
    let (code, metrics) = request(addr, "GET", "/metrics");
    assert_eq!(code, 200);
    for line in [
        "dataplane_ready 1",
        "dataplane_objects{kind=\"Service\"} 3",
        "dataplane_map_entries{map=\"SERVICES_V1\"} 7",
        "dataplane_map_capacity{map=\"SERVICES_V1\"} 1048576",
        "dataplane_errors_total{label=\"malformed_object\"} 2",
        "dataplane_sync_latency_seconds_bucket{le=\"0.0005\"} 1",
        "dataplane_sync_latency_seconds_count 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "missing {line:?} in\n{metrics}"
        );
    }
    assert_eq!(request(addr, "GET", "/nope").0, 404);
    assert_eq!(request(addr, "POST", "/metrics").0, 405);
}
