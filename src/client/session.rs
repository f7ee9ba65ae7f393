//! The client's side of the protocol as a state machine with no socket,
//! thread or clock, in the style of the server's engine and quinn-proto:
//!
//! ```text
//!       datagram bytes, now ──► handle_datagram ─┐            ┌─► poll_transmit: datagrams to send
//!                       now ──► handle_timeout  ─┼─► session ─┼─► poll_timeout: when to call again
//!   request (SUBMIT, ...), now ──► start ────────┘            ├─► completion(id): a request's answer
//!                                                             └─► poll_event: pushed final states,
//!                                                                 lost and reopened sessions
//! ```
//!
//! It numbers datagrams, retries requests (every retry a new datagram with
//! the next `seq`, a SUBMIT keeping its `request_id`), heartbeats every
//! interval, matches replies to requests (UNKNOWN_SESSION by the
//! `(incarnation, seq)` of the datagram it answers), drops replays, keeps
//! final states, and reopens a session the server lost with a larger
//! incarnation, at once. HELLO retries back off exponentially with full
//! jitter (capped at the TTL), so a fleet that reconnects together spreads
//! out instead of retrying in lockstep.
//!
//! With several servers it also picks the host (rendezvous hashing of the
//! client_id, see `hosts.rs`) and moves to the next in its order when the
//! host has been silent for a TTL; every datagram it hands out goes to
//! [`ClientSession::server`].
//!
//! Time is an [`Instant`] the caller passes in; the wall clock is read once,
//! by the caller, to seed incarnations. A test drives hours of it in
//! microseconds (see the tests at the bottom).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::hosts;
use super::{ClientConfig, ClientError, ClientEvent, Resume, TaskStatus};
use crate::engine::TaskId;
use crate::wire::{
    self, CancelOutcome, Datagram, Flags, Header, Message, RejectCode, ReplayWindow, MAX_DATAGRAM,
};

/// Unclaimed events, and final states, kept at most.
const MAX_EVENTS: usize = 65_536;

/// ACK'd heartbeats remembered for round-trip times.
const ACKS_REMEMBERED: usize = 64;

/// Names a request started with [`ClientSession::start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestId(u64);

/// A request the caller can start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// SUBMIT `job` with `payload`.
    Submit {
        /// The job's name.
        job: String,
        /// Its payload.
        payload: Vec<u8>,
        /// Held back this long before it is queued.
        delay: Duration,
        /// Cancelled this long after it starts (zero: never).
        deadline: Duration,
    },
    /// STATUS of a task.
    Status(TaskId),
    /// CANCEL a task.
    Cancel(TaskId),
    /// BYE: end the session.
    Bye,
}

/// How a request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// SUBMIT: the task's id.
    Accepted(TaskId),
    /// STATUS: the task's state.
    Status(TaskStatus),
    /// CANCEL: what it did.
    Cancel(CancelOutcome),
    /// BYE: the session has ended.
    Bye,
}

/// The session's life, as the client knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A HELLO is out, no WELCOME yet.
    Opening,
    /// Welcomed; heartbeating.
    Live,
    /// The server said it lost the session; a new one is being opened.
    Lost,
    /// Closed by the caller, or a BYE was answered.
    Closed,
}

/// What a reply must be to answer a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wanted {
    Welcome,
    Submit(u32),
    TaskState(u64),
    CancelResult(u64),
    ByeAck,
}

/// A request in flight.
#[derive(Debug)]
struct Pending {
    id: RequestId,
    /// The datagram body to send on each try (encoded afresh: new `seq`).
    message: OwnedMessage,
    wanted: Wanted,
    /// `(incarnation, seq)` of each try so far (a HELLO keeps none: nothing
    /// answers it by seq).
    sent: Vec<(u64, u32)>,
    /// Tries sent so far.
    attempts: u32,
    tries_left: u32,
    next_try: Instant,
}

/// A client message with its data owned, to be encoded on each try.
#[derive(Debug, Clone)]
enum OwnedMessage {
    Hello {
        ttl_ms: u32,
        name: String,
    },
    Submit {
        request_id: u32,
        delay_ms: u32,
        deadline_ms: u32,
        job: String,
        payload: Vec<u8>,
    },
    Status(u64),
    Cancel(u64),
    Bye,
}

