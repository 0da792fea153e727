//! The policy maps as user space models them, and the sync that keeps them equal to what the
//! compiler ([`crate::policy::compile`]) says.
//!
//! ```text
//!  compile --> identities (compiler numbering) --stable digest--> map identity (kept while used)
//!          --> endpoints --pod address--> endpoint id (kept while the pod is enforced)
//!  tables: rules (POLICY) <- endpoints (POLICY_EP) <- identities (POLICY_IDS)
//!  writes: upsert rules, endpoints, identities; delete identities, endpoints, rules; commit
//! ```
//!
//! Layered so no packet sees a half-written state: a pod turns enforced only once its rules are
//! there, an address moves to a new identity only once the rules for it are there, and rules go
//! only after nothing routes to them. A packet judged between two writes sees the old or the new
//! verdict for what changed, and the same verdict for everything else. The commit bumps the
//! policy epoch, so tracked flows are judged again under the new state.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;

use dataplane_common::{
    EP_DENY_ALL, EP_EGRESS_ISOLATED, EP_INGRESS_ISOLATED, MAX_POLICY_ENDPOINTS, POLICY_ANY_PEER,
    POLICY_DIR_EGRESS, POLICY_DIR_INGRESS, POLICY_PREFIX_ANY_PORT, POLICY_PREFIX_ANY_PROTO,
    POLICY_PREFIX_PORT, PolicyEndpoint, PolicyKey, PolicyValue,
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

/// The contents of the policy maps.
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
        let peer_bits = u32::from(peer);
        let identity = self
            .ids
            .iter()
            .filter(|(p, _)| {
                let mask = u32::MAX.checked_shl(32 - u32::from(p.len)).unwrap_or(0);
                u32::from_be_bytes(p.addr.to_ne_bytes()) & mask == peer_bits & mask
            })
            .max_by_key(|(p, _)| p.len)
            .map(|(_, id)| *id);
        let Some(identity) = identity else {
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

/// The writes that turn `old` into `new`, in the order described in the module docs, and the
/// commit when anything changed.
#[must_use]
pub fn diff(old: &PolicyTables, new: &PolicyTables) -> Vec<Op> {
    let mut plan = Plan::default();
    plan.layer(
        &old.rules,
        &new.rules,
        |_| true,
        Op::UpsertPolicyRule,
        Op::DeletePolicyRule,
    )
    .layer(
        &old.endpoints,
        &new.endpoints,
        |_| true,
        Op::UpsertPolicyEndpoint,
        Op::DeletePolicyEndpoint,
    )
    .layer(
        &old.ids,
        &new.ids,
        |_| true,
        Op::UpsertPolicyId,
        Op::DeletePolicyId,
    );
    let mut ops = plan.into_ops();
    if !ops.is_empty() {
        ops.push(Op::PolicyCommit {
            enforced: !new.endpoints.is_empty(),
        });
    }
    ops
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
    programmed: PolicyTables,
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
            identity_pool: IdPool::new(u32::MAX),
            endpoints: HashMap::new(),
            endpoint_pool: IdPool::new(MAX_POLICY_ENDPOINTS),
            policies: HashMap::new(),
            policy_names: BTreeMap::new(),
            policy_pool: IdPool::new(u32::MAX),
            programmed: PolicyTables::default(),
        }
    }

    /// What the maps hold (as far as the writes succeeded).
    #[must_use]
    pub fn programmed(&self) -> &PolicyTables {
        &self.programmed
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

    /// Compiles the index's policy for this node and writes the difference. A write that fails
    /// leaves the pod it concerns denied (`EP_DENY_ALL`); a failed identity write denies every
    /// enforced pod (an address could otherwise fall to a shorter prefix's identity).
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
        let new = self.tables(&compiled);
        let ops = diff(&self.programmed, &new);
        report.ops = ops.len();
        let by_endpoint: HashMap<u16, Ipv4Addr> =
            self.endpoints.iter().map(|(a, id)| (*id, *a)).collect();
        let mut programmed = new.clone();
        let mut denied: HashSet<u32> = HashSet::new();
        let mut all_denied = false;
        for op in &ops {
            let Err(e) = writer.write(op) else {
                continue;
            };
            let pod = match op {
                Op::UpsertPolicyRule(r, _) => {
                    programmed.rules.remove(r);
                    by_endpoint.get(&u16::from_be(r.key.endpoint)).copied()
                }
                Op::DeletePolicyRule(r) => {
                    if let Some(v) = self.programmed.rules.get(r) {
                        programmed.rules.insert(*r, *v);
                    }
                    by_endpoint.get(&u16::from_be(r.key.endpoint)).copied()
                }
                Op::UpsertPolicyId(p, _) | Op::DeletePolicyId(p) => {
                    all_denied = true;
                    match self.programmed.ids.get(p) {
                        Some(v) => programmed.ids.insert(*p, *v),
                        None => programmed.ids.remove(p),
                    };
                    None
                }
                Op::UpsertPolicyEndpoint(a, _) | Op::DeletePolicyEndpoint(a) => {
                    denied.insert(*a);
                    Some(Ipv4Addr::from(a.to_ne_bytes()))
                }
                _ => None,
            };
            if let Some(pod) = pod {
                denied.insert(u32::from_ne_bytes(pod.octets()));
            }
            report.failures.push((pod, format!("{op:?}: {e:#}")));
        }
        if all_denied {
            denied.extend(programmed.endpoints.keys().copied());
        }
        let mut fixes = Vec::new();
        for addr in denied {
            let Some(ep) = programmed.endpoints.get_mut(&addr) else {
                continue;
            };
            ep.flags |= EP_DENY_ALL;
            fixes.push(Op::UpsertPolicyEndpoint(addr, *ep));
        }
        if !fixes.is_empty() {
            fixes.push(Op::PolicyCommit { enforced: true });
        }
        for op in &fixes {
            if let Err(e) = writer.write(op) {
                report.failures.push((None, format!("{op:?}: {e:#}")));
            }
        }
        report.ops += fixes.len();
        self.programmed = programmed;
        self.release_unused();
        report
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
                .or_insert_with(|| self.identity_pool.take().unwrap_or(u32::MAX));
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
                    pad: 0,
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

    /// Frees the numbers nothing in the maps uses any more.
    fn release_unused(&mut self) {
        let used: HashSet<u32> = self.programmed.ids.values().copied().collect();
        let pool = &mut self.identity_pool;
        self.identities.retain(|_, id| {
            let keep = used.contains(id);
            if !keep {
                pool.give(*id);
            }
            keep
        });
        let enforced: HashSet<u16> = self
            .programmed
            .endpoints
            .values()
            .map(|e| u16::from_be(e.endpoint))
            .chain(
                self.programmed
                    .rules
                    .keys()
                    .map(|r| u16::from_be(r.key.endpoint)),
            )
            .collect();
        let pool = &mut self.endpoint_pool;
        self.endpoints.retain(|_, id| {
            let keep = enforced.contains(id);
            if !keep {
                pool.give(u32::from(*id));
            }
            keep
        });
        let named: HashSet<u32> = self
            .programmed
            .rules
            .values()
            .map(|v| v.policy_id)
            .collect();
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
            pad: 0,
            identity: identity.to_be(),
            proto,
            pad2: 0,
            port: port.to_be(),
        },
        prefix_len,
    }
}
