//! The engine's vocabulary: time, ids, jobs.

use std::collections::HashMap;
use std::fmt;

use crate::wheel::{Tick, WheelKey};

/// A `HashMap` with a fast hash seeded per process, for tables keyed by
/// values a peer chooses.
pub(crate) type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Microseconds since an origin chosen by the caller. The engine only ever
/// compares and subtracts them; it never reads a clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// `ms` milliseconds after the origin.
    pub const fn from_millis(ms: u64) -> Timestamp {
        Timestamp(ms * 1000)
    }
    /// Microseconds since the origin.
    pub const fn as_micros(self) -> u64 {
        self.0
    }
    /// `self` plus `ms` milliseconds.
    #[must_use]
    pub const fn plus_millis(self, ms: u64) -> Timestamp {
        Timestamp(self.0 + ms * 1000)
    }
}

/// A task's id on the wire: `serial << 32 | slab index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub u64);

impl TaskId {
    pub(crate) fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
    }

    /// Its timer's key in the task wheel: its slab slot.
    pub(crate) fn wheel_key(self) -> WheelKey {
        WheelKey(self.index() as u32)
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Index of a job in the [`JobTable`], and so in the worker pool's registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobId(pub u16);

/// What a job accepts as payload; a SUBMIT outside it gets REJECTED 4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PayloadRule {
    /// Any payload.
    Any,
    /// Exactly this many bytes.
    Exactly(usize),
    /// UTF-8 text of at most this many bytes (for jobs that hand their
    /// payload back as an error text, which the protocol caps at 255).
    Text {
        /// Longest text admitted, in bytes.
        max_len: usize,
    },
}

impl PayloadRule {
    pub(crate) fn admits(self, payload: &[u8]) -> bool {
        match self {
            PayloadRule::Any => true,
            PayloadRule::Exactly(n) => payload.len() == n,
            PayloadRule::Text { max_len } => {
                payload.len() <= max_len && std::str::from_utf8(payload).is_ok()
            }
        }
    }
}

/// The names of the jobs the server can run, and what payload each takes.
#[derive(Debug, Clone, Default)]
pub struct JobTable {
    jobs: Vec<(String, PayloadRule)>,
}

impl JobTable {
    /// Adds a job; its [`JobId`] is its position. A name used twice keeps
    /// the first.
    pub fn add(&mut self, name: &str, rule: PayloadRule) -> JobId {
        if let Some(id) = self.lookup(name) {
            return id;
        }
        self.jobs.push((name.to_owned(), rule));
        JobId((self.jobs.len() - 1) as u16)
    }
    /// The job called `name`.
    pub fn lookup(&self, name: &str) -> Option<JobId> {
        self.jobs
            .iter()
            .position(|(n, _)| n == name)
            .map(|i| JobId(i as u16))
    }
    /// The name of `id`.
    pub fn name(&self, id: JobId) -> &str {
        self.jobs.get(usize::from(id.0)).map_or("?", |(n, _)| n)
    }
    pub(crate) fn rule(&self, id: JobId) -> PayloadRule {
        self.jobs[usize::from(id.0)].1
    }
}

/// The one place time becomes wheel ticks. Deadlines round *up* (a session
/// whose last datagram arrived at `t` expires at the first tick boundary at
/// or after `t + ttl`, never early); the present rounds *down* (the ticks
/// that have fully passed).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticks {
    tick_us: u64,
}

impl Ticks {
    pub(crate) fn new(tick_us: u64) -> Ticks {
        debug_assert!(tick_us > 0, "validated: the tick is at least 1 ms");
        Ticks {
            tick_us: tick_us.max(1),
        }
    }

    /// The tick that contains `t`: every tick up to it has passed.
    pub(crate) fn passed(self, t: Timestamp) -> Tick {
        Tick(t.0 / self.tick_us)
    }

    /// The first tick boundary `ms` milliseconds after `t` or later.
    pub(crate) fn deadline(self, t: Timestamp, ms: u64) -> Tick {
        Tick(t.plus_millis(ms).0.div_ceil(self.tick_us))
    }

    /// Whether a TTL of `ms` milliseconds is a whole number of ticks: then
    /// a deadline counted from `t` moves only when `t` crosses a tick
    /// boundary.
    pub(crate) fn whole(self, ms: u32) -> bool {
        (u64::from(ms) * 1000) % self.tick_us == 0
    }

    /// Whether a tick begins at some instant in `earliest..latest`: for a
    /// TTL of whole ticks, that is whether [`Ticks::deadline`] can differ
    /// between two instants of the window.
    pub(crate) fn boundary_within(self, earliest: Timestamp, latest: Timestamp) -> bool {
        earliest.0.div_ceil(self.tick_us) != latest.0.div_ceil(self.tick_us)
    }

    /// When `tick` begins.
    pub(crate) fn start(self, tick: Tick) -> Timestamp {
        Timestamp(tick.0.saturating_mul(self.tick_us))
    }

    /// The tick length in whole milliseconds, as WELCOME reports it.
    pub(crate) fn millis(self) -> u32 {
        u32::try_from(self.tick_us / 1000).unwrap_or(u32::MAX)
    }
}

/// A session's place in the engine's slab, and so its key in the session
/// wheel and the live index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionIndex(pub(crate) u32);

impl SessionIndex {
    pub(crate) fn slot(self) -> usize {
        self.0 as usize
    }

    /// Its expiry's key in the session wheel.
    pub(crate) fn wheel_key(self) -> WheelKey {
        WheelKey(self.0)
    }
}