impl OwnedMessage {
    fn borrow(&self) -> Message<'_> {
        match self {
            OwnedMessage::Hello { ttl_ms, name } => Message::Hello {
                ttl_ms: *ttl_ms,
                name,
            },
            OwnedMessage::Submit {
                request_id,
                delay_ms,
                deadline_ms,
                job,
                payload,
            } => Message::Submit {
                request_id: *request_id,
                delay_ms: *delay_ms,
                deadline_ms: *deadline_ms,
                job,
                payload,
            },
            OwnedMessage::Status(task_id) => Message::Status { task_id: *task_id },
            OwnedMessage::Cancel(task_id) => Message::Cancel { task_id: *task_id },
            OwnedMessage::Bye => Message::Bye,
        }
    }
}

/// The sans-IO client session. See the module documentation.
#[derive(Debug)]
pub struct ClientSession {
    config: ClientConfig,
    state: State,
    incarnation: u64,
    tx_seq: u32,
    ttl_ms: u32,
    tick_ms: u32,
    server_window: Option<ReplayWindow>,
    next_request_id: u32,
    /// Incarnations are the wall clock in nanoseconds: the wall time at
    /// `epoch`, plus the monotonic time since.
    epoch: (Instant, u64),
    /// The HELLO in flight, if any: opening or reopening.
    hello: Option<Pending>,
    /// A resumed session not yet confirmed: if the server no longer has
    /// it, open a fresh one instead of failing.
    resuming: bool,
    requests: Vec<Pending>,
    next_id: u64,
    done: HashMap<RequestId, Result<Answer, ClientError>>,
    /// Final states pushed or read, by task id, with the incarnation they
    /// came under (a restarted server numbers its tasks afresh).
    finals: HashMap<u64, (u64, TaskStatus)>,
    events: VecDeque<ClientEvent>,
    next_heartbeat: Option<Instant>,
    heartbeats: u32,
    paused: bool,
    acks: VecDeque<(u32, Instant)>,
    rtt: Option<Duration>,
    last_sent: Instant,
    transmits: VecDeque<Vec<u8>>,
    rng: u64,
    /// The outcome of the first HELLO, for [`ClientSession::opened`].
    opened: Option<Result<(), ClientError>>,
    /// The servers in this client's order of preference (one, when the
    /// client was given one).
    ranked: Vec<SocketAddr>,
    /// The one in `ranked` that the session is on.
    current: usize,
    /// When the current host last answered, or when the client turned to
    /// it: a TTL past this, it moves on.
    heard: Instant,
    /// Hosts turned to without a WELCOME since the last one: opening gives
    /// up once it has tried them all.
    unwelcomed_hosts: usize,
    /// When the client last asked its host for an answer (a HELLO, or a
    /// heartbeat asking for an ACK) and has not heard from it since: only
    /// a host that leaves asks unanswered is judged silent.
    unanswered: Option<Instant>,
}

impl ClientSession {
    /// A session for `config`, opening at `now` (a HELLO is ready to send;
    /// or, with [`ClientConfig::resume`], a HELLO continuing that session).
    /// `wall_ns` is the wall clock in nanoseconds since the Unix epoch: the
    /// incarnations it makes start there, and only grow.
    pub fn new(config: ClientConfig, now: Instant, wall_ns: u64) -> ClientSession {
        let resume = config.resume;
        let ranked = hosts::rank(config.client_id, &config.servers);
        // A resumed session is on the host it was on, if that is listed.
        let current = resume
            .and_then(|r| r.server)
            .and_then(|server| ranked.iter().position(|&s| s == server))
            .unwrap_or(0);
        let mut s = ClientSession {
            ranked,
            current,
            heard: now,
            unwelcomed_hosts: 1,
            unanswered: None,
            state: State::Opening,
            incarnation: wall_ns.max(1),
            tx_seq: 0,
            ttl_ms: 0,
            tick_ms: 0,
            server_window: None,
            next_request_id: 1,
            epoch: (now, wall_ns),
            hello: None,
            resuming: false,
            requests: Vec::new(),
            next_id: 1,
            done: HashMap::new(),
            finals: HashMap::new(),
            events: VecDeque::new(),
            next_heartbeat: None,
            heartbeats: 0,
            paused: false,
            acks: VecDeque::new(),
            rtt: None,
            last_sent: now,
            transmits: VecDeque::new(),
            rng: (wall_ns ^ config.client_id.rotate_left(32)) | 1,
            opened: None,
            config,
        };
        match resume {
            Some(r) => {
                s.incarnation = r.incarnation;
                s.tx_seq = r.next_seq.wrapping_sub(1);
                s.next_request_id = r.next_request_id.max(1);
                s.resuming = true;
                // A HELLO of the same incarnation only repeats WELCOME; one
                // for a session the server no longer has is stale and gets
                // no answer, so after two tries a new session is opened.
                s.send_hello(now, 2);
            }
            None => {
                let tries = s.config.tries;
                s.send_hello(now, tries);
            }
        }
        s
    }

