//! The demo end to end, as `cargo xtask demo` runs it: `kplab demo` on `examples/demo`, its exit
//! status and the report's verdict lines. Needs root, like the demo.
use std::process::Command;

#[test]
fn the_demo_reaches_every_ready_backend_from_both_nodes_and_the_empty_service_refuses() {
    // SAFETY: plain syscall.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the demo builds namespaces and must run as root"
    );
    let manifests = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo");
    let out = Command::new(env!("CARGO_BIN_EXE_kplab"))
        .args(["demo", "--manifests", manifests])
        .env("KPLAB_NAME", "kpldemotest")
        .output()
        .expect("run kplab demo");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the demo failed:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The demo's manifests: web (3 ready backends of 4), dns (UDP and TCP, 2 backends), empty,
    // shop (LoadBalancer, eTP Cluster, web's backends) and shop-local (eTP Local, node-a's).
    for header in [
        "== Service demo/web 10.96.200.10:80/TCP: ready backends demo/web-1 (node-a), demo/web-2 (node-a), demo/web-3 (node-b) ==",
        "== Service demo/dns 10.96.200.53:53/UDP: ready backends demo/dns-1 (node-a), demo/dns-2 (node-b) ==",
        "== Service demo/dns 10.96.200.53:53/TCP: ready backends demo/dns-1 (node-a), demo/dns-2 (node-b) ==",
        "== Service without endpoints: demo/empty ==",
        "tcp 10.96.200.99:80 from demo/client-a: refused (expected: refused by TCP RST)",
        "udp 10.96.200.99:99 from demo/client-a: refused (expected: refused by ICMP port unreachable)",
        "verdict: every ready backend answered every client pod, client addresses preserved, every Service without endpoints refused",
        "== From outside the cluster: external host outside 172.18.0.250 ==",
        "demo/shop (externalTrafficPolicy: Cluster)",
        "demo/shop-local (externalTrafficPolicy: Local)",
        "  NodePort on node-b 172.18.0.3:30081/tcp: 0/30 connected\n    (no local endpoint on node-b: dropped, as eTP Local says)",
        "  health check node port 32081: node-a 200, node-b 503",
        "verdict: from outside, NodePorts and LoadBalancer IPs answered as their traffic policy says",
        "== NetworkPolicy: web-from-frontends.yaml applied ==",
        "demo/client-a -> demo/web 10.96.200.10:80/tcp: 8/8 connected, 0 no answer (admitted); answered by demo/web-",
        "demo/client-b -> demo/web 10.96.200.10:80/tcp: 0/8 connected, 8 no answer (denied)\n",
        ": allowed, by NetworkPolicy demo/web-from-frontends",
        "denied (policy_ingress)",
        "verdict: with the NetworkPolicy applied, every connection of the admitted client reached a web backend",
    ] {
        assert!(report.contains(header), "missing {header:?} in:\n{report}");
    }
    let from: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("from demo/"))
        .collect();
    assert_eq!(from.len(), 10, "5 Service ports x 2 clients: {from:?}");
    for line in &from {
        assert!(
            line.contains(
                ": 60/60 connected, 0 refused, 0 timed out; client address preserved 60/60"
            ),
            "{line}"
        );
    }
    assert!(
        from.iter()
            .any(|l| l.starts_with("from demo/client-a (node-a)"))
    );
    assert!(
        from.iter()
            .any(|l| l.starts_with("from demo/client-b (node-b)"))
    );
    assert!(
        report.contains(
            "verdict: every Service port answered from every node's own namespace, by ready backends only"
        ),
        "{report}"
    );
    let nodes: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("from node "))
        .collect();
    assert_eq!(nodes.len(), 10, "5 Service ports x 2 nodes: {nodes:?}");
    for line in &nodes {
        assert!(
            line.contains(": 20/20 answered by ready backends"),
            "{line}"
        );
    }
    // From outside, eTP Cluster: each backend seen from the client when local to the node the
    // traffic came to, from that node (source NAT) when remote.
    for (node, line) in [
        (
            "node-a",
            "  NodePort on node-a 172.18.0.2:30080/tcp: 30/30 connected: ",
        ),
        (
            "node-b",
            "  NodePort on node-b 172.18.0.3:30080/tcp: 30/30 connected: ",
        ),
    ] {
        let found = report
            .lines()
            .find(|l| l.starts_with(line))
            .unwrap_or_else(|| panic!("no line {line:?} in:\n{report}"));
        for part in found[line.len()..].split(", ") {
            let local = part.contains(&format!("({node})"));
            let want = if local {
                "saw the client".to_owned()
            } else {
                format!("saw {node}")
            };
            assert!(part.ends_with(&want), "{node}: {part}");
        }
    }
}
