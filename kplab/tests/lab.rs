//! Lab end-to-end tests: real sockets through the real kernel, in network namespaces built by
//! `kplab`, with the agents' eBPF programs attached. They need root and fail without it.
//! One lab at a time: the tests take a lock and use their own lab name (`kpltest`).
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::Duration;

use kplab::netns;
use serde_json::{Value, json};

const LAB: &str = "kpltest";
static ONE_LAB: Mutex<()> = Mutex::new(());

const WEB_VIP: &str = "10.97.0.10:80";
const ECHO_VIP: &str = "10.97.0.53:53";

fn kplab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kplab"))
        .args(args)
        .env("KPLAB_NAME", LAB)
        .output()
        .expect("run kplab")
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "kplab failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The web endpoints: (pod, address, ready). `None` leaves `ready` unset (counts as ready).
type Endpoints<'a> = &'a [(&'a str, &'a str, Option<bool>)];

const ALL_WEB: Endpoints = &[
    ("web-1", "10.245.1.21", Some(true)),
    ("web-2", "10.245.2.22", None),
    ("web-3", "10.245.2.23", Some(true)),
];

const PODS: &[(&str, &str, &str, &str)] = &[
    ("client-a", "node-a", "10.245.1.10", "8080/TCP"),
    ("client-b", "node-b", "10.245.2.10", "8080/TCP"),
    ("web-1", "node-a", "10.245.1.21", "8080/TCP"),
    ("web-2", "node-b", "10.245.2.22", "8080/TCP"),
    ("web-3", "node-b", "10.245.2.23", "8080/TCP"),
    ("echo-1", "node-a", "10.245.1.31", "5353/UDP"),
    ("echo-2", "node-b", "10.245.2.32", "5353/UDP"),
];

/// Writes the test cluster's manifests: two nodes, seven pods, Services web, echo and empty.
fn manifests(
    dir: &Path,
    web: Option<Endpoints>,
    echo_service: &str,
    extra_pods: &[(&str, &str, &str, &str)],
) {
    std::fs::create_dir_all(dir).unwrap();
    let mut nodes = String::new();
    // node-a has a secondary InternalIP and an ExternalIP too.
    for (name, addresses, cidr) in [
        (
            "node-a",
            "{type: InternalIP, address: 172.31.0.2}, {type: InternalIP, address: 172.31.1.2}, \
             {type: ExternalIP, address: 172.31.2.2}",
            "10.245.1.0/24",
        ),
        (
            "node-b",
            "{type: InternalIP, address: 172.31.0.3}",
            "10.245.2.0/24",
        ),
    ] {
        nodes += &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {cidr}}}\n\
             status: {{addresses: [{addresses}]}}\n---\n"
        );
    }
    std::fs::write(dir.join("nodes.yaml"), nodes).unwrap();
    let mut pods = String::new();
    for (name, node, ip, port) in PODS.iter().chain(extra_pods) {
        let (port, proto) = port.split_once('/').unwrap();
        pods += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: t}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c, image: lab/server, ports: [{{containerPort: {port}, protocol: {proto}}}]}}]}}\n\
             status: {{podIP: {ip}}}\n---\n"
        );
    }
    std::fs::write(dir.join("pods.yaml"), pods).unwrap();
    let mut svcs = String::from(echo_service);
    svcs += "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: echo-x, namespace: t, labels: {kubernetes.io/service-name: echo}}\n\
             addressType: IPv4\nports: [{name: dns, port: 5353, protocol: UDP}]\n\
             endpoints: [{addresses: [10.245.1.31]}, {addresses: [10.245.2.32]}]\n---\n\
             apiVersion: v1\nkind: Service\nmetadata: {name: empty, namespace: t}\n\
             spec: {clusterIP: 10.97.0.99, ports: [{name: a, port: 80, protocol: TCP}, {name: b, port: 99, protocol: UDP}]}\n";
    if let Some(eps) = web {
        let node_of = |ip: &str| PODS.iter().find(|p| p.2 == ip).map_or("node-a", |p| p.1);
        let eps: Vec<String> = eps
            .iter()
            .map(|(_, ip, ready)| match ready {
                Some(r) => format!(
                    "{{addresses: [{ip}], nodeName: {}, conditions: {{ready: {r}}}}}",
                    node_of(ip)
                ),
                None => format!("{{addresses: [{ip}], nodeName: {}}}", node_of(ip)),
            })
            .collect();
        svcs += &format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: t}}\n\
             spec: {{clusterIP: 10.97.0.10, ports: [{{name: http, port: 80, protocol: TCP, targetPort: http}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web-x, namespace: t, labels: {{kubernetes.io/service-name: web}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n",
            eps.join(", ")
        );
    }
    std::fs::write(dir.join("services.yaml"), svcs).unwrap();
}

const ECHO_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: t}\n\
     spec: {clusterIP: 10.97.0.53, ports: [{name: dns, port: 53, protocol: UDP, targetPort: 5353}]}\n";

/// A running lab, torn down on drop (also when a test fails).
struct Lab {
    dir: tempfile::TempDir,
    _lock: std::sync::MutexGuard<'static, ()>,
}

impl Lab {
    fn up() -> Lab {
        Lab::start(None, &[])
    }

    /// A lab with extra pods, its objects in the API server of `kubeconfig` if given.
    fn start(kubeconfig: Option<&Path>, extra: &[(&str, &str, &str, &str)]) -> Lab {
        Lab::start_with_files(kubeconfig, extra, &[])
    }

    /// As [`Lab::start`], with more manifest files (name, content) beside the test cluster's.
    fn start_with_files(
        kubeconfig: Option<&Path>,
        extra: &[(&str, &str, &str, &str)],
        files: &[(&str, &str)],
    ) -> Lab {
        // SAFETY: plain syscall.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "lab tests build namespaces and must run as root"
        );
        let lock = ONE_LAB
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let dir = tempfile::tempdir().unwrap();
        let lab = Lab { dir, _lock: lock };
        let m = lab.dir.path().join("m0");
        manifests(&m, Some(ALL_WEB), ECHO_SERVICE, extra);
        for (name, content) in files {
            std::fs::write(m.join(name), content).unwrap();
        }
        let mut args = vec![
            "up",
            "--manifests",
            m.to_str().unwrap(),
            "--external",
            "ext=172.31.0.100",
            "--external",
            "ext2=172.31.0.200",
        ];
        if let Some(kc) = kubeconfig {
            args.extend(["--kubeconfig", kc.to_str().unwrap()]);
        }
        ok(kplab(&args));
        lab
    }

    fn apply(&self, name: &str, web: Option<Endpoints>, echo_service: &str) {
        self.apply_with_pods(name, web, echo_service, &[]);
    }

    fn apply_with_pods(
        &self,
        name: &str,
        web: Option<Endpoints>,
        echo_service: &str,
        extra: &[(&str, &str, &str, &str)],
    ) {
        let m = self.dir.path().join(name);
        manifests(&m, web, echo_service, extra);
        ok(kplab(&["apply", m.to_str().unwrap()]));
    }

    /// The base manifests (all web endpoints, the echo Service) plus `files`.
    fn apply_files(&self, name: &str, files: &[(&str, &str)]) {
        let m = self.dir.path().join(name);
        manifests(&m, Some(ALL_WEB), ECHO_SERVICE, &[]);
        for (file, content) in files {
            std::fs::write(m.join(file), content).unwrap();
        }
        ok(kplab(&["apply", m.to_str().unwrap()]));
    }

    fn state(&self) -> Value {
        serde_json::from_str(&ok(kplab(&["status"]))).unwrap()
    }

    fn netns(&self, pod: &str) -> String {
        let state = self.state();
        state["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["spec"]["key"] == format!("t/{pod}"))
            .unwrap_or_else(|| panic!("pod {pod} not in the lab"))["netns"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let out = kplab(&["down"]);
        if !std::thread::panicking() {
            ok(out);
        }
    }
}

fn probe(from: &str, to: &str, proto: &str, count: u32) -> Vec<Value> {
    let out = ok(kplab(&[
        "probe",
        "--from",
        from,
        "--to",
        to,
        "--proto",
        proto,
        "--timeout-ms",
        "1000",
        "--count",
        &count.to_string(),
    ]));
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), count as usize);
    lines
}

