//! Prometheus metrics, published by the event loop without locks and served
//! over HTTP by a thread of their own.
//!
//! ```text
//!   event loop ── after each iteration: store the engine's counters into
//!                 atomics (Relaxed); observe histograms (atomic adds)
//!   /metrics   ── on each scrape: read the atomics, encode with
//!                 prometheus-client's OpenMetrics encoder (a custom
//!                 Collector); process_* read from /proc/self there too
//!   /healthz   ── wake the loop, wait for it to finish an iteration
//! ```
//!
//! The loop never waits for a scrape and a scrape never stops the loop: the
//! only shared state is atomics. (prometheus-client's own histogram takes a
//! mutex per observation, so histograms here are a fixed set of atomic
//! buckets encoded through the same encoder.)

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::engine::Stats;
use crate::wire::CancelReason;

mod http;
mod process;
mod sessions;

pub use http::{serve, Health, HEALTH_DEADLINE, OPENMETRICS_CONTENT_TYPE};
pub use sessions::{Answer, Question, SessionsDesk};

/// Counters of the server's own (outside the engine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeStats {
    /// Live sessions now.
    pub sessions_live: u64,
    /// `recvmmsg` errors other than "would block".
    pub receive_errors: u64,
    /// `recvmmsg` calls on the listening sockets.
    pub receive_calls: u64,
    /// Replies the socket refused.
    pub send_errors: u64,
    /// Lifecycle events not written to the event stream because its buffer
    /// was full.
    pub events_dropped: u64,
    /// Tasks still running after their flag was set for longer than the
    /// slow-cancel threshold.
    pub slow_cancels: u64,
    /// Loop iterations that took longer than the slow-loop threshold.
    pub slow_loops: u64,
    /// Datagrams read from the members' socket (every kind but HELLO, or
    /// every datagram when HELLOs are not steered).
    pub read_members: u64,
    /// Datagrams read from the strangers' socket (HELLO).
    pub read_strangers: u64,
    /// Tasks the worker pool holds in its queue now.
    pub pool_queued: u64,
    /// Tasks on the pool's workers now.
    pub pool_running: u64,
}

/// How one series reads its value.
type Read = fn(&Stats, &EdgeStats) -> u64;

/// One exported series: a family name, its help, counter or gauge, an
/// optional label, and where its value comes from.
struct Series {
    family: &'static str,
    help: &'static str,
    kind: MetricType,
    label: Option<(&'static str, &'static str)>,
    read: Read,
}

macro_rules! series {
    ($family:literal, $help:literal, $kind:ident, $read:expr) => {
        Series {
            family: $family,
            help: $help,
            kind: MetricType::$kind,
            label: None,
            read: $read,
        }
    };
    ($family:literal, $help:literal, $kind:ident, $k:literal = $v:literal, $read:expr) => {
        Series {
            family: $family,
            help: $help,
            kind: MetricType::$kind,
            label: Some(($k, $v)),
            read: $read,
        }
    };
}

