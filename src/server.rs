//! The I/O edge: one UDP socket, a hand-rolled mio loop, the clock, signals
//! and the worker pool, all feeding the sans-IO [`Engine`].
//!
//! One iteration of the loop:
//!
//! ```text
//!   poll(timeout = time to the engine's next due tick, or 0 if the socket
//!        still had datagrams last time, or ∞ when nothing is pending)
//!   decided_at = now                 ── the instant expiries are decided for
//!   read the socket, at most one receive buffer's worth of datagrams,
//!        each stamped with the clock read after it arrived
//!   apply worker reports (task started / finished)
//!   engine.handle_timeout(decided_at)
//!   hand new work and cancellations to the pool
//!   send queued replies
//! ```
//!
//! Reading before deciding is what keeps a paused server (SIGSTOP, a long
//! GC-like stall of the host) from expiring clients whose heartbeats are
//! sitting in its socket: every datagram that arrived before `decided_at`
//! has been read when the decision is made, because the read budget covers
//! everything the receive buffer can hold. The budget also bounds a round,
//! so a flood cannot starve expiry (smoltcp's DoS note).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use socket2::{Domain, Protocol, Socket, Type};

use crate::batch::RecvBatch;
use crate::engine::{self, Effect, Engine, TaskEvent, TaskId, Timestamp};
use crate::pool::{CancelFlag, Pool, Registry, Report, WorkItem};
use crate::wire::MAX_DATAGRAM;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);

/// Datagrams read per system call.
const RECV_BATCH: usize = 64;

/// Receive buffer the server asks the kernel for.
pub const RECV_BUFFER_BYTES: usize = 4 << 20;

/// Kernel accounting per queued datagram is at least this many bytes (the
/// sk_buff and its data), so a receive buffer of N bytes holds at most
/// N / this many datagrams.
const MIN_DATAGRAM_TRUESIZE: usize = 512;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Sessions, tasks, limits and the key.
    pub engine: engine::Config,
    /// Worker threads.
    pub workers: usize,
    /// How long a shutdown waits for cancelled tasks to stop.
    pub grace: Duration,
    /// Allow a keyless server on a non-loopback address.
    pub insecure_bind: bool,
    /// Stop gracefully on SIGINT/SIGTERM (a second one stops at once).
    pub handle_signals: bool,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7900)),
            engine: engine::Config::default(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            grace: Duration::from_secs(5),
            insecure_bind: false,
            handle_signals: true,
        }
    }
}

/// Why the server could not start or had to stop.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// A keyless server was asked to bind a non-loopback address.
    InsecureBind(SocketAddr),
    /// The socket could not be created or bound.
    Bind(SocketAddr, io::Error),
    /// Polling, signal registration or thread creation failed.
    Io(&'static str, io::Error),
    /// A second signal arrived during a graceful shutdown.
    Aborted {
        /// Tasks that had not stopped.
        unfinished: usize,
    },
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::InsecureBind(addr) => write!(
                f,
                "refusing to listen on {addr} without a key: anyone who can reach it could act as \
                 any client; give --key-file, listen on a loopback address, or pass \
                 --insecure-bind if this network is trusted"
            ),
            ServerError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            ServerError::Io(what, e) => write!(f, "{what}: {e}"),
            ServerError::Aborted { unfinished } => write!(
                f,
                "second signal: stopped at once with {unfinished} task(s) still running"
            ),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Bind(_, e) | ServerError::Io(_, e) => Some(e),
            _ => None,
        }
    }
}

/// How a graceful shutdown ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Tasks that were still running, ignoring their flag, when the grace
    /// period ran out.
    pub ignored_cancel: Vec<TaskId>,
    /// The engine's counters at the end.
    pub stats: engine::Stats,
}

/// Stops a running server from another thread, as SIGTERM would.
#[derive(Clone)]
pub struct ServerHandle {
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
}

impl ServerHandle {
    /// Begins a graceful shutdown.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    poll: Poll,
    socket: UdpSocket,
    local_addr: SocketAddr,
    recv_buffer_granted: usize,
    recv_budget: usize,
    waker: Arc<Waker>,
    signals: Option<Signals>,
    stop: Arc<AtomicBool>,
    engine: Engine,
    pool: Pool,
    reports: Receiver<Report>,
    inflight: HashMap<TaskId, Arc<CancelFlag>>,
    grace: Duration,
    start: Instant,
    recv_errors: u64,
    send_errors: u64,
}

