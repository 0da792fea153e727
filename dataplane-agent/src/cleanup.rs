//! `dataplane-agent cleanup-kube-proxy`: removes what kube-proxy leaves on a node, in this network
//! namespace: its iptables chains (`KUBE-*`, in every table, through both the legacy and the nft
//! backends, IPv4 and IPv6) with the rules that jump to them, and its nftables tables
//! (`kube-proxy`). Chains that belong to the kubelet are left alone.
//!
//! Each table is rewritten in one `iptables-restore --noflush` transaction: delete the jumps into
//! kube-proxy's chains, flush those chains, delete them.
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

/// Chains named KUBE-* that the kubelet, not kube-proxy, creates and maintains.
const KUBELET_CHAINS: &[&str] = &[
    "KUBE-KUBELET-CANARY",
    "KUBE-FIREWALL",
    "KUBE-MARK-DROP",
    "KUBE-IPTABLES-HINT",
];

/// The iptables front ends tried, in order.
const IPTABLES: &[&str] = &[
    "iptables-legacy",
    "iptables-nft",
    "ip6tables-legacy",
    "ip6tables-nft",
];

/// What one table holds of kube-proxy's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TablePlan {
    pub table: String,
    pub chains: BTreeSet<String>,
    /// Rules of other chains that jump into kube-proxy's, as `iptables-save` prints them.
    pub jumps: Vec<String>,
}

fn is_kube_proxy_chain(name: &str) -> bool {
    name.starts_with("KUBE-") && !KUBELET_CHAINS.contains(&name)
}

/// Finds kube-proxy's chains and the jumps into them in `iptables-save` output.
#[must_use]
pub fn plan(save: &str) -> Vec<TablePlan> {
    let mut plans = Vec::new();
    let mut current: Option<TablePlan> = None;
    for line in save.lines() {
        if let Some(table) = line.strip_prefix('*') {
            current = Some(TablePlan {
                table: table.to_owned(),
                ..TablePlan::default()
            });
        } else if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().unwrap_or_default();
            if let Some(t) = current.as_mut().filter(|_| is_kube_proxy_chain(name)) {
                t.chains.insert(name.to_owned());
            }
        } else if line == "COMMIT" {
            if let Some(t) = current.take().filter(|t| !t.chains.is_empty()) {
                plans.push(t);
            }
        } else if let Some(rule) = line.strip_prefix("-A ")
            && let Some(t) = current.as_mut()
        {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let mut words = rule.split_whitespace();
            let target = std::iter::from_fn(|| words.next())
                .skip_while(|w| *w != "-j" && *w != "-g")
                .nth(1)
                .unwrap_or_default();
            if !is_kube_proxy_chain(chain) && is_kube_proxy_chain(target) {
                t.jumps.push(rule.to_owned());
            }
        }
    }
    plans
}

/// The `iptables-restore --noflush` input that removes a table's kube-proxy state.
#[must_use]
pub fn restore_input(plan: &TablePlan) -> String {
    let mut out = format!("*{}\n", plan.table);
    for rule in &plan.jumps {
        let _ = writeln!(out, "-D {rule}");
    }
    for chain in &plan.chains {
        let _ = writeln!(out, "-F {chain}");
    }
    for chain in &plan.chains {
        let _ = writeln!(out, "-X {chain}");
    }
    out.push_str("COMMIT\n");
    out
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Removes (or with `dry_run`, lists) kube-proxy's iptables chains and nftables tables. Returns one
/// line per thing found.
///
/// # Errors
/// A removal was refused.
pub fn run(dry_run: bool) -> anyhow::Result<Vec<String>> {
    let verb = if dry_run { "would remove" } else { "removed" };
    let mut report = Vec::new();
    for tool in IPTABLES {
        let Some(save) = output(&format!("{tool}-save"), &[]) else {
            continue;
        };
        for plan in plan(&save) {
            if !dry_run {
                let mut child = Command::new(format!("{tool}-restore"))
                    .arg("--noflush")
                    .stdin(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .with_context(|| format!("starting {tool}-restore"))?;
                child
                    .stdin
                    .take()
                    .context("restore stdin")?
                    .write_all(restore_input(&plan).as_bytes())?;
                let out = child.wait_with_output()?;
                if !out.status.success() {
                    bail!(
                        "{tool}-restore refused the cleanup of table {}: {}",
                        plan.table,
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                }
            }
            for rule in &plan.jumps {
                report.push(format!("{tool} {}: {verb} rule -A {rule}", plan.table));
            }
            for chain in &plan.chains {
                report.push(format!("{tool} {}: {verb} chain {chain}", plan.table));
            }
        }
    }
    if let Some(tables) = output("nft", &["list", "tables"]) {
        for line in tables.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["table", family, "kube-proxy"] = words[..] {
                if !dry_run {
                    let status = Command::new("nft")
                        .args(["delete", "table", family, "kube-proxy"])
                        .status()
                        .context("running nft")?;
                    if !status.success() {
                        bail!("nft refused to delete table {family} kube-proxy");
                    }
                }
                report.push(format!("nft: {verb} table {family} kube-proxy"));
            }
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "\
*mangle
:PREROUTING ACCEPT [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*nat
:PREROUTING ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:MINE - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -j MINE
-A MINE -g KUBE-SVC-ABC
-A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 443 -j KUBE-SVC-ABC
COMMIT
";

    #[test]
    fn finds_kube_proxy_chains_and_jumps_but_not_the_kubelets() {
        let plans = plan(SAVE);
        assert_eq!(plans.len(), 1, "mangle only has the kubelet's canary");
        let nat = &plans[0];
        assert_eq!(nat.table, "nat");
        assert_eq!(
            nat.chains,
            ["KUBE-SERVICES".to_owned(), "KUBE-SVC-ABC".to_owned()].into()
        );
        assert_eq!(
            nat.jumps,
            [
                "PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
                "MINE -g KUBE-SVC-ABC"
            ]
        );
        let input = restore_input(nat);
        assert!(input.starts_with("*nat\n-D PREROUTING"));
        assert!(input.ends_with("-X KUBE-SERVICES\n-X KUBE-SVC-ABC\nCOMMIT\n"));
        assert!(
            input.find("-F KUBE-SVC-ABC").unwrap() < input.find("-X KUBE-SERVICES").unwrap(),
            "flush all before deleting any"
        );
    }
}
