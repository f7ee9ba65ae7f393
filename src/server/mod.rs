//! The I/O edge: the listening sockets (members' and strangers'), a
//! hand-rolled mio loop, the clock, signals
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
//!   read the members' socket, 64 a call until a call comes back short,
//!        at most one receive buffer's worth, each datagram judged by its
//!        kernel arrival stamp when the stamp can matter; then strangers
//!        (HELLOs), 512 at most, once it is empty
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
//! the next `recvmmsg` finds a batch. With 100K clients at 1 Hz sending
//! independently, that cuts the CPU per heartbeat from 5.5 to 2.3 µs
//! (BENCHMARKS.md: a wake-up shared by ~80 datagrams and a `recvmmsg` by
//! ~40, instead of one or two each), and costs replies at most that wait.
//! Expiry is not delayed (the wait ends at the next due tick), and a lone
//! client's request/response exchange never waits: its datagrams arrive
//! one at a time.
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

//! The pieces:
//!
//! | file | holds |
//! |---|---|
//! | `mod.rs` | the loop: [`Server::bind`], [`Server::run`], one turn |
//! | `socket.rs` | socket setup; reading in batches; replies kept in slots until sent |
//! | `watch.rs` | metrics, logs, events, slow-loop / slow-cancel / shed warnings, health |
//! | `notify.rs` | systemd's readiness and watchdog notifications |
//! | `config.rs` | [`ServerConfig`], its one check, [`ServerBuilder`], [`Clock`] |
//! | `handle.rs` | [`ServerHandle`], [`RunningServer`] |
//! | `error.rs` | [`ServerError`], [`ShutdownReport`] |

mod config;
mod error;
mod handle;
mod notify;
mod socket;
mod watch;

pub use config::{Clock, ServerBuilder, ServerConfig, SystemClock, COALESCE, MAX_SHARDS};
pub use error::{ServerError, ShutdownReport};
pub use handle::{RunningServer, ServerHandle};
pub use notify::{Notifier, NotifyEnv};
pub use socket::{datagrams_held, QUEUED_DATAGRAM_COST, RECV_BUFFER_BYTES};

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::engine::{Engine, SharedSessions, Timestamp};
use crate::metrics::Metrics;
use crate::observe::{EventStream, WallClock};
use crate::pool::{Applied, CancelOutcome, Pool, Registry, Report};
use socket::{
    Arrivals, Incoming, Inlet, Outgoing, RECV_BATCH, STAMPS_NEEDED_AFTER, STRANGERS_AT_LEAST_EVERY,
    STRANGERS_PER_TURN,
};
use watch::{Thresholds, Watch};

const SOCKET: Token = Token(0);
const WAKER: Token = Token(1);
const SIGNALS: Token = Token(2);
const STRANGERS: Token = Token(3);

/// How long each shard lets datagrams gather under load: N shards each
/// see 1/N of the traffic, so each waits N times `--coalesce` (at most half
/// a tick) to read batches as large as one loop's, and pays its wake-ups
/// as rarely. Measured at 100K heartbeats/s on 2 shards: 1.29x one loop's
/// CPU per heartbeat with the wait unscaled, 1.04x scaled
/// (docs/benchmarks-history.md).
fn shard_coalesce(config: &ServerConfig) -> Duration {
    let half_tick = Duration::from_micros(config.engine.tick_us / 2);
    (config.coalesce * config.shards as u32).min(half_tick.max(config.coalesce))
}

/// Runs one of several shards. A shard that fails or panics tells every
/// other to stop, so the server stops as a whole (and its supervisor
/// restarts it) instead of running on with part of its clients unserved.
fn run_guarded(shard: Server, all: &ServerHandle) -> Result<ShutdownReport, ServerError> {
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.run_shard()))
        .unwrap_or(Err(ServerError::Panicked));
    if outcome.is_err() {
        all.shutdown();
    }
    outcome
}

/// Worker reports applied per turn at most.
const REPORTS_PER_TURN: usize = 4096;

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    poll: Poll,
    local_addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    waker: Arc<Waker>,
    signals: Option<Signals>,
    stop: Arc<AtomicBool>,
    engine: Engine,
    pool: Pool,
    reports: Receiver<Report>,
    incoming: Incoming,
    watch: Watch,
    grace: Duration,
    coalesce: Duration,
    /// Time zero of the engine's timestamps.
    start: Instant,
    clock: Arc<dyn Clock>,
    /// This loop's shard, when the server has several.
    shard: Option<u32>,
    /// The other shards: the first owns them until `run` starts each on a
    /// thread of its own.
    siblings: Vec<Server>,
    /// With shards, a second handle on every listening socket, held by the
    /// first shard until all have stopped: when a socket leaves a reuseport
    /// group the kernel moves the group's last socket into its place, and
    /// the steering program's indexes would then send other shards'
    /// clients to the wrong loop. A shard that stops first (or panics)
    /// must not close its sockets under the others.
    group: Vec<std::net::UdpSocket>,
}

