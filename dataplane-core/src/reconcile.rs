//! The reconciler: for each dirty target, re-derive its entries from the index, diff them against
//! what that target has in the maps, and write only the difference.
//!
//! ```text
//!  dirty service --translate--> FrontendSpecs --ids--> new entries --+
//!  programmed[service] ---------------------------------> old entries --diff--> ops --> MapWriter
//! ```
//!
//! Reverse-NAT ids (one per frontend) and backend ids (one per backend address, shared by every
//! service that uses it, reference-counted) are allocated here and stay stable while in use, so an
//! endpoint change rewrites one slot, not the service.
use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use dataplane_common::{MAX_BACKENDS, MAX_REV_NAT_IDS};

use crate::index::{Dirty, Index, Target};
use crate::maps::{MapState, Op, backend_value, diff, service_entries};
use crate::net::{Cidr, CidrError};
use crate::object::NsName;
use crate::policy::PolicyProblem;
use crate::policy_maps::PolicySync;
use crate::table::IdPool;
use crate::translate::{
    BackendAddr, Frontend, FrontendSpec, NodeView, TranslateError, translate_service_on,
};

/// Where map writes go: the kernel maps, or a [`MapState`] in tests.
pub trait MapWriter {
    /// Applies one write.
    ///
    /// # Errors
    /// The write failed (for example, the map is full); the caller logs and counts it.
    fn write(&mut self, op: &Op) -> anyhow::Result<()>;
}

impl MapWriter for MapState {
    fn write(&mut self, op: &Op) -> anyhow::Result<()> {
        self.apply(std::slice::from_ref(op));
        Ok(())
    }
}

/// What a sync did, for logs and status.
#[derive(Debug, Default)]
pub struct SyncReport {
    pub ops: usize,
    pub problems: Vec<SyncProblem>,
}

impl SyncReport {
    fn merge(&mut self, other: SyncReport) {
        self.ops += other.ops;
        self.problems.extend(other.problems);
    }
}

/// Why a Service was not, or not wholly, programmed. Each names the Service; the agent logs it
/// and counts it by [`SyncProblem::metric_label`].
#[derive(Debug, thiserror::Error)]
pub enum SyncProblem {
    #[error("Service {service}: {message}")]
    Translation { service: NsName, message: String },
    #[error("Service {service} skipped, keeping what was programmed: {error}")]
    Skipped {
        service: NsName,
        error: TranslateError,
    },
    #[error("Service {service}: {frontend} is already served by Service {owner}, skipped")]
    FrontendTaken {
        service: NsName,
        frontend: Frontend,
        owner: NsName,
    },
    #[error("Service {service}: no reverse-NAT id left for {frontend}")]
    NoRevNatId { service: NsName, frontend: Frontend },
    #[error("Service {service}: backend table full")]
    BackendTableFull { service: NsName },
    #[error("Service {service}: map write failed: {op}: {error}")]
    MapWrite {
        service: NsName,
        op: String,
        error: String,
    },
    #[error("NetworkPolicy {0}")]
    Policy(PolicyProblem),
    #[error("NetworkPolicy maps: write failed, {} denied until it succeeds: {message}", pod.map_or_else(|| "every enforced pod".to_owned(), |p| format!("pod {p}")))]
    PolicyWrite {
        pod: Option<Ipv4Addr>,
        message: String,
    },
}

impl SyncProblem {
    /// The object it is about: a Service, a NetworkPolicy, or a pod whose policy failed closed.
    #[must_use]
    pub fn object(&self) -> String {
        match self {
            SyncProblem::Translation { service, .. }
            | SyncProblem::Skipped { service, .. }
            | SyncProblem::FrontendTaken { service, .. }
            | SyncProblem::NoRevNatId { service, .. }
            | SyncProblem::BackendTableFull { service }
            | SyncProblem::MapWrite { service, .. } => format!("Service {service}"),
            SyncProblem::Policy(p) => format!("NetworkPolicy {}", p.policy()),
            SyncProblem::PolicyWrite { pod, .. } => {
                pod.map_or_else(|| "NetworkPolicy maps".to_owned(), |p| format!("pod {p}"))
            }
        }
    }

    #[must_use]
    pub fn metric_label(&self) -> &'static str {
        match self {
            SyncProblem::Translation { .. } => "service_warning",
            SyncProblem::Skipped { error, .. } => error.metric_label(),
            SyncProblem::FrontendTaken { .. } => "frontend_conflict",
            SyncProblem::NoRevNatId { .. } => "rev_nat_ids_exhausted",
            SyncProblem::BackendTableFull { .. } => "backend_table_full",
            SyncProblem::MapWrite { .. } => "map_write",
            SyncProblem::Policy(_) => "policy_invalid",
            SyncProblem::PolicyWrite { .. } => "policy_map_write",
        }
    }
}

