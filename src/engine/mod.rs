//! The sans-IO session and task engine: every rule of the protocol, with no
//! socket, thread or clock.
//!
//! The engine is a state machine in the style of quinn-proto. The caller owns
//! the socket, the clock and the worker threads, and drives it with four
//! inputs and three outputs:
//!
//! ```text
//!            datagram bytes, source, now ──► handle_datagram ─┐
//!                                  now ──► handle_timeout  ─┤      ┌─► poll_transmit: replies to send
//!   task started / finished, now ──► handle_task_event ─────┼─► engine
//!                                  now ──► begin_shutdown  ─┘      ├─► poll_effect: run / cancel a task
//!                                                                  └─► poll_timeout: when to call again
//! ```
//!
//! Time is a [`Timestamp`] in microseconds from an origin the caller picks
//! (the server uses its start). It is converted to wheel [`Tick`]s in one
//! place, `Engine::tick_at_or_after`, which rounds deadlines *up*: a
//! session whose last datagram arrived at `t` expires at the first tick
//! boundary at or after `t + ttl`, so never early and at most one tick late
//! if the caller calls [`Engine::handle_timeout`] when
//! [`Engine::poll_timeout`] says.
//!
//! Sessions live in a slab; the session wheel is keyed by the slab index.
//! Tasks live in a second slab, and a task id is `serial << 32 | index`, so
//! finding a task is an index plus one comparison, and an id is never reused
//! for another task. A session that ends while some of its tasks are still
//! running stays in its slab slot (unreachable by lookup) until the last of
//! them has reported its final state, so that state can still be pushed to
//! the session's address under the session's own numbering.
//!
//! # DoS notes
//!
//! Every structure an unauthenticated peer can grow is bounded: live sessions
//! (`max_sessions`, then REJECTED 6), remembered incarnations of ended
//! sessions (`max_client_records`, oldest first), tasks waiting for a worker
//! (`max_waiting_tasks`, REJECTED 2), unfinished tasks per session
//! (`max_tasks_per_session`, REJECTED 3), remembered request ids per session,
//! retained final states (`max_finished_tasks`, oldest first), and queued
//! replies (`max_outbox_bytes`, excess dropped and counted).
//!
//! Nothing unauthenticated is answered by a keyed engine. A keyless one can
//! hold each address to the bytes it sent (`Config::amplification_limit`,
//! the `credit` module), so spoofed requests cannot turn it into an
//! amplifier; and while the caller reports a flooded socket
//! ([`Engine::set_backlogged`]) it does not answer strangers at all, so the
//! caller's time goes to reading live sessions' datagrams.

mod credit;
mod finished;
mod index;
mod outbox;
mod records;

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;

use slab::Slab;

use crate::wheel::{Expired, Tick, Wheel, WheelKey};
use crate::wire::{
    self, CancelOutcome, CancelReason, Datagram, Flags, Header, MacKey, Message, RejectCode,
    ReplayError, ReplayWindow, TaskReport,
};
use finished::{FinishedTasks, Forget};
use index::ClientIndex;
use outbox::{NotQueued, Outbox, PeerAddr};
use records::ClientRecords;

/// Sessions whose room is reserved when the engine starts, at most.
const RESERVE_SESSIONS_MAX: usize = 4 << 20;

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

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
    fn index(self) -> usize {
        (self.0 & 0xffff_ffff) as usize
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
    fn admits(self, payload: &[u8]) -> bool {
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
    fn rule(&self, id: JobId) -> PayloadRule {
        self.jobs[usize::from(id.0)].1
    }
}

/// The engine's settings. [`Config::default`] holds the server's defaults.
#[derive(Debug, Clone)]
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
    /// Queue an [`Event`] for every session and task lifecycle step, for
    /// [`Engine::poll_event`]. Off by default: a caller that sets it must
    /// drain the events.
    pub record_events: bool,
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
        }
    }
}

impl Config {
    /// Checks every rule the engine relies on. [`Engine::new`] calls it, and
    /// so do the server's builder and the command line, so a bad setting is
    /// one clear error wherever it comes from, never a panic later.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tick_us < 1000 || self.tick_us % 1000 != 0 {
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
            return Err(ConfigError::ZeroLimit("max tasks per session (too large)"));
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
    /// The reply queue cannot hold even one datagram.
    OutboxTooSmall(usize),
    /// The server needs at least one worker thread.
    NoWorkers,
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
            ConfigError::OutboxTooSmall(n) => write!(
                f,
                "the reply queue must hold at least one datagram ({} bytes; got {n})",
                wire::MAX_DATAGRAM
            ),
            ConfigError::NoWorkers => f.write_str("at least one worker thread is needed"),
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

/// A command for the worker pool.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect {
    /// Queue this task for a worker. Report back with
    /// [`TaskEvent::Started`] and [`TaskEvent::Finished`].
    Run {
        /// The task.
        task: TaskId,
        /// Whose task it is.
        client_id: u64,
        /// Which job.
        job: JobId,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// Cancel this task. If no worker has taken it yet, withdraw it so it
    /// never runs and report [`TaskEvent::Withdrawn`]; if a worker has (its
    /// [`TaskEvent::Started`] may not have been reported yet), flip its flag
    /// and report [`TaskEvent::Finished`] when it stops. Exactly one of the
    /// two must follow for a task that was queued: the engine keeps counting
    /// it against the queue until then.
    Cancel {
        /// The task.
        task: TaskId,
        /// Why, for the task to read.
        reason: CancelReason,
    },
}

/// What a worker reports about a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    /// A worker took the task and is about to run it.
    Started,
    /// The job returned this result.
    Finished(JobOutcome),
    /// The task was taken out of the queue, after an [`Effect::Cancel`],
    /// before any worker took it: it never ran and never will.
    Withdrawn,
}

/// How a job ended, from the job's side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    /// It returned a result.
    Done(Vec<u8>),
    /// It returned an error, or panicked (the text says which).
    Failed(String),
}

/// What made a task's cancellation happen: its reason plus what a person
/// needs to trace it ("why was my task cancelled?").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The session `incarnation` of the task's client stopped heartbeating
    /// and expired at `at`.
    Expired {
        /// The expired session's incarnation.
        incarnation: u64,
        /// When the expiry was decided.
        at: Timestamp,
    },
    /// The session said BYE.
    Left {
        /// The session's incarnation.
        incarnation: u64,
    },
    /// A HELLO with incarnation `by` replaced session `incarnation`.
    Replaced {
        /// The replaced session's incarnation.
        incarnation: u64,
        /// The new session's incarnation.
        by: u64,
    },
    /// A CANCEL from `from`, sent in session `incarnation`.
    Cancelled {
        /// Where the CANCEL came from.
        from: SocketAddr,
        /// The session it came in.
        incarnation: u64,
    },
    /// The task ran past its `deadline_ms`.
    Deadline {
        /// The deadline it had.
        deadline_ms: u32,
    },
    /// The server shut down.
    Shutdown,
}

