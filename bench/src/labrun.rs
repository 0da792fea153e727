//! Lab runs: one lab node with a client pod, ten nginx pods behind a Service (and a NodePort
//! Service) in the middle of N Services, an iperf3 pod and an external host, measured with our
//! agent, then (agent detached) with no proxy at
//! all, nftables, iptables-nft and iptables-legacy rules loaded into the node's namespace in
//! turn. Every load run is bounded in count and time; all traffic stays inside the lab.
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use kplab::netns;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::control::ModeSync;
use crate::{cluster, kubeproxy};
use dataplane_core::translate::NodeView;

/// What a lab run measures, per mode.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// New connections per latency measurement.
    pub connections: usize,
    /// Seconds of wrk and of iperf3 per mode.
    pub seconds: u64,
    /// Time cap for loading one kube-proxy ruleset, in seconds.
    pub cap_secs: u64,
    /// Time cap for iptables-nft-restore, in seconds.
    pub iptables_nft_cap_secs: u64,
}

/// One mode at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct LabRow {
    pub services: usize,
    pub mode: String,
    #[serde(flatten)]
    pub outcome: LabOutcome,
}

/// A mode's figures, or why it was not measured.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum LabOutcome {
    Measured {
        p50_us: f64,
        p99_us: f64,
        pod_ip_p50_us: f64,
        pod_ip_p99_us: f64,
        /// Median of the paired (through the Service - direct) differences, and their IQR.
        overhead_p50_us: f64,
        overhead_iqr_us: f64,
        /// wrk through the single-endpoint ClusterIP, and (alternating with it, same mode) to
        /// that pod's own address.
        rps: f64,
        rps_pod_ip: f64,
        gbps: f64,
        /// Seconds to program the mode (lab up for ours, the rules load for the baselines).
        load_s: Option<f64>,
        /// A client in the node's own namespace (hostNetwork), paired against direct.
        node: Paired,
        /// A client outside the cluster (the lab's external host) to the NodePort on the node's
        /// address, paired against the pods' own addresses.
        external: Paired,
    },
    NotLoaded {
        note: String,
    },
}

/// The agent's peak memory at one scale.
#[derive(Clone, Debug, Serialize)]
pub struct AgentRss {
    pub services: usize,
    pub peak_rss_mb: f64,
}

/// Where the lab's measured pods are, written beside the manifests by [`gen_lab`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The client pod (namespace/name).
    pub client: String,
    pub web_vip: SocketAddr,
    pub web_pods: Vec<SocketAddr>,
    pub web_one_vip: SocketAddr,
    /// The ten web pods behind a NodePort on the node's address, for the external client.
    pub web_node_port: SocketAddr,
    pub web_direct: SocketAddr,
    pub iperf_vip: Ipv4Addr,
    pub iperf_direct: Ipv4Addr,
    pub services: usize,
}

/// The lab's real pods: a client, ten nginx backends of the web Service (the first also alone
/// behind web-one, for wrk against one server either way), an iperf3 server.
const NODE: (&str, &str, &str) = ("node-a", "172.31.0.2", "10.245.1.0/24");
const WEB_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 250, 10);
const WEB_ONE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 250, 11);
const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 250, 20);
const WEB_NP_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 250, 12);
const WEB_NODE_PORT: u16 = 30500;
/// The external host, on the underlay beside the node.
pub const EXTERNAL: (&str, Ipv4Addr) = ("ext", Ipv4Addr::new(172, 31, 0, 100));

