//! The agent's pipeline: source batches -> index -> programmer -> maps; interfaces follow local pods;
//! conntrack is swept; a status file reports what is programmed.
//!
//! ```text
//!  manifests task --Batch--> pipeline: Index::apply/delete -> dirty services -> Programmer -> Datapath
//!                                      dirty pods / every second -> attach/detach pod interfaces
//!                                      every second -> status file (generation, fingerprint, counters)
//! ```
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dataplane_common::{
    CT_FLAG_CLOSING, MAX_BACKENDS, MAX_CONNTRACK, MAX_SERVICE_ENTRIES, PROTO_TCP, SvcStats,
    map_names,
};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::datapath::Datapath;
use crate::interfaces::{ifindex, local_pod_ips, parse_routes, pod_interfaces};
use crate::manifests::ManifestSource;
use crate::metrics::{Histogram, MapUsage, ServiceStatus, Status};
use crate::model::{Dirty, Index};
use crate::program::Programmer;
use crate::source::{Batch, Event};
use dataplane_core::status::by_label;

/// Conntrack lifetimes without traffic, by state (as Cilium's defaults).
const CT_TCP_OPEN: Duration = Duration::from_secs(6 * 3600);
const CT_TCP_CLOSING: Duration = Duration::from_secs(10);
const CT_UDP: Duration = Duration::from_secs(60);
/// How often the datapath's clock advances, and how often conntrack is swept.
const CLOCK_TICK: Duration = Duration::from_millis(250);
const GC_PERIOD: Duration = Duration::from_secs(10);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub source: Source,
    pub status_file: Option<PathBuf>,
    pub poll: Duration,
    /// Where `/healthz`, `/readyz` and `/metrics` are served; `None` serves nothing.
    pub http_bind: Option<std::net::SocketAddr>,
    /// A directory on a bpffs: conntrack and links are pinned there and survive restarts.
    pub bpffs: Option<PathBuf>,
}

/// Where the objects come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// A directory of YAML manifests, polled.
    Manifests(PathBuf),
    /// The Kubernetes API: a kubeconfig file, or the in-cluster configuration when `None`.
    Kubernetes { kubeconfig: Option<PathBuf> },
}

