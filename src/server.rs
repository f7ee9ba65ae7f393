//! The I/O edge: one UDP socket, a hand-rolled mio loop, the clock, signals
//! and the worker pool, all feeding the sans-IO [`Engine`].
//!
//! One iteration of the loop:
//!
//! ```text
//!   if the last round read 2+ datagrams: let more gather, up to `coalesce`
//!        and never past the engine's next due tick
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
//!
//! Under load the loop reads in batches on purpose. Datagrams that arrive
//! faster than the loop wakes show as a round reading two or more; the loop
//! then waits up to `coalesce` (0.5 ms by default) before polling again, so
//! the next `recvmmsg` finds a batch. At 100K heartbeats a second that cuts
//! the CPU per heartbeat from 2.7 to 1.0 µs (a wake-up and a system call
//! shared by ~50 datagrams instead of one or two), and costs replies at most
//! that wait. Expiry is not delayed (the wait ends at the next due tick), and
//! a lone client's request/response exchange never waits: its datagrams
//! arrive one at a time.
//!
//! Under a flood the loop reads first and answers strangers last: once a
//! quarter of what the receive buffer holds has come in full `recvmmsg`
//! batches in a row, it tells the engine the socket is backlogged, and
//! UNKNOWN_SESSION, refusals of HELLO and the WELCOME of a newly opened
//! session are counted instead of sent until a read comes back short (the
//! client's HELLO retry is then welcomed). On loopback a reply costs the
//! kernel about what the datagram it answers did, so answering a flood
//! datagram for datagram halves the rate at which live sessions' heartbeats
//! are read; measured with two million HELLOs, that is the difference
//! between hundreds of live sessions lost to kernel drops and none, with no
//! datagram dropped at all.

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
use crate::engine::{
    self, ConfigError, Effect, Engine, Event, JobTable, TaskEvent, TaskId, Timestamp,
};
use crate::metrics::{EdgeStats, Metrics};
use crate::observe::{log_event, EventStream, EventsTarget, WallClock};
use crate::pool::{Pool, Registry, Report};
use crate::wire::MAX_DATAGRAM;

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);

/// How often the loop publishes its counters for the metrics endpoint.
const PUBLISH_EVERY: Duration = Duration::from_millis(50);

/// Datagrams read per system call.
const RECV_BATCH: usize = 64;

/// Receive buffer the server asks the kernel for.
pub const RECV_BUFFER_BYTES: usize = 4 << 20;

/// Kernel accounting per queued datagram is at least this many bytes (the
/// sk_buff and its data), so a receive buffer of N bytes holds at most
/// N / this many datagrams.
const MIN_DATAGRAM_TRUESIZE: usize = 512;

/// Where the server reads time. Deadlines come only from [`Clock::now`],
/// a monotonic clock; the wall clock is read once, at start, to put dates
/// on the event stream. Tests inject a clock whose wall time jumps to show
/// that it changes nothing.
pub trait Clock: fmt::Debug + Send + Sync {
    /// A monotonic instant (must advance with real time: the loop sleeps
    /// in the kernel against it).
    fn now(&self) -> Instant;
    /// The wall-clock time.
    fn wall(&self) -> std::time::SystemTime;
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> std::time::SystemTime {
        std::time::SystemTime::now()
    }
}

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
    /// Keyless: hold every address to the bytes it sent
    /// ([`engine::Config::amplification_limit`]). `None` turns it on exactly
    /// when the listen address is not loopback, where sources can be
    /// spoofed by anyone on the network.
    pub amplification_limit: Option<bool>,
    /// Stop gracefully on SIGINT/SIGTERM (a second one stops at once).
    pub handle_signals: bool,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics: Option<SocketAddr>,
    /// Write one JSON line per session and task lifecycle event.
    pub events: Option<EventsTarget>,
    /// Warn about a loop iteration that takes longer than this.
    pub slow_loop: Duration,
    /// Under load, how long to let datagrams gather before reading again
    /// (see the module documentation); zero reads as soon as anything
    /// arrives. At most half a tick.
    pub coalesce: Duration,
    /// Warn about a task still running this long after its flag was set.
    pub slow_cancel: Duration,
    /// Receive buffer to ask the kernel for, in bytes: what queues while
    /// the server is stalled (see [`datagrams_held`]).
    pub recv_buffer: usize,
    /// The clocks (see [`Clock`]).
    pub clock: Arc<dyn Clock>,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7900)),
            engine: engine::Config::default(),
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            grace: Duration::from_secs(5),
            insecure_bind: false,
            amplification_limit: None,
            handle_signals: true,
            metrics: None,
            events: None,
            slow_loop: Duration::from_millis(100),
            coalesce: COALESCE,
            slow_cancel: Duration::from_secs(1),
            recv_buffer: RECV_BUFFER_BYTES,
            clock: Arc::new(SystemClock),
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
    /// The configuration breaks a rule; the error says which.
    InvalidConfig(ConfigError),
    /// The server's thread panicked (a bug: please report it).
    Panicked,
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
            ServerError::InvalidConfig(rule) => write!(f, "invalid configuration: {rule}"),
            ServerError::Panicked => f.write_str("the server thread panicked"),
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
            ServerError::InvalidConfig(e) => Some(e),
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
#[derive(Clone, Debug)]
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

