//! The socket hooks through the real kernel: a real client (python3's socket module: connect,
//! send, sendto, recvfrom, getpeername) in a cgroup this test creates, in a network namespace of
//! its own, against real servers on the backends' addresses. TCP, connected UDP and unconnected
//! UDP reach a backend of the Service and see only the Service address as their peer; a Service
//! without endpoints refuses; a process outside the cgroup is not translated. Needs root.
use std::io::Write as _;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::process::Stdio;
use std::time::Duration;

use dataplane_agent::datapath::Datapath;
use dataplane_common::{EP_INGRESS_ISOLATED, PolicyEndpoint, PolicyEndpoints};
use dataplane_core::fixtures::{ready, service, slice};
use dataplane_core::index::Index;
use dataplane_core::maps::Op;
use dataplane_core::object::{NsName, Object};
use dataplane_core::reconcile::{MapWriter as _, Reconciler};
use kplab::cgroup::{self, Cgroup};
use kplab::netns::{self, Netns};
use serde_json::{Value, json};

const VIP: &str = "10.96.9.9";
const EMPTY_VIP: &str = "10.96.9.10";
const BACKENDS: [&str; 2] = ["10.244.9.1", "10.244.9.2"];

/// Each backend answers TCP on 8080 and UDP on 5353 with its own address.
fn serve(ns: &str) {
    for addr in BACKENDS {
        let ns_tcp = ns.to_owned();
        std::thread::spawn(move || {
            netns::enter(&ns_tcp).unwrap();
            let l = TcpListener::bind((addr.parse::<Ipv4Addr>().unwrap(), 8080)).unwrap();
            for mut s in l.incoming().flatten() {
                let _ = s.write_all(addr.as_bytes());
            }
        });
        let ns_udp = ns.to_owned();
        std::thread::spawn(move || {
            netns::enter(&ns_udp).unwrap();
            let s = UdpSocket::bind((addr.parse::<Ipv4Addr>().unwrap(), 5353)).unwrap();
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = s.recv_from(&mut buf) {
                let _ = s.send_to(addr.as_bytes(), from);
            }
        });
    }
}

/// The client: every check's outcome as JSON, bounded by socket timeouts.
const CLIENT: &str = r#"
import json, socket, sys
vip, empty = sys.argv[1], sys.argv[2]
out = {}
def attempt(name, f):
    try:
        out[name] = f()
    except Exception as e:
        out[name] = {"error": type(e).__name__}
def tcp():
    s = socket.create_connection((vip, 80), timeout=2)
    body = s.recv(64).decode()
    return {"backend": body, "peer": list(s.getpeername())}
def udp_connected():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    s.connect((vip, 53)); s.send(b"q")
    data, frm = s.recvfrom(64)
    return {"backend": data.decode(), "from": list(frm), "peer": list(s.getpeername())}
def udp_unconnected():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    replies = []
    for _ in range(20):
        s.sendto(b"q", (vip, 53))
        data, frm = s.recvfrom(64)
        replies.append({"backend": data.decode(), "from": list(frm)})
    return replies
def refused():
    socket.create_connection((empty, 80), timeout=2)
    return "connected"
attempt("tcp", tcp)
attempt("udp_connected", udp_connected)
attempt("udp_unconnected", udp_unconnected)
attempt("refused", refused)
print(json.dumps(out))
"#;