/// What one shard is built from.
struct ShardParts {
    index: Option<u32>,
    listeners: socket::Listeners,
    metrics: Arc<Metrics>,
    events: Option<EventStream>,
    registry: Arc<Registry>,
    workers: usize,
}

/// What the loop carries from one turn to the next.
struct LoopState {
    events: Events,
    outgoing: Outgoing,
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
            outgoing: Outgoing::new(),
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

/// Each listening socket's role and inode, for the kernel's drop counts.
type SocketRoles = Vec<(&'static str, u64)>;

/// Registers the listening sockets with the poller; returns the read side
/// and each socket's role and inode (for the kernel's drop counts).
fn register(
    poll: &Poll,
    listeners: socket::Listeners,
    shard: Option<u32>,
) -> Result<(Incoming, SocketRoles), ServerError> {
    let mut inodes = Vec::new();
    let mut inlet = |(std_socket, granted): (std::net::UdpSocket, usize),
                     token,
                     interest,
                     role|
     -> Result<Inlet, ServerError> {
        if let Ok(inode) = crate::steer::inode(&std_socket) {
            inodes.push((role, inode));
        }
        let mut socket = UdpSocket::from_std(std_socket);
        poll.registry()
            .register(&mut socket, token, interest)
            .map_err(|e| ServerError::Io("registering a socket", e))?;
        Ok(Inlet::new(socket, granted, Instant::now()))
    };
    let members = inlet(
        listeners.members,
        SOCKET,
        Interest::READABLE | Interest::WRITABLE,
        "members",
    )?;
    let strangers = match listeners.strangers {
        Some(s) => Some(inlet(s, STRANGERS, Interest::READABLE, "strangers")?),
        None => None,
    };
    match &listeners.unsteered {
        None if shard.is_some_and(|i| i > 0) => {}
        None => tracing::info!("HELLOs steered to a socket of their own: a herd of new clients cannot crowd out live sessions"),
        Some(why) => tracing::warn!(
            error = %why,
            "the kernel refused the steering program: HELLOs and live sessions share one socket, so under a herd of new clients the kernel may drop heartbeats with HELLOs"
        ),
    }
    Ok((Incoming::new(members, strangers), inodes))
}

impl Server {
    /// A builder for an embedded server, with the server's defaults but no
    /// signal handling and no jobs yet.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::new()
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

    /// Binds the socket (with `shards` > 1, a socket pair per shard),
    /// starts the workers and registers signal handlers. The engine's job
    /// table is taken from `registry`.
    pub fn bind(mut config: ServerConfig, registry: Registry) -> Result<Server, ServerError> {
        let listen = config.listen;
        if config.engine.key.is_none() && !listen.ip().is_loopback() && !config.insecure_bind {
            return Err(ServerError::InsecureBind(listen));
        }
        config.validate().map_err(ServerError::InvalidConfig)?;
        // First, so a $NOTIFY_SOCKET that cannot be used fails the bind
        // before any thread or port is taken.
        let notifier = if config.systemd_notify {
            Notifier::new(&NotifyEnv::from_process(), config.clock.now())
                .map_err(|e| ServerError::Io("connecting to $NOTIFY_SOCKET", e))?
        } else {
            None
        };
        let shards = config.shards;
        let groups = if shards == 1 {
            vec![socket::listen(listen, config.recv_buffer)
                .map_err(|e| ServerError::Bind(listen, e))?]
        } else {
            socket::listen_sharded(listen, config.recv_buffer, shards as u32)
                .map_err(|e| ServerError::Bind(listen, e))?
        };
        let local_addr = groups[0]
            .members
            .0
            .local_addr()
            .map_err(|e| ServerError::Bind(listen, e))?;
        config.engine.jobs = registry.table();
        config.engine.record_events = true;
        config.engine.amplification_limit = config
            .amplification_limit
            .unwrap_or(!local_addr.ip().is_loopback());
        if shards > 1 {
            config.engine.shared_sessions = Some(SharedSessions::default());
            // Each shard expects its share, with room for some skew: an
            // index and slab reserved for the whole server in every shard
            // would cost N times the memory once their pages are touched.
            config.engine.reserve_sessions = Some(config.engine.max_sessions / shards * 5 / 4 + 1);
            tracing::info!(
                shards,
                "sharded: each client's datagrams go to the shard of its client_id"
            );
        }
        if config.engine.key.is_none() {
            if config.engine.amplification_limit {
                tracing::info!("keyless amplification limit on: no address is sent more bytes than it sent (an empty-name HELLO is welcomed on its retry)");
            } else {
                tracing::info!("keyless amplification limit off: every request is answered (--amplification-limit on to hold each address to the bytes it sent)");
            }
        }
        let metrics: Vec<Arc<Metrics>> = (0..shards)
            .map(|i| {
                Arc::new(if shards == 1 {
                    Metrics::default()
                } else {
                    Metrics::for_shard(i as u32)
                })
            })
            .collect();
        let metrics_addr = match config.metrics {
            Some(addr) => {
                let (bound, _thread) = crate::metrics::serve(addr, metrics.clone())
                    .map_err(|e| ServerError::Io("starting the metrics server", e))?;
                Some(bound)
            }
            None => None,
        };
        let mut events = match &config.events {
            Some(target) => Some(
                EventStream::start(target, registry.table())
                    .map_err(|e| ServerError::Io("opening the event stream", e))?,
            ),
            None => None,
        };
        let mut group = Vec::new();
        if shards > 1 {
            for listeners in &groups {
                let sockets = std::iter::once(&listeners.members.0)
                    .chain(listeners.strangers.as_ref().map(|s| &s.0));
                for socket in sockets {
                    group.push(
                        socket
                            .try_clone()
                            .map_err(|e| ServerError::Io("holding the socket group", e))?,
                    );
                }
            }
        }
        let registry = Arc::new(registry);
        // Each shard its own pool: a worker's report goes back to its own
        // loop with no lock or channel shared between shards. The workers
        // are dealt out (3 on 2 shards: 2 and 1), at least one a shard.
        let workers_of =
            |i: usize| (config.workers / shards + usize::from(i < config.workers % shards)).max(1);
        let mut servers = Vec::with_capacity(shards);
        for (i, listeners) in groups.into_iter().enumerate().rev() {
            // Shards after the first get ends of the first's stream; the
            // first keeps the writer (built last: the loop runs backwards).
            let shard_events = if i > 0 {
                events.as_ref().map(|stream| stream.for_shard(i as u32))
            } else {
                if let Some(stream) = events.as_mut().filter(|_| shards > 1) {
                    stream.set_shard(0);
                }
                events.take()
            };
            let parts = ShardParts {
                index: (shards > 1).then_some(i as u32),
                listeners,
                metrics: Arc::clone(&metrics[i]),
                events: shard_events,
                registry: Arc::clone(&registry),
                workers: workers_of(i),
            };
            servers.push(Server::shard(&config, local_addr, metrics_addr, parts)?);
        }
        servers.reverse();
        let mut first = servers.remove(0);
        first
            .watch
            .set_notifier(notifier, servers.iter().map(|s| s.metrics()).collect());
        first.siblings = servers;
        first.group = group;
        Ok(first)
    }

    /// One shard's loop: its sockets, poller, engine, pool and watch.
    fn shard(
        config: &ServerConfig,
        local_addr: SocketAddr,
        metrics_addr: Option<SocketAddr>,
        parts: ShardParts,
    ) -> Result<Server, ServerError> {
        let poll = Poll::new().map_err(|e| ServerError::Io("creating the poller", e))?;
        let (incoming, inodes) = register(&poll, parts.listeners, parts.index)?;
        let waker = Arc::new(
            Waker::new(poll.registry(), WAKER)
                .map_err(|e| ServerError::Io("creating the waker", e))?,
        );
        let signals = if config.handle_signals {
            let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
                .map_err(|e| ServerError::Io("installing signal handlers", e))?;
            poll.registry()
                .register(&mut signals, SIGNALS, Interest::READABLE)
                .map_err(|e| ServerError::Io("registering signals", e))?;
            Some(signals)
        } else {
            None
        };
        let metrics = parts.metrics;
        metrics.set_sockets(local_addr, inodes);
        metrics.health.set_waker(Arc::clone(&waker));
        let (report_tx, reports) = crossbeam_channel::unbounded();
        let notify = {
            let waker = Arc::clone(&waker);
            Arc::new(move || {
                let _ = waker.wake();
            })
        };
        let jobs = parts.registry.table();
        let pool = Pool::start(parts.workers, parts.registry, report_tx, notify)
            .map_err(|e| ServerError::Io("starting worker threads", e))?;
        let clock = Arc::clone(&config.clock);
        let start = clock.now();
        let thresholds = Thresholds {
            slow_loop: config.slow_loop,
            slow_cancel: config.slow_cancel,
        };
        let watch = Watch::new(
            metrics,
            parts.events,
            WallClock::new(clock.wall()),
            jobs,
            thresholds,
            start,
        );
        Ok(Server {
            poll,
            local_addr,
            metrics_addr,
            waker,
            signals,
            stop: Arc::new(AtomicBool::new(false)),
            engine: Engine::new(config.engine.clone(), Timestamp(0))
                .map_err(ServerError::InvalidConfig)?,
            pool,
            reports,
            incoming,
            watch,
            grace: config.grace,
            coalesce: shard_coalesce(config),
            start,
            clock,
            shard: parts.index,
            siblings: Vec::new(),
            group: Vec::new(),
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
        Arc::clone(&self.watch.metrics)
    }

    /// The receive buffer the kernel granted, in bytes (each listening
    /// socket has one).
    pub fn recv_buffer_granted(&self) -> usize {
        self.incoming.members.granted
    }

    /// Whether the kernel steers HELLOs to a socket of their own, so a herd
    /// of new clients cannot crowd out live sessions' heartbeats.
    pub fn steering(&self) -> bool {
        self.incoming.strangers.is_some()
    }

    /// A handle that stops the server gracefully from another thread.
    pub fn handle(&self) -> ServerHandle {
        ServerHandle {
            loops: std::iter::once(self)
                .chain(&self.siblings)
                .map(|s| (Arc::clone(&s.stop), Arc::clone(&s.waker)))
                .collect(),
        }
    }

    /// Every shard's live metrics, the first shard's first (one entry
    /// without shards).
    pub fn shard_metrics(&self) -> Vec<Arc<Metrics>> {
        std::iter::once(self)
            .chain(&self.siblings)
            .map(Server::metrics)
            .collect()
    }

    /// Runs until a graceful shutdown completes (or its grace runs out).
    /// With shards, each other shard runs on a thread of its own and this
    /// returns once all have stopped, with their reports summed.
    pub fn run(mut self) -> Result<ShutdownReport, ServerError> {
        if self.siblings.is_empty() {
            return self.run_shard();
        }
        // Dropped only once every shard has stopped (see `group`).
        let _group = std::mem::take(&mut self.group);
        let all = self.handle();
        let mut threads = Vec::with_capacity(self.siblings.len());
        for sibling in std::mem::take(&mut self.siblings) {
            let name = format!("tether-shard-{}", sibling.shard.unwrap_or_default());
            let stop_all = all.clone();
            let spawned = std::thread::Builder::new()
                .name(name)
                .spawn(move || run_guarded(sibling, &stop_all));
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(e) => {
                    all.shutdown();
                    for thread in threads {
                        let _ = thread.join();
                    }
                    return Err(ServerError::Io("starting a shard's thread", e));
                }
            }
        }
        let mut outcome = run_guarded(self, &all);
        for thread in threads {
            let other = thread.join().unwrap_or(Err(ServerError::Panicked));
            outcome = match (outcome, other) {
                (Ok(mut a), Ok(b)) => {
                    a.absorb(b);
                    Ok(a)
                }
                (
                    Err(ServerError::Aborted { unfinished: a }),
                    Err(ServerError::Aborted { unfinished: b }),
                ) => Err(ServerError::Aborted { unfinished: a + b }),
                (Err(e @ ServerError::Aborted { .. }), _)
                | (_, Err(e @ ServerError::Aborted { .. })) => Err(e),
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
        }
        outcome
    }

    /// One shard's loop, on the calling thread.
    fn run_shard(mut self) -> Result<ShutdownReport, ServerError> {
        let _span = self
            .shard
            .map(|shard| tracing::info_span!("shard", shard).entered());
        tracing::info!(addr = %self.local_addr, "listening");
        self.watch
            .ready(&format!("listening on {}", self.local_addr));
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
        let pending = self.incoming.pending();
        if state.last_read >= 2 && !pending && !state.reports_pending {
            self.gather(state.grace_deadline);
        }
        let timeout = if state.reports_pending {
            Some(Duration::ZERO)
        } else {
            self.poll_timeout(pending, state.grace_deadline)
        };
        if let Err(e) = self.poll.poll(&mut state.events, timeout) {
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(Turn::Again);
            }
            return Err(ServerError::Io("polling", e));
        }
        let woke = self.clock.now();
        let decided_at = self.timestamp(woke);
        let signalled = self.notice(state);
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
            self.watch.stopping();
            state.grace_deadline = Some(self.clock.now() + self.grace);
        }
        let expired_before = self.engine.stats().sessions_expired;
        let read_before = self.watch.iteration.datagrams;
        // Read every turn, readable or not: what arrived between the poll
        // and now must be read before any expiry is decided.
        self.drain_members(state);
        self.admit_strangers(state);
        state.last_read = (self.watch.iteration.datagrams - read_before) as usize;
        state.reports_pending = self.apply_reports(&mut report_budget);
        self.engine.handle_timeout(decided_at);
        self.watch.iteration.expired = self.engine.stats().sessions_expired - expired_before;
        self.apply_effects();
        self.flush(state);
        self.watch.observe(&mut self.engine);
        self.watch.check_slow_cancels(woke, &self.pool);
        self.watch
            .end_iteration(woke, self.clock.now(), &self.engine, &self.pool);
        if let Some(deadline) = state.grace_deadline {
            let drained = self.engine.unfinished_tasks() == 0
                && !self.engine.has_transmits()
                && state.outgoing.is_empty();
            if drained || self.clock.now() >= deadline {
                return Ok(Turn::Stopped);
            }
        }
        Ok(Turn::Again)
    }

    /// Takes in what the poll reported; returns how many stop requests
    /// (signals, or a [`ServerHandle::shutdown`]) arrived.
    fn notice(&mut self, state: &mut LoopState) -> usize {
        let mut signalled = 0;
        for event in state.events.iter() {
            match event.token() {
                SOCKET => {
                    self.incoming.members.pending |= event.is_readable();
                    state.send_blocked &= !event.is_writable();
                }
                STRANGERS => {
                    if let Some(strangers) = self.incoming.strangers.as_mut() {
                        strangers.pending |= event.is_readable();
                    }
                }
                SIGNALS => {
                    if let Some(signals) = self.signals.as_mut() {
                        for signal in signals.pending() {
                            if signal == SIGHUP {
                                // The shards share one stream: the first
                                // shard reopens it.
                                if self.shard.unwrap_or(0) == 0 {
                                    self.watch.reopen_events();
                                }
                            } else {
                                signalled += 1;
                            }
                        }
                    }
                }
                _ => {}
            }
        }
        if self.stop.swap(false, Ordering::AcqRel) {
            signalled += 1;
        }
        signalled
    }

    fn finish(mut self) -> ShutdownReport {
        // Tasks still on a worker with their flag set ignored it; a task
        // that was still queued was withdrawn and never started.
        let ignored_cancel = self.watch.finish(&self.engine, &self.pool);
        let stats = *self.engine.stats();
        tracing::info!(
            sessions_opened = stats.sessions_opened,
            sessions_expired = stats.sessions_expired,
            tasks_done = stats.tasks_done,
            tasks_failed = stats.tasks_failed,
            tasks_cancelled = stats.tasks_cancelled,
            "stopped"
        );
        ShutdownReport {
            ignored_cancel,
            stats,
        }
        // The pool is dropped without joining: a job that ignores its flag
        // must not hold the process past its grace period.
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
        let until = [Some(now + self.coalesce), self.engine_due(), grace]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(now);
        let wait = until.saturating_duration_since(now).min(self.coalesce);
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
    }

    fn poll_timeout(&self, pending: bool, grace: Option<Instant>) -> Option<Duration> {
        if pending {
            return Some(Duration::ZERO);
        }
        let wake_at = [self.engine_due(), grace, self.watch.wake_at()]
            .into_iter()
            .flatten()
            .min()?;
        // mio rounds a timeout up to whole milliseconds, so waking early
        // (and spinning until the tick is reached) does not happen.
        Some(wake_at.saturating_duration_since(self.clock.now()))
    }

    /// Reads the members' socket: at most one receive buffer's worth of
    /// datagrams, a batch per system call, sending replies as it goes.
    /// What the budget left is read next turn, at once.
    fn drain_members(&mut self, state: &mut LoopState) {
        let mut read = 0;
        while read < self.incoming.members.budget {
            match self.read_batch(state, false) {
                Some(n) => read += n.max(1),
                None => return,
            }
        }
        self.incoming.members.pending = true;
    }

    /// Reads up to `STRANGERS_PER_TURN` HELLOs from the strangers' socket,
    /// once the members' is empty; the rest wait for the next turn. While
    /// the members' socket stays busy, one batch every
    /// `STRANGERS_AT_LEAST_EVERY`.
    fn admit_strangers(&mut self, state: &mut LoopState) {
        let Some(strangers) = self.incoming.strangers.as_ref() else {
            return;
        };
        let now = self.clock.now();
        let starved = now >= self.incoming.strangers_served_at + STRANGERS_AT_LEAST_EVERY;
        if !strangers.pending || (self.incoming.members.pending && !starved) {
            return;
        }
        self.incoming.strangers_served_at = now;
        let quota = if self.incoming.members.pending {
            RECV_BATCH
        } else {
            STRANGERS_PER_TURN
        };
        let mut read = 0;
        while read < quota {
            match self.read_batch(state, true) {
                Some(n) => read += n.max(1),
                None => return,
            }
        }
    }

    /// Reads one batch from the members' or the strangers' socket into the
    /// engine. `None` once the read found the socket empty (nothing there,
    /// or a short batch, read and handled), which ends the drain.
    fn read_batch(&mut self, state: &mut LoopState, strangers: bool) -> Option<usize> {
        let emptied_at = if strangers {
            self.incoming.strangers.as_ref()?.emptied_at
        } else {
            self.incoming.members.emptied_at
        };
        // Stamps only where they can change a judgement: a deadline due
        // about now (a datagram around it must be judged by when it
        // arrived), or datagrams that may have waited long enough for their
        // arrival to round to an earlier deadline than their reading. The
        // window closes a margin after this read begins, which a read ends
        // well inside unless the thread is held: then its unstamped
        // datagrams count from their reading, as after a short wait (never
        // early; PROTOCOL.md, "Timing promises").
        let (before, before_wall) = (self.clock.now(), self.clock.wall());
        let window_closes = before + STAMPS_NEEDED_AFTER;
        let due_soon = self.engine_due().is_some_and(|due| due <= window_closes);
        let waited_long = before.saturating_duration_since(emptied_at) > STAMPS_NEEDED_AFTER;
        let arrival_matters = waited_long
            && self.engine.arrival_can_move_deadlines(
                self.timestamp(emptied_at),
                self.timestamp(window_closes),
            );
        let inlet = if strangers {
            self.incoming.strangers.as_mut()?
        } else {
            &mut self.incoming.members
        };
        inlet.want_stamps(due_soon || arrival_matters);
        let batch = &mut self.incoming.batch;
        self.watch.edge.receive_calls += 1;
        let read = match batch.recv(&inlet.socket, false) {
            Ok(n) => {
                let behind = inlet.read(n);
                // The clocks are read once per batch, after the call returned:
                // every datagram in it had arrived by then.
                let read_at = self.clock.now();
                let arrivals = Arrivals::new(
                    self.clock.wall(),
                    read_at,
                    inlet.emptied_at,
                    inlet.emptied_wall,
                );
                let now = read_at.saturating_duration_since(self.start).as_micros() as u64;
                if !strangers {
                    self.engine.set_backlogged(behind);
                }
                // A short batch found the socket empty: a non-blocking
                // `recvmmsg` stops only where the queue ran out (nothing
                // else ends a batch early on this unconnected socket without
                // IP_RECVERR). The first datagram to arrive after that
                // raises an epoll edge, as after a read that would block, so
                // the calls that would only read stragglers or say "empty"
                // are not made (at 100K heartbeats a second, paced: 9,870
                // calls in 4 s against 19,241, `perf stat`). Everything read
                // later arrived after this read began.
                let emptied = n < RECV_BATCH;
                if emptied {
                    inlet.emptied(before, before_wall);
                }
                let heard = &mut self.incoming.heard;
                heard.clear();
                heard.extend(batch.iter_stamped().map(|(i, from, stamp)| {
                    let arrived = stamp.and_then(|ns| {
                        let waited = arrivals.waited(ns)?.as_micros() as u64;
                        Some(Timestamp(now.saturating_sub(waited)))
                    });
                    (i, from, arrived)
                }));
                let batch = &*batch;
                self.engine.handle_datagrams(
                    Timestamp(now),
                    heard
                        .iter()
                        .map(|&(i, from, arrived)| (from, batch.bytes(i), arrived)),
                );
                self.watch.iteration.datagrams += n as u64;
                let edge = &mut self.watch.edge;
                *if strangers {
                    &mut edge.read_strangers
                } else {
                    &mut edge.read_members
                } += n as u64;
                (!emptied).then_some(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                inlet.emptied(before, before_wall);
                if !strangers {
                    self.engine.set_backlogged(false);
                }
                None
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Some(0),
            Err(_) => {
                self.watch.edge.receive_errors += 1;
                Some(1)
            }
        };
        // Replies go out as we read, so the outbox stays small.
        if self.engine.has_transmits() {
            self.flush(state);
        }
        read
    }

    /// Sends what is queued, unless the socket is known to be full.
    fn flush(&mut self, state: &mut LoopState) {
        if state.send_blocked {
            return;
        }
        let done = state
            .outgoing
            .flush(&self.incoming.members.socket, &mut self.engine);
        self.watch.iteration.replies += done.sent;
        self.watch.edge.send_errors += done.errors;
        state.send_blocked = done.blocked;
    }

    /// Applies worker reports while `budget` (shared by a turn's calls, at
    /// most `REPORTS_PER_TURN`) lasts, so that however many finish at once,
    /// socket reads and expiry wait for a bounded amount of work. Returns
    /// whether more are waiting.
    fn apply_reports(&mut self, budget: &mut usize) -> bool {
        while *budget > 0 {
            let Ok((task, event, at)) = self.reports.try_recv() else {
                return false;
            };
            *budget -= 1;
            self.watch.iteration.reports += 1;
            let at = self.timestamp(at);
            self.engine.handle_task_event(at, task, event);
        }
        !self.reports.is_empty()
    }

    fn apply_effects(&mut self) {
        while let Some(effect) = self.engine.poll_effect() {
            self.watch.iteration.effects += 1;
            let now = self.clock.now();
            let applied = self.pool.apply(effect, now);
            if let Some((task, event)) = applied.report() {
                let at = self.timestamp(now);
                self.engine.handle_task_event(at, task, event);
            } else if let Applied::Cancel(_, CancelOutcome::Signalled) = applied {
                // Its flag is set: watch for a job slow to notice.
                self.watch.cancel_signalled(now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ConfigError, PayloadRule, TaskEvent, TaskId};
    use crate::wire::{Datagram, Flags, Message, MAX_DATAGRAM};

    #[test]
    fn each_shard_gathers_n_times_longer_but_never_past_half_a_tick() {
        let with = |shards, coalesce_us| {
            shard_coalesce(&ServerConfig {
                shards,
                coalesce: Duration::from_micros(coalesce_us),
                ..ServerConfig::default()
            })
        };
        // The default tick is 10 ms.
        assert_eq!(with(1, 500), Duration::from_micros(500));
        assert_eq!(with(2, 500), Duration::from_millis(1));
        assert_eq!(with(16, 500), Duration::from_millis(5));
        assert_eq!(with(4, 0), Duration::ZERO);
    }

    fn datagram(seq: u32, message: Message<'_>) -> Vec<u8> {
        Datagram::new(Flags::empty(), 5, 1, seq, message)
            .to_vec(None)
            .unwrap()
    }

    /// Turns the loop until `done` holds, for at most ten seconds.
    fn turn_until(server: &mut Server, state: &mut LoopState, done: impl Fn(&Server) -> bool) {
        let until = Instant::now() + Duration::from_secs(10);
        while !done(server) {
            assert!(Instant::now() < until, "the loop never got there");
            assert_eq!(server.turn(state).unwrap(), Turn::Again);
        }
    }

    /// `server` with one session open, the loop state that opened it, and
    /// the session's client socket (connected, its WELCOME read). As a
    /// client does, it waits for the session before using it: HELLO and
    /// the rest arrive on different sockets, read in turn.
    fn with_a_session(mut server: Server) -> (Server, LoopState, std::net::UdpSocket) {
        let mut state = LoopState::new();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.connect(server.local_addr()).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let hello = Message::Hello {
            ttl_ms: 0,
            name: "t",
        };
        client.send(&datagram(1, hello)).unwrap();
        turn_until(&mut server, &mut state, |s| {
            s.engine.stats().sessions_opened == 1
        });
        assert_eq!(replies(&client, 1), 1, "the WELCOME");
        (server, state, client)
    }

    fn server_with_a_session() -> (Server, LoopState, std::net::UdpSocket) {
        with_a_session(
            Server::builder()
                .listen("127.0.0.1:0".parse().unwrap())
                .bind()
                .unwrap(),
        )
    }

    /// Sends heartbeats asking for an ACK, sequence numbers `seqs`, and
    /// gives loopback a moment to queue them all: it delivers as it sends,
    /// unless the kernel hands the work to its softirq thread.
    fn heartbeats_asking_ack(client: &std::net::UdpSocket, seqs: std::ops::Range<u32>) {
        for seq in seqs {
            let ack = Datagram::new(Flags::ACK, 5, 1, seq, Message::Heartbeat)
                .to_vec(None)
                .unwrap();
            client.send(&ack).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }

    /// Reads up to `expected` replies, waiting at most 10 s for each.
    fn replies(client: &std::net::UdpSocket, expected: usize) -> usize {
        let mut buf = [0u8; MAX_DATAGRAM];
        (0..expected)
            .take_while(|_| client.recv(&mut buf).is_ok())
            .count()
    }

    #[test]
    fn a_drain_reads_until_a_batch_comes_back_short_and_no_further() {
        let (mut server, mut state, client) = server_with_a_session();
        assert!(
            !server.incoming.members.pending,
            "the turns so far emptied it"
        );
        let full = RECV_BATCH as u32;
        // More than a batch, queued without the loop being told (no poll):
        // the drain reads every one, a full batch and then a short one,
        // and the short one ends it.
        heartbeats_asking_ack(&client, 2..2 + full + 36);
        let (read, calls) = (
            server.watch.edge.read_members,
            server.watch.edge.receive_calls,
        );
        server.drain_members(&mut state);
        assert_eq!(
            server.watch.edge.read_members - read,
            u64::from(full) + 36,
            "every datagram read (if fewer, loopback may not have queued them all in 20 ms)"
        );
        assert_eq!(server.watch.edge.receive_calls - calls, 2);
        assert!(!server.incoming.members.pending);
        assert_eq!(replies(&client, RECV_BATCH + 36), RECV_BATCH + 36);
        // A few: one call.
        heartbeats_asking_ack(&client, 2 + full + 36..2 + full + 39);
        let calls = server.watch.edge.receive_calls;
        server.drain_members(&mut state);
        assert_eq!(server.watch.edge.receive_calls - calls, 1);
        assert_eq!(replies(&client, 3), 3);
        // The socket was never read to "would block", yet a datagram sent
        // now wakes the loop's poll (readiness left over from the sends
        // above is taken first) and the turn reads it.
        server
            .poll
            .poll(&mut state.events, Some(Duration::ZERO))
            .unwrap();
        heartbeats_asking_ack(&client, 2 + full + 39..2 + full + 40);
        let read = server.watch.edge.read_members;
        assert_eq!(server.turn(&mut state).unwrap(), Turn::Again);
        assert!(state
            .events
            .iter()
            .any(|e| e.token() == SOCKET && e.is_readable()));
        assert_eq!(server.watch.edge.read_members - read, 1);
        assert_eq!(replies(&client, 1), 1);
    }

    #[test]
    fn a_job_the_builder_could_not_register_fails_bind() {
        let result = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .job("twice", PayloadRule::Any, |_| Ok(Vec::new()))
            .job("twice", PayloadRule::Any, |_| Ok(Vec::new()))
            .job("", PayloadRule::Any, |_| Ok(Vec::new()))
            .bind();
        match result {
            Err(ServerError::Job(crate::pool::RegistryError::Duplicate(name))) => {
                assert_eq!(name, "twice", "the first error is the one reported");
            }
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("bound with a duplicate job"),
        }
        let standard_twice = Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .standard_jobs()
            .job("echo", PayloadRule::Any, |_| Ok(Vec::new()))
            .bind();
        assert!(matches!(standard_twice, Err(ServerError::Job(_))));
    }

    #[test]
    fn a_report_waiting_when_shutdown_begins_is_applied_first() {
        let (mut server, mut state, client) = with_a_session(
            Server::builder()
                .listen("127.0.0.1:0".parse().unwrap())
                .workers(1)
                .job("quick", PayloadRule::Any, |_| Ok(b"done".to_vec()))
                .bind()
                .unwrap(),
        );
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
            tx.send((TaskId(i), TaskEvent::Started, Instant::now()))
                .unwrap();
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
