//! The translation maps as user space models them: the writes ([`Op`]), their contents
//! ([`MapState`]), each Service's entries, and the ordered diff between two contents.
//!
//! A Service is only reachable through its header (slot 0), so the tables are layered (see
//! [`crate::table::Plan`]):
//!
//! ```text
//!  1 upsert backends   2 upsert slots 1..n, source ranges   3 upsert headers
//!  4 delete headers    5 delete slots, source ranges        6 delete backends
//! ```
//! (a header never points past written slots or backends, nor admits by ranges not yet written).
use std::collections::BTreeMap;

use dataplane_common::{
    BACKEND_LOCAL, Backend, PolicyEndpoints, PolicyIdentity, PolicyValue, SCOPE_CLUSTER,
    SCOPE_EXTERNAL, SOURCE_RANGE_ID_BITS, SVC_FLAG_DROP_EMPTY, SVC_FLAG_EXTERNAL_LOCAL,
    SVC_FLAG_SOURCE_RANGES, ServiceKey, ServiceValue, SourceRangeKey,
};

use crate::policy_maps::{IdPrefix, PolicyMaps, RulePrefix};
use crate::table::Plan;
use crate::translate::{BackendAddr, Frontend, FrontendSpec};

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    UpsertBackend(u32, Backend),
    UpsertService(ServiceKey, ServiceValue),
    UpsertSourceRange(SourceRange),
    DeleteService(ServiceKey),
    DeleteSourceRange(SourceRange),
    DeleteBackend(u32),
    UpsertPolicyRule(RulePrefix, PolicyValue),
    UpsertPolicyEndpoint(u32, PolicyEndpoints),
    UpsertPolicyId(IdPrefix, PolicyIdentity),
    DeletePolicyId(IdPrefix),
    DeletePolicyEndpoint(u32),
    DeletePolicyRule(RulePrefix),
    /// Switch to policy generation `generation` (the policy epoch moves on to the next number
    /// of its parity: tracked flows are judged again), and whether any local pod is enforced
    /// in it.
    PolicyCommit {
        enforced: bool,
        generation: u8,
    },
}

/// One `SOURCE_RANGES` entry: the trie key and its prefix length (in bits, id included).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourceRange {
    pub key: SourceRangeKey,
    pub prefix_len: u32,
}

/// The contents of the translation maps (or a part of them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub source_ranges: BTreeMap<SourceRange, ()>,
    pub policy: PolicyMaps,
    /// Policy commits so far (the epoch the datapath would have), and whether a pod is enforced.
    pub policy_epoch: u32,
    pub policy_enforced: bool,
}

impl MapState {
    /// Applies writes in order, as the kernel maps would.
    pub fn apply(&mut self, ops: &[Op]) {
        for op in ops {
            match *op {
                Op::UpsertBackend(id, b) => {
                    self.backends.insert(id, b);
                }
                Op::UpsertService(k, v) => {
                    self.services.insert(k, v);
                }
                Op::DeleteService(k) => {
                    self.services.remove(&k);
                }
                Op::DeleteBackend(id) => {
                    self.backends.remove(&id);
                }
                Op::UpsertSourceRange(r) => {
                    self.source_ranges.insert(r, ());
                }
                Op::DeleteSourceRange(r) => {
                    self.source_ranges.remove(&r);
                }
                Op::UpsertPolicyRule(..)
                | Op::UpsertPolicyEndpoint(..)
                | Op::UpsertPolicyId(..)
                | Op::DeletePolicyId(_)
                | Op::DeletePolicyEndpoint(_)
                | Op::DeletePolicyRule(_) => self.policy.apply(op),
                Op::PolicyCommit {
                    enforced,
                    generation,
                } => {
                    self.policy_epoch = next_policy_epoch(self.policy_epoch, generation);
                    self.policy_enforced = enforced;
                }
            }
        }
    }
}

