//! What goes in and out of the engine besides datagrams: commands for the
//! worker pool, reports from it, lifecycle events, and why a datagram was
//! dropped.

use std::fmt;
use std::net::SocketAddr;

use super::{JobId, TaskId, Timestamp};
use crate::wire::{self, CancelReason, ReplayError};

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
    /// An [`Effect::Cancel`] came after the task's job had returned: the
    /// task ends as its job said (its `Finished` report is on the way),
    /// not cancelled.
    AlreadyReturned,
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
/// [`Config::record_events`](super::Config::record_events) is set (for logs, metrics and event streams).
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

/// Why [`Engine::handle_datagram`](super::Engine::handle_datagram) dropped a datagram without any reply.
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