/// What the loop carries from one turn to the next.
struct LoopState {
    events: Events,
    batch: RecvBatch,
    send: SendSlots,
    /// The socket may hold datagrams not read yet.
    socket_backlog: bool,
    /// The last send would have blocked; wait for writability.
    send_blocked: bool,
    /// Worker reports left for the next turn by the per-turn budget.
    reports_pending: bool,
    grace_deadline: Option<Instant>,
    /// Datagrams the last turn read.
    last_read: usize,
}

impl LoopState {
    fn new() -> LoopState {
        LoopState {
            events: Events::with_capacity(64),
            // One byte over the limit, so an oversized datagram shows as such.
            batch: RecvBatch::new(RECV_BATCH, MAX_DATAGRAM + 1),
            send: SendSlots::new(),
            socket_backlog: true,
            send_blocked: false,
            reports_pending: false,
            grace_deadline: None,
            last_read: 0,
        }
    }
}

/// How a turn of the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Turn {
    Again,
    /// A graceful shutdown completed or ran out of grace.
    Stopped,
}

/// Worker reports applied per turn at most.
const REPORTS_PER_TURN: usize = 4096;

/// What one loop iteration did, for the slow-loop warning.
#[derive(Debug, Default)]
struct Iteration {
    datagrams: u64,
    expired: u64,
    reports: u64,
    effects: u64,
    replies: u64,
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
    grace: Duration,
    start: Instant,
    wall: WallClock,
    edge: EdgeStats,
    metrics: Arc<Metrics>,
    metrics_addr: Option<SocketAddr>,
    events: Option<EventStream>,
    jobs: JobTable,
    slow_loop: Duration,
    slow_cancel: Duration,
    coalesce: Duration,
    next_slow_cancel_check: Option<Instant>,
    /// Metrics are published at most every `PUBLISH_EVERY`; while changes
    /// wait, this is when the loop must wake to publish them.
    publish_due: Option<Instant>,
    last_publish: Instant,
    iteration: Iteration,
    /// Full receive batches in a row, across rounds.
    full_batches: usize,
    /// Full batches in a row that mean the loop is behind its socket.
    backlog_batches: usize,
    /// Stranger replies shed when the last warning about it was logged.
    shed_reported: u64,
    next_shed_report: Instant,
    clock: Arc<dyn Clock>,
}

/// The loop is behind its socket when full `recvmmsg` batches in a row
/// have brought a quarter of what the receive buffer holds (and at least
/// two batches): whether from a flood or a slow iteration, the buffer is
/// then on its way to overflowing, and answers to strangers wait. A burst
/// of a fleet's HELLOs after a restart stays well below it.
fn backlog_batches(granted: usize) -> usize {
    (datagrams_held(granted) / 4 / RECV_BATCH).max(2)
}

/// Default for [`ServerConfig::coalesce`]: at 100K heartbeats a second it
/// brings ~50 datagrams per read and 40% of the CPU per heartbeat of
/// reading each one as it comes (BENCHMARKS.md), for at most 0.5 ms more
/// round trip under load.
pub const COALESCE: Duration = Duration::from_micros(500);

/// Shortest time between two warnings about shed replies.
const SHED_REPORT_EVERY: Duration = Duration::from_secs(10);