/// The first policy epoch after `epoch` that selects `generation` (`epoch & 1`).
#[must_use]
pub fn next_policy_epoch(epoch: u32, generation: u8) -> u32 {
    let next = epoch.wrapping_add(1);
    if next & 1 == u32::from(generation & 1) {
        next
    } else {
        next.wrapping_add(1)
    }
}

/// The writes that turn `old` into `new`, ordered so no packet sees a half-written service.
#[must_use]
pub fn diff(old: &MapState, new: &MapState) -> Vec<Op> {
    let mut plan = Plan::default();
    plan.layer(
        &old.backends,
        &new.backends,
        |_| true,
        Op::UpsertBackend,
        Op::DeleteBackend,
    )
    .layer(
        &old.services,
        &new.services,
        |k| k.slot != 0,
        Op::UpsertService,
        Op::DeleteService,
    )
    .layer(
        &old.source_ranges,
        &new.source_ranges,
        |_| true,
        |r, ()| Op::UpsertSourceRange(r),
        Op::DeleteSourceRange,
    )
    .layer(
        &old.services,
        &new.services,
        |k| k.slot == 0,
        Op::UpsertService,
        Op::DeleteService,
    );
    plan.into_ops()
}

/// The map key of a frontend's slot in one scope (`SCOPE_*`).
#[must_use]
pub fn service_key(frontend: Frontend, scope: u8, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: u32::from_ne_bytes(frontend.addr.octets()),
        port: frontend.port.to_be(),
        proto: frontend.proto.number(),
        scope,
        slot,
        pad: 0,
    }
}

/// The backend map value of a backend address.
#[must_use]
pub fn backend_value(b: BackendAddr) -> Backend {
    Backend {
        addr: u32::from_ne_bytes(b.addr.octets()),
        port: b.port.to_be(),
        proto: b.proto.number(),
        flags: if b.local { BACKEND_LOCAL } else { 0 },
    }
}

/// A frontend's entries: per scope its header (slot 0: backend count, reverse-NAT id, flags),
/// then one slot per backend id, in order; and its source ranges. `ids` holds the backend id of
/// every backend of the spec; one without an id is left out.
pub fn service_entries(
    spec: &FrontendSpec,
    rev_nat_id: u16,
    ids: &BTreeMap<BackendAddr, u32>,
    state: &mut MapState,
) {
    let ranges = if spec.source_ranges.is_empty() {
        0
    } else {
        SVC_FLAG_SOURCE_RANGES
    };
    let internal = if spec.drop_empty {
        SVC_FLAG_DROP_EMPTY
    } else {
        0
    };
    scope_entries(
        spec.frontend,
        SCOPE_CLUSTER,
        internal | ranges,
        rev_nat_id,
        &spec.backends,
        ids,
        state,
    );
    if let Some(external) = &spec.external {
        let flags = if external.local {
            SVC_FLAG_EXTERNAL_LOCAL | SVC_FLAG_DROP_EMPTY
        } else {
            0
        };
        scope_entries(
            spec.frontend,
            SCOPE_EXTERNAL,
            flags | ranges,
            rev_nat_id,
            &external.backends,
            ids,
            state,
        );
    }
    for range in &spec.source_ranges {
        let key = SourceRange {
            key: SourceRangeKey {
                rev_nat_id,
                pad: 0,
                addr: u32::from_ne_bytes(range.addr.octets()),
            },
            prefix_len: SOURCE_RANGE_ID_BITS + u32::from(range.len),
        };
        state.source_ranges.insert(key, ());
    }
}

