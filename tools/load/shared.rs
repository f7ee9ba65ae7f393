//! The per-client state the sender and the receiver threads share, and the
//! flags that record how far each client got.

use std::sync::atomic::{
    AtomicBool, AtomicU16, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering,
};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// Per-client flags, set by the sender (SILENT) and the receiver (others).
pub const WELCOMED: u8 = 1;
pub const REFUSED: u8 = 2;
pub const ACCEPTED: u8 = 4;
pub const SILENT: u8 = 8;
pub const DETECTED: u8 = 16;
pub const FALSE_EXPIRY: u8 = 32;
/// Asked for an ACK by the final check.
pub const CHECKED: u8 = 64;
/// The final check's ACK came back.
pub const ANSWERED: u8 = 128;

/// With `--order random`: which client each of the tool's slots plays. The
/// tool keeps its per-client state by slot and beats slot after slot, so
/// its own memory walk stays sequential however many clients it plays;
/// the client ids, and so the server's sessions (opened in id order), are
/// a fixed random permutation of the slots, so the server's walk is not.
pub struct Ids {
    pub id_of_slot: Vec<u32>,
    pub slot_of_id: Vec<u32>,
}

impl Ids {
    /// Fisher-Yates driven by a fixed seed: the same order every run, so
    /// runs compare.
    pub fn shuffled(n: usize) -> Ids {
        let mut id_of_slot: Vec<u32> = (0..n as u32).collect();
        for k in (1..n).rev() {
            let j = (crate::sender::mix(k as u64 ^ 0x0dde_5eed) % (k as u64 + 1)) as usize;
            id_of_slot.swap(k, j);
        }
        let mut slot_of_id = vec![0; n];
        for (slot, &id) in id_of_slot.iter().enumerate() {
            slot_of_id[id as usize] = slot as u32;
        }
        Ids {
            id_of_slot,
            slot_of_id,
        }
    }
}

/// State the sender and the receiver share, one slot per client.
pub struct Shared {
    pub base_id: u64,
    /// How slots map to client ids; `None`: slot `i` is client `i`.
    pub ids: Option<Ids>,
    pub incarnation: u64,
    pub ttl_us: u64,
    pub start: Instant,
    pub last_sent_us: Vec<AtomicU64>,
    pub flags: Vec<AtomicU8>,
    /// How many HELLO rounds each client began: each round of
    /// `HELLO_TRIES` unanswered tries ends with a new incarnation, as the
    /// Rust client does, so a session that expired while its WELCOME was
    /// lost never makes the retries stale.
    pub rounds: Vec<AtomicU16>,
    /// When the client last sent after a TTL of sending nothing while its
    /// session was open (a loss, or the tool falling behind): an expiry
    /// reported soon after is explained, not false.
    pub gap_end_us: Vec<AtomicU64>,
    pub interval_us: u64,
    pub ack_seq: Vec<AtomicU32>,
    /// The sequence of a client's first heartbeat that asked for the final
    /// check's ACK: an answer to it or to any later ask will do, so an
    /// answer that comes after a re-ask is not thrown away.
    pub check_from_seq: Vec<AtomicU32>,
    pub ack_sent_us: Vec<AtomicU64>,
    pub welcomed: AtomicUsize,
    pub refused: AtomicUsize,
    pub accepted: AtomicUsize,
    pub detected: AtomicUsize,
    pub false_expiries: AtomicUsize,
    /// Expiries of clients that had sent nothing for a TTL (see gap_end_us).
    pub explained_expiries: AtomicUsize,
    /// When the latest first WELCOME arrived, µs on this clock.
    pub last_welcome_us: AtomicU64,
    pub counting: AtomicBool,
    /// ACK answers are round trips under load until the final check.
    pub recording_rtt: AtomicBool,
    pub stop: AtomicBool,
}

impl Shared {
    /// Fresh state for `n` clients beating every `interval` and asking for
    /// `ttl`, its clock starting now.
    pub fn new(n: usize, interval: Duration, ttl: Duration) -> Shared {
        let now_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Shared {
            // Distinct ids per run, so a rerun never meets an earlier run's
            // sessions (or stale-HELLO records) on the server.
            base_id: (now_ns & 0x0000_ffff_ffff_ffff) << 16,
            ids: None,
            incarnation: now_ns,
            ttl_us: ttl.as_micros() as u64,
            start: Instant::now(),
            last_sent_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
            flags: (0..n).map(|_| AtomicU8::new(0)).collect(),
            rounds: (0..n).map(|_| AtomicU16::new(0)).collect(),
            gap_end_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
            interval_us: interval.as_micros() as u64,
            ack_seq: (0..n).map(|_| AtomicU32::new(0)).collect(),
            check_from_seq: (0..n).map(|_| AtomicU32::new(0)).collect(),
            ack_sent_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
            welcomed: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
            detected: AtomicUsize::new(0),
            false_expiries: AtomicUsize::new(0),
            explained_expiries: AtomicUsize::new(0),
            last_welcome_us: AtomicU64::new(0),
            counting: AtomicBool::new(false),
            recording_rtt: AtomicBool::new(true),
            stop: AtomicBool::new(false),
        }
    }
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
    /// The slot playing `client_id`.
    pub fn index(&self, client_id: u64) -> Option<usize> {
        let i = client_id.checked_sub(self.base_id + 1)? as usize;
        if i >= self.flags.len() {
            return None;
        }
        Some(
            self.ids
                .as_ref()
                .map_or(i, |ids| ids.slot_of_id[i] as usize),
        )
    }

    /// The client id slot `i` plays.
    pub fn client_id(&self, i: usize) -> u64 {
        let id = self
            .ids
            .as_ref()
            .map_or(i, |ids| ids.id_of_slot[i] as usize);
        self.base_id + id as u64 + 1
    }
    /// Client `i`'s current incarnation.
    pub fn incarnation(&self, i: usize) -> u64 {
        self.incarnation + u64::from(self.rounds[i].load(Ordering::Acquire))
    }
    pub fn flag(&self, i: usize) -> u8 {
        self.flags[i].load(Ordering::Acquire)
    }
    /// Sets `bit`; returns whether it was newly set.
    pub fn set(&self, i: usize, bit: u8) -> bool {
        self.flags[i].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_and_the_id_it_plays_map_back_to_each_other() {
        let mut shared = Shared::new(1000, Duration::from_secs(1), Duration::from_secs(3));
        let plain: Vec<u64> = (0..1000).map(|i| shared.client_id(i)).collect();
        assert!(plain.windows(2).all(|w| w[1] == w[0] + 1));
        shared.ids = Some(Ids::shuffled(1000));
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            let id = shared.client_id(i);
            assert_eq!(shared.index(id), Some(i), "slot {i}");
            assert!(seen.insert(id), "two slots play {id}");
        }
        assert!(
            plain.iter().all(|id| seen.contains(id)),
            "the same ids, shuffled"
        );
        assert_eq!(shared.index(shared.base_id), None);
        assert_eq!(shared.index(shared.base_id + 1001), None);
    }
}