impl Cause {
    /// The reason recorded in the final state.
    pub fn reason(&self) -> CancelReason {
        match self {
            Cause::Expired { .. } => CancelReason::Expired,
            Cause::Left { .. } => CancelReason::Left,
            Cause::Replaced { .. } => CancelReason::Replaced,
            Cause::Cancelled { .. } => CancelReason::Cancelled,
            Cause::Deadline { .. } => CancelReason::Deadline,
            Cause::Shutdown => CancelReason::Shutdown,
        }
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cause::Expired { incarnation, at } => write!(
                f,
                "expiry of session incarnation {incarnation} at {:.3}s (no datagram for its TTL)",
                at.0 as f64 / 1e6
            ),
            Cause::Left { incarnation } => write!(f, "BYE from session incarnation {incarnation}"),
            Cause::Replaced { incarnation, by } => {
                write!(
                    f,
                    "session incarnation {incarnation} replaced by incarnation {by}"
                )
            }
            Cause::Cancelled { from, incarnation } => {
                write!(f, "CANCEL from {from} (session incarnation {incarnation})")
            }
            Cause::Deadline { deadline_ms } => {
                write!(f, "deadline of {deadline_ms} ms after start")
            }
            Cause::Shutdown => f.write_str("server shutdown"),
        }
    }
}

/// How a task ended, as its final state records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Done, with a result.
    Done,
    /// Failed, with an error text.
    Failed,
    /// Cancelled for this reason.
    Cancelled(CancelReason),
}

/// A session or task lifecycle step, queued when
/// [`Config::record_events`] is set (for logs, metrics and event streams).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A HELLO opened a session.
    SessionOpened {
        /// The client.
        client_id: u64,
        /// The session's incarnation.
        incarnation: u64,
        /// The TTL granted.
        ttl_ms: u32,
        /// Where the HELLO came from.
        peer: SocketAddr,
        /// When.
        at: Timestamp,
    },
    /// A session ended.
    SessionEnded {
        /// The client.
        client_id: u64,
        /// The session's incarnation.
        incarnation: u64,
        /// Expired, left or replaced.
        reason: CancelReason,
        /// For an expiry: how long after the session's deadline tick the
        /// expiry was decided, in microseconds.
        lateness_us: Option<u64>,
        /// For a replacement: the new incarnation.
        replaced_by: Option<u64>,
        /// When.
        at: Timestamp,
    },
    /// A SUBMIT was accepted.
    TaskAccepted {
        /// The task.
        task: TaskId,
        /// Its client.
        client_id: u64,
        /// Its session's incarnation.
        incarnation: u64,
        /// Its job.
        job: JobId,
        /// When.
        at: Timestamp,
    },
    /// A task reached its final state.
    TaskEnded {
        /// The task.
        task: TaskId,
        /// Its client.
        client_id: u64,
        /// Its session's incarnation.
        incarnation: u64,
        /// Its job.
        job: JobId,
        /// Done, failed or cancelled.
        ending: Ending,
        /// For a cancellation, what caused it.
        cause: Option<Cause>,
        /// How long it ran on a worker, if it started, in microseconds.
        run_us: Option<u64>,
        /// When.
        at: Timestamp,
    },
}

/// Why [`Engine::handle_datagram`] dropped a datagram without any reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dropped {
    /// Larger than 1200 bytes.
    TooLarge,
    /// Breaks a framing or body rule.
    Malformed(wire::Error),
    /// A server-to-client kind arrived at the server.
    WrongDirection,
    /// MAC missing, unexpected or wrong.
    Auth(wire::Error),
    /// Seen before or too old for the replay window.
    Replay(ReplayError),
    /// A HELLO whose incarnation is not larger than one already used.
    StaleHello,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dropped::TooLarge => f.write_str("datagram too large"),
            Dropped::Malformed(e) => write!(f, "malformed: {e}"),
            Dropped::WrongDirection => f.write_str("server-to-client kind sent to the server"),
            Dropped::Auth(e) => write!(f, "authentication: {e}"),
            Dropped::Replay(e) => write!(f, "replay: {e}"),
            Dropped::StaleHello => f.write_str("stale HELLO: incarnation not larger than before"),
        }
    }
}

impl std::error::Error for Dropped {}

/// Counters, all monotonic except the `*_live`/`*_now` gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Datagrams handed to the engine.
    pub datagrams: u64,
    /// Of those, accepted as part of a live session or opening one.
    pub accepted: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Dropped: larger than 1200 bytes.
    pub dropped_too_large: u64,
    /// Dropped: broke a framing or body rule, or wrong direction.
    pub dropped_malformed: u64,
    /// Dropped: MAC missing, unexpected or wrong.
    pub dropped_bad_mac: u64,
    /// Dropped: replayed or too old.
    pub dropped_replay: u64,
    /// Dropped: stale HELLO.
    pub dropped_stale_hello: u64,
    /// Answered with UNKNOWN_SESSION.
    pub unknown_session: u64,
    /// Replies queued for sending.
    pub replies: u64,
    /// Replies dropped because the outbox was full.
    pub replies_dropped: u64,
    /// Replies not sent because their address had not sent as many bytes
    /// ([`Config::amplification_limit`]).
    pub replies_unpaid: u64,
    /// Answers to strangers (UNKNOWN_SESSION, REJECTED to a HELLO, WELCOME
    /// of a new session) not sent while the caller's socket was backlogged
    /// ([`Engine::set_backlogged`]).
    pub replies_shed: u64,
    /// Sessions opened.
    pub sessions_opened: u64,
    /// Sessions ended by expiry.
    pub sessions_expired: u64,
    /// Sessions ended by BYE.
    pub sessions_left: u64,
    /// Sessions ended by a newer incarnation.
    pub sessions_replaced: u64,
    /// HELLOs refused for want of room.
    pub sessions_refused: u64,
    /// Tasks accepted.
    pub tasks_accepted: u64,
    /// SUBMITs rejected.
    pub tasks_rejected: u64,
    /// Tasks ended done.
    pub tasks_done: u64,
    /// Tasks ended failed.
    pub tasks_failed: u64,
    /// Tasks ended cancelled.
    pub tasks_cancelled: u64,
    /// Final states dropped before their retention ran out, for room.
    pub finished_evicted_early: u64,
    /// Tasks waiting out their delay now.
    pub tasks_scheduled_now: u64,
    /// Tasks waiting for a worker now.
    pub tasks_queued_now: u64,
    /// Tasks on a worker now.
    pub tasks_running_now: u64,
    /// Tasks ended cancelled, by reason (index = reason byte).
    pub tasks_cancelled_by_reason: [u64; 7],
    /// Live sessions when shutdown began.
    pub sessions_at_shutdown: u64,
}

/// What the engine holds, counted the way its memory bounds are stated
/// (PROTOCOL.md, "Choices"). [`Engine::footprint`] reads it (in time linear
/// in sessions and tasks: for tests, fuzzing and capacity checks, not the
/// hot path); [`Config::client_bound`] gives what one client may hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Footprint {
    /// Live sessions.
    pub live_sessions: usize,
    /// Ended sessions whose slot is still held because a task of theirs is
    /// still on a worker.
    pub ended_sessions_held: usize,
    /// Tasks scheduled, queued or running.
    pub unfinished_tasks: usize,
    /// Final task states kept for STATUS.
    pub final_states: usize,
    /// Answered request ids remembered for SUBMIT retries.
    pub remembered_requests: usize,
    /// Clients remembered after their sessions ended.
    pub client_records: usize,
    /// Payloads of tasks not yet handed out, results and error texts kept.
    pub task_bytes: usize,
    /// Encoded replies waiting to be sent.
    pub outbox_bytes: usize,
}

