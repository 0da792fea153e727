//! The Kubernetes source against the API's wire format: a real kube-rs client talks HTTP to a
//! loopback server that replays recorded list and watch responses (initial list, added / modified
//! / deleted events, a bookmark, a dropped watch, 410 Gone and the relist that follows). The
//! batches it produces go through the agent's pipeline (index, reconciler) into in-memory maps,
//! and both are checked: a relist removes exactly what vanished and leaves the rest untouched.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataplane_agent::kube_source;
use dataplane_core::index::Index;
use dataplane_core::maps::MapState;
use dataplane_core::object::NsName;
use dataplane_core::pipeline::Pipeline;
use dataplane_core::source::{Batch, Event};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

fn service(name: &str, rv: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv,
                     "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
    })
}

fn list(kind: &str, rv: &str, items: Vec<Value>) -> String {
    json!({"apiVersion": "v1", "kind": format!("{kind}List"), "metadata": {"resourceVersion": rv}, "items": items})
        .to_string()
}

fn watch_event(ty: &str, object: Value) -> String {
    json!({"type": ty, "object": object}).to_string() + "\n"
}

/// What the fake API server answers, per request of the Services resource.
enum Reply {
    Body(String),
    /// A watch stream: these lines, then the connection closes (a dropped watch).
    Stream(Vec<String>),
    /// A watch that stays open and silent.
    Hang,
    /// The connection is closed without an answer (the API server went away).
    Reset,
    /// An error status.
    Status(u16),
}

#[derive(Default)]
struct Script {
    lists: Vec<Reply>,
    watches: Vec<Reply>,
    seen: Vec<String>,
}

async fn respond(mut stream: TcpStream, script: Arc<Mutex<Script>>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&request).into_owned();
    let target = head
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let is_watch = target.contains("watch=true");
    let reply = if target.starts_with("/api/v1/services") {
        let mut s = script.lock().unwrap();
        s.seen.push(target.clone());
        let queue = if is_watch {
            &mut s.watches
        } else {
            &mut s.lists
        };
        if queue.is_empty() {
            Reply::Hang
        } else {
            queue.remove(0)
        }
    } else if is_watch {
        Reply::Hang
    } else {
        let kind = if target.contains("endpointslices") {
            "EndpointSlice"
        } else if target.contains("networkpolicies") {
            "NetworkPolicy"
        } else {
            "Object"
        };
        Reply::Body(list(kind, "1", vec![]))
    };
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n";
    match reply {
        Reply::Body(body) => {
            let _ = stream
                .write_all(format!("{head}Content-Length: {}\r\n\r\n{body}", body.len()).as_bytes())
                .await;
        }
        Reply::Stream(lines) => {
            let _ = stream.write_all(format!("{head}\r\n").as_bytes()).await;
            for line in lines {
                let _ = stream.write_all(line.as_bytes()).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Reply::Hang => {
            let _ = stream.write_all(format!("{head}\r\n").as_bytes()).await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Reply::Reset => {}
        Reply::Status(code) => {
            let body =
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code})
                    .to_string();
            let _ = stream
                .write_all(
                    format!("HTTP/1.1 {code} Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}", body.len())
                        .as_bytes(),
                )
                .await;
        }
    }
}

fn describe(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .map(|e| match e {
            Event::Apply(o) => format!(
                "apply {}@{}",
                o.key().name,
                o.meta().resource_version.as_deref().unwrap_or("")
            ),
            Event::Delete(k) => format!("delete {}", k.name),
        })
        .collect()
}

/// The frontends in the maps, as "address -> service rev-nat id present".
fn frontends(maps: &MapState) -> Vec<String> {
    maps.services
        .keys()
        .filter(|k| k.slot == 0)
        .map(|k| std::net::Ipv4Addr::from(k.addr.to_ne_bytes()).to_string())
        .collect()
}

/// Serves the script on loopback and runs the Kubernetes source against it.
async fn start(script: Script) -> (Arc<Mutex<Script>>, tokio::sync::mpsc::Receiver<Batch>) {
    let script = Arc::new(Mutex::new(script));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let server_script = script.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(respond(stream, server_script.clone()));
        }
    });
    let client = kube::Client::try_from(kube::Config::new(url.parse().unwrap())).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Batch>(64);
    tokio::spawn(kube_source::run(client, tx));
    (script, rx)
}

/// The index, maps and batches the pipeline ends with, once `until` shows up.
struct Outcome {
    index: Index,
    maps: MapState,
    batches: Vec<Vec<String>>,
    fingerprint: u64,
}