fn backends(results: &[Value]) -> std::collections::BTreeSet<String> {
    results
        .iter()
        .map(|r| r["backend"].as_str().unwrap_or("-").to_owned())
        .collect()
}

/// Checksum errors counted by every lab namespace's kernel.
fn checksum_errors() -> u64 {
    let mut checked = 0;
    let mut errors = 0;
    for ns in netns::list(&format!("{LAB}-")).unwrap() {
        let out = netns::command(&ns, "nstat")
            .args(["-asz", "TcpInCsumErrors", "UdpInCsumErrors"])
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("CsumErrors"))
        {
            checked += 1;
            errors += line
                .split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<u64>()
                .unwrap();
        }
    }
    assert!(checked >= 2 * 7, "nstat read too few counters ({checked})");
    errors
}

#[test]
fn clusterip_from_both_nodes_reaches_every_ready_backend_with_the_client_address() {
    let lab = Lab::up();
    let all_web: std::collections::BTreeSet<String> =
        ["t/web-1", "t/web-2", "t/web-3"].map(String::from).into();
    let all_echo: std::collections::BTreeSet<String> =
        ["t/echo-1", "t/echo-2"].map(String::from).into();
    for (client, ip) in [("t/client-a", "10.245.1.10"), ("t/client-b", "10.245.2.10")] {
        let tcp = probe(client, WEB_VIP, "tcp", 40);
        assert!(
            tcp.iter().all(|r| r["result"] == "connected"),
            "{client}: {tcp:?}"
        );
        assert_eq!(
            backends(&tcp),
            all_web,
            "{client}: every ready web backend answers"
        );
        assert!(
            tcp.iter().all(|r| r["client_seen"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{ip}:"))),
            "{client}: the backend sees the client pod's own address"
        );
        let udp = probe(client, ECHO_VIP, "udp", 30);
        assert!(
            udp.iter().all(|r| r["result"] == "connected"),
            "{client}: {udp:?}"
        );
        assert_eq!(backends(&udp), all_echo);
        assert!(udp.iter().all(|r| {
            r["client_seen"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{ip}:"))
        }));
    }
    // A real HTTP client through the ClusterIP.
    let curl = netns::command(&lab.netns("client-a"), "curl")
        .args(["-sS", "-m", "3", "http://10.97.0.10/"])
        .output()
        .unwrap();
    let body: Value = serde_json::from_slice(&curl.stdout).expect("curl shows the JSON reply");
    assert!(body["pod"].as_str().unwrap().starts_with("t/web-"));
    assert_eq!(
        checksum_errors(),
        0,
        "no checksum errors anywhere in the lab"
    );
    // The agent's metrics, over HTTP inside its node's namespace, count the traffic just sent
    // (counters are refreshed every second).
    let node_ns = lab.state()["nodes"][0]["netns"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut web_flows = 0;
    for _ in 0..30 {
        let out = netns::command(&node_ns, "curl")
            .args(["-sS", "-m", "3", "http://127.0.0.1:10249/metrics"])
            .output()
            .unwrap();
        let metrics = String::from_utf8_lossy(&out.stdout);
        assert!(
            metrics.lines().any(|l| l == "dataplane_ready 1"),
            "{metrics}"
        );
        web_flows = metrics
            .lines()
            .find(|l| l.starts_with("dataplane_service_flows_total{service=\"t/web\""))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .expect("web service counter");
        if web_flows >= 40 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        web_flows >= 40,
        "client-a's 40 connections were translated on node-a: {web_flows}"
    );
}

/// A keep-alive HTTP connection opened from inside a pod's namespace.
struct Held {
    stream: TcpStream,
}

impl Held {
    fn open(netns: &str, to: &str) -> Held {
        let netns = netns.to_owned();
        let to: SocketAddr = to.parse().unwrap();
        let stream = std::thread::spawn(move || {
            // Only this helper thread changes namespace.
            kplab::netns::enter(&netns).unwrap();
            TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap()
        })
        .join()
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        Held { stream }
    }

    /// One request on the connection; returns the pod that answered.
    fn ask(&mut self) -> String {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        while !got.ends_with(b"\n") || !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = self
                .stream
                .read(&mut buf)
                .expect("reply on the held connection");
            assert!(n > 0, "held connection closed");
            got.extend_from_slice(&buf[..n]);
        }
        let body = &got[got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4..];
        serde_json::from_slice::<Value>(body).unwrap()["pod"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

#[test]
fn node_clients_reach_cluster_ips_at_the_socket_and_see_the_service_address() {
    let lab = Lab::up();
    let mount = kplab::cgroup::mount().unwrap();
    let lab_root = std::path::PathBuf::from(format!("/run/{LAB}/cgroup"));
    let state = lab.state();
    for node in state["nodes"].as_array().unwrap() {
        let cg = Path::new(node["cgroup"].as_str().expect("every node has its cgroup"));
        let below = cg
            .strip_prefix(&lab_root)
            .expect("a cgroup below the lab's own cgroup2 mount");
        assert!(
            below.to_string_lossy().starts_with(&format!("{LAB}-"))
                && below.components().count() == 2,
            "{}: <lab>-<run>/<node>, never the root",
            cg.display()
        );
    }
    let all_web: std::collections::BTreeSet<String> =
        ["t/web-1", "t/web-2", "t/web-3"].map(String::from).into();
    let all_echo: std::collections::BTreeSet<String> =
        ["t/echo-1", "t/echo-2"].map(String::from).into();
    for (node, ip) in [("node-a", "172.31.0.2"), ("node-b", "172.31.0.3")] {
        let tcp = probe(node, WEB_VIP, "tcp", 40);
        assert!(
            tcp.iter().all(|r| r["result"] == "connected"),
            "{node}: {tcp:?}"
        );
        assert_eq!(backends(&tcp), all_web, "{node}: every ready web backend");
        assert!(
            tcp.iter()
                .all(|r| r["served"] == "8080/tcp" && r["http_status"] == 200),
            "{node}: the probe reports the backend port, protocol and HTTP status: {tcp:?}"
        );
        assert!(
            tcp.iter().all(|r| r["client_seen"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{ip}:"))),
            "{node}: the backend sees the node's address: {tcp:?}"
        );
        let udp = probe(node, ECHO_VIP, "udp", 30);
        assert!(
            udp.iter().all(|r| r["result"] == "connected"),
            "{node}: {udp:?}"
        );
        assert_eq!(backends(&udp), all_echo, "{node}: every echo backend");
        assert!(
            udp.iter().all(|r| r["served"] == "5353/udp"),
            "{node}: {udp:?}"
        );
        let empty = probe(node, "10.97.0.99:80", "tcp", 1);
        assert_eq!(empty[0]["result"], "refused", "{node}: {empty:?}");
    }
    for node in state["nodes"].as_array().unwrap() {
        let name = node["spec"]["name"].as_str().unwrap();
        let agent: Value = serde_json::from_slice(
            &std::fs::read(format!("/run/{LAB}/nodes/{name}/status.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            agent["cgroups"],
            json!([node["cgroup"]]),
            "{name}: the agent's socket hooks are on its node's cgroup"
        );
    }
    drop(lab);
    let left: Vec<String> = std::fs::read_dir(&mount)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{LAB}-")))
        .collect();
    assert!(left.is_empty(), "down removes the lab's cgroups: {left:?}");
}

/// Two dnsmasq pods (Debian's) behind a kube-dns-style Service on UDP and TCP 53.
const CLUSTER_DNS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: dns-1, namespace: t, annotations: {kplab.dev/server: dnsmasq}}\n\
     spec: {nodeName: node-a, containers: [{name: c, image: dnsmasq, ports: [{containerPort: 53, protocol: UDP}, {containerPort: 53, protocol: TCP}]}]}\n\
     status: {podIP: 10.245.1.53}\n---\n\
     apiVersion: v1\nkind: Pod\nmetadata: {name: dns-2, namespace: t, annotations: {kplab.dev/server: dnsmasq}}\n\
     spec: {nodeName: node-b, containers: [{name: c, image: dnsmasq, ports: [{containerPort: 53, protocol: UDP}, {containerPort: 53, protocol: TCP}]}]}\n\
     status: {podIP: 10.245.2.53}\n---\n\
     apiVersion: v1\nkind: Service\nmetadata: {name: kube-dns, namespace: t}\n\
     spec: {clusterIP: 10.97.0.100, ports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]}\n---\n\
     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata: {name: kube-dns-x, namespace: t, labels: {kubernetes.io/service-name: kube-dns}}\n\
     addressType: IPv4\nports: [{name: dns, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]\n\
     endpoints: [{addresses: [10.245.1.53]}, {addresses: [10.245.2.53]}]\n";

/// `dig` run as `who` (`kplab exec`): the answers to `whoami.lab.` from the cluster DNS Service.
fn dig(who: &str, tcp: bool, queries: usize) -> Vec<String> {
    let mut args = vec![
        "exec",
        "--on",
        who,
        "--",
        "dig",
        "@10.97.0.100",
        "+short",
        "+tries=1",
        "+time=2",
    ];
    if tcp {
        args.push("+tcp");
    }
    let names = vec!["whoami.lab."; queries];
    args.extend(names);
    ok(kplab(&args)).lines().map(str::to_owned).collect()
}

#[test]
fn cluster_dns_through_the_service_from_pods_and_nodes_over_udp_and_tcp() {
    let _lab = Lab::start_with_files(None, &[], &[("dns.yaml", CLUSTER_DNS)]);
    let both: std::collections::BTreeSet<String> =
        ["10.245.1.53", "10.245.2.53"].map(String::from).into();
    for who in ["t/client-a", "t/client-b", "node-a", "node-b"] {
        for tcp in [false, true] {
            let answers = dig(who, tcp, 20);
            assert_eq!(
                answers.len(),
                20,
                "{who} tcp={tcp}: one answer per query: {answers:?}"
            );
            let seen: std::collections::BTreeSet<String> = answers.into_iter().collect();
            assert!(
                seen.is_subset(&both) && !seen.is_empty(),
                "{who} tcp={tcp}: answers come from the dns pods: {seen:?}"
            );
        }
    }
    // One dig process sends its queries from one socket: across several runs both backends answer.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..10 {
        seen.extend(dig("node-a", false, 1));
    }
    assert_eq!(seen, both, "queries from a node spread over both dns pods");
}

/// A LoadBalancer Service with a NodePort, an externalIP and two ingress IPs, one of them
/// `ipMode: Proxy`.
const LB_SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: lb, namespace: t}\n\
     spec: {type: LoadBalancer, clusterIP: 10.97.0.20, externalIPs: [10.98.0.7], ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30080}]}\n\
     status: {loadBalancer: {ingress: [{ip: 10.98.1.1}, {ip: 10.98.1.2, ipMode: Proxy}]}}\n---\n\
     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata: {name: lb-x, namespace: t, labels: {kubernetes.io/service-name: lb}}\n\
     addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
     endpoints: [{addresses: [10.245.1.21], nodeName: node-a}]\n";

#[test]
fn node_ports_external_ips_and_load_balancer_ips_answer_pods_and_nodes_except_ip_mode_proxy() {
    let _lab = Lab::start_with_files(None, &[], &[("lb.yaml", LB_SERVICE)]);
    for from in ["t/client-a", "t/client-b", "node-a", "node-b"] {
        for to in ["10.97.0.20:80", "10.98.0.7:80", "10.98.1.1:80"] {
            let r = probe(from, to, "tcp", 5);
            assert!(
                r.iter()
                    .all(|r| r["result"] == "connected" && r["backend"] == "t/web-1"),
                "{from} -> {to}: {r:?}"
            );
        }
        // The NodePort on both nodes' InternalIPs: the own node's is translated here (pod
        // interface or socket), the other node's by that node's external interface.
        for node_port in ["172.31.0.2:30080", "172.31.0.3:30080"] {
            let r = probe(from, node_port, "tcp", 5);
            assert!(
                r.iter()
                    .all(|r| r["result"] == "connected" && r["backend"] == "t/web-1"),
                "{from} -> NodePort {node_port}: {r:?}"
            );
        }
        let proxied = probe(from, "10.98.1.2:80", "tcp", 1);
        assert_ne!(
            proxied[0]["result"], "connected",
            "{from}: an ipMode Proxy address is the load balancer's, not translated here"
        );
    }
}

/// Services for traffic from outside: `cl` (eTP Cluster, web-1 on node-a and web-2 on node-b,
/// NodePort 30081, LB IP 10.98.2.1 and externalIP 10.98.0.8), `loc` (eTP Local, web-3 on node-b
/// only, NodePort 30082, LB IP 10.98.2.2), `rng` (LB IP 10.98.2.3 for 172.31.0.200/32 only),
/// `itl` (iTP Local, web-1 on node-a only), `closed` (UDP NodePort 30084 to a port web-1 does not
/// listen on: its port unreachable must reach the client as one for the address it used), `emp`
/// (LB IP 10.98.2.4, NodePorts 30085 TCP and 30086 UDP, no endpoints: refused, as kube-proxy's
/// REJECT).
const EXTERNAL_SERVICES: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: cl, namespace: t}\n\
     spec: {type: LoadBalancer, clusterIP: 10.97.0.21, externalIPs: [10.98.0.8], ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30081}]}\n\
     status: {loadBalancer: {ingress: [{ip: 10.98.2.1}]}}\n---\n\
     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata: {name: cl-x, namespace: t, labels: {kubernetes.io/service-name: cl}}\n\
     addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
     endpoints: [{addresses: [10.245.1.21], nodeName: node-a}, {addresses: [10.245.2.22], nodeName: node-b}]\n---\n\
     apiVersion: v1\nkind: Service\nmetadata: {name: loc, namespace: t}\n\
     spec: {type: LoadBalancer, clusterIP: 10.97.0.22, externalTrafficPolicy: Local, healthCheckNodePort: 32100, selector: {app: loc}, ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30082}]}\n\
     status: {loadBalancer: {ingress: [{ip: 10.98.2.2}]}}\n---\n\
     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata: {name: loc-x, namespace: t, labels: {kubernetes.io/service-name: loc}}\n\
     addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
     endpoints: [{addresses: [10.245.2.23], nodeName: node-b}]\n---\n\
     apiVersion: v1\nkind: Service\nmetadata: {name: rng, namespace: t}\n\
     spec: {type: LoadBalancer, clusterIP: 10.97.0.23, loadBalancerSourceRanges: [172.31.0.200/32], ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30083}]}\n\
     status: {loadBalancer: {ingress: [{ip: 10.98.2.3}]}}\n---\n\
     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata: {name: rng-x, namespace: t, labels: {kubernetes.io/service-name: rng}}\n\
     addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
     endpoints: [{addresses: [10.245.1.21], nodeName: node-a}]\n---\n\
     apiVersion: v1\nkind: Service\nmetadata: {name: itl, namespace: t}\n\
     spec: {clusterIP: 10.97.0.24, internalTrafficPolicy: Local, ports: [{name: http, port: 80, protocol: TCP, targetPort: 8080}]}\n---\n\
     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata: {name: itl-x, namespace: t, labels: {kubernetes.io/service-name: itl}}\n\
     addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
     endpoints: [{addresses: [10.245.1.21], nodeName: node-a}]\n---\n\
     apiVersion: v1\nkind: Service\nmetadata: {name: closed, namespace: t}\n\
     spec: {type: NodePort, clusterIP: 10.97.0.25, ports: [{name: u, port: 99, protocol: UDP, targetPort: 9999, nodePort: 30084}]}\n---\n\
     apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
     metadata: {name: closed-x, namespace: t, labels: {kubernetes.io/service-name: closed}}\n\
     addressType: IPv4\nports: [{name: u, port: 9999, protocol: UDP}]\n\
     endpoints: [{addresses: [10.245.1.21], nodeName: node-a}]\n---\n\
     apiVersion: v1\nkind: Service\nmetadata: {name: emp, namespace: t}\n\
     spec: {type: LoadBalancer, clusterIP: 10.97.0.26, ports: [{name: h, port: 80, protocol: TCP, targetPort: 8080, nodePort: 30085}, {name: u, port: 53, protocol: UDP, targetPort: 5353, nodePort: 30086}]}\n\
     status: {loadBalancer: {ingress: [{ip: 10.98.2.4}]}}\n";