impl Footprint {
    /// Whether every count is at most `bound`'s.
    pub fn within(&self, bound: &Footprint) -> bool {
        self.live_sessions <= bound.live_sessions
            && self.ended_sessions_held <= bound.ended_sessions_held
            && self.unfinished_tasks <= bound.unfinished_tasks
            && self.final_states <= bound.final_states
            && self.remembered_requests <= bound.remembered_requests
            && self.client_records <= bound.client_records
            && self.task_bytes <= bound.task_bytes
            && self.outbox_bytes <= bound.outbox_bytes
    }
}

impl Config {
    /// The most one client (one `client_id`, whatever datagrams it sends,
    /// however many sessions it opens one after another) can make the engine
    /// hold, with `workers` worker threads and replies sent after each
    /// datagram is handled, as the server does:
    ///
    /// | held | at most |
    /// |---|---|
    /// | live sessions | 1 |
    /// | ended sessions still held | `workers` (one per task still running) |
    /// | unfinished tasks | `max_tasks_per_session + workers` |
    /// | final states | `max_finished_per_client` |
    /// | remembered request ids | `max(2 × max_tasks_per_session, 64)` |
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestReply {
    Accepted(TaskId),
    Rejected(RejectCode),
}

/// An answered SUBMIT, kept so that a retry of it gets the same answer.
#[derive(Debug, Clone, Copy)]
struct Request {
    id: u32,
    reply: RequestReply,
    /// When its task reached a final state; `None` while it is unfinished
    /// (or for a rejection).
    ended: Option<Timestamp>,
}

/// What a session holds once it has submitted anything; idle sessions
/// carry only the `None` of the box.
#[derive(Debug, Default)]
struct SessionWork {
    /// Answered request ids, oldest first, at most `request_memory`.
    requests: VecDeque<Request>,
    unfinished: Vec<TaskId>,
}

#[derive(Debug)]
struct Session {
    client_id: u64,
    incarnation: u64,
    replay: ReplayWindow,
    peer: PeerAddr,
    tx_seq: u32,
    ttl_ms: u32,
    live: bool,
    work: Option<Box<SessionWork>>,
}

impl Session {
    /// The header of this session's next datagram to the client.
    fn next_header(&mut self) -> Header {
        self.tx_seq = self.tx_seq.wrapping_add(1).max(1);
        Header {
            flags: Flags::empty(),
            client_id: self.client_id,
            incarnation: self.incarnation,
            seq: self.tx_seq,
        }
    }
    fn unfinished(&self) -> usize {
        self.work.as_ref().map_or(0, |w| w.unfinished.len())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TaskState {
    Scheduled,
    Queued,
    Running,
    Done,
    Failed,
    Cancelled(CancelReason),
}

impl TaskState {
    fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Done | TaskState::Failed | TaskState::Cancelled(_)
        )
    }
}

#[derive(Debug)]
struct Task {
    id: TaskId,
    client_id: u64,
    /// The owning session's slab index; meaningful while unfinished.
    session: u32,
    job: JobId,
    state: TaskState,
    /// Set when a running task has been told to stop; wins over whatever
    /// the job returns afterwards.
    cancelling: Option<Cause>,
    started_at: Option<Timestamp>,
    deadline_ms: u32,
    /// The payload until the task is queued, then the result or error text.
    data: Vec<u8>,
    ended_at: Timestamp,
}

impl Task {
    fn report(&self) -> TaskReport<'_> {
        match self.state {
            TaskState::Scheduled => TaskReport::Scheduled,
            TaskState::Queued => TaskReport::Queued,
            TaskState::Running => TaskReport::Running,
            TaskState::Done => TaskReport::Done(&self.data),
            // Failed texts are stored already truncated to a valid length.
            TaskState::Failed => {
                TaskReport::Failed(std::str::from_utf8(&self.data).unwrap_or("error"))
            }
            TaskState::Cancelled(reason) => TaskReport::Cancelled(reason),
        }
    }
}

/// The sans-IO tether engine. See the module documentation.
pub struct Engine {
    config: Config,
    now: Timestamp,
    sessions: Slab<Session>,
    live_by_client: ClientIndex,
    session_wheel: Wheel,
    /// Largest incarnation of clients whose sessions ended.
    records: ClientRecords,
    tasks: Slab<Task>,
    task_serial: u32,
    /// Delay timers of scheduled tasks and deadlines of running ones.
    task_wheel: Wheel,
    /// Which final states are kept (they stay in `tasks` meanwhile).
    finished: FinishedTasks,
    waiting_tasks: usize,
    unfinished_tasks: usize,
    shutting_down: bool,
    backlogged: bool,
    outbox: Outbox,
    effects: VecDeque<Effect>,
    expired_scratch: Vec<Expired>,
    events: VecDeque<Event>,
    task_scratch: Vec<TaskId>,
    stats: Stats,
}

