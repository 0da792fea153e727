//! The agent's edges around the pure [`Pipeline`]: batches go through it into the kernel maps;
//! interfaces follow local pods; the clock advances; conntrack is swept; a status file reports
//! what is programmed.
//!
//! ```text
//!  source task --Batch--> Pipeline (index -> dirty targets -> reconciler) --Ops--> Datapath
//!                                      dirty pods / every second -> attach/detach pod interfaces
//!                                      every second -> status file (generation, fingerprint, counters)
//! ```
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use dataplane_common::{
    CT_DIR_SERVICE, CT_FLAG_CLOSING, CT_FLAG_SNAT, CtKey, CtValue, POLICY_DIR_EGRESS,
    POLICY_DIR_INGRESS, PROTO_TCP, PolicyCounters, SvcStats,
};
use dataplane_core::index::Target;
use dataplane_core::pipeline::{KernelReadings, Pipeline};
use dataplane_core::reconcile::NodePortAddresses;
use dataplane_core::source::Batch;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::datapath::{CtTable, Datapath};
use crate::explain::{self, FlowLog, FlowLogFormat};
use crate::health::HealthCheckServers;
use crate::interfaces::{ifindex, local_addresses, local_pod_ips, parse_routes, pod_interfaces};
use crate::manifests::ManifestSource;
use crate::metrics::Status;

/// Conntrack lifetimes without traffic, by state (as Cilium's defaults).
const CT_TCP_OPEN: Duration = Duration::from_secs(6 * 3600);
const CT_TCP_CLOSING: Duration = Duration::from_secs(10);
const CT_UDP: Duration = Duration::from_secs(60);
/// How often the datapath's clock advances, and how often conntrack is swept.
const CLOCK_TICK: Duration = Duration::from_millis(250);
const GC_PERIOD: Duration = Duration::from_secs(10);
/// Source ports for external traffic to remote backends: above Linux's default ephemeral range
/// (32768-60999), so they never collide with the node's own connections.
pub const DEFAULT_SNAT_PORTS: (u16, u16) = (61000, 65535);

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub source: Source,
    pub status_file: Option<PathBuf>,
    pub poll: Duration,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (loopback); `None` serves nothing.
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// Where kube-proxy's node `/healthz` and `/livez` are served (reachable by load balancers).
    pub healthz_bind: Option<std::net::SocketAddr>,
    /// A directory on a bpffs: conntrack and links are pinned there and survive restarts.
    pub bpffs: Option<PathBuf>,
    /// The cgroup v2 directory the socket hooks go on (node processes reach Services there).
    pub socket_cgroup: Option<PathBuf>,
    /// The node's external interfaces: NodePort, LoadBalancer and externalIP traffic from
    /// outside arrives there (XDP).
    pub external_interfaces: Vec<String>,
    /// Where NodePorts answer.
    pub nodeport_addresses: NodePortAddresses,
    /// Source ports for external traffic to remote backends (inclusive).
    pub snat_ports: (u16, u16),
    /// XDP in the driver where it has it (else generic).
    pub xdp_mode_native: bool,
    /// How pods' connections to Services are translated.
    pub pod_translation: PodTranslation,
    /// Where policy verdict events go, and how they are written.
    pub flow_log: Option<PathBuf>,
    pub flow_log_format: FlowLogFormat,
}

/// How pods' connections to Services are translated (see ARCHITECTURE.md for the measurement
/// that chose the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodTranslation {
    /// At connect()/sendmsg(), by the socket hooks on the node's cgroup (which must hold the
    /// pods): established flows pay no translation per packet; TC translates what no hook saw.
    Socket,
    /// Per packet, by TC on each pod's interface.
    Tc,
}