/// One HTTP GET from a lab host with curl: status code and JSON body.
fn http_get(from: &str, to: &str, path: &str) -> (u16, Value) {
    let out = kplab(&[
        "exec",
        "--on",
        from,
        "--",
        "curl",
        "-sS",
        "-m",
        "3",
        "-w",
        "\n%{http_code}",
        &format!("http://{to}{path}"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (
        code.parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

/// A health check node port's answer: status code and `localEndpoints`.
fn health(from: &str, to: &str, path: &str) -> (u16, u64) {
    let (code, body) = http_get(from, to, path);
    (code, body["localEndpoints"].as_u64().unwrap_or(u64::MAX))
}

/// (backend, client address it saw, without the port) of every connected probe.
fn answers(results: &[Value]) -> std::collections::BTreeSet<(String, String)> {
    results
        .iter()
        .filter(|r| r["result"] == "connected")
        .map(|r| {
            (
                r["backend"].as_str().unwrap_or("-").to_owned(),
                r["client_seen"]
                    .as_str()
                    .and_then(|c| c.split(':').next())
                    .unwrap_or("-")
                    .to_owned(),
            )
        })
        .collect()
}

/// `count` TCP probes from `from` to `to`, every one answered by `backend` seeing `client`.
fn answered_by(from: &str, to: &str, count: u32, (backend, client): (&str, &str), why: &str) {
    let r = probe(from, to, "tcp", count);
    assert_eq!(
        answers(&r),
        [pair(backend, client)].into(),
        "{from} -> {to} {why}: {r:?}"
    );
    assert!(
        r.iter().all(|r| r["result"] == "connected"),
        "{from} -> {to}: {r:?}"
    );
}

/// `count` TCP probes from `from` to `to`, every one unanswered (dropped, not refused).
fn dropped(from: &str, to: &str, count: u32, why: &str) {
    let r = probe(from, to, "tcp", count);
    assert!(
        r.iter().all(|r| r["result"] == "timeout"),
        "{from} -> {to}, {why}: {r:?}"
    );
}

fn pair(backend: &str, client: &str) -> (String, String) {
    (backend.to_owned(), client.to_owned())
}

#[test]
fn external_clients_reach_node_ports_and_load_balancer_ips_under_each_traffic_policy() {
    let lab = Lab::start_with_files(None, &[], &[("external.yaml", EXTERNAL_SERVICES)]);
    // eTP Cluster: every endpoint from either node; a local one sees the client, a remote one
    // the node that forwarded (source NAT, so its reply comes back through that node).
    for (node, node_ip) in [("node-a", "172.31.0.2"), ("node-b", "172.31.0.3")] {
        let r = probe("ext", &format!("{node_ip}:30081"), "tcp", 24);
        let (local, remote) = if node == "node-a" {
            ("t/web-1", "t/web-2")
        } else {
            ("t/web-2", "t/web-1")
        };
        assert_eq!(
            answers(&r),
            [pair(local, "172.31.0.100"), pair(remote, node_ip)].into(),
            "ext -> {node} NodePort: {r:?}"
        );
    }
    // NodePorts answer on every InternalIP of a node (`--nodeport-addresses primary`), not on
    // its ExternalIP: nothing listens there, so the kernel refuses.
    let r = probe("ext", "172.31.1.2:30081", "tcp", 24);
    assert_eq!(
        answers(&r),
        [
            pair("t/web-1", "172.31.0.100"),
            pair("t/web-2", "172.31.0.2")
        ]
        .into(),
        "secondary InternalIP (source NAT uses the first): {r:?}"
    );
    let r = probe("ext", "172.31.2.2:30081", "tcp", 2);
    assert!(
        r.iter().all(|r| r["result"] == "refused"),
        "ExternalIP: {r:?}"
    );
    for to in ["10.98.2.1:80", "10.98.0.8:80"] {
        let r = probe("ext", to, "tcp", 24);
        assert!(
            r.iter().all(|r| r["result"] == "connected"),
            "ext -> {to}: {r:?}"
        );
        assert_eq!(
            backends(&r),
            ["t/web-1".to_owned(), "t/web-2".to_owned()].into(),
            "{to}"
        );
    }
    // eTP Local: node-b has the endpoint, the client address is kept; node-a has none and drops.
    answered_by(
        "ext",
        "172.31.0.3:30082",
        5,
        ("t/web-3", "172.31.0.100"),
        "",
    );
    answered_by(
        "ext",
        "10.98.2.2:80",
        5,
        ("t/web-3", "172.31.0.100"),
        "LB IP routed to node-b",
    );
    dropped("ext", "172.31.0.2:30082", 2, "eTP Local, no local endpoint");
    // The health check node port says which node has one (kube-proxy's JSON), and every node
    // answers kube-proxy's /healthz and /livez on 10256 to the load balancer; metrics stay on
    // loopback.
    assert_eq!(health("ext", "172.31.0.3:32100", "/"), (200, 1));
    assert_eq!(health("ext", "172.31.0.2:32100", "/"), (503, 0));
    for node in ["172.31.0.2", "172.31.0.3"] {
        let r = http_get("ext", &format!("{node}:10256"), "/healthz");
        assert_eq!(r.0, 200, "{node}: {r:?}");
        assert_eq!(r.1["nodeEligible"], true, "{r:?}");
        assert_eq!(http_get("ext", &format!("{node}:10256"), "/livez").0, 200);
        let metrics = probe("ext", &format!("{node}:10249"), "tcp", 1);
        assert_ne!(metrics[0]["result"], "connected", "{metrics:?}");
    }
    // ...while pods and nodes reach it everywhere (in-cluster traffic ignores eTP).
    for from in ["t/client-a", "node-a"] {
        let r = probe(from, "172.31.0.2:30082", "tcp", 3);
        assert_eq!(backends(&r), ["t/web-3".to_owned()].into(), "{from}: {r:?}");
    }
    // Hairpin through a NodePort: web-3 reaches itself.
    let r = probe("t/web-3", "172.31.0.3:30082", "tcp", 3);
    assert_eq!(
        backends(&r),
        ["t/web-3".to_owned()].into(),
        "hairpin: {r:?}"
    );
    // A pod reaches the other node's NodePort through that node's XDP.
    let r = probe("t/client-a", "172.31.0.3:30081", "tcp", 24);
    assert!(r.iter().all(|r| r["result"] == "connected"), "{r:?}");

    // Source ranges: only 172.31.0.200 reaches the LB IP.
    answered_by("ext2", "10.98.2.3:80", 3, ("t/web-1", "172.31.0.200"), "");
    dropped("ext", "10.98.2.3:80", 2, "outside the ranges");

    // iTP Local: node-a's clients reach node-a's endpoint; node-b's have none and are dropped.
    for from in ["t/client-a", "node-a"] {
        let r = probe(from, "10.97.0.24:80", "tcp", 3);
        assert_eq!(backends(&r), ["t/web-1".to_owned()].into(), "{from}: {r:?}");
    }
    dropped("t/client-b", "10.97.0.24:80", 2, "iTP Local, none local");
    let r = probe("node-b", "10.97.0.24:80", "tcp", 1);
    assert_ne!(r[0]["result"], "connected", "{r:?}");
    assert_eq!(checksum_errors(), 0);

    // ICMP errors come back translated: a connected UDP socket sees its datagram refused only
    // if the quoted packet matches what it sent (local backend, source-NATed remote one, pod).
    for (from, to) in [
        ("ext", "172.31.0.2:30084"),
        ("ext", "172.31.0.3:30084"),
        ("t/client-b", "10.97.0.25:99"),
    ] {
        let r = probe(from, to, "udp", 2);
        assert!(
            r.iter().all(|r| r["result"] == "refused"),
            "{from} -> {to}: {r:?}"
        );
    }
    for (to, proto) in [
        ("172.31.0.2:30085", "tcp"),
        ("10.98.2.4:80", "tcp"),
        ("10.98.2.4:53", "udp"),
    ] {
        let r = probe("ext", to, proto, 2);
        assert!(
            r.iter().all(|r| r["result"] == "refused"),
            "{to}/{proto} without endpoints: {r:?}"
        );
    }

    // The local endpoint moves from node-b to node-a: the health checks follow, and so does the
    // traffic of the NodePorts.
    let moved = EXTERNAL_SERVICES.replace(
        "endpoints: [{addresses: [10.245.2.23], nodeName: node-b}]",
        "endpoints: [{addresses: [10.245.2.23], nodeName: node-b, conditions: {ready: false}}, \
         {addresses: [10.245.1.21], nodeName: node-a}]",
    );
    assert_ne!(moved, EXTERNAL_SERVICES);
    lab.apply_files("moved", &[("external.yaml", &moved)]);
    assert_eq!(health("ext", "172.31.0.2:32100", "/"), (200, 1));
    assert_eq!(health("ext", "172.31.0.3:32100", "/"), (503, 0));
    answered_by(
        "ext",
        "172.31.0.2:30082",
        3,
        ("t/web-1", "172.31.0.100"),
        "",
    );
    let r = probe("ext", "172.31.0.3:30082", "tcp", 2);
    assert!(r.iter().all(|r| r["result"] == "timeout"), "{r:?}");
}

#[test]
fn endpoints_turned_not_ready_or_removed_get_no_new_connections_while_existing_ones_finish() {
    let lab = Lab::up();
    let netns = lab.netns("client-a");
    let mut held = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let mut h = Held::open(&netns, WEB_VIP);
        let pod = h.ask();
        held.entry(pod).or_insert(h);
        if held.contains_key("t/web-1") && held.contains_key("t/web-2") {
            break;
        }
    }
    assert!(
        held.contains_key("t/web-1") && held.contains_key("t/web-2"),
        "held {:?}",
        held.keys()
    );

    lab.apply(
        "not-ready",
        Some(&[
            ("web-1", "10.245.1.21", Some(false)),
            ALL_WEB[1],
            ALL_WEB[2],
        ]),
        ECHO_SERVICE,
    );
    let after = probe("t/client-a", WEB_VIP, "tcp", 30);
    assert!(after.iter().all(|r| r["result"] == "connected"));
    assert!(
        !backends(&after).contains("t/web-1"),
        "a not-ready endpoint gets no new connection"
    );
    assert_eq!(
        held.get_mut("t/web-1").unwrap().ask(),
        "t/web-1",
        "its open connection still works"
    );

    lab.apply(
        "removed",
        Some(&[("web-1", "10.245.1.21", Some(false)), ALL_WEB[2]]),
        ECHO_SERVICE,
    );
    let after = probe("t/client-b", WEB_VIP, "tcp", 20);
    assert_eq!(
        backends(&after),
        ["t/web-3".to_owned()].into(),
        "only the remaining ready endpoint"
    );
    assert_eq!(
        held.get_mut("t/web-2").unwrap().ask(),
        "t/web-2",
        "a removed endpoint's connection finishes"
    );
    assert_eq!(held.get_mut("t/web-1").unwrap().ask(), "t/web-1");
    assert_eq!(checksum_errors(), 0);
}

#[test]
fn deleted_services_stop_answering_empty_ones_refuse_and_bad_objects_lose_nothing() {
    let lab = Lab::up();
    for (to, proto) in [("10.97.0.99:80", "tcp"), ("10.97.0.99:99", "udp")] {
        let r = probe("t/client-b", to, proto, 3);
        assert!(
            r.iter().all(|r| r["result"] == "refused"),
            "no endpoints -> refused: {r:?}"
        );
    }
    // The echo Service turns malformed: it is skipped with a warning, and what was programmed stays.
    let malformed = ECHO_SERVICE.replace("ports: [", "ports: 7, x: [");
    lab.apply("malformed", Some(ALL_WEB), &malformed);
    let r = probe("t/client-a", ECHO_VIP, "udp", 5);
    assert!(r.iter().all(|r| r["result"] == "connected"), "{r:?}");
    let log = std::fs::read_to_string(format!("/run/{LAB}/nodes/node-a/agent.log")).unwrap();
    assert!(
        log.contains("Service t/echo is malformed"),
        "the warning names the object"
    );

    lab.apply("deleted", None, ECHO_SERVICE);
    let r = probe("t/client-a", WEB_VIP, "tcp", 5);
    assert!(
        r.iter().all(|r| r["result"] != "connected"),
        "a deleted Service stops answering: {r:?}"
    );
    let r = probe("t/client-a", ECHO_VIP, "udp", 5);
    assert!(
        r.iter().all(|r| r["result"] == "connected"),
        "other Services keep working"
    );
    drop(lab);
}

#[test]
fn probe_classifies_silence_as_timeout_and_fails_only_when_it_cannot_run() {
    let lab = Lab::up();
    let state = lab.state();
    let pid = state["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["spec"]["key"] == "t/echo-1")
        .unwrap()["server_pid"]
        .as_i64()
        .unwrap() as i32;
    // SAFETY: pausing the lab's own server process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let out = kplab(&[
        "probe",
        "--from",
        "t/client-b",
        "--to",
        "10.245.1.31:5353",
        "--proto",
        "udp",
        "--timeout-ms",
        "300",
    ]);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let r: Value = serde_json::from_str(ok(out).trim()).unwrap();
    assert_eq!(r["result"], "timeout");
    assert_eq!(r["backend"], Value::Null);

    let r: Value = serde_json::from_str(
        ok(kplab(&[
            "probe",
            "--from",
            "t/client-b",
            "--to",
            "10.245.1.31:5353",
            "--proto",
            "udp",
        ]))
        .trim(),
    )
    .unwrap();
    assert_eq!(r["result"], "connected");

    // Nodes and external hosts are probe sources too: a node reaches pods on the other node; an
    // external host reaches a node, whose kernel refuses a port nobody listens on.
    let r = probe("node-a", "10.245.2.22:8080", "tcp", 1);
    assert_eq!(
        (r[0]["result"].as_str(), r[0]["backend"].as_str()),
        (Some("connected"), Some("t/web-2"))
    );
    assert!(
        r[0]["client_seen"]
            .as_str()
            .unwrap()
            .starts_with("172.31.0.2:")
    );
    let r = probe("ext", "172.31.0.2:9", "tcp", 1);
    assert_eq!(r[0]["result"], "refused");

    let bad = kplab(&["probe", "--from", "t/nobody", "--to", WEB_VIP]);
    assert!(
        !bad.status.success(),
        "an unknown source is an error, not a result"
    );
}

fn attached(node: &str) -> usize {
    let status: Value = serde_json::from_slice(
        &std::fs::read(format!("/run/{LAB}/nodes/{node}/status.json")).unwrap(),
    )
    .unwrap();
    status["interfaces"].as_array().unwrap().len()
}

#[test]
fn agents_follow_pods_as_they_come_and_go() {
    let lab = Lab::up();
    assert_eq!((attached("node-a"), attached("node-b")), (3, 4));
    // Each pod's server runs in a cgroup of its own below its node's, and nowhere else.
    let state = lab.state();
    for pod in state["pods"].as_array().unwrap() {
        let node = state["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["spec"]["name"] == pod["spec"]["node"])
            .unwrap();
        let node_cg = Path::new(node["cgroup"].as_str().unwrap());
        let pod_cg = Path::new(pod["cgroup"].as_str().unwrap());
        assert_eq!(pod_cg.parent(), Some(node_cg), "{pod}");
        let procs = std::fs::read_to_string(pod_cg.join("cgroup.procs")).unwrap();
        let pid = pod["server_pid"].to_string();
        assert!(
            procs.lines().any(|l| l == pid),
            "{pid} not in {}",
            pod_cg.display()
        );
    }
    let client_c = [("client-c", "node-b", "10.245.2.50", "8080/TCP")];
    lab.apply_with_pods("new-pod", Some(ALL_WEB), ECHO_SERVICE, &client_c);
    assert_eq!(
        attached("node-b"),
        5,
        "the new pod's interface is attached before apply returns"
    );
    let r = probe("t/client-c", WEB_VIP, "tcp", 10);
    assert!(r.iter().all(|r| r["result"] == "connected"), "{r:?}");
    assert!(r.iter().all(|r| {
        r["client_seen"]
            .as_str()
            .unwrap()
            .starts_with("10.245.2.50:")
    }));

    lab.apply("pod-gone", Some(ALL_WEB), ECHO_SERVICE);
    assert_eq!(
        attached("node-b"),
        4,
        "the removed pod's interface is forgotten"
    );
}

#[test]
fn agent_restarts_keep_connections_and_the_datapath() {
    let lab = Lab::up();
    let mut held = Held::open(&lab.netns("client-a"), WEB_VIP);
    let backend = held.ask();

    ok(kplab(&["agents", "stop"]));
    // No agent runs: the pinned links keep the programs attached, conntrack keeps the flow.
    assert_eq!(
        held.ask(),
        backend,
        "an open connection survives the agent stopping"
    );
    let r = probe("t/client-b", WEB_VIP, "tcp", 10);
    assert!(
        r.iter().all(|r| r["result"] == "connected"),
        "new connections still work: {r:?}"
    );

    ok(kplab(&["agents", "start"]));
    assert_eq!(held.ask(), backend, "and the new agent's programs keep it");
    let r = probe("t/client-a", WEB_VIP, "tcp", 40);
    assert!(r.iter().all(|r| r["result"] == "connected"));
    assert_eq!(
        backends(&r).len(),
        3,
        "the new agent programmed every backend"
    );
    assert_eq!((attached("node-a"), attached("node-b")), (3, 4));
    assert_eq!(pod_translation(), ["socket", "socket"], "the lab's default");

    // Switching how pods are translated is a restart too: the held connection (opened outside
    // the pod's cgroup, so TC's) keeps its backend, and new ones go through TC.
    ok(kplab(&["agents", "stop"]));
    ok(kplab(&["agents", "start", "--pod-translation", "tc"]));
    assert_eq!(pod_translation(), ["tc", "tc"]);
    assert_eq!(held.ask(), backend, "kept across the switch");
    let r = probe("t/client-a", WEB_VIP, "tcp", 40);
    assert!(r.iter().all(|r| r["result"] == "connected"), "{r:?}");
    assert_eq!(backends(&r).len(), 3);
    ok(kplab(&["agents", "stop"]));
    ok(kplab(&["agents", "start", "--pod-translation", "socket"]));
    assert_eq!(pod_translation(), ["socket", "socket"]);
    assert_eq!(held.ask(), backend, "and back");
    assert_eq!(checksum_errors(), 0);
}

/// Each node agent's `pod_translation`, from its status file.
fn pod_translation() -> Vec<String> {
    ["node-a", "node-b"]
        .iter()
        .map(|n| {
            let path = format!("/run/{LAB}/nodes/{n}/status.json");
            let v: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            v["pod_translation"].as_str().unwrap_or("?").to_owned()
        })
        .collect()
}

#[test]
fn with_a_real_api_server_objects_are_created_agents_watch_them_and_down_deletes_them() {
    let api = testenv::ApiServer::start();
    let extra = [("extra", "node-a", "10.245.1.40", "8080/TCP")];
    let lab = Lab::start(Some(&api.kubeconfig()), &extra);
    let get = |what: &str, path: &str| -> Option<Value> {
        let out = api.kubectl(&["get", what, "-o", "json", "-n", "t"]);
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        Some(v.pointer(path).cloned().unwrap_or(Value::Null))
    };
    assert_eq!(
        get("pod/web-1", "/status/podIP"),
        Some(json!("10.245.1.21")),
        "pods created with their status"
    );
    assert_eq!(
        get("node/node-a", "/status/addresses/0/address"),
        Some(json!("172.31.0.2")),
        "nodes created with their status"
    );
    assert!(
        get("namespace/t", "/metadata/name").is_some(),
        "the pods' namespace"
    );
    assert_eq!(
        get("service/web", "/spec/clusterIPs"),
        Some(json!(["10.97.0.10"])),
        "the server allocated the Service's address"
    );

    let tcp = probe("t/client-a", WEB_VIP, "tcp", 30);
    assert!(tcp.iter().all(|r| r["result"] == "connected"), "{tcp:?}");
    assert_eq!(backends(&tcp).len(), 3, "every ready backend: {tcp:?}");
    let udp = probe("t/client-b", ECHO_VIP, "udp", 10);
    assert!(udp.iter().all(|r| r["result"] == "connected"), "{udp:?}");

    // Endpoints removed, and a pod changed in a way the API server refuses (a pod's ports are
    // immutable): the lab deletes and re-creates it.
    let uid = get("pod/extra", "/metadata/uid").expect("the extra pod exists");
    let changed = [("extra", "node-a", "10.245.1.40", "8081/TCP")];
    lab.apply_with_pods("fewer", Some(&[ALL_WEB[2]]), ECHO_SERVICE, &changed);
    let after = probe("t/client-a", WEB_VIP, "tcp", 15);
    assert_eq!(backends(&after), ["t/web-3".to_owned()].into(), "{after:?}");
    assert_eq!(
        get("pod/extra", "/spec/containers/0/ports/0/containerPort"),
        Some(json!(8081))
    );
    assert_ne!(
        get("pod/extra", "/metadata/uid").unwrap(),
        uid,
        "replaced by delete and create"
    );

    lab.apply("no-web", None, ECHO_SERVICE);
    assert_eq!(get("service/web", "/metadata/name"), None, "deleted");
    let r = probe("t/client-a", WEB_VIP, "tcp", 3);
    assert!(r.iter().all(|r| r["result"] != "connected"), "{r:?}");
    let r = probe("t/client-a", ECHO_VIP, "udp", 3);
    assert!(r.iter().all(|r| r["result"] == "connected"), "{r:?}");

    drop(lab);
    let left = api.kubectl_ok(&[
        "get",
        "pods,services,endpointslices,nodes,networkpolicies",
        "-A",
        "-o",
        "name",
    ]);
    assert_eq!(
        left.lines().collect::<Vec<_>>(),
        ["service/kubernetes"],
        "down deletes what the lab created and keeps what it did not create"
    );
    assert!(
        get("namespace/t", "/metadata/name").is_some(),
        "namespaces are kept"
    );
}

/// The NetworkPolicy test cluster: namespaces prod (team=blue) and dev (team=red); prod/web on
/// node-a (named port http), prod/api (TCP 8080, UDP 5353) and prod/client on node-b, dev/client
/// on node-a; Service prod/web; `policies` beside them.
fn policy_manifests(dir: &Path, dev_team: &str, policies: &str) {
    std::fs::create_dir_all(dir).unwrap();
    let mut m = String::new();
    for (name, cidr, ip) in [
        ("node-a", "10.245.1.0/24", "172.31.0.2"),
        ("node-b", "10.245.2.0/24", "172.31.0.3"),
    ] {
        m += &format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\nspec: {{podCIDR: {cidr}}}\n\
             status: {{addresses: [{{type: InternalIP, address: {ip}}}]}}\n---\n"
        );
    }
    for (ns, team) in [("prod", "blue"), ("dev", dev_team)] {
        m += &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{team: {team}}}}}\n---\n"
        );
    }
    for (ns, name, node, ip, app, ports) in [
        (
            "prod",
            "web",
            "node-a",
            "10.245.1.21",
            "web",
            "[{name: http, containerPort: 8080, protocol: TCP}]",
        ),
        (
            "prod",
            "api",
            "node-b",
            "10.245.2.22",
            "api",
            "[{containerPort: 8080, protocol: TCP}, {name: dns, containerPort: 5353, protocol: UDP}]",
        ),
        (
            "prod",
            "client",
            "node-b",
            "10.245.2.10",
            "client",
            "[{containerPort: 8080, protocol: TCP}]",
        ),
        (
            "dev",
            "client",
            "node-a",
            "10.245.1.10",
            "client",
            "[{containerPort: 8080, protocol: TCP}]",
        ),
    ] {
        m += &format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c, image: lab/server, ports: {ports}}}]}}\n\
             status: {{podIP: {ip}}}\n---\n"
        );
    }
    m += "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: prod}\n\
          spec: {clusterIP: 10.97.0.10, selector: {app: web}, ports: [{name: http, port: 80, protocol: TCP, targetPort: http}]}\n---\n\
          apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
          metadata: {name: web-x, namespace: prod, labels: {kubernetes.io/service-name: web}}\n\
          addressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\n\
          endpoints: [{addresses: [10.245.1.21], nodeName: node-a}]\n";
    std::fs::write(dir.join("cluster.yaml"), m).unwrap();
    std::fs::write(dir.join("policies.yaml"), policies).unwrap();
}

