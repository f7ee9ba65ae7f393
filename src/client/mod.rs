//! A blocking tether client: opens a session, heartbeats on a background
//! thread, and submits, watches and cancels tasks.
//!
//! ```text
//!   caller ── submit/status/cancel/wait ──► session.start(request), send;
//!                                           wait on a condvar for its answer
//!   I/O thread ── recv (until the session's next timeout) ──► session.handle_datagram
//!              ── session.handle_timeout (retries, heartbeats, reopening) ──► send
//! ```
//!
//! Every rule of the protocol lives in [`ClientSession`] (`session.rs`),
//! which does no I/O and reads no clock; this module only moves datagrams
//! and time in and out of it, so an async client can be the same session
//! under another runtime.

mod session;

pub use session::{hello_backoff, Answer, ClientSession, Request, RequestId, State};

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
    CancelOutcome, CancelReason, EmitError, MacKey, RejectCode, TaskReport, MAX_DATAGRAM,
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
    pub(crate) fn from_report(report: &TaskReport<'_>) -> TaskStatus {
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
#[non_exhaustive]
pub enum ClientEvent {
    /// A task reached a final state.
    TaskEnded {
        /// The task.
        task: TaskId,
        /// Its final state.
        status: TaskStatus,
    },
    /// The server no longer knew the session (it expired, or the server
    /// restarted); a new one is being opened.
    SessionLost {
        /// The incarnation that was lost.
        incarnation: u64,
    },
    /// A new session replaced the lost one.
    SessionReopened {
        /// The new session's incarnation.
        incarnation: u64,
    },
}

/// Why a client call failed.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientError {
    /// A socket error.
    Io(Arc<io::Error>),
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
    /// The request cannot be put in a datagram (a job name over 32 bytes,
    /// a payload over 1024).
    Invalid(EmitError),
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
            ClientError::Invalid(e) => write!(f, "the request cannot be sent: {e}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(e) => Some(&**e),
            ClientError::Invalid(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> ClientError {
        ClientError::Io(Arc::new(e))
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

/// A connected client. Dropping it stops its thread without a BYE; call
/// [`Client::bye`] to end the session cleanly.
pub struct Client {
    inner: Arc<Inner>,
    io: Option<JoinHandle<()>>,
}

struct Inner {
    socket: UdpSocket,
    session: Mutex<ClientSession>,
    /// Signalled whenever the session took something in.
    changed: Condvar,
    stop: AtomicBool,
}

/// The longest the I/O thread blocks in one receive, so it sees `stop` and
/// a request started meanwhile (whose retry the session then schedules).
const IO_SLICE: Duration = Duration::from_millis(20);

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
        socket.set_read_timeout(Some(IO_SLICE))?;
        let wall_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let session = ClientSession::new(config, Instant::now(), wall_ns);
        let inner = Arc::new(Inner {
            socket,
            session: Mutex::new(session),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        inner.send_queued(&mut inner.session.lock());
        let io = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("tether-client-io".into())
                .spawn(move || inner.io_loop())?
        };
        let mut client = Client {
            inner,
            io: Some(io),
        };
        let opened = {
            let mut s = client.inner.session.lock();
            loop {
                if let Some(opened) = s.opened() {
                    break opened;
                }
                client.inner.changed.wait_for(&mut s, IO_SLICE);
            }
        };
        if let Err(e) = opened {
            client.close();
            return Err(e);
        }
        Ok(client)
    }

    /// `(client_id, incarnation)` of the current session.
    pub fn session(&self) -> (u64, u64) {
        self.inner.session.lock().session()
    }

    /// Where this session is now, for [`ClientConfig::resume`] in another
    /// process (the command-line client keeps it between invocations).
    pub fn resume_point(&self) -> Resume {
        self.inner.session.lock().resume_point()
    }

    /// The TTL the server granted.
    pub fn ttl(&self) -> Duration {
        self.inner.session.lock().ttl()
    }

    /// The server's timer tick.
    pub fn tick(&self) -> Duration {
        self.inner.session.lock().tick()
    }

    /// The last heartbeat round-trip time measured.
    pub fn rtt(&self) -> Option<Duration> {
        self.inner.session.lock().rtt()
    }

    /// When the client last sent a datagram of the current session.
    pub fn last_sent(&self) -> Instant {
        self.inner.session.lock().last_sent()
    }

    /// Stops (or resumes) heartbeats, to play a client that went silent.
    pub fn pause_heartbeats(&self, paused: bool) {
        self.inner.session.lock().pause_heartbeats(paused);
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
        let request = Request::Submit {
            job: job.to_owned(),
            payload: payload.to_vec(),
            delay: options.delay,
            deadline: options.deadline,
        };
        match self.call(request)? {
            Answer::Accepted(task) => Ok(task),
            other => unreachable!("a SUBMIT answered {other:?}"),
        }
    }

    /// Asks for a task's state.
    pub fn status(&self, task: TaskId) -> Result<TaskStatus, ClientError> {
        match self.call(Request::Status(task))? {
            Answer::Status(status) => Ok(status),
            other => unreachable!("a STATUS answered {other:?}"),
        }
    }

    /// Cancels a task of this client (any incarnation).
    pub fn cancel(&self, task: TaskId) -> Result<CancelOutcome, ClientError> {
        match self.call(Request::Cancel(task))? {
            Answer::Cancel(outcome) => Ok(outcome),
            other => unreachable!("a CANCEL answered {other:?}"),
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
                let mut s = self.inner.session.lock();
                loop {
                    if let Some(status) = s.final_state(task).cloned() {
                        s.claim_event(task);
                        return Ok(status);
                    }
                    if s.state() == State::Closed {
                        return Err(ClientError::Closed);
                    }
                    if self.inner.changed.wait_until(&mut s, next_ask).timed_out() {
                        break;
                    }
                }
            }
            // No push yet (it may have been lost): ask.
            match self.status(task) {
                Ok(status) if status.is_final() || status == TaskStatus::Unknown => {
                    self.inner.session.lock().claim_event(task);
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
        let mut s = self.inner.session.lock();
        loop {
            if let Some(event) = s.poll_event() {
                return Some(event);
            }
            if self.inner.changed.wait_until(&mut s, deadline).timed_out() {
                return s.poll_event();
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
        let result = self.call(Request::Bye).map(|_| ());
        self.close();
        result
    }

    /// Starts `request` and waits for its answer (the session retries it).
    fn call(&self, request: Request) -> Result<Answer, ClientError> {
        let mut s = self.inner.session.lock();
        let id = s.start(Instant::now(), request);
        self.inner.send_queued(&mut s);
        loop {
            if let Some(answer) = s.completion(id) {
                return answer;
            }
            if self.inner.stop.load(Ordering::Acquire) {
                s.abandon(id);
                return Err(ClientError::Closed);
            }
            self.inner.changed.wait_for(&mut s, IO_SLICE);
        }
    }

    fn close(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.session.lock().close();
        self.inner.changed.notify_all();
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

impl Inner {
    /// Sends every datagram the session has ready (the lock is held: each
    /// is one non-blocking system call).
    fn send_queued(&self, s: &mut ClientSession) {
        while let Some(datagram) = s.poll_transmit() {
            // A refused port (ICMP) just means the server is not there
            // yet: the session retries.
            let _ = self.socket.send(&datagram);
        }
    }

    fn io_loop(&self) {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        while !self.stop.load(Ordering::Acquire) {
            let wait = {
                let s = self.session.lock();
                s.poll_timeout()
                    .map_or(IO_SLICE, |due| {
                        due.saturating_duration_since(Instant::now())
                    })
                    .clamp(Duration::from_millis(1), IO_SLICE)
            };
            let _ = self.socket.set_read_timeout(Some(wait));
            let received = self.socket.recv(&mut buf);
            let now = Instant::now();
            let mut s = self.session.lock();
            if let Ok(n) = received {
                s.handle_datagram(now, &buf[..n]);
            }
            s.handle_timeout(now);
            self.send_queued(&mut s);
            drop(s);
            self.changed.notify_all();
        }
    }
}