impl PodTranslation {
    /// The name the flag and the status use.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Socket => "socket",
            Self::Tc => "tc",
        }
    }
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
    socket_cgroup: Option<PathBuf>,
    pod_translation: PodTranslation,
    external_interfaces: Vec<String>,
    snat_ports: (u16, u16),
    xdp_native: bool,
    pipeline: Pipeline,
    datapath: Datapath,
    conntrack_entries: u64,
    snat_entries: u64,
    interfaces_synced: bool,
    drops: BTreeMap<&'static str, u64>,
    service_stats: HashMap<u16, SvcStats>,
    health_checks: HealthCheckServers,
    last_programmed: Option<String>,
    flow_log: FlowLog,
    policy_counters: HashMap<u16, [PolicyCounters; 2]>,
}

impl Agent {
    #[must_use]
    pub fn new(node: String, datapath: Datapath, nodeport_addresses: NodePortAddresses) -> Self {
        Self {
            pipeline: Pipeline::for_node(&node, nodeport_addresses),
            node,
            socket_cgroup: None,
            pod_translation: PodTranslation::Tc,
            external_interfaces: Vec::new(),
            snat_ports: DEFAULT_SNAT_PORTS,
            xdp_native: true,
            datapath,
            conntrack_entries: 0,
            snat_entries: 0,
            interfaces_synced: false,
            drops: BTreeMap::new(),
            service_stats: HashMap::new(),
            health_checks: HealthCheckServers::default(),
            last_programmed: None,
            flow_log: FlowLog::disabled(),
            policy_counters: HashMap::new(),
        }
    }

    /// Writes policy verdict events to `log`.
    #[must_use]
    pub fn with_flow_log(mut self, log: FlowLog) -> Self {
        self.flow_log = log;
        self
    }

    /// Moves the verdict events the datapath wrote into the flow log.
    pub fn drain_flow_events(&mut self) {
        explain::drain(
            &mut self.datapath,
            &self.pipeline,
            &self.node,
            &mut self.flow_log,
        );
    }

    /// Explains one connection with this node's loaded programs (see [`explain`]).
    ///
    /// # Errors
    /// As [`explain::explain`].
    pub fn explain(&mut self, q: &explain::Query) -> anyhow::Result<explain::Explanation> {
        explain::explain(
            &mut self.datapath,
            &self.pipeline,
            &self.node,
            &mut self.flow_log,
            q,
        )
    }

    /// Applies one batch through the pipeline into the kernel maps, then re-scans interfaces if
    /// pods changed.
    pub fn apply(&mut self, batch: Batch) {
        let applied = self.pipeline.apply(batch, &mut self.datapath);
        for w in &applied.warnings {
            let object = w.object().map(ToString::to_string);
            warn!(object, label = w.metric_label(), "{w}");
        }
        for problem in &applied.problems {
            let label = problem.metric_label();
            warn!(object = %problem.object(), label, "{problem}");
        }
        if applied.dirty.contains(&Target::Pods) || self.pipeline.generation() == 1 {
            self.sync_interfaces();
        }
        self.last_programmed = Some(k8s_openapi::jiff::Timestamp::now().to_string());
        self.sync_health_checks();
        self.pipeline.observe_latency(applied.received);
        info!(
            generation = self.pipeline.generation(),
            services = applied.dirty.services().count(),
            map_writes = applied.ops,
            "programmed"
        );
    }

    /// Attaches to these external interfaces once the first batch is programmed, and source-NATs
    /// with these ports.
    #[must_use]
    pub fn with_external(
        mut self,
        interfaces: Vec<String>,
        snat_ports: (u16, u16),
        xdp_native: bool,
    ) -> Self {
        self.external_interfaces = interfaces;
        self.snat_ports = snat_ports;
        self.xdp_native = xdp_native;
        self
    }

