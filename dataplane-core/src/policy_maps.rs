//! The policy maps as user space models them, and the sync that keeps them equal to what the
//! compiler ([`crate::policy::compile`]) says.
//!
//! ```text
//!  compile --> identities (compiler numbering) --stable digest--> map identity (kept while used)
//!          --> endpoints --pod address--> endpoint id (kept while the pod is enforced)
//!  tables: rules (POLICY) <- endpoints (POLICY_EP) <- identities (POLICY_IDS)
//!  writes: the standby generation's rules, identities, endpoints; then the commit (switch)
//! ```
//!
//! Two generations live in the maps (see `dataplane_common::policy`): packets are judged by
//! the active one while a sync writes the whole next state into the other, which no packet
//! reads; `Op::PolicyCommit` then switches generations with one write of `NODE`, bumping the
//! policy epoch so tracked flows are judged again under the new state. Every verdict is the old
//! one until the switch and the new one after it, for every flow at once (the property test
//! below checks it write by write). The price is the maps holding two generations' entries.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use dataplane_common::{
    EP_DENY_ALL, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, MAX_POLICY_ENDPOINTS, POLICY_ANY_PEER,
    POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, POLICY_NO_IDENTITY, POLICY_PREFIX_ANY_PORT,
    POLICY_PREFIX_ANY_PROTO, POLICY_PREFIX_PORT, PolicyEndpoint, PolicyEndpoints, PolicyIdentity,
    PolicyKey, PolicyValue,
};

use crate::index::Index;
use crate::maps::Op;
use crate::net::Cidr;
use crate::object::NsName;
use crate::policy::{Allowed, Compiled, Direction, PolicyProblem, RuleKey, compile};
use crate::table::{IdPool, Plan};

/// One `POLICY_IDS` entry's key: an address prefix (address in network byte order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdPrefix {
    pub addr: u32,
    pub len: u8,
}

/// One `POLICY` entry's key: the trie key and its prefix length in bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RulePrefix {
    pub key: PolicyKey,
    pub prefix_len: u32,
}

/// One generation of the policy maps, as a packet judged by it sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    pub ids: BTreeMap<IdPrefix, u32>,
    /// Pod address (network byte order) -> endpoint.
    pub endpoints: BTreeMap<u32, PolicyEndpoint>,
    pub rules: BTreeMap<RulePrefix, PolicyValue>,
}

impl PolicyTables {
    /// The verdict these tables give a new flow, as the datapath's lookups compute it (longest
    /// prefix of the peer, then the rule with the peer's identity or any peer): `None` when the
    /// pod is not enforced; `Some(Ok(policy id))` admitted by that policy (0: the direction is
    /// not isolated); `Some(Err(()))` denied.
    #[must_use]
    pub fn verdict(
        &self,
        pod: Ipv4Addr,
        dir: u8,
        peer: Ipv4Addr,
        proto: u8,
        port: u16,
    ) -> Option<Result<u32, ()>> {
        let ep = self.endpoints.get(&u32::from_ne_bytes(pod.octets()))?;
        if ep.flags & EP_DENY_ALL != 0 {
            return Some(Err(()));
        }
        let isolated = if dir == POLICY_DIR_INGRESS {
            EP_INGRESS_ISOLATED
        } else {
            EP_EGRESS_ISOLATED
        };
        if ep.flags & isolated == 0 {
            return Some(Ok(0));
        }
        let peer = IdPrefix {
            addr: u32::from_ne_bytes(peer.octets()),
            len: 32,
        };
        let Some(identity) = longest_match(&self.ids, peer) else {
            return Some(Err(()));
        };
        let lookup = |identity: u32| {
            self.rules
                .iter()
                .filter(|(r, _)| {
                    let k = r.key;
                    k.endpoint == ep.endpoint
                        && k.dir == dir
                        && u32::from_be(k.identity) == identity
                        && (r.prefix_len == POLICY_PREFIX_ANY_PROTO
                            || (k.proto == proto
                                && (r.prefix_len == POLICY_PREFIX_ANY_PORT || {
                                    let bits = r.prefix_len - POLICY_PREFIX_PORT;
                                    let mask = u16::MAX.checked_shl(16 - bits).unwrap_or(0);
                                    u16::from_be(k.port) & mask == port & mask
                                })))
                })
                .max_by_key(|(r, _)| r.prefix_len)
                .map(|(_, v)| v.policy_id)
        };
        Some(
            lookup(identity)
                .or_else(|| lookup(POLICY_ANY_PEER))
                .ok_or(()),
        )
    }
}