    /// The session's state.
    pub fn state(&self) -> State {
        self.state
    }

    /// How the first HELLO was answered: `None` while it is out.
    pub fn opened(&self) -> Option<Result<(), ClientError>> {
        self.opened.clone()
    }

    /// `(client_id, incarnation)` of the current session.
    pub fn session(&self) -> (u64, u64) {
        (self.config.client_id, self.incarnation)
    }

    /// Where this session is now, for [`ClientConfig::resume`] elsewhere.
    pub fn resume_point(&self) -> Resume {
        Resume {
            incarnation: self.incarnation,
            next_seq: self.tx_seq.wrapping_add(1).max(1),
            next_request_id: self.next_request_id,
            server: self.ranked.get(self.current).copied(),
        }
    }

    /// The host every datagram from [`ClientSession::poll_transmit`] goes
    /// to.
    ///
    /// # Panics
    ///
    /// If the configuration listed no server.
    pub fn server(&self) -> SocketAddr {
        self.ranked[self.current]
    }

    /// The servers, in this client's order of preference.
    pub fn servers(&self) -> &[SocketAddr] {
        &self.ranked
    }

    /// A new list of servers (from a DNS name looked up again). The client
    /// stays on its host if it is still listed: moving a live session would
    /// cancel its tasks there, so a host that joins gains new clients and
    /// those of hosts that fail, not the clients of hosts that answer. If
    /// its host left the list, it moves at once to its first choice of the
    /// new list. An empty list changes nothing.
    pub fn set_servers(&mut self, now: Instant, servers: &[SocketAddr]) {
        let ranked = hosts::rank(self.config.client_id, servers);
        if ranked.is_empty() || ranked == self.ranked || self.state == State::Closed {
            return;
        }
        let server = self.server();
        let still_listed = ranked.iter().position(|&s| s == server);
        self.ranked = ranked;
        match still_listed {
            Some(i) => self.current = i,
            None => {
                self.unwelcomed_hosts = 0;
                self.move_to(now, server, 0);
            }
        }
    }

