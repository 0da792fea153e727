//! The agent's pipeline: source batches -> index -> programmer -> maps; interfaces follow local pods;
//! conntrack is swept; a status file reports what is programmed.
//!
//! ```text
//!  manifests task --Batch--> pipeline: Index::apply/delete -> dirty services -> Programmer -> Datapath
//!                                      dirty pods / every second -> attach/detach pod interfaces
//!                                      every second -> status file (generation, fingerprint, counters)
//! ```
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use dataplane_common::{CT_FLAG_CLOSING, PROTO_TCP};
use serde::Serialize;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::datapath::Datapath;
use crate::interfaces::{ifindex, local_pod_ips, parse_routes, pod_interfaces};
use crate::manifests::{Event, ManifestSource};
use crate::model::{Dirty, Index};
use crate::program::Programmer;

/// Conntrack lifetimes without traffic, by state (as Cilium's defaults).
const CT_TCP_OPEN: Duration = Duration::from_secs(6 * 3600);
const CT_TCP_CLOSING: Duration = Duration::from_secs(10);
const CT_UDP: Duration = Duration::from_secs(60);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub manifests: PathBuf,
    pub status_file: Option<PathBuf>,
    pub poll: Duration,
}

/// One batch of changes from a source; `fingerprint` identifies the source state it leads to.
#[derive(Debug)]
pub struct Batch {
    pub events: Vec<Event>,
    pub warnings: Vec<String>,
    pub fingerprint: u64,
}

/// What the agent reports about itself, written as JSON to the status file.
#[derive(Debug, Serialize)]
pub struct Status {
    pub node: String,
    /// Number of batches fully programmed so far.
    pub generation: u64,
    /// Fingerprint of the manifests the maps now reflect (hex), once the first batch is programmed.
    pub fingerprint: Option<String>,
    pub objects: BTreeMap<&'static str, usize>,
    pub frontends: usize,
    pub backends: usize,
    pub interfaces: Vec<String>,
    pub warnings_total: u64,
    pub map_write_errors_total: u64,
    pub drops: BTreeMap<&'static str, u64>,
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub service: String,
    pub frontend: String,
    pub backends: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
}

/// The agent's state.
pub struct Agent {
    node: String,
    index: Index,
    programmer: Programmer,
    datapath: Datapath,
    generation: u64,
    fingerprint: Option<u64>,
    warnings_total: u64,
    write_errors_total: u64,
}

impl Agent {
    #[must_use]
    pub fn new(node: String, datapath: Datapath) -> Self {
        Self {
            node,
            index: Index::default(),
            programmer: Programmer::default(),
            datapath,
            generation: 0,
            fingerprint: None,
            warnings_total: 0,
            write_errors_total: 0,
        }
    }

    /// Applies one batch: index, then the services it dirtied, then interfaces if pods changed.
    pub fn apply(&mut self, batch: Batch) {
        for w in &batch.warnings {
            warn!("{w}");
        }
        self.warnings_total += batch.warnings.len() as u64;
        let mut dirty = Dirty::default();
        for event in batch.events {
            dirty.merge(match event {
                Event::Apply(obj) => self.index.apply(obj),
                Event::Delete(key) => self.index.delete(&key),
            });
        }
        let mut ops = 0;
        for svc in &dirty.services {
            let report = self
                .programmer
                .sync_service(&self.index, svc, &mut self.datapath);
            for w in &report.warnings {
                warn!("{w}");
            }
            for e in &report.write_errors {
                warn!(service = %svc, "map write failed: {e}");
            }
            self.warnings_total += report.warnings.len() as u64;
            self.write_errors_total += report.write_errors.len() as u64;
            ops += report.ops;
        }
        if dirty.pods {
            self.sync_interfaces();
        }
        self.generation += 1;
        self.fingerprint = Some(batch.fingerprint);
        info!(
            generation = self.generation,
            services = dirty.services.len(),
            map_writes = ops,
            "programmed"
        );
    }

    /// Attaches to the interfaces of local pods and detaches from the ones gone.
    pub fn sync_interfaces(&mut self) {
        let routes = match std::fs::read_to_string("/proc/net/route") {
            Ok(t) => parse_routes(&t),
            Err(e) => {
                warn!("cannot read routes: {e}");
                return;
            }
        };
        let wanted = pod_interfaces(&routes, &local_pod_ips(&self.index, &self.node));
        let stale: Vec<String> = self
            .datapath
            .attached()
            .filter(|i| !wanted.contains_key(*i))
            .map(str::to_owned)
            .collect();
        for iface in stale {
            self.datapath.detach(&iface);
            info!(%iface, "detached");
        }
        for (iface, ips) in wanted {
            let Some(idx) = ifindex(&iface) else {
                continue;
            };
            match self.datapath.attach(&iface, idx) {
                Ok(true) => info!(%iface, pods = ?ips, "attached"),
                Ok(false) => {}
                Err(e) => warn!(%iface, "attach failed: {e:#}"),
            }
        }
    }