/// The contents of the policy maps: both generations (see `dataplane_common::policy`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyMaps {
    pub ids: BTreeMap<IdPrefix, PolicyIdentity>,
    /// Pod address (network byte order) -> the pod in each generation.
    pub endpoints: BTreeMap<u32, PolicyEndpoints>,
    /// Both generations' rules (`key.generation`).
    pub rules: BTreeMap<RulePrefix, PolicyValue>,
}

impl PolicyMaps {
    /// Generation `generation` as a packet judged by it sees it.
    #[must_use]
    pub fn tables(&self, generation: u8) -> PolicyTables {
        let g = usize::from(generation & 1);
        PolicyTables {
            ids: self
                .ids
                .iter()
                .map(|(p, id)| (*p, id.generation[g]))
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .filter(|(_, e)| e.generation[g].endpoint != 0)
                .map(|(a, e)| {
                    let mut ep = e.generation[g];
                    ep.generation = 0;
                    (*a, ep)
                })
                .collect(),
            rules: self
                .rules
                .iter()
                .filter(|(r, _)| r.key.generation == generation & 1)
                .map(|(r, v)| {
                    let mut r = *r;
                    r.key.generation = 0;
                    (r, *v)
                })
                .collect(),
        }
    }

    /// The maps holding `generations` (each as [`PolicySync`] compiles it). A prefix of one
    /// generation only takes, in the other, the identity that one's longest match gives it.
    #[must_use]
    pub fn holding(generations: &[PolicyTables; 2]) -> Self {
        let mut maps = Self::default();
        for prefix in generations.iter().flat_map(|t| t.ids.keys()) {
            let id =
                |t: &PolicyTables| longest_match(&t.ids, *prefix).unwrap_or(POLICY_NO_IDENTITY);
            maps.ids.insert(
                *prefix,
                PolicyIdentity {
                    generation: [id(&generations[0]), id(&generations[1])],
                },
            );
        }
        for (g, tables) in generations.iter().enumerate() {
            for (addr, ep) in &tables.endpoints {
                maps.endpoints.entry(*addr).or_default().generation[g] = PolicyEndpoint {
                    generation: g as u8,
                    ..*ep
                };
            }
            for (rule, value) in &tables.rules {
                let mut rule = *rule;
                rule.key.generation = g as u8;
                maps.rules.insert(rule, *value);
            }
        }
        maps
    }

    /// Applies one write, as the kernel maps would.
    pub fn apply(&mut self, op: &Op) {
        match *op {
            Op::UpsertPolicyRule(k, v) => {
                self.rules.insert(k, v);
            }
            Op::UpsertPolicyEndpoint(k, v) => {
                self.endpoints.insert(k, v);
            }
            Op::UpsertPolicyId(k, v) => {
                self.ids.insert(k, v);
            }
            Op::DeletePolicyId(k) => {
                self.ids.remove(&k);
            }
            Op::DeletePolicyEndpoint(k) => {
                self.endpoints.remove(&k);
            }
            Op::DeletePolicyRule(k) => {
                self.rules.remove(&k);
            }
            _ => {}
        }
    }
}

/// The identity of the longest prefix in `ids` that contains `prefix`.
fn longest_match(ids: &BTreeMap<IdPrefix, u32>, prefix: IdPrefix) -> Option<u32> {
    let addr = u32::from_be_bytes(prefix.addr.to_ne_bytes());
    (0..=prefix.len).rev().find_map(|len| {
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        let key = IdPrefix {
            addr: u32::from_ne_bytes((addr & mask).to_be_bytes()),
            len,
        };
        ids.get(&key).copied()
    })
}