/// Writes a lab cluster of `services` Services to `out`: manifests, kube-proxy's rules for it,
/// and the plan.
///
/// # Errors
/// A file could not be written.
pub fn gen_lab(services: usize, out: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out.join("manifests"))?;
    let web: Vec<Ipv4Addr> = (0..10).map(|i| Ipv4Addr::new(10, 245, 1, 20 + i)).collect();
    let iperf = Ipv4Addr::new(10, 245, 1, 40);
    let client = Ipv4Addr::new(10, 245, 1, 10);
    let real = [
        cluster::Real {
            name: "web".into(),
            vip: WEB_VIP,
            port: 80,
            target_port: 8080,
            backends: web.clone(),
            node_port: None,
        },
        cluster::Real {
            name: "web-np".into(),
            vip: WEB_NP_VIP,
            port: 80,
            target_port: 8080,
            backends: web.clone(),
            node_port: Some(WEB_NODE_PORT),
        },
        cluster::Real {
            name: "web-one".into(),
            vip: WEB_ONE_VIP,
            port: 80,
            target_port: 8080,
            backends: vec![web[0]],
            node_port: None,
        },
        cluster::Real {
            name: "iperf".into(),
            vip: IPERF_VIP,
            port: 5201,
            target_port: 5201,
            backends: vec![iperf],
            node_port: None,
        },
    ];
    let objects = cluster::objects(services, 10, &real);
    let mut pods = vec![
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE.0},
               "spec": {"podCIDR": NODE.2},
               "status": {"addresses": [{"type": "InternalIP", "address": NODE.1}]}}),
    ];
    let pod = |name: &str, ip: Ipv4Addr, port: u16, server: Option<&str>| {
        let app = name.split('-').next().unwrap_or(name);
        let mut p = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": cluster::NAMESPACE, "labels": {"app": app}},
            "spec": {"nodeName": NODE.0, "containers": [{"name": "c", "image": "bench",
                     "ports": [{"containerPort": port, "protocol": "TCP"}]}]},
            "status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}],
                       "conditions": [{"type": "Ready", "status": "True"}]}});
        if let Some(s) = server {
            p["metadata"]["annotations"] = json!({"kplab.dev/server": s});
        }
        p
    };
    pods.push(pod("client", client, 8080, None));
    for (i, ip) in web.iter().enumerate() {
        pods.push(pod(&format!("web-{i}"), *ip, 8080, Some("nginx")));
    }
    pods.push(pod("iperf", iperf, 5201, Some("iperf3")));
    std::fs::write(out.join("manifests/pods.yaml"), cluster::yaml(&pods)?)?;
    std::fs::write(
        out.join("manifests/services.yaml"),
        cluster::yaml(&objects)?,
    )?;
    // The "ours + policy" row: the web pods admit the client pod and the external host on their
    // port (the node's own clients are always admitted), so every measured flow is judged.
    let policy = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "web", "namespace": cluster::NAMESPACE},
        "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}},
                                       {"ipBlock": {"cidr": format!("{}/32", EXTERNAL.1)}}],
                              "ports": [{"protocol": "TCP", "port": 8080}]}]}});
    let with_policy = out.join("policy-manifests");
    std::fs::create_dir_all(&with_policy)?;
    for f in ["pods.yaml", "services.yaml"] {
        std::fs::copy(out.join("manifests").join(f), with_policy.join(f))?;
    }
    std::fs::write(with_policy.join("policy.yaml"), cluster::yaml(&[policy])?)?;
    let index = cluster::index(&objects);
    let node_ip: Ipv4Addr = NODE.1.parse()?;
    let node = NodeView {
        name: Some(NODE.0.to_owned()),
        nodeport_addresses: vec![node_ip],
    };
    let translated = cluster::translated_on(&objects, &index, &node);
    std::fs::write(
        out.join("iptables.rules"),
        kubeproxy::iptables_on(&translated, &[node_ip]),
    )?;
    std::fs::write(
        out.join("nftables.rules"),
        kubeproxy::nftables_on(&translated, &[node_ip]),
    )?;
    let plan = Plan {
        client: format!("{}/client", cluster::NAMESPACE),
        web_vip: SocketAddr::from((WEB_VIP, 80)),
        web_pods: web.iter().map(|w| SocketAddr::from((*w, 8080))).collect(),
        web_one_vip: SocketAddr::from((WEB_ONE_VIP, 80)),
        web_node_port: SocketAddr::from((node_ip, WEB_NODE_PORT)),
        web_direct: SocketAddr::from((web[0], 8080)),
        iperf_vip: IPERF_VIP,
        iperf_direct: iperf,
        services,
    };
    std::fs::write(out.join("plan.json"), serde_json::to_string_pretty(&plan)?)?;
    Ok(())
}