fn scope_entries(
    frontend: Frontend,
    scope: u8,
    flags: u32,
    rev_nat_id: u16,
    backends: &[BackendAddr],
    ids: &BTreeMap<BackendAddr, u32>,
    state: &mut MapState,
) {
    let backend_ids: Vec<u32> = backends
        .iter()
        .filter_map(|b| ids.get(b).copied())
        .collect();
    let count = u16::try_from(backend_ids.len()).unwrap_or(u16::MAX);
    state.services.insert(
        service_key(frontend, scope, 0),
        ServiceValue {
            backend_id: 0,
            count,
            rev_nat_id,
            flags,
        },
    );
    for (slot, id) in (1..=count).zip(backend_ids) {
        state.services.insert(
            service_key(frontend, scope, slot),
            ServiceValue {
                backend_id: id,
                count: 0,
                rev_nat_id,
                flags: 0,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::net::Cidr;
    use crate::translate::{ExternalSpec, Proto};

    fn backend(id: u32, port: u16) -> BackendAddr {
        BackendAddr {
            addr: Ipv4Addr::from(0x0a00_0000 + id),
            port,
            proto: Proto::Tcp,
            local: id.is_multiple_of(2),
        }
    }

    /// A consistent state: every header's slots and their backends exist. Odd services are also
    /// reachable from outside (with every other backend), every third has a source range.
    fn state(services: &BTreeMap<u8, Vec<u32>>, backends: &BTreeMap<u32, u16>) -> MapState {
        let mut s = MapState::default();
        let ids: BTreeMap<BackendAddr, u32> = backends
            .iter()
            .map(|(id, port)| (backend(*id, *port), *id))
            .collect();
        for (b, id) in &ids {
            s.backends.insert(*id, backend_value(*b));
        }
        for (svc, members) in services {
            let mine: Vec<BackendAddr> = members
                .iter()
                .filter_map(|i| backends.get(i).map(|p| backend(*i, *p)))
                .collect();
            let spec = FrontendSpec {
                frontend: Frontend {
                    addr: Ipv4Addr::new(10, 96, 0, *svc),
                    port: 80,
                    proto: Proto::Tcp,
                },
                external: (!svc.is_multiple_of(2)).then(|| ExternalSpec {
                    backends: mine.iter().step_by(2).copied().collect(),
                    local: svc % 4 == 1,
                }),
                source_ranges: if svc.is_multiple_of(3) {
                    vec![Cidr {
                        addr: Ipv4Addr::new(192, 0, 2, 0),
                        len: 24 + svc % 8,
                    }]
                } else {
                    Vec::new()
                },
                backends: mine,
                drop_empty: svc.is_multiple_of(5),
            };
            service_entries(&spec, u16::from(*svc), &ids, &mut s);
        }
        s
    }

    /// What a packet could see: every header's slots exist and point at existing backends, and a
    /// header that admits by source ranges has its ranges.
    fn no_half_service(s: &MapState) -> bool {
        s.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .all(|(k, h)| {
                let ranges = h.flags & SVC_FLAG_SOURCE_RANGES == 0
                    || s.source_ranges
                        .keys()
                        .any(|r| r.key.rev_nat_id == h.rev_nat_id);
                ranges
                    && (1..=h.count).all(|slot| {
                        s.services
                            .get(&ServiceKey { slot, ..*k })
                            .is_some_and(|v| s.backends.contains_key(&v.backend_id))
                    })
            })
    }

    fn arb_state() -> impl Strategy<Value = MapState> {
        (
            prop::collection::btree_map(0u8..6, prop::collection::vec(0u32..10, 0..5), 0..5),
            prop::collection::btree_map(0u32..10, 1u16..4, 0..10),
        )
            .prop_map(|(svcs, backends)| state(&svcs, &backends))
    }

    proptest! {
        #[test]
        fn applying_the_diff_gives_the_target(a in arb_state(), b in arb_state()) {
            let mut s = a.clone();
            s.apply(&diff(&a, &b));
            prop_assert_eq!(s, b);
        }

        #[test]
        fn no_intermediate_state_shows_a_half_service(a in arb_state(), b in arb_state()) {
            let mut s = a.clone();
            for op in diff(&a, &b) {
                s.apply(&[op]);
                prop_assert!(no_half_service(&s), "after {:?}", op);
            }
        }

        #[test]
        fn diff_of_equal_states_is_empty(a in arb_state()) {
            prop_assert!(diff(&a, &a).is_empty());
        }
    }
}