/// Every series, grouped by family (a family's series are adjacent).
/// Counter names get `_total` from the encoder.
const SERIES: &[Series] = &[
    series!(
        "tether_sessions_live",
        "Sessions open now.",
        Gauge,
        |_, e| e.sessions_live
    ),
    series!(
        "tether_sessions_opened",
        "Sessions opened by a HELLO.",
        Counter,
        |s, _| s.sessions_opened
    ),
    series!(
        "tether_sessions_ended",
        "Sessions ended, by reason.",
        Counter,
        "reason" = "expired",
        |s, _| s.sessions_expired
    ),
    series!(
        "tether_sessions_ended",
        "Sessions ended, by reason.",
        Counter,
        "reason" = "left",
        |s, _| s.sessions_left
    ),
    series!(
        "tether_sessions_ended",
        "Sessions ended, by reason.",
        Counter,
        "reason" = "replaced",
        |s, _| s.sessions_replaced
    ),
    series!(
        "tether_sessions_ended",
        "Sessions ended, by reason.",
        Counter,
        "reason" = "shutdown",
        |s, _| s.sessions_at_shutdown
    ),
    series!(
        "tether_sessions_refused",
        "HELLOs refused because the session limit was reached.",
        Counter,
        |s, _| s.sessions_refused
    ),
    series!(
        "tether_heartbeats",
        "HEARTBEATs accepted.",
        Counter,
        |s, _| s.heartbeats
    ),
    series!(
        "tether_datagrams_received",
        "Datagrams read from the socket.",
        Counter,
        |s, _| s.datagrams
    ),
    series!(
        "tether_datagrams_dropped",
        "Datagrams that changed nothing, by cause.",
        Counter,
        "cause" = "malformed",
        |s, _| s.dropped_malformed
    ),
    series!(
        "tether_datagrams_dropped",
        "Datagrams that changed nothing, by cause.",
        Counter,
        "cause" = "bad_mac",
        |s, _| s.dropped_bad_mac
    ),
    series!(
        "tether_datagrams_dropped",
        "Datagrams that changed nothing, by cause.",
        Counter,
        "cause" = "replay",
        |s, _| s.dropped_replay
    ),
    series!(
        "tether_datagrams_dropped",
        "Datagrams that changed nothing, by cause.",
        Counter,
        "cause" = "unknown_session",
        |s, _| s.unknown_session
    ),
    series!(
        "tether_datagrams_dropped",
        "Datagrams that changed nothing, by cause.",
        Counter,
        "cause" = "too_large",
        |s, _| s.dropped_too_large
    ),
    series!(
        "tether_datagrams_dropped",
        "Datagrams that changed nothing, by cause.",
        Counter,
        "cause" = "stale_hello",
        |s, _| s.dropped_stale_hello
    ),
    series!(
        "tether_replies_sent",
        "Replies queued for sending.",
        Counter,
        |s, _| s.replies
    ),
    series!(
        "tether_replies_dropped",
        "Replies dropped because the outbox was full.",
        Counter,
        |s, _| s.replies_dropped
    ),
    series!(
        "tether_replies_withheld",
        "Replies not sent on purpose: amplification = the address had not sent as many bytes (keyless beyond loopback); backlog = an answer to a stranger (UNKNOWN_SESSION, or REJECTED or WELCOME to a new HELLO) while the socket was flooded.",
        Counter,
        "reason" = "amplification",
        |s, _| s.replies_unpaid
    ),
    series!(
        "tether_replies_withheld",
        "Replies not sent on purpose: amplification = the address had not sent as many bytes (keyless beyond loopback); backlog = an answer to a stranger (UNKNOWN_SESSION, or REJECTED or WELCOME to a new HELLO) while the socket was flooded.",
        Counter,
        "reason" = "backlog",
        |s, _| s.replies_shed
    ),
    series!(
        "tether_send_errors",
        "Replies the socket refused.",
        Counter,
        |_, e| e.send_errors
    ),
    series!(
        "tether_receive_errors",
        "Socket receive errors.",
        Counter,
        |_, e| e.receive_errors
    ),
    series!(
        "tether_receive_calls",
        "recvmmsg calls on the listening sockets (up to 64 datagrams each): tether_datagrams_read over it is how well reads batch.",
        Counter,
        |_, e| e.receive_calls
    ),
    series!(
        "tether_tasks",
        "Unfinished tasks, by state.",
        Gauge,
        "state" = "scheduled",
        |s, _| s.tasks_scheduled_now
    ),
    series!(
        "tether_tasks",
        "Unfinished tasks, by state.",
        Gauge,
        "state" = "queued",
        |s, _| s.tasks_queued_now
    ),
    series!(
        "tether_tasks",
        "Unfinished tasks, by state.",
        Gauge,
        "state" = "running",
        |s, _| s.tasks_running_now
    ),
    series!(
        "tether_datagrams_read",
        "Datagrams read, by listening socket (members: every kind but HELLO; strangers: HELLO, steered there by the kernel).",
        Counter,
        "socket" = "members",
        |_, e| e.read_members
    ),
    series!(
        "tether_datagrams_read",
        "Datagrams read, by listening socket (members: every kind but HELLO; strangers: HELLO, steered there by the kernel).",
        Counter,
        "socket" = "strangers",
        |_, e| e.read_strangers
    ),
    series!(
        "tether_pool_tasks",
        "Tasks the worker pool holds, by state (what the engine counts as queued or running, as the pool sees it).",
        Gauge,
        "state" = "queued",
        |_, e| e.pool_queued
    ),
    series!(
        "tether_pool_tasks",
        "Tasks the worker pool holds, by state (what the engine counts as queued or running, as the pool sees it).",
        Gauge,
        "state" = "running",
        |_, e| e.pool_running
    ),
    series!(
        "tether_tasks_accepted",
        "SUBMITs accepted.",
        Counter,
        |s, _| s.tasks_accepted
    ),
    series!(
        "tether_tasks_rejected",
        "SUBMITs rejected.",
        Counter,
        |s, _| s.tasks_rejected
    ),
    series!(
        "tether_tasks_ended",
        "Tasks that reached a final state, by outcome.",
        Counter,
        "outcome" = "done",
        |s, _| s.tasks_done
    ),
    series!(
        "tether_tasks_ended",
        "Tasks that reached a final state, by outcome.",
        Counter,
        "outcome" = "failed",
        |s, _| s.tasks_failed
    ),
    series!(
        "tether_tasks_ended",
        "Tasks that reached a final state, by outcome.",
        Counter,
        "outcome" = "cancelled",
        |s, _| s.tasks_cancelled
    ),
    series!(
        "tether_events_dropped",
        "Lifecycle events dropped because the event stream fell behind.",
        Counter,
        |_, e| e.events_dropped
    ),
    series!(
        "tether_slow_cancels",
        "Tasks still running longer than --slow-cancel after their flag was set.",
        Counter,
        |_, e| e.slow_cancels
    ),
    series!(
        "tether_slow_loop_iterations",
        "Event loop iterations longer than --slow-loop.",
        Counter,
        |_, e| e.slow_loops
    ),
];