    /// Attaches to the configured external interfaces (a failure is counted and retried every
    /// second; an interface is attached whole or not at all), keeps the source-NAT address on
    /// the Node's first InternalIP, and follows the node's addresses for NodePorts.
    fn sync_external(&mut self) {
        for iface in self.external_interfaces.clone() {
            let Some(idx) = ifindex(&iface) else {
                warn!(%iface, "external interface not found");
                self.pipeline.count_error("attach", 1);
                continue;
            };
            // Source-NATed packets (and their replies, from a frontend on this node) carry one of
            // the node's own addresses as source; when XDP cannot send them out itself (the next
            // hop's MAC is not resolved yet) the kernel forwards them, which it does only with
            // accept_local.
            let sysctl = format!("/proc/sys/net/ipv4/conf/{iface}/accept_local");
            if !self.datapath.external().any(|(i, _)| i == iface)
                && let Err(e) = std::fs::write(&sysctl, "1")
            {
                warn!(%iface, error = %e, "cannot set {sysctl}: until the next hop's MAC is known, source-NATed packets are dropped");
                self.pipeline.count_error("sysctl", 1);
            }
            match self.datapath.attach_external(&iface, idx, self.xdp_native) {
                Ok(Some(mode)) => info!(%iface, ?mode, "external interface attached"),
                Ok(None) => {}
                Err(e) => {
                    warn!(%iface, error = %format_args!("{e:#}"), "external interface not attached");
                    self.pipeline.count_error("attach", 1);
                }
            }
        }
        if let Some(addr) = self.pipeline.index.node_internal_ips(&self.node).first() {
            match self.datapath.set_snat(*addr, self.snat_ports) {
                Ok(true) => info!(%addr, ports = ?self.snat_ports, "source NAT address set"),
                Ok(false) => {}
                Err(e) => {
                    warn!(error = %format_args!("{e:#}"), "cannot set the source NAT address");
                    self.pipeline.count_error("map_write", 1);
                }
            }
        }
        if self.pipeline.reconciler.follows_local_addresses() {
            let report = self
                .pipeline
                .set_local_addresses(local_addresses(), &mut self.datapath);
            for problem in &report.problems {
                warn!(object = %problem.object(), label = problem.metric_label(), "{problem}");
            }
        }
    }

    /// Serves this node's health check node ports as the index says (a port that cannot be
    /// bound is counted and retried).
    pub fn sync_health_checks(&mut self) {
        for (port, e) in self.health_checks.sync(&self.pipeline.health_checks()) {
            warn!(port, error = %e, "cannot serve a health check node port");
            self.pipeline.count_error("health_check_bind", 1);
        }
    }

    /// Puts the socket hooks on `cgroup` once the first batch is programmed; with
    /// `PodTranslation::Socket` they translate the pods' sockets too once attached.
    #[must_use]
    pub fn with_socket_cgroup(
        mut self,
        cgroup: Option<PathBuf>,
        pod_translation: PodTranslation,
    ) -> Self {
        self.socket_cgroup = cgroup;
        self.pod_translation = pod_translation;
        self
    }

    /// Attaches the socket hooks to the configured cgroup, once, after the first batch is
    /// programmed (a hook must find complete maps); a failure is retried every second.
    fn sync_cgroup(&mut self) {
        let Some(cgroup) = self.socket_cgroup.clone() else {
            return;
        };
        match self.datapath.attach_cgroup(&cgroup) {
            Ok(true) => {
                info!(cgroup = %cgroup.display(), pods = self.pod_translation.name(), "socket hooks attached");
                if self.pod_translation == PodTranslation::Socket
                    && let Err(e) = self.datapath.set_socket_pods(true)
                {
                    warn!(error = %format_args!("{e:#}"), "pods stay translated by TC");
                    self.pipeline.count_error("map_write", 1);
                }
            }
            Ok(false) => {}
            Err(e) => {
                warn!(cgroup = %cgroup.display(), error = %format_args!("{e:#}"), "socket hooks not attached");
                self.pipeline.count_error("attach", 1);
            }
        }
    }

