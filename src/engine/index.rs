//! The live-session index: `client_id` → session slab index, in 4 bytes a
//! slot.
//!
//! A general hash map stores each key beside its value; this table stores
//! only the slab index and compares the key by reading the session, which
//! every lookup reads next anyway. Open addressing with linear probing, at
//! most half full, with backward-shift deletion (no tombstones, so a churn
//! of sessions never degrades it). A million sessions take 8 MB here, where
//! a `HashMap<u64, u32>` takes over 30.
//!
//! Client ids are chosen by whoever sends a HELLO, so the hash is seeded
//! per process: an attacker cannot aim many ids at one probe run.

use std::hash::BuildHasher;

/// Slot value for "empty"; occupied slots hold `index + 1`, so a fresh
/// zeroed allocation is an empty table (and costs no memory until used).
const EMPTY: u32 = 0;

pub(crate) struct ClientIndex {
    slots: Vec<u32>,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl ClientIndex {
    /// Room for `expected` entries without growing.
    pub(crate) fn with_capacity(expected: usize) -> ClientIndex {
        ClientIndex {
            slots: vec![EMPTY; (2 * expected).next_power_of_two().max(16)],
            len: 0,
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    #[inline]
    fn home(&self, client_id: u64) -> usize {
        self.hasher.hash_one(client_id) as usize & (self.slots.len() - 1)
    }

    /// Reads the slot a lookup of `client_id` starts at, so that a batch
    /// can issue all its cache misses before it needs any of them.
    #[inline]
    pub(crate) fn touch(&self, client_id: u64) -> u32 {
        self.slots[self.home(client_id)]
    }

    /// The index whose session has `client_id`; `key_of` reads the
    /// `client_id` of the session at an index.
    #[inline]
    pub(crate) fn get(&self, client_id: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut i = self.home(client_id);
        loop {
            match self.slots[i] {
                EMPTY => return None,
                slot if key_of(slot - 1) == client_id => return Some(slot - 1),
                _ => i = (i + 1) & mask,
            }
        }
    }

    /// Adds `client_id` → `index`; the id must not be present.
    pub(crate) fn insert(&mut self, client_id: u64, index: u32, key_of: impl Fn(u32) -> u64) {
        debug_assert!(
            self.get(client_id, &key_of).is_none(),
            "{client_id} indexed twice"
        );
        if 2 * (self.len + 1) > self.slots.len() {
            self.grow(&key_of);
        }
        let mask = self.slots.len() - 1;
        let mut i = self.home(client_id);
        while self.slots[i] != EMPTY {
            i = (i + 1) & mask;
        }
        self.slots[i] = index + 1;
        self.len += 1;
    }

    /// Removes `client_id`; returns its index if it was present.
    pub(crate) fn remove(&mut self, client_id: u64, key_of: impl Fn(u32) -> u64) -> Option<u32> {
        let mask = self.slots.len() - 1;
        let mut hole = self.home(client_id);
        loop {
            match self.slots[hole] {
                EMPTY => return None,
                slot if key_of(slot - 1) == client_id => break,
                _ => hole = (hole + 1) & mask,
            }
        }
        let removed = self.slots[hole] - 1;
        self.slots[hole] = EMPTY;
        self.len -= 1;
        // Shift back every later entry of the run that may not sit past
        // the hole, so lookups never meet a gap before their entry.
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let slot = self.slots[j];
            if slot == EMPTY {
                return Some(removed);
            }
            let home = self.home(key_of(slot - 1));
            // Distance from home to j, and from home to the hole: the entry
            // may move into the hole only if the hole lies on its probe path.
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.slots[hole] = slot;
                self.slots[j] = EMPTY;
                hole = j;
            }
        }
    }

    fn grow(&mut self, key_of: impl Fn(u32) -> u64) {
        let doubled = vec![EMPTY; self.slots.len() * 2];
        let old = std::mem::replace(&mut self.slots, doubled);
        let mask = self.slots.len() - 1;
        for slot in old.into_iter().filter(|&s| s != EMPTY) {
            let mut i = self.home(key_of(slot - 1));
            while self.slots[i] != EMPTY {
                i = (i + 1) & mask;
            }
            self.slots[i] = slot;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Against a HashMap, through inserts and removes that force
        /// growth, wrap-around runs and backward shifts.
        #[test]
        fn matches_hashmap(ops in prop::collection::vec((any::<bool>(), 0u64..200), 1..600)) {
            // Session i has client_id ids[i]; ids are dense so keys collide.
            let mut ids: Vec<u64> = Vec::new();
            let mut index = ClientIndex::with_capacity(4);
            let mut model: HashMap<u64, u32> = HashMap::new();
            for (insert, client_id) in ops {
                if insert && !model.contains_key(&client_id) {
                    ids.push(client_id);
                    let i = (ids.len() - 1) as u32;
                    index.insert(client_id, i, |i| ids[i as usize]);
                    model.insert(client_id, i);
                } else if !insert {
                    let got = index.remove(client_id, |i| ids[i as usize]);
                    prop_assert_eq!(got, model.remove(&client_id));
                }
                prop_assert_eq!(index.len(), model.len());
                for (&id, &i) in &model {
                    prop_assert_eq!(index.get(id, |i| ids[i as usize]), Some(i));
                }
                prop_assert_eq!(index.get(1_000_000, |i| ids[i as usize]), None);
            }
        }
    }
}
