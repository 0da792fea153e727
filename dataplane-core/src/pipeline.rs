//! The agent's pure half: source batches into the index, the dirty targets through the reconciler
//! into a [`MapWriter`] (the kernel maps in the agent, a [`crate::maps::MapState`] in tests), and
//! the status it reports. The edges (kernel maps, interfaces, clock, logs) stay in the agent.
//!
//! ```text
//!  Batch --events--> Index --Dirty--> Reconciler --Ops--> MapWriter
//!        --warnings, problems----------------------------> Applied (the agent logs and counts)
//! ```
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use dataplane_common::{
    EP_DENY_ALL, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, MAX_BACKENDS, MAX_CONNTRACK,
    MAX_POLICY_ENDPOINTS, MAX_POLICY_IDS, MAX_POLICY_RULES, MAX_SERVICE_ENTRIES, MAX_SNAT,
    PolicyCounters, SvcStats, map_names,
};

use crate::index::{Dirty, Index, Target};
use crate::object::NsName;
use crate::policy_maps::{PolicyMaps, PolicySync};
use crate::reconcile::{MapWriter, NodePortAddresses, Reconciler, SyncProblem, SyncReport};
use crate::source::{Batch, Event, SourceWarning};
use crate::status::{Histogram, MapUsage, PolicyEndpointStatus, ServiceStatus, Status, by_label};
use crate::translate::{HealthCheck, health_check};

/// What applying one batch did.
#[derive(Debug)]
pub struct Applied {
    pub dirty: Dirty,
    /// Map writes made.
    pub ops: usize,
    pub warnings: Vec<SourceWarning>,
    pub problems: Vec<SyncProblem>,
    /// When the source saw the change: the start of the sync-latency measurement.
    pub received: Instant,
}

/// What only the kernel knows, read by the agent for a status report.
#[derive(Debug, Default)]
pub struct KernelReadings<'a> {
    pub interfaces: Vec<String>,
    pub cgroups: Vec<String>,
    pub drops: BTreeMap<&'static str, u64>,
    pub service_stats: Option<&'a HashMap<u16, SvcStats>>,
    pub conntrack_entries: u64,
    pub snat_entries: u64,
    /// Per policy endpoint id: new flows admitted and denied, ingress then egress.
    pub policy_counters: Option<&'a HashMap<u16, [PolicyCounters; 2]>>,
}

/// The index, the reconciler, and the counters a status reports.
#[derive(Debug, Default)]
pub struct Pipeline {
    pub index: Index,
    pub reconciler: Reconciler,
    generation: u64,
    fingerprint: Option<u64>,
    errors: BTreeMap<&'static str, u64>,
    sync_latency: Histogram,
    /// Health checks of this node's Services that have one, kept per dirty Service.
    health_checks: BTreeMap<NsName, HealthCheck>,
}

impl Pipeline {
    /// The pipeline of node `node`, its NodePorts answering on `nodeport_addresses`.
    #[must_use]
    pub fn for_node(node: &str, nodeport_addresses: NodePortAddresses) -> Self {
        Self {
            reconciler: Reconciler::for_node(node, nodeport_addresses),
            ..Self::default()
        }
    }

    /// The health check node ports this node serves, by port (one Service per port: the API
    /// server allocates them uniquely; a duplicate keeps the first Service by name).
    #[must_use]
    pub fn health_checks(&self) -> BTreeMap<u16, HealthCheck> {
        let mut out = BTreeMap::new();
        for h in self.health_checks.values() {
            out.entry(h.port).or_insert_with(|| h.clone());
        }
        out
    }

    /// Re-derives the health checks of the Services a batch dirtied (a Service's health check
    /// depends on it and its EndpointSlices only), so a batch costs what it changed.
    fn update_health_checks(&mut self, dirty: &Dirty) {
        let Some(node) = self.reconciler.node().map(str::to_owned) else {
            return;
        };
        for name in dirty.services() {
            let check = self
                .index
                .services
                .get(name)
                .and_then(|svc| health_check(svc, &self.index.slices_of(name), &node));
            match check {
                Some(h) => {
                    self.health_checks.insert(name.clone(), h);
                }
                None => {
                    self.health_checks.remove(name);
                }
            }
        }
    }

    /// Records the node's interface addresses; NodePorts that move with them are rewritten.
    pub fn set_local_addresses(
        &mut self,
        addrs: Vec<std::net::Ipv4Addr>,
        writer: &mut dyn MapWriter,
    ) -> SyncReport {
        if !self.reconciler.set_local_addresses(addrs) {
            return SyncReport::default();
        }
        let mut dirty = Dirty::default();
        if let Some(node) = self.reconciler.node() {
            dirty.insert(Target::Node(node.to_owned()));
        }
        let report = self.reconciler.sync(&self.index, &dirty, writer);
        for problem in &report.problems {
            self.count_error(problem.metric_label(), 1);
        }
        report
    }