impl Engine {
    /// An engine whose clock starts at `now`, once `config` passes
    /// [`Config::validate`].
    pub fn new(config: Config, now: Timestamp) -> Result<Engine, ConfigError> {
        config.validate()?;
        let start = Tick(now.0 / config.tick_us);
        // Reserve room for the expected sessions up front so a HELLO never
        // triggers a large reallocation (or a rehash of a million entries)
        // in the loop; untouched pages cost address space, not memory. The
        // cap keeps an absurd --max-sessions from failing the allocation.
        let expected_sessions = config.max_sessions.min(RESERVE_SESSIONS_MAX);
        let mut session_wheel = Wheel::new(start);
        session_wheel.reserve_keys(expected_sessions);
        let outbox = Outbox::new(
            config.max_outbox_bytes,
            config.amplification_limit && config.key.is_none(),
        );
        Ok(Engine {
            sessions: Slab::with_capacity(expected_sessions),
            live_by_client: ClientIndex::with_capacity(expected_sessions),
            session_wheel,
            records: ClientRecords::new(config.max_client_records, config.client_memory_ms),
            tasks: Slab::new(),
            task_serial: 0,
            task_wheel: Wheel::new(start),
            finished: FinishedTasks::new(
                config.max_finished_tasks,
                config.max_finished_per_client,
                config.finished_retention_ms,
            ),
            waiting_tasks: 0,
            unfinished_tasks: 0,
            shutting_down: false,
            backlogged: false,
            outbox,
            effects: VecDeque::new(),
            expired_scratch: Vec::new(),
            events: VecDeque::new(),
            task_scratch: Vec::new(),
            stats: Stats::default(),
            now,
            config,
        })
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Live sessions.
    pub fn live_sessions(&self) -> usize {
        self.live_by_client.len()
    }

    /// Tasks not yet in a final state.
    pub fn unfinished_tasks(&self) -> usize {
        self.unfinished_tasks
    }

    /// What the engine holds now (see [`Footprint`]; linear in sessions and
    /// tasks).
    pub fn footprint(&self) -> Footprint {
        let mut f = Footprint {
            live_sessions: self.live_by_client.len(),
            ended_sessions_held: self.sessions.len() - self.live_by_client.len(),
            unfinished_tasks: self.unfinished_tasks,
            final_states: self.finished.len(),
            client_records: self.records.len(),
            outbox_bytes: self.outbox.queued_bytes(),
            ..Footprint::default()
        };
        for (_, session) in &self.sessions {
            f.remembered_requests += session.work.as_ref().map_or(0, |w| w.requests.len());
        }
        for (_, task) in &self.tasks {
            f.task_bytes += task.data.len();
        }
        f
    }

    /// Whether [`Engine::begin_shutdown`] has been called.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Tells the engine whether the caller's socket holds more datagrams
    /// than it can read at once. While it does, answers to strangers are
    /// not sent, only counted in [`Stats::replies_shed`]: UNKNOWN_SESSION, a
    /// REJECTED to a HELLO, and the WELCOME of a session a HELLO opens (the
    /// session is opened all the same, and the client's retry of its HELLO
    /// is welcomed as a member's). Under a flood, the time a reply costs
    /// goes to reading live sessions' datagrams instead. These are answers a
    /// client must retry for anyway, since UDP may lose them; nothing a
    /// member of a live session asks for is ever shed.
    pub fn set_backlogged(&mut self, backlogged: bool) {
        self.backlogged = backlogged;
    }

    /// Call for every datagram that arrives, with the time it was read.
    /// Replies are queued for [`Engine::poll_transmit`] and task commands
    /// for [`Engine::poll_effect`]. A dropped datagram changed nothing and
    /// must not be answered.
    pub fn handle_datagram(
        &mut self,
        now: Timestamp,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), Dropped> {
        self.advance_clock(now);
        self.stats.datagrams += 1;
        let from = PeerAddr::from(from);
        self.outbox.received(&from, data.len());
        let datagram = match Datagram::decode(data, self.config.key.as_ref()) {
            Ok(d) => d,
            Err(e) => return Err(self.count_drop(Self::classify(e))),
        };
        if !datagram.message.kind().is_from_client() {
            return Err(self.count_drop(Dropped::WrongDirection));
        }
        if let Message::Hello { ttl_ms, .. } = datagram.message {
            return self.on_hello(&datagram.header, ttl_ms, from);
        }
        let h = datagram.header;
        let index = match self.live_session(h.client_id) {
            Some(i) if self.sessions[i as usize].incarnation == h.incarnation => i,
            _ => {
                // No state to protect, and the reply is never larger than the
                // datagram: both are bare headers (plus a MAC when keyed, and
                // then the datagram carried one too). A retired session's
                // client learns here that it must say HELLO again.
                self.stats.unknown_session += 1;
                self.reply_unknown_session(&h, from);
                return Ok(());
            }
        };
        let ttl_ms = {
            let session = &mut self.sessions[index as usize];
            if let Err(e) = session.replay.check(h.seq) {
                return Err(self.count_drop(Dropped::Replay(e)));
            }
            session.replay.record(h.seq);
            session.peer = from;
            session.ttl_ms
        };
        self.stats.accepted += 1;
        self.refresh(index, ttl_ms);
        match datagram.message {
            Message::Heartbeat => {
                self.stats.heartbeats += 1;
                if h.flags.contains(Flags::ACK) {
                    self.reply(index, Message::HeartbeatAck { acked_seq: h.seq });
                }
            }
            Message::Submit {
                request_id,
                delay_ms,
                deadline_ms,
                job,
                payload,
            } => self.on_submit(index, request_id, delay_ms, deadline_ms, job, payload),
            Message::Cancel { task_id } => {
                let cause = Cause::Cancelled {
                    from: SocketAddr::from(from),
                    incarnation: h.incarnation,
                };
                let outcome = self.cancel_by_client(h.client_id, TaskId(task_id), cause);
                self.reply(index, Message::CancelResult { task_id, outcome });
            }
            Message::Status { task_id } => self.on_status(index, h.client_id, task_id),
            Message::Bye => {
                self.reply(index, Message::ByeAck);
                self.stats.sessions_left += 1;
                let incarnation = h.incarnation;
                self.end_session(index, Cause::Left { incarnation }, None);
            }
            Message::Hello { .. } => unreachable!("HELLO handled above"),
            _ => unreachable!("server kinds refused above"),
        }
        Ok(())
    }

    /// Handles datagrams read together at `now`: the same as calling
    /// [`Engine::handle_datagram`] for each in order, but faster at scale.
    ///
    /// With a million sessions, each datagram's index slot and session are
    /// cache misses (and TLB misses) that one call would take one after
    /// another. Here a first pass reads every datagram's index slot and a
    /// second every session, both passes of independent loads that the CPU
    /// overlaps, so the third pass, the real work, finds them in cache.
    pub fn handle_datagrams<'a, I>(&mut self, now: Timestamp, batch: I)
    where
        I: Iterator<Item = (SocketAddr, &'a [u8])> + Clone,
    {
        let client_id = |bytes: &[u8]| -> Option<u64> {
            let id = bytes.get(8..16)?;
            Some(u64::from_be_bytes(id.try_into().ok()?))
        };
        let mut touched = 0u64;
        for (_, bytes) in batch.clone() {
            if let Some(id) = client_id(bytes) {
                touched ^= u64::from(self.live_by_client.touch(id));
            }
        }
        for (_, bytes) in batch.clone() {
            if let Some(index) = client_id(bytes).and_then(|id| self.live_session(id)) {
                let session = &self.sessions[index as usize];
                touched ^= session.incarnation ^ u64::from(session.ttl_ms);
            }
        }
        std::hint::black_box(touched);
        for (from, bytes) in batch {
            let _ = self.handle_datagram(now, from, bytes);
        }
    }

    /// Call when [`Engine::poll_timeout`]'s time has come (calling more
    /// often is harmless). Call it only after reading every datagram that
    /// was already waiting, so a paused caller does not expire sessions
    /// whose heartbeats are sitting in its socket.
    ///
    /// Expiry is decided for `now` itself, even when datagrams stamped
    /// later have already been handled: the caller passes the instant up to
    /// which it knows it has read everything (the server takes it before it
    /// drains its socket), and nothing later may count against a session.
    pub fn handle_timeout(&mut self, now: Timestamp) {
        self.advance_clock(now);
        let tick = Tick(now.0 / self.config.tick_us);
        let mut expired = std::mem::take(&mut self.expired_scratch);
        self.session_wheel.advance(tick, &mut expired);
        for e in expired.drain(..) {
            self.stats.sessions_expired += 1;
            let index = e.key.0;
            let incarnation = self.sessions[index as usize].incarnation;
            let lateness_us = now.0.saturating_sub(e.deadline.0 * self.config.tick_us);
            let cause = Cause::Expired {
                incarnation,
                at: now,
            };
            self.end_session(index, cause, Some(lateness_us));
        }
        self.task_wheel.advance(tick, &mut expired);
        for e in expired.drain(..) {
            let task = &mut self.tasks[e.key.0 as usize];
            match task.state {
                TaskState::Scheduled => {
                    task.state = TaskState::Queued;
                    move_task_gauge(
                        &mut self.stats,
                        Some(TaskState::Scheduled),
                        TaskState::Queued,
                    );
                    let run = Effect::Run {
                        task: task.id,
                        client_id: task.client_id,
                        job: task.job,
                        payload: std::mem::take(&mut task.data),
                    };
                    self.effects.push_back(run);
                }
                TaskState::Running => {
                    let (id, deadline_ms) = (task.id, task.deadline_ms);
                    self.cancel_task(id, Cause::Deadline { deadline_ms });
                }
                other => debug_assert!(false, "timer fired for task in state {other:?}"),
            }
        }
        self.expired_scratch = expired;
        self.age_records();
    }

    /// Call when a worker reports on a task. Reports for tasks that already
    /// reached a final state (cancelled while queued) are ignored.
    pub fn handle_task_event(&mut self, now: Timestamp, task: TaskId, event: TaskEvent) {
        self.advance_clock(now);
        let Some(t) = self.task_mut(task) else {
            return;
        };
        match event {
            TaskEvent::Started => {
                if t.state != TaskState::Queued {
                    return;
                }
                t.state = TaskState::Running;
                t.started_at = Some(now);
                // A task whose cancel crossed its start on the way is already
                // told to stop: its deadline no longer matters.
                let deadline_ms = if t.cancelling.is_some() {
                    0
                } else {
                    t.deadline_ms
                };
                self.waiting_tasks -= 1;
                move_task_gauge(&mut self.stats, Some(TaskState::Queued), TaskState::Running);
                if deadline_ms > 0 {
                    let due = self.tick_at_or_after(self.now.plus_millis(u64::from(deadline_ms)));
                    schedule(&mut self.task_wheel, WheelKey(task.index() as u32), due);
                }
            }
            TaskEvent::Withdrawn => {
                // Only a cancelled queued task is withdrawn; anything else is
                // a confused caller, and changes nothing.
                if t.state != TaskState::Queued {
                    return;
                }
                let Some(cause) = t.cancelling else {
                    return;
                };
                self.finish(task, TaskState::Cancelled(cause.reason()));
            }
            TaskEvent::Finished(outcome) => {
                if !matches!(t.state, TaskState::Running | TaskState::Queued) {
                    return;
                }
                let state = match (t.cancelling, outcome) {
                    (Some(cause), _) => TaskState::Cancelled(cause.reason()),
                    (None, JobOutcome::Done(result)) if result.len() <= wire::MAX_RESULT_LEN => {
                        t.data = result;
                        TaskState::Done
                    }
                    (None, JobOutcome::Done(result)) => {
                        t.data = format!(
                            "result of {} bytes exceeds the {} a datagram can carry",
                            result.len(),
                            wire::MAX_RESULT_LEN
                        )
                        .into_bytes();
                        TaskState::Failed
                    }
                    (None, JobOutcome::Failed(error)) => {
                        t.data = wire::truncate_text(&error, wire::MAX_TEXT_LEN)
                            .as_bytes()
                            .to_vec();
                        TaskState::Failed
                    }
                };
                self.finish(task, state);
            }
        }
    }

    /// Stops taking work: later HELLOs and SUBMITs get REJECTED 5, and every
    /// unfinished task is cancelled with reason shutdown. Keep calling the
    /// other methods until [`Engine::unfinished_tasks`] is zero and the
    /// outbox is empty, or the grace period runs out.
    pub fn begin_shutdown(&mut self, now: Timestamp) {
        self.advance_clock(now);
        self.shutting_down = true;
        self.stats.sessions_at_shutdown = self.live_by_client.len() as u64;
        let mut ids = std::mem::take(&mut self.task_scratch);
        ids.extend(
            self.tasks
                .iter()
                .filter(|(_, t)| !t.state.is_final())
                .map(|(_, t)| t.id),
        );
        for id in ids.drain(..) {
            self.cancel_task(id, Cause::Shutdown);
        }
        self.task_scratch = ids;
    }

    /// When to call [`Engine::handle_timeout`] next; `None` when nothing is
    /// pending (no session, no timer), so the caller can sleep until a
    /// datagram arrives.
    pub fn poll_timeout(&self) -> Option<Timestamp> {
        let next = match (self.session_wheel.next_due(), self.task_wheel.next_due()) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b)?,
        };
        Some(Timestamp(next.0 * self.config.tick_us))
    }

