//! A hashed timing wheel with lazy re-filing, keyed by dense slab indices.
//!
//! # Implementation
//!
//! This is scheme 6 of Varghese & Lauck, "Hashed and Hierarchical Timing
//! Wheels" (SOSP 1987): [`SLOTS`] slots, each a doubly linked list threaded
//! through a node array indexed by the caller's key, so the wheel allocates
//! nothing per timer. An entry is filed in the slot of the tick at which it
//! must next be looked at, never more than `SLOTS` ticks ahead:
//!
//! ```text
//!   now = 1000                    filed ticks always lie in (now, now + SLOTS]
//!   slot  1001 % 4096   1002 % 4096   ...   5096 % 4096 (= slot of now)
//!         [a]->[b]      []                  [z]        <- z's deadline may be
//!                                                        far beyond 5096: it is
//!                                                        re-filed when visited
//!   occupied: 4096-bit bitmap + a 64-bit summary of its words
//! ```
//!
//! The heartbeat path is [`Wheel::deadline`] and [`Wheel::extend`] to a later
//! deadline, one read and one store in the deadline array, which also tells
//! whether a key is present (0: absent), so a heartbeat touches one cache line
//! of the wheel: the entry stays where it is filed, and only when its slot
//! comes round does [`Wheel::advance`] find the deadline has moved and re-file
//! it. A client heartbeating every second with a three-second TTL is thus
//! touched by the wheel about once per TTL rather than once per heartbeat.
//! Only a reset to an *earlier* tick than the filed one moves the entry now,
//! since waiting for its slot would expire it late.
//!
//! Invariants: every entry's filed tick `f` satisfies `now < f ≤ deadline`
//! and `f ≤ now + SLOTS`; a visit at tick `f` therefore never misses a due
//! entry (no early or late expiry), and the occupancy bitmap tells the next
//! tick at which a visit can have work ([`Wheel::next_due`]), so the caller
//! sleeps until then and an empty wheel never wakes it.
//!
//! Time is [`Tick`]s passed in by the caller; the wheel never reads a clock.

use std::fmt;

/// Number of slots; a power of two so `tick % SLOTS` is a mask.
pub const SLOTS: usize = 4096;
const MASK: u64 = SLOTS as u64 - 1;
const WORDS: usize = SLOTS / 64;
const NIL: u32 = u32::MAX;
/// The deadline of a key not in the wheel. A filed deadline is after `now`,
/// so it is never 0.
const ABSENT: u64 = 0;

/// A point in wheel time: a count of ticks from an origin the caller chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Tick(pub u64);

/// The key of an entry: the index of its owner in the caller's slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WheelKey(pub u32);

/// An entry [`Wheel::advance`] found due, with the deadline it had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    /// The entry's key.
    pub key: WheelKey,
    /// Its deadline, at or before the tick advanced to.
    pub deadline: Tick,
}

/// Largest deadline the wheel stores; later ones are kept as this (at a
/// 10 ms tick that is some 89,000 years away, so "never").
pub const MAX_DEADLINE: Tick = Tick((1 << 48) - 1);

/// An entry's place in its slot's list: 12 bytes. Deadlines (and so
/// presence) live in their own array, so a heartbeat, which reads and moves
/// a deadline, touches nothing else.
#[derive(Debug, Clone, Copy)]
struct Link {
    next: u32,
    prev: u32,
    /// The slot the entry is filed in, while it is present.
    slot: u16,
}

const UNLINKED: Link = Link {
    next: NIL,
    prev: NIL,
    slot: 0,
};

/// The timing wheel. See the module documentation.
pub struct Wheel {
    links: Vec<Link>,
    deadlines: Vec<u64>,
    heads: Box<[u32]>,
    occupied: [u64; WORDS],
    /// Bit `w` is set when `occupied[w]` is non-zero.
    summary: u64,
    now: u64,
    len: usize,
    /// Slot lists detached during an advance; kept to reuse its allocation.
    detached: Vec<u32>,
}

impl Wheel {
    /// An empty wheel whose ticks up to and including `now` count as past.
    pub fn new(now: Tick) -> Wheel {
        Wheel {
            links: Vec::new(),
            deadlines: Vec::new(),
            heads: vec![NIL; SLOTS].into_boxed_slice(),
            occupied: [0; WORDS],
            summary: 0,
            now: now.0,
            len: 0,
            detached: Vec::with_capacity(SLOTS),
        }
    }

