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