    /// Attaches to the interfaces of local pods and detaches from the ones gone. Nothing is
    /// attached before the first batch is programmed: a program swapped into a link pinned by an
    /// earlier agent must find complete maps.
    pub fn sync_interfaces(&mut self) {
        if self.pipeline.generation() == 0 {
            return;
        }
        self.sync_cgroup();
        self.sync_external();
        let routes = match std::fs::read_to_string("/proc/net/route") {
            Ok(t) => parse_routes(&t),
            Err(e) => {
                warn!(error = %e, "cannot read routes");
                return;
            }
        };
        let wanted = pod_interfaces(&routes, &local_pod_ips(&self.pipeline.index, &self.node));
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
                    warn!(%iface, error = %format_args!("{e:#}"), "attach failed");
                    self.pipeline.count_error("attach", 1);
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
            self.pipeline.count_error("clock", 1);
            warn!(error = %format_args!("{e:#}"), "cannot advance the datapath clock");
        }
    }

    /// Removes conntrack entries idle past their state's lifetime, then source-NAT claims idle
    /// past theirs, or past the closing lifetime once their connection's forward entry is gone
    /// (evicted, or swept): the port is free again.
    pub fn gc_conntrack(&mut self) {
        let now = crate::datapath::monotonic_ns();
        let (entries, claims) = match (
            self.datapath.conntrack_entries(),
            self.datapath.snat_entries(),
        ) {
            (Ok(e), Ok(c)) => (e, c),
            (Err(e), _) | (_, Err(e)) => {
                warn!(error = %format_args!("{e:#}"), "cannot read conntrack");
                return;
            }
        };
        let expired = |k: &CtKey, v: &CtValue, orphan: bool| {
            let lifetime = match (k.proto, v.flags & CT_FLAG_CLOSING != 0 || orphan) {
                (PROTO_TCP, true) => CT_TCP_CLOSING,
                (PROTO_TCP, false) => CT_TCP_OPEN,
                _ => CT_UDP,
            };
            u128::from(now.saturating_sub(v.last_seen_ns)) > lifetime.as_nanos()
        };
        // The forward entries of source-NATed flows still there: a claim without one is an orphan.
        let mut live = std::collections::HashSet::new();
        let mut removed = 0;
        for (k, v) in &entries {
            if expired(k, v, false) && self.datapath.remove_tracked(CtTable::Conntrack, k).is_ok() {
                removed += 1;
            } else if v.flags & CT_FLAG_SNAT != 0 {
                live.insert(*k);
            }
        }
        self.conntrack_entries = entries.len() as u64 - removed;
        let mut freed = 0;
        for (k, v) in &claims {
            let forward = CtKey {
                saddr: v.snat_addr,
                daddr: v.nat_addr,
                sport: v.snat_port,
                dport: v.nat_port,
                proto: k.proto,
                dir: CT_DIR_SERVICE,
                pad: 0,
            };
            if expired(k, v, !live.contains(&forward))
                && self.datapath.remove_tracked(CtTable::Snat, k).is_ok()
            {
                freed += 1;
            }
        }
        self.snat_entries = claims.len() as u64 - freed;
        debug!(removed, freed, "conntrack swept");
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
        let reconciler = &self.pipeline.reconciler;
        self.service_stats = reconciler
            .frontends()
            .filter_map(|(_, spec)| reconciler.rev_nat_id(&spec.frontend))
            .filter_map(|id| Some((id, self.datapath.service_stats(id).ok()?)))
            .collect();
        let endpoints: Vec<u16> = reconciler.policy().map_or_else(Vec::new, |p| {
            p.programmed()
                .endpoints
                .values()
                .map(|e| u16::from_be(e.endpoint))
                .collect()
        });
        self.policy_counters = endpoints
            .into_iter()
            .filter_map(|ep| {
                let ingress = self.datapath.policy_counters(ep, POLICY_DIR_INGRESS).ok()?;
                let egress = self.datapath.policy_counters(ep, POLICY_DIR_EGRESS).ok()?;
                Some((ep, [ingress, egress]))
            })
            .collect();
    }

    /// The current status, with the counters as last refreshed.
    #[must_use]
    pub fn status(&self) -> Status {
        let mut status = self.pipeline.status(
            &self.node,
            KernelReadings {
                interfaces: self.datapath.attached().map(str::to_owned).collect(),
                cgroups: self
                    .datapath
                    .cgroup()
                    .map(|c| c.display().to_string())
                    .into_iter()
                    .collect(),
                drops: self.drops.clone(),
                service_stats: Some(&self.service_stats),
                conntrack_entries: self.conntrack_entries,
                snat_entries: self.snat_entries,
                policy_counters: Some(&self.policy_counters),
            },
        );
        status.last_programmed.clone_from(&self.last_programmed);
        status.pod_translation = Some(
            if self.datapath.socket_pods() {
                PodTranslation::Socket
            } else {
                PodTranslation::Tc
            }
            .name()
            .to_owned(),
        );
        status.external_interfaces = self
            .datapath
            .external()
            .map(|(i, m)| format!("{i} (XDP {m:?})"))
            .collect();
        status
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
        warn!(error = %format_args!("{e:#}"), "cannot write status");
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
                    warn!(dir = %dir.display(), error = %msg, "cannot scan manifests, keeping what is programmed");
                    last_error = Some(msg);
                }
            }
        }
    }
}