    /// The TTL granted (zero before the WELCOME).
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(u64::from(self.ttl_ms))
    }

    /// The server's timer tick (zero before the WELCOME).
    pub fn tick(&self) -> Duration {
        Duration::from_millis(u64::from(self.tick_ms))
    }

    /// The last heartbeat round-trip time measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.rtt
    }

    /// When the last datagram was handed out to send.
    pub fn last_sent(&self) -> Instant {
        self.last_sent
    }

    /// Stops (or resumes) heartbeats, to play a client that went silent.
    pub fn pause_heartbeats(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Starts `request` at `now`; its answer comes back through
    /// [`ClientSession::completion`].
    pub fn start(&mut self, now: Instant, request: Request) -> RequestId {
        let id = RequestId(self.next_id);
        self.next_id += 1;
        if self.state == State::Closed {
            self.done.insert(id, Err(ClientError::Closed));
            return id;
        }
        let (message, wanted) = match request {
            Request::Submit {
                job,
                payload,
                delay,
                deadline,
            } => {
                let request_id = self.next_request_id;
                self.next_request_id = request_id.wrapping_add(1).max(1);
                let message = OwnedMessage::Submit {
                    request_id,
                    delay_ms: millis(delay),
                    deadline_ms: millis(deadline),
                    job,
                    payload,
                };
                (message, Wanted::Submit(request_id))
            }
            Request::Status(task) => (OwnedMessage::Status(task.0), Wanted::TaskState(task.0)),
            Request::Cancel(task) => (OwnedMessage::Cancel(task.0), Wanted::CancelResult(task.0)),
            Request::Bye => (OwnedMessage::Bye, Wanted::ByeAck),
        };
        let mut pending = Pending {
            id,
            message,
            wanted,
            sent: Vec::new(),
            attempts: 0,
            tries_left: self.config.tries.max(1),
            next_try: now,
        };
        // While the session is (re)opening, a request waits for the WELCOME
        // (a try of its time passes all the same, so it cannot wait
        // forever); sent now, it would find no session.
        if self.state == State::Live {
            if let Err(e) = self.try_once(now, &mut pending) {
                self.done.insert(id, Err(e));
                return id;
            }
        } else {
            pending.tries_left -= 1;
            pending.next_try = now + self.config.retry_after;
        }
        self.requests.push(pending);
        id
    }

    /// The answer to request `id`, once it has one (taken: asked again,
    /// `None`).
    pub fn completion(&mut self, id: RequestId) -> Option<Result<Answer, ClientError>> {
        self.done.remove(&id)
    }

    /// Forgets request `id` (its caller gave up waiting).
    pub fn abandon(&mut self, id: RequestId) {
        self.requests.retain(|p| p.id != id);
        self.done.remove(&id);
    }

    /// The final state of `task`, if the server pushed it or a STATUS
    /// read it.
    pub fn final_state(&self, task: TaskId) -> Option<&TaskStatus> {
        self.finals.get(&task.0).map(|(_, status)| status)
    }

    /// The next unsolicited event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// Removes `task`'s [`ClientEvent::TaskEnded`], once the caller has its
    /// final state another way, so it is not reported twice.
    pub fn claim_event(&mut self, task: TaskId) {
        self.events
            .retain(|e| !matches!(e, ClientEvent::TaskEnded { task: t, .. } if *t == task));
    }

    /// Whether an event is waiting.
    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmits.pop_front()
    }

    /// When to call [`ClientSession::handle_timeout`] next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let retries = self
            .requests
            .iter()
            .chain(self.hello.as_ref())
            .map(|p| p.next_try);
        let heartbeat = self.next_heartbeat.filter(|_| self.state == State::Live);
        retries
            .chain(heartbeat)
            .chain(self.silence_deadline())
            .chain(self.probe_due())
            .min()
    }

    /// When the client gives up on a silent host, if it has another: a
    /// TTL after it last heard from the host, and not before an ask has
    /// gone unanswered for `retry_after`. So a client that was itself
    /// quiet (heartbeats paused, the process stopped or starved) asks
    /// before it judges, rather than leaving a host that never had the
    /// chance to answer.
    fn silence_deadline(&self) -> Option<Instant> {
        let waiting = match self.state {
            State::Live => !self.paused,
            State::Opening | State::Lost => true,
            State::Closed => false,
        };
        // A client saying BYE is leaving, not looking for another host.
        let leaving = self.requests.iter().any(|p| p.wanted == Wanted::ByeAck);
        if !waiting || leaving || self.ranked.len() < 2 {
            return None;
        }
        let asked = self.unanswered?;
        Some((self.heard + self.silence_limit()).max(asked + self.config.retry_after))
    }

    /// How long a host may stay silent: the TTL granted (a session heard
    /// from less often than that has expired there), or asked for, or 3 s.
    fn silence_limit(&self) -> Duration {
        [self.ttl(), self.config.ttl, Duration::from_secs(3)]
            .into_iter()
            .find(|ttl| !ttl.is_zero())
            .unwrap_or_default()
    }

    /// When to probe the host again: with another host to go to, a
    /// heartbeat that asked for an ACK and was not answered within
    /// `retry_after` is followed by another, and so on until one is. A host
    /// is left only when it answered none of a TTL's probes, so lost ACKs
    /// move a client far less often than lost heartbeats expire it.
    fn probe_due(&self) -> Option<Instant> {
        let asked = self.unanswered?;
        let waiting = self.ranked.len() > 1 && self.state == State::Live && !self.paused;
        waiting.then(|| asked + self.config.retry_after)
    }

    /// A datagram of the current session came from the host.
    fn heard_from_host(&mut self, now: Instant) {
        self.heard = now;
        self.unanswered = None;
    }

    /// Moves to the next host in this client's order (after the last, the
    /// first again).
    fn fail_over(&mut self, now: Instant) {
        let from = self.server();
        let next = (self.current + 1) % self.ranked.len();
        self.move_to(now, from, next);
    }

    /// Leaves `from` for `ranked[to]` with a new incarnation and a fresh
    /// HELLO. Nothing is said to `from`: if it is alive it expires the old
    /// session as it would any silent client, cancelling its tasks
    /// (reason `expired`). Requests in flight fail with
    /// [`ClientError::SessionLost`], for their callers to retry on the new
    /// host.
    fn move_to(&mut self, now: Instant, from: SocketAddr, to: usize) {
        match self.state {
            State::Closed => return,
            State::Opening if self.unwelcomed_hosts >= self.ranked.len() => {
                // Every host had its chance: opening fails.
                self.fail_to_open(ClientError::Timeout);
                return;
            }
            _ => {}
        }
        self.current = to;
        self.heard = now;
        self.unanswered = None;
        self.transmits.clear();
        let to = self.server();
        push_bounded(&mut self.events, ClientEvent::Moved { from, to });
        match self.state {
            State::Closed => {}
            State::Opening => {
                self.unwelcomed_hosts += 1;
                self.resuming = false;
                self.new_incarnation(now);
                let tries = self.config.tries;
                self.send_hello(now, tries);
            }
            State::Live | State::Lost => {
                if self.state == State::Live {
                    push_bounded(
                        &mut self.events,
                        ClientEvent::SessionLost {
                            incarnation: self.incarnation,
                        },
                    );
                }
                self.state = State::Lost;
                for p in self.requests.drain(..) {
                    self.done.insert(p.id, Err(ClientError::SessionLost));
                }
                self.unwelcomed_hosts += 1;
                self.reopen(now);
            }
        }
    }

    /// Closes the session without a BYE: nothing more is sent, and every
    /// request in flight fails with [`ClientError::Closed`].
    pub fn close(&mut self) {
        self.state = State::Closed;
        self.hello = None;
        for p in self.requests.drain(..) {
            self.done.insert(p.id, Err(ClientError::Closed));
        }
        if self.opened.is_none() {
            self.opened = Some(Err(ClientError::Closed));
        }
    }

    /// Opening failed with `e`: closed, with whatever waited for the
    /// session failing too.
    fn fail_to_open(&mut self, e: ClientError) {
        self.opened = Some(Err(e));
        self.close();
    }

    /// Retries what is due, heartbeats when due, and gives up on requests
    /// out of tries. Call when [`ClientSession::poll_timeout`] says, or
    /// more often.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if let Some(due) = self.silence_deadline().filter(|due| *due <= now) {
            if now.saturating_duration_since(due) > self.config.retry_after {
                // Called long after the host was due to be judged: this
                // client was not running (stopped, starved), so the
                // silence is its own as much as the host's. Ask again
                // (the heartbeat or HELLO due now asks) before judging.
                self.unanswered = None;
            } else {
                self.fail_over(now);
                if self.state == State::Closed {
                    return;
                }
            }
        }
        self.retry_hello(now);
        let mut requests = std::mem::take(&mut self.requests);
        requests.retain_mut(|p| {
            if p.next_try > now {
                return true;
            }
            if p.tries_left == 0 {
                self.done.insert(p.id, Err(ClientError::Timeout));
                return false;
            }
            if self.state != State::Live {
                p.tries_left -= 1;
                p.next_try = now + self.config.retry_after;
                return true;
            }
            match self.try_once(now, p) {
                Ok(()) => true,
                Err(e) => {
                    self.done.insert(p.id, Err(e));
                    false
                }
            }
        });
        requests.append(&mut self.requests);
        self.requests = requests;
        if self.state == State::Live {
            if let Some(due) = self.next_heartbeat.filter(|due| *due <= now) {
                // On schedule, unless the caller fell a whole interval
                // behind: then from now, rather than a burst to catch up.
                let next = due + self.interval();
                self.next_heartbeat = Some(if next <= now {
                    now + self.interval()
                } else {
                    next
                });
                if !self.paused {
                    self.heartbeat(now);
                }
            } else if self.probe_due().is_some_and(|due| due <= now) {
                self.heartbeat(now);
            }
        }
    }

    /// Takes in a datagram that came from `from`, read at `now`. Anything
    /// that is not a valid datagram of this client's sessions, or did not
    /// come from the current host ([`ClientSession::server`]), is dropped:
    /// a host the client left has nothing more to tell it (its task ids
    /// would collide with the new host's).
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        if from != self.server() {
            return;
        }
        let Ok(d) = Datagram::decode(bytes, self.config.key.as_ref()) else {
            return;
        };
        let h = d.header;
        if h.client_id != self.config.client_id || d.message.kind().is_from_client() {
            return;
        }
        if let Message::UnknownSession = d.message {
            if h.incarnation == self.incarnation {
                self.heard_from_host(now);
            }
            self.on_unknown_session(now, &h);
            return;
        }
        // A REJECTED to a HELLO copies the HELLO's header, as UNKNOWN_SESSION
        // does: it is outside the server's numbering, and taking its seq
        // into the window would drop the server's own datagrams later.
        let copies_our_header = matches!(d.message, Message::Rejected { request_id: 0, .. });
        if h.incarnation == self.incarnation && !copies_our_header {
            match self.server_window.as_mut() {
                Some(w) => {
                    if w.accept(h.seq).is_err() {
                        return;
                    }
                }
                None => self.server_window = Some(ReplayWindow::new(h.seq)),
            }
            self.heard_from_host(now);
        } else if h.incarnation == self.incarnation {
            // A refusal for want of room, or because the host is stopping,
            // does not keep the client there: only a WELCOME does.
            let unavailable = matches!(
                d.message,
                Message::Rejected {
                    code: RejectCode::ShuttingDown | RejectCode::TooManySessions,
                    ..
                }
            );
            if !unavailable {
                self.heard_from_host(now);
            }
        } else if h.incarnation != self.incarnation
            && !matches!(d.message, Message::TaskState { report, .. } if report.is_final())
        {
            // Only final states of an earlier session's tasks are still of use.
            return;
        }
        match d.message {
            Message::Welcome { ttl_ms, tick_ms } => self.on_welcome(now, ttl_ms, tick_ms),
            Message::HeartbeatAck { acked_seq } => {
                if let Some(&(_, sent)) = self.acks.iter().find(|(s, _)| *s == acked_seq) {
                    self.rtt = Some(now.saturating_duration_since(sent));
                }
            }
            Message::Accepted {
                request_id,
                task_id,
            } => {
                // A final state kept under this id from another incarnation
                // is another task's, from before a server restart.
                if self
                    .finals
                    .get(&task_id)
                    .is_some_and(|(i, _)| *i != h.incarnation)
                {
                    self.finals.remove(&task_id);
                }
                self.complete(
                    Wanted::Submit(request_id),
                    Ok(Answer::Accepted(TaskId(task_id))),
                );
            }
            Message::Rejected {
                request_id,
                code,
                message,
            } => {
                let rejected = ClientError::Rejected {
                    code,
                    message: message.to_owned(),
                };
                if request_id == 0 && self.hello.is_some() {
                    self.on_hello_refused(now, rejected);
                } else {
                    self.complete(Wanted::Submit(request_id), Err(rejected));
                }
            }
            Message::TaskState { task_id, report } => {
                let status = TaskStatus::from_report(&report);
                if status.is_final() && !self.finals.contains_key(&task_id) {
                    if self.finals.len() >= MAX_EVENTS {
                        self.finals.clear();
                    }
                    self.finals.insert(task_id, (h.incarnation, status.clone()));
                    push_bounded(
                        &mut self.events,
                        ClientEvent::TaskEnded {
                            task: TaskId(task_id),
                            status: status.clone(),
                        },
                    );
                }
                self.complete(Wanted::TaskState(task_id), Ok(Answer::Status(status)));
            }
            Message::CancelResult { task_id, outcome } => {
                self.complete(Wanted::CancelResult(task_id), Ok(Answer::Cancel(outcome)));
            }
            Message::ByeAck if self.complete(Wanted::ByeAck, Ok(Answer::Bye)) => {
                self.state = State::Closed;
            }
            _ => {}
        }
    }

    /// Answers the request waiting for `wanted`; false if none was.
    fn complete(&mut self, wanted: Wanted, answer: Result<Answer, ClientError>) -> bool {
        let Some(i) = self.requests.iter().position(|p| p.wanted == wanted) else {
            return false;
        };
        let p = self.requests.remove(i);
        self.done.insert(p.id, answer);
        true
    }

    fn on_unknown_session(&mut self, now: Instant, h: &Header) {
        // It copies the header of what it answers: find that request.
        let answered = (h.incarnation, h.seq);
        if let Some(i) = self
            .requests
            .iter()
            .position(|p| p.sent.contains(&answered))
        {
            let p = self.requests.remove(i);
            let answer = if p.wanted == Wanted::ByeAck {
                // The session is over either way: a client that is leaving
                // does not open another.
                self.state = State::Closed;
                if p.sent[0] == answered {
                    // The first BYE found no session: it had already ended.
                    Err(ClientError::SessionLost)
                } else {
                    // A retried BYE finding no session: the first took
                    // effect and its BYE_ACK was lost.
                    Ok(Answer::Bye)
                }
            } else {
                Err(ClientError::SessionLost)
            };
            self.done.insert(p.id, answer);
        }
        if h.incarnation == self.incarnation && self.state == State::Live {
            self.state = State::Lost;
            // What is in flight was sent in the lost session: the callers
            // learn so now, and retry in the next.
            for p in self.requests.drain(..) {
                self.done.insert(p.id, Err(ClientError::SessionLost));
            }
            push_bounded(
                &mut self.events,
                ClientEvent::SessionLost {
                    incarnation: self.incarnation,
                },
            );
            self.reopen(now);
        }
    }

    fn on_welcome(&mut self, now: Instant, ttl_ms: u32, tick_ms: u32) {
        if self.hello.take().is_none() {
            return; // a repeated WELCOME
        }
        self.ttl_ms = ttl_ms;
        self.tick_ms = tick_ms;
        self.resuming = false;
        self.unwelcomed_hosts = 0;
        let reopened = self.state == State::Lost;
        self.state = State::Live;
        self.next_heartbeat = Some(now + self.interval());
        // Requests that waited for the session go out now.
        for p in &mut self.requests {
            p.next_try = now;
        }
        if reopened {
            push_bounded(
                &mut self.events,
                ClientEvent::SessionReopened {
                    incarnation: self.incarnation,
                },
            );
        }
        if self.opened.is_none() {
            self.opened = Some(Ok(()));
        }
    }

    fn on_hello_refused(&mut self, now: Instant, refused: ClientError) {
        let host_unavailable = matches!(
            refused,
            ClientError::Rejected {
                code: RejectCode::ShuttingDown | RejectCode::TooManySessions,
                ..
            }
        );
        if host_unavailable && self.ranked.len() > 1 && self.unwelcomed_hosts < self.ranked.len() {
            // Another host may have room (or not be stopping).
            self.fail_over(now);
            return;
        }
        if self.opened.is_none() {
            self.fail_to_open(refused);
        } else if let Some(mut hello) = self.hello.take() {
            // Refused while reopening (the server is full or shutting
            // down): the next try comes after the backoff, as for a loss.
            hello.next_try = now + self.hello_backoff(hello.attempts);
            self.hello = Some(hello);
        }
    }

    /// Sends a HELLO with the session's incarnation, `tries` times at most.
    fn send_hello(&mut self, now: Instant, tries: u32) {
        let mut hello = Pending {
            id: RequestId(0),
            message: OwnedMessage::Hello {
                ttl_ms: millis(self.config.ttl),
                name: wire::truncate_text(&self.config.name, wire::MAX_TEXT_LEN).to_owned(),
            },
            wanted: Wanted::Welcome,
            sent: Vec::new(),
            attempts: 0,
            tries_left: tries.max(1),
            next_try: now,
        };
        self.try_hello(now, &mut hello);
        self.hello = Some(hello);
    }

    fn try_hello(&mut self, now: Instant, hello: &mut Pending) {
        let _ = self.encode(now, Flags::empty(), &hello.message.borrow());
        self.unanswered = Some(now);
        hello.tries_left = hello.tries_left.saturating_sub(1);
        hello.next_try = now + self.hello_backoff(hello.attempts);
        hello.attempts += 1;
    }

    /// A HELLO try is due: send it again, or give up.
    fn retry_hello(&mut self, now: Instant) {
        let Some(mut hello) = self.hello.take() else {
            return;
        };
        if hello.next_try > now {
            self.hello = Some(hello);
            return;
        }
        if hello.tries_left == 0 {
            if self.resuming {
                // The server does not have the resumed session (its HELLO
                // is stale there): open anew on the same host, where the
                // session's tasks and their final states are.
                self.resuming = false;
                self.new_incarnation(now);
                let tries = self.config.tries;
                self.send_hello(now, tries);
                return;
            }
            if self.state == State::Opening
                && self.ranked.len() > 1
                && self.unwelcomed_hosts < self.ranked.len()
            {
                self.hello = Some(hello);
                self.fail_over(now);
                return;
            }
            self.fail_to_open(ClientError::Timeout);
            return;
        }
        if self.state == State::Lost && hello.attempts % self.config.tries.max(1) == 0 {
            // Reopening, and a whole round of tries went unanswered: the
            // server may have opened this incarnation and lost its WELCOME,
            // and that session may have expired since, which would make
            // every further HELLO of it stale. A new incarnation each round
            // cannot get stuck.
            self.new_incarnation(now);
        }
        self.try_hello(now, &mut hello);
        self.hello = Some(hello);
    }

    /// Opens a new session, with a larger incarnation, after a loss: HELLO
    /// until a WELCOME comes, backing off up to the TTL between tries.
    fn reopen(&mut self, now: Instant) {
        self.new_incarnation(now);
        self.send_hello(now, u32::MAX);
    }

    fn new_incarnation(&mut self, now: Instant) {
        let wall = self.epoch.1 + now.saturating_duration_since(self.epoch.0).as_nanos() as u64;
        self.incarnation = wall.max(self.incarnation + 1);
        self.tx_seq = 0;
        self.server_window = None;
        self.next_request_id = 1;
        self.next_heartbeat = None;
    }

    /// How long to wait after HELLO try `attempt` (0 is the first): see
    /// [`hello_backoff`], with base the configured retry time and cap the
    /// TTL.
    fn hello_backoff(&mut self, attempt: u32) -> Duration {
        let base = self.config.retry_after;
        // The TTL asked for, or else the one granted last (a restarted
        // server may grant less, but not less than asked), or 3 s.
        let cap = [self.config.ttl, self.ttl(), Duration::from_secs(3)]
            .into_iter()
            .find(|ttl| !ttl.is_zero())
            .unwrap_or_default();
        let random = self.random();
        hello_backoff(base, cap, attempt, random)
    }

    /// xorshift64*: the backoff's jitter need not be unpredictable, only
    /// different between clients.
    fn random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Sends one try of `p` with the next `seq`.
    fn try_once(&mut self, now: Instant, p: &mut Pending) -> Result<(), ClientError> {
        let seq = self.encode(now, Flags::empty(), &p.message.borrow())?;
        p.sent.push((self.incarnation, seq));
        p.tries_left = p.tries_left.saturating_sub(1);
        p.next_try = now + self.config.retry_after;
        Ok(())
    }

    fn heartbeat(&mut self, now: Instant) {
        self.heartbeats = self.heartbeats.wrapping_add(1);
        // With another host to go to, a host unheard from for half an
        // interval is asked to answer, so a live one is heard from several
        // times a TTL however rarely ACKs are asked for otherwise.
        let unheard = self.ranked.len() > 1
            && now.saturating_duration_since(self.heard) >= self.interval() / 2;
        let probing = self.probe_due().is_some_and(|due| due <= now);
        let ack = unheard
            || probing
            || (self.config.ack_every > 0 && self.heartbeats.is_multiple_of(self.config.ack_every));
        let flags = if ack { Flags::ACK } else { Flags::empty() };
        if let Ok(seq) = self.encode(now, flags, &Message::Heartbeat) {
            if ack {
                self.unanswered = Some(now);
                if self.acks.len() >= ACKS_REMEMBERED {
                    self.acks.pop_front();
                }
                self.acks.push_back((seq, now));
            }
        }
    }

    /// Encodes the next datagram of the session for sending.
    fn encode(
        &mut self,
        now: Instant,
        flags: Flags,
        message: &Message<'_>,
    ) -> Result<u32, ClientError> {
        self.tx_seq = self.tx_seq.wrapping_add(1).max(1);
        let datagram = Datagram {
            header: Header {
                flags,
                client_id: self.config.client_id,
                incarnation: self.incarnation,
                seq: self.tx_seq,
            },
            message: *message,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = datagram
            .emit(self.config.key.as_ref(), &mut buf)
            .map_err(ClientError::Invalid)?;
        buf.truncate(n);
        self.transmits.push_back(buf);
        self.last_sent = now;
        Ok(self.tx_seq)
    }

    /// The heartbeat period: the configured one, or a third of the TTL.
    fn interval(&self) -> Duration {
        self.config
            .heartbeat_interval
            .unwrap_or(Duration::from_millis(u64::from(self.ttl_ms.max(30))) / 3)
    }
}

fn push_bounded(events: &mut VecDeque<ClientEvent>, event: ClientEvent) {
    if events.len() >= MAX_EVENTS {
        events.pop_front();
    }
    events.push_back(event);
}

fn millis(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// How long a client waits after HELLO try `attempt` (0 is the first) before
/// the next: full jitter over an exponential backoff, `uniform(0, min(cap,
/// base × 2^attempt))` (AWS, "Exponential Backoff And Jitter"), drawn from
/// `random`, but never under a quarter of `base`, so a reply can arrive
/// before the next try. A fleet that reconnects together spreads out this
/// way instead of retrying in lockstep; the cap (the TTL) keeps a client
/// from waiting longer than its own session would live.
pub fn hello_backoff(base: Duration, cap: Duration, attempt: u32, random: u64) -> Duration {
    let cap = cap.max(base);
    let ceiling = base.saturating_mul(1 << attempt.min(20)).min(cap);
    let nanos = ceiling.as_nanos().min(u128::from(u64::MAX)) as u64;
    Duration::from_nanos(random % nanos.max(1)).max(base / 4)
}

#[cfg(test)]
mod tests;