/// Where NodePorts answer, as kube-proxy's `--nodeport-addresses`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// The Node's InternalIPs (kube-proxy's `primary`, and its default since 1.31): the
    /// addresses other nodes and load balancers use.
    #[default]
    Primary,
    /// The node's own interface addresses inside these prefixes.
    Cidrs(Vec<Cidr>),
}

impl std::str::FromStr for NodePortAddresses {
    type Err = CidrError;

    /// `primary`, or comma-separated CIDRs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim() == "primary" {
            return Ok(NodePortAddresses::Primary);
        }
        s.split(',')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map(NodePortAddresses::Cidrs)
    }
}

/// Keeps the translation maps equal to what the index says, one service at a time.
#[derive(Clone, Debug)]
pub struct Reconciler {
    /// This node's name: its endpoints are local, and (with `Primary`) its Node's InternalIPs
    /// are where NodePorts answer. `None` (tests, the benchmark) programs no NodePort.
    node: Option<String>,
    nodeport_addresses: NodePortAddresses,
    /// The node's interface addresses (for `NodePortAddresses::Cidrs`), from the agent.
    local_addresses: Vec<Ipv4Addr>,
    programmed: BTreeMap<NsName, Vec<FrontendSpec>>,
    /// Which service owns each frontend; a second service claiming it is refused.
    owners: HashMap<Frontend, NsName>,
    rev_nat_ids: HashMap<Frontend, u16>,
    rev_nat_pool: IdPool,
    backend_ids: HashMap<BackendAddr, (u32, usize)>,
    backend_pool: IdPool,
    /// NetworkPolicy for this node's pods (a reconciler without a node enforces none).
    policy: Option<PolicySync>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self {
            node: None,
            nodeport_addresses: NodePortAddresses::Primary,
            local_addresses: Vec::new(),
            programmed: BTreeMap::new(),
            owners: HashMap::new(),
            rev_nat_ids: HashMap::new(),
            rev_nat_pool: IdPool::new(MAX_REV_NAT_IDS),
            backend_ids: HashMap::new(),
            backend_pool: IdPool::new(MAX_BACKENDS),
            policy: None,
        }
    }
}

impl Reconciler {
    /// A reconciler for node `node`, its NodePorts answering on `nodeport_addresses`.
    #[must_use]
    pub fn for_node(node: &str, nodeport_addresses: NodePortAddresses) -> Self {
        Self {
            node: Some(node.to_owned()),
            nodeport_addresses,
            policy: Some(PolicySync::new(node)),
            ..Self::default()
        }
    }

    /// Records the node's interface addresses; `true` when that moves NodePorts (the caller
    /// then syncs `Target::Node` of this node).
    pub fn set_local_addresses(&mut self, mut addrs: Vec<Ipv4Addr>) -> bool {
        addrs.sort();
        addrs.dedup();
        if addrs == self.local_addresses {
            return false;
        }
        self.local_addresses = addrs;
        self.follows_local_addresses()
    }

    /// Whether NodePorts follow the node's interface addresses (`--nodeport-addresses` CIDRs),
    /// so the caller has them to read.
    #[must_use]
    pub fn follows_local_addresses(&self) -> bool {
        matches!(self.nodeport_addresses, NodePortAddresses::Cidrs(_))
    }

    /// This node's name, if it has one.
    #[must_use]
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// What translation needs to know about this node.
    fn node_view(&self, index: &Index) -> NodeView {
        let Some(name) = &self.node else {
            return NodeView::default();
        };
        let nodeport_addresses = match &self.nodeport_addresses {
            NodePortAddresses::Primary => index.node_internal_ips(name),
            NodePortAddresses::Cidrs(cidrs) => self
                .local_addresses
                .iter()
                .filter(|a| cidrs.iter().any(|c| c.contains(**a)))
                .copied()
                .collect(),
        };
        NodeView {
            name: Some(name.clone()),
            nodeport_addresses,
        }
    }

    /// Number of frontends and backends currently programmed.
    #[must_use]
    pub fn sizes(&self) -> (usize, usize) {
        (self.rev_nat_ids.len(), self.backend_ids.len())
    }

