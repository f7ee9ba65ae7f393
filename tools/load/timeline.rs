//! With `--herd`, a line a second on stderr and in the JSON: sessions
//! welcomed, false and explained expiries, and the datagrams the kernel
//! dropped at each of the server's sockets and elsewhere (the tool's own),
//! counted from the first HELLO.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::junk;
use crate::procfs;
use crate::report::Json;
use crate::shared::Shared;

/// One second's reading, every count since the start.
pub struct Sample {
    pub t_s: f64,
    pub welcomed: usize,
    pub false_expiries: usize,
    pub explained: usize,
    /// Drops at each of the server's sockets, by its name for them
    /// (members, strangers) or, without `--metrics`, by inode.
    pub server_drops: Vec<(String, u64)>,
    /// Drops elsewhere on the machine: the tool's own sockets, in a run
    /// nothing else shares.
    pub other_drops: Option<u64>,
}

impl Sample {
    pub fn json(&self) -> String {
        let mut drops = Json::default();
        for (name, n) in &self.server_drops {
            drops.num(name, *n);
        }
        let mut j = Json::default();
        j.float("t_s", self.t_s)
            .num("welcomed", self.welcomed)
            .num("false_expiries", self.false_expiries)
            .num("explained_expiries", self.explained)
            .raw("server_drops", &drops.finish());
        if let Some(n) = self.other_drops {
            j.num("other_drops", n);
        }
        j.finish()
    }
}

pub struct Timeline {
    handle: JoinHandle<Vec<Sample>>,
    stop: Arc<AtomicBool>,
}

/// Drops per server socket: from the server's metrics when they name its
/// sockets, else from /proc/net/udp for the address (by inode).
fn server_drops(server: SocketAddr, metrics: Option<SocketAddr>) -> Vec<(String, u64)> {
    if let Some(scrape) = metrics.and_then(|m| junk::scrape(m).ok()) {
        let prefix = "tether_receive_buffer_drops_total{";
        let mut named: Vec<(String, u64)> = scrape
            .iter()
            .filter_map(|(k, v)| {
                let labels = k.strip_prefix(prefix)?.strip_suffix('}')?;
                let label = |key: &str| {
                    labels
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix("=\"")?.strip_suffix('"'))
                };
                let socket = label("socket")?;
                let name = match label("shard") {
                    Some(shard) => format!("{socket} {shard}"),
                    None => socket.to_owned(),
                };
                Some((name, *v as u64))
            })
            .collect();
        named.sort();
        if !named.is_empty() {
            return named;
        }
    }
    let mut lines = tether::metrics::udp_sockets(&server);
    lines.sort_by_key(|l| l.inode);
    lines
        .iter()
        .map(|l| (format!("inode {}", l.inode), l.drops))
        .collect()
}

/// Starts sampling each second from `start` until [`Timeline::finish`].
pub fn spawn(
    shared: Arc<Shared>,
    server: SocketAddr,
    metrics: Option<SocketAddr>,
    start: Instant,
) -> Timeline {
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::clone(&stop);
    let handle = std::thread::spawn(move || {
        let base_server = server_drops(server, metrics);
        let base_all = procfs::udp_rcvbuf_errors();
        let total = shared.flags.len();
        let mut samples: Vec<Sample> = Vec::new();
        for second in 1u64.. {
            let at = start + Duration::from_secs(second);
            while Instant::now() < at {
                if stopping.load(Ordering::Acquire) {
                    return samples;
                }
                std::thread::sleep(Duration::from_millis(20).min(at - Instant::now()));
            }
            let now = server_drops(server, metrics);
            let server_drops: Vec<(String, u64)> = now
                .iter()
                .map(|(name, n)| {
                    let before = base_server
                        .iter()
                        .find(|(b, _)| b == name)
                        .map_or(0, |b| b.1);
                    (name.clone(), n.saturating_sub(before))
                })
                .collect();
            let at_server: u64 = server_drops.iter().map(|d| d.1).sum();
            let other_drops = base_all
                .zip(procfs::udp_rcvbuf_errors())
                .map(|(a, b)| b.saturating_sub(a).saturating_sub(at_server));
            let sample = Sample {
                t_s: second as f64,
                welcomed: shared.welcomed.load(Ordering::Acquire),
                false_expiries: shared.false_expiries.load(Ordering::Acquire),
                explained: shared.explained_expiries.load(Ordering::Acquire),
                server_drops,
                other_drops,
            };
            let previous = samples.last().map_or(0, |s| s.welcomed);
            let drops: Vec<String> = sample
                .server_drops
                .iter()
                .map(|(name, n)| format!("{name} {n}"))
                .collect();
            eprintln!(
                "[herd] {:>4}s  welcomed {:>8}/{total} (+{:>7})  false {}  explained {}  server drops: {}  elsewhere {}",
                second,
                sample.welcomed,
                sample.welcomed - previous,
                sample.false_expiries,
                sample.explained,
                if drops.is_empty() { "-".to_owned() } else { drops.join(", ") },
                sample.other_drops.map_or("-".to_owned(), |n| n.to_string()),
            );
            samples.push(sample);
        }
        samples
    });
    Timeline { handle, stop }
}

impl Timeline {
    pub fn finish(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Release);
        self.handle.join().unwrap_or_default()
    }
}
