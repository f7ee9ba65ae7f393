//! How a server is configured: [`ServerConfig`], its one check, the
//! [`ServerBuilder`] for embedding, and the [`Clock`] it reads time from.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::socket::RECV_BUFFER_BYTES;
use super::{Server, ServerError};
use crate::engine::{self, ConfigError};
use crate::observe::EventsTarget;
use crate::pool::Registry;

/// Shards at most (two sockets each in the reuseport group): more loops
/// than this are more than any machine has cores for.
pub const MAX_SHARDS: usize = 128;

/// Default for [`ServerConfig::coalesce`]: at 100K heartbeats a second it
/// brings ~80 datagrams a wake-up (~40 per read) and 40% of the CPU per
/// heartbeat of reading each one as it comes (BENCHMARKS.md), for at most
/// 0.5 ms more round trip under load.
pub const COALESCE: Duration = Duration::from_micros(500);

/// Where the server reads time. Deadlines come only from [`Clock::now`],
/// a monotonic clock; the wall clock is read once, at start, to put dates
/// on the event stream. Tests inject a clock whose wall time jumps to show
/// that it changes nothing.
pub trait Clock: fmt::Debug + Send + Sync {
    /// A monotonic instant (must advance with real time: the loop sleeps
    /// in the kernel against it).
    fn now(&self) -> Instant;
    /// The wall-clock time: `CLOCK_REALTIME`, the clock the kernel stamps
    /// datagrams' arrival with (`SO_TIMESTAMPNS`), so the two can be
    /// subtracted.
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

/// How the server runs. Start from [`ServerConfig::default`] and set
/// fields (new fields may be added in minor releases), or use
/// [`Server::builder`](super::Server::builder).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Address to bind.
    pub listen: SocketAddr,
    /// Sessions, tasks, limits and the key.
    pub engine: engine::Config,
    /// Worker threads, dealt out between the shards (at least one each).
    pub workers: usize,
    /// Event loops, each with its own sockets, engine, sessions and
    /// workers, on a thread of its own; the kernel sends each client's
    /// datagrams to the shard of its client_id (see `crate::steer`).
    pub shards: usize,
    /// How long a shutdown waits for cancelled tasks to stop.
    pub grace: Duration,
    /// Allow a keyless server on a non-loopback address.
    pub insecure_bind: bool,
    /// Keyless: hold every address to the bytes it sent
    /// ([`engine::Config::amplification_limit`]). `None` turns it on exactly
    /// when the listen address is not loopback, where sources can be
    /// spoofed by anyone on the network.
    pub amplification_limit: Option<bool>,
    /// Stop gracefully on SIGINT/SIGTERM (a second one stops at once);
    /// reopen the event stream's file on SIGHUP.
    pub handle_signals: bool,
    /// Tell systemd when the server is ready, stopping, and still alive
    /// (`sd_notify(3)`: `READY=1`, `STOPPING=1`, `WATCHDOG=1`), when
    /// `$NOTIFY_SOCKET` is set. The `tether` command turns it on; an
    /// embedded server leaves it off, since the process may notify itself.
    pub systemd_notify: bool,
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
    /// the server is stalled (see [`datagrams_held`](super::datagrams_held)).
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
            shards: 1,
            grace: Duration::from_secs(5),
            insecure_bind: false,
            amplification_limit: None,
            handle_signals: true,
            systemd_notify: false,
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

impl ServerConfig {
    /// Checks every setting, the engine's included: the one place the
    /// rules live, used by [`Server::bind`](super::Server::bind) (and so by the builder and the
    /// command line).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.engine.validate()?;
        if self.workers == 0 {
            return Err(ConfigError::NoWorkers);
        }
        if self.shards == 0 || self.shards > MAX_SHARDS {
            return Err(ConfigError::Shards(self.shards));
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
/// jobs. Start from [`Server::builder`](super::Server::builder); [`ServerBuilder::bind`] checks the
/// configuration and binds, [`Server::spawn`](super::Server::spawn) runs it on a thread.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    config: ServerConfig,
    registry: Registry,
    /// The first job that could not be registered, reported by `bind`, so
    /// that a chain of `.job(..)` calls needs no `?` in the middle.
    job_error: Option<crate::pool::RegistryError>,
}

impl ServerBuilder {
    /// The server's defaults, but no signal handling and no jobs yet: the
    /// start of [`Server::builder`](super::Server::builder).
    pub(super) fn new() -> ServerBuilder {
        ServerBuilder {
            config: ServerConfig {
                handle_signals: false,
                ..ServerConfig::default()
            },
            registry: Registry::new(),
            job_error: None,
        }
    }

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
    /// Event loops (default 1): see [`ServerConfig::shards`].
    pub fn shards(mut self, shards: usize) -> Self {
        self.config.shards = shards;
        self
    }
    /// Stop gracefully on SIGINT/SIGTERM (default off for an embedded
    /// server: the program decides; use [`ServerHandle::shutdown`](super::ServerHandle::shutdown)).
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
    /// A name already taken is reported by [`ServerBuilder::bind`].
    pub fn standard_jobs(mut self) -> Self {
        for (name, rule, body) in crate::pool::standard_jobs() {
            let registered = self.registry.register(name, rule, body);
            self.note(registered);
        }
        self
    }

    fn note(&mut self, registered: Result<(), crate::pool::RegistryError>) {
        if let (Err(e), None) = (registered, &self.job_error) {
            self.job_error = Some(e);
        }
    }
    /// Adds a job clients can SUBMIT by `name`. The closure runs on a worker
    /// thread; it should poll [`TaskContext::is_cancelled`](crate::pool::TaskContext::is_cancelled)
    /// or sleep through [`TaskContext::sleep`](crate::pool::TaskContext::sleep) so
    /// that cancellation can stop it.
    /// A duplicate or invalid name is reported by [`ServerBuilder::bind`]
    /// (as [`ServerError::Job`](super::ServerError::Job)).
    pub fn job<F>(mut self, name: &str, payload: crate::engine::PayloadRule, body: F) -> Self
    where
        F: Fn(&crate::pool::TaskContext<'_>) -> crate::pool::JobResult + Send + Sync + 'static,
    {
        let registered = self.registry.register(name, payload, body);
        self.note(registered);
        self
    }
    /// Checks the configuration, binds the socket and starts the workers.
    /// A job that could not be registered fails it first.
    pub fn bind(self) -> Result<Server, ServerError> {
        if let Some(e) = self.job_error {
            return Err(ServerError::Job(e));
        }
        Server::bind(self.config, self.registry)
    }
}

fn duration_ms(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