    /// The reverse-NAT id of a programmed frontend.
    #[must_use]
    pub fn rev_nat_id(&self, frontend: &Frontend) -> Option<u16> {
        self.rev_nat_ids.get(frontend).copied()
    }

    /// The NetworkPolicy state of this node, if it enforces any.
    #[must_use]
    pub fn policy(&self) -> Option<&PolicySync> {
        self.policy.as_ref()
    }

    /// Every programmed frontend with its service, for reports.
    pub fn frontends(&self) -> impl Iterator<Item = (&NsName, &FrontendSpec)> {
        self.programmed
            .iter()
            .flat_map(|(svc, specs)| specs.iter().map(move |s| (svc, s)))
    }

    /// Re-derives every dirty target that lives in the maps and writes the difference. Pods are
    /// the edges' business (which interfaces carry the datapath), not the maps'.
    pub fn sync(&mut self, index: &Index, dirty: &Dirty, writer: &mut dyn MapWriter) -> SyncReport {
        let mut report = SyncReport::default();
        for target in dirty.iter() {
            match target {
                Target::Service(svc) => report.merge(self.sync_service(index, svc, writer)),
                // The local node's addresses changed: every NodePort moves with them.
                Target::Node(name) if self.node.as_ref() == Some(name) => {
                    let all: std::collections::BTreeSet<NsName> = index
                        .services
                        .keys()
                        .chain(self.programmed.keys())
                        .cloned()
                        .collect();
                    for svc in &all {
                        report.merge(self.sync_service(index, svc, writer));
                    }
                }
                Target::Policy => {
                    if let Some(policy) = &mut self.policy {
                        let synced = policy.sync(index, writer);
                        report.ops += synced.ops;
                        report
                            .problems
                            .extend(synced.problems.into_iter().map(SyncProblem::Policy));
                        report.problems.extend(
                            synced
                                .failures
                                .into_iter()
                                .map(|(pod, message)| SyncProblem::PolicyWrite { pod, message }),
                        );
                    }
                }
                Target::Pods | Target::Node(_) => {}
            }
        }
        report
    }

    /// Re-translates one service from the index and writes the difference.
    pub fn sync_service(
        &mut self,
        index: &Index,
        svc: &NsName,
        writer: &mut dyn MapWriter,
    ) -> SyncReport {
        let mut report = SyncReport::default();
        let desired = match index.services.get(svc) {
            None => Vec::new(),
            Some(service) => {
                match translate_service_on(service, &index.slices_of(svc), &self.node_view(index)) {
                    Ok(t) => {
                        report
                            .problems
                            .extend(t.warnings.into_iter().map(|message| {
                                SyncProblem::Translation {
                                    service: svc.clone(),
                                    message,
                                }
                            }));
                        t.frontends
                    }
                    Err(error) => {
                        report.problems.push(SyncProblem::Skipped {
                            service: svc.clone(),
                            error,
                        });
                        return report;
                    }
                }
            }
        };
        let desired = self.claim(svc, desired, &mut report.problems);
        let old = self.programmed.remove(svc).unwrap_or_default();

        let mut old_state = MapState::default();
        let mut new_state = MapState::default();
        for spec in &desired {
            let Some(rev_nat_id) = self.rev_nat_id_for(spec.frontend) else {
                report.problems.push(SyncProblem::NoRevNatId {
                    service: svc.clone(),
                    frontend: spec.frontend,
                });
                continue;
            };
            let mut ids = BTreeMap::new();
            for b in spec.all_backends() {
                match self.acquire_backend(*b, &mut new_state) {
                    Some(id) => {
                        ids.insert(*b, id);
                    }
                    None => report.problems.push(SyncProblem::BackendTableFull {
                        service: svc.clone(),
                    }),
                }
            }
            service_entries(spec, rev_nat_id, &ids, &mut new_state);
        }
        for spec in &old {
            let Some(&rev_nat_id) = self.rev_nat_ids.get(&spec.frontend) else {
                continue;
            };
            let ids: BTreeMap<BackendAddr, u32> = spec
                .all_backends()
                .filter_map(|b| Some((*b, self.release_backend(*b, &mut old_state)?)))
                .collect();
            service_entries(spec, rev_nat_id, &ids, &mut old_state);
        }
        for spec in &old {
            if !desired.iter().any(|d| d.frontend == spec.frontend) {
                self.owners.remove(&spec.frontend);
                if let Some(id) = self.rev_nat_ids.remove(&spec.frontend) {
                    self.rev_nat_pool.give(u32::from(id));
                }
            }
        }
        if !desired.is_empty() {
            self.programmed.insert(svc.clone(), desired);
        }

        let ops = diff(&old_state, &new_state);
        report.ops = ops.len();
        for op in &ops {
            if let Err(e) = writer.write(op) {
                report.problems.push(SyncProblem::MapWrite {
                    service: svc.clone(),
                    op: format!("{op:?}"),
                    error: format!("{e:#}"),
                });
            }
        }
        report
    }