/// Runs `f` on a thread inside a network namespace.
fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    let name = name.to_owned();
    std::thread::spawn(move || -> anyhow::Result<T> {
        // Only this thread changes namespace.
        netns::enter(&name)?;
        Ok(f())
    })
    .join()
    .map_err(|_| anyhow::anyhow!("measurement thread panicked"))?
}

/// One new connection with one HTTP request and its whole response; microseconds.
fn one_request(to: SocketAddr) -> std::io::Result<f64> {
    let t = Instant::now();
    // Long enough for a SYN retransmitted after 1 s (a conntrack clash in the kube-proxy modes)
    // to count as a slow connection rather than a failure.
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut buf = [0u8; 1024];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got == 0 || !buf.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("no 200 response"));
    }
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

/// New connections (each with one request) in rounds: one to each target list in turn per round
/// (a list's targets used round-robin), so every list is measured under the same conditions,
/// paired. After a warm-up; bounded by 60 s; more than 1% failures fails the measurement.
fn samples(lists: &[Vec<SocketAddr>], count: usize) -> anyhow::Result<Vec<Vec<f64>>> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for list in lists {
        for to in list.iter().cycle().take(50) {
            let _ = one_request(*to);
        }
    }
    let mut out = vec![Vec::with_capacity(count); lists.len()];
    let mut failed = Vec::new();
    for round in 0..count {
        if Instant::now() >= deadline {
            break;
        }
        for (list, us) in lists.iter().zip(&mut out) {
            let to = list[round % list.len()];
            match one_request(to) {
                Ok(t) => us.push(t),
                Err(e) => failed.push(format!("{to}: {e}")),
            }
        }
    }
    if failed.len() * 100 > count * lists.len() {
        bail!(
            "{} of {} connections failed: {:?}",
            failed.len(),
            count * lists.len(),
            &failed[..failed.len().min(5)]
        );
    }
    if out.iter().any(Vec::is_empty) {
        bail!("no connection succeeded");
    }
    Ok(out)
}

fn percentile(s: &mut [f64], q: f64) -> f64 {
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// A client's paired figures: through the Service address and to the backends' own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Paired {
    pub service_p50_us: f64,
    pub service_p99_us: f64,
    pub direct_p50_us: f64,
    pub direct_p99_us: f64,
    /// Median of (through the Service - direct) over the pairs of one round each.
    pub overhead_p50_us: f64,
    /// Interquartile range of those differences: the spread the overhead is judged against.
    pub overhead_iqr_us: f64,
}

/// Paired new connections to `service` and to `direct` (each list round-robin), where this
/// process runs; `bench connect` runs it inside a node's namespace and cgroup.
///
/// # Errors
/// Too many connections failed.
pub fn paired(
    service: &[SocketAddr],
    direct: &[SocketAddr],
    count: usize,
) -> anyhow::Result<Paired> {
    let s = samples(&[service.to_vec(), direct.to_vec()], count)?;
    let mut diffs: Vec<f64> = s[0].iter().zip(&s[1]).map(|(a, b)| a - b).collect();
    let (mut svc, mut dir) = (s[0].clone(), s[1].clone());
    let q1 = percentile(&mut diffs, 0.25);
    let q3 = percentile(&mut diffs, 0.75);
    Ok(Paired {
        service_p50_us: percentile(&mut svc, 0.5),
        service_p99_us: percentile(&mut svc, 0.99),
        direct_p50_us: percentile(&mut dir, 0.5),
        direct_p99_us: percentile(&mut dir, 0.99),
        overhead_p50_us: percentile(&mut diffs, 0.5),
        overhead_iqr_us: q3 - q1,
    })
}

