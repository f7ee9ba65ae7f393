//! The engine's settings and the one check of them.

use std::fmt;

use super::{Footprint, JobTable};
use crate::wire::{self, MacKey};

/// Sessions whose room is reserved when the engine starts, at most.
pub(crate) const RESERVE_SESSIONS_MAX: usize = 4 << 20;

/// A count of live sessions shared by the engines (shards) of one server.
#[derive(Debug, Clone, Default)]
pub struct SharedSessions(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl SharedSessions {
    /// Takes a place for a new session if fewer than `max` are live.
    pub fn try_open(&self, max: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a session's place back.
    pub fn close(&self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Live sessions across the shards.
    pub fn live(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// The engine's settings. [`Config::default`] holds the server's defaults;
/// set fields on it (new fields may come in minor releases).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// Length of a wheel tick in microseconds (whole milliseconds, ≥ 1 ms).
    pub tick_us: u64,
    /// TTL granted to a HELLO that asks for 0.
    pub default_ttl_ms: u32,
    /// Smallest TTL granted.
    pub min_ttl_ms: u32,
    /// Largest TTL granted.
    pub max_ttl_ms: u32,
    /// Live sessions at most; a HELLO past it gets REJECTED 6.
    pub max_sessions: usize,
    /// Unfinished tasks per session at most; a SUBMIT past it gets REJECTED 3.
    pub max_tasks_per_session: usize,
    /// Tasks scheduled or queued (not yet on a worker) at most; a SUBMIT
    /// past it gets REJECTED 2.
    pub max_waiting_tasks: usize,
    /// Final task states retained at most (oldest dropped first).
    pub max_finished_tasks: usize,
    /// Final task states retained per client at most (that client's oldest
    /// dropped first), so one client cannot take the whole table.
    pub max_finished_per_client: usize,
    /// How long final states are kept, at least.
    pub finished_retention_ms: u64,
    /// Ended clients whose largest incarnation is remembered, at most.
    pub max_client_records: usize,
    /// How long an ended client's largest incarnation is remembered, at least.
    pub client_memory_ms: u64,
    /// Bytes of replies waiting to be sent, at most.
    pub max_outbox_bytes: usize,
    /// The shared secret; `None` runs keyless.
    pub key: Option<MacKey>,
    /// Keyless only: never send an address more bytes than it has sent
    /// (counted per source address and port, banked up to 16 KiB). Protocol
    /// v1 answers some requests with a few bytes more than they carried (an
    /// empty-name HELLO 33 → WELCOME 36), so with this on such an answer
    /// waits for the client's retry. The server turns it on when a keyless
    /// server listens beyond loopback, where sources can be spoofed.
    pub amplification_limit: bool,
    /// The jobs SUBMIT can name.
    pub jobs: JobTable,
    /// Queue an [`Event`](super::Event) for every session and task lifecycle step, for
    /// [`Engine::poll_event`](super::Engine::poll_event). Off by default: a caller that sets it must
    /// drain the events.
    pub record_events: bool,
    /// The live sessions of every shard of one server, when it has more
    /// than one: `max_sessions` then bounds the whole server. Written when
    /// a session opens or ends, never per heartbeat.
    pub shared_sessions: Option<SharedSessions>,
    /// Sessions to reserve room for up front (default: `max_sessions`): a
    /// shard of N expects about 1/N of the server's. More still fit; the
    /// index grows.
    pub reserve_sessions: Option<usize>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            tick_us: 10_000,
            default_ttl_ms: 3_000,
            min_ttl_ms: 100,
            max_ttl_ms: 3_600_000,
            max_sessions: 1_000_000,
            max_tasks_per_session: 64,
            max_waiting_tasks: 65_536,
            max_finished_tasks: 100_000,
            max_finished_per_client: 256,
            finished_retention_ms: 60_000,
            max_client_records: 1_000_000,
            client_memory_ms: 600_000,
            max_outbox_bytes: 16 << 20,
            key: None,
            amplification_limit: false,
            jobs: JobTable::default(),
            record_events: false,
            shared_sessions: None,
            reserve_sessions: None,
        }
    }
}

impl Config {
    /// Checks every rule the engine relies on. [`Engine::new`](super::Engine::new) calls it, and
    /// so do the server's builder and the command line, so a bad setting is
    /// one clear error wherever it comes from, never a panic later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tick_us < 1000 || !self.tick_us.is_multiple_of(1000) {
            return Err(ConfigError::Tick {
                tick_us: self.tick_us,
            });
        }
        if self.min_ttl_ms == 0
            || self.min_ttl_ms > self.default_ttl_ms
            || self.default_ttl_ms > self.max_ttl_ms
        {
            return Err(ConfigError::TtlBounds {
                min_ms: self.min_ttl_ms,
                default_ms: self.default_ttl_ms,
                max_ms: self.max_ttl_ms,
            });
        }
        if self.max_sessions == 0 || self.max_sessions > MAX_SESSIONS_LIMIT {
            return Err(ConfigError::MaxSessions(self.max_sessions));
        }
        let limits = [
            ("max tasks per session", self.max_tasks_per_session),
            ("queue", self.max_waiting_tasks),
            ("max finished tasks", self.max_finished_tasks),
            (
                "max finished tasks per client",
                self.max_finished_per_client,
            ),
            ("max client records", self.max_client_records),
        ];
        if let Some(&(limit, _)) = limits.iter().find(|(_, n)| *n == 0) {
            return Err(ConfigError::ZeroLimit(limit));
        }
        if self.max_tasks_per_session > u32::MAX as usize / 4 {
            return Err(ConfigError::TooLarge("max tasks per session"));
        }
        // The protocol's promises: final states kept 60 s, incarnations of
        // ended sessions remembered 10 minutes.
        if self.finished_retention_ms < 60_000 {
            return Err(ConfigError::BelowProtocol {
                what: "final-state retention",
                min_ms: 60_000,
            });
        }
        if self.client_memory_ms < 600_000 {
            return Err(ConfigError::BelowProtocol {
                what: "memory of ended clients",
                min_ms: 600_000,
            });
        }
        if self.max_outbox_bytes < wire::MAX_DATAGRAM {
            return Err(ConfigError::OutboxTooSmall(self.max_outbox_bytes));
        }
        Ok(())
    }
}

