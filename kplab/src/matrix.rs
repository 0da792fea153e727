//! `lab matrix`: which pod reaches which pod port and service port, as a table.
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use super::{State, probe};

struct Target {
    label: String,
    addr: SocketAddr,
    proto: String,
}

fn targets(state: &State) -> Vec<Target> {
    let mut out = Vec::new();
    for pod in &state.pods {
        for (ports, proto) in [(&pod.spec.tcp, "tcp"), (&pod.spec.udp, "udp")] {
            for port in ports {
                out.push(Target {
                    label: format!("pod {} {}:{port}/{proto}", pod.spec.key, pod.spec.ip),
                    addr: SocketAddr::from((pod.spec.ip, *port)),
                    proto: proto.to_owned(),
                });
            }
        }
    }
    for svc in &state.services {
        for (port, proto) in &svc.ports {
            out.push(Target {
                label: format!("svc {} {}:{port}/{proto}", svc.key, svc.ip),
                addr: SocketAddr::from((svc.ip, *port)),
                proto: proto.clone(),
            });
        }
    }
    out
}

/// Probes every pod x target pair, one thread per source pod, and renders the table.
///
/// # Errors
/// No lab is up.
pub fn render(state: &State, timeout: Duration) -> anyhow::Result<String> {
    let targets = targets(state);
    let rows: Vec<(String, Vec<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = state
            .pods
            .iter()
            .map(|pod| {
                let targets = &targets;
                s.spawn(move || {
                    let cells = match crate::netns::enter(&pod.netns) {
                        Err(e) => vec![format!("err: {e}"); targets.len()],
                        Ok(()) => targets
                            .iter()
                            .map(|t| match probe::once(&t.proto, t.addr, "/", timeout) {
                                Ok(r) if r.result == "connected" => "ok".to_owned(),
                                Ok(r) if r.result == "refused" => "rej".to_owned(),
                                Ok(_) => "--".to_owned(),
                                Err(_) => "err".to_owned(),
                            })
                            .collect(),
                    };
                    (pod.spec.key.clone(), cells)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| (String::new(), Vec::new())))
            .collect()
    });
    let mut out = String::new();
    writeln!(out, "targets:")?;
    for (i, t) in targets.iter().enumerate() {
        writeln!(out, "  [{:>2}] {}", i + 1, t.label)?;
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(6).max(6);
    write!(out, "\n{:width$}", "from \\ to")?;
    for i in 0..targets.len() {
        write!(out, " {:>4}", i + 1)?;
    }
    writeln!(out)?;
    for (src, cells) in rows {
        write!(out, "{src:width$}")?;
        for c in cells {
            write!(out, " {c:>4}")?;
        }
        writeln!(out)?;
    }
    writeln!(
        out,
        "\nok = connected, rej = refused (RST / ICMP unreachable), -- = timeout"
    )?;
    Ok(out)
}

pub fn main(timeout: Duration) -> anyhow::Result<()> {
    let state = State::load()?;
    print!("{}", render(&state, timeout)?);
    Ok(())
}