    /// Copies the next queued reply into `buf` (which must hold
    /// [`wire::MAX_DATAGRAM`] bytes) and returns its destination and length.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        self.outbox.pop(buf)
    }

    /// Puts back the reply last taken by [`Engine::poll_transmit`] because
    /// the socket would block; it is sent first next time.
    pub fn unpoll_transmit(&mut self, to: SocketAddr, datagram: &[u8]) {
        self.outbox.push_front(PeerAddr::from(to), datagram);
    }

    /// The next lifecycle event, when [`Config::record_events`] is set.
    /// Drain them after each call that handles input.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn record(&mut self, event: Event) {
        if self.config.record_events {
            self.events.push_back(event);
        }
    }

    /// The next task command for the worker pool.
    pub fn poll_effect(&mut self) -> Option<Effect> {
        self.effects.pop_front()
    }

    /// Whether replies are waiting.
    pub fn has_transmits(&self) -> bool {
        !self.outbox.is_empty()
    }

    #[inline]
    fn live_session(&self, client_id: u64) -> Option<u32> {
        let sessions = &self.sessions;
        self.live_by_client
            .get(client_id, |i| sessions[i as usize].client_id)
    }

    /// The first tick boundary at or after `t`: deadlines round up, so they
    /// never fire early.
    fn tick_at_or_after(&self, t: Timestamp) -> Tick {
        Tick(t.0.div_ceil(self.config.tick_us))
    }

    fn advance_clock(&mut self, now: Timestamp) {
        // A caller's clock that steps back must not move deadlines back.
        self.now = self.now.max(now);
    }

    fn classify(e: wire::Error) -> Dropped {
        match e {
            wire::Error::TooLarge { .. } => Dropped::TooLarge,
            e if e.is_auth() => Dropped::Auth(e),
            e => Dropped::Malformed(e),
        }
    }

    fn count_drop(&mut self, why: Dropped) -> Dropped {
        let counter = match why {
            Dropped::TooLarge => &mut self.stats.dropped_too_large,
            Dropped::Malformed(_) | Dropped::WrongDirection => &mut self.stats.dropped_malformed,
            Dropped::Auth(_) => &mut self.stats.dropped_bad_mac,
            Dropped::Replay(_) => &mut self.stats.dropped_replay,
            Dropped::StaleHello => &mut self.stats.dropped_stale_hello,
        };
        *counter += 1;
        why
    }

    /// Pushes a live session's expiry to `ttl_ms` after now. The engine's
    /// clock never goes back and a session's TTL never changes, so the new
    /// deadline is never earlier than the last: a plain store in the wheel.
    #[inline]
    fn refresh(&mut self, index: u32, ttl_ms: u32) {
        let due = self.tick_at_or_after(self.now.plus_millis(u64::from(ttl_ms)));
        self.session_wheel.extend(WheelKey(index), due);
    }

    fn on_hello(
        &mut self,
        h: &Header,
        requested_ttl_ms: u32,
        from: PeerAddr,
    ) -> Result<(), Dropped> {
        if let Some(index) = self.live_session(h.client_id) {
            let session = &mut self.sessions[index as usize];
            if h.incarnation < session.incarnation {
                return Err(self.count_drop(Dropped::StaleHello));
            }
            if h.incarnation == session.incarnation {
                if let Err(e) = session.replay.check(h.seq) {
                    return Err(self.count_drop(Dropped::Replay(e)));
                }
                session.replay.record(h.seq);
                session.peer = from;
                let ttl_ms = session.ttl_ms;
                self.stats.accepted += 1;
                self.refresh(index, ttl_ms);
                self.welcome(index);
                return Ok(());
            }
            if self.shutting_down {
                self.reject_hello(h, from, RejectCode::ShuttingDown);
                return Ok(());
            }
            self.stats.sessions_replaced += 1;
            let cause = Cause::Replaced {
                incarnation: self.sessions[index as usize].incarnation,
                by: h.incarnation,
            };
            self.end_session(index, cause, None);
        } else if let Some(largest) = self.records.largest_ended(h.client_id) {
            if h.incarnation <= largest {
                return Err(self.count_drop(Dropped::StaleHello));
            }
        }
        if self.shutting_down {
            self.reject_hello(h, from, RejectCode::ShuttingDown);
            return Ok(());
        }
        if self.live_by_client.len() >= self.config.max_sessions {
            self.stats.sessions_refused += 1;
            self.reject_hello(h, from, RejectCode::TooManySessions);
            return Ok(());
        }
        let ttl_ms = if requested_ttl_ms == 0 {
            self.config.default_ttl_ms
        } else {
            requested_ttl_ms
        }
        .clamp(self.config.min_ttl_ms, self.config.max_ttl_ms);
        let index = self.sessions.insert(Session {
            client_id: h.client_id,
            incarnation: h.incarnation,
            replay: ReplayWindow::new(h.seq),
            peer: from,
            tx_seq: 0,
            ttl_ms,
            live: true,
            work: None,
        }) as u32;
        let sessions = &self.sessions;
        self.live_by_client
            .insert(h.client_id, index, |i| sessions[i as usize].client_id);
        self.records.opened(h.client_id);
        let due = self.tick_at_or_after(self.now.plus_millis(u64::from(ttl_ms)));
        schedule(&mut self.session_wheel, WheelKey(index), due);
        self.stats.accepted += 1;
        self.stats.sessions_opened += 1;
        self.record(Event::SessionOpened {
            client_id: h.client_id,
            incarnation: h.incarnation,
            ttl_ms,
            peer: SocketAddr::from(from),
            at: self.now,
        });
        if self.backlogged {
            // Opened all the same: the client's retry finds the session and
            // is welcomed as a member, not a stranger.
            self.stats.replies_shed += 1;
        } else {
            self.welcome(index);
        }
        Ok(())
    }

    fn welcome(&mut self, index: u32) {
        let ttl_ms = self.sessions[index as usize].ttl_ms;
        let tick_ms = (self.config.tick_us / 1000) as u32;
        self.reply(index, Message::Welcome { ttl_ms, tick_ms });
    }

    fn on_submit(
        &mut self,
        index: u32,
        request_id: u32,
        delay_ms: u32,
        deadline_ms: u32,
        job: &str,
        payload: &[u8],
    ) {
        let remembered = self.sessions[index as usize]
            .work
            .as_ref()
            .and_then(|w| w.requests.iter().find(|r| r.id == request_id))
            .map(|r| r.reply);
        let reply = match remembered {
            Some(reply) => reply,
            None if !self.make_request_room(index) => {
                // Every answer it holds may still be retried: admitting this
                // one would mean forgetting one of them, and a late retry of
                // a forgotten SUBMIT would start its task a second time.
                self.stats.tasks_rejected += 1;
                RequestReply::Rejected(RejectCode::TooManyTasks)
            }
            None => {
                let reply = self.admit(index, delay_ms, deadline_ms, job, payload);
                self.sessions[index as usize]
                    .work
                    .get_or_insert_with(Box::default)
                    .requests
                    .push_back(Request {
                        id: request_id,
                        reply,
                        ended: None,
                    });
                reply
            }
        };
        match reply {
            RequestReply::Accepted(task) => self.reply(
                index,
                Message::Accepted {
                    request_id,
                    task_id: task.0,
                },
            ),
            RequestReply::Rejected(code) => self.reply(
                index,
                Message::Rejected {
                    request_id,
                    code,
                    message: reject_text(code),
                },
            ),
        }
    }

    /// Makes room for one more answered request id, if the session's memory
    /// is full, by forgetting one that can no longer be retried: the oldest
    /// rejection (a retry of it is judged afresh, which cannot start a task
    /// twice), else the oldest task that ended more than one TTL ago (the
    /// client's retry window: a client that has heard nothing for its TTL
    /// has lost its session anyway). An unfinished task's id, or one that
    /// ended within the TTL, is never forgotten; if that is all there is,
    /// there is no room.
    fn make_request_room(&mut self, index: u32) -> bool {
        let limit = request_memory(self.config.max_tasks_per_session);
        let now = self.now;
        let session = &mut self.sessions[index as usize];
        let window_us = u64::from(session.ttl_ms) * 1000;
        let Some(work) = session.work.as_mut() else {
            return true;
        };
        if work.requests.len() < limit {
            return true;
        }
        let forgettable = work
            .requests
            .iter()
            .position(|r| matches!(r.reply, RequestReply::Rejected(_)))
            .or_else(|| {
                work.requests.iter().position(|r| {
                    r.ended
                        .is_some_and(|ended| now.0.saturating_sub(ended.0) >= window_us)
                })
            });
        match forgettable {
            Some(i) => {
                work.requests.remove(i);
                true
            }
            None => false,
        }
    }

    fn admit(
        &mut self,
        index: u32,
        delay_ms: u32,
        deadline_ms: u32,
        job: &str,
        payload: &[u8],
    ) -> RequestReply {
        if self.shutting_down {
            self.stats.tasks_rejected += 1;
            return RequestReply::Rejected(RejectCode::ShuttingDown);
        }
        let Some(job) = self.config.jobs.lookup(job) else {
            self.stats.tasks_rejected += 1;
            return RequestReply::Rejected(RejectCode::UnknownJob);
        };
        let code = if !self.config.jobs.rule(job).admits(payload) {
            Some(RejectCode::BadRequest)
        } else if self.sessions[index as usize].unfinished() >= self.config.max_tasks_per_session {
            Some(RejectCode::TooManyTasks)
        } else if self.waiting_tasks >= self.config.max_waiting_tasks {
            Some(RejectCode::QueueFull)
        } else {
            None
        };
        if let Some(code) = code {
            self.stats.tasks_rejected += 1;
            return RequestReply::Rejected(code);
        }
        self.task_serial = self.task_serial.wrapping_add(1);
        let entry = self.tasks.vacant_entry();
        let id = TaskId(u64::from(self.task_serial) << 32 | entry.key() as u64);
        let state = if delay_ms > 0 {
            TaskState::Scheduled
        } else {
            TaskState::Queued
        };
        let session = &mut self.sessions[index as usize];
        entry.insert(Task {
            id,
            client_id: session.client_id,
            session: index,
            job,
            state,
            cancelling: None,
            started_at: None,
            deadline_ms,
            data: if delay_ms > 0 {
                payload.to_vec()
            } else {
                Vec::new()
            },
            ended_at: Timestamp(0),
        });
        session
            .work
            .get_or_insert_with(Box::default)
            .unfinished
            .push(id);
        let (client_id, incarnation) = (session.client_id, session.incarnation);
        move_task_gauge(&mut self.stats, None, state);
        self.record(Event::TaskAccepted {
            task: id,
            client_id,
            incarnation,
            job,
            at: self.now,
        });
        self.waiting_tasks += 1;
        self.unfinished_tasks += 1;
        self.stats.tasks_accepted += 1;
        if delay_ms > 0 {
            let due = self.tick_at_or_after(self.now.plus_millis(u64::from(delay_ms)));
            schedule(&mut self.task_wheel, WheelKey(id.index() as u32), due);
        } else {
            self.effects.push_back(Effect::Run {
                task: id,
                client_id,
                job,
                payload: payload.to_vec(),
            });
        }
        RequestReply::Accepted(id)
    }

    fn on_status(&mut self, index: u32, client_id: u64, task_id: u64) {
        let report = match find_task(&self.tasks, client_id, TaskId(task_id)) {
            Some(task) => task.report(),
            None => TaskReport::Unknown,
        };
        let session = &mut self.sessions[index as usize];
        let (peer, header) = (session.peer, session.next_header());
        let message = Message::TaskState { task_id, report };
        queue(
            &mut self.outbox,
            &mut self.stats,
            self.config.key.as_ref(),
            peer,
            &header,
            &message,
        );
    }

    fn cancel_by_client(&mut self, client_id: u64, id: TaskId, cause: Cause) -> CancelOutcome {
        match find_task(&self.tasks, client_id, id).map(|t| t.state) {
            None => CancelOutcome::UnknownTask,
            Some(state) if state.is_final() => CancelOutcome::AlreadyFinished,
            Some(_) => {
                self.cancel_task(id, cause);
                CancelOutcome::CancelledNow
            }
        }
    }

    /// Cancels an unfinished task: a scheduled or queued one reaches its
    /// final state now; a running one has its flag flipped and reaches it
    /// when the worker reports that it stopped.
    fn cancel_task(&mut self, id: TaskId, cause: Cause) {
        let Some(task) = self.task_mut(id) else {
            return;
        };
        let reason = cause.reason();
        match task.state {
            TaskState::Scheduled => {
                task.cancelling = Some(cause);
                self.task_wheel.remove(WheelKey(id.index() as u32));
                self.finish(id, TaskState::Cancelled(reason));
            }
            // Whoever holds the queue decides whether it still starts: it
            // answers Withdrawn (then it is final) or Started (then it runs
            // with its flag already set). Until then it keeps its place in
            // the queue's count, so the queue holds no more than counted.
            TaskState::Queued if task.cancelling.is_none() => {
                task.cancelling = Some(cause);
                self.effects.push_back(Effect::Cancel { task: id, reason });
            }
            // A second cancel of a running task changes nothing: the first
            // cause is the one its final state records.
            TaskState::Running if task.cancelling.is_none() => {
                task.cancelling = Some(cause);
                self.task_wheel.remove(WheelKey(id.index() as u32));
                self.effects.push_back(Effect::Cancel { task: id, reason });
            }
            _ => {}
        }
    }

    /// Moves a task to its final state and pushes TASK_STATE to its session.
    fn finish(&mut self, id: TaskId, state: TaskState) {
        debug_assert!(state.is_final());
        let now = self.now;
        // A running task's deadline timer (or a scheduled one's delay) must
        // go with it: the wheel is keyed by slab index, and a later task in
        // the same slot must not inherit the timer.
        self.task_wheel.remove(WheelKey(id.index() as u32));
        let task = &mut self.tasks[id.index()];
        debug_assert!(!task.state.is_final(), "finishing {id} twice: {task:?}");
        move_task_gauge(&mut self.stats, Some(task.state), state);
        if matches!(task.state, TaskState::Scheduled | TaskState::Queued) {
            self.waiting_tasks -= 1;
            if task.state == TaskState::Scheduled {
                task.data.clear();
            }
        }
        task.state = state;
        task.ended_at = now;
        let session_index = task.session;
        let ending = match state {
            TaskState::Done => {
                self.stats.tasks_done += 1;
                Ending::Done
            }
            TaskState::Failed => {
                self.stats.tasks_failed += 1;
                Ending::Failed
            }
            TaskState::Cancelled(reason) => {
                self.stats.tasks_cancelled += 1;
                self.stats.tasks_cancelled_by_reason[reason as usize] += 1;
                Ending::Cancelled(reason)
            }
            other => unreachable!("not final: {other:?}"),
        };
        let (client_id, job, cause) = (task.client_id, task.job, task.cancelling);
        let run_us = task.started_at.map(|s| now.0.saturating_sub(s.0));
        self.unfinished_tasks -= 1;
        let session = &mut self.sessions[session_index as usize];
        if let Some(work) = session.work.as_mut() {
            work.unfinished.retain(|t| *t != id);
            let accepted = RequestReply::Accepted(id);
            if let Some(request) = work.requests.iter_mut().find(|r| r.reply == accepted) {
                request.ended = Some(now);
            }
        }
        let (peer, header) = (session.peer, session.next_header());
        let incarnation = session.incarnation;
        self.record(Event::TaskEnded {
            task: id,
            client_id,
            incarnation,
            job,
            ending,
            cause,
            run_us,
            at: now,
        });
        let message = Message::TaskState {
            task_id: id.0,
            report: self.tasks[id.index()].report(),
        };
        queue(
            &mut self.outbox,
            &mut self.stats,
            self.config.key.as_ref(),
            peer,
            &header,
            &message,
        );
        self.release_if_done(session_index);
        // At most one state goes here: this client's oldest, past its bound.
        let pushed_out = std::cell::Cell::new(None);
        let tasks = &self.tasks;
        self.finished.push(
            id,
            client_id,
            now,
            |old, _| pushed_out.set(Some(old)),
            |kept| pushed_out.get() != Some(kept) && is_task(tasks, kept),
        );
        if let Some(old) = pushed_out.get() {
            self.stats.finished_evicted_early += 1;
            if is_task(&self.tasks, old) {
                self.tasks.remove(old.index());
            }
        }
        self.age_records();
    }

    /// Ends a live session: it can no longer be found, its wheel entry goes,
    /// its incarnation is remembered, and its unfinished tasks are cancelled.
    fn end_session(&mut self, index: u32, cause: Cause, lateness_us: Option<u64>) {
        let session = &mut self.sessions[index as usize];
        debug_assert!(session.live, "ending session {index} twice");
        session.live = false;
        let (client_id, incarnation) = (session.client_id, session.incarnation);
        let mut ids = std::mem::take(&mut self.task_scratch);
        if let Some(work) = session.work.as_ref() {
            ids.extend_from_slice(&work.unfinished);
        }
        let sessions = &self.sessions;
        self.live_by_client
            .remove(client_id, |i| sessions[i as usize].client_id);
        self.session_wheel.remove(WheelKey(index));
        // Pinned until the slot is released (release_if_done).
        self.records.retire(client_id, incarnation, self.now);
        self.record(Event::SessionEnded {
            client_id,
            incarnation,
            reason: cause.reason(),
            lateness_us,
            replaced_by: match cause {
                Cause::Replaced { by, .. } => Some(by),
                _ => None,
            },
            at: self.now,
        });
        for id in ids.drain(..) {
            self.cancel_task(id, cause);
        }
        self.task_scratch = ids;
        self.release_if_done(index);
    }

    /// Frees an ended session's slot once no task of it is unfinished.
    /// Tolerates a slot already freed by a nested call (ending a session
    /// finishes its tasks, and the last of those frees the slot).
    fn release_if_done(&mut self, index: u32) {
        let done = self
            .sessions
            .get(index as usize)
            .is_some_and(|s| !s.live && s.unfinished() == 0);
        if done {
            let session = self.sessions.remove(index as usize);
            self.records.release(session.client_id);
        }
    }

    /// Drops final states and client records past their retention, and
    /// final states past their bound.
    fn age_records(&mut self) {
        let (tasks, stats) = (&mut self.tasks, &mut self.stats);
        self.finished.age(self.now, |id, why| {
            if why == Forget::Early {
                stats.finished_evicted_early += 1;
            }
            if is_task(tasks, id) {
                tasks.remove(id.index());
            }
        });
        self.records.age(self.now);
    }

    fn task_mut(&mut self, id: TaskId) -> Option<&mut Task> {
        self.tasks.get_mut(id.index()).filter(|t| t.id == id)
    }

    fn reply(&mut self, index: u32, message: Message<'_>) {
        let session = &mut self.sessions[index as usize];
        let (peer, header) = (session.peer, session.next_header());
        queue(
            &mut self.outbox,
            &mut self.stats,
            self.config.key.as_ref(),
            peer,
            &header,
            &message,
        );
    }

    /// Answers with the header fields of the datagram answered, as the
    /// protocol asks of UNKNOWN_SESSION and a REJECTED HELLO.
    fn reply_to_request(&mut self, h: &Header, to: PeerAddr, message: Message<'_>) {
        if self.backlogged {
            self.stats.replies_shed += 1;
            return;
        }
        let header = Header {
            flags: Flags::empty(),
            ..*h
        };
        queue(
            &mut self.outbox,
            &mut self.stats,
            self.config.key.as_ref(),
            to,
            &header,
            &message,
        );
    }

    fn reply_unknown_session(&mut self, h: &Header, to: PeerAddr) {
        self.reply_to_request(h, to, Message::UnknownSession);
    }

    fn reject_hello(&mut self, h: &Header, to: PeerAddr, code: RejectCode) {
        self.reply_to_request(
            h,
            to,
            Message::Rejected {
                request_id: 0,
                code,
                message: reject_text(code),
            },
        );
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("now", &self.now)
            .field("live_sessions", &self.live_by_client.len())
            .field("slab_sessions", &self.sessions.len())
            .field("tasks", &self.tasks.len())
            .field("unfinished_tasks", &self.unfinished_tasks)
            .field("waiting_tasks", &self.waiting_tasks)
            .field("session_wheel", &self.session_wheel)
            .field("task_wheel", &self.task_wheel)
            .finish()
    }
}

