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
//! place, `types::Ticks`, which rounds deadlines *up*: a
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

mod config;
mod credit;
mod finished;
mod index;
mod io;
mod outbox;
mod peer;
mod records;
mod replies;
mod session;
mod stats;
mod submit;
mod task;
mod types;
mod view;

pub use config::{Config, ConfigError, SharedSessions, MAX_SESSIONS_LIMIT};
pub use io::{Cause, Dropped, Effect, Ending, Event, JobOutcome, TaskEvent};
pub use stats::{Footprint, Stats};
pub use types::{JobId, JobTable, PayloadRule, TaskId, Timestamp};
pub use view::{SessionPage, SessionView, TaskCounts, SCAN_PER_PAGE};

use std::collections::VecDeque;
use std::fmt;
use std::net::SocketAddr;

use slab::Slab;

use crate::wheel::{Expired, Tick, Wheel, WheelKey};
use crate::wire::{self, CancelOutcome, Datagram, Flags, Header, Message, RejectCode, TaskReport};
use config::RESERVE_SESSIONS_MAX;
use finished::{FinishedTasks, Forget};
use index::ClientIndex;
use peer::PeerAddr;
use records::ClientRecords;
use replies::Replies;
use session::{reject_text, RequestReply, Session};
use stats::move_task_gauge;
use task::{find_task, is_task, Task, TaskState};
use types::{FastMap, SessionIndex, Ticks};

/// The sans-IO tether engine. See the module documentation.
pub struct Engine {
    config: Config,
    now: Timestamp,
    ticks: Ticks,
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
    replies: Replies,
    effects: VecDeque<Effect>,
    expired_scratch: Vec<Expired>,
    events: VecDeque<Event>,
    task_scratch: Vec<TaskId>,
    stats: Stats,
    /// A replacing HELLO ended the old session keeping its place in the
    /// shared session count, for the new one to take (another shard must
    /// not slip in between and leave the client refused).
    place_kept: bool,
    /// Slab slots ever used (the highest session index, plus one): where a
    /// walk over the sessions can stop (`view.rs`).
    session_slots_used: usize,
    /// Live sessions whose TTL is not a whole number of ticks (see
    /// [`Engine::arrival_can_move_deadlines`]).
    sessions_off_tick: usize,
}