impl Server {
    /// Binds the socket, starts the workers and registers signal handlers.
    /// The engine's job table is taken from `registry`.
    pub fn bind(mut config: ServerConfig, registry: Registry) -> Result<Server, ServerError> {
        let listen = config.listen;
        if config.engine.key.is_none() && !listen.ip().is_loopback() && !config.insecure_bind {
            return Err(ServerError::InsecureBind(listen));
        }
        let (std_socket, granted) = udp_socket(listen).map_err(|e| ServerError::Bind(listen, e))?;
        let mut socket = UdpSocket::from_std(std_socket);
        let local_addr = socket
            .local_addr()
            .map_err(|e| ServerError::Bind(listen, e))?;
        let poll = Poll::new().map_err(|e| ServerError::Io("creating the poller", e))?;
        poll.registry()
            .register(&mut socket, SOCKET, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| ServerError::Io("registering the socket", e))?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER)
                .map_err(|e| ServerError::Io("creating the waker", e))?,
        );
        let signals = if config.handle_signals {
            let mut signals = Signals::new([SIGINT, SIGTERM])
                .map_err(|e| ServerError::Io("installing signal handlers", e))?;
            poll.registry()
                .register(&mut signals, SIGNALS, Interest::READABLE)
                .map_err(|e| ServerError::Io("registering signals", e))?;
            Some(signals)
        } else {
            None
        };
        config.engine.jobs = registry.table();
        let (report_tx, reports) = crossbeam_channel::unbounded();
        let notify = {
            let waker = Arc::clone(&waker);
            Arc::new(move || {
                let _ = waker.wake();
            })
        };
        let pool = Pool::start(config.workers, Arc::new(registry), report_tx, notify)
            .map_err(|e| ServerError::Io("starting worker threads", e))?;
        let start = Instant::now();
        Ok(Server {
            poll,
            socket,
            local_addr,
            recv_buffer_granted: granted,
            recv_budget: granted / MIN_DATAGRAM_TRUESIZE + 1024,
            waker,
            signals,
            stop: Arc::new(AtomicBool::new(false)),
            engine: Engine::new(config.engine, Timestamp(0)),
            pool,
            reports,
            inflight: HashMap::new(),
            grace: config.grace,
            start,
            recv_errors: 0,
            send_errors: 0,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The receive buffer the kernel granted, in bytes.
    pub fn recv_buffer_granted(&self) -> usize {
        self.recv_buffer_granted
    }

    /// A handle that stops the server gracefully from another thread.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            stop: Arc::clone(&self.stop),
            waker: Arc::clone(&self.waker),
        }
    }

    /// Runs until a graceful shutdown completes (or its grace runs out).
    pub fn run(mut self) -> Result<ShutdownReport, ServerError> {
        let mut events = Events::with_capacity(64);
        // One byte over the limit, so an oversized datagram shows as such.
        let mut batch = RecvBatch::new(RECV_BATCH, MAX_DATAGRAM + 1);
        let mut send_buf = vec![0u8; MAX_DATAGRAM];
        let mut socket_backlog = true;
        let mut send_blocked = false;
        let mut grace_deadline: Option<Instant> = None;
        loop {
            let timeout = self.poll_timeout(socket_backlog, grace_deadline);
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(ServerError::Io("polling", e));
            }
            let decided_at = self.now();
            let mut signalled = 0;
            for event in events.iter() {
                match event.token() {
                    SOCKET => {
                        socket_backlog |= event.is_readable();
                        send_blocked &= !event.is_writable();
                    }
                    SIGNALS => {
                        if let Some(signals) = self.signals.as_mut() {
                            signalled += signals.pending().count();
                        }
                    }
                    _ => {}
                }
            }
            if self.stop.swap(false, Ordering::AcqRel) {
                signalled += 1;
            }
            if signalled > 0 {
                if grace_deadline.is_some() || signalled > 1 {
                    return Err(ServerError::Aborted {
                        unfinished: self.engine.unfinished_tasks(),
                    });
                }
                eprintln!(
                    "tether: shutting down: cancelling {} task(s), grace {:?}",
                    self.engine.unfinished_tasks(),
                    self.grace
                );
                self.engine.begin_shutdown(self.now());
                grace_deadline = Some(Instant::now() + self.grace);
            }
            if socket_backlog {
                socket_backlog = self.drain_socket(&mut batch, &mut send_buf, &mut send_blocked);
            }
            self.apply_reports();
            self.engine.handle_timeout(decided_at);
            self.apply_effects();
            if !send_blocked {
                send_blocked = self.flush(&mut send_buf);
            }
            if let Some(deadline) = grace_deadline {
                let drained = self.engine.unfinished_tasks() == 0 && !self.engine.has_transmits();
                if drained || Instant::now() >= deadline {
                    return Ok(self.finish());
                }
            }
        }
    }

    fn finish(self) -> ShutdownReport {
        let mut ignored_cancel: Vec<TaskId> = self.inflight.keys().copied().collect();
        ignored_cancel.sort_unstable();
        ShutdownReport {
            ignored_cancel,
            stats: *self.engine.stats(),
        }
        // The pool is dropped without joining: a job that ignores its flag
        // must not hold the process past its grace period.
    }

    fn now(&self) -> Timestamp {
        Timestamp(self.start.elapsed().as_micros() as u64)
    }

    fn poll_timeout(&self, socket_backlog: bool, grace: Option<Instant>) -> Option<Duration> {
        if socket_backlog {
            return Some(Duration::ZERO);
        }
        let engine_due = self
            .engine
            .poll_timeout()
            .map(|due| self.start + Duration::from_micros(due.as_micros()));
        let wake_at = match (engine_due, grace) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }?;
        // mio rounds a timeout up to whole milliseconds, so waking early
        // (and spinning until the tick is reached) does not happen.
        Some(wake_at.saturating_duration_since(Instant::now()))
    }

    /// Reads at most one receive buffer's worth of datagrams, a batch per
    /// system call. Returns whether the budget ran out before the socket
    /// was empty.
    fn drain_socket(
        &mut self,
        batch: &mut RecvBatch,
        send_buf: &mut [u8],
        send_blocked: &mut bool,
    ) -> bool {
        let mut read = 0;
        while read < self.recv_budget {
            match batch.recv(&self.socket, false) {
                Ok(n) => {
                    // One clock read per batch, after the call returned: every
                    // datagram in it had arrived by then, so none is stamped
                    // before its arrival.
                    let now = self.now();
                    self.engine.handle_datagrams(now, batch.iter());
                    read += n.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.recv_errors += 1;
                    read += 1;
                }
            }
            // Replies go out as we read, so the outbox stays small.
            if !*send_blocked && self.engine.has_transmits() {
                *send_blocked = self.flush(send_buf);
            }
        }
        true
    }

    fn apply_reports(&mut self) {
        while let Ok((task, event)) = self.reports.try_recv() {
            if matches!(event, TaskEvent::Finished(_)) {
                self.inflight.remove(&task);
            }
            let now = self.now();
            self.engine.handle_task_event(now, task, event);
        }
    }

    fn apply_effects(&mut self) {
        while let Some(effect) = self.engine.poll_effect() {
            match effect {
                Effect::Run { task, job, payload } => {
                    let flag = Arc::new(CancelFlag::new());
                    self.inflight.insert(task, Arc::clone(&flag));
                    self.pool.submit(WorkItem {
                        task,
                        job,
                        payload,
                        flag,
                    });
                }
                Effect::Cancel { task, reason } => {
                    if let Some(flag) = self.inflight.get(&task) {
                        flag.cancel(reason);
                    }
                }
            }
        }
    }

    /// Sends queued replies until done or the socket would block; returns
    /// whether it blocked.
    fn flush(&mut self, buf: &mut [u8]) -> bool {
        while let Some((to, n)) = self.engine.poll_transmit(buf) {
            match self.socket.send_to(&buf[..n], to) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.engine.unpoll_transmit(to, &buf[..n]);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                    self.engine.unpoll_transmit(to, &buf[..n]);
                }
                // An unreachable peer or a refused destination loses only
                // its own reply.
                Err(_) => self.send_errors += 1,
            }
        }
        false
    }
}

/// A non-blocking UDP socket with a large receive buffer. Returns it with
/// the buffer size the kernel granted.
fn udp_socket(listen: SocketAddr) -> io::Result<(std::net::UdpSocket, usize)> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    // Best effort: the kernel caps both at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(RECV_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(RECV_BUFFER_BYTES);
    socket.bind(&listen.into())?;
    let granted = socket.recv_buffer_size()?;
    Ok((socket.into(), granted))
}
