//! Pure diff between two sets of map entries, as the ordered writes that turn one into the other.
//!
//! Order matters because packets read the maps while they change. A service is only reachable
//! through its header (slot 0), so:
//!
//! ```text
//!  1 upsert backends   2 upsert slots 1..n   3 upsert headers     (a header never points past
//!  4 delete headers    5 delete slots        6 delete backends     written slots or backends)
//! ```
use std::collections::BTreeMap;

use dataplane_common::{Backend, ServiceKey, ServiceValue};

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
    let mut backend_upserts = Vec::new();
    let mut slot_upserts = Vec::new();
    let mut header_upserts = Vec::new();
    let mut header_deletes = Vec::new();
    let mut slot_deletes = Vec::new();
    let mut backend_deletes = Vec::new();

    for (id, b) in &new.backends {
        if old.backends.get(id) != Some(b) {
            backend_upserts.push(Op::UpsertBackend(*id, *b));
        }
    }
    for (k, v) in &new.services {
        if old.services.get(k) != Some(v) {
            let op = Op::UpsertService(*k, *v);
            if k.slot == 0 {
                header_upserts.push(op);
            } else {
                slot_upserts.push(op);
            }
        }
    }
    for k in old.services.keys() {
        if !new.services.contains_key(k) {
            let op = Op::DeleteService(*k);
            if k.slot == 0 {
                header_deletes.push(op);
            } else {
                slot_deletes.push(op);
            }
        }
    }
    for id in old.backends.keys() {
        if !new.backends.contains_key(id) {
            backend_deletes.push(Op::DeleteBackend(*id));
        }
    }
    let mut ops = backend_upserts;
    ops.extend(slot_upserts);
    ops.extend(header_upserts);
    ops.extend(header_deletes);
    ops.extend(slot_deletes);
    ops.extend(backend_deletes);
    ops
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use proptest::prelude::*;

    use super::*;
    use crate::program::service_key;
    use crate::translate::{Frontend, Proto};

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
            s.services.insert(
                service_key(fe, 0),
                ServiceValue {
                    backend_id: 0,
                    count: ids.len() as u16,
                    rev_nat_id: u16::from(*svc),
                    flags: 0,
                },
            );
            for (slot, id) in ids.iter().enumerate() {
                s.services.insert(
                    service_key(fe, slot as u16 + 1),
                    ServiceValue {
                        backend_id: *id,
                        count: 0,
                        rev_nat_id: u16::from(*svc),
                        flags: 0,
                    },
                );
            }
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