    /// Drops frontends another service already owns.
    fn claim(
        &mut self,
        svc: &NsName,
        desired: Vec<FrontendSpec>,
        problems: &mut Vec<SyncProblem>,
    ) -> Vec<FrontendSpec> {
        desired
            .into_iter()
            .filter(|spec| match self.owners.get(&spec.frontend) {
                Some(owner) if owner != svc => {
                    problems.push(SyncProblem::FrontendTaken {
                        service: svc.clone(),
                        frontend: spec.frontend,
                        owner: owner.clone(),
                    });
                    false
                }
                _ => {
                    self.owners.insert(spec.frontend, svc.clone());
                    true
                }
            })
            .collect()
    }

    fn rev_nat_id_for(&mut self, frontend: Frontend) -> Option<u16> {
        if let Some(id) = self.rev_nat_ids.get(&frontend) {
            return Some(*id);
        }
        let id = u16::try_from(self.rev_nat_pool.take()?).ok()?;
        self.rev_nat_ids.insert(frontend, id);
        Some(id)
    }

    /// Takes a reference on a backend id; a new id's entry goes into `created`.
    fn acquire_backend(&mut self, b: BackendAddr, created: &mut MapState) -> Option<u32> {
        if let Some((id, refs)) = self.backend_ids.get_mut(&b) {
            *refs += 1;
            return Some(*id);
        }
        let id = self.backend_pool.take()?;
        self.backend_ids.insert(b, (id, 1));
        created.backends.insert(id, backend_value(b));
        Some(id)
    }