    /// Reserves room for keys below `keys`, so the hot path never
    /// reallocates. Untouched capacity costs address space, not memory.
    pub fn reserve_keys(&mut self, keys: usize) {
        self.links.reserve(keys.saturating_sub(self.links.len()));
        self.deadlines
            .reserve(keys.saturating_sub(self.deadlines.len()));
    }

    /// The last tick processed by [`Wheel::advance`].
    pub fn now(&self) -> Tick {
        Tick(self.now)
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the wheel holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn is_present(&self, i: usize) -> bool {
        self.deadline(WheelKey(i as u32)).is_some()
    }

    /// The deadline of `key`, if it is in the wheel.
    pub fn deadline(&self, key: WheelKey) -> Option<Tick> {
        let i = key.0 as usize;
        self.deadlines
            .get(i)
            .filter(|&&d| d != ABSENT)
            .map(|&d| Tick(d))
    }

    /// Adds `key` to expire at `deadline` (at most [`MAX_DEADLINE`]). Call
    /// once per key; a key already present is refused, as is a deadline
    /// that has already passed (the caller decides what an elapsed deadline
    /// means).
    pub fn insert(&mut self, key: WheelKey, deadline: Tick) -> Result<(), WheelError> {
        if deadline.0 <= self.now {
            return Err(WheelError::Elapsed);
        }
        let i = key.0 as usize;
        if i >= self.links.len() {
            self.links.resize(i + 1, UNLINKED);
            self.deadlines.resize(i + 1, ABSENT);
        }
        if self.deadlines[i] != ABSENT {
            return Err(WheelError::Occupied);
        }
        let deadline = deadline.0.min(MAX_DEADLINE.0);
        self.deadlines[i] = deadline;
        self.file(key.0, deadline.min(self.now + SLOTS as u64));
        self.len += 1;
        Ok(())
    }

    /// Moves the deadline of a present `key` to `deadline`, which must not
    /// be earlier than its current one: a single store, the heartbeat's
    /// whole cost in the wheel. The entry stays where it is filed and is
    /// re-filed when its slot comes round. (A later deadline can never be
    /// due before the filed tick, which is what makes the store enough.)
    #[inline]
    pub fn extend(&mut self, key: WheelKey, deadline: Tick) {
        let i = key.0 as usize;
        debug_assert!(
            self.is_present(i) && deadline.0 >= self.deadlines[i],
            "extend({i}, {}) of {:?} with deadline {:?}",
            deadline.0,
            self.links.get(i),
            self.deadlines.get(i)
        );
        // Never 0, which would make the entry look absent.
        self.deadlines[i] = deadline.0.clamp(1, MAX_DEADLINE.0);
    }

    /// Moves the deadline of `key` either way. A later deadline is one
    /// store and the entry stays where it is filed; an earlier one re-files
    /// it at once.
    pub fn reset(&mut self, key: WheelKey, deadline: Tick) -> Result<(), WheelError> {
        if deadline.0 <= self.now {
            return Err(WheelError::Elapsed);
        }
        let i = key.0 as usize;
        if !self.is_present(i) {
            return Err(WheelError::Absent);
        }
        let deadline = deadline.0.min(MAX_DEADLINE.0);
        self.deadlines[i] = deadline;
        if deadline < Self::filed_tick(self.now, self.links[i].slot) {
            self.unlink(key.0);
            self.file(key.0, deadline);
        }
        Ok(())
    }

    /// Removes `key`; returns whether it was present.
    pub fn remove(&mut self, key: WheelKey) -> bool {
        if !self.is_present(key.0 as usize) {
            return false;
        }
        self.unlink(key.0);
        self.deadlines[key.0 as usize] = ABSENT;
        self.len -= 1;
        true
    }

    /// The earliest tick at which [`Wheel::advance`] can have work: an
    /// expiry, or an entry to re-file because its deadline moved. `None`
    /// when the wheel is empty. Sleeping until then never delays an expiry.
    pub fn next_due(&self) -> Option<Tick> {
        let start = ((self.now + 1) & MASK) as usize;
        let slot = self.next_occupied(start)?;
        let distance = (slot as u64).wrapping_sub(start as u64) & MASK;
        Some(Tick(self.now + 1 + distance))
    }

    /// Processes every tick up to and including `to`: appends the keys whose
    /// deadline is at or before `to` to `expired` (removing them) and
    /// re-files the entries whose deadline has moved. A `to` at or before
    /// [`Wheel::now`] does nothing.
    pub fn advance(&mut self, to: Tick, expired: &mut Vec<Expired>) {
        let to = to.0;
        if to <= self.now {
            return;
        }
        let span = to - self.now;
        let start = ((self.now + 1) & MASK) as usize;
        // Detach every slot whose tick falls in (now, to] before touching any
        // entry, so a re-filed entry can never land in a list still to visit.
        while let Some(slot) = self.next_occupied(start) {
            let distance = (slot as u64).wrapping_sub(start as u64) & MASK;
            if distance >= span {
                break;
            }
            self.detached.push(self.heads[slot]);
            self.heads[slot] = NIL;
            self.clear_occupied(slot);
        }
        self.now = to;
        let horizon = to + SLOTS as u64;
        let mut detached = std::mem::take(&mut self.detached);
        for &head in &detached {
            let mut i = head;
            while i != NIL {
                let next = self.links[i as usize].next;
                let deadline = self.deadlines[i as usize];
                if deadline <= to {
                    self.deadlines[i as usize] = ABSENT;
                    self.len -= 1;
                    expired.push(Expired {
                        key: WheelKey(i),
                        deadline: Tick(deadline),
                    });
                } else {
                    self.file(i, deadline.min(horizon));
                }
                i = next;
            }
        }
        detached.clear();
        self.detached = detached;
    }

    fn filed_tick(now: u64, slot: u16) -> u64 {
        let start = (now + 1) & MASK;
        now + 1 + ((u64::from(slot).wrapping_sub(start)) & MASK)
    }

    fn file(&mut self, i: u32, tick: u64) {
        debug_assert!(
            tick > self.now && tick <= self.now + SLOTS as u64,
            "filing key {i} at tick {tick} outside ({}, {}]",
            self.now,
            self.now + SLOTS as u64
        );
        let slot = (tick & MASK) as usize;
        let head = self.heads[slot];
        if head != NIL {
            self.links[head as usize].prev = i;
        }
        self.links[i as usize] = Link {
            next: head,
            prev: NIL,
            slot: slot as u16,
        };
        self.heads[slot] = i;
        self.occupied[slot / 64] |= 1 << (slot % 64);
        self.summary |= 1 << (slot / 64);
    }

    fn unlink(&mut self, i: u32) {
        let Link { next, prev, slot } = self.links[i as usize];
        let slot = usize::from(slot);
        if prev == NIL {
            self.heads[slot] = next;
            if next == NIL {
                self.clear_occupied(slot);
            }
        } else {
            self.links[prev as usize].next = next;
        }
        if next != NIL {
            self.links[next as usize].prev = prev;
        }
    }

    fn clear_occupied(&mut self, slot: usize) {
        let word = slot / 64;
        self.occupied[word] &= !(1 << (slot % 64));
        if self.occupied[word] == 0 {
            self.summary &= !(1 << word);
        }
    }

    /// The first occupied slot at or after `start`, wrapping round.
    fn next_occupied(&self, start: usize) -> Option<usize> {
        if self.summary == 0 {
            return None;
        }
        let word = start / 64;
        let here = self.occupied[word] & (!0u64 << (start % 64));
        if here != 0 {
            return Some(word * 64 + here.trailing_zeros() as usize);
        }
        let later = self.summary & (!0u64).checked_shl(word as u32 + 1).unwrap_or(0);
        // With nothing after `start`, wrap to the lowest occupied word; that
        // may be `word` itself, below `start`.
        let w = if later != 0 {
            later.trailing_zeros()
        } else {
            self.summary.trailing_zeros()
        } as usize;
        Some(w * 64 + self.occupied[w].trailing_zeros() as usize)
    }
}

impl fmt::Debug for Wheel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Wheel")
            .field("now", &self.now)
            .field("len", &self.len)
            .field("next_due", &self.next_due())
            .finish()
    }
}

