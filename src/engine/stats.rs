//! The engine's counters, and what it holds.

use super::task::TaskState;
use crate::wire::CancelReason;

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
    /// ([`Config::amplification_limit`](super::Config::amplification_limit)).
    pub replies_unpaid: u64,
    /// Answers to strangers (UNKNOWN_SESSION, REJECTED to a HELLO, WELCOME
    /// of a new session) not sent while the caller's socket was backlogged
    /// ([`Engine::set_backlogged`](super::Engine::set_backlogged)).
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

impl Stats {
    /// Tasks ended cancelled for `reason`.
    pub fn cancelled(&self, reason: CancelReason) -> u64 {
        self.tasks_cancelled_by_reason[reason as usize]
    }
}

/// Sums the counters of two engines (the shards of one server).
impl std::ops::AddAssign for Stats {
    fn add_assign(&mut self, other: Stats) {
        self.datagrams += other.datagrams;
        self.accepted += other.accepted;
        self.heartbeats += other.heartbeats;
        self.dropped_too_large += other.dropped_too_large;
        self.dropped_malformed += other.dropped_malformed;
        self.dropped_bad_mac += other.dropped_bad_mac;
        self.dropped_replay += other.dropped_replay;
        self.dropped_stale_hello += other.dropped_stale_hello;
        self.unknown_session += other.unknown_session;
        self.replies += other.replies;
        self.replies_dropped += other.replies_dropped;
        self.replies_unpaid += other.replies_unpaid;
        self.replies_shed += other.replies_shed;
        self.sessions_opened += other.sessions_opened;
        self.sessions_expired += other.sessions_expired;
        self.sessions_left += other.sessions_left;
        self.sessions_replaced += other.sessions_replaced;
        self.sessions_refused += other.sessions_refused;
        self.tasks_accepted += other.tasks_accepted;
        self.tasks_rejected += other.tasks_rejected;
        self.tasks_done += other.tasks_done;
        self.tasks_failed += other.tasks_failed;
        self.tasks_cancelled += other.tasks_cancelled;
        self.finished_evicted_early += other.finished_evicted_early;
        self.tasks_scheduled_now += other.tasks_scheduled_now;
        self.tasks_queued_now += other.tasks_queued_now;
        self.tasks_running_now += other.tasks_running_now;
        self.sessions_at_shutdown += other.sessions_at_shutdown;
        for (mine, theirs) in self
            .tasks_cancelled_by_reason
            .iter_mut()
            .zip(other.tasks_cancelled_by_reason)
        {
            *mine += theirs;
        }
    }
}

/// What the engine holds, counted the way its memory bounds are stated
/// (PROTOCOL.md, "Choices"). [`Engine::footprint`](super::Engine::footprint) reads it (in time linear
/// in sessions and tasks: for tests, fuzzing and capacity checks, not the
/// hot path); [`Config::client_bound`](super::Config::client_bound) gives what one client may hold.
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

/// Keeps the tasks-by-state gauges in step with a task's move.
pub(crate) fn move_task_gauge(stats: &mut Stats, from: Option<TaskState>, to: TaskState) {
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
