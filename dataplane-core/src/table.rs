//! Generic reconcile pieces: the ordered writes between two versions of a set of keyed tables, and
//! stable id allocation.
//!
//! Packets read the maps while they change, so tables are layered: an entry may point at entries
//! of lower layers (a Service header at its slots, a slot at a backend). A [`Plan`] writes upserts
//! bottom-up and deletes top-down, so no intermediate state has an entry pointing at nothing:
//!
//! ```text
//!  upserts: layer 0, layer 1, .. layer n      then      deletes: layer n, .. layer 1, layer 0
//! ```
use std::collections::BTreeMap;

/// The writes that turn old tables into new ones, layer by layer.
#[derive(Debug)]
pub struct Plan<Op> {
    upserts: Vec<Vec<Op>>,
    deletes: Vec<Vec<Op>>,
}

impl<Op> Default for Plan<Op> {
    fn default() -> Self {
        Self {
            upserts: Vec::new(),
            deletes: Vec::new(),
        }
    }
}

impl<Op> Plan<Op> {
    /// Adds the next layer up: the entries of `old` and `new` whose key passes `keep`, with the
    /// write that upserts and the write that deletes one entry.
    pub fn layer<K: Ord + Copy, V: PartialEq + Copy>(
        &mut self,
        old: &BTreeMap<K, V>,
        new: &BTreeMap<K, V>,
        keep: impl Fn(&K) -> bool,
        upsert: impl Fn(K, V) -> Op,
        delete: impl Fn(K) -> Op,
    ) -> &mut Self {
        self.upserts.push(
            new.iter()
                .filter(|(k, v)| keep(k) && old.get(k) != Some(v))
                .map(|(k, v)| upsert(*k, *v))
                .collect(),
        );
        self.deletes.push(
            old.keys()
                .filter(|k| keep(k) && !new.contains_key(k))
                .map(|k| delete(*k))
                .collect(),
        );
        self
    }

    /// Every write in order: upserts from the lowest layer up, then deletes from the top down.
    #[must_use]
    pub fn into_ops(self) -> Vec<Op> {
        let mut ops: Vec<Op> = self.upserts.into_iter().flatten().collect();
        ops.extend(self.deletes.into_iter().rev().flatten());
        ops
    }
}

/// Ids `1..max`, reused after release (most recently released first).
#[derive(Clone, Debug)]
pub struct IdPool {
    next: u32,
    max: u32,
    free: Vec<u32>,
}

impl IdPool {
    #[must_use]
    pub fn new(max: u32) -> Self {
        Self {
            next: 1,
            max,
            free: Vec::new(),
        }
    }

    /// A free id, or `None` when all are taken.
    pub fn take(&mut self) -> Option<u32> {
        self.free.pop().or_else(|| {
            (self.next < self.max).then(|| {
                self.next += 1;
                self.next - 1
            })
        })
    }

    pub fn give(&mut self, id: u32) {
        self.free.push(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upserts_go_bottom_up_and_deletes_top_down() {
        let old = BTreeMap::from([(1, 'a'), (2, 'b')]);
        let new = BTreeMap::from([(2, 'B'), (3, 'c')]);
        let mut plan = Plan::default();
        plan.layer(
            &old,
            &new,
            |_| true,
            |k, v| format!("+low{k}{v}"),
            |k| format!("-low{k}"),
        )
        .layer(
            &old,
            &new,
            |k| *k > 1,
            |k, v| format!("+high{k}{v}"),
            |k| format!("-high{k}"),
        );
        assert_eq!(
            plan.into_ops(),
            ["+low2B", "+low3c", "+high2B", "+high3c", "-low1"]
        );
    }

    #[test]
    fn ids_are_reused_and_bounded() {
        let mut pool = IdPool::new(3);
        assert_eq!(
            (pool.take(), pool.take(), pool.take()),
            (Some(1), Some(2), None)
        );
        pool.give(1);
        assert_eq!(pool.take(), Some(1));
    }
}
