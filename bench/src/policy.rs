//! NetworkPolicy costs: the policy stage per packet (BPF_PROG_TEST_RUN) with no policy and with
//! 1, 100 and 1,000 rules selecting the pod, against an empty program, measured round-robin so
//! the machine's drift hits every variant alike; and event -> enforced (object change applied to
//! map written) at 10,000 pods and 1,000 policies, with the map entries and the agent's RSS.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dataplane_agent::datapath::{Datapath, FORWARDED_IFINDEX};
use dataplane_common::prog_names;
use dataplane_core::fixtures::objects::{network_policy, pod};
use dataplane_core::fixtures::packet::{ACK, Pkt, SYN};
use dataplane_core::index::Index;
use dataplane_core::object::{NsName, Object};
use dataplane_core::pipeline::Pipeline;
use dataplane_core::policy_maps::PolicySync;
use dataplane_core::reconcile::NodePortAddresses;
use dataplane_core::source::{Batch, Event};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

use crate::control::Percentiles;
use crate::testrun::{Empty, PathCost, summarise};

const NODE: &str = "bench-node";
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 20);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 30);
/// Rule counts of the per-packet runs (0: no policy at all).
pub const RULES: [usize; 4] = [0, 1, 100, 1000];

/// The per-packet figures of one rule count.
#[derive(Debug, serde::Serialize)]
pub struct StageCost {
    /// Ingress rules of the one policy selecting the server pod (0: no policy).
    pub rules: usize,
    pub paths: Vec<PathCost>,
}