/// `program args` run as the lab pod or node `on` runs it (`kplab exec --on`: its network
/// namespace and cgroup, where the node's socket hooks see it); its standard output.
fn exec_on(on: &str, program: &Path, args: &[&str]) -> anyhow::Result<String> {
    let me = std::env::current_exe()?;
    let kplab = std::env::var_os("KPLAB_BIN")
        .map_or_else(|| me.with_file_name("kplab"), std::path::PathBuf::from);
    let out = std::process::Command::new(kplab)
        .args(["exec", "--on", on, "--"])
        .arg(program)
        .args(args)
        .output()
        .context("starting kplab exec")?;
    if !out.status.success() {
        bail!(
            "{} on {on}: {}",
            program.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Paired latency from a lab pod or node (its namespace and cgroup): this program's `connect`
/// step run through `kplab exec --on`, to `service` and to the web pods.
fn client_latency(
    on: &str,
    service: &[SocketAddr],
    p: &Plan,
    count: usize,
) -> anyhow::Result<Paired> {
    let me = std::env::current_exe()?;
    let out = exec_on(
        on,
        &me,
        &[
            "connect",
            "--service",
            &join(service),
            "--direct",
            &join(&p.web_pods),
            "--count",
            &count.to_string(),
        ],
    )?;
    serde_json::from_str(&out).context("reading the client's figures")
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Rounds of wrk that alternate between a Service and the pod's own address.
const WRK_ROUNDS: u64 = 3;

/// Requests per second from wrk through `service` and to `direct`, alternating in
/// `WRK_ROUNDS` rounds that share `seconds` (each at least 2 s), so both see the same drift;
/// the mean rate of each.
fn wrk_paired(on: &str, service: &str, direct: &str, seconds: u64) -> anyhow::Result<(f64, f64)> {
    let each = (seconds / WRK_ROUNDS).max(2);
    let (mut s, mut d) = (0.0, 0.0);
    for _ in 0..WRK_ROUNDS {
        s += wrk(on, service, each)?;
        d += wrk(on, direct, each)?;
    }
    let n = WRK_ROUNDS as f64;
    Ok((s / n, d / n))
}

/// Requests per second from wrk (8 keep-alive connections, one thread) for `seconds`, run as
/// the lab pod `on`.
fn wrk(on: &str, url: &str, seconds: u64) -> anyhow::Result<f64> {
    let cap = (seconds + 10).to_string();
    let d = format!("{seconds}s");
    let out = exec_on(
        on,
        Path::new("timeout"),
        &[&cap, "wrk", "-t1", "-c8", "-d", &d, "--timeout", "2s", url],
    )?;
    if out.contains("Non-2xx") || out.contains("Socket errors") {
        bail!("wrk saw errors against {url}:\n{out}");
    }
    out.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))
}

/// TCP throughput from iperf3 (one stream) for `seconds`, Gbit/s received, run as the lab pod
/// `on`.
fn iperf(on: &str, ip: Ipv4Addr, seconds: u64) -> anyhow::Result<f64> {
    let cap = (seconds + 10).to_string();
    let t = seconds.to_string();
    let ip = ip.to_string();
    let out = exec_on(
        on,
        Path::new("timeout"),
        &[&cap, "iperf3", "-c", &ip, "-p", "5201", "-t", &t, "-J"],
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .with_context(|| format!("no throughput in iperf3's output: {out}"))
}

/// Loads a ruleset into the node's namespace under the cap; seconds taken, `None` if capped.
fn load(ns: &str, loader: &[&str], file: &Path, cap: u64) -> anyhow::Result<Option<f64>> {
    let t = Instant::now();
    let status = netns::command(ns, "timeout")
        .arg(cap.to_string())
        .args(loader)
        .stdin(std::fs::File::open(file)?)
        .status()?;
    match status.code() {
        Some(0) => Ok(Some(t.elapsed().as_secs_f64())),
        Some(124) => Ok(None),
        _ => bail!("{} failed: {status}", loader.join(" ")),
    }
}

/// The namespaces a plan's measurements run in.
struct Where {
    node: String,
    node_name: String,
    external: String,
}

fn locate() -> anyhow::Result<Where> {
    let state = kplab::state()?;
    let external = state
        .externals
        .iter()
        .find(|x| x.name == EXTERNAL.0)
        .context("the external host is in the lab")?
        .netns
        .clone();
    // The external host reaches the pods' own addresses through the node, for the direct side
    // of its pairs (an external host of a real cluster would not; here it is the floor).
    netns::run(
        &external,
        "ip",
        &["route", "replace", NODE.2, "via", NODE.1, "dev", "eth0"],
    )?;
    Ok(Where {
        node: state.nodes[0].netns.clone(),
        node_name: state.nodes[0].spec.name.clone(),
        external,
    })
}

/// Measures one mode. Latency: through the ClusterIP of ten nginx pods, or ("direct") to those
/// pods' own addresses in turn, and to the pods' own addresses with the mode loaded; wrk: one
/// nginx pod through its single-endpoint ClusterIP, or directly; iperf3 likewise.
fn measure(
    o: &LabOptions,
    p: &Plan,
    at: &Where,
    mode: &str,
    load_s: Option<f64>,
) -> anyhow::Result<LabRow> {
    let direct = mode == "direct";
    eprintln!("bench: {} Services, {mode}", p.services);
    // Paired: each round one connection through the Service and one to a pod's own address. In
    // direct mode both sides go to pods (the same ten, offset by half), the pairing's noise floor.
    let service: Vec<SocketAddr> = if direct {
        let mut pods = p.web_pods.clone();
        let half = pods.len() / 2;
        pods.rotate_left(half);
        pods
    } else {
        vec![p.web_vip]
    };
    let pod = client_latency(&p.client, &service, p, o.connections)?;
    let (web, iperf_ip) = if direct {
        (p.web_direct, p.iperf_direct)
    } else {
        (p.web_one_vip, p.iperf_vip)
    };
    let (rps, rps_pod_ip) = wrk_paired(
        &p.client,
        &format!("http://{web}/"),
        &format!("http://{}/", p.web_direct),
        o.seconds,
    )?;
    let gbps = iperf(&p.client, iperf_ip, o.seconds)?;
    let node = client_latency(&at.node_name, &service, p, o.connections)?;
    let external_service = if direct {
        service.clone()
    } else {
        vec![p.web_node_port]
    };
    let (pods, count) = (p.web_pods.clone(), o.connections);
    let external = in_netns(&at.external, move || {
        paired(&external_service, &pods, count)
    })??;
    Ok(LabRow {
        services: p.services,
        mode: mode.to_owned(),
        outcome: LabOutcome::Measured {
            p50_us: pod.service_p50_us,
            p99_us: pod.service_p99_us,
            pod_ip_p50_us: pod.direct_p50_us,
            pod_ip_p99_us: pod.direct_p99_us,
            overhead_p50_us: pod.overhead_p50_us,
            overhead_iqr_us: pod.overhead_iqr_us,
            rps,
            rps_pod_ip,
            gbps,
            load_s,
            node,
            external,
        },
    })
}

/// A kube-proxy mode in the lab: name, loader, rules file, cleanup commands.
type Baseline<'a> = (&'a str, &'a [&'a str], &'a str, &'a [&'a [&'a str]]);

