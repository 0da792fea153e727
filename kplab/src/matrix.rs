//! `lab matrix`: which pod (or external host) reaches which pod port, service port and external
//! host port, as a table; with `--expect FILE` (a table in the same format, edited to what
//! should be), the cells that differ.
//!
//! ```text
//!  targets:
//!    [ 1] pod demo/web 10.244.1.20:8080/tcp
//!  from \ to      1    2
//!  demo/client   ok   --
//! ```
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use super::{State, probe};

struct Target {
    label: String,
    addr: SocketAddr,
    proto: String,
}

fn targets(state: &State) -> Vec<Target> {
    let mut out = Vec::new();
    let mut ports = |kind: &str, key: &str, ip, tcp: &[u16], udp: &[u16]| {
        for (ports, proto) in [(tcp, "tcp"), (udp, "udp")] {
            for port in ports {
                out.push(Target {
                    label: format!("{kind} {key} {ip}:{port}/{proto}"),
                    addr: SocketAddr::from((ip, *port)),
                    proto: proto.to_owned(),
                });
            }
        }
    };
    for pod in &state.pods {
        ports(
            "pod",
            &pod.spec.key,
            pod.spec.ip,
            &pod.spec.tcp,
            &pod.spec.udp,
        );
    }
    for x in &state.externals {
        ports("external", &x.name, x.ip, &x.tcp, &x.udp);
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

/// A probed matrix: target labels, and per source its cells (`ok`, `rej`, `--`, `err`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Matrix {
    pub targets: Vec<String>,
    pub rows: Vec<(String, Vec<String>)>,
}

/// Probes every source x target pair, one thread per source (every pod and external host, in
/// its network namespace; a thread cannot join a pod's cgroup, so a pod's probes take the TC
/// path of its interface rather than the socket hooks).
pub fn probe_all(state: &State, timeout: Duration) -> Matrix {
    let targets = targets(state);
    let sources: Vec<(String, String)> = state
        .pods
        .iter()
        .map(|p| (p.spec.key.clone(), p.netns.clone()))
        .chain(
            state
                .externals
                .iter()
                .map(|x| (format!("external/{}", x.name), x.netns.clone())),
        )
        .collect();
    let rows = std::thread::scope(|s| {
        let handles: Vec<_> = sources
            .iter()
            .map(|(key, netns)| {
                let targets = &targets;
                s.spawn(move || {
                    let cells = match crate::netns::enter(netns) {
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
                    (key.clone(), cells)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| (String::new(), Vec::new())))
            .collect()
    });
    Matrix {
        targets: targets.into_iter().map(|t| t.label).collect(),
        rows,
    }
}

impl Matrix {
    /// The table, as `lab matrix` prints it (and `--expect` reads it).
    #[must_use]
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "targets:");
        for (i, t) in self.targets.iter().enumerate() {
            let _ = writeln!(out, "  [{:>2}] {t}", i + 1);
        }
        let width = self
            .rows
            .iter()
            .map(|(k, _)| k.len())
            .max()
            .unwrap_or(6)
            .max(9);
        let _ = write!(out, "\n{:width$}", "from \\ to");
        for i in 0..self.targets.len() {
            let _ = write!(out, " {:>4}", i + 1);
        }
        let _ = writeln!(out);
        for (src, cells) in &self.rows {
            let _ = write!(out, "{src:width$}");
            for c in cells {
                let _ = write!(out, " {c:>4}");
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(
            out,
            "\nok = connected, rej = refused (RST / ICMP unreachable), -- = no answer (a policy \
             drop, or nothing listening)"
        );
        out
    }

    /// Reads a table in [`Matrix::render`]'s format.
    ///
    /// # Errors
    /// A row with another number of cells than there are targets.
    pub fn parse(text: &str) -> anyhow::Result<Matrix> {
        let mut m = Matrix::default();
        let mut in_rows = false;
        for line in text.lines() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with("ok = ") || trimmed == "targets:" {
                continue;
            }
            if let Some(rest) = trimmed.strip_prefix('[') {
                let (_, label) = rest.split_once(']').context("a target line without ']'")?;
                m.targets.push(label.trim().to_owned());
            } else if trimmed.starts_with("from \\ to") {
                in_rows = true;
            } else if in_rows {
                let mut words = trimmed.split_whitespace();
                let src = words.next().unwrap_or_default().to_owned();
                let cells: Vec<String> = words.map(str::to_owned).collect();
                anyhow::ensure!(
                    cells.len() == m.targets.len(),
                    "row {src}: {} cells for {} targets",
                    cells.len(),
                    m.targets.len()
                );
                m.rows.push((src, cells));
            }
        }
        Ok(m)
    }

    /// The cells of `expected` that this matrix does not match, as readable lines (sources and
    /// targets are matched by name, so the order may differ).
    #[must_use]
    pub fn differences(&self, expected: &Matrix) -> Vec<String> {
        let got: BTreeMap<(&str, &str), &str> = self
            .rows
            .iter()
            .flat_map(|(src, cells)| {
                self.targets
                    .iter()
                    .zip(cells)
                    .map(move |(t, c)| ((src.as_str(), t.as_str()), c.as_str()))
            })
            .collect();
        let mut out = Vec::new();
        for (src, cells) in &expected.rows {
            for (target, want) in expected.targets.iter().zip(cells) {
                match got.get(&(src.as_str(), target.as_str())) {
                    Some(c) if c == want => {}
                    Some(c) => out.push(format!("{src} -> {target}: expected {want}, got {c}")),
                    None => out.push(format!("{src} -> {target}: not in this lab")),
                }
            }
        }
        out
    }
}

/// The rendered table.
///
/// # Errors
/// No lab is up.
pub fn render(state: &State, timeout: Duration) -> anyhow::Result<String> {
    Ok(probe_all(state, timeout).render())
}

/// `lab matrix [--expect FILE]`: prints the table; with an expectation, the differences, and
/// fails when there are any.
///
/// # Errors
/// No lab is up, the expectation cannot be read, or it differs.
pub fn main(timeout: Duration, expect: Option<&Path>) -> anyhow::Result<()> {
    let state = State::load()?;
    let matrix = probe_all(&state, timeout);
    print!("{}", matrix.render());
    let Some(path) = expect else {
        return Ok(());
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let expected = Matrix::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
    let diffs = matrix.differences(&expected);
    if diffs.is_empty() {
        println!("matches {}", path.display());
        return Ok(());
    }
    println!("\n{} cells differ from {}:", diffs.len(), path.display());
    for d in &diffs {
        println!("  {d}");
    }
    anyhow::bail!("{} cells differ from {}", diffs.len(), path.display())
}

#[cfg(test)]
mod tests {
    use super::Matrix;

    #[test]
    fn a_rendered_matrix_parses_back_and_differences_name_the_cells() {
        let m = Matrix {
            targets: vec![
                "pod a/web 10.0.0.1:80/tcp".into(),
                "svc a/web 10.96.0.1:80/tcp".into(),
            ],
            rows: vec![
                ("a/client".into(), vec!["ok".into(), "ok".into()]),
                ("external/ext".into(), vec!["--".into(), "rej".into()]),
            ],
        };
        let back = Matrix::parse(&m.render()).unwrap();
        assert_eq!(back, m);
        assert!(m.differences(&back).is_empty());
        let mut want = back;
        want.rows[1].1[0] = "ok".into();
        assert_eq!(
            m.differences(&want),
            vec!["external/ext -> pod a/web 10.0.0.1:80/tcp: expected ok, got --".to_owned()]
        );
    }
}