/// A histogram of seconds in fixed buckets, observed with atomic adds.
pub struct Histogram {
    bounds_us: &'static [u64],
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds_us: &'static [u64]) -> Histogram {
        Histogram {
            bounds_us,
            counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Adds one observation of `us` microseconds.
    pub fn observe_us(&self, us: u64) {
        let bucket = self.bounds_us.partition_point(|&b| b < us);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl fmt::Debug for Histogram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Histogram")
            .field("count", &self.count())
            .finish()
    }
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        // Per-bucket counts: the encoder makes them cumulative.
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.counts.len());
        for (i, count) in self.counts.iter().enumerate() {
            let count = count.load(Ordering::Relaxed);
            total += count;
            let bound = self
                .bounds_us
                .get(i)
                .map_or(f64::INFINITY, |&b| b as f64 / 1e6);
            buckets.push((bound, count));
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        encoder.encode_histogram::<NoLabelSet>(sum, total, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Bucket bounds, in microseconds, for task run times: 1 ms to 10 min.
const RUN_TIME_US: &[u64] = &[
    1_000,
    10_000,
    100_000,
    500_000,
    1_000_000,
    5_000_000,
    10_000_000,
    60_000_000,
    600_000_000,
];
/// For expiry lateness and loop iterations: 100 µs to 10 s.
const SHORT_US: &[u64] = &[
    100, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 1_000_000, 10_000_000,
];

/// Everything the metrics endpoint exports. Shared between the loop, which
/// writes, and the HTTP thread, which reads.
pub struct Metrics {
    values: Box<[AtomicU64]>,
    /// Tasks cancelled, by reason, in the order of [`CancelReason::ALL`].
    cancelled: Box<[AtomicU64]>,
    /// Time tasks spent on a worker.
    pub task_run: Histogram,
    /// How long after its deadline tick each expiry was decided.
    pub expiry_lateness: Histogram,
    /// Duration of each event loop iteration (from wake-up to sleep).
    pub loop_iteration: Histogram,
    /// The listening sockets whose kernel drop counts are exported: their
    /// address, and each one's role and inode.
    sockets: std::sync::OnceLock<(SocketAddr, Vec<(&'static str, u64)>)>,
    /// The loop's progress, for `/healthz`.
    pub health: Health,
    /// Questions for the loop from `/sessions`.
    pub sessions: SessionsDesk,
    /// The shard these figures are of, when the server has several: a
    /// `shard` label on every series.
    shard: Option<String>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics {
            values: SERIES.iter().map(|_| AtomicU64::new(0)).collect(),
            cancelled: CancelReason::ALL
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            task_run: Histogram::new(RUN_TIME_US),
            expiry_lateness: Histogram::new(SHORT_US),
            loop_iteration: Histogram::new(SHORT_US),
            sockets: std::sync::OnceLock::new(),
            health: Health::default(),
            sessions: SessionsDesk::default(),
            shard: None,
        }
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Stores the current totals. Called by the loop after each iteration;
    /// a handful of relaxed stores, no lock.
    pub fn publish(&self, stats: &Stats, edge: &EdgeStats) {
        for (value, series) in self.values.iter().zip(SERIES) {
            value.store((series.read)(stats, edge), Ordering::Relaxed);
        }
        for (value, &reason) in self.cancelled.iter().zip(CancelReason::ALL) {
            value.store(stats.cancelled(reason), Ordering::Relaxed);
        }
    }

    /// Names the server's listening sockets (`addr` they share, and for
    /// each its role and inode), so their kernel drop counts are exported.
    pub fn set_sockets(&self, addr: SocketAddr, sockets: Vec<(&'static str, u64)>) {
        let _ = self.sockets.set((addr, sockets));
    }

    /// The figures of shard `index` of a sharded server.
    pub fn for_shard(index: u32) -> Metrics {
        Metrics {
            shard: Some(index.to_string()),
            ..Metrics::default()
        }
    }

    /// Every metric in the OpenMetrics text format.
    pub fn render(self: &Arc<Metrics>) -> String {
        render_all(std::slice::from_ref(self))
    }

    /// `label` (if any) and, when sharded, this shard's.
    fn labels<'a>(&'a self, label: Option<(&'a str, &'a str)>) -> Vec<(&'a str, &'a str)> {
        label
            .into_iter()
            .chain(self.shard.as_deref().map(|s| ("shard", s)))
            .collect()
    }
}

/// The figures of every shard of a server (each series once, a sample per
/// shard), with the process-wide ones once, in the OpenMetrics text format.
pub fn render_all(shards: &[Arc<Metrics>]) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Exporter(shards.to_vec())));
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}

#[derive(Debug)]
struct Exporter(Vec<Arc<Metrics>>);

/// One sample of a counter or gauge, labelled (or not).
fn encode_value(
    family: &mut MetricEncoder,
    labels: &[(&str, &str)],
    kind: MetricType,
    value: u64,
) -> fmt::Result {
    match (labels.is_empty(), kind) {
        (false, MetricType::Counter) => family
            .encode_family(&labels)?
            .encode_counter::<NoLabelSet, _, u64>(&value, None),
        (false, _) => family.encode_family(&labels)?.encode_gauge(&value),
        (true, MetricType::Counter) => family.encode_counter::<NoLabelSet, _, u64>(&value, None),
        (true, _) => family.encode_gauge(&value),
    }
}

impl Collector for Exporter {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let shards = &self.0;
        let mut i = 0;
        while i < SERIES.len() {
            let first = &SERIES[i];
            let mut family =
                encoder.encode_descriptor(first.family, first.help, None, first.kind)?;
            let end = i + SERIES[i..]
                .iter()
                .take_while(|s| s.family == first.family)
                .count();
            for m in shards {
                for (j, series) in SERIES.iter().enumerate().take(end).skip(i) {
                    let value = m.values[j].load(Ordering::Relaxed);
                    encode_value(&mut family, &m.labels(series.label), first.kind, value)?;
                }
            }
            i = end;
        }
        let mut family = encoder.encode_descriptor(
            "tether_tasks_cancelled",
            "Cancelled tasks, by reason.",
            None,
            MetricType::Counter,
        )?;
        for m in shards {
            for (value, &reason) in m.cancelled.iter().zip(CancelReason::ALL) {
                let value = value.load(Ordering::Relaxed);
                let labels = m.labels(Some(("reason", reason.name())));
                encode_value(&mut family, &labels, MetricType::Counter, value)?;
            }
        }
        let seconds = Unit::Seconds;
        type Pick = fn(&Metrics) -> &Histogram;
        let histograms: [(&str, &str, Pick); 3] = [
            ("tether_task_run", "Time tasks spent on a worker.", |m| &m.task_run),
            (
                "tether_expiry_lateness",
                "How long after its deadline tick (the TTL since its last datagram, rounded up to a tick) each session expiry was decided.",
                |m| &m.expiry_lateness,
            ),
            ("tether_loop_iteration", "Duration of each event loop iteration.", |m| &m.loop_iteration),
        ];
        for (name, help, pick) in histograms {
            let mut family =
                encoder.encode_descriptor(name, help, Some(&seconds), MetricType::Histogram)?;
            for m in shards {
                let labels = m.labels(None);
                if labels.is_empty() {
                    pick(m).encode(family)?;
                    break;
                }
                pick(m).encode(family.encode_family(&labels)?)?;
            }
        }
        if shards.iter().any(|m| m.sockets.get().is_some()) {
            let mut family = encoder.encode_descriptor(
                "tether_receive_buffer_drops",
                "Datagrams the kernel dropped because a listening socket's receive buffer was full, by socket (members: every kind but HELLO; strangers: HELLO).",
                None,
                MetricType::Counter,
            )?;
            // The shards share one address: one read of the kernel's table.
            let table = shards
                .iter()
                .find_map(|m| m.sockets.get())
                .map(|(addr, _)| udp_sockets(addr))
                .unwrap_or_default();
            for m in shards {
                let Some((_, sockets)) = m.sockets.get() else {
                    continue;
                };
                for (role, inode) in sockets {
                    if let Some(line) = table.iter().find(|l| l.inode == *inode) {
                        let labels = m.labels(Some(("socket", role)));
                        encode_value(&mut family, &labels, MetricType::Counter, line.drops)?;
                    }
                }
            }
        }
        encoder
            .encode_descriptor(
                "tether_build",
                "The running build: tether's version.",
                None,
                MetricType::Info,
            )?
            .encode_info(&[("version", env!("CARGO_PKG_VERSION"))])?;
        encode_process(&mut encoder, &process::read())?;
        Ok(())
    }
}

/// The standard `process_*` series, each one that could be read.
fn encode_process(encoder: &mut DescriptorEncoder, p: &process::ProcessStats) -> fmt::Result {
    if let Some(cpu) = p.cpu_seconds {
        encoder
            .encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&cpu, None)?;
    }
    for (name, help, value) in [
        (
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            p.resident_bytes,
        ),
        (
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            p.virtual_bytes,
        ),
        (
            "process_open_fds",
            "Number of open file descriptors.",
            p.open_fds,
        ),
        (
            "process_max_fds",
            "Maximum number of open file descriptors.",
            p.max_fds,
        ),
    ] {
        if let Some(value) = value {
            encoder
                .encode_descriptor(name, help, None, MetricType::Gauge)?
                .encode_gauge(&value)?;
        }
    }
    if let Some(start) = p.start_time_seconds {
        encoder
            .encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&start)?;
    }
    Ok(())
}