/// Files `key` to fire at `due`. A deadline the wheel has already passed
/// fires at its next tick instead, as tokio-util's `DelayQueue` does with an
/// elapsed insert, and a key already present is moved: neither can happen
/// with a validated configuration, and neither may cost a panic.
fn schedule(wheel: &mut Wheel, key: WheelKey, due: Tick) {
    let due = due.max(Tick(wheel.now().0 + 1));
    if wheel.insert(key, due).is_err() {
        let _ = wheel.reset(key, due);
    }
}

/// Keeps the tasks-by-state gauges in step with a task's move.
fn move_task_gauge(stats: &mut Stats, from: Option<TaskState>, to: TaskState) {
    fn gauge(stats: &mut Stats, state: TaskState) -> Option<&mut u64> {
        match state {
            TaskState::Scheduled => Some(&mut stats.tasks_scheduled_now),
            TaskState::Queued => Some(&mut stats.tasks_queued_now),
            TaskState::Running => Some(&mut stats.tasks_running_now),
            _ => None,
        }
    }
    if let Some(g) = from.and_then(|f| gauge(stats, f)) {
        *g -= 1;
    }
    if let Some(g) = gauge(stats, to) {
        *g += 1;
    }
}

fn is_task(tasks: &Slab<Task>, id: TaskId) -> bool {
    tasks.get(id.index()).is_some_and(|t| t.id == id)
}

