//! A blocking tether client: opens a session, heartbeats on a background
//! thread, and submits, watches and cancels tasks.
//!
//! ```text
//!   caller ── submit/status/cancel/wait ──► request(): send, wait on condvar,
//!                                           retry with a new seq on timeout
//!   receiver thread ── verifies, drops replays, files replies and pushed
//!                      TASK_STATEs, wakes waiters
//!   heartbeat thread ── HEARTBEAT every interval (some with ACK for RTT);
//!                       after UNKNOWN_SESSION, a HELLO with a new incarnation
//! ```
//!
//! Every retry is a new datagram with the next `seq`, as the protocol
//! requires; SUBMIT retries keep their `request_id`, so the server starts the
//! task once however many copies arrive.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use crate::engine::TaskId;
use crate::wire::{
    CancelOutcome, CancelReason, Datagram, Flags, Header, MacKey, Message, RejectCode,
    ReplayWindow, TaskReport, MAX_DATAGRAM,
};

/// How a client connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server.
    pub server: SocketAddr,
    /// This client's id; stable across restarts of the same client.
    pub client_id: u64,
    /// Requested TTL; zero takes the server's default.
    pub ttl: Duration,
    /// Free-form name sent in HELLO. Three bytes or more make the HELLO as
    /// large as its WELCOME, so a keyless server with the amplification
    /// limit on welcomes it at once rather than on the retry.
    pub name: String,
    /// Heartbeat period; `None` is a third of the granted TTL.
    pub heartbeat_interval: Option<Duration>,
    /// Ask for a HEARTBEAT_ACK on every n-th heartbeat (0: never).
    pub ack_every: u32,
    /// How long to wait for a reply before retrying.
    pub retry_after: Duration,
    /// Tries per request.
    pub tries: u32,
    /// Shared secret, if the server has one.
    pub key: Option<MacKey>,
    /// Continue an earlier session instead of opening a new one (see
    /// [`Client::resume_point`]); if the server no longer has it, a new
    /// session is opened.
    pub resume: Option<Resume>,
}

/// Where a session left off: enough for another process to continue it
/// without replacing it (and so without cancelling its tasks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// The session's incarnation.
    pub incarnation: u64,
    /// The next `seq` to send; it must be above every seq sent so far.
    pub next_seq: u32,
    /// The next SUBMIT `request_id`: the session remembers the ids it has
    /// answered, so a reused one would get the old task back.
    pub next_request_id: u32,
}

impl ClientConfig {
    /// Defaults for talking to `server` as `client_id`.
    pub fn new(server: SocketAddr, client_id: u64) -> ClientConfig {
        ClientConfig {
            server,
            client_id,
            ttl: Duration::ZERO,
            name: "tether-client".into(),
            heartbeat_interval: None,
            ack_every: 1,
            retry_after: Duration::from_millis(250),
            tries: 8,
            key: None,
            resume: None,
        }
    }
}

/// A task's state as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskStatus {
    /// Waiting out its delay.
    Scheduled,
    /// Waiting for a worker.
    Queued,
    /// On a worker.
    Running,
    /// Finished with this result.
    Done(Vec<u8>),
    /// Failed with this error.
    Failed(String),
    /// Cancelled for this reason.
    Cancelled(CancelReason),
    /// The server knows no such task (or its record aged out).
    Unknown,
}

impl TaskStatus {
    fn from_report(report: &TaskReport<'_>) -> TaskStatus {
        match *report {
            TaskReport::Scheduled => TaskStatus::Scheduled,
            TaskReport::Queued => TaskStatus::Queued,
            TaskReport::Running => TaskStatus::Running,
            TaskReport::Done(r) => TaskStatus::Done(r.to_vec()),
            TaskReport::Failed(e) => TaskStatus::Failed(e.to_owned()),
            TaskReport::Cancelled(r) => TaskStatus::Cancelled(r),
            TaskReport::Unknown => TaskStatus::Unknown,
        }
    }