/// Why a wheel operation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WheelError {
    /// The deadline is at or before the wheel's `now`.
    Elapsed,
    /// `insert` of a key already present.
    Occupied,
    /// `reset` of a key not present.
    Absent,
}

impl fmt::Display for WheelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            WheelError::Elapsed => "deadline has already passed",
            WheelError::Occupied => "key is already in the wheel",
            WheelError::Absent => "key is not in the wheel",
        })
    }
}

impl std::error::Error for WheelError {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn advance(w: &mut Wheel, to: u64) -> Vec<u32> {
        let mut out = Vec::new();
        w.advance(Tick(to), &mut out);
        for e in &out {
            assert!(e.deadline.0 <= to, "{e:?} expired at {to}");
        }
        let mut keys: Vec<u32> = out.into_iter().map(|e| e.key.0).collect();
        keys.sort_unstable();
        keys
    }

    #[test]
    fn expires_exactly_at_deadline() {
        let mut w = Wheel::new(Tick(0));
        w.insert(WheelKey(3), Tick(10)).unwrap();
        assert_eq!(w.next_due(), Some(Tick(10)));
        assert!(advance(&mut w, 9).is_empty());
        assert_eq!(advance(&mut w, 10), vec![3]);
        assert!(w.is_empty());
        assert_eq!(w.next_due(), None);
    }