/// One line of `/proc/net/udp` (or `udp6`): a UDP socket of this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpSocketLine {
    /// The socket's inode (as `fstat` reports it).
    pub inode: u64,
    /// Datagrams the kernel dropped for it, its receive buffer being full.
    pub drops: u64,
}

/// The UDP sockets bound to exactly `addr` (address and port), from
/// `/proc/net/udp` or `/proc/net/udp6`. Empty if the table cannot be read.
pub fn udp_sockets(addr: &SocketAddr) -> Vec<UdpSocketLine> {
    let (table, local) = match addr {
        SocketAddr::V4(a) => (
            "/proc/net/udp",
            format!(
                "{:08X}:{:04X}",
                u32::from_ne_bytes(a.ip().octets()),
                a.port()
            ),
        ),
        SocketAddr::V6(a) => {
            let o = a.ip().octets();
            let words: String = o
                .chunks(4)
                .map(|w| format!("{:08X}", u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
                .collect();
            ("/proc/net/udp6", format!("{words}:{:04X}", a.port()))
        }
    };
    let Ok(text) = std::fs::read_to_string(table) else {
        return Vec::new();
    };
    // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if *fields.get(1)? != local {
                return None;
            }
            Some(UdpSocketLine {
                inode: fields.get(9)?.parse().ok()?,
                drops: fields.last()?.parse().ok()?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_adjacent_so_each_has_one_header() {
        for (i, s) in SERIES.iter().enumerate() {
            let later = SERIES[i + 1..].iter().position(|t| t.family == s.family);
            if let Some(p) = later {
                assert!(
                    SERIES[i + 1..i + 1 + p]
                        .iter()
                        .all(|t| t.family == s.family),
                    "{} split",
                    s.family
                );
            }
        }
    }

    #[test]
    fn renders_counters_gauges_labels_and_histograms() {
        let metrics = Arc::new(Metrics::default());
        let stats = Stats {
            heartbeats: 7,
            sessions_expired: 2,
            dropped_bad_mac: 3,
            tasks_running_now: 4,
            ..Stats::default()
        };
        metrics.publish(
            &stats,
            &EdgeStats {
                sessions_live: 5,
                ..EdgeStats::default()
            },
        );
        metrics.task_run.observe_us(2_500);
        metrics.task_run.observe_us(50_000);
        metrics.expiry_lateness.observe_us(4_000);
        let text = metrics.render();
        for line in [
            "tether_heartbeats_total 7",
            "tether_sessions_live 5",
            "tether_sessions_ended_total{reason=\"expired\"} 2",
            "tether_datagrams_dropped_total{cause=\"bad_mac\"} 3",
            "tether_tasks{state=\"running\"} 4",
            "tether_task_run_seconds_bucket{le=\"0.001\"} 0",
            "tether_task_run_seconds_bucket{le=\"0.01\"} 1",
            "tether_task_run_seconds_bucket{le=\"0.1\"} 2",
            "tether_task_run_seconds_bucket{le=\"+Inf\"} 2",
            "tether_task_run_seconds_count 2",
            "tether_task_run_seconds_sum 0.0525",
            "tether_expiry_lateness_seconds_count 1",
            "# TYPE tether_sessions_ended counter",
            concat!(
                "tether_build_info{version=\"",
                env!("CARGO_PKG_VERSION"),
                "\"} 1"
            ),
            "# TYPE process_cpu_seconds counter",
            "process_open_fds ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        assert_eq!(text.matches("# TYPE tether_sessions_ended ").count(), 1);
    }
}