/// Source-NAT ports must lie outside the node's ephemeral range, or a reply to the node's own
/// connection could be taken for a source-NATed flow's.
fn check_snat_ports((lo, hi): (u16, u16)) -> anyhow::Result<()> {
    let (eph_lo, eph_hi) = crate::interfaces::ephemeral_ports()?;
    if lo > hi {
        anyhow::bail!("--snat-ports {lo}-{hi}: the first port is above the last");
    }
    if lo <= eph_hi && eph_lo <= hi {
        anyhow::bail!(
            "--snat-ports {lo}-{hi} overlaps this node's ephemeral ports {eph_lo}-{eph_hi} \
             (net.ipv4.ip_local_port_range): choose a range outside it"
        );
    }
    Ok(())
}

/// Runs the agent until SIGINT or SIGTERM.
///
/// # Errors
/// The eBPF object could not be loaded.
pub async fn run(config: Config) -> anyhow::Result<()> {
    check_snat_ports(config.snat_ports)?;
    let datapath = Datapath::load_object(crate::ebpf::OBJECT, config.bpffs.as_deref())?;
    let agent = Agent::new(
        config.node_name.clone(),
        datapath,
        config.nodeport_addresses.clone(),
    )
    .with_socket_cgroup(config.socket_cgroup.clone(), config.pod_translation)
    .with_external(
        config.external_interfaces.clone(),
        config.snat_ports,
        config.xdp_mode_native,
    );
    let mut agent = agent.with_flow_log(FlowLog::open(
        config.flow_log.as_ref(),
        config.flow_log_format,
    )?);
    info!(node = %config.node_name, source = ?config.source, "agent started");
    let (explain_tx, mut explain_rx) = mpsc::channel::<crate::http::ExplainRequest>(4);

    let (status_tx, status_rx) = watch::channel(Arc::new(agent.status()));
    if let Some(addr) = config.metrics_bind {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        info!(%addr, "serving /healthz, /readyz, /metrics");
        tokio::spawn(crate::http::serve(
            listener,
            status_rx.clone(),
            explain_tx.clone(),
        ));
    }
    if let Some(addr) = config.healthz_bind {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the healthz address {addr}"))?;
        info!(%addr, "serving kube-proxy's /healthz and /livez");
        tokio::spawn(crate::http::serve_with(
            listener,
            status_rx,
            crate::http::respond_node,
        ));
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
                agent.sync_health_checks();
                agent.refresh_counters();
                report(config.status_file.as_deref(), &agent, &status_tx);
            }
            _ = clock.tick() => {
                agent.tick_clock();
                agent.drain_flow_events();
            }
            Some((query, reply)) = explain_rx.recv() => {
                let _ = reply.send(agent.explain(&query).map_err(|e| format!("{e:#}")));
            }
            _ = gc.tick() => agent.gc_conntrack(),
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("agent stopping");
    Ok(())
}