/// The writes that turn the maps from `old` into `new` (the generation packets are judged by
/// is the same in both: the writes only change the other).
#[must_use]
pub fn diff(old: &PolicyMaps, new: &PolicyMaps) -> Vec<Op> {
    let mut plan = Plan::default();
    plan.layer(
        &old.rules,
        &new.rules,
        |_| true,
        Op::UpsertPolicyRule,
        Op::DeletePolicyRule,
    )
    .layer(
        &old.ids,
        &new.ids,
        |_| true,
        Op::UpsertPolicyId,
        Op::DeletePolicyId,
    )
    .layer(
        &old.endpoints,
        &new.endpoints,
        |_| true,
        Op::UpsertPolicyEndpoint,
        Op::DeletePolicyEndpoint,
    );
    plan.into_ops()
}

/// Keeps the policy maps equal to the compiled policy of one node.
#[derive(Clone, Debug)]
pub struct PolicySync {
    node: String,
    identities: HashMap<u64, u32>,
    identity_pool: IdPool,
    endpoints: HashMap<Ipv4Addr, u16>,
    endpoint_pool: IdPool,
    policies: HashMap<NsName, u32>,
    policy_names: BTreeMap<u32, NsName>,
    policy_pool: IdPool,
    /// Each generation as compiled (with pods denied whose writes failed).
    generations: [PolicyTables; 2],
    /// The generation packets are judged by.
    active: u8,
    /// What the maps hold, as far as the writes succeeded.
    maps: PolicyMaps,
    /// Every write of the last sync succeeded: `maps` holds `generations` exactly.
    written: bool,
}

/// What a policy sync did.
#[derive(Debug, Default)]
pub struct PolicyReport {
    pub ops: usize,
    pub problems: Vec<PolicyProblem>,
    /// Writes that failed, each with the endpoint it concerned (if any): those pods fail closed.
    pub failures: Vec<(Option<Ipv4Addr>, String)>,
}