/// The policy lab's matrix targets, in one order, and the expected cells per source.
const POLICY_TARGETS: [&str; 8] = [
    "pod prod/web 10.245.1.21:8080/tcp",
    "pod prod/api 10.245.2.22:8080/tcp",
    "pod prod/api 10.245.2.22:5353/udp",
    "pod prod/client 10.245.2.10:8080/tcp",
    "pod dev/client 10.245.1.10:8080/tcp",
    "external ext 172.31.0.100:80/tcp",
    "external ext 172.31.0.100:53/udp",
    "svc prod/web 10.97.0.10:80/tcp",
];

/// Checks the whole matrix with `kplab matrix --expect` (the CLI a user runs), row by row.
fn expect_matrix(dir: &Path, step: &str, rows: [(&str, [&str; 8]); 5]) {
    let expected = kplab::Matrix {
        targets: POLICY_TARGETS.iter().map(|t| (*t).to_owned()).collect(),
        rows: rows
            .iter()
            .map(|(src, cells)| {
                (
                    (*src).to_owned(),
                    cells.iter().map(|c| (*c).to_owned()).collect(),
                )
            })
            .collect(),
    };
    let file = dir.join(format!("expect-{step}.txt"));
    std::fs::write(&file, expected.render()).unwrap();
    let out = kplab(&[
        "matrix",
        "--timeout-ms",
        "400",
        "--expect",
        file.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{step}: the matrix differs:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

const DEFAULT_DENY_AND_ALLOWS: &str = r"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: prod}
spec: {podSelector: {}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-red-clients, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: red}}, podSelector: {matchExpressions: [{key: app, operator: In, values: [client]}]}}]
    ports: [{port: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-by-address, namespace: prod}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
  - from: [{ipBlock: {cidr: 172.31.0.0/24, except: [172.31.0.200/32]}}]
    ports: [{protocol: TCP, port: 8080}]
  - from: [{ipBlock: {cidr: 10.245.2.10/32}}]
    ports: [{protocol: UDP, port: 5000, endPort: 6000}]
";

const DEV_EGRESS_DNS_ONLY: &str = r"---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: dns-only, namespace: dev}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 172.31.0.100/32}}]
    ports: [{protocol: UDP, port: 53}]
";

#[test]
fn network_policies_give_the_reachability_matrix_the_api_defines_and_follow_changes() {
    // SAFETY: plain syscall.
    assert_eq!(unsafe { libc::geteuid() }, 0, "lab tests must run as root");
    let _lock = ONE_LAB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = tempfile::tempdir().unwrap();
    let step = |name: &str, dev_team: &str, policies: &str| {
        let m = dir.path().join(name);
        policy_manifests(&m, dev_team, policies);
        m
    };
    let m0 = step("m0", "red", "");
    ok(kplab(&[
        "up",
        "--manifests",
        m0.to_str().unwrap(),
        "--external",
        "ext=172.31.0.100:tcp/80,udp/53",
    ]));
    struct Down;
    impl Drop for Down {
        fn drop(&mut self) {
            let _ = kplab(&["down"]);
        }
    }
    let _down = Down;
    // No policy: every pod and the external host reach every pod (the external host routes the
    // pod CIDRs to the nodes); the ClusterIP is not routed from outside.
    let open = ["ok", "ok", "ok", "ok", "ok", "ok", "ok", "ok"];
    let ext_open = ["ok", "ok", "ok", "ok", "ok", "ok", "ok", "rej"];
    expect_matrix(
        dir.path(),
        "open",
        [
            ("prod/web", open),
            ("prod/api", open),
            ("prod/client", open),
            ("dev/client", open),
            ("external/ext", ext_open),
        ],
    );
    // Default deny in prod; web admits red-team clients (namespaceSelector AND podSelector with
    // matchExpressions) on its named port, also through its Service, and not itself through it;
    // api admits 172.31.0.0/24 on TCP 8080 (the external host) and prod/client's pod IP as an
    // ipBlock on UDP 5000-6000 (endPort).
    let m1 = step("m1", "red", DEFAULT_DENY_AND_ALLOWS);
    ok(kplab(&["apply", m1.to_str().unwrap()]));
    let ext_1 = ["--", "ok", "--", "--", "ok", "ok", "ok", "rej"];
    expect_matrix(
        dir.path(),
        "default-deny",
        [
            ("prod/web", ["ok", "--", "--", "--", "ok", "ok", "ok", "--"]),
            ("prod/api", ["--", "ok", "ok", "--", "ok", "ok", "ok", "--"]),
            (
                "prod/client",
                ["--", "--", "ok", "ok", "ok", "ok", "ok", "--"],
            ),
            (
                "dev/client",
                ["ok", "--", "--", "--", "ok", "ok", "ok", "ok"],
            ),
            ("external/ext", ext_1),
        ],
    );
    // The agents explain both verdicts with their loaded programs, naming the deciding policy,
    // and the flow log recorded what the matrix tried.
    let allowed = ok(kplab(&[
        "explain",
        "--from",
        "dev/client",
        "--to",
        "10.97.0.10:80/tcp",
    ]));
    assert!(
        allowed.starts_with("dev/client -> 10.97.0.10:80/tcp: allowed"),
        "{allowed}"
    );
    assert!(
        allowed.contains("translated to prod/web (10.245.1.21):8080"),
        "{allowed}"
    );
    assert!(
        allowed
            .contains("ingress of prod/web: allowed, by NetworkPolicy prod/web-from-red-clients"),
        "{allowed}"
    );
    let denied = ok(kplab(&[
        "explain",
        "--from",
        "prod/client",
        "--to",
        "10.97.0.10:80/tcp",
    ]));
    assert!(
        denied.starts_with("prod/client -> 10.97.0.10:80/tcp: denied"),
        "{denied}"
    );
    assert!(denied.contains("node node-a: deny"), "{denied}");
    assert!(
        denied.contains("ingress of prod/web: denied (policy_ingress)"),
        "{denied}"
    );
    let from_outside = ok(kplab(&[
        "explain",
        "--from",
        "ext",
        "--to",
        "10.245.2.22:8080/tcp",
    ]));
    assert!(
        from_outside.contains("ingress of prod/api: allowed, by NetworkPolicy prod/api-by-address"),
        "{from_outside}"
    );
    let flows = ok(kplab(&["flows"]));
    assert!(
        flows.lines().any(|l| l.contains("dev/client (10.245.1.10)")
            && l.contains(
                "-> prod/web (10.245.1.21):8080 tcp ingress allowed by prod/web-from-red-clients"
            )),
        "{flows}"
    );
    assert!(
        flows.lines().any(|l| l.starts_with("20")
            && l.contains(" 172.31.0.100:")
            && l.contains(
                "-> prod/web (10.245.1.21):8080 tcp ingress denied no policy of prod/web allows it"
            )),
        "{flows}"
    );
    // Egress to DNS only for dev, stacked on the ingress policies.
    let m2 = step(
        "m2",
        "red",
        &format!("{DEFAULT_DENY_AND_ALLOWS}{DEV_EGRESS_DNS_ONLY}"),
    );
    ok(kplab(&["apply", m2.to_str().unwrap()]));
    expect_matrix(
        dir.path(),
        "dns-only",
        [
            ("prod/web", ["ok", "--", "--", "--", "ok", "ok", "ok", "--"]),
            ("prod/api", ["--", "ok", "ok", "--", "ok", "ok", "ok", "--"]),
            (
                "prod/client",
                ["--", "--", "ok", "ok", "ok", "ok", "ok", "--"],
            ),
            (
                "dev/client",
                ["--", "--", "--", "--", "ok", "--", "ok", "--"],
            ),
            ("external/ext", ext_1),
        ],
    );
    // dev's namespace label changes and its egress policy is deleted: web no longer admits
    // dev/client, which reaches everything else again.
    let m3 = step("m3", "green", DEFAULT_DENY_AND_ALLOWS);
    ok(kplab(&["apply", m3.to_str().unwrap()]));
    expect_matrix(
        dir.path(),
        "relabelled",
        [
            ("prod/web", ["ok", "--", "--", "--", "ok", "ok", "ok", "--"]),
            ("prod/api", ["--", "ok", "ok", "--", "ok", "ok", "ok", "--"]),
            (
                "prod/client",
                ["--", "--", "ok", "ok", "ok", "ok", "ok", "--"],
            ),
            (
                "dev/client",
                ["--", "--", "--", "--", "ok", "ok", "ok", "--"],
            ),
            ("external/ext", ext_1),
        ],
    );
    // Every policy deleted: open again.
    ok(kplab(&["apply", m0.to_str().unwrap()]));
    expect_matrix(
        dir.path(),
        "deleted",
        [
            ("prod/web", open),
            ("prod/api", open),
            ("prod/client", open),
            ("dev/client", open),
            ("external/ext", ext_open),
        ],
    );
}