    #[test]
    fn reset_later_is_lazy_and_reset_earlier_refiles() {
        let mut w = Wheel::new(Tick(0));
        w.insert(WheelKey(0), Tick(100)).unwrap();
        w.reset(WheelKey(0), Tick(250)).unwrap();
        // Still filed at 100: the wheel wakes there and re-files.
        assert_eq!(w.next_due(), Some(Tick(100)));
        assert!(advance(&mut w, 100).is_empty());
        assert_eq!(w.next_due(), Some(Tick(250)));
        w.reset(WheelKey(0), Tick(120)).unwrap();
        assert_eq!(w.next_due(), Some(Tick(120)));
        assert_eq!(advance(&mut w, 130), vec![0]);
    }

    #[test]
    fn far_deadlines_beyond_one_revolution() {
        let mut w = Wheel::new(Tick(5));
        let far = 5 + 10 * SLOTS as u64 + 17;
        w.insert(WheelKey(1), Tick(far)).unwrap();
        let mut visits = 0;
        while let Some(t) = w.next_due() {
            visits += 1;
            let got = advance(&mut w, t.0);
            if !got.is_empty() {
                assert_eq!(t.0, far);
                break;
            }
        }
        assert!(visits <= 12, "{visits} visits");
        assert!(w.is_empty());
    }

    #[test]
    fn long_jump_expires_everything_due_once() {
        let mut w = Wheel::new(Tick(0));
        for k in 0..1000u32 {
            w.insert(WheelKey(k), Tick(1 + u64::from(k) * 37)).unwrap();
        }
        let got = advance(&mut w, 20_000);
        assert_eq!(got.len(), 541); // deadlines 1 + 37k <= 20000 for k <= 540
        assert_eq!(w.len(), 459);
        assert_eq!(w.next_due(), Some(Tick(1 + 541 * 37)));
    }

    #[test]
    fn twenty_bytes_an_entry_and_far_deadlines_saturate() {
        assert_eq!(std::mem::size_of::<Link>() + std::mem::size_of::<u64>(), 20);
        let mut w = Wheel::new(Tick(0));
        w.insert(WheelKey(0), Tick(u64::MAX)).unwrap();
        assert_eq!(w.deadline(WheelKey(0)), Some(MAX_DEADLINE));
        w.reset(WheelKey(0), Tick(5)).unwrap();
        assert_eq!(w.next_due(), Some(Tick(5)));
    }