    /// Drops a reference; an id nobody uses any more goes into `freed`.
    fn release_backend(&mut self, b: BackendAddr, freed: &mut MapState) -> Option<u32> {
        let (id, refs) = self.backend_ids.get_mut(&b)?;
        let id = *id;
        *refs -= 1;
        if *refs == 0 {
            self.backend_ids.remove(&b);
            self.backend_pool.give(id);
            freed.backends.insert(id, backend_value(b));
        }
        Some(id)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::fixtures::{ready, service, slice};
    use crate::object::{Object, ObjectKey};
    use dataplane_common::ServiceKey;

    fn ns(name: &str) -> NsName {
        NsName {
            namespace: "ns".to_owned(),
            name: name.to_owned(),
        }
    }

    /// The maps read back as frontend -> backend addresses, following ids like the datapath.
    fn resolve(s: &MapState) -> BTreeMap<(u32, u16), BTreeSet<(u32, u16)>> {
        let mut out = BTreeMap::new();
        for (k, h) in s
            .services
            .iter()
            .filter(|(k, _)| k.slot == 0 && k.scope == dataplane_common::SCOPE_CLUSTER)
        {
            let backends = (1..=h.count)
                .map(|slot| {
                    let id = s.services[&ServiceKey { slot, ..*k }].backend_id;
                    let b = s.backends[&id];
                    (b.addr, b.port)
                })
                .collect();
            out.insert((k.addr, k.port), backends);
        }
        out
    }

    fn sync_all(p: &mut Reconciler, index: &Index, maps: &mut MapState) {
        let names: Vec<NsName> = index.services.keys().cloned().collect();
        for n in names {
            p.sync_service(index, &n, maps);
        }
    }

    #[test]
    fn an_endpoint_change_rewrites_only_what_changed() {
        let mut index = Index::default();
        index.apply(Object::from(service(
            "ns",
            "web",
            "10.96.0.10",
            &[("", 80, "TCP", json!(8080))],
        )));
        index.apply(Object::from(slice(
            "ns",
            "web-a",
            "web",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.2")],
        )));
        let mut p = Reconciler::default();
        let mut maps = MapState::default();
        let first = p.sync_service(&index, &ns("web"), &mut maps);
        assert_eq!(first.ops, 2 + 3, "two backends, header and two slots");

        index.apply(Object::from(slice(
            "ns",
            "web-a",
            "web",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1"), ready("10.0.0.2"), ready("10.0.0.3")],
        )));
        let second = p.sync_service(&index, &ns("web"), &mut maps);
        assert_eq!(second.ops, 3, "one backend, one slot, the header");
        assert_eq!(maps.backends.len(), 3);
    }

    #[test]
    fn deleting_a_service_removes_everything_it_wrote() {
        let mut index = Index::default();
        index.apply(Object::from(service(
            "ns",
            "web",
            "10.96.0.10",
            &[("", 80, "TCP", json!(8080))],
        )));
        index.apply(Object::from(slice(
            "ns",
            "web-a",
            "web",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1")],
        )));
        let mut p = Reconciler::default();
        let mut maps = MapState::default();
        p.sync_service(&index, &ns("web"), &mut maps);
        index.delete(&ObjectKey {
            kind: crate::object::Kind::Service,
            namespace: "ns".into(),
            name: "web".into(),
        });
        p.sync_service(&index, &ns("web"), &mut maps);
        assert_eq!(maps, MapState::default());
        assert_eq!(p.sizes(), (0, 0));
    }

    #[test]
    fn a_malformed_update_keeps_what_was_programmed() {
        let mut index = Index::default();
        index.apply(Object::from(service(
            "ns",
            "web",
            "10.96.0.10",
            &[("", 80, "TCP", json!(8080))],
        )));
        let mut p = Reconciler::default();
        let mut maps = MapState::default();
        p.sync_service(&index, &ns("web"), &mut maps);
        let before = maps.clone();
        index.apply(Object::from(service(
            "ns",
            "web",
            "banana",
            &[("", 80, "TCP", json!(8080))],
        )));
        let report = p.sync_service(&index, &ns("web"), &mut maps);
        assert_eq!(maps, before);
        assert!(
            report
                .problems
                .iter()
                .map(ToString::to_string)
                .any(|w| w.contains("ns/web") && w.contains("banana"))
        );
    }

    fn node(ip: &str) -> Object {
        Object::from(
            serde_json::from_value::<k8s_openapi::api::core::v1::Node>(json!({
                "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
                "status": {"addresses": [{"type": "InternalIP", "address": ip},
                                         {"type": "Hostname", "address": "node-a"}]}
            }))
            .unwrap(),
        )
    }

    #[test]
    fn node_ports_follow_the_local_nodes_internal_ip() {
        let mut index = Index::default();
        let mut svc = service("ns", "web", "10.96.0.10", &[("", 80, "TCP", json!(8080))]);
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("NodePort".into());
        spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
        let mut dirty = index.apply(Object::from(svc));
        dirty.merge(index.apply(Object::from(slice(
            "ns",
            "web",
            "web",
            &[("", 8080, "TCP")],
            &[ready("10.0.0.1")],
        ))));
        dirty.merge(index.apply(node("172.31.0.2")));
        let mut p = Reconciler::for_node("node-a", NodePortAddresses::Primary);
        let mut maps = MapState::default();
        p.sync(&index, &dirty, &mut maps);
        let addr =
            |ip: &str| u32::from_ne_bytes(ip.parse::<std::net::Ipv4Addr>().unwrap().octets());
        let backend = BTreeSet::from([(addr("10.0.0.1"), 8080u16.to_be())]);
        let expect = |node_ip: &str| {
            BTreeMap::from([
                ((addr("10.96.0.10"), 80u16.to_be()), backend.clone()),
                ((addr(node_ip), 30080u16.to_be()), backend.clone()),
            ])
        };
        assert_eq!(resolve(&maps), expect("172.31.0.2"));
        // The node's address changes: the NodePort moves with it, nothing else is rewritten.
        let moved = index.apply(node("172.31.0.9"));
        p.sync(&index, &moved, &mut maps);
        assert_eq!(resolve(&maps), expect("172.31.0.9"));
        // A reconciler of no node programs no NodePort.
        let mut fresh = MapState::default();
        sync_all(&mut Reconciler::default(), &index, &mut fresh);
        assert_eq!(
            fresh.services.len(),
            2,
            "header and one slot of the clusterIP only"
        );
    }

    #[test]
    fn node_port_addresses_by_cidr_follow_the_nodes_interface_addresses() {
        let mut index = Index::default();
        let mut svc = service("ns", "web", "10.96.0.10", &[("", 80, "TCP", json!(8080))]);
        let spec = svc.spec.as_mut().unwrap();
        spec.type_ = Some("NodePort".into());
        spec.ports.as_mut().unwrap()[0].node_port = Some(30080);
        let dirty = index.apply(Object::from(svc));
        let cidrs: NodePortAddresses = "192.168.0.0/16,10.1.0.0/24".parse().unwrap();
        assert_eq!(
            "primary".parse::<NodePortAddresses>().unwrap(),
            NodePortAddresses::Primary
        );
        assert!("192.168.0.0/33".parse::<NodePortAddresses>().is_err());
        let mut p = Reconciler::for_node("node-a", cidrs);
        let addrs = |maps: &MapState| -> BTreeSet<String> {
            maps.services
                .keys()
                .filter(|k| k.slot == 0 && k.port == 30080u16.to_be())
                .map(|k| std::net::Ipv4Addr::from(k.addr.to_ne_bytes()).to_string())
                .collect()
        };
        let mut maps = MapState::default();
        assert!(p.set_local_addresses(vec![
            "192.168.5.5".parse().unwrap(),
            "172.31.0.2".parse().unwrap(),
            "10.1.0.7".parse().unwrap(),
        ]));
        p.sync(&index, &dirty, &mut maps);
        assert_eq!(
            addrs(&maps),
            BTreeSet::from(["10.1.0.7".to_owned(), "192.168.5.5".to_owned()])
        );
        assert!(
            !p.set_local_addresses(vec![
                "10.1.0.7".parse().unwrap(),
                "172.31.0.2".parse().unwrap(),
                "192.168.5.5".parse().unwrap(),
            ]),
            "the same addresses in another order change nothing"
        );
        assert!(p.set_local_addresses(vec!["10.1.0.8".parse().unwrap()]));
        let mut node_dirty = Dirty::default();
        node_dirty.insert(Target::Node("node-a".into()));
        p.sync(&index, &node_dirty, &mut maps);
        assert_eq!(addrs(&maps), BTreeSet::from(["10.1.0.8".to_owned()]));
    }

    #[test]
    fn a_frontend_claimed_twice_stays_with_its_first_service() {
        let mut index = Index::default();
        index.apply(Object::from(service(
            "ns",
            "a",
            "10.96.0.10",
            &[("", 80, "TCP", json!(1))],
        )));
        index.apply(Object::from(service(
            "ns",
            "b",
            "10.96.0.10",
            &[("", 80, "TCP", json!(2))],
        )));
        let mut p = Reconciler::default();
        let mut maps = MapState::default();
        p.sync_service(&index, &ns("a"), &mut maps);
        let report = p.sync_service(&index, &ns("b"), &mut maps);
        assert!(
            report
                .problems
                .iter()
                .map(ToString::to_string)
                .any(|w| w.contains("already served by Service ns/a"))
        );
        assert_eq!(maps.services.len(), 1);
    }

    const POOL: [&str; 5] = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"];

    proptest! {
        /// Incremental syncs after each change end where a fresh full sync of the final objects
        /// ends, and never leave an unused backend behind.
        #[test]
        fn incremental_equals_full(steps in prop::collection::vec((0usize..3, prop::collection::vec(any::<bool>(), 5), any::<bool>()), 1..12)) {
            let mut index = Index::default();
            let mut p = Reconciler::default();
            let mut maps = MapState::default();
            for (svc, members, present) in steps {
                let name = format!("s{svc}");
                let key = |kind| ObjectKey { kind, namespace: "ns".into(), name: name.clone() };
                let dirty = if present {
                    let ip = format!("10.96.0.{}", svc + 1);
                    let eps: Vec<_> = POOL.iter().zip(&members).filter(|(_, m)| **m).map(|(a, _)| ready(a)).collect();
                    let mut d = index.apply(Object::from(service("ns", &name, &ip, &[("", 80, "TCP", json!(8080))])));
                    d.merge(index.apply(Object::from(slice("ns", &name, &name, &[("", 8080, "TCP")], &eps))));
                    d
                } else {
                    let mut d = index.delete(&key(crate::object::Kind::Service));
                    d.merge(index.delete(&key(crate::object::Kind::EndpointSlice)));
                    d
                };
                p.sync(&index, &dirty, &mut maps);
            }
            let mut fresh_maps = MapState::default();
            sync_all(&mut Reconciler::default(), &index, &mut fresh_maps);
            prop_assert_eq!(resolve(&maps), resolve(&fresh_maps));
            let used: BTreeSet<u32> = maps.services.iter().filter(|(k, _)| k.slot > 0).map(|(_, v)| v.backend_id).collect();
            prop_assert_eq!(used, maps.backends.keys().copied().collect::<BTreeSet<u32>>());
        }
    }
}
