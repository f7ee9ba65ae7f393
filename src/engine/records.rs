//! What the engine remembers about clients after their sessions end: the
//! largest incarnation each one used, so that a delayed or replayed HELLO of
//! an ended session is recognised as stale and cannot revive it.
//!
//! The protocol asks for the record to be kept "for as long as the server
//! keeps any record of that client and for at least 10 minutes after the
//! client's last session ended", with a bounded number of records, oldest
//! first. Three rules make that hold against a hostile client:
//!
//! - **One record per client.** Records live in a map keyed by client_id, and
//!   the count that bounds them is the map's size. A client that ends its own
//!   sessions a million times updates one record; it cannot push other
//!   clients' records out.
//! - **Age by the session's end.** The records are threaded, oldest first,
//!   on a doubly linked list through the map (each record names the client
//!   ids before and after it), so ending another session of a client moves
//!   its record to the back, and ageing or the count bound takes from the
//!   front: every step O(1), with nothing stale to compact.
//! - **Pinned while a slot is held.** An ended session whose tasks are still
//!   running keeps its slab slot (so their final states can still be pushed).
//!   Each such session pins its client's record: neither age nor count
//!   removes a pinned record, and one whose time ran out while pinned goes
//!   when the last pin is released. Otherwise a HELLO of that incarnation,
//!   arriving after the record aged out, would open a second session with the
//!   same `(client_id, incarnation)` as the lingering one. Pins are bounded by
//!   the tasks still on workers.
//!
//! ```text
//!   retire(c, inc) ──► records[c] = max(inc), pins + 1 ──► to the back of the list
//!   release(c)     ──► pins - 1; a lapsed record with no pin left goes now
//!   age(now)       ──► from the front while 10 min old: pinned → lapsed (off the list), else forget
//! ```

use super::{FastMap, Timestamp};

/// "No client": client ids are never 0 on the wire.
const NONE: u64 = 0;

#[derive(Debug, Clone, Copy)]
struct Record {
    /// Largest incarnation of an ended session of this client.
    incarnation: u64,
    /// When its last session ended.
    ended: Timestamp,
    /// Ended sessions of this client that still hold a slab slot.
    pins: u32,
    /// Its time (or its turn under the count bound) came while it was
    /// pinned: it is off the list, and goes when the last pin goes.
    lapsed: bool,
    /// Its neighbours on the list, older and newer.
    prev: u64,
    next: u64,
}

#[derive(Debug)]
pub(crate) struct ClientRecords {
    records: FastMap<u64, Record>,
    /// The oldest and newest record on the list.
    head: u64,
    tail: u64,
    /// Records on the list (not lapsed).
    listed: usize,
    /// Records with at least one pin; they do not count against `max`.
    pinned: usize,
    max: usize,
    memory_us: u64,
}

impl ClientRecords {
    pub(crate) fn new(max: usize, memory_ms: u64) -> ClientRecords {
        ClientRecords {
            records: FastMap::default(),
            head: NONE,
            tail: NONE,
            listed: 0,
            pinned: 0,
            max,
            memory_us: memory_ms.saturating_mul(1000),
        }
    }