async fn collect(rx: &mut tokio::sync::mpsc::Receiver<Batch>, until: &str) -> Outcome {
    let mut pipeline = Pipeline::default();
    let mut maps = MapState::default();
    let mut batches = Vec::new();
    let mut fingerprint = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !batches.iter().flatten().any(|e: &String| e == until) {
        let batch = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .expect("the source converges within 30 s")
            .expect("source running");
        batches.push(describe(&batch.events));
        fingerprint = batch.fingerprint;
        pipeline.apply(batch, &mut maps);
    }
    Outcome {
        index: pipeline.index,
        maps,
        batches,
        fingerprint,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_bookmark_gone_relist_and_dropped_watch() {
    let (script, mut rx) = start(Script {
        lists: vec![
            Reply::Body(list("Service", "10", vec![service("a", "1", "10.96.0.1"), service("b", "2", "10.96.0.2")])),
            // After 410 Gone: b is gone, a is unchanged, c changed, d is new.
            Reply::Body(list(
                "Service",
                "20",
                vec![service("a", "12", "10.96.0.1"), service("c", "15", "10.96.0.33"), service("d", "16", "10.96.0.4")],
            )),
        ],
        watches: vec![
            Reply::Stream(vec![
                watch_event("ADDED", service("c", "11", "10.96.0.3")),
                watch_event("MODIFIED", service("a", "12", "10.96.0.1")),
                watch_event("BOOKMARK", json!({"apiVersion": "v1", "kind": "Service", "metadata": {"resourceVersion": "13"}})),
                watch_event("DELETED", service("b", "14", "10.96.0.2")),
            ]),
            // The dropped watch is resumed from the last version seen, and that is too old.
            Reply::Stream(vec![watch_event(
                "ERROR",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Expired",
                       "message": "too old resource version: 14 (17)", "code": 410}),
            )]),
        ],
        seen: Vec::new(),
    })
    .await;
    let out = collect(&mut rx, "apply d@16").await;

    // The first batch waits for every kind's initial list; events that arrive meanwhile join it.
    assert_eq!(
        out.batches[0][..2],
        ["apply a@1", "apply b@2"],
        "the first batch holds the full initial list"
    );
    assert_eq!(
        out.batches.concat(),
        [
            "apply a@1",
            "apply b@2",
            "apply c@11",
            "apply a@12",
            "delete b",
            "apply c@15",
            "apply d@16"
        ],
        "watch events in order; the relist adds d, changes c, and leaves a alone (no flapping)"
    );
    let names: Vec<&String> = out
        .index
        .services
        .keys()
        .map(|k: &NsName| &k.name)
        .collect();
    assert_eq!(names, ["a", "c", "d"]);
    assert!(
        out.index
            .services
            .values()
            .all(|s| s.metadata.managed_fields.is_none()),
        "managedFields stripped"
    );
    assert_eq!(
        frontends(&out.maps),
        ["10.96.0.1", "10.96.0.4", "10.96.0.33"]
    );
    let expect = [("a", "12"), ("c", "15"), ("d", "16")]
        .iter()
        .fold(0, |acc, (n, rv)| {
            let key = dataplane_core::object::ObjectKey {
                kind: dataplane_core::object::Kind::Service,
                namespace: "ns".into(),
                name: (*n).into(),
            };
            acc ^ dataplane_core::relist::object_digest(&key, rv)
        });
    assert_eq!(
        out.fingerprint, expect,
        "the digest names exactly the listed versions"
    );

    let seen = script.lock().unwrap().seen.clone();
    let watches: Vec<&String> = seen.iter().filter(|t| t.contains("watch=true")).collect();
    assert!(watches[0].contains("resourceVersion=10"), "{watches:?}");
    assert!(
        watches[1].contains("resourceVersion=13") || watches[1].contains("resourceVersion=14"),
        "resumed after the drop: {watches:?}"
    );
    assert!(
        watches
            .iter()
            .all(|w| w.contains("allowWatchBookmarks=true"))
    );
    assert_eq!(
        seen.iter().filter(|t| !t.contains("watch=true")).count(),
        2,
        "one initial list, one relist after 410"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_api_server_changes_nothing_and_the_source_reconverges() {
    let (script, mut rx) = start(Script {
        lists: vec![
            Reply::Body(list(
                "Service",
                "10",
                vec![
                    service("a", "1", "10.96.0.1"),
                    service("b", "2", "10.96.0.2"),
                ],
            )),
            // Still away when the watcher falls back to listing.
            Reply::Reset,
            Reply::Status(503),
            Reply::Body(list(
                "Service",
                "30",
                vec![
                    service("a", "1", "10.96.0.1"),
                    service("e", "25", "10.96.0.5"),
                ],
            )),
        ],
        watches: vec![
            // The watch drops, then the server is gone for a while.
            Reply::Stream(vec![]),
            Reply::Reset,
            Reply::Status(503),
            Reply::Reset,
            Reply::Stream(vec![watch_event(
                "ERROR",
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 410}),
            )]),
        ],
        seen: Vec::new(),
    })
    .await;
    let out = collect(&mut rx, "apply e@25").await;
    let events = out.batches.concat();
    assert_eq!(
        events,
        ["apply a@1", "apply b@2", "delete b", "apply e@25"],
        "nothing changed during the outage"
    );
    assert_eq!(frontends(&out.maps), ["10.96.0.1", "10.96.0.5"]);
    assert!(
        script.lock().unwrap().seen.len() >= 6,
        "the source kept retrying"
    );
}
