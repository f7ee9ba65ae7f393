//! Read-only views of live sessions, for `GET /sessions`: what an operator
//! asks of a server holding a million of them. A page walks the session
//! slab from a cursor (a slab position), so it costs the loop at most
//! [`SCAN_PER_PAGE`] slots whatever the number of sessions; a page can come
//! back short (or empty) with a cursor to go on from. It is a live view,
//! not a snapshot: a session that opens during a listing into a slot
//! already passed is not listed, and one that reopens into a slot ahead
//! is listed again (a new incarnation).

use std::net::SocketAddr;

use super::task::TaskState;
use super::types::SessionIndex;
use super::{Engine, Session};

/// Slab slots one page looks at, at most. Each live one costs a deadline
/// lookup and, for a session with unfinished tasks, a lookup per task (at
/// most `--max-tasks-per-session`); measured with one task in a hundred
/// sessions, a page of a thousand costs both threads about a millisecond
/// on the project's 2-core VM (BENCHMARKS.md, "Reading the sessions").
pub const SCAN_PER_PAGE: usize = 4096;

/// A live session as `/sessions` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionView {
    /// The client.
    pub client_id: u64,
    /// The session's incarnation.
    pub incarnation: u64,
    /// Where its last datagram came from.
    pub peer: SocketAddr,
    /// The TTL granted.
    pub ttl_ms: u32,
    /// How long since its last datagram (to within a tick): the session
    /// expires when this reaches the TTL.
    pub silent_ms: u64,
    /// Its unfinished tasks.
    pub tasks: TaskCounts,
}

impl SessionView {
    /// Past two thirds of its TTL without a datagram: about to expire
    /// unless a heartbeat comes.
    pub fn is_late(&self) -> bool {
        self.silent_ms * 3 >= u64::from(self.ttl_ms) * 2
    }
}

/// Unfinished tasks of a session, by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TaskCounts {
    /// Waiting out their delay.
    pub scheduled: u32,
    /// Waiting for a worker.
    pub queued: u32,
    /// On a worker.
    pub running: u32,
}

/// One page of sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SessionPage {
    /// The sessions found.
    pub sessions: Vec<SessionView>,
    /// Where the next page starts; `None` at the end.
    pub next: Option<u64>,
}

impl Engine {
    /// Up to `limit` live sessions from slab position `after` on (0 for the
    /// first page), only the late ones (see [`SessionView::is_late`]) if
    /// `late_only`. Looks at no more than [`SCAN_PER_PAGE`] slots.
    pub fn sessions_page(&self, after: u64, limit: usize, late_only: bool) -> SessionPage {
        let end = self.session_slots_used;
        let mut slot = usize::try_from(after).unwrap_or(usize::MAX).min(end);
        let stop = slot.saturating_add(SCAN_PER_PAGE).min(end);
        let mut sessions = Vec::new();
        while slot < stop && sessions.len() < limit {
            if let Some(view) = self
                .sessions
                .get(slot)
                .and_then(|s| self.view(slot, s, late_only))
            {
                sessions.push(view);
            }
            slot += 1;
        }
        SessionPage {
            sessions,
            next: (slot < end).then_some(slot as u64),
        }
    }

    /// `client_id`'s live session, if it has one.
    pub fn session_view(&self, client_id: u64) -> Option<SessionView> {
        let index = self.live_session(client_id)?;
        self.view(index.slot(), &self.sessions[index.slot()], false)
    }

    /// `s` as a view; `None` if it has ended, or if `late_only` and it is
    /// not late (checked before its tasks are counted).
    fn view(&self, slot: usize, s: &Session, late_only: bool) -> Option<SessionView> {
        if !s.live {
            return None;
        }
        let key = SessionIndex(u32::try_from(slot).ok()?).wheel_key();
        let deadline = self.ticks.start(self.session_wheel.deadline(key)?);
        let left_ms = deadline.0.saturating_sub(self.now.0) / 1000;
        let silent_ms = u64::from(s.ttl_ms).saturating_sub(left_ms);
        if late_only && silent_ms * 3 < u64::from(s.ttl_ms) * 2 {
            return None;
        }
        let mut tasks = TaskCounts::default();
        for id in s.work.iter().flat_map(|w| w.unfinished.iter()) {
            let state = super::task::find_task(&self.tasks, s.client_id, *id).map(|t| t.state);
            match state {
                Some(TaskState::Scheduled) => tasks.scheduled += 1,
                Some(TaskState::Queued) => tasks.queued += 1,
                Some(TaskState::Running) => tasks.running += 1,
                _ => {}
            }
        }
        Some(SessionView {
            client_id: s.client_id,
            incarnation: s.incarnation,
            peer: s.peer.into(),
            ttl_ms: s.ttl_ms,
            silent_ms,
            tasks,
        })
    }
}