fn find_task(tasks: &Slab<Task>, client_id: u64, id: TaskId) -> Option<&Task> {
    tasks
        .get(id.index())
        .filter(|t| t.id == id && t.client_id == client_id)
}

/// Encodes a reply into the outbox, counting it, or counting its drop when
/// the outbox is full. A free function so callers can hold borrows of other
/// engine fields (a task's result) while queueing.
fn queue(
    outbox: &mut Outbox,
    stats: &mut Stats,
    key: Option<&MacKey>,
    to: PeerAddr,
    header: &Header,
    message: &Message<'_>,
) {
    match outbox.push(to, header, message, key) {
        Ok(()) => stats.replies += 1,
        Err(NotQueued::Full) => stats.replies_dropped += 1,
        Err(NotQueued::NoCredit) => stats.replies_unpaid += 1,
    }
}

/// How many answered request ids a session remembers: enough to cover every
/// unfinished task twice over, so a retry within any sane window is
/// recognised, while a client cannot grow the table without bound.
fn request_memory(max_tasks_per_session: usize) -> usize {
    (2 * max_tasks_per_session).max(64)
}

/// Short texts, so a REJECTED stays close to the size of what it answers.
fn reject_text(code: RejectCode) -> &'static str {
    match code {
        RejectCode::UnknownJob => "unknown job",
        RejectCode::QueueFull => "queue full",
        RejectCode::TooManyTasks => "too many tasks",
        RejectCode::BadRequest => "bad payload",
        RejectCode::ShuttingDown => "shutting down",
        RejectCode::TooManySessions => "",
    }
}

#[cfg(test)]
mod tests;
