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

pub mod hosts;
mod session;
#[cfg(feature = "tokio")]
mod tokio_client;

pub use session::{hello_backoff, Answer, ClientSession, Request, RequestId, State};
#[cfg(feature = "tokio")]
pub use tokio_client::{AsyncClient, AsyncTask};

use std::fmt;
use std::io;
use std::net::{SocketAddr, SocketAddrV6, ToSocketAddrs, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex};

use crate::engine::TaskId;
use crate::wire::{
    CancelOutcome, CancelReason, EmitError, MacKey, RejectCode, TaskReport, MAX_DATAGRAM,
};

/// How a client connects. Made with [`ClientConfig::new`] or
/// [`ClientConfig::with_servers`], then adjusted field by field (new fields
/// may come in minor releases).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientConfig {
    /// The servers. With more than one, the client picks its host by
    /// rendezvous hashing of its id and moves to the next in its order when
    /// the host falls silent for a TTL (see [`hosts`]).
    pub servers: Vec<SocketAddr>,
    /// Names to look up for the servers (`host:port`; a DNS name with
    /// several addresses gives them all): at connect when `servers` is
    /// empty, then again every [`ServerNames::every`].
    pub names: Option<ServerNames>,
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
#[non_exhaustive]
pub struct Resume {
    /// The session's incarnation.
    pub incarnation: u64,
    /// The next `seq` to send; it must be above every seq sent so far.
    pub next_seq: u32,
    /// The next SUBMIT `request_id`: the session remembers the ids it has
    /// answered, so a reused one would get the old task back.
    pub next_request_id: u32,
    /// The host the session is on, when there are several.
    pub server: Option<SocketAddr>,
}

impl Resume {
    /// Where a session stood (its host unknown: the client's first choice).
    pub fn new(incarnation: u64, next_seq: u32, next_request_id: u32) -> Resume {
        Resume {
            incarnation,
            next_seq,
            next_request_id,
            server: None,
        }
    }
}

/// Server names to look up, and how often to look them up again: what a
/// DNS name with one record per host (a Kubernetes headless Service) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerNames {
    /// `host:port` each; `host` a name or an address.
    pub names: Vec<String>,
    /// How often to look the names up again (at least a second; a name
    /// whose lookup fails keeps its addresses).
    pub every: Duration,
}

impl ServerNames {
    /// `names`, looked up again every 30 s.
    pub fn new(names: Vec<String>) -> ServerNames {
        ServerNames {
            names,
            every: Duration::from_secs(30),
        }
    }

    /// Every address the names have now (blocking: the system resolver).
    /// An error if any name has none.
    pub fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        Ok(self.resolve_each()?.servers(true).unwrap_or_default())
    }

    fn resolve_each(&self) -> io::Result<KnownNames> {
        let mut known = Vec::with_capacity(self.names.len());
        for name in &self.names {
            known.push(addresses_of(name, name.to_socket_addrs()?)?);
        }
        Ok(KnownNames(known))
    }
}

/// A lookup's addresses, or an error naming the name that has none.
fn addresses_of(
    name: &str,
    found: impl Iterator<Item = SocketAddr>,
) -> io::Result<Vec<SocketAddr>> {
    let found: Vec<SocketAddr> = found.collect();
    if found.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{name} has no address"),
        ));
    }
    Ok(found)
}

/// Each server name's addresses as last found, for the resolvers (the
/// blocking client's thread, the async client's task) to hand the session.
struct KnownNames(Vec<Vec<SocketAddr>>);

impl KnownNames {
    /// Takes a lookup of name `i`: one that found nothing (a failed lookup)
    /// keeps the addresses the name had.
    fn update(&mut self, i: usize, found: Vec<SocketAddr>) {
        if !found.is_empty() {
            self.0[i] = found;
        }
    }