    /// Whether this is done, failed or cancelled.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TaskStatus::Done(_) | TaskStatus::Failed(_) | TaskStatus::Cancelled(_)
        )
    }
}

/// Something the server told the client without being asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// A task reached a final state.
    TaskEnded {
        /// The task.
        task: TaskId,
        /// Its final state.
        status: TaskStatus,
    },
    /// The server no longer knew the session (it expired); a new one is
    /// being opened.
    SessionLost {
        /// The incarnation that was lost.
        incarnation: u64,
    },
}

/// Why a client call failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientError {
    /// A socket error.
    Io(io::Error),
    /// No reply after every try.
    Timeout,
    /// The server refused.
    Rejected {
        /// Its code.
        code: RejectCode,
        /// Its text.
        message: String,
    },
    /// The server answered UNKNOWN_SESSION; the client is opening a new one.
    SessionLost,
    /// The client was closed.
    Closed,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "socket error: {e}"),
            ClientError::Timeout => {
                f.write_str("no reply from the server (is it running, and is the key right?)")
            }
            ClientError::Rejected { code, message } => write!(f, "rejected ({code:?}): {message}"),
            ClientError::SessionLost => {
                f.write_str("the server lost the session; a new one is being opened")
            }
            ClientError::Closed => f.write_str("the client is closed"),
        }
    }
}

impl std::error::Error for ClientError {}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        ClientError::Io(e)
    }
}

/// Options of a SUBMIT.
#[derive(Debug, Clone, Copy, Default)]
pub struct SubmitOptions {
    /// Hold the task back this long before queueing it.
    pub delay: Duration,
    /// Cancel it this long after it starts running (zero: never).
    pub deadline: Duration,
}

/// A server datagram the client keeps until someone waiting claims it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reply {
    Welcome {
        ttl_ms: u32,
        tick_ms: u32,
    },
    Accepted {
        request_id: u32,
        task_id: u64,
    },
    Rejected {
        request_id: u32,
        seq: u32,
        code: RejectCode,
        message: String,
    },
    TaskState {
        task_id: u64,
        status: TaskStatus,
    },
    CancelResult {
        task_id: u64,
        outcome: CancelOutcome,
    },
    /// Copies the header of the datagram it answers.
    UnknownSession {
        incarnation: u64,
        seq: u32,
    },
    ByeAck,
}

