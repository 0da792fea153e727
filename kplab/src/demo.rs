//! `kplab demo --manifests DIR` (`cargo xtask demo` runs it on `examples/demo`): a lab from DIR,
//! real probes from every client pod (a pod no Service selects) to every port of every Service, a
//! short report (which backends answered, how evenly, from where, whether the client address was
//! preserved, that Services without endpoints refuse), the same Services from each node's own
//! network namespace (a hostNetwork client, translated by the node's socket hooks), NodePorts and
//! LoadBalancer IPs from an external host (which backends answered, the source each saw, health
//! check node ports), then NetworkPolicy: `DIR/policy/` applied, the web Service probed from an
//! admitted and a denied client, `explain` for both and the flow log, then teardown.
//! Every address, port and name probed comes from DIR.
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::bail;

use crate::{NodeState, ServiceSpec, State, agent_status, probe};

const CONNECTIONS: u32 = 60;
/// Probes per NodePort, LoadBalancer IP or externalIP from the external host.
const EXTERNAL_PROBES: u32 = 30;
/// Probes per Service port from each node's own namespace.
const NODE_PROBES: u32 = 20;
const TIMEOUT: Duration = Duration::from_secs(1);
/// Probes per client in the NetworkPolicy phase (a denied one waits out its timeout).
const POLICY_PROBES: u32 = 8;

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
        crate::netns::enter(&netns)?;
        let mut t = Tally {
            connected: 0,
            refused: 0,
            timeout: 0,
            preserved: 0,
            by_backend: BTreeMap::new(),
        };
        for _ in 0..count {
            let r = probe::once(&proto, to, "/", TIMEOUT)?;
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

/// Probes from a node's own namespace and cgroup. A process joins a cgroup whole, so they run in
/// a `kplab probe` child, not in a thread of the demo.
fn tally_from_node(
    node: &str,
    proto: &str,
    to: SocketAddr,
    count: u32,
) -> anyhow::Result<BTreeMap<String, u32>> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args([
            "probe",
            "--from",
            node,
            "--to",
            &to.to_string(),
            "--proto",
            proto,
        ])
        .args(["--timeout-ms", &TIMEOUT.as_millis().to_string()])
        .args(["--count", &count.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "probe from {node}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut results = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let r: serde_json::Value = serde_json::from_str(line)?;
        let key = match r["result"].as_str() {
            Some("connected") => r["backend"].as_str().unwrap_or("?").to_owned(),
            Some(other) => other.to_owned(),
            None => "?".to_owned(),
        };
        *results.entry(key).or_default() += 1;
    }
    Ok(results)
}

/// `count` probes from the lab's external host `who` (a thread in its namespace).
fn from_outside(
    state: &State,
    who: &str,
    proto: &str,
    to: SocketAddr,
    count: u32,
) -> anyhow::Result<Vec<probe::ProbeResult>> {
    let netns = state.netns_of(who)?.to_owned();
    let proto = proto.to_owned();
    std::thread::spawn(move || {
        crate::netns::enter(&netns)?;
        (0..count)
            .map(|_| probe::once(&proto, to, "/", TIMEOUT))
            .collect()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("probe thread panicked"))?
}

/// What answered one external address: per backend, how many connections and the source it
/// saw ("the client" or the node that forwarded).
fn external_line(
    state: &State,
    client: std::net::Ipv4Addr,
    results: &[probe::ProbeResult],
) -> (u32, BTreeMap<(String, String), u32>) {
    let mut connected = 0;
    let mut seen = BTreeMap::new();
    for r in results.iter().filter(|r| r.result == "connected") {
        connected += 1;
        let ip = r
            .client_seen
            .as_deref()
            .and_then(|c| c.split(':').next())
            .unwrap_or_default();
        let source = if ip == client.to_string() {
            "the client".to_owned()
        } else {
            state
                .nodes
                .iter()
                .find(|n| n.spec.ip.to_string() == ip)
                .map_or_else(|| ip.to_owned(), |n| n.spec.name.clone())
        };
        *seen
            .entry((r.backend.clone().unwrap_or_default(), source))
            .or_default() += 1;
    }
    (connected, seen)
}

/// NodePorts on every node and LoadBalancer IPs / externalIPs from the external host, with which
/// backends answered and the source each saw, against what the traffic policy says; health check
/// node ports from there too.
fn outside(
    state: &State,
    programmed: &BTreeMap<String, Vec<String>>,
    out: &mut String,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let Some(x) = state.externals.first() else {
        return Ok(());
    };
    writeln!(
        out,
        "\n== From outside the cluster: external host {} {} ==",
        x.name, x.ip
    )?;
    for svc in &state.services {
        if svc.node_ports.is_empty() && svc.external_addresses.is_empty() {
            continue;
        }
        let policy = if svc.external_local {
            "Local"
        } else {
            "Cluster"
        };
        writeln!(out, "{} (externalTrafficPolicy: {policy})", svc.key)?;
        let mut targets: Vec<(String, &NodeState, SocketAddr, String)> = Vec::new();
        for n in &state.nodes {
            for (port, proto) in &svc.node_ports {
                let to = SocketAddr::from((n.spec.ip, *port));
                targets.push((format!("NodePort on {}", n.spec.name), n, to, proto.clone()));
            }
        }
        if let Some(routed) = crate::external_route(state, svc) {
            for addr in &svc.external_addresses {
                for (port, proto) in &svc.ports {
                    let to = SocketAddr::from((*addr, *port));
                    let what = format!("{addr} (routed to {})", routed.spec.name);
                    targets.push((what, routed, to, proto.clone()));
                }
            }
        }
        for (what, node, to, proto) in targets {
            check_external(
                state,
                svc,
                programmed,
                (&what, node, to, &proto),
                out,
                problems,
            )?;
        }
        if let Some(port) = svc.health_check_port {
            let mut answers = Vec::new();
            for n in &state.nodes {
                let to = SocketAddr::from((n.spec.ip, port));
                let code = from_outside(state, &x.name, "tcp", to, 1)?
                    .first()
                    .and_then(|r| r.http_status)
                    .unwrap_or(0);
                let expected = if svc.endpoint_nodes.contains(&n.spec.name) {
                    200
                } else {
                    503
                };
                if code != expected {
                    problems.push(format!(
                        "{} health check {to}: HTTP {code}, expected {expected}",
                        svc.key
                    ));
                }
                answers.push(format!("{} {code}", n.spec.name));
            }
            writeln!(
                out,
                "  health check node port {port}: {}",
                answers.join(", ")
            )?;
        }
    }
    Ok(())
}

/// One external address of `svc`, reached through `node`: probed, reported, judged.
fn check_external(
    state: &State,
    svc: &ServiceSpec,
    programmed: &BTreeMap<String, Vec<String>>,
    (what, node, to, proto): (&str, &NodeState, SocketAddr, &str),
    out: &mut String,
    problems: &mut Vec<String>,
) -> anyhow::Result<()> {
    let x = &state.externals[0];
    let results = from_outside(state, &x.name, proto, to, EXTERNAL_PROBES)?;
    let (connected, seen) = external_line(state, x.ip, &results);
    let detail: Vec<String> = seen
        .iter()
        .map(|((b, src), n)| format!("{b} ({}) {n}x saw {src}", node_of(state, b)))
        .collect();
    writeln!(
        out,
        "  {what} {to}/{proto}: {connected}/{EXTERNAL_PROBES} connected{}{}",
        if detail.is_empty() { "" } else { ": " },
        detail.join(", ")
    )?;
    let cluster_frontend = svc
        .ports
        .first()
        .map(|(p, pr)| format!("{}:{p}/{}", svc.ip, pr.to_uppercase()))
        .unwrap_or_default();
    let ready = programmed
        .get(&cluster_frontend)
        .cloned()
        .unwrap_or_default();
    let local: Vec<&String> = ready
        .iter()
        .filter(|b| node_of(state, b) == node.spec.name)
        .collect();
    let name = &node.spec.name;
    let wrong_source = seen.keys().any(|(b, src)| {
        let is_local = node_of(state, b) == *name;
        let want = if is_local || svc.external_local {
            "the client"
        } else {
            name.as_str()
        };
        src != want
    });
    let expect_answer = !svc.external_local || !local.is_empty();
    let answered: Vec<&String> = seen.keys().map(|(b, _)| b).collect();
    let allowed: Vec<&String> = if svc.external_local {
        local.clone()
    } else {
        ready.iter().collect()
    };
    let ok = if expect_answer {
        connected == EXTERNAL_PROBES
            && !wrong_source
            && answered.iter().all(|b| allowed.contains(b))
            && allowed.iter().all(|b| answered.contains(b))
    } else {
        connected == 0 && results.iter().all(|r| r.result == "timeout")
    };
    if !expect_answer {
        writeln!(
            out,
            "    (no local endpoint on {name}: dropped, as eTP Local says)"
        )?;
    }
    if !ok {
        problems.push(format!(
            "{} {what} {to}: {connected}/{EXTERNAL_PROBES} connected, answers {seen:?}",
            svc.key
        ));
    }
    Ok(())
}

/// One client's line and per-backend histogram for one Service port; returns the fewest answers
/// any backend gave.
fn spread(
    out: &mut String,
    state: &State,
    from: &str,
    backends: &[String],
    t: &Tally,
) -> Result<u32, std::fmt::Error> {
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
    for b in backends {
        let n = t.by_backend.get(b).copied().unwrap_or(0);
        writeln!(
            out,
            "    {:16} {:7} {n:3} {}",
            b,
            node_of(state, b),
            "#".repeat(n as usize)
        )?;
    }
    let counts = backends
        .iter()
        .map(|b| t.by_backend.get(b).copied().unwrap_or(0));
    let min = counts.clone().min().unwrap_or(0);
    writeln!(
        out,
        "    spread: min {min}, max {}, ideal {:.1} per backend",
        counts.max().unwrap_or(0),
        f64::from(CONNECTIONS) / backends.len() as f64
    )?;
    Ok(min)
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

    // Everything probed comes from the manifests the lab was built from: every port of every
    // Service, the backends the agent programmed for it, and as clients the pods no Service
    // selects.
    let status = agent_status(&state.nodes[0].spec.name)?;
    let programmed: BTreeMap<String, Vec<String>> = status
        .services
        .iter()
        .map(|s| {
            let backends = s.backends.iter().map(|b| pod_at(state, b)).collect();
            (s.frontend.clone(), backends)
        })
        .collect();
    let clients: Vec<&str> = state
        .pods
        .iter()
        .filter(|p| !state.services.iter().any(|s| s.selects(&p.spec)))
        .map(|p| p.spec.key.as_str())
        .collect();
    let Some(first_client) = clients.first().copied() else {
        bail!("every pod is selected by a Service: no pod is left to be a client");
    };
    let mut empty = Vec::new();
    for svc in &state.services {
        for (port, proto) in &svc.ports {
            let frontend = format!("{}:{port}/{}", svc.ip, proto.to_uppercase());
            let to = SocketAddr::from((svc.ip, *port));
            let backends = programmed.get(&frontend).cloned().unwrap_or_default();
            if backends.is_empty() {
                empty.push((svc.key.as_str(), proto.as_str(), to));
                continue;
            }
            writeln!(
                out,
                "\n== Service {} {frontend}: ready backends {} ==",
                svc.key,
                backends
                    .iter()
                    .map(|b| format!("{b} ({})", node_of(state, b)))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?;
            for from in &clients {
                let t = tally(state, from, proto, to, CONNECTIONS)?;
                let min = spread(&mut out, state, from, &backends, &t)?;
                if t.connected != CONNECTIONS || min == 0 || t.preserved != t.connected {
                    problems.push(format!(
                        "{} {frontend} from {from}: {}/{CONNECTIONS} connected, min per backend {min}, preserved {}",
                        svc.key, t.connected, t.preserved
                    ));
                }
                let strays: Vec<&String> = t
                    .by_backend
                    .keys()
                    .filter(|b| !backends.contains(b))
                    .collect();
                if !strays.is_empty() {
                    problems.push(format!(
                        "{}: answers from non-ready pods {strays:?}",
                        svc.key
                    ));
                }
            }
        }
    }

    writeln!(
        out,
        "\n== From the nodes' own network namespaces (hostNetwork clients; socket hooks) =="
    )?;
    for n in &state.nodes {
        for svc in &state.services {
            for (port, proto) in &svc.ports {
                let frontend = format!("{}:{port}/{}", svc.ip, proto.to_uppercase());
                let Some(backends) = programmed.get(&frontend).filter(|b| !b.is_empty()) else {
                    continue;
                };
                let to = SocketAddr::from((svc.ip, *port));
                let answers = tally_from_node(&n.spec.name, proto, to, NODE_PROBES)?;
                let connected: u32 = answers
                    .iter()
                    .filter(|(b, _)| backends.contains(b))
                    .map(|(_, c)| c)
                    .sum();
                let by: Vec<String> = answers.iter().map(|(b, c)| format!("{b} {c}")).collect();
                writeln!(
                    out,
                    "from node {} to {} {frontend}: {connected}/{NODE_PROBES} answered by ready backends ({})",
                    n.spec.name,
                    svc.key,
                    by.join(", ")
                )?;
                if connected != NODE_PROBES {
                    problems.push(format!(
                        "{frontend} from node {}: {connected}/{NODE_PROBES} answered by ready backends",
                        n.spec.name
                    ));
                }
            }
        }
    }

    outside(state, &programmed, &mut out, &mut problems)?;

    let mut last = None;
    for (key, proto, to) in empty {
        let how = if proto == "tcp" {
            "TCP RST"
        } else {
            "ICMP port unreachable"
        };
        if last.replace(key) != Some(key) {
            writeln!(out, "\n== Service without endpoints: {key} ==")?;
        }
        let t = tally(state, first_client, proto, to, 1)?;
        let result = if t.refused == 1 {
            "refused"
        } else if t.connected == 1 {
            "connected"
        } else {
            "timeout"
        };
        writeln!(
            out,
            "{proto} {to} from {first_client}: {result} (expected: refused by {how})"
        )?;
        if t.refused != 1 {
            problems.push(format!("{key} {to}/{proto}: {result}, expected refused"));
        }
    }

    // Agents rewrite their status (with the counters) every second.
    std::thread::sleep(Duration::from_millis(1500));
    writeln!(
        out,
        "\n== Datapath counters, per node (per-CPU maps, summed; a flow is one backend pick, at the socket or per packet) =="
    )?;
    for n in &state.nodes {
        let s = agent_status(&n.spec.name)?;
        let drops: Vec<String> = s
            .drops
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let per_svc: Vec<String> = s
            .services
            .iter()
            .filter(|x| x.packets != 0 || x.flows != 0)
            .map(|x| {
                format!(
                    "{} {} flows, {} pkts translated per packet",
                    x.frontend, x.flows, x.packets
                )
            })
            .collect();
        writeln!(
            out,
            "{}: attached to {} pod interfaces; drops: {}; to services: {}",
            n.spec.name,
            s.interfaces.len(),
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

/// The demo's external host: on the nodes' network, at the first node's address with the last
/// octet 250 (inside the lab's underlay, which nothing else uses).
fn external_host(manifests: &Path) -> anyhow::Result<String> {
    let cluster = crate::cluster::read(manifests)?;
    let Some(first) = cluster.nodes.first() else {
        bail!("no nodes");
    };
    let [a, b, c, _] = first.ip.octets();
    Ok(format!("outside={a}.{b}.{c}.250"))
}

/// Applies `DIR/policy/` over DIR's manifests, probes Service demo/web from the client the
/// policy admits and from the one it does not, and shows what the agents say about it:
/// `explain` for both, and the flow log.
fn policy_phase(manifests: &Path) -> anyhow::Result<(String, Vec<String>)> {
    let policy_dir = manifests.join("policy");
    if !policy_dir.is_dir() {
        return Ok((String::new(), Vec::new()));
    }
    let dir = crate::home().join("demo-policy");
    std::fs::create_dir_all(&dir)?;
    for entry in std::fs::read_dir(manifests)?.chain(std::fs::read_dir(&policy_dir)?) {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), dir.join(entry.file_name()))?;
        }
    }
    crate::apply(&dir)?;
    let state = State::load()?;
    let mut out = String::new();
    let mut problems = Vec::new();
    let _ = writeln!(
        out,
        "\n== NetworkPolicy: {} applied ==",
        std::fs::read_dir(&policy_dir)?
            .filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let Some(web) = state.services.iter().find(|s| s.key == "demo/web") else {
        bail!("the demo's policy phase needs Service demo/web");
    };
    let Some((port, proto)) = web.ports.first().cloned() else {
        bail!("Service demo/web has no port");
    };
    let to = SocketAddr::from((web.ip, port));
    for (client, admitted) in [("demo/client-a", true), ("demo/client-b", false)] {
        let t = tally(&state, client, &proto, to, POLICY_PROBES)?;
        let answered: Vec<&str> = t.by_backend.keys().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "{client} -> {} {to}/{proto}: {}/{POLICY_PROBES} connected, {} no answer ({}){}",
            web.key,
            t.connected,
            t.timeout,
            if admitted { "admitted" } else { "denied" },
            if answered.is_empty() {
                String::new()
            } else {
                format!("; answered by {}", answered.join(", "))
            }
        );
        let want = if admitted { POLICY_PROBES } else { 0 };
        if t.connected != want {
            problems.push(format!(
                "{client} -> {to}: {} of {POLICY_PROBES} connected with the policy, expected {want}",
                t.connected
            ));
        }
        let selected = |key: &str| {
            state
                .pods
                .iter()
                .any(|p| p.spec.key == key && web.selects(&p.spec))
        };
        if let Some(stray) = answered.iter().find(|b| !selected(b)) {
            problems.push(format!(
                "{client} -> {to} was answered by {stray}, not a web backend"
            ));
        }
        let explained = crate::explain::explain(client, &format!("{to}/{proto}"))?;
        let _ = write!(out, "explain: {explained}");
        let says = if admitted {
            "allowed, by NetworkPolicy demo/web-from-frontends"
        } else {
            "denied (policy_ingress)"
        };
        if !explained.contains(says) {
            problems.push(format!("explain {client} -> {to} does not say {says:?}"));
        }
    }
    let flows = crate::explain::flows(false)?;
    let lines: Vec<&str> = flows.lines().collect();
    let _ = writeln!(
        out,
        "flow log (last {} of {}):",
        lines.len().min(4),
        lines.len()
    );
    for l in lines.iter().rev().take(4).rev() {
        let _ = writeln!(out, "  {l}");
    }
    if !lines
        .iter()
        .any(|l| l.contains("ingress denied no policy of demo/web-"))
    {
        problems.push("the flow log has no denied flow to a web pod".to_owned());
    }
    Ok((out, problems))
}

/// Runs the demo; the lab is always torn down.
///
/// # Errors
/// The lab could not be built, or traffic did not flow as it should.
pub fn run(manifests: &Path) -> anyhow::Result<()> {
    eprintln!("demo: building the lab from {}", manifests.display());
    let state = crate::up(manifests, None, &[external_host(manifests)?])?;
    let result = report(&state).and_then(|(text, mut problems)| {
        print!("{text}");
        println!("\n== Reachability matrix (pods x pod ports and service ports) ==");
        print!(
            "{}",
            crate::matrix_table(&state, Duration::from_millis(300))?
        );
        let (text, policy_problems) = policy_phase(manifests)?;
        print!("{text}");
        problems.extend(policy_problems);
        Ok(problems)
    });
    crate::down()?;
    let problems = result?;
    if problems.is_empty() {
        println!(
            "\nverdict: every ready backend answered every client pod, client addresses preserved, every Service without endpoints refused"
        );
        println!(
            "verdict: every Service port answered from every node's own namespace, by ready backends only"
        );
        println!(
            "verdict: from outside, NodePorts and LoadBalancer IPs answered as their traffic policy says (Cluster: every ready backend, remote ones via source NAT; Local: this node's, client address kept, dropped where none)"
        );
        println!(
            "verdict: with the NetworkPolicy applied, every connection of the admitted client reached a web backend, every one of the other was dropped, and explain and the flow log named the policy"
        );
        Ok(())
    } else {
        bail!("demo found problems:\n  {}", problems.join("\n  "))
    }
}
