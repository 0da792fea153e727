//! `lab explain` and `lab flows`: the agents' own answers, gathered across nodes.
//!
//! ```text
//!  lab explain --from ns/pod | EXTERNAL --to ADDR:PORT/PROTO
//!    the source pod's node: `dataplane-agent explain` (egress, translation, a local ingress)
//!    the backend's node, when it is another: `dataplane-agent explain --from <source address>`
//!  lab flows: every node's flow log (JSON lines), merged by time
//! ```
use std::net::Ipv4Addr;

use anyhow::{Context as _, bail};
use serde_json::Value;

use super::{State, home, programs};

/// One node's answer, as its agent gives it (JSON).
fn ask(state: &State, node: &str, from: &str, to: &str) -> anyhow::Result<Value> {
    let netns = state
        .nodes
        .iter()
        .find(|n| n.spec.name == node)
        .map(|n| n.netns.clone())
        .with_context(|| format!("node {node} is not in the lab"))?;
    let agent = programs()?.agent;
    let out = crate::netns::run(
        &netns,
        &agent.display().to_string(),
        &["explain", "--from", from, "--to", to, "--json"],
    )?;
    serde_json::from_str(&out).with_context(|| format!("{node}'s agent answered {out:?}"))
}

fn node_of_addr(state: &State, addr: Ipv4Addr) -> Option<(&str, &str)> {
    state
        .pods
        .iter()
        .find(|p| p.spec.ip == addr)
        .map(|p| (p.spec.key.as_str(), p.spec.node.as_str()))
}

fn render(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let mut out = format!("  node {}: {}\n", s("node"), s("answer"));
    if let Some(t) = v["translated_to"].as_str() {
        out += &format!("    translated to {t}\n");
    }
    for verdict in v["verdicts"].as_array().into_iter().flatten() {
        let f = |k: &str| verdict[k].as_str().unwrap_or_default().to_owned();
        out += &format!("    {} of {}: {}", f("direction"), f("pod"), f("result"));
        if let Some(p) = verdict["policy"].as_str() {
            out += &format!(", by NetworkPolicy {p}");
        }
        if let Some(r) = verdict["reason"].as_str() {
            out += &format!(" ({r})");
        }
        out += "\n";
    }
    if let Some(n) = v["note"].as_str() {
        out += &format!("    {n}\n");
    }
    out
}

/// The answer of every node that judges the connection, and the overall verdict.
///
/// # Errors
/// No lab, an unknown source, or an agent could not answer.
pub fn explain(from: &str, to: &str) -> anyhow::Result<String> {
    let state = State::load()?;
    let mut answers = Vec::new();
    let (src_addr, first) = if let Some(pod) = state.pods.iter().find(|p| p.spec.key == from) {
        let v = ask(&state, &pod.spec.node, from, to)?;
        (pod.spec.ip, Some(v))
    } else if let Some(x) = state.externals.iter().find(|x| x.name == from) {
        (x.ip, None)
    } else {
        bail!("{from:?} is not a pod (ns/name) or external host of the lab");
    };
    let (dst, proto) = to
        .split_once('/')
        .with_context(|| format!("--to {to:?}: expected ADDR:PORT/PROTO"))?;
    // Where the connection ends up: the backend the source's node chose, or the address.
    let target = first
        .as_ref()
        .and_then(|v| v["backend"].as_str())
        .unwrap_or(dst)
        .to_owned();
    let mut allowed = true;
    let mut source_node = None;
    if let Some(v) = first {
        allowed = v["answer"] == "allow";
        source_node = v["node"].as_str().map(str::to_owned);
        answers.push(v);
    }
    let target_addr: Option<Ipv4Addr> = target.split(':').next().and_then(|a| a.parse().ok());
    if allowed
        && let Some((_, node)) = target_addr.and_then(|a| node_of_addr(&state, a))
        && source_node.as_deref() != Some(node)
    {
        let v = ask(
            &state,
            node,
            &src_addr.to_string(),
            &format!("{target}/{proto}"),
        )?;
        allowed = v["answer"] == "allow";
        answers.push(v);
    }
    let mut out = format!(
        "{from} -> {to}: {}\n",
        if allowed { "allowed" } else { "denied" }
    );
    for v in &answers {
        out += &render(v);
    }
    Ok(out)
}

/// Every node's flow log, merged by time: as text, or the agents' JSON lines.
///
/// # Errors
/// No lab, or a flow log cannot be read.
pub fn flows(json: bool) -> anyhow::Result<String> {
    let state = State::load()?;
    let mut lines: Vec<(String, String)> = Vec::new();
    for node in &state.nodes {
        let path = home()
            .join("nodes")
            .join(&node.spec.name)
            .join("flows.jsonl");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let time = v["time"].as_str().unwrap_or_default().to_owned();
            let shown = if json {
                line.to_owned()
            } else {
                let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
                let why = match v["policy"].as_str() {
                    Some(p) => format!("by {p}"),
                    None if s("verdict") == "allowed" => String::new(),
                    None => format!("no policy of {} allows it", s("pod")),
                };
                format!(
                    "{} {} {} -> {} {} {} {} {why}",
                    s("time"),
                    s("node"),
                    s("src"),
                    s("dst"),
                    s("protocol"),
                    s("direction"),
                    s("verdict")
                )
            };
            lines.push((time, shown));
        }
    }
    lines.sort();
    Ok(lines.into_iter().map(|(_, l)| l + "\n").collect())
}