const MODES: [Baseline; 3] = [
    (
        "nftables",
        &["nft", "-f", "-"],
        "nftables.rules",
        &[&["nft", "delete", "table", "ip", "kube-proxy"]],
    ),
    (
        "iptables-nft",
        &["iptables-nft-restore", "--noflush"],
        "iptables.rules",
        &[&["nft", "flush", "ruleset"]],
    ),
    (
        "iptables-legacy",
        &["iptables-legacy-restore", "--noflush"],
        "iptables.rules",
        &[
            &["iptables-legacy", "-t", "nat", "-F"],
            &["iptables-legacy", "-t", "nat", "-X"],
            &["iptables-legacy", "-t", "filter", "-F"],
            &["iptables-legacy", "-t", "filter", "-X"],
        ],
    ),
];

/// A mode whose full sync did not finish within the cap in the control-plane step at this scale
/// or a smaller one: loading it into the lab would only hit the cap again.
fn capped_in_control(control: &[ModeSync], mode: &str, n: usize) -> bool {
    control
        .iter()
        .any(|r| r.mode == mode && r.services <= n && r.full_sync_s.is_none())
}

/// One lab at the scale `dir` was generated for: up, ours (pods translated at the socket, the
/// default), ours with pods translated by TC, direct, then each baseline; the lab is left up for
/// the caller to take down.
///
/// # Errors
/// The lab could not be built, or a measurement failed.
pub fn scale(
    o: &LabOptions,
    dir: &Path,
    control: &[ModeSync],
    rows: &mut Vec<LabRow>,
    rss: &mut Vec<AgentRss>,
) -> anyhow::Result<()> {
    let plan: Plan = serde_json::from_slice(&std::fs::read(dir.join("plan.json"))?)
        .context("reading the lab plan")?;
    let n = plan.services;
    let t = Instant::now();
    kplab::up(
        &dir.join("manifests"),
        None,
        &[format!("{}={}", EXTERNAL.0, EXTERNAL.1)],
    )?;
    let up_s = t.elapsed().as_secs_f64();
    let at = locate()?;
    rows.push(measure(o, &plan, &at, "ours socket", Some(up_s))?);
    let t = Instant::now();
    kplab::apply(&dir.join("policy-manifests"))?;
    let policy_s = t.elapsed().as_secs_f64();
    rows.push(measure(o, &plan, &at, "ours + policy", Some(policy_s))?);
    kplab::apply(&dir.join("manifests"))?;
    let pid = kplab::state()?.nodes[0].agent_pid;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM of the agent")?;
    rss.push(AgentRss {
        services: n,
        peak_rss_mb: hwm_kb / 1024.0,
    });
    kplab::stop_agents()?;
    let t = Instant::now();
    kplab::start_agents(Some("tc".to_owned()))?;
    let restart_s = t.elapsed().as_secs_f64();
    rows.push(measure(o, &plan, &at, "ours tc", Some(restart_s))?);
    kplab::detach_datapath()?;
    rows.push(measure(o, &plan, &at, "direct", None)?);

    for (mode, loader, file, cleanup) in MODES {
        let cap = if mode == "iptables-nft" {
            o.iptables_nft_cap_secs
        } else {
            o.cap_secs
        };
        let not_loaded = |note: String| LabRow {
            services: n,
            mode: mode.to_owned(),
            outcome: LabOutcome::NotLoaded { note },
        };
        if capped_in_control(control, mode, n) {
            rows.push(not_loaded(format!(
                "not loaded: over the {cap} s cap in the control-plane step"
            )));
            continue;
        }
        eprintln!("bench: loading {mode} rules for {n} Services");
        match load(&at.node, loader, &dir.join(file), cap)? {
            Some(s) => rows.push(measure(o, &plan, &at, mode, Some(s))?),
            None => rows.push(not_loaded(format!("not loaded within the {cap} s cap"))),
        }
        for c in cleanup {
            netns::run(&at.node, c[0], &c[1..])?;
        }
    }
    Ok(())
}