/// Live sessions at most: slab indices are `u32`, and the live index keeps
/// itself at most half full.
pub const MAX_SESSIONS_LIMIT: usize = u32::MAX as usize / 2;

/// A setting the engine (or the server around it) cannot run with.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The tick is not a whole number of milliseconds, at least one.
    Tick {
        /// The tick asked for, in microseconds.
        tick_us: u64,
    },
    /// The TTLs do not satisfy `0 < min <= default <= max`.
    TtlBounds {
        /// Smallest TTL granted.
        min_ms: u32,
        /// TTL for a HELLO that asks for none.
        default_ms: u32,
        /// Largest TTL granted.
        max_ms: u32,
    },
    /// Live sessions must be between 1 and [`MAX_SESSIONS_LIMIT`].
    MaxSessions(usize),
    /// A limit that must be at least 1 is 0 (the name says which).
    ZeroLimit(&'static str),
    /// A limit is too large to be honoured (the name says which).
    TooLarge(&'static str),
    /// A retention shorter than the protocol promises.
    BelowProtocol {
        /// Which.
        what: &'static str,
        /// The protocol's minimum, in ms.
        min_ms: u64,
    },
    /// The reply queue cannot hold even one datagram.
    OutboxTooSmall(usize),
    /// The server needs at least one worker thread.
    NoWorkers,
    /// A server's shard count is 0 or more than its group of sockets holds.
    Shards(usize),
    /// The coalescing wait is longer than half a tick.
    CoalesceTooLong,
    /// Metrics asked for on a non-loopback address without the insecure
    /// switch: anyone on that network could read who is connected.
    InsecureMetrics(std::net::SocketAddr),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::Tick { tick_us } => write!(
                f,
                "the tick must be a whole number of milliseconds, at least 1 (got {tick_us} us)"
            ),
            ConfigError::TtlBounds {
                min_ms,
                default_ms,
                max_ms,
            } => write!(
                f,
                "TTLs must satisfy 0 < min <= default <= max (got min {min_ms} ms, default \
                 {default_ms} ms, max {max_ms} ms)"
            ),
            ConfigError::MaxSessions(n) => write!(
                f,
                "max sessions must be between 1 and {MAX_SESSIONS_LIMIT} (got {n})"
            ),
            ConfigError::ZeroLimit(what) => write!(f, "{what} must be at least 1"),
            ConfigError::TooLarge(what) => write!(f, "{what} is too large"),
            ConfigError::BelowProtocol { what, min_ms } => write!(
                f,
                "{what} must be at least {} s: the protocol promises it",
                min_ms / 1000
            ),
            ConfigError::OutboxTooSmall(n) => write!(
                f,
                "the reply queue must hold at least one datagram ({} bytes; got {n})",
                wire::MAX_DATAGRAM
            ),
            ConfigError::NoWorkers => f.write_str("at least one worker thread is needed"),
            ConfigError::Shards(n) => write!(
                f,
                "shards must be between 1 and 128 (the server's MAX_SHARDS), got {n}"
            ),
            ConfigError::CoalesceTooLong => f.write_str("coalesce must be at most half a tick"),
            ConfigError::InsecureMetrics(addr) => write!(
                f,
                "refusing to serve metrics on {addr}, a non-loopback address, without the \
                 insecure-bind switch"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// The most one client (one `client_id`, whatever datagrams it sends,
    /// however many sessions it opens one after another) can make the engine
    /// hold, with `workers` worker threads, replies sent after each
    /// datagram is handled and worker reports applied as they come, as the
    /// server does (it applies up to 4,096 reports a turn, so under a burst
    /// of reports the count of ended sessions held can run ahead of
    /// `workers` for a turn or two):
    ///
    /// | held | at most |
    /// |---|---|
    /// | live sessions | 1 |
    /// | ended sessions still held | `workers` (one per task still running) |
    /// | unfinished tasks | `max_tasks_per_session + workers` |
    /// | final states | `max_finished_per_client` |
    /// | remembered request ids | `max(4 × max_tasks_per_session, 64)` |
    /// | client records | 1 |
    /// | task bytes | 1024 per unfinished task + 1147 per final state |
    /// | reply bytes queued | 1200 × (2 + unfinished tasks) |
    ///
    /// The worker pool holds at most `max_tasks_per_session` of its queued
    /// items and `workers` running ones. Across clients the totals are
    /// bounded by `max_sessions`, `max_waiting_tasks`,
    /// `max_finished_tasks`, `max_client_records` and `max_outbox_bytes`.
    pub fn client_bound(&self, workers: usize) -> Footprint {
        let unfinished = self.max_tasks_per_session + workers;
        let finals = self.max_finished_per_client;
        Footprint {
            live_sessions: 1,
            ended_sessions_held: workers,
            unfinished_tasks: unfinished,
            final_states: finals,
            remembered_requests: request_memory(self.max_tasks_per_session),
            client_records: 1,
            task_bytes: unfinished * wire::MAX_PAYLOAD_LEN + finals * wire::MAX_RESULT_LEN,
            outbox_bytes: (2 + unfinished) * wire::MAX_DATAGRAM,
        }
    }
}

/// How many answered request ids a session remembers: every unfinished task
/// and three times as many recent answers, so a session can start that many
/// tasks per retry window, while a client cannot grow the table without
/// bound (24 bytes an entry).
pub(crate) fn request_memory(max_tasks_per_session: usize) -> usize {
    (4 * max_tasks_per_session).max(64)
}

/// Shortest retry window, in ms: longer than the standard clients retry a
/// request (8 tries, 250 ms apart), with room for the network's delays.
pub(crate) const MIN_RETRY_WINDOW_MS: u64 = 5_000;

/// How long after an answer became final (a rejection sent, an accepted
/// task ended) a retry of its SUBMIT may still arrive, and must get the same
/// answer: the session's TTL, or `MIN_RETRY_WINDOW_MS` if that is longer.
pub(crate) fn retry_window_ms(ttl_ms: u32) -> u64 {
    u64::from(ttl_ms).max(MIN_RETRY_WINDOW_MS)
}