    /// Removes conntrack entries idle past their state's lifetime.
    pub fn gc_conntrack(&mut self) {
        let now = monotonic_ns();
        let entries = match self.datapath.conntrack_entries() {
            Ok(e) => e,
            Err(e) => {
                warn!("cannot read conntrack: {e:#}");
                return;
            }
        };
        let mut removed = 0;
        for (k, v) in entries {
            let lifetime = match (k.proto, v.flags & CT_FLAG_CLOSING != 0) {
                (PROTO_TCP, true) => CT_TCP_CLOSING,
                (PROTO_TCP, false) => CT_TCP_OPEN,
                _ => CT_UDP,
            };
            let idle = now.saturating_sub(v.last_seen_ns);
            if u128::from(idle) > lifetime.as_nanos() && self.datapath.remove_conntrack(&k).is_ok()
            {
                removed += 1;
            }
        }
        debug!(removed, "conntrack swept");
    }

    /// The current status.
    #[must_use]
    pub fn status(&self) -> Status {
        let (frontends, backends) = self.programmer.sizes();
        let drops = self
            .datapath
            .drops()
            .unwrap_or_default()
            .into_iter()
            .map(|(r, n)| (r.label(), n))
            .collect();
        let services = self
            .programmer
            .frontends()
            .map(|(svc, spec)| {
                let stats = self
                    .programmer
                    .rev_nat_id(&spec.frontend)
                    .and_then(|id| self.datapath.service_stats(id).ok())
                    .unwrap_or_default();
                ServiceStatus {
                    service: svc.to_string(),
                    frontend: spec.frontend.to_string(),
                    backends: spec
                        .backends
                        .iter()
                        .map(|b| format!("{}:{}", b.addr, b.port))
                        .collect(),
                    packets: stats.packets,
                    bytes: stats.bytes,
                }
            })
            .collect();
        Status {
            node: self.node.clone(),
            generation: self.generation,
            fingerprint: self.fingerprint.map(|f| format!("{f:016x}")),
            objects: self.index.counts(),
            frontends,
            backends,
            interfaces: self.datapath.attached().map(str::to_owned).collect(),
            warnings_total: self.warnings_total,
            map_write_errors_total: self.write_errors_total,
            drops,
            services,
        }
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC is the clock bpf_ktime_get_ns reads.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Writes the status file atomically (temporary file, then rename).
fn write_status(path: &std::path::Path, status: &Status) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Writes the status file if one is configured; a failure is logged, the agent goes on.
fn report(path: Option<&std::path::Path>, agent: &Agent) {
    if let Some(path) = path
        && let Err(e) = write_status(path, &agent.status())
    {
        warn!("cannot write status: {e:#}");
    }
}

/// Polls the manifests directory and sends a batch whenever something changed.
async fn watch_manifests(dir: PathBuf, poll: Duration, tx: mpsc::Sender<Batch>) {
    let mut source = ManifestSource::new(dir.clone());
    let mut tick = tokio::time::interval(poll);
    let mut last_error = None;
    loop {
        tick.tick().await;
        match source.scan() {
            Ok(Some(scan)) => {
                last_error = None;
                let batch = Batch {
                    events: scan.events,
                    warnings: scan.warnings,
                    fingerprint: scan.fingerprint,
                };
                if tx.send(batch).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                let msg = e.to_string();
                if last_error.as_ref() != Some(&msg) {
                    warn!(dir = %dir.display(), "cannot scan manifests, keeping what is programmed: {msg}");
                    last_error = Some(msg);
                }
            }
        }
    }
}

/// Runs the agent until SIGINT or SIGTERM.
///
/// # Errors
/// The eBPF object could not be loaded.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let datapath = Datapath::load()?;
    let mut agent = Agent::new(config.node_name.clone(), datapath);
    info!(node = %config.node_name, manifests = %config.manifests.display(), "agent started");

    let (tx, mut rx) = mpsc::channel(16);
    tokio::spawn(watch_manifests(config.manifests.clone(), config.poll, tx));
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    let mut gc = tokio::time::interval(Duration::from_secs(10));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(batch) = rx.recv() => {
                agent.apply(batch);
                report(config.status_file.as_deref(), &agent);
            }
            _ = every_second.tick() => {
                agent.sync_interfaces();
                report(config.status_file.as_deref(), &agent);
            }
            _ = gc.tick() => agent.gc_conntrack(),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("agent stopping");
    Ok(())
}