impl PolicySync {
    #[must_use]
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_owned(),
            identities: HashMap::new(),
            // Identity 0 is "any peer".
            identity_pool: IdPool::new(POLICY_NO_IDENTITY),
            endpoints: HashMap::new(),
            endpoint_pool: IdPool::new(MAX_POLICY_ENDPOINTS),
            policies: HashMap::new(),
            policy_names: BTreeMap::new(),
            policy_pool: IdPool::new(u32::MAX),
            generations: [PolicyTables::default(), PolicyTables::default()],
            active: 0,
            maps: PolicyMaps::default(),
            written: true,
        }
    }

    /// The generation packets are judged by, as compiled.
    #[must_use]
    pub fn programmed(&self) -> &PolicyTables {
        &self.generations[usize::from(self.active)]
    }

    /// What the maps hold (both generations, as far as the writes succeeded).
    #[must_use]
    pub fn maps(&self) -> &PolicyMaps {
        &self.maps
    }

    /// The generation packets are judged by.
    #[must_use]
    pub fn active(&self) -> u8 {
        self.active
    }

    /// The policy a `POLICY` value names.
    #[must_use]
    pub fn policy_name(&self, id: u32) -> Option<&NsName> {
        self.policy_names.get(&id)
    }

    /// The endpoint id of an enforced local pod.
    #[must_use]
    pub fn endpoint_id(&self, pod: Ipv4Addr) -> Option<u16> {
        self.endpoints.get(&pod).copied()
    }

    /// Compiles the index's policy for this node, writes it into the generation packets are not
    /// judged by, and switches to it (`Op::PolicyCommit`) when anything changed. A write that
    /// fails leaves the pod it concerns denied (`EP_DENY_ALL`) in the new generation; a failed
    /// identity write denies every enforced pod there (an address could otherwise fall to a
    /// shorter prefix's identity). When even the denial cannot be written, the switch is not
    /// made: packets stay judged by the complete old generation.
    pub fn sync(
        &mut self,
        index: &Index,
        writer: &mut dyn crate::reconcile::MapWriter,
    ) -> PolicyReport {
        let compiled = compile(
            &self.node,
            &index.pods,
            &index.namespaces,
            &index.network_policies,
        );
        let mut report = PolicyReport {
            problems: compiled.problems.clone(),
            ..PolicyReport::default()
        };
        let mut next = self.tables(&compiled);
        let standby = usize::from(1 - self.active);
        if self.written && next == *self.programmed() {
            return report;
        }
        self.generations[standby] = next.clone();
        let target = PolicyMaps::holding(&self.generations);
        let ops = diff(&self.maps, &target);
        let mut denied: HashSet<u32> = HashSet::new();
        let mut all_denied = false;
        for op in &ops {
            report.ops += 1;
            if let Err(e) = writer.write(op) {
                let pod = match op {
                    Op::UpsertPolicyRule(r, _) | Op::DeletePolicyRule(r) => {
                        self.pod_of(u16::from_be(r.key.endpoint))
                    }
                    Op::UpsertPolicyEndpoint(a, _) | Op::DeletePolicyEndpoint(a) => {
                        Some(Ipv4Addr::from(a.to_ne_bytes()))
                    }
                    _ => {
                        all_denied = true;
                        None
                    }
                };
                if let Some(pod) = pod {
                    denied.insert(u32::from_ne_bytes(pod.octets()));
                }
                report.failures.push((pod, format!("{op:?}: {e:#}")));
                continue;
            }
            self.maps.apply(op);
        }
        if all_denied {
            denied.extend(next.endpoints.keys().copied());
        }
        // The new generation of each pod concerned is written again: denied, or (a pod the new
        // generation does not enforce, whose entry could not be removed) not enforced.
        let mut complete = true;
        for addr in denied {
            let half = next
                .endpoints
                .get_mut(&addr)
                .map_or_else(PolicyEndpoint::default, |ep| {
                    ep.flags |= EP_DENY_ALL;
                    *ep
                });
            let mut entry = self.maps.endpoints.get(&addr).copied().unwrap_or_default();
            entry.generation[standby] = PolicyEndpoint {
                generation: standby as u8,
                ..half
            };
            let op = Op::UpsertPolicyEndpoint(addr, entry);
            report.ops += 1;
            match writer.write(&op) {
                Ok(()) => self.maps.apply(&op),
                Err(e) => {
                    complete = false;
                    report.failures.push((
                        Some(Ipv4Addr::from(addr.to_ne_bytes())),
                        format!("{op:?}: {e:#}"),
                    ));
                }
            }
        }
        self.generations[standby] = next;
        if complete {
            let commit = Op::PolicyCommit {
                enforced: !self.generations[standby].endpoints.is_empty(),
                generation: standby as u8,
            };
            report.ops += 1;
            match writer.write(&commit) {
                Ok(()) => self.active = standby as u8,
                Err(e) => report.failures.push((None, format!("{commit:?}: {e:#}"))),
            }
        }
        self.written = report.failures.is_empty();
        self.release_unused();
        report
    }

    fn pod_of(&self, endpoint: u16) -> Option<Ipv4Addr> {
        self.endpoints
            .iter()
            .find(|(_, id)| **id == endpoint)
            .map(|(a, _)| *a)
    }

    /// The map contents for a compile, with stable numbers.
    fn tables(&mut self, compiled: &Compiled) -> PolicyTables {
        let mut ids = BTreeMap::new();
        let mut number: HashMap<u32, u32> = HashMap::new();
        for (cidr, id) in &compiled.identities {
            let digest = compiled.stable.get(id).copied().unwrap_or_default();
            let stable = *self
                .identities
                .entry(digest)
                .or_insert_with(|| self.identity_pool.take().unwrap_or(POLICY_NO_IDENTITY));
            number.insert(*id, stable);
            ids.insert(prefix(*cidr), stable);
        }
        let mut endpoints = BTreeMap::new();
        let mut rules = BTreeMap::new();
        for (addr, ep) in &compiled.endpoints {
            if ep.ingress == Direction::Open && ep.egress == Direction::Open {
                continue;
            }
            let Some(endpoint) = self.endpoint_for(*addr) else {
                continue;
            };
            let mut flags = 0;
            for (dir, direction, flag) in [
                (POLICY_DIR_INGRESS, &ep.ingress, EP_INGRESS_ISOLATED),
                (POLICY_DIR_EGRESS, &ep.egress, EP_EGRESS_ISOLATED),
            ] {
                let Direction::Isolated(allowed) = direction else {
                    continue;
                };
                flags |= flag;
                self.rules(endpoint, dir, allowed, &number, &mut rules);
            }
            endpoints.insert(
                u32::from_ne_bytes(addr.octets()),
                PolicyEndpoint {
                    endpoint: endpoint.to_be(),
                    flags,
                    generation: 0,
                },
            );
        }
        PolicyTables {
            ids,
            endpoints,
            rules,
        }
    }

    fn rules(
        &mut self,
        endpoint: u16,
        dir: u8,
        allowed: &Allowed,
        number: &HashMap<u32, u32>,
        out: &mut BTreeMap<RulePrefix, PolicyValue>,
    ) {
        for (key, policy) in allowed {
            let identity = if key.identity == POLICY_ANY_PEER {
                POLICY_ANY_PEER
            } else {
                match number.get(&key.identity) {
                    Some(n) => *n,
                    None => continue,
                }
            };
            let policy_id = self.policy_id(policy);
            out.insert(
                rule_prefix(endpoint, dir, identity, key),
                PolicyValue { policy_id },
            );
        }
    }

    fn endpoint_for(&mut self, addr: Ipv4Addr) -> Option<u16> {
        if let Some(id) = self.endpoints.get(&addr) {
            return Some(*id);
        }
        let id = u16::try_from(self.endpoint_pool.take()?).ok()?;
        self.endpoints.insert(addr, id);
        Some(id)
    }

    fn policy_id(&mut self, policy: &NsName) -> u32 {
        if let Some(id) = self.policies.get(policy) {
            return *id;
        }
        let id = self.policy_pool.take().unwrap_or(u32::MAX);
        self.policies.insert(policy.clone(), id);
        self.policy_names.insert(id, policy.clone());
        id
    }

    /// Frees the numbers neither generation, nor the maps, use any more.
    fn release_unused(&mut self) {
        let views = [
            &self.generations[0],
            &self.generations[1],
            &self.maps.tables(0),
            &self.maps.tables(1),
        ];
        let used: HashSet<u32> = views.iter().flat_map(|t| t.ids.values().copied()).collect();
        let enforced: HashSet<u16> = views
            .iter()
            .flat_map(|t| {
                t.endpoints
                    .values()
                    .map(|e| u16::from_be(e.endpoint))
                    .chain(t.rules.keys().map(|r| u16::from_be(r.key.endpoint)))
            })
            .collect();
        let named: HashSet<u32> = views
            .iter()
            .flat_map(|t| t.rules.values().map(|v| v.policy_id))
            .collect();
        let pool = &mut self.identity_pool;
        self.identities.retain(|_, id| {
            let keep = used.contains(id);
            if !keep {
                pool.give(*id);
            }
            keep
        });
        let pool = &mut self.endpoint_pool;
        self.endpoints.retain(|_, id| {
            let keep = enforced.contains(id);
            if !keep {
                pool.give(u32::from(*id));
            }
            keep
        });
        let pool = &mut self.policy_pool;
        let names = &mut self.policy_names;
        self.policies.retain(|_, id| {
            let keep = named.contains(id);
            if !keep {
                pool.give(*id);
                names.remove(id);
            }
            keep
        });
    }
}