    #[test]
    fn errors() {
        let mut w = Wheel::new(Tick(10));
        assert_eq!(w.insert(WheelKey(0), Tick(10)), Err(WheelError::Elapsed));
        w.insert(WheelKey(0), Tick(11)).unwrap();
        assert_eq!(w.insert(WheelKey(0), Tick(12)), Err(WheelError::Occupied));
        assert_eq!(w.reset(WheelKey(1), Tick(12)), Err(WheelError::Absent));
        assert_eq!(w.reset(WheelKey(0), Tick(9)), Err(WheelError::Elapsed));
        assert!(w.remove(WheelKey(0)));
        assert!(!w.remove(WheelKey(0)));
        assert!(!w.remove(WheelKey(999)));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u32, u64),
        Reset(u32, u64),
        /// A heartbeat: the deadline moves later, never earlier.
        Extend(u32, u64),
        Remove(u32),
        Advance(u64),
        /// Sleep until the wheel's next due tick, as the server does.
        AdvanceToNextDue,
    }

    fn op() -> impl Strategy<Value = Op> {
        // Offsets span several revolutions so re-filing and wrap are exercised.
        let offset = prop_oneof![1u64..50, 1u64..(3 * SLOTS as u64)];
        prop_oneof![
            (0u32..64, offset.clone()).prop_map(|(k, d)| Op::Insert(k, d)),
            (0u32..64, offset.clone()).prop_map(|(k, d)| Op::Reset(k, d)),
            (0u32..64, offset).prop_map(|(k, d)| Op::Extend(k, d)),
            (0u32..64).prop_map(Op::Remove),
            prop_oneof![0u64..20, 0u64..(2 * SLOTS as u64)].prop_map(Op::Advance),
            Just(Op::AdvanceToNextDue),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// The wheel against a BTreeMap model: same expiries, each at its
        /// exact deadline tick when driven by `next_due` (never early, and
        /// not even the one tick late the protocol allows), and `next_due`
        /// never later than the earliest model deadline.
        #[test]
        fn matches_model(start in 0u64..10_000, ops in prop::collection::vec(op(), 1..400)) {
            let mut w = Wheel::new(Tick(start));
            let mut model: BTreeMap<u32, u64> = BTreeMap::new();
            let mut now = start;
            for op in ops {
                match op {
                    Op::Insert(k, d) => {
                        let r = w.insert(WheelKey(k), Tick(now + d));
                        if let std::collections::btree_map::Entry::Vacant(e) = model.entry(k) {
                            prop_assert_eq!(r, Ok(()));
                            e.insert(now + d);
                        } else {
                            prop_assert_eq!(r, Err(WheelError::Occupied));
                        }
                    }
                    Op::Reset(k, d) => {
                        let r = w.reset(WheelKey(k), Tick(now + d));
                        match model.get_mut(&k) {
                            Some(dl) => { prop_assert_eq!(r, Ok(())); *dl = now + d; }
                            None => prop_assert_eq!(r, Err(WheelError::Absent)),
                        }
                    }
                    Op::Extend(k, d) => {
                        if let Some(dl) = model.get_mut(&k) {
                            *dl = (*dl).max(now + d);
                            w.extend(WheelKey(k), Tick(*dl));
                        }
                    }
                    Op::Remove(k) => {
                        prop_assert_eq!(w.remove(WheelKey(k)), model.remove(&k).is_some());
                    }
                    Op::Advance(d) => {
                        let to = now + d;
                        let got = advance(&mut w, to);
                        let want: Vec<u32> = model.iter().filter(|(_, &dl)| dl <= to).map(|(&k, _)| k).collect();
                        model.retain(|_, dl| *dl > to);
                        prop_assert_eq!(got, want);
                        now = now.max(to);
                    }
                    Op::AdvanceToNextDue => {
                        let earliest = model.values().min().copied();
                        let next = w.next_due();
                        prop_assert_eq!(next.is_none(), earliest.is_none());
                        if let (Some(next), Some(earliest)) = (next, earliest) {
                            prop_assert!(next.0 <= earliest, "next_due {} after deadline {}", next.0, earliest);
                            let got = advance(&mut w, next.0);
                            let want: Vec<u32> = model.iter().filter(|(_, &dl)| dl <= next.0).map(|(&k, _)| k).collect();
                            // Everything due is due exactly now: never late.
                            for k in &want {
                                prop_assert_eq!(model[k], next.0);
                            }
                            model.retain(|_, dl| *dl > next.0);
                            prop_assert_eq!(got, want);
                            now = next.0;
                        }
                    }
                }
                prop_assert_eq!(w.len(), model.len());
                for (&k, &dl) in &model {
                    prop_assert_eq!(w.deadline(WheelKey(k)), Some(Tick(dl)));
                }
            }
        }
    }
}