/// How a request was answered.
enum Answer {
    Reply(Reply),
    /// UNKNOWN_SESSION, in answer to the try with this index (0: the first).
    UnknownSession {
        try_index: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SessionState {
    Opening,
    Live,
    Lost,
    Closed,
}

struct State {
    incarnation: u64,
    tx_seq: u32,
    session: SessionState,
    ttl_ms: u32,
    tick_ms: u32,
    server_window: Option<ReplayWindow>,
    replies: VecDeque<Reply>,
    /// Final states pushed, by task id, with the incarnation they came
    /// under: a restarted server numbers tasks afresh, so an id can return.
    finals: HashMap<u64, (u64, TaskStatus)>,
    events: VecDeque<ClientEvent>,
    last_sent: Instant,
    heartbeat_sent: VecDeque<(u32, Instant)>,
    rtt: Option<Duration>,
    next_request_id: u32,
}

struct Inner {
    socket: UdpSocket,
    config: ClientConfig,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
    /// The server said it lost the session: reopen without waiting.
    lost: AtomicBool,
    heartbeats_paused: AtomicBool,
    /// Lets `close` interrupt the heartbeat thread's sleep.
    stop_lock: Mutex<()>,
    stop_wake: Condvar,
}

/// A connected client. Dropping it stops its threads without a BYE; call
/// [`Client::bye`] to end the session cleanly.
pub struct Client {
    inner: Arc<Inner>,
    threads: Vec<JoinHandle<()>>,
}

const MAX_QUEUED_REPLIES: usize = 1024;
const MAX_EVENTS: usize = 65_536;

impl Client {
    /// Opens a session (HELLO, waiting for WELCOME) and starts heartbeating.
    pub fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let bind: SocketAddr = if config.server.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(config.server)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let inner = Arc::new(Inner {
            socket,
            state: Mutex::new(State {
                incarnation: new_incarnation(0),
                tx_seq: 0,
                session: SessionState::Opening,
                ttl_ms: 0,
                tick_ms: 0,
                server_window: None,
                replies: VecDeque::new(),
                finals: HashMap::new(),
                events: VecDeque::new(),
                last_sent: Instant::now(),
                heartbeat_sent: VecDeque::new(),
                rtt: None,
                next_request_id: 1,
            }),
            config,
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            heartbeats_paused: AtomicBool::new(false),
            stop_lock: Mutex::new(()),
            stop_wake: Condvar::new(),
        });
        let receiver = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("tether-client-rx".into())
                .spawn(move || inner.receive_loop())?
        };
        let mut client = Client {
            inner: Arc::clone(&inner),
            threads: vec![receiver],
        };
        match client.inner.config.resume {
            Some(resume) => {
                {
                    let mut state = client.inner.state.lock();
                    state.incarnation = resume.incarnation;
                    state.tx_seq = resume.next_seq.wrapping_sub(1);
                    state.next_request_id = resume.next_request_id.max(1);
                }
                // A HELLO of the same incarnation only repeats WELCOME; one
                // for a session the server no longer has is stale and gets
                // no answer, so after two tries open a new session.
                match client.inner.hello_tries(2) {
                    Err(ClientError::Timeout) => {
                        client.inner.reset_session();
                        client.inner.hello()?;
                    }
                    other => other?,
                }
            }
            None => client.inner.hello()?,
        }
        let heartbeat = std::thread::Builder::new()
            .name("tether-client-hb".into())
            .spawn(move || inner.heartbeat_loop())?;
        client.threads.push(heartbeat);
        Ok(client)
    }

    /// `(client_id, incarnation)` of the current session.
    pub fn session(&self) -> (u64, u64) {
        (
            self.inner.config.client_id,
            self.inner.state.lock().incarnation,
        )
    }

    /// Where this session is now, for [`ClientConfig::resume`] in another
    /// process (the command-line client keeps it between invocations).
    pub fn resume_point(&self) -> Resume {
        let state = self.inner.state.lock();
        Resume {
            incarnation: state.incarnation,
            next_seq: state.tx_seq.wrapping_add(1).max(1),
            next_request_id: state.next_request_id,
        }
    }

    /// The TTL the server granted.
    pub fn ttl(&self) -> Duration {
        Duration::from_millis(u64::from(self.inner.state.lock().ttl_ms))
    }

