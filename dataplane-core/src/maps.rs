//! The translation maps as user space models them: the writes ([`Op`]), their contents
//! ([`MapState`]), each Service's entries, and the ordered diff between two contents.
//!
//! A Service is only reachable through its header (slot 0), so the tables are layered (see
//! [`crate::table::Plan`]):
//!
//! ```text
//!  1 upsert backends   2 upsert slots 1..n   3 upsert headers     (a header never points past
//!  4 delete headers    5 delete slots        6 delete backends     written slots or backends)
//! ```
use std::collections::BTreeMap;

use dataplane_common::{BACKEND_ACTIVE, Backend, SCOPE_CLUSTER, ServiceKey, ServiceValue};

use crate::table::Plan;
use crate::translate::{BackendAddr, Frontend};

/// One map write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    UpsertBackend(u32, Backend),
    UpsertService(ServiceKey, ServiceValue),
    DeleteService(ServiceKey),
    DeleteBackend(u32),
}

/// The contents of the translation maps (or a part of them).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MapState {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
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
            }
        }
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
        &old.services,
        &new.services,
        |k| k.slot == 0,
        Op::UpsertService,
        Op::DeleteService,
    );
    plan.into_ops()
}

/// The map key of a frontend's slot.
#[must_use]
pub fn service_key(frontend: Frontend, slot: u16) -> ServiceKey {
    ServiceKey {
        addr: u32::from_ne_bytes(frontend.addr.octets()),
        port: frontend.port.to_be(),
        proto: frontend.proto.number(),
        scope: SCOPE_CLUSTER,
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
        state: BACKEND_ACTIVE,
    }
}

/// A frontend's entries: its header (slot 0: backend count and reverse-NAT id), then one slot per
/// backend id, in order.
pub fn service_entries(
    frontend: Frontend,
    rev_nat_id: u16,
    backend_ids: &[u32],
    state: &mut MapState,
) {
    let count = u16::try_from(backend_ids.len()).unwrap_or(u16::MAX);
    state.services.insert(
        service_key(frontend, 0),
        ServiceValue {
            backend_id: 0,
            count,
            rev_nat_id,
            flags: 0,
        },
    );
    for (slot, id) in (1..=count).zip(backend_ids) {
        state.services.insert(
            service_key(frontend, slot),
            ServiceValue {
                backend_id: *id,
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
    use crate::translate::Proto;

    /// A consistent state: every header's slots and their backends exist.
    fn state(services: &BTreeMap<u8, Vec<u32>>, backends: &BTreeMap<u32, u16>) -> MapState {
        let mut s = MapState::default();
        for (id, port) in backends {
            s.backends.insert(
                *id,
                Backend {
                    addr: *id,
                    port: *port,
                    proto: 6,
                    state: 0,
                },
            );
        }
        for (svc, ids) in services {
            let fe = Frontend {
                addr: Ipv4Addr::new(10, 96, 0, *svc),
                port: 80,
                proto: Proto::Tcp,
            };
            let ids: Vec<u32> = ids
                .iter()
                .filter(|i| backends.contains_key(i))
                .copied()
                .collect();
            service_entries(fe, u16::from(*svc), &ids, &mut s);
        }
        s
    }

    /// What a packet could see: every header's slots exist and point at existing backends.
    fn no_half_service(s: &MapState) -> bool {
        s.services
            .iter()
            .filter(|(k, _)| k.slot == 0)
            .all(|(k, h)| {
                (1..=h.count).all(|slot| {
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