impl Server {
    /// A builder for an embedded server, with the server's defaults but no
    /// signal handling and no jobs yet.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            config: ServerConfig {
                handle_signals: false,
                ..ServerConfig::default()
            },
            registry: Registry::new(),
        }
    }

    /// Runs the server on a thread of its own.
    pub fn spawn(self) -> io::Result<RunningServer> {
        let addr = self.local_addr;
        let handle = self.handle();
        let thread = std::thread::Builder::new()
            .name("tether-server".into())
            .spawn(move || self.run())?;
        Ok(RunningServer {
            addr,
            handle,
            thread,
        })
    }

    /// Binds the socket, starts the workers and registers signal handlers.
    /// The engine's job table is taken from `registry`.
    pub fn bind(mut config: ServerConfig, registry: Registry) -> Result<Server, ServerError> {
        let listen = config.listen;
        if config.engine.key.is_none() && !listen.ip().is_loopback() && !config.insecure_bind {
            return Err(ServerError::InsecureBind(listen));
        }
        config.validate().map_err(ServerError::InvalidConfig)?;
        let (std_socket, granted) =
            udp_socket(listen, config.recv_buffer).map_err(|e| ServerError::Bind(listen, e))?;
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
        config.engine.record_events = true;
        config.engine.amplification_limit = config
            .amplification_limit
            .unwrap_or(!local_addr.ip().is_loopback());
        if config.engine.key.is_none() {
            if config.engine.amplification_limit {
                tracing::info!("keyless amplification limit on: no address is sent more bytes than it sent (an empty-name HELLO is welcomed on its retry)");
            } else {
                tracing::info!("keyless amplification limit off: every request is answered (--amplification-limit on to hold each address to the bytes it sent)");
            }
        }
        let jobs = registry.table();
        let metrics = Arc::new(Metrics::default());
        metrics.set_socket(local_addr);
        let metrics_addr = match config.metrics {
            Some(addr) => {
                let (bound, _thread) = crate::metrics::serve(addr, Arc::clone(&metrics))
                    .map_err(|e| ServerError::Io("starting the metrics server", e))?;
                Some(bound)
            }
            None => None,
        };
        let events = match &config.events {
            Some(target) => Some(
                EventStream::start(target, jobs.clone())
                    .map_err(|e| ServerError::Io("opening the event stream", e))?,
            ),
            None => None,
        };
        let (report_tx, reports) = crossbeam_channel::unbounded();
        let notify = {
            let waker = Arc::clone(&waker);
            Arc::new(move || {
                let _ = waker.wake();
            })
        };
        let pool = Pool::start(config.workers, Arc::new(registry), report_tx, notify)
            .map_err(|e| ServerError::Io("starting worker threads", e))?;
        let clock = Arc::clone(&config.clock);
        let start = clock.now();
        let wall = WallClock::new(clock.wall());
        Ok(Server {
            poll,
            socket,
            local_addr,
            recv_buffer_granted: granted,
            recv_budget: granted / MIN_DATAGRAM_TRUESIZE + 1024,
            waker,
            signals,
            stop: Arc::new(AtomicBool::new(false)),
            engine: Engine::new(config.engine, Timestamp(0)).map_err(ServerError::InvalidConfig)?,
            pool,
            reports,
            grace: config.grace,
            start,
            wall,
            edge: EdgeStats::default(),
            metrics,
            metrics_addr,
            events,
            jobs,
            slow_loop: config.slow_loop,
            coalesce: config.coalesce,
            slow_cancel: config.slow_cancel,
            next_slow_cancel_check: None,
            publish_due: None,
            last_publish: start,
            iteration: Iteration::default(),
            full_batches: 0,
            backlog_batches: backlog_batches(granted),
            shed_reported: 0,
            next_shed_report: start,
            clock,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Where the metrics endpoint listens, if it was asked for.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// The live metrics (the same values `/metrics` serves).
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
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
        tracing::info!(addr = %self.local_addr, "listening");
        let mut state = LoopState::new();
        loop {
            match self.turn(&mut state)? {
                Turn::Again => {}
                Turn::Stopped => return Ok(self.finish()),
            }
        }
    }

    /// One iteration of the loop (see the module documentation).
    fn turn(&mut self, state: &mut LoopState) -> Result<Turn, ServerError> {
        if state.last_read >= 2 && !state.socket_backlog && !state.reports_pending {
            self.gather(state.grace_deadline);
        }
        let timeout = if state.reports_pending {
            Some(Duration::ZERO)
        } else {
            self.poll_timeout(state.socket_backlog, state.grace_deadline)
        };
        if let Err(e) = self.poll.poll(&mut state.events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Turn::Again);
            }
            return Err(ServerError::Io("polling", e));
        }
        let woke = self.clock.now();
        let decided_at = self.timestamp(woke);
        let mut signalled = 0;
        for event in state.events.iter() {
            match event.token() {
                SOCKET => {
                    state.socket_backlog |= event.is_readable();
                    state.send_blocked &= !event.is_writable();
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
        if signalled > 0 && (state.grace_deadline.is_some() || signalled > 1) {
            tracing::warn!(
                unfinished = self.engine.unfinished_tasks(),
                "second stop signal: exiting at once"
            );
            return Err(ServerError::Aborted {
                unfinished: self.engine.unfinished_tasks(),
            });
        }
        // Reports the workers sent before the stop was noticed are applied
        // first, so a task that finished is recorded done, not cancelled.
        let mut report_budget = REPORTS_PER_TURN;
        state.reports_pending = self.apply_reports(&mut report_budget);
        if signalled > 0 {
            tracing::info!(
                tasks = self.engine.unfinished_tasks(),
                grace = ?self.grace,
                "shutting down: refusing new work, cancelling every task"
            );
            self.engine.begin_shutdown(self.now());
            state.grace_deadline = Some(self.clock.now() + self.grace);
        }
        let expired_before = self.engine.stats().sessions_expired;
        let read_before = self.iteration.datagrams;
        if state.socket_backlog {
            state.socket_backlog =
                self.drain_socket(&mut state.batch, &mut state.send, &mut state.send_blocked);
        }
        state.last_read = (self.iteration.datagrams - read_before) as usize;
        state.reports_pending = self.apply_reports(&mut report_budget);
        self.engine.handle_timeout(decided_at);
        self.iteration.expired = self.engine.stats().sessions_expired - expired_before;
        self.apply_effects();
        if !state.send_blocked {
            state.send_blocked = self.flush(&mut state.send);
        }
        self.observe();
        self.check_slow_cancels(woke);
        self.end_iteration(woke);
        if let Some(deadline) = state.grace_deadline {
            let drained = self.engine.unfinished_tasks() == 0 && !self.engine.has_transmits();
            if drained || self.clock.now() >= deadline {
                return Ok(Turn::Stopped);
            }
        }
        Ok(Turn::Again)
    }

    fn finish(mut self) -> ShutdownReport {
        // Tasks still on a worker with their flag set ignored it; a task
        // that was still queued was withdrawn and never started.
        let still_running = self.pool.with_queue(|q| q.still_cancelling());
        for &(task, client_id, job) in &still_running {
            tracing::warn!(
                task_id = task.0,
                client_id,
                job = self.jobs.name(job),
                "task still running at the end of the grace period: it ignored its cancel flag"
            );
        }
        if let Some(events) = self.events.as_mut() {
            events.finish();
        }
        self.publish();
        tracing::info!(
            sessions_opened = self.engine.stats().sessions_opened,
            sessions_expired = self.engine.stats().sessions_expired,
            tasks_done = self.engine.stats().tasks_done,
            tasks_failed = self.engine.stats().tasks_failed,
            tasks_cancelled = self.engine.stats().tasks_cancelled,
            "stopped"
        );
        ShutdownReport {
            ignored_cancel: still_running.into_iter().map(|(t, _, _)| t).collect(),
            stats: *self.engine.stats(),
        }
        // The pool is dropped without joining: a job that ignores its flag
        // must not hold the process past its grace period.
    }

    /// Hands the engine's lifecycle events to metrics, logs and the event
    /// stream.
    fn observe(&mut self) {
        while let Some(event) = self.engine.poll_event() {
            match event {
                Event::TaskEnded {
                    run_us: Some(us), ..
                } => self.metrics.task_run.observe_us(us),
                Event::SessionEnded {
                    lateness_us: Some(us),
                    ..
                } => self.metrics.expiry_lateness.observe_us(us),
                _ => {}
            }
            log_event(&event, &self.jobs);
            if let Some(stream) = self.events.as_mut() {
                let at = match event {
                    Event::SessionOpened { at, .. }
                    | Event::SessionEnded { at, .. }
                    | Event::TaskAccepted { at, .. }
                    | Event::TaskEnded { at, .. } => at,
                };
                stream.send(event, self.wall.at(at));
            }
        }
    }

    fn publish(&mut self) {
        self.edge.sessions_live = self.engine.live_sessions() as u64;
        self.edge.events_dropped = self.events.as_ref().map_or(0, |e| e.dropped());
        (self.edge.pool_queued, self.edge.pool_running) = self
            .pool
            .with_queue(|q| (q.queued() as u64, q.running() as u64));
        self.metrics.publish(self.engine.stats(), &self.edge);
    }

    /// Times the iteration, warns if it was slow, and publishes metrics.
    fn end_iteration(&mut self, woke: Instant) {
        let now = self.clock.now();
        let took = now.saturating_duration_since(woke);
        self.metrics
            .loop_iteration
            .observe_us(took.as_micros() as u64);
        if took > self.slow_loop {
            self.edge.slow_loops += 1;
            let i = &self.iteration;
            tracing::warn!(
                took_ms = took.as_secs_f64() * 1e3,
                datagrams = i.datagrams,
                sessions_expired = i.expired,
                worker_reports = i.reports,
                task_commands = i.effects,
                replies = i.replies,
                "slow event loop iteration: replies and expiries were delayed by as much"
            );
        }
        self.iteration = Iteration::default();
        self.report_shed_replies(now);
        // At a hundred thousand wake-ups a second, publishing every time
        // would be a measurable share of the loop; every 50 ms is plenty
        // for a scrape.
        if now.duration_since(self.last_publish) >= PUBLISH_EVERY {
            self.publish();
            self.last_publish = now;
            self.publish_due = None;
        } else if self.publish_due.is_none() {
            self.publish_due = Some(self.last_publish + PUBLISH_EVERY);
        }
    }

    /// Warns, at most every `SHED_REPORT_EVERY`, that answers to strangers
    /// were shed because the socket was flooded.
    fn report_shed_replies(&mut self, now: Instant) {
        if now < self.next_shed_report {
            return;
        }
        let shed = self.engine.stats().replies_shed;
        if shed > self.shed_reported {
            tracing::warn!(
                replies_not_sent = shed - self.shed_reported,
                "socket flooded: answers to strangers (UNKNOWN_SESSION, REJECTED or WELCOME to a new HELLO) were not sent, so that live sessions' datagrams are read first; those clients retry"
            );
            self.shed_reported = shed;
            self.next_shed_report = now + SHED_REPORT_EVERY;
        }
    }

    /// Warns, once per task, about tasks still running `slow_cancel` after
    /// their flag was set. Scans (the running tasks only) at most every
    /// 100 ms, and only while a cancelled task may become slow.
    fn check_slow_cancels(&mut self, now: Instant) {
        match self.next_slow_cancel_check {
            Some(at) if now >= at => {}
            _ => return,
        }
        let mut slow = Vec::new();
        let threshold = self.slow_cancel;
        let next = self
            .pool
            .with_queue(|q| q.slow_cancels(now, threshold, &mut slow));
        self.next_slow_cancel_check = next.map(|due| due.max(now + Duration::from_millis(100)));
        for s in slow {
            self.edge.slow_cancels += 1;
            tracing::warn!(
                task_id = s.task.0,
                client_id = s.client_id,
                job = self.jobs.name(s.job),
                ignoring_ms = s.ignoring.as_millis() as u64,
                reason = ?s.reason.map(|r| r.name()),
                "task keeps running after its cancel flag was set: it does not poll is_cancelled() or sleep through the context"
            );
        }
    }

    fn timestamp(&self, at: Instant) -> Timestamp {
        Timestamp(at.saturating_duration_since(self.start).as_micros() as u64)
    }

    fn now(&self) -> Timestamp {
        self.timestamp(self.clock.now())
    }

    /// When the engine next needs `handle_timeout`, on the clock.
    fn engine_due(&self) -> Option<Instant> {
        self.engine
            .poll_timeout()
            .map(|due| self.start + Duration::from_micros(due.as_micros()))
    }

    /// Lets datagrams gather for up to `coalesce`, but never past the
    /// engine's next due tick or the end of a shutdown's grace, so expiry
    /// and shutdown are not delayed.
    fn gather(&self, grace: Option<Instant>) {
        if self.coalesce.is_zero() {
            return;
        }
        let now = self.clock.now();
        let engine_due = self.engine_due();
        let until = [Some(now + self.coalesce), engine_due, grace]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now);
        let wait = until.saturating_duration_since(now).min(self.coalesce);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    fn poll_timeout(&self, socket_backlog: bool, grace: Option<Instant>) -> Option<Duration> {
        if socket_backlog {
            return Some(Duration::ZERO);
        }
        let engine_due = self.engine_due();
        let wake_at = [
            engine_due,
            grace,
            self.next_slow_cancel_check,
            self.publish_due,
        ]
        .into_iter()
        .flatten()
        .min()?;
        // mio rounds a timeout up to whole milliseconds, so waking early
        // (and spinning until the tick is reached) does not happen.
        Some(wake_at.saturating_duration_since(self.clock.now()))
    }

    /// Reads at most one receive buffer's worth of datagrams, a batch per
    /// system call. Returns whether the budget ran out before the socket
    /// was empty.
    fn drain_socket(
        &mut self,
        batch: &mut RecvBatch,
        send_buf: &mut SendSlots,
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
                    self.full_batches = if n == RECV_BATCH {
                        self.full_batches + 1
                    } else {
                        0
                    };
                    self.engine
                        .set_backlogged(self.full_batches >= self.backlog_batches);
                    self.engine.handle_datagrams(now, batch.iter());
                    self.iteration.datagrams += n as u64;
                    read += n.max(1);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.full_batches = 0;
                    self.engine.set_backlogged(false);
                    return false;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.edge.receive_errors += 1;
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

    /// Applies worker reports while `budget` (shared by a turn's calls, at
    /// most `REPORTS_PER_TURN`) lasts, so that however many finish at once,
    /// socket reads and expiry wait for a bounded amount of work. Returns
    /// whether more are waiting.
    fn apply_reports(&mut self, budget: &mut usize) -> bool {
        while *budget > 0 {
            let Ok((task, event)) = self.reports.try_recv() else {
                return false;
            };
            *budget -= 1;
            self.iteration.reports += 1;
            let now = self.now();
            self.engine.handle_task_event(now, task, event);
        }
        !self.reports.is_empty()
    }

    fn apply_effects(&mut self) {
        while let Some(effect) = self.engine.poll_effect() {
            self.iteration.effects += 1;
            let cancelled = matches!(effect, Effect::Cancel { .. });
            let now = self.clock.now();
            if let Some(task) = self.pool.apply(effect, now) {
                let at = self.timestamp(now);
                self.engine
                    .handle_task_event(at, task, TaskEvent::Withdrawn);
            } else if cancelled {
                // Its flag was set (or it already finished): watch for a job
                // slow to notice.
                let due = now + self.slow_cancel;
                self.next_slow_cancel_check =
                    Some(self.next_slow_cancel_check.map_or(due, |d| d.min(due)));
            }
        }
    }

    /// Sends queued replies, a `sendmmsg` batch at a time, until done or
    /// the socket would block; returns whether it blocked (what was not
    /// sent goes back to the front of the queue).
    fn flush(&mut self, out: &mut SendSlots) -> bool {
        loop {
            let mut count = 0;
            while count < SEND_BATCH {
                let slot = &mut out.data[count * MAX_DATAGRAM..(count + 1) * MAX_DATAGRAM];
                match self.engine.poll_transmit(slot) {
                    Some((to, n)) => {
                        out.meta[count] = (to, n);
                        count += 1;
                    }
                    None => break,
                }
            }
            if count == 0 {
                return false;
            }
            let items: Vec<(SocketAddr, &[u8])> = (0..count)
                .map(|i| {
                    let (to, n) = out.meta[i];
                    (to, &out.data[i * MAX_DATAGRAM..i * MAX_DATAGRAM + n])
                })
                .collect();
            let mut sent = 0;
            while sent < count {
                match out.batch.send_to(&self.socket, &items[sent..]) {
                    Ok(k) => {
                        self.iteration.replies += k as u64;
                        sent += k;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        // Back to the front, last first, so order is kept.
                        for (to, bytes) in items[sent..].iter().rev() {
                            self.engine.unpoll_transmit(*to, bytes);
                        }
                        return true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // An unreachable peer or a refused destination loses
                    // only its own reply.
                    Err(_) => {
                        self.edge.send_errors += 1;
                        sent += 1;
                    }
                }
            }
            if count < SEND_BATCH {
                return false;
            }
        }
    }
}

/// Datagrams sent per system call.
const SEND_BATCH: usize = 64;

/// Room for one `sendmmsg` batch of replies.
struct SendSlots {
    data: Vec<u8>,
    meta: Vec<(SocketAddr, usize)>,
    batch: crate::batch::SendBatch,
}

impl SendSlots {
    fn new() -> SendSlots {
        SendSlots {
            data: vec![0; SEND_BATCH * MAX_DATAGRAM],
            meta: vec![(SocketAddr::from(([0, 0, 0, 0], 0)), 0); SEND_BATCH],
            batch: crate::batch::SendBatch::new(SEND_BATCH),
        }
    }
}

impl ServerConfig {
    /// Checks every setting, the engine's included: the one place the
    /// rules live, used by [`Server::bind`] (and so by the builder and the
    /// command line).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.engine.validate()?;
        if self.workers == 0 {
            return Err(ConfigError::NoWorkers);
        }
        if self.coalesce.as_micros() * 2 > u128::from(self.engine.tick_us) {
            return Err(ConfigError::CoalesceTooLong);
        }
        match self.metrics {
            Some(addr) if !addr.ip().is_loopback() && !self.insecure_bind => {
                Err(ConfigError::InsecureMetrics(addr))
            }
            _ => Ok(()),
        }
    }
}

/// Builds a server to embed in a program: its address, limits, key and
/// jobs. Start from [`Server::builder`]; [`ServerBuilder::bind`] checks the
/// configuration and binds, [`Server::spawn`] runs it on a thread.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    config: ServerConfig,
    registry: Registry,
}

impl ServerBuilder {
    /// The UDP address to listen on (default `127.0.0.1:7900`; port 0 picks
    /// a free one).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.config.listen = addr;
        self
    }
    /// The TTL granted to clients that ask for none (default 3 s).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.config.engine.default_ttl_ms = duration_ms(ttl);
        self
    }
    /// The range requested TTLs are clamped to (default 100 ms to 1 h).
    pub fn ttl_bounds(mut self, min: Duration, max: Duration) -> Self {
        self.config.engine.min_ttl_ms = duration_ms(min);
        self.config.engine.max_ttl_ms = duration_ms(max);
        self
    }
    /// The timer tick (default 10 ms): expiry comes at most one tick late.
    pub fn tick(mut self, tick: Duration) -> Self {
        self.config.engine.tick_us = tick.as_micros().min(u128::from(u64::MAX)) as u64;
        self
    }
    /// Require HMAC-SHA256 with this key on every datagram.
    pub fn key(mut self, key: crate::wire::MacKey) -> Self {
        self.config.engine.key = Some(key);
        self
    }
    /// Worker threads (default: the number of cores).
    pub fn workers(mut self, workers: usize) -> Self {
        self.config.workers = workers;
        self
    }
    /// Live sessions at most (default 1,000,000).
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.config.engine.max_sessions = n;
        self.config.engine.max_client_records = n;
        self
    }
    /// Unfinished tasks per session at most (default 64).
    pub fn max_tasks_per_session(mut self, n: usize) -> Self {
        self.config.engine.max_tasks_per_session = n;
        self
    }
    /// Tasks waiting for a worker at most (default 65,536).
    pub fn queue(mut self, n: usize) -> Self {
        self.config.engine.max_waiting_tasks = n;
        self
    }
    /// How long a shutdown waits for tasks to stop (default 5 s).
    pub fn grace(mut self, grace: Duration) -> Self {
        self.config.grace = grace;
        self
    }
    /// Stop gracefully on SIGINT/SIGTERM (default off for an embedded
    /// server: the program decides; use [`ServerHandle::shutdown`]).
    pub fn handle_signals(mut self, on: bool) -> Self {
        self.config.handle_signals = on;
        self
    }
    /// Allow a keyless server on a non-loopback address.
    pub fn insecure_bind(mut self, on: bool) -> Self {
        self.config.insecure_bind = on;
        self
    }
    /// Keyless: hold every address to the bytes it sent, or not (default:
    /// only when listening beyond loopback; see
    /// [`ServerConfig::amplification_limit`]).
    pub fn amplification_limit(mut self, on: bool) -> Self {
        self.config.amplification_limit = Some(on);
        self
    }
    /// Under load, let datagrams gather this long between reads (default
    /// 0.5 ms, at most half a tick; zero reads as soon as anything arrives).
    pub fn coalesce(mut self, wait: Duration) -> Self {
        self.config.coalesce = wait;
        self
    }
    /// Warn (and count) when a loop iteration takes longer than this
    /// (default 100 ms).
    pub fn slow_loop(mut self, threshold: Duration) -> Self {
        self.config.slow_loop = threshold;
        self
    }
    /// Warn (and count) when a task keeps running this long after its
    /// cancel flag was set (default 1 s).
    pub fn slow_cancel(mut self, threshold: Duration) -> Self {
        self.config.slow_cancel = threshold;
        self
    }
    /// Read time from `clock` instead of the system's (tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.config.clock = clock;
        self
    }
    /// Serve Prometheus metrics on this TCP address.
    pub fn metrics(mut self, addr: SocketAddr) -> Self {
        self.config.metrics = Some(addr);
        self
    }
    /// Write lifecycle events as JSON lines.
    pub fn events(mut self, target: EventsTarget) -> Self {
        self.config.events = Some(target);
        self
    }
    /// Adds the protocol's standard jobs (`sleep`, `spin`, `echo`, `fail`,
    /// `panic`).
    pub fn standard_jobs(mut self) -> Result<Self, crate::pool::RegistryError> {
        for (name, rule, body) in crate::pool::standard_jobs() {
            self.registry.register(name, rule, body)?;
        }
        Ok(self)
    }
    /// Adds a job clients can SUBMIT by `name`. The closure runs on a worker
    /// thread; it should poll [`TaskContext::is_cancelled`](crate::TaskContext::is_cancelled)
    /// or sleep through [`TaskContext::sleep`](crate::TaskContext::sleep) so
    /// that cancellation can stop it.
    pub fn job<F>(
        mut self,
        name: &str,
        payload: crate::engine::PayloadRule,
        body: F,
    ) -> Result<Self, crate::pool::RegistryError>
    where
        F: Fn(&crate::TaskContext<'_>) -> crate::JobResult + Send + Sync + 'static,
    {
        self.registry.register(name, payload, body)?;
        Ok(self)
    }
    /// Checks the configuration, binds the socket and starts the workers.
    pub fn bind(self) -> Result<Server, ServerError> {
        Server::bind(self.config, self.registry)
    }
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// A server running on a thread of its own (see [`Server::spawn`]).
#[derive(Debug)]
pub struct RunningServer {
    addr: SocketAddr,
    handle: ServerHandle,
    thread: std::thread::JoinHandle<Result<ShutdownReport, ServerError>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// A handle to stop it from anywhere.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }
    /// Stops it gracefully and waits for it: every task is cancelled with
    /// reason `shutdown` and told to its client, within the grace period.
    pub fn shutdown(self) -> Result<ShutdownReport, ServerError> {
        self.handle.shutdown();
        self.thread.join().unwrap_or(Err(ServerError::Panicked))
    }
}

/// A non-blocking UDP socket with a large receive buffer. Returns it with
/// the buffer size the kernel reports.
fn udp_socket(listen: SocketAddr, recv_buffer: usize) -> io::Result<(std::net::UdpSocket, usize)> {
    let socket = Socket::new(
        Domain::for_address(listen),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    socket.set_nonblocking(true)?;
    // Best effort: unless privileged, the kernel caps it at
    // net.core.rmem_max (and the send buffer at wmem_max).
    let granted = crate::batch::set_recv_buffer(&socket, recv_buffer)?;
    let _ = socket.set_send_buffer_size(RECV_BUFFER_BYTES);
    socket.bind(&listen.into())?;
    Ok((socket.into(), granted))
}

/// Bytes the kernel charges a queued heartbeat against the receive buffer
/// (its sk_buff and data; measured on Linux 6 at 832 for 28 bytes).
pub const QUEUED_DATAGRAM_COST: usize = 832;

/// About how many heartbeats a receive buffer the kernel reports as
/// `granted` bytes holds: what a stalled server can find queued and still
/// read, rather than lose.
pub fn datagrams_held(granted: usize) -> usize {
    granted / QUEUED_DATAGRAM_COST
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::PayloadRule;
    use crate::wire::{Datagram, Flags, Header, Message};

    fn datagram(seq: u32, message: Message<'_>) -> Vec<u8> {
        let d = Datagram {
            header: Header {
                flags: Flags::empty(),
                client_id: 5,
                incarnation: 1,
                seq,
            },
            message,
        };
        let mut buf = vec![0; MAX_DATAGRAM];
        let n = d.emit(None, &mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    /// Turns the loop until `done` holds, for at most ten seconds.
    fn turn_until(server: &mut Server, state: &mut LoopState, done: impl Fn(&Server) -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !done(server) {
            assert!(Instant::now() < until, "the loop never got there");
            assert_eq!(server.turn(state).unwrap(), Turn::Again);
        }
    }

    #[test]
    fn a_report_waiting_when_shutdown_begins_is_applied_first() {
        let mut server = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .workers(1)
            .job("quick", PayloadRule::Any, |_| Ok(b"done".to_vec()))
            .unwrap()
            .bind()
            .unwrap();
        let mut state = LoopState::new();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr()).unwrap();
        client
            .send(&datagram(
                1,
                Message::Hello {
                    ttl_ms: 0,
                    name: "t",
                },
            ))
            .unwrap();
        let submit = Message::Submit {
            request_id: 1,
            delay_ms: 0,
            deadline_ms: 0,
            job: "quick",
            payload: b"",
        };
        client.send(&datagram(2, submit)).unwrap();
        turn_until(&mut server, &mut state, |s| {
            s.engine.stats().tasks_accepted == 1
        });
        // The worker ran the job; both its reports wait in the channel
        // when the stop arrives.
        let until = Instant::now() + Duration::from_secs(10);
        while server.reports.len() < 2 {
            assert!(Instant::now() < until, "the worker never reported");
            std::thread::sleep(Duration::from_millis(1));
        }
        server.handle().shutdown();
        server.turn(&mut state).unwrap();
        let stats = server.engine.stats();
        assert!(server.engine.is_shutting_down());
        assert_eq!((stats.tasks_done, stats.tasks_cancelled), (1, 0));
    }

    #[test]
    fn a_flood_of_worker_reports_is_applied_a_budget_at_a_time() {
        let mut server = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .bind()
            .unwrap();
        let mut state = LoopState::new();
        // Reports for tasks the engine does not know change nothing, but
        // each costs the loop a little: they are taken a budget per turn.
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..(REPORTS_PER_TURN * 3 / 2) as u64 {
            tx.send((TaskId(i), TaskEvent::Started)).unwrap();
        }
        server.reports = rx;
        server.turn(&mut state).unwrap();
        assert!(state.reports_pending);
        assert_eq!(server.reports.len(), REPORTS_PER_TURN / 2);
        server.turn(&mut state).unwrap();
        assert!(!state.reports_pending);
        assert!(server.reports.is_empty());
    }

    #[test]
    fn an_embedded_server_refuses_metrics_beyond_loopback_without_the_switch() {
        // Refused before anything is bound, so the documentation address
        // is never used.
        let refused = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .metrics("192.0.2.1:9900".parse().unwrap())
            .bind();
        assert!(matches!(
            refused,
            Err(ServerError::InvalidConfig(ConfigError::InsecureMetrics(_)))
        ));
    }
}