    /// Records kept now (one per client).
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }

    /// Records on the ageing list.
    #[cfg(test)]
    pub(crate) fn listed(&self) -> usize {
        self.listed
    }

    /// The largest incarnation of an ended session of `client_id`, if the
    /// client is remembered.
    pub(crate) fn largest_ended(&self, client_id: u64) -> Option<u64> {
        self.records.get(&client_id).map(|r| r.incarnation)
    }

    /// A session of `client_id` with `incarnation` ended at `now`. It pins
    /// the record until [`ClientRecords::release`] says its slot is free.
    pub(crate) fn retire(&mut self, client_id: u64, incarnation: u64, now: Timestamp) {
        debug_assert_ne!(client_id, NONE);
        match self.records.get(&client_id).copied() {
            Some(r) => {
                if !r.lapsed {
                    self.unlink(client_id);
                }
                let record = self.records.get_mut(&client_id).expect("present");
                record.incarnation = r.incarnation.max(incarnation);
                record.ended = now;
                record.lapsed = false;
                record.pins += 1;
                if record.pins == 1 {
                    self.pinned += 1;
                }
            }
            None => {
                self.records.insert(
                    client_id,
                    Record {
                        incarnation,
                        ended: now,
                        pins: 1,
                        lapsed: false,
                        prev: NONE,
                        next: NONE,
                    },
                );
                self.pinned += 1;
            }
        }
        self.push_back(client_id);
        self.evict_over_count();
    }

    /// An ended session of `client_id` gave up its slab slot.
    pub(crate) fn release(&mut self, client_id: u64) {
        let Some(record) = self.records.get_mut(&client_id) else {
            debug_assert!(false, "release of {client_id} without a record");
            return;
        };
        debug_assert!(
            record.pins > 0,
            "release of unpinned {client_id}: {record:?}"
        );
        record.pins = record.pins.saturating_sub(1);
        if record.pins == 0 {
            self.pinned -= 1;
            if record.lapsed {
                self.records.remove(&client_id);
            } else {
                self.evict_over_count();
            }
        }
    }

    /// A new session of `client_id` opened: while it lives it holds the
    /// largest incarnation itself, so an unpinned record can go.
    pub(crate) fn opened(&mut self, client_id: u64) {
        if self.records.get(&client_id).is_some_and(|r| r.pins == 0) {
            self.unlink(client_id);
            self.records.remove(&client_id);
        }
    }

    /// Forgets the records whose session ended `memory` ago or more.
    pub(crate) fn age(&mut self, now: Timestamp) {
        while self.head != NONE {
            let ended = self.records[&self.head].ended;
            if now.0.saturating_sub(ended.0) < self.memory_us {
                break;
            }
            self.lapse(self.head);
        }
    }

    /// Past the bound, the oldest unpinned records go first.
    fn evict_over_count(&mut self) {
        while self.records.len() - self.pinned > self.max && self.head != NONE {
            self.lapse(self.head);
        }
    }

    /// Takes `client_id` off the list: forgotten now, or, while pinned,
    /// when its last pin goes.
    fn lapse(&mut self, client_id: u64) {
        self.unlink(client_id);
        let record = self.records.get_mut(&client_id).expect("listed");
        if record.pins > 0 {
            record.lapsed = true;
        } else {
            self.records.remove(&client_id);
        }
    }

    fn push_back(&mut self, client_id: u64) {
        let tail = self.tail;
        {
            let record = self.records.get_mut(&client_id).expect("present");
            record.prev = tail;
            record.next = NONE;
        }
        if tail == NONE {
            self.head = client_id;
        } else {
            self.records.get_mut(&tail).expect("listed").next = client_id;
        }
        self.tail = client_id;
        self.listed += 1;
    }

    fn unlink(&mut self, client_id: u64) {
        let Record { prev, next, .. } = self.records[&client_id];
        if prev == NONE {
            self.head = next;
        } else {
            self.records.get_mut(&prev).expect("listed").next = next;
        }
        if next == NONE {
            self.tail = prev;
        } else {
            self.records.get_mut(&next).expect("listed").prev = prev;
        }
        self.listed -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MINUTE_US: u64 = 60_000_000;

    #[test]
    fn a_churning_client_keeps_one_record_and_evicts_nobody_else() {
        let mut r = ClientRecords::new(10, 600_000);
        for client in 1..=5 {
            r.retire(client, 100, Timestamp(0));
            r.release(client);
        }
        for incarnation in 1..=100_000u64 {
            r.retire(99, incarnation, Timestamp(incarnation));
            r.release(99);
        }
        for client in 1..=5 {
            assert_eq!(r.largest_ended(client), Some(100), "client {client}");
        }
        assert_eq!(r.largest_ended(99), Some(100_000));
        assert_eq!(r.len(), 6);
        assert_eq!(r.listed(), 6);
    }

    #[test]
    fn records_age_out_after_the_memory_but_not_while_pinned() {
        let mut r = ClientRecords::new(10, 600_000);
        r.retire(1, 7, Timestamp(0));
        r.release(1);
        r.retire(2, 8, Timestamp(0)); // its session still holds a slot
        r.age(Timestamp(10 * MINUTE_US - 1));
        assert_eq!(r.largest_ended(1), Some(7));
        r.age(Timestamp(10 * MINUTE_US));
        assert_eq!(r.largest_ended(1), None);
        assert_eq!(
            r.largest_ended(2),
            Some(8),
            "pinned records outlive their time"
        );
        r.age(Timestamp(60 * MINUTE_US));
        assert_eq!(r.largest_ended(2), Some(8));
        r.release(2);
        assert_eq!(r.largest_ended(2), None, "gone with its last pin");
    }

    #[test]
    fn the_count_bound_skips_pinned_records() {
        let mut r = ClientRecords::new(2, 600_000);
        r.retire(1, 1, Timestamp(0)); // pinned
        for client in 2..=5 {
            r.retire(client, 1, Timestamp(client));
            r.release(client);
        }
        assert_eq!(r.largest_ended(1), Some(1));
        assert_eq!(r.len(), 3, "two unpinned plus the pinned one");
        assert_eq!(r.largest_ended(4), Some(1));
        assert_eq!(r.largest_ended(5), Some(1));
        r.release(1);
        assert_eq!(r.largest_ended(1), None);
    }

    #[test]
    fn opening_a_session_drops_only_an_unpinned_record() {
        let mut r = ClientRecords::new(10, 600_000);
        r.retire(1, 5, Timestamp(0));
        r.opened(1);
        assert_eq!(
            r.largest_ended(1),
            Some(5),
            "pinned: its slot is still held"
        );
        r.release(1);
        r.opened(1);
        assert_eq!(r.largest_ended(1), None);
    }

    proptest! {
        /// Against a model: the record of a client is its largest ended
        /// incarnation, never forgotten while pinned or younger than the
        /// memory unless the count bound pushed it out; the count bound
        /// holds for unpinned records, and the queue stays bounded.
        #[test]
        fn bounded_and_never_forgets_a_pinned_client(
            ops in proptest::collection::vec((0u8..3, 1u64..7, 0u64..4), 1..400)
        ) {
            let max = 3;
            let mut r = ClientRecords::new(max, 1);
            let mut pins = std::collections::HashMap::<u64, u32>::new();
            let mut largest = std::collections::HashMap::<u64, u64>::new();
            let mut now = 0u64;
            let mut incarnation = 0u64;
            for (op, client, step) in ops {
                match op {
                    0 => {
                        incarnation += 1;
                        r.retire(client, incarnation, Timestamp(now));
                        *pins.entry(client).or_default() += 1;
                        largest.insert(client, incarnation);
                    }
                    1 => {
                        if pins.get(&client).copied().unwrap_or(0) > 0 {
                            r.release(client);
                            *pins.get_mut(&client).unwrap() -= 1;
                        }
                    }
                    _ => {
                        now += step * 400;
                        r.age(Timestamp(now));
                    }
                }
                for (client, &n) in &pins {
                    if n > 0 {
                        prop_assert_eq!(r.largest_ended(*client), largest.get(client).copied());
                    }
                }
                let pinned = pins.values().filter(|&&n| n > 0).count();
                prop_assert!(r.len() <= max + pinned);
                prop_assert!(r.listed() <= r.len());
            }
        }
    }
}