fn client(ns: &str, cg: Option<&std::path::Path>) -> Value {
    let mut cmd = netns::command(ns, "timeout");
    cmd.args(["20", "python3", "-c", CLIENT, VIP, EMPTY_VIP])
        .stdin(Stdio::null());
    if let Some(cg) = cg {
        cgroup::spawn_into(&mut cmd, cg).unwrap();
    }
    let out = cmd.output().expect("python3 runs");
    assert!(
        out.status.success(),
        "client: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("client prints JSON")
}

fn program(dp: &mut Datapath) {
    let mut index = Index::default();
    let ports = [
        ("http", 80, "TCP", json!(8080)),
        ("dns", 53, "UDP", json!(5353)),
    ];
    let _ = index.apply(Object::from(service("t", "web", VIP, &ports)));
    let eps: Vec<_> = BACKENDS.iter().map(|a| ready(a)).collect();
    let slice_ports = [("http", 8080, "TCP"), ("dns", 5353, "UDP")];
    let _ = index.apply(Object::from(slice("t", "web-1", "web", &slice_ports, &eps)));
    let _ = index.apply(Object::from(service("t", "empty", EMPTY_VIP, &ports[..1])));
    let mut reconciler = Reconciler::default();
    for name in ["web", "empty"] {
        let svc = NsName {
            namespace: "t".into(),
            name: name.into(),
        };
        let report = reconciler.sync_service(&index, &svc, dp);
        assert!(report.problems.is_empty(), "{:?}", report.problems);
    }
}

#[test]
fn node_clients_reach_services_at_the_socket_and_see_only_the_service_address() {
    assert_eq!(
        // SAFETY: plain syscall.
        unsafe { libc::geteuid() },
        0,
        "socket hook tests attach cgroup programs: run as root"
    );
    let ns = Netns::create(format!("kps-{}", std::process::id())).unwrap();
    for addr in BACKENDS {
        ns.run("ip", &["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .unwrap();
    }
    let cg = Cgroup::create(&format!("kps-{}", std::process::id())).unwrap();
    // The datapath is loaded from inside the namespace: its netns cookie is the "node's".
    let name = ns.name().to_owned();
    let cg_path = cg.path().to_path_buf();
    let dp = std::thread::spawn(move || {
        netns::enter(&name).unwrap();
        let mut dp = Datapath::load().expect("load eBPF object");
        program(&mut dp);
        assert!(dp.attach_cgroup(&cg_path).expect("attach socket hooks"));
        dp
    })
    .join()
    .unwrap();
    assert_eq!(dp.cgroup(), Some(cg.path()));
    serve(ns.name());
    std::thread::sleep(Duration::from_millis(200));

    assert_translated(&client(ns.name(), Some(cg.path())), true);

    // Outside the cgroup nothing is translated: the Service address is not routed here.
    let outside = client(ns.name(), None);
    assert!(outside["tcp"]["error"].is_string(), "{outside}");
    assert!(outside["udp_connected"]["error"].is_string(), "{outside}");
    drop(dp);
}

/// A client's outcome when every socket was translated: each kind reaches a backend, sees
/// only the Service address, spreads over both backends; the empty Service is refused at the
/// socket (`refused_at_socket`: node sockets) or left untranslated (pods: TC refuses it, and
/// this test has no TC, so the connect fails unrouted).
fn assert_translated(out: &Value, refused_at_socket: bool) {
    let vip_port = |port: u16| json!([VIP, port]);
    assert!(
        BACKENDS.contains(&out["tcp"]["backend"].as_str().unwrap()),
        "{out}"
    );
    assert_eq!(
        out["tcp"]["peer"],
        vip_port(80),
        "getpeername shows the Service"
    );
    let c = &out["udp_connected"];
    assert!(BACKENDS.contains(&c["backend"].as_str().unwrap()), "{out}");
    assert_eq!(
        c["from"],
        vip_port(53),
        "connected UDP replies come from the Service"
    );
    assert_eq!(c["peer"], vip_port(53));
    let replies = out["udp_unconnected"].as_array().expect("20 replies");
    assert_eq!(replies.len(), 20, "{out}");
    assert!(
        replies.iter().all(|r| r["from"] == vip_port(53)),
        "every unconnected reply comes from the Service address: {out}"
    );
    let seen: std::collections::BTreeSet<&str> = replies
        .iter()
        .map(|r| r["backend"].as_str().unwrap())
        .collect();
    assert_eq!(seen.len(), 2, "datagrams spread over both backends: {out}");
    if refused_at_socket {
        assert_eq!(
            out["refused"],
            json!({"error": "ConnectionRefusedError"}),
            "no endpoints: refused"
        );
    } else {
        assert!(out["refused"]["error"].is_string(), "{out}");
        assert_ne!(out["refused"], json!({"error": "ConnectionRefusedError"}));
    }
}

/// `--pod-translation socket`: a pod's sockets (another network namespace under the hooks'
/// cgroup) are translated once `NODE_FLAG_SOCKET_PODS` is set, and left to TC before.
#[test]
fn pod_sockets_are_translated_at_the_socket_only_when_pod_translation_is_socket() {
    assert_eq!(
        // SAFETY: plain syscall.
        unsafe { libc::geteuid() },
        0,
        "socket hook tests attach cgroup programs: run as root"
    );
    let id = std::process::id();
    let node = Netns::create(format!("kpsn-{id}")).unwrap();
    let pod = Netns::create(format!("kpsp-{id}")).unwrap();
    for addr in BACKENDS {
        pod.run("ip", &["addr", "add", &format!("{addr}/32"), "dev", "lo"])
            .unwrap();
    }
    let cg = Cgroup::create(&format!("kpsp-{id}")).unwrap();
    let pod_cg = Cgroup::create(&format!("kpsp-{id}/pod")).unwrap();
    let name = node.name().to_owned();
    let cg_path = cg.path().to_path_buf();
    let mut dp = std::thread::spawn(move || {
        netns::enter(&name).unwrap();
        let mut dp = Datapath::load().expect("load eBPF object");
        program(&mut dp);
        assert!(dp.attach_cgroup(&cg_path).expect("attach socket hooks"));
        dp
    })
    .join()
    .unwrap();
    serve(pod.name());
    std::thread::sleep(Duration::from_millis(200));

    let before = client(pod.name(), Some(pod_cg.path()));
    assert!(
        before["tcp"]["error"].is_string(),
        "pod sockets are TC's until the flag is set: {before}"
    );
    assert!(!dp.socket_pods());
    dp.set_socket_pods(true).unwrap();
    assert!(dp.socket_pods());
    assert_translated(&client(pod.name(), Some(pod_cg.path())), false);

    // Backends selected by a NetworkPolicy: a pod's connect to them is left to TC, where a pod
    // reaching itself through the Service is judged.
    let enforce = |dp: &mut Datapath, on: bool| {
        for addr in BACKENDS {
            let addr = u32::from(addr.parse::<Ipv4Addr>().unwrap()).to_be();
            let op = if on {
                Op::UpsertPolicyEndpoint(
                    addr,
                    PolicyEndpoints {
                        generation: [0, 1].map(|generation| PolicyEndpoint {
                            endpoint: 1,
                            flags: EP_INGRESS_ISOLATED,
                            generation,
                        }),
                    },
                )
            } else {
                Op::DeletePolicyEndpoint(addr)
            };
            dp.write(&op).unwrap();
        }
        dp.write(&Op::PolicyCommit {
            enforced: on,
            generation: u8::from(on),
        })
        .unwrap();
    };
    enforce(&mut dp, true);
    let enforced = client(pod.name(), Some(pod_cg.path()));
    assert!(
        enforced["tcp"]["error"].is_string(),
        "a policy-enforced backend is TC's: {enforced}"
    );
    enforce(&mut dp, false);
    assert_translated(&client(pod.name(), Some(pod_cg.path())), false);
    dp.set_socket_pods(false).unwrap();
    let after = client(pod.name(), Some(pod_cg.path()));
    assert!(after["tcp"]["error"].is_string(), "{after}");
    drop(dp);
}
