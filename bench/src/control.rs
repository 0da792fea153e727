//! Control-plane timings: a full sync of N Services ("objects known" to "datapath programmed"),
//! and one endpoint change applied (event to map written), for our agent and for kube-proxy's
//! rules loaded the way kube-proxy loads them (iptables-restore on the legacy and nft backends,
//! `nft -f`), each in a private network namespace and under a time cap.
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dataplane_agent::agent::Agent;
use dataplane_agent::datapath::Datapath;
use dataplane_core::object::{Kind, Object};
use dataplane_core::reconcile::NodePortAddresses;
use dataplane_core::source::Batch;
use dataplane_core::source::Event;
use dataplane_core::translate::FrontendSpec;
use kplab::netns::Netns;

use crate::cluster;
use crate::kubeproxy;

/// Latency percentiles in ms.
#[derive(Debug, Default, serde::Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub samples: usize,
}

impl Percentiles {
    #[must_use]
    pub fn of(mut ms: Vec<f64>) -> Percentiles {
        if ms.is_empty() {
            return Percentiles::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            samples: ms.len(),
        }
    }
}

/// One mode's control-plane figures at one scale.
#[derive(Debug, serde::Serialize)]
pub struct ModeSync {
    pub mode: String,
    pub services: usize,
    /// Seconds for the full sync; `None` when it did not finish within the cap.
    pub full_sync_s: Option<f64>,
    pub capped_at_s: f64,
    /// One endpoint added or removed; `None` when the full sync did not finish.
    pub change: Option<Percentiles>,
}

fn slice_with(svc: &str, endpoints: usize, i: usize) -> serde_json::Value {
    let eps: Vec<std::net::Ipv4Addr> = (0..endpoints)
        .map(|j| cluster::filler_endpoint(i, j))
        .collect();
    cluster::slice(svc, 8080, &eps)
}

/// Our agent: one batch with every object (as the first list delivers them), then `changes`
/// batches of one EndpointSlice each, alternately adding and removing an endpoint of the Service
/// in the middle. Timed around `Agent::apply`: index, translation, map writes.
///
/// # Errors
/// The eBPF object cannot be loaded (needs root).
pub fn ours(n: usize, endpoints: usize, changes: usize) -> anyhow::Result<ModeSync> {
    let datapath = Datapath::load().context("loading the eBPF object (needs root)")?;
    let mut agent = Agent::new(
        "bench-node".to_owned(),
        datapath,
        NodePortAddresses::Primary,
    );
    let objects = cluster::objects(n, endpoints, &[]);
    let events: Vec<Event> = objects
        .iter()
        .map(|o| {
            let kind = if o["kind"] == "Service" {
                Kind::Service
            } else {
                Kind::EndpointSlice
            };
            Object::parse(kind, o.clone()).map(Event::Apply)
        })
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    agent.apply(Batch {
        events,
        warnings: Vec::new(),
        fingerprint: 1,
        received: start,
    });
    let full = start.elapsed().as_secs_f64();
    let status = agent.status();
    if status.errors.values().sum::<u64>() > 0 {
        bail!("full sync of {n} Services had errors: {:?}", status.errors);
    }
    let mid = n / 2;
    let svc = format!("svc-{mid:06}");
    let mut ms = Vec::with_capacity(changes);
    for c in 0..changes {
        let slice = slice_with(&svc, endpoints + (c % 2 == 0) as usize, mid);
        let event = Event::Apply(Object::parse(Kind::EndpointSlice, slice)?);
        let t = Instant::now();
        agent.apply(Batch {
            events: vec![event],
            warnings: Vec::new(),
            fingerprint: 2 + c as u64,
            received: t,
        });
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ModeSync {
        mode: "ours".into(),
        services: n,
        full_sync_s: Some(full),
        capped_at_s: 0.0,
        change: Some(Percentiles::of(ms)),
    })
}

/// A private network namespace for loading rules, deleted on drop.
struct RulesNetns(Netns);

impl RulesNetns {
    fn new(name: String) -> anyhow::Result<RulesNetns> {
        Ok(RulesNetns(Netns::create(name)?))
    }