/// The agent's state.
pub struct Agent {
    node: String,
    index: Index,
    programmer: Programmer,
    datapath: Datapath,
    generation: u64,
    fingerprint: Option<u64>,
    errors: BTreeMap<&'static str, u64>,
    sync_latency: Histogram,
    conntrack_entries: u64,
    interfaces_synced: bool,
    drops: BTreeMap<&'static str, u64>,
    service_stats: HashMap<u16, SvcStats>,
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
            errors: BTreeMap::new(),
            sync_latency: Histogram::default(),
            conntrack_entries: 0,
            interfaces_synced: false,
            drops: BTreeMap::new(),
            service_stats: HashMap::new(),
        }
    }

    /// Applies one batch: index, then the services it dirtied, then interfaces if pods changed.
    pub fn apply(&mut self, batch: Batch) {
        for w in &batch.warnings {
            warn!("{w}");
        }
        self.count_errors("malformed_object", batch.warnings.len());
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
            for problem in &report.problems {
                let label = problem.metric_label();
                warn!(service = %svc, label, "{problem}");
                self.count_errors(label, 1);
            }
            ops += report.ops;
        }
        self.generation += 1;
        if dirty.pods || self.generation == 1 {
            self.sync_interfaces();
        }
        self.fingerprint = Some(batch.fingerprint);
        self.sync_latency
            .observe(batch.received.elapsed().as_secs_f64());
        info!(
            generation = self.generation,
            services = dirty.services.len(),
            map_writes = ops,
            "programmed"
        );
    }

    /// Attaches to the interfaces of local pods and detaches from the ones gone. Nothing is
    /// attached before the first batch is programmed: a program swapped into a link pinned by an
    /// earlier agent must find complete maps.
    pub fn sync_interfaces(&mut self) {
        if self.generation == 0 {
            return;
        }
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
        let first = !self.interfaces_synced;
        self.interfaces_synced = true;
        for (iface, ips) in wanted {
            let Some(idx) = ifindex(&iface) else {
                continue;
            };
            match self.datapath.attach(&iface, idx) {
                Ok(true) => info!(%iface, pods = ?ips, "attached"),
                Ok(false) => {}
                Err(e) => {
                    warn!(%iface, "attach failed: {e:#}");
                    self.count_errors("attach", 1);
                }
            }
        }
        if first {
            for link in self.datapath.unpin_stale() {
                info!(%link, "unpinned a link left for an interface that is gone");
            }
        }
    }

    /// Advances the datapath's clock (conntrack timestamps).
    pub fn tick_clock(&mut self) {
        if let Err(e) = self.datapath.tick_clock() {
            self.count_errors("clock", 1);
            warn!("{e:#}");
        }
    }

    /// Removes conntrack entries idle past their state's lifetime.
    pub fn gc_conntrack(&mut self) {
        let now = crate::datapath::monotonic_ns();
        let entries = match self.datapath.conntrack_entries() {
            Ok(e) => e,
            Err(e) => {
                warn!("cannot read conntrack: {e:#}");
                return;
            }
        };
        let mut removed = 0;
        self.conntrack_entries = entries.len() as u64;
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
        self.conntrack_entries -= removed;
        debug!(removed, "conntrack swept");
    }

    fn count_errors(&mut self, label: &'static str, n: usize) {
        if n > 0 {
            *self.errors.entry(label).or_default() += n as u64;
        }
    }

    /// Reads the per-CPU traffic counters from the kernel (one map lookup per frontend); done once
    /// a second, not per batch, so programming a change never waits on thousands of lookups.
    pub fn refresh_counters(&mut self) {
        self.drops = self
            .datapath
            .drops()
            .unwrap_or_default()
            .into_iter()
            .map(|(r, n)| (r.label(), n))
            .collect();
        self.service_stats = self
            .programmer
            .frontends()
            .filter_map(|(_, spec)| self.programmer.rev_nat_id(&spec.frontend))
            .filter_map(|id| Some((id, self.datapath.service_stats(id).ok()?)))
            .collect();
    }

    /// The current status, with the counters as last refreshed.
    #[must_use]
    pub fn status(&self) -> Status {
        let (frontends, backends) = self.programmer.sizes();
        let mut service_entries = 0;
        let services = self
            .programmer
            .frontends()
            .map(|(svc, spec)| {
                service_entries += 1 + spec.backends.len() as u64;
                let stats = self
                    .programmer
                    .rev_nat_id(&spec.frontend)
                    .and_then(|id| self.service_stats.get(&id).copied())
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
        let usage = |entries: u64, capacity: u32| MapUsage {
            entries,
            capacity: u64::from(capacity),
        };
        Status {
            node: self.node.clone(),
            generation: self.generation,
            fingerprint: self.fingerprint.map(|f| format!("{f:016x}")),
            objects: by_label(self.index.counts()),
            frontends,
            backends,
            maps: by_label([
                (
                    map_names::SERVICES,
                    usage(service_entries, MAX_SERVICE_ENTRIES),
                ),
                (map_names::BACKENDS, usage(backends as u64, MAX_BACKENDS)),
                (
                    map_names::CONNTRACK,
                    usage(self.conntrack_entries, MAX_CONNTRACK),
                ),
            ]),
            interfaces: self.datapath.attached().map(str::to_owned).collect(),
            errors: by_label(self.errors.clone()),
            drops: by_label(self.drops.clone()),
            sync_latency: self.sync_latency.clone(),
            services,
        }
    }
}

/// Writes the status file atomically (temporary file, then rename).
fn write_status(path: &std::path::Path, status: &Status) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(status)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Publishes the status to the HTTP endpoints and writes the status file if one is configured; a
/// failure to write is logged, the agent goes on.
fn report(path: Option<&std::path::Path>, agent: &Agent, tx: &watch::Sender<Arc<Status>>) {
    let status = Arc::new(agent.status());
    if let Some(path) = path
        && let Err(e) = write_status(path, &status)
    {
        warn!("cannot write status: {e:#}");
    }
    tx.send_replace(status);
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
                    received: Instant::now(),
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
    let datapath = Datapath::load_object(crate::ebpf::OBJECT, config.bpffs.as_deref())?;
    let mut agent = Agent::new(config.node_name.clone(), datapath);
    info!(node = %config.node_name, source = ?config.source, "agent started");

    let (status_tx, status_rx) = watch::channel(Arc::new(agent.status()));
    if let Some(addr) = config.http_bind {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the HTTP endpoints to {addr}"))?;
        info!(%addr, "serving /healthz, /readyz, /metrics");
        tokio::spawn(crate::http::serve(listener, status_rx));
    }
    let (tx, mut rx) = mpsc::channel(16);
    match &config.source {
        Source::Manifests(dir) => {
            tokio::spawn(watch_manifests(dir.clone(), config.poll, tx));
        }
        Source::Kubernetes { kubeconfig } => {
            let client = crate::kube_source::client(kubeconfig.clone()).await?;
            tokio::spawn(crate::kube_source::run(client, tx));
        }
    }
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    let mut clock = tokio::time::interval(CLOCK_TICK);
    // Not at once: the clock may have stood still while no agent ran, so live connections get a
    // few ticks to refresh their entries before idleness is judged.
    let mut gc = tokio::time::interval_at(tokio::time::Instant::now() + GC_PERIOD, GC_PERIOD);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(batch) = rx.recv() => {
                agent.apply(batch);
                report(config.status_file.as_deref(), &agent, &status_tx);
            }
            _ = every_second.tick() => {
                agent.sync_interfaces();
                agent.refresh_counters();
                report(config.status_file.as_deref(), &agent, &status_tx);
            }
            _ = clock.tick() => agent.tick_clock(),
            _ = gc.tick() => agent.gc_conntrack(),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("agent stopping");
    Ok(())
}