/// A policy selecting the server with `rules` ingress rules on TCP 8080: `rules - 1` from an
/// ipBlock /24 each (distinct identities), the last from the client pods (the one that admits).
fn server_policy(rules: usize) -> NetworkPolicy {
    let mut ingress: Vec<serde_json::Value> = (0..rules.saturating_sub(1))
        .map(|i| {
            json!({"from": [{"ipBlock": {"cidr": format!("172.{}.{}.0/24", 16 + i / 256, i % 256)}}],
                   "ports": [{"protocol": "TCP", "port": 8080}]})
        })
        .collect();
    ingress.push(
        json!({"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                        "ports": [{"protocol": "TCP", "port": 8080}]}),
    );
    network_policy(
        "bench",
        "server",
        json!({"podSelector": {"matchLabels": {"app": "server"}}, "ingress": ingress}),
    )
}

/// A datapath with the server pod on this node, the client on another, and `rules` rules.
fn programmed(rules: usize) -> anyhow::Result<Datapath> {
    let mut dp = Datapath::load().context("loading the eBPF object (needs root)")?;
    let mut index = Index::default();
    let ports = json!([{"name": "http", "containerPort": 8080}]);
    let server = pod(
        "bench",
        "server",
        NODE,
        &SERVER.to_string(),
        &[("app", "server")],
        ports.clone(),
    );
    let client = pod(
        "bench",
        "client",
        "other",
        &CLIENT.to_string(),
        &[("app", "client")],
        ports,
    );
    let _ = index.apply(Object::from(server));
    let _ = index.apply(Object::from(client));
    if rules > 0 {
        let _ = index.apply(Object::from(server_policy(rules)));
    }
    let mut sync = PolicySync::new(NODE);
    let report = sync.sync(&index, &mut dp);
    if !report.failures.is_empty() || !report.problems.is_empty() {
        bail!(
            "programming {rules} rules: {:?} {:?}",
            report.failures,
            report.problems
        );
    }
    Ok(dp)
}

/// Per-packet cost of the policy stage. Paths: a new flow to the server (`to_pod`, a SYN from a
/// new source port each run: judged and tracked when the pod is enforced), an established one
/// (`to_pod`, the ACK of a tracked flow), and the server's reply (`from_pod`).
///
/// # Errors
/// Loading, programming or a test run failed, or a verdict was not the expected one.
pub fn per_packet(runs: usize) -> anyhow::Result<Vec<StageCost>> {
    let dps: Vec<Datapath> = RULES
        .iter()
        .map(|&r| programmed(r))
        .collect::<anyhow::Result<_>>()?;
    let empty = Empty::load()?;
    let new_flows: Vec<Vec<u8>> = (0..runs)
        .map(|i| Pkt::tcp(CLIENT, 10_000 + (i % 50_000) as u16, SERVER, 8080, SYN).build())
        .collect();
    let est = Pkt::tcp(CLIENT, 9_000, SERVER, 8080, ACK).build();
    let reply = Pkt::tcp(SERVER, 8080, CLIENT, 9_000, ACK).build();
    let first = Pkt::tcp(CLIENT, 9_000, SERVER, 8080, SYN).build();
    for dp in &dps {
        let r = dp.test_run_tc(prog_names::TO_POD, &first, FORWARDED_IFINDEX)?;
        if r.verdict != 0 {
            bail!(
                "the client's first SYN was not admitted: verdict {}",
                r.verdict
            );
        }
    }
    // A client the policy does not admit is denied, so the stage is really on.
    let stranger = Pkt::tcp(Ipv4Addr::new(10, 244, 3, 3), 9_000, SERVER, 8080, SYN).build();
    for (dp, rules) in dps.iter().zip(RULES) {
        let verdict = dp
            .test_run_tc(prog_names::TO_POD, &stranger, FORWARDED_IFINDEX)?
            .verdict;
        if (verdict == 0) != (rules == 0) {
            bail!("{rules} rules: a client no rule admits got verdict {verdict}");
        }
    }
    let mut ns = vec![
        [
            Vec::with_capacity(runs),
            Vec::with_capacity(runs),
            Vec::with_capacity(runs)
        ];
        dps.len()
    ];
    let mut empty_ns = Vec::with_capacity(runs);
    for frame in &new_flows {
        for (dp, out) in dps.iter().zip(ns.iter_mut()) {
            for (path, (prog, f)) in [
                (prog_names::TO_POD, frame),
                (prog_names::TO_POD, &est),
                (prog_names::FROM_POD, &reply),
            ]
            .into_iter()
            .enumerate()
            {
                let r = dp.test_run_tc(prog, f, FORWARDED_IFINDEX)?;
                if r.verdict != 0 {
                    bail!("{prog}: verdict {} on an admitted flow", r.verdict);
                }
                out[path].push(r.duration_ns);
            }
        }
        empty_ns.push(empty.run(&est)?);
    }
    let mut out: Vec<StageCost> = RULES
        .iter()
        .zip(ns)
        .map(|(&rules, [new, est, reply])| StageCost {
            rules,
            paths: vec![
                summarise("new flow", prog_names::TO_POD, new),
                summarise("established flow", prog_names::TO_POD, est),
                summarise("reply", prog_names::FROM_POD, reply),
            ],
        })
        .collect();
    out.push(StageCost {
        rules: 0,
        paths: vec![summarise("empty program", "empty", empty_ns)],
    });
    Ok(out)
}

/// 10,000 pods in 100 namespaces (50 app labels, an `http` port), a tenth of them on node n1, and
/// 1,000 policies: each selects one app, admits another app and an ipBlock with an except on
/// `http` and a port range, and lets it reach a third app in any namespace on `http`.
#[must_use]
pub fn cluster() -> (BTreeMap<NsName, Pod>, BTreeMap<NsName, NetworkPolicy>) {
    let id = |ns: String, name: String| NsName {
        namespace: ns,
        name,
    };
    let pods = (0..10_000u32)
        .map(|n| {
            let p = cluster_pod(n, &format!("a{}", n % 50));
            (id(format!("ns{}", n % 100), format!("p{n}")), p)
        })
        .collect();
    let policies = (0..1_000u32)
        .map(|n| {
            let np = network_policy(
                &format!("ns{}", n % 100),
                &format!("np{n}"),
                json!({
                    "podSelector": {"matchLabels": {"app": format!("a{}", n % 50)}},
                    "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": format!("a{}", (n + 1) % 50)}}},
                                          {"ipBlock": {"cidr": format!("172.{}.0.0/16", n % 200), "except": [format!("172.{}.1.0/24", n % 200)]}}],
                                 "ports": [{"port": "http"}, {"port": 9000, "endPort": 9100}]}],
                    "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": format!("a{}", (n + 2) % 50)}}}],
                                "ports": [{"port": "http"}]}],
                }),
            );
            (id(format!("ns{}", n % 100), format!("np{n}")), np)
        })
        .collect();
    (pods, policies)
}

fn cluster_pod(n: u32, app: &str) -> Pod {
    pod(
        &format!("ns{}", n % 100),
        &format!("p{n}"),
        if n.is_multiple_of(10) { "n1" } else { "n2" },
        &Ipv4Addr::from(0x0af4_0000 + n).to_string(),
        &[("app", app)],
        json!([{"name": "http", "containerPort": 8080}]),
    )
}

/// Event -> enforced at 10,000 pods and 1,000 policies, node n1.
#[derive(Debug, serde::Serialize)]
pub struct PolicyControl {
    pub pods: usize,
    pub policies: usize,
    pub local_pods: usize,
    /// Every object in one batch to every policy map written.
    pub full_sync_s: f64,
    /// One local pod's app label changed (and back), applied to written.
    pub label_change: Percentiles,
    /// One policy's port changed (and back).
    pub policy_change: Percentiles,
    /// Entries in POLICY_IDS, POLICY_EP and POLICY after the changes (both generations).
    pub id_entries: usize,
    pub endpoint_entries: usize,
    pub rule_entries: usize,
}

fn batch(events: Vec<Event>, fingerprint: u64) -> Batch {
    Batch {
        events,
        warnings: Vec::new(),
        fingerprint,
        received: Instant::now(),
    }
}