    /// Runs `cmd` with `input` on stdin inside the namespace; seconds taken, or `None` if it was
    /// killed at `cap`.
    fn timed(&self, cmd: &[&str], input: &Path, cap: Duration) -> anyhow::Result<Option<f64>> {
        let start = Instant::now();
        let mut child = self
            .0
            .command(cmd[0])
            .args(&cmd[1..])
            .stdin(std::fs::File::open(input)?)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    let mut err = String::new();
                    if let Some(mut e) = child.stderr.take() {
                        let _ = std::io::Read::read_to_string(&mut e, &mut err);
                    }
                    bail!("{} failed: {err}", cmd.join(" "));
                }
                return Ok(Some(start.elapsed().as_secs_f64()));
            }
            if start.elapsed() > cap {
                let _ = child.kill();
                let _ = child.wait();
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for RulesNetns {
    fn drop(&mut self) {
        // Rules are flushed here, synchronously, before the namespace goes: a namespace deleted
        // with 100k nftables chains in it is torn down by a kernel worker for minutes, under the
        // next measurements.
        let _ = self.0.run("timeout", &["300", "nft", "flush", "ruleset"]);
    }
}

/// The baseline modes: (name, loader command, rules generator, change generator).
type Generator = fn(&[(dataplane_core::object::NsName, Vec<FrontendSpec>)]) -> String;
type ChangeGenerator = fn(&dataplane_core::object::NsName, &FrontendSpec) -> String;

/// kube-proxy's modes as loaded here.
pub const BASELINES: [(&str, &[&str], Generator, ChangeGenerator); 3] = [
    (
        "iptables-legacy",
        &["iptables-legacy-restore", "--noflush"],
        kubeproxy::iptables,
        kubeproxy::iptables_change,
    ),
    (
        "iptables-nft",
        &["iptables-nft-restore", "--noflush"],
        kubeproxy::iptables,
        kubeproxy::iptables_change,
    ),
    (
        "nftables",
        &["nft", "-f", "-"],
        kubeproxy::nftables,
        kubeproxy::nftables_change,
    ),
];

/// Loads one baseline's full ruleset for `n` Services into a fresh namespace, then applies
/// `changes` one-endpoint changes the way kube-proxy's partial syncs write them.
///
/// # Errors
/// A namespace could not be made, or a loader failed (other than by the cap).
pub fn baseline(
    mode: usize,
    n: usize,
    endpoints: usize,
    changes: usize,
    cap: Duration,
    prefix: &str,
    scratch: &Path,
) -> anyhow::Result<ModeSync> {
    let (name, cmd, rules, change) = BASELINES[mode];
    let objects = cluster::objects(n, endpoints, &[]);
    let index = cluster::index(&objects);
    let translated = cluster::translated(&objects, &index);
    let file = scratch.join(format!("{name}-{n}.rules"));
    std::fs::write(&file, rules(&translated))?;
    let ns = RulesNetns::new(format!("{prefix}-cp-{name}"))?;
    let full = ns.timed(cmd, &file, cap)?;
    let mut result = ModeSync {
        mode: name.to_owned(),
        services: n,
        full_sync_s: full,
        capped_at_s: cap.as_secs_f64(),
        change: None,
    };
    if full.is_none() {
        return Ok(result);
    }
    let mid = n / 2;
    let (svc, fes) = &translated[mid];
    let mut ms = Vec::with_capacity(changes);
    for c in 0..changes {
        let mut fe = fes[0].clone();
        if c % 2 == 0 {
            let mut extra = fe.backends[0];
            extra.addr = std::net::Ipv4Addr::new(10, 201, 0, 1);
            fe.backends.push(extra);
        }
        let file = scratch.join(format!("{name}-{n}-change.rules"));
        std::fs::write(&file, change(svc, &fe))?;
        match ns.timed(cmd, &file, cap)? {
            Some(s) => ms.push(s * 1e3),
            None => break,
        }
    }
    result.change = Some(Percentiles::of(ms));
    Ok(result)
}