fn prefix(cidr: Cidr) -> IdPrefix {
    IdPrefix {
        addr: u32::from_ne_bytes(cidr.addr.octets()),
        len: cidr.len,
    }
}

/// The `POLICY` entry of one allowed key (see `dataplane_common::policy` for the layout).
#[must_use]
pub fn rule_prefix(endpoint: u16, dir: u8, identity: u32, key: &RuleKey) -> RulePrefix {
    let (proto, port, prefix_len) = match key.proto {
        None => (0, 0, POLICY_PREFIX_ANY_PROTO),
        Some(p) if key.port.len == 0 => (p, 0, POLICY_PREFIX_ANY_PORT),
        Some(p) => (
            p,
            key.port.value,
            POLICY_PREFIX_PORT + u32::from(key.port.len),
        ),
    };
    RulePrefix {
        key: PolicyKey {
            endpoint: endpoint.to_be(),
            dir,
            generation: 0,
            identity: identity.to_be(),
            proto,
            pad2: 0,
            port: port.to_be(),
        },
        prefix_len,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::fixtures::objects::{namespace, network_policy, pod};
    use crate::maps::MapState;
    use crate::object::{Kind, Object, ObjectKey};

    const NODE: &str = "n1";
    const PODS: u8 = 6;
    const PROTO_TCP: u8 = 6;
    const PROTO_UDP: u8 = 17;

    fn pod_ip(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, 1 + i)
    }

    /// Pod `i`: on the node for i < 3, namespace `ns{i % 2}`, label app, a named port.
    fn a_pod(i: u8, app: u8, port: u16) -> Object {
        Object::from(pod(
            &format!("ns{}", i % 2),
            &format!("p{i}"),
            if i < 3 { NODE } else { "n2" },
            &pod_ip(i).to_string(),
            &[("app", ["a", "b", "c"][usize::from(app)])],
            json!([{"name": "http", "containerPort": port}]),
        ))
    }

    /// One of a few policy shapes over the API's peer and port kinds.
    fn a_policy(slot: u8, shape: u8, app: u8, peer_app: u8) -> Object {
        let app = ["a", "b", "c"][usize::from(app)];
        let peer = ["a", "b", "c"][usize::from(peer_app)];
        let spec = match shape {
            0 => json!({"podSelector": {"matchLabels": {"app": app}}}),
            1 => json!({"podSelector": {"matchLabels": {"app": app}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": peer}}}],
                                     "ports": [{"port": "http"}]}]}),
            2 => json!({"podSelector": {},
                        "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}},
                                               "podSelector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": [peer]}]}}]}]}),
            3 => json!({"podSelector": {"matchLabels": {"app": app}},
                        "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/29", "except": ["10.244.0.4/30"]}}],
                                     "ports": [{"protocol": "TCP", "port": 8000, "endPort": 8100}]}]}),
            4 => json!({"podSelector": {"matchLabels": {"app": app}}, "policyTypes": ["Egress"],
                        "egress": [{"to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": peer}}}],
                                    "ports": [{"protocol": "UDP", "port": 53}, {"port": "http"}]}]}),
            _ => json!({"podSelector": {"matchLabels": {"app": app}}, "ingress": [{}]}),
        };
        Object::from(network_policy(
            &format!("ns{}", slot % 2),
            &format!("np{slot}"),
            spec,
        ))
    }

    #[derive(Clone, Debug)]
    enum Step {
        Pod {
            i: u8,
            app: u8,
            port: u16,
        },
        DeletePod(u8),
        Namespace {
            i: u8,
            team_x: bool,
        },
        Policy {
            slot: u8,
            shape: u8,
            app: u8,
            peer: u8,
        },
        DeletePolicy(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0..PODS, 0..3u8, prop::sample::select(vec![8080u16, 9090]))
                .prop_map(|(i, app, port)| Step::Pod { i, app, port }),
            (0..PODS).prop_map(Step::DeletePod),
            (0..2u8, any::<bool>()).prop_map(|(i, team_x)| Step::Namespace { i, team_x }),
            (0..3u8, 0..6u8, 0..3u8, 0..3u8).prop_map(|(slot, shape, app, peer)| Step::Policy {
                slot,
                shape,
                app,
                peer
            }),
            (0..3u8).prop_map(Step::DeletePolicy),
        ]
    }

    fn apply(index: &mut Index, step: &Step) {
        let delete = |index: &mut Index, kind, namespace: String, name: String| {
            let _ = index.delete(&ObjectKey {
                kind,
                namespace,
                name,
            });
        };
        match *step {
            Step::Pod { i, app, port } => {
                let _ = index.apply(a_pod(i, app, port));
            }
            Step::DeletePod(i) => delete(index, Kind::Pod, format!("ns{}", i % 2), format!("p{i}")),
            Step::Namespace { i, team_x } => {
                let team = if team_x { "x" } else { "y" };
                let _ = index.apply(Object::from(namespace(
                    &format!("ns{i}"),
                    &[("team", team)],
                )));
            }
            Step::Policy {
                slot,
                shape,
                app,
                peer,
            } => {
                let _ = index.apply(a_policy(slot, shape, app, peer));
            }
            Step::DeletePolicy(slot) => delete(
                index,
                Kind::NetworkPolicy,
                format!("ns{}", slot % 2),
                format!("np{slot}"),
            ),
        }
    }

    /// The grid every verdict is checked over: each possible local pod, direction, peer (every
    /// pod address, one more in the ipBlock, one outside), protocol and port.
    fn grid() -> Vec<(Ipv4Addr, u8, Ipv4Addr, u8, u16)> {
        let peers: Vec<Ipv4Addr> = (0..PODS)
            .map(pod_ip)
            .chain([Ipv4Addr::new(10, 244, 0, 7), Ipv4Addr::new(192, 168, 1, 1)])
            .collect();
        let mut out = Vec::new();
        for local in (0..3).map(pod_ip) {
            for dir in [POLICY_DIR_INGRESS, POLICY_DIR_EGRESS] {
                for peer in &peers {
                    for proto in [PROTO_TCP, PROTO_UDP] {
                        for port in [53u16, 8050, 8080, 9090] {
                            out.push((local, dir, *peer, proto, port));
                        }
                    }
                }
            }
        }
        out
    }

    /// The generation packets are judged by in `state`, if any pod is enforced.
    fn judged(state: &MapState) -> Option<PolicyTables> {
        state
            .policy_enforced
            .then(|| state.policy.tables((state.policy_epoch & 1) as u8))
    }

    /// Verdicts with the admitting policy by name (numbers differ between syncs).
    fn named(state: &MapState, sync: &PolicySync) -> Vec<Option<Result<Option<NsName>, ()>>> {
        let tables = judged(state);
        grid()
            .into_iter()
            .map(|(l, d, p, proto, port)| {
                tables
                    .as_ref()?
                    .verdict(l, d, p, proto, port)
                    .map(|v| v.map(|id| sync.policy_name(id).cloned()))
            })
            .collect()
    }

    /// Verdicts as allowed or denied (`None`: not enforced).
    fn allowed(state: &MapState) -> Vec<Option<bool>> {
        let tables = judged(state);
        grid()
            .into_iter()
            .map(|(l, d, p, proto, port)| {
                tables
                    .as_ref()?
                    .verdict(l, d, p, proto, port)
                    .map(|v| v.is_ok())
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Syncing after every change gives the maps a fresh sync of the final objects gives
        /// (verdicts and the policies named); while one change's writes are applied one by one,
        /// every verdict is the old one until the switch, and the new one from it on; the
        /// generation the maps switch to is the one the sync says is programmed.
        #[test]
        fn incremental_sync_equals_fresh_and_switches_without_a_window(
            initial in prop::collection::vec(step(), 0..8),
            steps in prop::collection::vec(step(), 1..8),
        ) {
            let mut index = Index::default();
            for s in &initial {
                apply(&mut index, s);
            }
            let mut sync = PolicySync::new(NODE);
            let mut maps = MapState::default();
            prop_assert!(sync.sync(&index, &mut maps).failures.is_empty());
            for s in &steps {
                let old = allowed(&maps);
                apply(&mut index, s);
                let mut ops = Recorder(Vec::new());
                prop_assert!(sync.sync(&index, &mut ops).failures.is_empty());
                let mut partial = maps.clone();
                maps.apply(&ops.0);
                prop_assert_eq!(&maps.policy, sync.maps());
                let new = allowed(&maps);
                let programmed = MapState {
                    policy: PolicyMaps::holding(&[sync.programmed().clone(), PolicyTables::default()]),
                    policy_epoch: 0,
                    policy_enforced: !sync.programmed().endpoints.is_empty(),
                    ..MapState::default()
                };
                prop_assert_eq!(&new, &allowed(&programmed));
                for op in &ops.0 {
                    partial.apply(std::slice::from_ref(op));
                    let now = allowed(&partial);
                    let expected = if matches!(op, Op::PolicyCommit { .. }) { &new } else { &old };
                    if let Some(k) = (0..now.len()).find(|&k| now[k] != expected[k]) {
                        prop_assert!(
                            false,
                            "after {:?}, {:?}: {:?}, expected {:?} (old {:?}, new {:?})",
                            op, grid()[k], now[k], expected[k], old[k], new[k]
                        );
                    }
                }
            }
            let mut fresh = PolicySync::new(NODE);
            let mut fresh_maps = MapState::default();
            let _ = fresh.sync(&index, &mut fresh_maps);
            prop_assert_eq!(named(&maps, &sync), named(&fresh_maps, &fresh));
        }
    }

    /// Records the writes of one sync.
    struct Recorder(Vec<Op>);

    impl crate::reconcile::MapWriter for Recorder {
        fn write(&mut self, op: &Op) -> anyhow::Result<()> {
            self.0.push(*op);
            Ok(())
        }
    }
}