/// Times [`Pipeline::apply`] into the kernel maps: the full sync, then `changes` label changes
/// and `changes` policy changes, each its own batch.
///
/// # Errors
/// The eBPF object cannot be loaded, or a sync reported a problem.
pub fn control(changes: usize) -> anyhow::Result<PolicyControl> {
    let mut dp = Datapath::load().context("loading the eBPF object (needs root)")?;
    let mut pipeline = Pipeline::for_node("n1", NodePortAddresses::Primary);
    let (pods, policies) = cluster();
    let events: Vec<Event> = pods
        .values()
        .map(|p| Event::Apply(Object::from(p.clone())))
        .chain(
            policies
                .values()
                .map(|p| Event::Apply(Object::from(p.clone()))),
        )
        .collect();
    let local_pods = pods.len() / 10;
    let t = Instant::now();
    let applied = pipeline.apply(batch(events, 1), &mut dp);
    let full_sync_s = t.elapsed().as_secs_f64();
    if !applied.problems.is_empty() {
        bail!(
            "the full policy sync had problems: {:?}",
            &applied.problems[..1]
        );
    }
    let mut label_ms = Vec::with_capacity(changes);
    for c in 0..changes {
        let app = if c % 2 == 0 { "a7" } else { "a0" };
        let event = Event::Apply(Object::from(cluster_pod(0, app)));
        let t = Instant::now();
        let applied = pipeline.apply(batch(vec![event], 2 + c as u64), &mut dp);
        label_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if applied.ops == 0 {
            bail!("a label change wrote nothing");
        }
    }
    let mut policy_ms = Vec::with_capacity(changes);
    for c in 0..changes {
        let mut np = policies.values().next().context("no policies")?.clone();
        if c % 2 == 0
            && let Some(rule) = np
                .spec
                .as_mut()
                .and_then(|s| s.ingress.as_mut())
                .and_then(|i| i.first_mut())
            && let Some(port) = rule.ports.as_mut().and_then(|p| p.get_mut(1))
        {
            port.end_port = Some(9200);
        }
        let t = Instant::now();
        let applied = pipeline.apply(
            batch(vec![Event::Apply(Object::from(np))], 1000 + c as u64),
            &mut dp,
        );
        policy_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if applied.ops == 0 {
            bail!("a policy change wrote nothing");
        }
    }
    let maps = pipeline
        .reconciler
        .policy()
        .context("the pipeline keeps no policy")?
        .maps();
    Ok(PolicyControl {
        pods: pods.len(),
        policies: policies.len(),
        local_pods,
        full_sync_s,
        label_change: Percentiles::of(label_ms),
        policy_change: Percentiles::of(policy_ms),
        id_entries: maps.ids.len(),
        endpoint_entries: maps.endpoints.len(),
        rule_entries: maps.rules.len(),
    })
}

/// The agent's peak RSS with the same 10,000 pods and 1,000 policies, from a manifests
/// directory, in a network namespace of its own: VmHWM once its status shows the sync done.
///
/// # Errors
/// The agent did not start or did not finish its sync within a minute.
pub fn agent_rss(scratch: &std::path::Path, prefix: &str) -> anyhow::Result<f64> {
    let dir = scratch.join("policy-manifests");
    std::fs::create_dir_all(&dir)?;
    let (pods, policies) = cluster();
    let mut docs = String::new();
    for p in pods.values() {
        docs.push_str(&serde_json::to_string(p)?);
        docs.push_str("\n---\n");
    }
    for p in policies.values() {
        docs.push_str(&serde_json::to_string(p)?);
        docs.push_str("\n---\n");
    }
    std::fs::write(dir.join("objects.yaml"), docs)?;
    let status = scratch.join("policy-status.json");
    let ns = kplab::netns::Netns::create(format!("{prefix}-policy"))?;
    let agent = std::env::current_exe()?
        .parent()
        .context("the bench binary has no directory")?
        .join("dataplane-agent");
    let mut child = ns
        .command(&agent)
        .args(["run", "--node-name", "n1", "--manifests"])
        .arg(&dir)
        .arg("--status-file")
        .arg(&status)
        .args(["--healthz-bind-address", "127.0.0.1:10256"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", agent.display()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let done = std::fs::read(&status)
            .ok()
            .and_then(|b| serde_json::from_slice::<dataplane_core::status::Status>(&b).ok())
            .is_some_and(|s| s.fingerprint.is_some() && s.generation > 0);
        if done {
            let text = std::fs::read_to_string(format!("/proc/{}/status", child.id()))?;
            break text
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
                .context("VmHWM of the agent");
        }
        if Instant::now() > deadline {
            break Err(anyhow::anyhow!("the agent did not sync within 60 s"));
        }
        if let Some(exit) = child.try_wait()? {
            break Err(anyhow::anyhow!("the agent exited: {exit}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}
