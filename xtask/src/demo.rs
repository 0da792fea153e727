//! `cargo xtask demo`: a 2-node lab from `examples/demo`, real probes from a pod on each node to
//! each Service, a short report (which backends answered, how evenly, from where, whether the
//! client address was preserved), then teardown.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, bail};

use crate::lab::{self, State, agent_status, probe};

const CONNECTIONS: u32 = 60;
const TIMEOUT: Duration = Duration::from_secs(1);

struct Tally {
    connected: u32,
    refused: u32,
    timeout: u32,
    preserved: u32,
    by_backend: BTreeMap<String, u32>,
}

/// `count` probes from `from` to `to`, in a thread that enters the source pod's namespace.
fn tally(
    state: &State,
    from: &str,
    proto: &str,
    to: SocketAddr,
    count: u32,
) -> anyhow::Result<Tally> {
    let netns = state.netns_of(from)?.to_owned();
    let source_ip = state
        .pods
        .iter()
        .find(|p| p.spec.key == from)
        .map(|p| p.spec.ip.to_string())
        .unwrap_or_default();
    let proto = proto.to_owned();
    std::thread::spawn(move || {
        probe::enter_netns(&netns)?;
        let mut t = Tally {
            connected: 0,
            refused: 0,
            timeout: 0,
            preserved: 0,
            by_backend: BTreeMap::new(),
        };
        for _ in 0..count {
            let r = probe::once(&proto, to, TIMEOUT)?;
            match r.result.as_str() {
                "connected" => {
                    t.connected += 1;
                    if r.client_seen.as_deref().and_then(|c| c.split(':').next())
                        == Some(source_ip.as_str())
                    {
                        t.preserved += 1;
                    }
                    *t.by_backend
                        .entry(r.backend.unwrap_or_default())
                        .or_default() += 1;
                }
                "refused" => t.refused += 1,
                _ => t.timeout += 1,
            }
        }
        Ok(t)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

fn node_of(state: &State, pod: &str) -> String {
    state
        .pods
        .iter()
        .find(|p| p.spec.key == pod)
        .map_or_else(|| "?".to_owned(), |p| p.spec.node.clone())
}

fn pod_at(state: &State, addr: &str) -> String {
    let ip = addr.split(':').next().unwrap_or_default();
    state
        .pods
        .iter()
        .find(|p| p.spec.ip.to_string() == ip)
        .map_or_else(|| addr.to_owned(), |p| p.spec.key.clone())
}

fn report(state: &State) -> anyhow::Result<(String, Vec<String>)> {
    let mut out = String::new();
    let mut problems = Vec::new();
    writeln!(
        out,
        "== Lab: {} nodes, {} pods ==",
        state.nodes.len(),
        state.pods.len()
    )?;
    for n in &state.nodes {
        let pods: Vec<String> = state
            .pods
            .iter()
            .filter(|p| p.spec.node == n.spec.name)
            .map(|p| format!("{} {}", p.spec.key, p.spec.ip))
            .collect();
        writeln!(
            out,
            "{:8} {:12} podCIDR {:15} {}",
            n.spec.name,
            n.spec.ip,
            n.spec.pod_cidr,
            pods.join(", ")
        )?;
    }

    let status = agent_status(&state.nodes[0].spec.name)?;
    let services = status["services"].as_array().cloned().unwrap_or_default();
    let clients: Vec<&str> = ["demo/client-a", "demo/client-b"].to_vec();
    for svc in &services {
        let frontend = svc["frontend"].as_str().unwrap_or_default();
        let name = svc["service"].as_str().unwrap_or_default();
        let backends: Vec<String> = svc["backends"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str())
            .map(|b| pod_at(state, b))
            .collect();
        if backends.is_empty() {
            continue;
        }
        let (addr, proto) = frontend.rsplit_once('/').context("frontend format")?;
        let to: SocketAddr = addr.parse()?;
        let proto = proto.to_lowercase();
        writeln!(
            out,
            "\n== Service {name} {frontend}: ready backends {} ==",
            backends
                .iter()
                .map(|b| format!("{b} ({})", node_of(state, b)))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        for from in &clients {
            let t = tally(state, from, &proto, to, CONNECTIONS)?;
            writeln!(
                out,
                "from {from} ({}): {}/{CONNECTIONS} connected, {} refused, {} timed out; client address preserved {}/{}",
                node_of(state, from),
                t.connected,
                t.refused,
                t.timeout,
                t.preserved,
                t.connected
            )?;
            for b in &backends {
                let n = t.by_backend.get(b).copied().unwrap_or(0);
                writeln!(
                    out,
                    "    {:16} {:7} {n:3} {}",
                    b,
                    node_of(state, b),
                    "#".repeat(n as usize)
                )?;
            }
            let counts: Vec<u32> = backends
                .iter()
                .map(|b| t.by_backend.get(b).copied().unwrap_or(0))
                .collect();
            let (min, max) = (
                counts.iter().min().copied().unwrap_or(0),
                counts.iter().max().copied().unwrap_or(0),
            );
            writeln!(
                out,
                "    spread: min {min}, max {max}, ideal {:.1} per backend",
                f64::from(CONNECTIONS) / backends.len() as f64
            )?;
            if t.connected != CONNECTIONS || min == 0 || t.preserved != t.connected {
                problems.push(format!("{name} {frontend} from {from}: {}/{CONNECTIONS} connected, min per backend {min}, preserved {}", t.connected, t.preserved));
            }
            let strays: Vec<&String> = t
                .by_backend
                .keys()
                .filter(|b| !backends.contains(b))
                .collect();
            if !strays.is_empty() {
                problems.push(format!("{name}: answers from non-ready pods {strays:?}"));
            }
        }
    }

    writeln!(out, "\n== Service without endpoints: demo/empty ==")?;
    for (proto, to, how) in [
        ("tcp", "10.96.0.99:80", "TCP RST"),
        ("udp", "10.96.0.99:99", "ICMP port unreachable"),
    ] {
        let t = tally(state, "demo/client-a", proto, to.parse()?, 1)?;
        let result = if t.refused == 1 {
            "refused"
        } else if t.connected == 1 {
            "connected"
        } else {
            "timeout"
        };
        writeln!(out, "{proto} {to}: {result} (expected: refused by {how})")?;
        if t.refused != 1 {
            problems.push(format!(
                "demo/empty {to}/{proto}: {result}, expected refused"
            ));
        }
    }

    // Agents rewrite their status (with the counters) every second.
    std::thread::sleep(Duration::from_millis(1500));
    writeln!(
        out,
        "\n== Datapath counters, per node (per-CPU maps, summed) =="
    )?;
    for n in &state.nodes {
        let s = agent_status(&n.spec.name)?;
        let drops: Vec<String> = s["drops"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, v)| v.as_u64() != Some(0))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let per_svc: Vec<String> = s["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|x| x["packets"].as_u64() != Some(0))
            .map(|x| {
                format!(
                    "{} {} pkts",
                    x["frontend"].as_str().unwrap_or_default(),
                    x["packets"]
                )
            })
            .collect();
        writeln!(
            out,
            "{}: attached to {} pod interfaces; drops: {}; to services: {}",
            n.spec.name,
            s["interfaces"].as_array().map_or(0, Vec::len),
            if drops.is_empty() {
                "none".to_owned()
            } else {
                drops.join(" ")
            },
            per_svc.join(", ")
        )?;
    }
    Ok((out, problems))
}

/// Runs the demo; the lab is always torn down.
///
/// # Errors
/// The lab could not be built, or traffic did not flow as it should.
pub fn run() -> anyhow::Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF programs: run it as root");
    }
    let agent = crate::build_agent()?;
    let manifests = crate::workspace_root().join("examples/demo");
    eprintln!("demo: building the lab from {}", manifests.display());
    let state = lab::up(&manifests, None, &[], &agent)?;
    let result = report(&state).and_then(|(text, problems)| {
        print!("{text}");
        println!("\n== Reachability matrix (pods x pod ports and service ports) ==");
        print!("{}", lab::matrix_table(&state, Duration::from_millis(300))?);
        Ok(problems)
    });
    lab::down()?;
    let problems = result?;
    if problems.is_empty() {
        println!(
            "\nverdict: every ready backend answered from both nodes, client addresses preserved, no-endpoint service refused"
        );
        Ok(())
    } else {
        bail!("demo found problems:\n  {}", problems.join("\n  "))
    }
}