    /// The server's timer tick.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(u64::from(self.inner.state.lock().tick_ms))
    }

    /// The last heartbeat round-trip time measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.inner.state.lock().rtt
    }

    /// When the client last sent a datagram of the current session.
    pub fn last_sent(&self) -> Instant {
        self.inner.state.lock().last_sent
    }

    /// Stops (or resumes) heartbeats, to play a client that went silent.
    pub fn pause_heartbeats(&self, paused: bool) {
        self.inner
            .heartbeats_paused
            .store(paused, Ordering::Release);
    }

    /// Submits `job` with `payload`; returns the task id.
    pub fn submit(&self, job: &str, payload: &[u8]) -> Result<TaskId, ClientError> {
        self.submit_with(job, payload, SubmitOptions::default())
    }

    /// Submits with a delay and/or deadline.
    pub fn submit_with(
        &self,
        job: &str,
        payload: &[u8],
        options: SubmitOptions,
    ) -> Result<TaskId, ClientError> {
        let request_id = {
            let mut state = self.inner.state.lock();
            let id = state.next_request_id;
            state.next_request_id = id.wrapping_add(1).max(1);
            id
        };
        let message = Message::Submit {
            request_id,
            delay_ms: duration_ms(options.delay),
            deadline_ms: duration_ms(options.deadline),
            job,
            payload,
        };
        let reply = self.inner.request(&message, |r| match r {
            Reply::Accepted { request_id: id, .. } | Reply::Rejected { request_id: id, .. } => {
                *id == request_id
            }
            _ => false,
        })?;
        match reply {
            Reply::Accepted { task_id, .. } => Ok(TaskId(task_id)),
            Reply::Rejected { code, message, .. } => Err(ClientError::Rejected { code, message }),
            other => unreachable!("matched {other:?}"),
        }
    }

    /// Asks for a task's state.
    pub fn status(&self, task: TaskId) -> Result<TaskStatus, ClientError> {
        let reply = self.inner.request(
            &Message::Status { task_id: task.0 },
            |r| matches!(r, Reply::TaskState { task_id, .. } if *task_id == task.0),
        )?;
        match reply {
            Reply::TaskState { status, .. } => Ok(status),
            other => unreachable!("matched {other:?}"),
        }
    }

    /// Cancels a task of this client (any incarnation).
    pub fn cancel(&self, task: TaskId) -> Result<CancelOutcome, ClientError> {
        let reply = self.inner.request(
            &Message::Cancel { task_id: task.0 },
            |r| matches!(r, Reply::CancelResult { task_id, .. } if *task_id == task.0),
        )?;
        match reply {
            Reply::CancelResult { outcome, .. } => Ok(outcome),
            other => unreachable!("matched {other:?}"),
        }
    }

    /// Waits up to `timeout` for `task`'s final state: from the server's
    /// push, or by asking with STATUS when no push has come for a while (the
    /// push may have been lost). The task's [`ClientEvent::TaskEnded`] is
    /// consumed with it.
    pub fn wait(&self, task: TaskId, timeout: Duration) -> Result<TaskStatus, ClientError> {
        let deadline = Instant::now() + timeout;
        let poll_every = Duration::from_millis(500);
        loop {
            let next_ask = (Instant::now() + poll_every).min(deadline);
            {
                let mut state = self.inner.state.lock();
                loop {
                    if let Some((_, status)) = state.finals.get(&task.0).cloned() {
                        claim_event(&mut state.events, task);
                        return Ok(status);
                    }
                    if state.session == SessionState::Closed {
                        return Err(ClientError::Closed);
                    }
                    if self
                        .inner
                        .changed
                        .wait_until(&mut state, next_ask)
                        .timed_out()
                    {
                        break;
                    }
                }
            }
            // No push yet (it may have been lost): ask.
            match self.status(task) {
                Ok(status) if status.is_final() || status == TaskStatus::Unknown => {
                    claim_event(&mut self.inner.state.lock().events, task);
                    return Ok(status);
                }
                Ok(_) | Err(ClientError::Timeout) | Err(ClientError::SessionLost) => {}
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout);
            }
        }
    }

    /// The next unsolicited event, waiting up to `timeout`.
    pub fn next_event(&self, timeout: Duration) -> Option<ClientEvent> {
        let deadline = Instant::now() + timeout;
        let mut state = self.inner.state.lock();
        loop {
            if let Some(event) = state.events.pop_front() {
                return Some(event);
            }
            if self
                .inner
                .changed
                .wait_until(&mut state, deadline)
                .timed_out()
            {
                return state.events.pop_front();
            }
        }
    }

    /// Ends the session with BYE (its tasks are cancelled, reason left) and
    /// stops the client.
    ///
    /// If a BYE_ACK is lost, the retry finds the session gone and is
    /// answered UNKNOWN_SESSION: that means the first BYE took effect, and
    /// is success. Only UNKNOWN_SESSION to the *first* BYE is
    /// [`ClientError::SessionLost`]: the session had already ended (expired)
    /// before the BYE arrived.
    pub fn bye(mut self) -> Result<(), ClientError> {
        let result = match self.inner.request_answer(
            &Message::Bye,
            |r| matches!(r, Reply::ByeAck),
            self.inner.config.tries,
        ) {
            Ok(Answer::Reply(_)) => Ok(()),
            Ok(Answer::UnknownSession { try_index: 0 }) => Err(ClientError::SessionLost),
            Ok(Answer::UnknownSession { .. }) => Ok(()),
            Err(e) => Err(e),
        };
        self.close();
        result
    }

    fn close(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.state.lock().session = SessionState::Closed;
        self.inner.changed.notify_all();
        {
            let _guard = self.inner.stop_lock.lock();
            self.inner.stop_wake.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    /// Sends one datagram of the current session; returns its
    /// `(incarnation, seq)`.
    fn send(&self, flags: Flags, message: &Message<'_>) -> io::Result<(u64, u32)> {
        let mut buf = [0u8; MAX_DATAGRAM];
        let (seq, n) = {
            let mut state = self.state.lock();
            state.tx_seq = state.tx_seq.wrapping_add(1).max(1);
            let datagram = Datagram {
                header: Header {
                    flags,
                    client_id: self.config.client_id,
                    incarnation: state.incarnation,
                    seq: state.tx_seq,
                },
                message: *message,
            };
            let n = datagram
                .emit(self.config.key.as_ref(), &mut buf)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            state.last_sent = Instant::now();
            if message.kind() == crate::wire::Kind::Heartbeat && flags.contains(Flags::ACK) {
                if state.heartbeat_sent.len() >= 64 {
                    state.heartbeat_sent.pop_front();
                }
                let entry = (state.tx_seq, state.last_sent);
                state.heartbeat_sent.push_back(entry);
            }
            ((state.incarnation, state.tx_seq), n)
        };
        self.socket.send(&buf[..n])?;
        Ok(seq)
    }

    /// Sends `message`, retrying with a fresh seq, until a reply for which
    /// `wanted` holds arrives (or UNKNOWN_SESSION answers one of the tries).
    fn request(
        &self,
        message: &Message<'_>,
        wanted: impl Fn(&Reply) -> bool,
    ) -> Result<Reply, ClientError> {
        self.request_tries(message, wanted, self.config.tries)
    }

    fn request_tries(
        &self,
        message: &Message<'_>,
        wanted: impl Fn(&Reply) -> bool,
        tries: u32,
    ) -> Result<Reply, ClientError> {
        match self.request_answer(message, wanted, tries)? {
            Answer::Reply(reply) => Ok(reply),
            Answer::UnknownSession { .. } => Err(ClientError::SessionLost),
        }
    }

    /// Sends `message` up to `tries` times until a wanted reply, or an
    /// UNKNOWN_SESSION answering one of the tries, arrives.
    fn request_answer(
        &self,
        message: &Message<'_>,
        wanted: impl Fn(&Reply) -> bool,
        tries: u32,
    ) -> Result<Answer, ClientError> {
        let mut sent_seqs = Vec::new();
        for _ in 0..tries.max(1) {
            if self.stop.load(Ordering::Acquire) {
                return Err(ClientError::Closed);
            }
            sent_seqs.push(self.send(Flags::empty(), message)?);
            let until = Instant::now() + self.config.retry_after;
            let mut state = self.state.lock();
            loop {
                let lost = |r: &Reply| {
                    matches!(r, Reply::UnknownSession { incarnation, seq }
                        if sent_seqs.contains(&(*incarnation, *seq)))
                };
                if let Some(i) = state.replies.iter().position(|r| wanted(r) || lost(r)) {
                    let reply = state.replies.remove(i).expect("position is in range");
                    if let Reply::UnknownSession { incarnation, seq } = reply {
                        let answered = (incarnation, seq);
                        let try_index = sent_seqs.iter().position(|s| *s == answered).unwrap_or(0);
                        return Ok(Answer::UnknownSession { try_index });
                    }
                    return Ok(Answer::Reply(reply));
                }
                if state.session == SessionState::Closed {
                    return Err(ClientError::Closed);
                }
                if self.changed.wait_until(&mut state, until).timed_out() {
                    break;
                }
            }
        }
        Err(ClientError::Timeout)
    }

    fn hello(&self) -> Result<(), ClientError> {
        self.hello_tries(self.config.tries)
    }

    fn hello_tries(&self, tries: u32) -> Result<(), ClientError> {
        let message = Message::Hello {
            ttl_ms: duration_ms(self.config.ttl),
            name: crate::wire::truncate_text(&self.config.name, crate::wire::MAX_TEXT_LEN),
        };
        let answers_hello = |r: &Reply| {
            matches!(
                r,
                Reply::Welcome { .. } | Reply::Rejected { request_id: 0, .. }
            )
        };
        let reply = self.request_tries(&message, answers_hello, tries)?;
        let mut state = self.state.lock();
        match reply {
            Reply::Welcome { ttl_ms, tick_ms } => {
                state.ttl_ms = ttl_ms;
                state.tick_ms = tick_ms;
                state.session = SessionState::Live;
                Ok(())
            }
            Reply::Rejected { code, message, .. } => Err(ClientError::Rejected { code, message }),
            other => unreachable!("matched {other:?}"),
        }
    }

    /// Forgets the current session: the next HELLO opens a new one.
    fn reset_session(&self) {
        let mut state = self.state.lock();
        state.incarnation = new_incarnation(state.incarnation);
        state.tx_seq = 0;
        state.server_window = None;
        state.next_request_id = 1;
        state.session = SessionState::Opening;
    }

    /// Starts a new session after the server lost the old one.
    fn reopen(&self) {
        self.lost.store(false, Ordering::Release);
        self.reset_session();
        if self.hello().is_err() {
            self.state.lock().session = SessionState::Lost;
        }
    }

    fn heartbeat_loop(&self) {
        let mut count: u32 = 0;
        while !self.stop.load(Ordering::Acquire) {
            let interval = {
                let state = self.state.lock();
                let ttl = Duration::from_millis(u64::from(state.ttl_ms.max(30)));
                self.config.heartbeat_interval.unwrap_or(ttl / 3)
            };
            {
                let mut guard = self.stop_lock.lock();
                // The receiver sets `lost` and then wakes this sleep, so a
                // new session is opened at once rather than an interval later.
                if !self.stop.load(Ordering::Acquire) && !self.lost.load(Ordering::Acquire) {
                    self.stop_wake.wait_for(&mut guard, interval);
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
            // What to do is decided now, after the sleep: acting on state
            // read before it would send a heartbeat for a session already
            // known to be lost.
            let session = self.state.lock().session;
            match session {
                SessionState::Lost => self.reopen(),
                SessionState::Live if !self.heartbeats_paused.load(Ordering::Acquire) => {
                    count = count.wrapping_add(1);
                    let ack = self.config.ack_every > 0 && count % self.config.ack_every == 0;
                    let flags = if ack { Flags::ACK } else { Flags::empty() };
                    let _ = self.send(flags, &Message::Heartbeat);
                }
                SessionState::Live | SessionState::Opening | SessionState::Closed => {}
            }
        }
    }

    fn receive_loop(&self) {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        while !self.stop.load(Ordering::Acquire) {
            let n = match self.socket.recv(&mut buf) {
                Ok(n) => n,
                // Timeouts let the loop see `stop`; a refused port (ICMP)
                // just means the server is not there yet.
                Err(_) => continue,
            };
            let Ok(d) = Datagram::decode(&buf[..n], self.config.key.as_ref()) else {
                continue;
            };
            if d.header.client_id != self.config.client_id || d.message.kind().is_from_client() {
                continue;
            }
            self.file(&d);
        }
    }

    fn file(&self, d: &Datagram<'_>) {
        let mut state = self.state.lock();
        let h = d.header;
        if let Message::UnknownSession = d.message {
            // Copies our own header, so it sits outside the server's seq
            // space; it is only taken as an answer to a seq we sent.
            if h.incarnation == state.incarnation {
                let lost_now = state.session == SessionState::Live;
                if lost_now {
                    state.session = SessionState::Lost;
                    let incarnation = state.incarnation;
                    push_bounded(&mut state.events, ClientEvent::SessionLost { incarnation });
                }
                let reply = Reply::UnknownSession {
                    incarnation: h.incarnation,
                    seq: h.seq,
                };
                push_bounded_reply(&mut state.replies, reply);
                self.changed.notify_all();
                drop(state);
                if lost_now {
                    self.lost.store(true, Ordering::Release);
                    let _guard = self.stop_lock.lock();
                    self.stop_wake.notify_all();
                }
            }
            return;
        }
        if h.incarnation == state.incarnation {
            match state.server_window.as_mut() {
                Some(w) => {
                    if w.accept(h.seq).is_err() {
                        return;
                    }
                }
                None => state.server_window = Some(ReplayWindow::new(h.seq)),
            }
        } else if !matches!(d.message, Message::TaskState { report, .. } if report.is_final()) {
            // Only final states of an earlier session's tasks are still of use.
            return;
        }
        let reply = match d.message {
            Message::Welcome { ttl_ms, tick_ms } => Reply::Welcome { ttl_ms, tick_ms },
            Message::HeartbeatAck { acked_seq } => {
                if let Some(&(_, sent)) = state.heartbeat_sent.iter().find(|(s, _)| *s == acked_seq)
                {
                    state.rtt = Some(sent.elapsed());
                }
                return;
            }
            Message::Accepted {
                request_id,
                task_id,
            } => {
                // A final state kept under this id from another incarnation
                // is another task's, from before a server restart.
                if state
                    .finals
                    .get(&task_id)
                    .is_some_and(|(i, _)| *i != h.incarnation)
                {
                    state.finals.remove(&task_id);
                }
                Reply::Accepted {
                    request_id,
                    task_id,
                }
            }
            Message::Rejected {
                request_id,
                code,
                message,
            } => Reply::Rejected {
                request_id,
                seq: h.seq,
                code,
                message: message.to_owned(),
            },
            Message::TaskState { task_id, report } => {
                let status = TaskStatus::from_report(&report);
                if status.is_final() && !state.finals.contains_key(&task_id) {
                    if state.finals.len() >= MAX_EVENTS {
                        state.finals.clear();
                    }
                    state
                        .finals
                        .insert(task_id, (h.incarnation, status.clone()));
                    push_bounded(
                        &mut state.events,
                        ClientEvent::TaskEnded {
                            task: TaskId(task_id),
                            status: status.clone(),
                        },
                    );
                }
                Reply::TaskState { task_id, status }
            }
            Message::CancelResult { task_id, outcome } => Reply::CancelResult { task_id, outcome },
            Message::ByeAck => Reply::ByeAck,
            _ => return,
        };
        push_bounded_reply(&mut state.replies, reply);
        self.changed.notify_all();
    }
}

/// Removes `task`'s TaskEnded event once the caller has its final state
/// from [`Client::wait`], so [`Client::next_event`] does not repeat it.
fn claim_event(events: &mut VecDeque<ClientEvent>, task: TaskId) {
    events.retain(|e| !matches!(e, ClientEvent::TaskEnded { task: t, .. } if *t == task));
}

fn push_bounded(events: &mut VecDeque<ClientEvent>, event: ClientEvent) {
    if events.len() >= MAX_EVENTS {
        events.pop_front();
    }
    events.push_back(event);
}

fn push_bounded_reply(replies: &mut VecDeque<Reply>, reply: Reply) {
    // Unclaimed replies (pushes nobody waits for, answers to abandoned
    // tries) must not pile up.
    if replies.len() >= MAX_QUEUED_REPLIES {
        replies.pop_front();
    }
    replies.push_back(reply);
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// The client's Unix time in nanoseconds, or one more than `previous` if
/// the clock has not moved past it: incarnations must only grow.
fn new_incarnation(previous: u64) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    now.max(previous + 1)
}