    /// Every name's addresses that the socket reaches (IPv6 ones only if it
    /// is dual-stack), or `None` while a name has none: without it, its
    /// hosts would look removed, and their clients would move.
    fn servers(&self, dual_stack: bool) -> Option<Vec<SocketAddr>> {
        if self.0.iter().any(Vec::is_empty) {
            return None;
        }
        Some(
            self.0
                .iter()
                .flatten()
                .copied()
                .filter(|s| dual_stack || s.is_ipv4())
                .collect(),
        )
    }
}

impl ClientConfig {
    /// Defaults for talking to `server` as `client_id`.
    pub fn new(server: SocketAddr, client_id: u64) -> ClientConfig {
        ClientConfig::with_servers(vec![server], client_id)
    }

    /// Defaults for talking to whichever of `servers` is `client_id`'s host.
    pub fn with_servers(servers: Vec<SocketAddr>, client_id: u64) -> ClientConfig {
        ClientConfig {
            servers,
            names: None,
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
    /// The client left a host (silent for a TTL, refusing, or gone from
    /// the list) for the next in its order; a new session is being opened
    /// there.
    Moved {
        /// The host left.
        from: SocketAddr,
        /// The host now used.
        to: SocketAddr,
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
#[non_exhaustive]
pub struct SubmitOptions {
    /// Hold the task back this long before queueing it.
    pub delay: Duration,
    /// Cancel it this long after it starts running (zero: never).
    pub deadline: Duration,
}

impl SubmitOptions {
    /// No delay, no deadline.
    pub fn new() -> SubmitOptions {
        SubmitOptions::default()
    }

    /// Holds the task back `delay` before queueing it.
    pub fn delay(mut self, delay: Duration) -> SubmitOptions {
        self.delay = delay;
        self
    }

    /// Cancels the task `deadline` after it starts running (zero: never).
    pub fn deadline(mut self, deadline: Duration) -> SubmitOptions {
        self.deadline = deadline;
        self
    }
}

/// A connected client. Dropping it stops its thread without a BYE; call
/// [`Client::bye`] to end the session cleanly.
pub struct Client {
    inner: Arc<Inner>,
    io: Option<JoinHandle<()>>,
    resolver: Option<JoinHandle<()>>,
}

struct Inner {
    /// Unconnected: the host can change. IPv6 (taking IPv4 too) when any
    /// server is IPv6.
    socket: UdpSocket,
    dual_stack: bool,
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
    ///
    /// With [`ClientConfig::names`], looks them up first if
    /// [`ClientConfig::servers`] is empty (an error if one has no address),
    /// and again every [`ServerNames::every`] on a thread of its own, so a
    /// slow resolver never delays a heartbeat.
    pub fn connect(mut config: ClientConfig) -> Result<Client, ClientError> {
        // The names' first lookup, if made here, is where the resolver
        // starts from.
        let mut known = None;
        if let (Some(names), true) = (&config.names, config.servers.is_empty()) {
            let each = names.resolve_each()?;
            config.servers = each.servers(true).unwrap_or_default();
            known = Some(each);
        }
        if config.servers.is_empty() {
            return Err(no_server());
        }
        let (socket, dual_stack) = open_socket(&config.servers)?;
        socket.set_read_timeout(Some(IO_SLICE))?;
        let names = config.names.clone();
        let session = ClientSession::new(config, Instant::now(), wall_clock_ns());
        let inner = Arc::new(Inner {
            socket,
            dual_stack,
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
        let resolver = match names {
            Some(names) => {
                let inner = Arc::clone(&inner);
                Some(
                    std::thread::Builder::new()
                        .name("tether-client-dns".into())
                        .spawn(move || inner.resolve_loop(&names, known))?,
                )
            }
            None => None,
        };
        let mut client = Client {
            inner,
            io: Some(io),
            resolver,
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

    /// The host the session is on.
    pub fn server(&self) -> SocketAddr {
        self.inner.session.lock().server()
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
        // The resolver is not waited for: it may be inside a slow lookup,
        // and sees `stop` when that returns (it holds the socket until
        // then, nothing else).
        self.resolver.take();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.close();
    }
}

fn no_server() -> ClientError {
    ClientError::Io(Arc::new(io::Error::new(
        io::ErrorKind::InvalidInput,
        "no server given",
    )))
}

/// The wall clock in nanoseconds, which seeds the session's incarnations.
fn wall_clock_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

/// An unconnected UDP socket that reaches `servers` (the host can change):
/// IPv4, or IPv6 taking IPv4 too (v4-mapped) when any server is IPv6.
/// Returns whether it is the latter.
fn open_socket(servers: &[SocketAddr]) -> io::Result<(UdpSocket, bool)> {
    let dual_stack = servers.iter().any(SocketAddr::is_ipv6);
    let socket = if dual_stack {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        socket.set_only_v6(false)?;
        socket.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())?;
        UdpSocket::from(socket)
    } else {
        UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))?
    };
    Ok((socket, dual_stack))
}

/// Where to send to reach `server` from a socket opened by `open_socket`.
fn destination(server: SocketAddr, dual_stack: bool) -> SocketAddr {
    match server {
        SocketAddr::V4(v4) if dual_stack => {
            SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into()
        }
        to => to,
    }
}

/// `from` as the session lists servers: an IPv4 peer of the dual-stack
/// socket arrives IPv4-mapped. Any other IPv6 address is kept whole (a
/// link-local one with its scope).
fn canonical(from: SocketAddr) -> SocketAddr {
    match from {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::from((v4, v6.port())),
            None => from,
        },
        v4 => v4,
    }
}

/// Datagrams taken in after the first, before timeouts are judged: enough
/// for any backlog a client's own host makes, few enough that a flood to
/// the (unconnected) socket cannot hold heartbeats off.
const DRAIN_AT_MOST: usize = 64;

impl Inner {
    /// Sends every datagram the session has ready (the lock is held: each
    /// is one non-blocking system call).
    fn send_queued(&self, s: &mut ClientSession) {
        let to = destination(s.server(), self.dual_stack);
        while let Some(datagram) = s.poll_transmit() {
            // A failed send is a lost datagram: the session retries.
            let _ = self.socket.send_to(&datagram, to);
        }
    }

    /// Looks the names up again every `names.every` (at least a second)
    /// and hands a changed list to the session (see [`KnownNames`]),
    /// starting from `known` if connecting looked them up already.
    fn resolve_loop(&self, names: &ServerNames, known: Option<KnownNames>) {
        let every = names.every.max(Duration::from_secs(1));
        let lookup = |name: &String| -> Vec<SocketAddr> {
            name.to_socket_addrs()
                .map(|found| found.collect())
                .unwrap_or_default()
        };
        let mut known =
            known.unwrap_or_else(|| KnownNames(names.names.iter().map(lookup).collect()));
        let mut next = Instant::now() + every;
        while !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(100));
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + every;
            for (i, name) in names.names.iter().enumerate() {
                known.update(i, lookup(name));
            }
            if let Some(servers) = known.servers(self.dual_stack) {
                let mut s = self.session.lock();
                s.set_servers(Instant::now(), &servers);
                self.send_queued(&mut s);
            }
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
            let received = self.socket.recv_from(&mut buf);
            let now = Instant::now();
            let mut s = self.session.lock();
            if let Ok((n, from)) = received {
                s.handle_datagram(now, canonical(from), &buf[..n]);
                // Whatever else waits is taken in before any timeout is
                // judged: after a stall of this process, the host's answers
                // queued meanwhile count before its silence does.
                if self.socket.set_nonblocking(true).is_ok() {
                    for _ in 0..DRAIN_AT_MOST {
                        let Ok((n, from)) = self.socket.recv_from(&mut buf) else {
                            break;
                        };
                        s.handle_datagram(now, canonical(from), &buf[..n]);
                    }
                    let _ = self.socket.set_nonblocking(false);
                }
            }
            s.handle_timeout(now);
            self.send_queued(&mut s);
            drop(s);
            self.changed.notify_all();
        }
    }
}