    /// Applies one batch: index, then every target it dirtied. Warnings and problems are counted
    /// by their metric label and returned for the caller to log.
    pub fn apply(&mut self, batch: Batch, writer: &mut dyn MapWriter) -> Applied {
        for w in &batch.warnings {
            self.count_error(w.metric_label(), 1);
        }
        let mut dirty = Dirty::default();
        for event in batch.events {
            dirty.merge(match event {
                Event::Apply(obj) => self.index.apply(obj),
                Event::Delete(key) => self.index.delete(&key),
            });
        }
        let report = self.reconciler.sync(&self.index, &dirty, writer);
        for problem in &report.problems {
            self.count_error(problem.metric_label(), 1);
        }
        self.update_health_checks(&dirty);
        self.generation += 1;
        self.fingerprint = Some(batch.fingerprint);
        Applied {
            dirty,
            ops: report.ops,
            warnings: batch.warnings,
            problems: report.problems,
            received: batch.received,
        }
    }

    /// Records how long a batch took from the source seeing it to the node being programmed.
    pub fn observe_latency(&mut self, received: Instant) {
        self.sync_latency.observe(received.elapsed().as_secs_f64());
    }

    /// Batches programmed so far.
    #[must_use]
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn count_error(&mut self, label: &'static str, n: usize) {
        if n > 0 {
            *self.errors.entry(label).or_default() += n as u64;
        }
    }

    /// The enforced local pods, by name, with their counters.
    fn policy_status(
        &self,
        counters: Option<&HashMap<u16, [PolicyCounters; 2]>>,
    ) -> Vec<PolicyEndpointStatus> {
        let Some(sync) = self.reconciler.policy() else {
            return Vec::new();
        };
        let names: HashMap<std::net::Ipv4Addr, &NsName> = self
            .index
            .pods
            .iter()
            .filter_map(|(id, p)| Some((p.status.as_ref()?.pod_ip.as_ref()?.parse().ok()?, id)))
            .collect();
        let mut out: Vec<PolicyEndpointStatus> = sync
            .programmed()
            .endpoints
            .iter()
            .map(|(addr, ep)| {
                let address = std::net::Ipv4Addr::from(addr.to_ne_bytes());
                let [ingress, egress] = counters
                    .and_then(|c| c.get(&u16::from_be(ep.endpoint)).copied())
                    .unwrap_or_default();
                PolicyEndpointStatus {
                    pod: names
                        .get(&address)
                        .map_or_else(|| address.to_string(), ToString::to_string),
                    address: address.to_string(),
                    ingress_isolated: ep.flags & EP_INGRESS_ISOLATED != 0,
                    egress_isolated: ep.flags & EP_EGRESS_ISOLATED != 0,
                    fail_closed: ep.flags & EP_DENY_ALL != 0,
                    ingress_allowed: ingress.allowed,
                    ingress_denied: ingress.denied,
                    egress_allowed: egress.allowed,
                    egress_denied: egress.denied,
                }
            })
            .collect();
        out.sort_by(|a, b| a.pod.cmp(&b.pod));
        out
    }

    /// The status of `node`, with what the kernel reported.
    #[must_use]
    pub fn status(&self, node: &str, kernel: KernelReadings<'_>) -> Status {
        let empty = PolicyMaps::default();
        let policy = self.reconciler.policy().map_or(&empty, PolicySync::maps);
        let (frontends, backends) = self.reconciler.sizes();
        let mut service_entries = 0;
        let services = self
            .reconciler
            .frontends()
            .map(|(svc, spec)| {
                service_entries += 1 + spec.backends.len() as u64;
                let stats = self
                    .reconciler
                    .rev_nat_id(&spec.frontend)
                    .and_then(|id| kernel.service_stats?.get(&id).copied())
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
                    flows: stats.flows,
                }
            })
            .collect();
        let usage = |entries: u64, capacity: u32| MapUsage {
            entries,
            capacity: u64::from(capacity),
        };
        Status {
            node: node.to_owned(),
            generation: self.generation,
            last_programmed: None,
            external_interfaces: Vec::new(),
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
                    usage(kernel.conntrack_entries, MAX_CONNTRACK),
                ),
                (map_names::SNAT, usage(kernel.snat_entries, MAX_SNAT)),
                (
                    map_names::POLICY_IDS,
                    usage(policy.ids.len() as u64, MAX_POLICY_IDS),
                ),
                (
                    map_names::POLICY_EP,
                    usage(policy.endpoints.len() as u64, MAX_POLICY_ENDPOINTS),
                ),
                (
                    map_names::POLICY,
                    usage(policy.rules.len() as u64, MAX_POLICY_RULES),
                ),
            ]),
            interfaces: kernel.interfaces,
            cgroups: kernel.cgroups,
            pod_translation: None,
            errors: by_label(self.errors.clone()),
            drops: by_label(kernel.drops),
            sync_latency: self.sync_latency.clone(),
            services,
            policy: self.policy_status(kernel.policy_counters),
        }
    }
}