impl Engine {
    /// An engine whose clock starts at `now`, once `config` passes
    /// [`Config::validate`].
    pub fn new(config: Config, now: Timestamp) -> Result<Engine, ConfigError> {
        config.validate()?;
        let ticks = Ticks::new(config.tick_us);
        let start = ticks.passed(now);
        // Reserve room for the expected sessions up front so a HELLO never
        // triggers a large reallocation (or a rehash of a million entries)
        // in the loop; untouched pages cost address space, not memory. The
        // cap keeps an absurd --max-sessions from failing the allocation.
        let expected_sessions = config
            .reserve_sessions
            .unwrap_or(config.max_sessions)
            .min(config.max_sessions)
            .min(RESERVE_SESSIONS_MAX);
        let mut session_wheel = Wheel::new(start);
        session_wheel.reserve_keys(expected_sessions);
        Ok(Engine {
            ticks,
            replies: Replies::new(&config),
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
            effects: VecDeque::new(),
            expired_scratch: Vec::new(),
            events: VecDeque::new(),
            task_scratch: Vec::new(),
            stats: Stats::default(),
            now,
            config,
            place_kept: false,
            session_slots_used: 0,
            sessions_off_tick: 0,
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

    /// A task's state as a STATUS would report it, while the engine still
    /// holds the task (its final state is kept as PROTOCOL.md says).
    pub fn task_report(&self, task: TaskId) -> TaskReport<'_> {
        match self.tasks.get(task.index()) {
            Some(t) if t.id == task => t.report(),
            _ => TaskReport::Unknown,
        }
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
            outbox_bytes: self.replies.queued_bytes(),
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
        self.replies.set_backlogged(backlogged);
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
        self.receive(now, None, from, data)
    }

    /// As [`Engine::handle_datagram`], for a datagram read at `now` that
    /// arrived at `arrived` (the kernel's stamp, converted by the caller to
    /// the engine's clock; at or before `now`). Liveness is judged by
    /// arrival: a datagram that arrived after its session's deadline finds
    /// the session expired (it expires now, reason `expired`, and the
    /// datagram is answered as for an unknown session), and one that
    /// arrived in time refreshes the session from its arrival, however late
    /// it is read.
    pub fn handle_arrival(
        &mut self,
        now: Timestamp,
        arrived: Timestamp,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), Dropped> {
        self.receive(now, Some(arrived), from, data)
    }

    /// A datagram read at `now`, with its arrival if known. Without one it
    /// may have arrived any time since the last read: it is taken as
    /// arriving in time, refreshing from `now`, so an unknown arrival can
    /// never cost a session (the rule before arrival stamps).
    fn receive(
        &mut self,
        now: Timestamp,
        arrived: Option<Timestamp>,
        from: SocketAddr,
        data: &[u8],
    ) -> Result<(), Dropped> {
        self.advance_clock(now);
        let stamped = arrived.is_some();
        let arrived = arrived.map_or(now, |a| a.min(now));
        self.stats.datagrams += 1;
        let from = PeerAddr::from(from);
        self.replies.earn(&from, data.len());
        let datagram = match Datagram::decode(data, self.config.key.as_ref()) {
            Ok(d) => d,
            Err(e) => return Err(self.count_drop(Self::classify(e))),
        };
        if !datagram.message.kind().is_from_client() {
            return Err(self.count_drop(Dropped::WrongDirection));
        }
        if let Message::Hello { ttl_ms, .. } = datagram.message {
            return self.on_hello(&datagram.header, ttl_ms, from, arrived, stamped);
        }
        let h = datagram.header;
        let index = match self.live_session(h.client_id) {
            Some(i)
                if self.sessions[i.slot()].incarnation == h.incarnation
                    && !(stamped && self.expired_before(i, arrived)) =>
            {
                i
            }
            _ => {
                // No state to protect, and the reply is never larger than the
                // datagram: both are bare headers (plus a MAC when keyed, and
                // then the datagram carried one too). A retired session's
                // client learns here that it must say HELLO again.
                self.stats.unknown_session += 1;
                let reply = Message::UnknownSession;
                self.replies
                    .answer_stranger(&mut self.stats, &h, from, &reply);
                return Ok(());
            }
        };
        self.accept_member(index, &h, from, arrived)?;
        match datagram.message {
            Message::Heartbeat => {
                self.stats.heartbeats += 1;
                if h.flags.contains(Flags::ACK) {
                    self.reply(index, &Message::HeartbeatAck { acked_seq: h.seq });
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
                self.reply(index, &Message::CancelResult { task_id, outcome });
            }
            Message::Status { task_id } => self.on_status(index, h.client_id, task_id),
            Message::Bye => {
                self.reply(index, &Message::ByeAck);
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
    /// second every session and its wheel deadline, both passes of
    /// independent loads that the CPU overlaps, so the third pass, the real
    /// work, finds them in cache.
    /// Each datagram comes with its arrival, if known (see
    /// [`Engine::handle_arrival`]).
    pub fn handle_datagrams<'a, I>(&mut self, now: Timestamp, batch: I)
    where
        I: Iterator<Item = (SocketAddr, &'a [u8], Option<Timestamp>)> + Clone,
    {
        let mut touched = 0u64;
        for (_, bytes, _) in batch.clone() {
            if let Some(id) = wire::peek_client_id(bytes) {
                touched ^= u64::from(self.live_by_client.touch(id));
            }
        }
        for (_, bytes, _) in batch.clone() {
            if let Some(index) = wire::peek_client_id(bytes).and_then(|id| self.live_session(id)) {
                let session = &self.sessions[index.slot()];
                touched ^= session.incarnation ^ u64::from(session.ttl_ms);
                // The wheel's deadline (which also says the entry is
                // present) is the heartbeat's last miss: read it here too.
                touched ^= self
                    .session_wheel
                    .deadline(index.wheel_key())
                    .map_or(0, |t| t.0);
            }
        }
        std::hint::black_box(touched);
        for (from, bytes, arrived) in batch {
            let _ = self.receive(now, arrived, from, bytes);
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
        let tick = self.ticks.passed(now);
        let mut expired = std::mem::take(&mut self.expired_scratch);
        self.session_wheel.advance(tick, &mut expired);
        for e in expired.drain(..) {
            self.stats.sessions_expired += 1;
            let index = SessionIndex(e.key.0);
            let incarnation = self.sessions[index.slot()].incarnation;
            let lateness_us = now.0.saturating_sub(self.ticks.start(e.deadline).0);
            let cause = Cause::Expired {
                incarnation,
                at: now,
            };
            self.end_session(index, cause, Some(lateness_us));
        }
        self.task_wheel.advance(tick, &mut expired);
        for e in expired.drain(..) {
            let task = &mut self.tasks[e.key.0 as usize]; // the task wheel is keyed by task slot
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
                    let due = self.ticks.deadline(self.now, u64::from(deadline_ms));
                    schedule(&mut self.task_wheel, task.wheel_key(), due);
                }
            }
            TaskEvent::AlreadyReturned => {
                if !t.state.is_final() {
                    t.cancelling = None;
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
                self.finish(task, TaskState::Cancelled(cause.reason()), now);
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
                self.finish(task, state, now);
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
        Some(self.ticks.start(next))
    }

    /// Whether a member's datagram that arrived at some instant in
    /// `earliest..=latest` and is handled without its arrival (so as if it
    /// arrived when read, see [`Engine::handle_datagram`]; the caller reads
    /// it by `latest`) could leave its session a later deadline than its
    /// arrival gives. It cannot when every live session's TTL is a whole
    /// number of ticks and no tick begins inside the window: every instant
    /// of the window then rounds to the same deadline. A caller that reads
    /// in batches asks before a read whether the kernel's arrival stamps are
    /// worth their cost.
    ///
    /// Deadlines already due are another matter: a datagram that arrived
    /// after one must find its session expired, which only its stamp can
    /// tell. The caller learns of those from [`Engine::poll_timeout`].
    pub fn arrival_can_move_deadlines(&self, earliest: Timestamp, latest: Timestamp) -> bool {
        self.sessions_off_tick > 0 || self.ticks.boundary_within(earliest, latest)
    }

    /// Copies the next queued reply into `buf` (which must hold
    /// [`wire::MAX_DATAGRAM`] bytes) and returns its destination and length.
    /// A reply taken here is the caller's: if the socket would block, keep
    /// it and send it first next time.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        self.replies.pop(buf)
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
        !self.replies.is_empty()
    }

    #[inline]
    fn live_session(&self, client_id: u64) -> Option<SessionIndex> {
        let sessions = &self.sessions;
        self.live_by_client
            .get(client_id, |i| sessions[i as usize].client_id)
            .map(SessionIndex)
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
    ///
    /// The deadline counts from the datagram's arrival; datagrams of one
    /// batch may be handled out of arrival order, so it only ever moves
    /// later.
    #[inline]
    fn refresh(&mut self, index: SessionIndex, ttl_ms: u32, arrived: Timestamp) {
        let due = self.ticks.deadline(arrived, u64::from(ttl_ms));
        let key = index.wheel_key();
        if self.session_wheel.deadline(key).is_some_and(|d| due > d) {
            self.session_wheel.extend(key, due);
        }
    }

    /// Whether live session `index` had run out its TTL before `arrived`:
    /// its deadline tick had begun. If so it expires now, reason
    /// `expired`, as it would have had the datagram been read in time.
    fn expired_before(&mut self, index: SessionIndex, arrived: Timestamp) -> bool {
        let Some(deadline) = self.session_wheel.deadline(index.wheel_key()) else {
            return false;
        };
        let starts = self.ticks.start(deadline);
        if arrived < starts {
            return false;
        }
        self.stats.sessions_expired += 1;
        let incarnation = self.sessions[index.slot()].incarnation;
        let cause = Cause::Expired {
            incarnation,
            at: self.now,
        };
        let lateness_us = self.now.0.saturating_sub(starts.0);
        self.end_session(index, cause, Some(lateness_us));
        true
    }

    /// Takes a datagram of a live session's own incarnation as the session's
    /// latest: not a replay, so recorded in its window; its address becomes
    /// the session's; and the session lives another TTL from now.
    fn accept_member(
        &mut self,
        index: SessionIndex,
        h: &Header,
        from: PeerAddr,
        arrived: Timestamp,
    ) -> Result<(), Dropped> {
        let session = &mut self.sessions[index.slot()];
        if let Err(e) = session.replay.check(h.seq) {
            return Err(self.count_drop(Dropped::Replay(e)));
        }
        session.replay.record(h.seq);
        session.peer = from;
        let ttl_ms = session.ttl_ms;
        self.stats.accepted += 1;
        self.refresh(index, ttl_ms, arrived);
        Ok(())
    }

    fn on_hello(
        &mut self,
        h: &Header,
        requested_ttl_ms: u32,
        from: PeerAddr,
        arrived: Timestamp,
        stamped: bool,
    ) -> Result<(), Dropped> {
        if let Some(index) = self.live_session(h.client_id) {
            let incarnation = self.sessions[index.slot()].incarnation;
            if h.incarnation < incarnation {
                return Err(self.count_drop(Dropped::StaleHello));
            }
            if h.incarnation == incarnation {
                if stamped && self.expired_before(index, arrived) {
                    // It arrived too late to keep the session; now the
                    // session has ended, its HELLO is stale.
                    return Err(self.count_drop(Dropped::StaleHello));
                }
                self.accept_member(index, h, from, arrived)?;
                self.welcome(index);
                return Ok(());
            }
            if self.shutting_down {
                self.reject_hello(h, from, RejectCode::ShuttingDown);
                return Ok(());
            }
            // A newer incarnation that arrived after the old one's deadline
            // finds it expired, not replaced: its tasks end for that reason.
            if !(stamped && self.expired_before(index, arrived)) {
                self.stats.sessions_replaced += 1;
                let cause = Cause::Replaced {
                    incarnation,
                    by: h.incarnation,
                };
                self.place_kept = self.config.shared_sessions.is_some();
                self.end_session(index, cause, None);
            }
        } else if let Some(largest) = self.records.largest_ended(h.client_id) {
            if h.incarnation <= largest {
                return Err(self.count_drop(Dropped::StaleHello));
            }
        }
        if self.shutting_down {
            self.reject_hello(h, from, RejectCode::ShuttingDown);
            return Ok(());
        }
        let kept = std::mem::take(&mut self.place_kept);
        let shared_full = !kept
            && self
                .config
                .shared_sessions
                .as_ref()
                .is_some_and(|shared| !shared.try_open(self.config.max_sessions));
        if shared_full || self.live_by_client.len() >= self.config.max_sessions {
            if !shared_full {
                if let Some(shared) = &self.config.shared_sessions {
                    shared.close();
                }
            }
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
        let index = SessionIndex(self.sessions.insert(Session::new(h, from, ttl_ms)) as u32);
        if !self.ticks.whole(ttl_ms) {
            self.sessions_off_tick += 1;
        }
        self.session_slots_used = self.session_slots_used.max(index.slot() + 1);
        let sessions = &self.sessions;
        self.live_by_client
            .insert(h.client_id, index.0, |i| sessions[i as usize].client_id);
        self.records.opened(h.client_id);
        let due = self.ticks.deadline(self.now, u64::from(ttl_ms));
        schedule(&mut self.session_wheel, index.wheel_key(), due);
        self.stats.accepted += 1;
        self.stats.sessions_opened += 1;
        self.record(Event::SessionOpened {
            client_id: h.client_id,
            incarnation: h.incarnation,
            ttl_ms,
            peer: SocketAddr::from(from),
            at: self.now,
        });
        if self.replies.backlogged() {
            // Opened all the same: the client's retry finds the session and
            // is welcomed as a member, not a stranger.
            self.stats.replies_shed += 1;
        } else {
            self.welcome(index);
        }
        Ok(())
    }

    fn welcome(&mut self, index: SessionIndex) {
        let ttl_ms = self.sessions[index.slot()].ttl_ms;
        let tick_ms = self.ticks.millis();
        self.reply(index, &Message::Welcome { ttl_ms, tick_ms });
    }

    fn on_status(&mut self, index: SessionIndex, client_id: u64, task_id: u64) {
        let report = match find_task(&self.tasks, client_id, TaskId(task_id)) {
            Some(task) => task.report(),
            None => TaskReport::Unknown,
        };
        let message = Message::TaskState { task_id, report };
        let session = &mut self.sessions[index.slot()];
        self.replies
            .send_in_session(&mut self.stats, session, &message);
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
                self.task_wheel.remove(id.wheel_key());
                self.finish(id, TaskState::Cancelled(reason), self.now);
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
                self.task_wheel.remove(id.wheel_key());
                self.effects.push_back(Effect::Cancel { task: id, reason });
            }
            _ => {}
        }
    }

    /// Moves a task to its final state and pushes TASK_STATE to its session.
    /// `at` is when it ended: a worker's report says when the job returned,
    /// which may be a little before the engine hears of it.
    fn finish(&mut self, id: TaskId, state: TaskState, at: Timestamp) {
        debug_assert!(state.is_final());
        let now = self.now;
        // A running task's deadline timer (or a scheduled one's delay) must
        // go with it: the wheel is keyed by slab index, and a later task in
        // the same slot must not inherit the timer.
        self.task_wheel.remove(id.wheel_key());
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
        let run_us = task.started_at.map(|s| at.0.saturating_sub(s.0));
        self.unfinished_tasks -= 1;
        let session = &mut self.sessions[session_index.slot()];
        if let Some(work) = session.work.as_mut() {
            work.unfinished.retain(|t| *t != id);
            let accepted = RequestReply::Accepted(id);
            if let Some(request) = work.requests.iter_mut().find(|r| r.reply == accepted) {
                request.ended = Some(now);
            }
        }
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
        let session = &mut self.sessions[session_index.slot()];
        self.replies
            .send_in_session(&mut self.stats, session, &message);
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
    fn end_session(&mut self, index: SessionIndex, cause: Cause, lateness_us: Option<u64>) {
        let session = &mut self.sessions[index.slot()];
        debug_assert!(session.live, "ending session {index:?} twice");
        session.live = false;
        let (client_id, incarnation) = (session.client_id, session.incarnation);
        if !self.ticks.whole(session.ttl_ms) {
            self.sessions_off_tick -= 1;
        }
        let mut ids = std::mem::take(&mut self.task_scratch);
        if let Some(work) = session.work.as_mut() {
            ids.extend_from_slice(&work.unfinished);
            // No SUBMIT can reach an ended session: its answers are of no
            // use, and a slot held for a running task must not keep them.
            work.requests = std::collections::VecDeque::new();
        }
        let sessions = &self.sessions;
        self.live_by_client
            .remove(client_id, |i| sessions[i as usize].client_id);
        match &self.config.shared_sessions {
            Some(_) if self.place_kept => {}
            Some(shared) => shared.close(),
            None => {}
        }
        self.session_wheel.remove(index.wheel_key());
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
    fn release_if_done(&mut self, index: SessionIndex) {
        let done = self
            .sessions
            .get(index.slot())
            .is_some_and(|s| !s.live && s.unfinished() == 0);
        if done {
            let session = self.sessions.remove(index.slot());
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

    fn reply(&mut self, index: SessionIndex, message: &Message<'_>) {
        let session = &mut self.sessions[index.slot()];
        self.replies
            .send_in_session(&mut self.stats, session, message);
    }

    fn reject_hello(&mut self, h: &Header, to: PeerAddr, code: RejectCode) {
        let message = Message::Rejected {
            request_id: 0,
            code,
            message: reject_text(code),
        };
        self.replies
            .answer_stranger(&mut self.stats, h, to, &message);
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

#[cfg(test)]
mod tests;
