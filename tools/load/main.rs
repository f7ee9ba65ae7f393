//! `tether-load`: simulates up to a million heartbeating clients from one
//! process and accounts for what the server did with them.
//!
//! ```text
//!   sender thread ── HELLO all ─ SUBMIT a long sleep (silent clients) ─ heartbeat
//!        │           every client once per --interval, phases spread evenly,
//!        │           sendmmsg over --sockets local sockets; silent clients stop
//!        ▼           at a random moment
//!   server (or the built-in raw sink, for the machine's own limit)
//!        │
//!   receiver thread ── recvmmsg over the same sockets: WELCOME, HEARTBEAT_ACK
//!                      (round trip), TASK_STATE expired (detection lateness; a
//!                      false expiry if the client was not silent), UNKNOWN_SESSION
//! ```
//!
//! It reads the server's CPU time and memory from /proc (`--pid`), and its
//! own, so a reader can tell which side saturated. Every run is bounded by
//! `--duration` plus a short drain, and only targets the address given
//! (loopback unless `--allow-remote`).

mod junk;
mod procfs;
mod report;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use mio::{Events, Interest, Poll, Token};

use tether::batch::{RecvBatch, SendBatch};
use tether::wire::{
    CancelReason, Datagram, Flags, Header, MacKey, Message, RejectCode, TaskReport, MAX_DATAGRAM,
};

use report::{histogram_svg, Json, Percentiles};

#[derive(Parser, Clone)]
#[command(
    name = "tether-load",
    version,
    about = "Load generator for tether: many heartbeating clients, with correctness accounting.",
    after_help = "Example: tether-load --server 127.0.0.1:7900 --clients 100000 --duration 60s --silent 0.01 --ack 0.01 --pid $(pgrep -n tether)"
)]
struct Args {
    /// Server address (UDP).
    #[arg(long, default_value = "127.0.0.1:7900", value_name = "ADDR")]
    server: SocketAddr,
    /// Simulated clients, 1 to 1,000,000.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    clients: usize,
    /// Each client heartbeats once per interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "D")]
    interval: Duration,
    /// TTL the clients ask for in HELLO.
    #[arg(long, default_value = "3s", value_parser = parse_duration, value_name = "D")]
    ttl: Duration,
    /// How long the heartbeat phase lasts.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "D")]
    duration: Duration,
    /// Fraction of clients that submit a long `sleep` task and then, at a
    /// random moment, stop sending.
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    silent: f64,
    /// Fraction of heartbeats that ask for HEARTBEAT_ACK (round-trip times).
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    ack: f64,
    /// Shared secret of a keyed server.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// The server's pid, to read its CPU time and memory from /proc.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// Local UDP sockets the clients are spread over.
    #[arg(long, default_value_t = 64, value_name = "N")]
    sockets: usize,
    /// Print one JSON line on stdout (the table goes to stderr).
    #[arg(long)]
    json: bool,
    /// Write an SVG histogram of detection lateness and round-trip time.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// First send the same traffic to a bare batched-receive sink inside
    /// this tool, then to the server, and compare their CPU per datagram.
    #[arg(long)]
    compare_raw: bool,
    /// Only measure the raw sink.
    #[arg(long, conflicts_with = "compare_raw")]
    raw_only: bool,
    /// Instead of a load run: count the server's wake-ups (voluntary context
    /// switches, all threads) over this long while idle. Needs --pid.
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    idle: Option<Duration>,
    /// During the measured phase, also send this many junk datagrams as
    /// fast as possible from another socket: random bytes, broken headers,
    /// bad MACs, replays of the clients' own datagrams, HEARTBEATs for
    /// unknown sessions. Checked against the server's counters with
    /// --metrics.
    #[arg(long, value_name = "N")]
    junk: Option<u64>,
    /// During the measured phase, also send HELLOs for this many new client
    /// ids as fast as possible (against --max-sessions).
    #[arg(long, value_name = "N")]
    hello_flood: Option<u64>,
    /// Datagrams a second for --junk and --hello-flood (default: as fast as
    /// the socket takes them).
    #[arg(long, value_name = "N")]
    flood_rate: Option<u64>,
    /// The server's metrics endpoint (ADDR of `tether serve --metrics ADDR`),
    /// to check its drop counters against what was sent.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Stop the server (SIGSTOP, needs --pid) this long, a third of the way
    /// into the measured phase, while the clients keep sending; then
    /// SIGCONT. Heartbeats queued in its socket meanwhile must count.
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    stall: Option<Duration>,
    /// Allow a target outside the loopback range.
    #[arg(long)]
    allow_remote: bool,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|_| "write durations like 250ms, 3s or 1h".to_owned())
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-load: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), String> {
    if !args.server.ip().is_loopback() && !args.allow_remote {
        return Err(format!(
            "{} is not a loopback address; pass --allow-remote to load a server elsewhere",
            args.server
        ));
    }
    if let Some(idle) = args.idle {
        return idle_check(args, idle);
    }
    if !(1..=1_000_000).contains(&args.clients) {
        return Err("--clients must be 1 to 1000000".into());
    }
    if !(0.0..=1.0).contains(&args.silent) || !(0.0..=1.0).contains(&args.ack) {
        return Err("--silent and --ack are fractions from 0 to 1".into());
    }
    if args.silent > 0.0 && args.duration < args.ttl + Duration::from_secs(3) {
        return Err("with --silent, --duration must exceed --ttl by at least 3s".into());
    }
    let key = match &args.key_file {
        Some(path) => Some(tether::keyfile::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let mut results = Vec::new();
    if args.compare_raw || args.raw_only {
        // The same datagrams (signed too, when keyed), so the sizes match.
        results.push(run_once(args, Target::Sink, key.clone())?);
    }
    if !args.raw_only {
        results.push(run_once(args, Target::Server, key)?);
    }
    summarize(args, &results);
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Server,
    Sink,
}

// Per-client flags, set by the sender (SILENT) and the receiver (others).
const WELCOMED: u8 = 1;
const REFUSED: u8 = 2;
const ACCEPTED: u8 = 4;
const SILENT: u8 = 8;
const DETECTED: u8 = 16;
const FALSE_EXPIRY: u8 = 32;

/// State the sender and the receiver share, one slot per client.
struct Shared {
    base_id: u64,
    incarnation: u64,
    ttl_us: u64,
    start: Instant,
    last_sent_us: Vec<AtomicU64>,
    flags: Vec<AtomicU8>,
    ack_seq: Vec<AtomicU32>,
    ack_sent_us: Vec<AtomicU64>,
    welcomed: AtomicUsize,
    refused: AtomicUsize,
    accepted: AtomicUsize,
    detected: AtomicUsize,
    false_expiries: AtomicUsize,
    counting: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }
    fn index(&self, client_id: u64) -> Option<usize> {
        let i = client_id.checked_sub(self.base_id + 1)? as usize;
        (i < self.flags.len()).then_some(i)
    }
    fn flag(&self, i: usize) -> u8 {
        self.flags[i].load(Ordering::Acquire)
    }
    /// Sets `bit`; returns whether it was newly set.
    fn set(&self, i: usize, bit: u8) -> bool {
        self.flags[i].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }
}

/// What the receiver saw.
#[derive(Default)]
struct Received {
    datagrams: u64,
    bytes: u64,
    early: u64,
    unknown_session: u64,
    lateness_ms: Vec<f64>,
    rtt_us: Vec<f64>,
}

/// The outcome of one run against one target.
struct RunResult {
    target: Target,
    clients: usize,
    phase: Duration,
    heartbeats: u64,
    send_errors: u64,
    /// Bytes the live clients sent, all run long (opening included).
    bytes_sent: u64,
    target_rate: f64,
    silent: usize,
    received: Received,
    welcomed: usize,
    refused: usize,
    detected: usize,
    false_expiries: usize,
    /// CPU the measured side (server process, or the sink thread) used
    /// during the heartbeat phase, and the datagrams it got.
    target_cpu: Option<Duration>,
    target_datagrams: u64,
    target_peak_rss_kb: Option<u64>,
    bytes_per_session: Option<f64>,
    tool_cpu: Duration,
    sender_cpu: Duration,
    /// Datagrams the kernel dropped for full receive buffers, machine-wide,
    /// during the measured phase.
    kernel_drops: Option<u64>,
    /// What the junk and HELLO floods sent and got back.
    hostile: Option<Hostile>,
}

/// The hostile side of a run: what was sent, and the server's counters
/// before and after.
struct Hostile {
    junk: Option<junk::JunkReport>,
    hellos: Option<junk::JunkReport>,
    counters: Option<(HashMap<String, f64>, HashMap<String, f64>)>,
}

fn run_once(args: &Args, target: Target, key: Option<MacKey>) -> Result<RunResult, String> {
    let sink = match target {
        Target::Sink => Some(Sink::start()?),
        Target::Server => None,
    };
    let addr = sink.as_ref().map_or(args.server, |s| s.addr);
    let nsockets = args.sockets.clamp(1, args.clients);
    let mut sockets = Vec::with_capacity(nsockets);
    for _ in 0..nsockets {
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).map_err(|e| format!("bind a local socket: {e}"))?;
        socket
            .connect(addr)
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let socket2 = socket2::SockRef::from(&socket);
        let _ = socket2.set_recv_buffer_size(4 << 20);
        let _ = socket2.set_send_buffer_size(4 << 20);
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("socket: {e}"))?;
        sockets.push(socket);
    }
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    let n = args.clients;
    let shared = Arc::new(Shared {
        // Distinct ids per run, so a rerun never meets an earlier run's
        // sessions (or stale-HELLO records) on the server.
        base_id: (now_ns & 0x0000_ffff_ffff_ffff) << 16,
        incarnation: now_ns,
        ttl_us: args.ttl.as_micros() as u64,
        start: Instant::now(),
        last_sent_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
        flags: (0..n).map(|_| AtomicU8::new(0)).collect(),
        ack_seq: (0..n).map(|_| AtomicU32::new(0)).collect(),
        ack_sent_us: (0..n).map(|_| AtomicU64::new(0)).collect(),
        welcomed: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        accepted: AtomicUsize::new(0),
        detected: AtomicUsize::new(0),
        false_expiries: AtomicUsize::new(0),
        counting: AtomicBool::new(false),
        stop: AtomicBool::new(false),
    });
    let receiver = {
        let sockets: Vec<UdpSocket> = sockets
            .iter()
            .map(|s| s.try_clone().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let shared = Arc::clone(&shared);
        let key = key.clone();
        std::thread::Builder::new()
            .name("load-rx".into())
            .spawn(move || receive(sockets, &shared, key.as_ref()))
            .map_err(|e| e.to_string())?
    };
    let pid = args.pid.map(|p| p.to_string());
    let mut sender = Sender::new(sockets, Arc::clone(&shared), key, args.ack);
    let progress = Progress::new(target);

    // Warm-up: the same schedule as the measured phase, in which a client
    // not yet welcomed sends HELLO and a silent client not yet accepted
    // sends its SUBMIT instead of a heartbeat. Opening sessions at the
    // heartbeat rate keeps every open session beating from the start.
    let mut bytes_per_session = None;
    let silent = match target {
        Target::Server => sender.choose_silent(args),
        Target::Sink => {
            for i in 0..n {
                shared.set(i, WELCOMED);
            }
            0
        }
    };
    let schedule_start = Instant::now();
    if target == Target::Server {
        let rss_before = pid
            .as_deref()
            .and_then(|p| procfs::status_field(p, "VmRSS"));
        sender.warm_up(args, schedule_start, silent, &progress)?;
        if let (Some(before), Some(after)) = (
            rss_before,
            pid.as_deref()
                .and_then(|p| procfs::status_field(p, "VmRSS")),
        ) {
            let welcomed = shared.welcomed.load(Ordering::Acquire).max(1);
            bytes_per_session =
                Some((after.saturating_sub(before) * 1024) as f64 / welcomed as f64);
        }
    }
    let silent = silent.min(shared.accepted.load(Ordering::Acquire));

    let target_cpu_of = || match (&sink, &pid) {
        (Some(sink), _) => procfs::cpu_time(&format!("self/task/{}", sink.tid())),
        (None, Some(pid)) => procfs::cpu_time(pid),
        (None, None) => None,
    };
    let target_count_of = || sink.as_ref().map(|s| s.count.load(Ordering::Acquire));
    let tool_cpu0 = procfs::cpu_time("self").unwrap_or_default();
    let sender_cpu0 = procfs::cpu_time("thread-self").unwrap_or_default();
    let cpu0 = target_cpu_of();
    let drops0 = procfs::udp_rcvbuf_errors();
    let sink_count0 = target_count_of();
    let counters_before = args.metrics.and_then(|m| junk::scrape(m).ok());
    let hostile = if target == Target::Server && (args.junk.is_some() || args.hello_flood.is_some())
    {
        let (server, key, captured) = (args.server, sender.key.clone(), sender.captured.clone());
        let (junk_count, hellos, rate) = (args.junk, args.hello_flood, args.flood_rate);
        Some(std::thread::spawn(move || {
            let junk = junk_count.map(|n| junk::flood(server, n, rate, key.as_ref(), &captured));
            let hellos = hellos.map(|n| junk::hello_flood(server, n, rate, key.as_ref()));
            (junk, hellos)
        }))
    } else {
        None
    };
    let staller = match (args.stall, &pid, target) {
        (Some(stall), Some(pid), Target::Server) => {
            let (pid, delay) = (pid.clone(), args.duration / 3);
            Some(std::thread::spawn(move || {
                std::thread::sleep(delay);
                let signal = |sig: &str| {
                    std::process::Command::new("kill")
                        .args([sig, &pid])
                        .status()
                        .is_ok_and(|s| s.success())
                };
                let stopped = signal("-STOP");
                std::thread::sleep(stall);
                stopped && signal("-CONT")
            }))
        }
        (Some(_), None, _) => return Err("--stall needs --pid".into()),
        _ => None,
    };
    shared.counting.store(true, Ordering::Release);
    let phase_start = Instant::now();
    let measure_from = phase_start - schedule_start;
    sender.start_silences(measure_from);
    let heartbeats = sender.run_schedule(
        args,
        schedule_start,
        measure_from + args.duration,
        Some(&progress),
    );
    let phase = phase_start.elapsed();
    let cpu1 = target_cpu_of();
    let kernel_drops = drops0
        .zip(procfs::udp_rcvbuf_errors())
        .map(|(a, b)| b.saturating_sub(a));
    let sink_count1 = target_count_of();
    let tool_cpu = procfs::cpu_time("self").unwrap_or_default() - tool_cpu0;
    let sender_cpu = procfs::cpu_time("thread-self").unwrap_or_default() - sender_cpu0;
    let peak_rss = match target {
        Target::Server => pid
            .as_deref()
            .and_then(|p| procfs::status_field(p, "VmHWM")),
        Target::Sink => None,
    };

    // Keep the live clients beating while the last silent ones are
    // detected, so the end of the run is not mistaken for silence.
    if silent > 0 {
        let drain = args.ttl + Duration::from_secs(2);
        let drain_start = Instant::now();
        let until = drain_start + drain;
        while Instant::now() < until && shared.detected.load(Ordering::Acquire) < silent {
            let left = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            sender.run_schedule(args, schedule_start, schedule_start.elapsed() + left, None);
        }
    }
    if let Some(staller) = staller {
        if !staller.join().unwrap_or(false) {
            return Err("could not SIGSTOP/SIGCONT the server (is --pid right?)".into());
        }
    }
    let hostile = match hostile {
        Some(thread) => {
            let (junk, hellos) = thread
                .join()
                .map_err(|_| "junk thread panicked".to_string())?;
            let junk = junk.transpose().map_err(|e| format!("junk: {e}"))?;
            let hellos = hellos
                .transpose()
                .map_err(|e| format!("hello flood: {e}"))?;
            // Let the server count the last of it before reading its counters.
            std::thread::sleep(Duration::from_millis(300));
            let after = args.metrics.and_then(|m| junk::scrape(m).ok());
            Some(Hostile {
                junk,
                hellos,
                counters: counters_before.zip(after),
            })
        }
        None => None,
    };
    shared.counting.store(false, Ordering::Release);
    shared.stop.store(true, Ordering::Release);
    let received = receiver
        .join()
        .map_err(|_| "receiver thread panicked".to_string())?;
    progress.done();
    let target_datagrams = match (sink_count0, sink_count1) {
        (Some(a), Some(b)) => b - a,
        _ => heartbeats,
    };
    Ok(RunResult {
        target,
        clients: n,
        phase,
        heartbeats,
        send_errors: sender.send_errors,
        bytes_sent: sender.bytes_sent,
        target_rate: n as f64 / args.interval.as_secs_f64(),
        silent,
        welcomed: shared.welcomed.load(Ordering::Acquire),
        refused: shared.refused.load(Ordering::Acquire),
        detected: shared.detected.load(Ordering::Acquire),
        false_expiries: shared.false_expiries.load(Ordering::Acquire),
        received,
        target_cpu: cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a)),
        target_datagrams,
        target_peak_rss_kb: peak_rss,
        bytes_per_session,
        tool_cpu,
        sender_cpu,
        kernel_drops,
        hostile,
    })
}

/// Batches datagrams per socket and sends them with `sendmmsg`.
struct Sender {
    sockets: Vec<UdpSocket>,
    pending: Vec<Vec<u8>>,
    pending_lens: Vec<Vec<usize>>,
    batch: SendBatch,
    shared: Arc<Shared>,
    key: Option<MacKey>,
    seq: Vec<u32>,
    /// When a silent client stops, after the measured phase starts.
    silent_offset_us: Vec<u64>,
    /// The same, on the schedule's clock, once the measured phase started.
    silent_at_us: Vec<u64>,
    sleep_payload: [u8; 4],
    ack_per_10k: u64,
    next_event: u64,
    send_errors: u64,
    sent: u64,
    bytes_sent: u64,
    /// HELLOs of clients that stay live, to replay as junk.
    captured: Vec<Vec<u8>>,
}

const BATCH: usize = 64;

impl Sender {
    fn new(sockets: Vec<UdpSocket>, shared: Arc<Shared>, key: Option<MacKey>, ack: f64) -> Sender {
        let n = shared.flags.len();
        let k = sockets.len();
        Sender {
            pending: vec![Vec::with_capacity(BATCH * 64); k],
            pending_lens: vec![Vec::with_capacity(BATCH); k],
            sockets,
            batch: SendBatch::new(BATCH),
            key,
            seq: vec![0; n],
            silent_offset_us: vec![u64::MAX; n],
            silent_at_us: vec![u64::MAX; n],
            sleep_payload: [0; 4],
            ack_per_10k: (ack * 10_000.0).round() as u64,
            next_event: 0,
            send_errors: 0,
            sent: 0,
            bytes_sent: 0,
            captured: Vec::new(),
            shared,
        }
    }

    fn queue(&mut self, i: usize, flags: Flags, message: Message<'_>) {
        self.seq[i] += 1;
        let d = Datagram {
            header: Header {
                flags,
                client_id: self.shared.base_id + i as u64 + 1,
                incarnation: self.shared.incarnation,
                seq: self.seq[i],
            },
            message,
        };
        let s = i % self.sockets.len();
        let buf = &mut self.pending[s];
        let start = buf.len();
        buf.resize(start + MAX_DATAGRAM, 0);
        let n = d
            .emit(self.key.as_ref(), &mut buf[start..])
            .expect("load datagrams are small");
        buf.truncate(start + n);
        if matches!(message, Message::Hello { .. })
            && self.captured.len() < 1000
            && self.silent_offset_us[i] == u64::MAX
        {
            self.captured.push(buf[start..].to_vec());
        }
        self.pending_lens[s].push(n);
        let now = self.shared.now_us();
        self.shared.last_sent_us[i].store(now, Ordering::Release);
        if flags.contains(Flags::ACK) {
            self.shared.ack_seq[i].store(self.seq[i], Ordering::Release);
            self.shared.ack_sent_us[i].store(now, Ordering::Release);
        }
        if self.pending_lens[s].len() >= BATCH {
            self.flush_socket(s);
        }
    }

    fn flush_socket(&mut self, s: usize) {
        let mut offsets = Vec::with_capacity(self.pending_lens[s].len());
        let mut at = 0;
        for &len in &self.pending_lens[s] {
            offsets.push(&self.pending[s][at..at + len]);
            at += len;
        }
        let mut done = 0;
        let mut stalls = 0;
        while done < offsets.len() {
            match self.batch.send(&self.sockets[s], &offsets[done..]) {
                Ok(n) => {
                    self.bytes_sent += offsets[done..done + n]
                        .iter()
                        .map(|d| d.len() as u64)
                        .sum::<u64>();
                    done += n;
                    self.sent += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && stalls < 100 => {
                    // The socket's send buffer is full: back off briefly.
                    stalls += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => {
                    self.send_errors += (offsets.len() - done) as u64;
                    break;
                }
            }
        }
        self.pending[s].clear();
        self.pending_lens[s].clear();
    }

    fn flush(&mut self) {
        for s in 0..self.sockets.len() {
            if !self.pending_lens[s].is_empty() {
                self.flush_socket(s);
            }
        }
    }

    /// Picks the silent clients and when, after the measured phase starts,
    /// each goes quiet: between 10% of the run and a TTL + 2 s before its
    /// end, so every detection falls inside the run. Returns how many.
    fn choose_silent(&mut self, args: &Args) -> usize {
        if args.silent <= 0.0 {
            return 0;
        }
        let per_million = (args.silent * 1_000_000.0).round() as u64;
        let run_us = args.duration.as_micros() as u64;
        let lo = run_us / 10;
        let hi = run_us
            .saturating_sub(self.shared.ttl_us + 2_000_000)
            .max(lo + 1);
        let sleep_ms = (args.duration + args.ttl + Duration::from_secs(120)).as_millis();
        self.sleep_payload = (sleep_ms.min(u128::from(u32::MAX)) as u32).to_be_bytes();
        let mut chosen = 0;
        for i in 0..self.seq.len() {
            if mix(i as u64) % 1_000_000 < per_million {
                self.silent_offset_us[i] = lo + mix(i as u64 ^ 0x5eed) % (hi - lo);
                chosen += 1;
            }
        }
        chosen
    }

    /// Runs the schedule until every client is welcomed (or refused) and
    /// every silent client's task accepted, for at least one interval and
    /// at most ten.
    fn warm_up(
        &mut self,
        args: &Args,
        schedule_start: Instant,
        silent: usize,
        progress: &Progress,
    ) -> Result<(), String> {
        let n = self.seq.len();
        let interval = args.interval;
        loop {
            let elapsed = schedule_start.elapsed();
            self.run_schedule(
                args,
                schedule_start,
                elapsed + Duration::from_millis(100),
                None,
            );
            let welcomed = self.shared.welcomed.load(Ordering::Acquire);
            let answered = welcomed + self.shared.refused.load(Ordering::Acquire);
            let accepted = self.shared.accepted.load(Ordering::Acquire);
            progress.opening(welcomed, n);
            let elapsed = schedule_start.elapsed();
            if elapsed >= interval && answered >= n && accepted >= silent {
                return Ok(());
            }
            if elapsed >= 10 * interval {
                if welcomed == 0 {
                    return Err(format!(
                        "no WELCOME from {} in ten intervals of HELLO: is `tether serve` running there (and is the key right)?",
                        args.server
                    ));
                }
                // Silent clients whose task was never accepted cannot be
                // detected; they heartbeat like the rest.
                for i in 0..n {
                    if self.shared.flag(i) & ACCEPTED == 0 {
                        self.silent_offset_us[i] = u64::MAX;
                    }
                }
                return Ok(());
            }
        }
    }

    /// Makes the silence times absolute, now that the measured phase starts
    /// `measure_from` after the schedule's start.
    fn start_silences(&mut self, measure_from: Duration) {
        let from_us = measure_from.as_micros() as u64;
        for (at, &offset) in self.silent_at_us.iter_mut().zip(&self.silent_offset_us) {
            if offset != u64::MAX {
                *at = from_us + offset;
            }
        }
    }

    /// Every client once per interval, client `i` at offset `i / n` of the
    /// interval, until `until` after `schedule_start`: a HELLO while it is
    /// not welcomed, its SUBMIT while a silent client's task is not yet
    /// accepted, else a heartbeat until its silence begins. Returns the
    /// datagrams sent.
    fn run_schedule(
        &mut self,
        args: &Args,
        schedule_start: Instant,
        until: Duration,
        progress: Option<&Progress>,
    ) -> u64 {
        let n = self.seq.len() as u64;
        let interval_us = args.interval.as_micros() as u64;
        let until_us = until.as_micros() as u64;
        let ttl_ms = args.ttl.as_millis().min(u128::from(u32::MAX)) as u32;
        let sent_before = self.sent;
        let measured_from_us = schedule_start.elapsed().as_micros() as u64;
        let mut last_progress = Instant::now();
        let due_at =
            |event: u64| (u128::from(event) * u128::from(interval_us) / u128::from(n)) as u64;
        loop {
            let now_us = schedule_start.elapsed().as_micros() as u64;
            if now_us >= until_us {
                break;
            }
            let mut work = 0;
            while work < 4096 && due_at(self.next_event) <= now_us {
                let due_us = due_at(self.next_event);
                let i = (self.next_event % n) as usize;
                self.next_event += 1;
                work += 1;
                let flags = self.shared.flag(i);
                if flags & REFUSED != 0 {
                    continue;
                }
                if flags & WELCOMED == 0 {
                    self.queue(
                        i,
                        Flags::empty(),
                        Message::Hello {
                            ttl_ms,
                            name: "load",
                        },
                    );
                } else if self.silent_offset_us[i] != u64::MAX && flags & ACCEPTED == 0 {
                    let payload = self.sleep_payload;
                    let submit = Message::Submit {
                        request_id: 1,
                        delay_ms: 0,
                        deadline_ms: 0,
                        job: "sleep",
                        payload: &payload,
                    };
                    self.queue(i, Flags::empty(), submit);
                } else if due_us >= self.silent_at_us[i] {
                    self.shared.set(i, SILENT);
                } else {
                    let ack = mix(self.next_event) % 10_000 < self.ack_per_10k;
                    let flags = if ack { Flags::ACK } else { Flags::empty() };
                    self.queue(i, flags, Message::Heartbeat);
                }
            }
            self.flush();
            if let Some(progress) = progress {
                if last_progress.elapsed() >= Duration::from_secs(1) {
                    last_progress = Instant::now();
                    let done_us = now_us - measured_from_us;
                    let span_us = until_us - measured_from_us;
                    progress.beating(&self.shared, done_us, span_us, self.sent - sent_before);
                }
            }
            if work < 4096 {
                let wait = due_at(self.next_event)
                    .saturating_sub(schedule_start.elapsed().as_micros() as u64);
                std::thread::sleep(Duration::from_micros(wait.clamp(50, 1000)));
            }
        }
        self.sent - sent_before
    }
}

/// A 64-bit mixer (splitmix64's finaliser) for cheap, reproducible choices.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn receive(sockets: Vec<UdpSocket>, shared: &Shared, key: Option<&MacKey>) -> Received {
    let mut out = Received::default();
    let Ok(mut poll) = Poll::new() else {
        return out;
    };
    let mut sockets: Vec<mio::net::UdpSocket> = sockets
        .into_iter()
        .map(mio::net::UdpSocket::from_std)
        .collect();
    for (i, s) in sockets.iter_mut().enumerate() {
        let _ = poll.registry().register(s, Token(i), Interest::READABLE);
    }
    let mut events = Events::with_capacity(256);
    let mut batch = RecvBatch::new(64, MAX_DATAGRAM + 1);
    // Edge-triggered: a socket that signalled is read until empty.
    let mut ready: Vec<usize> = (0..sockets.len()).collect();
    while !shared.stop.load(Ordering::Acquire) {
        while let Some(s) = ready.pop() {
            loop {
                let n = match batch.recv(&sockets[s], false) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let now_us = shared.now_us();
                for d in 0..n {
                    let (bytes, _) = batch.get(d);
                    out.datagrams += 1;
                    out.bytes += bytes.len() as u64;
                    if let Ok(datagram) = Datagram::decode(bytes, key) {
                        account(shared, &datagram, now_us, &mut out);
                    }
                }
            }
        }
        if poll
            .poll(&mut events, Some(Duration::from_millis(50)))
            .is_ok()
        {
            ready.extend(events.iter().map(|e| e.token().0));
        }
    }
    out
}

fn account(shared: &Shared, d: &Datagram<'_>, now_us: u64, out: &mut Received) {
    let Some(i) = shared.index(d.header.client_id) else {
        return;
    };
    let counting = shared.counting.load(Ordering::Acquire);
    let count_once = |bit: u8, counter: &AtomicUsize| {
        if shared.set(i, bit) {
            counter.fetch_add(1, Ordering::AcqRel);
        }
    };
    match d.message {
        Message::Welcome { .. } => count_once(WELCOMED, &shared.welcomed),
        Message::Rejected {
            request_id: 0,
            code: RejectCode::TooManySessions | RejectCode::ShuttingDown,
            ..
        } => count_once(REFUSED, &shared.refused),
        Message::Accepted { .. } => count_once(ACCEPTED, &shared.accepted),
        Message::HeartbeatAck { acked_seq }
            if shared.ack_seq[i].load(Ordering::Acquire) == acked_seq =>
        {
            let sent = shared.ack_sent_us[i].load(Ordering::Acquire);
            out.rtt_us.push(now_us.saturating_sub(sent) as f64);
        }
        Message::TaskState {
            report: TaskReport::Cancelled(CancelReason::Expired),
            ..
        } => {
            if shared.flag(i) & SILENT != 0 {
                if shared.set(i, DETECTED) {
                    shared.detected.fetch_add(1, Ordering::AcqRel);
                    let last = shared.last_sent_us[i].load(Ordering::Acquire);
                    let lateness_us = now_us as i64 - last as i64 - shared.ttl_us as i64;
                    if lateness_us < 0 {
                        out.early += 1;
                    }
                    out.lateness_ms.push(lateness_us as f64 / 1000.0);
                }
            } else if counting && shared.set(i, FALSE_EXPIRY) {
                shared.false_expiries.fetch_add(1, Ordering::AcqRel);
            }
        }
        Message::UnknownSession => {
            out.unknown_session += 1;
            let silent = shared.flag(i) & SILENT != 0;
            if counting && !silent && shared.set(i, FALSE_EXPIRY) {
                shared.false_expiries.fetch_add(1, Ordering::AcqRel);
            }
        }
        _ => {}
    }
}

/// The machine's own limit: a thread that only receives, in batches,
/// blocking until at least one datagram is there, and counts.
struct Sink {
    addr: SocketAddr,
    count: Arc<AtomicU64>,
    tid: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    fn start() -> Result<Sink, String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let addr = socket.local_addr().map_err(|e| e.to_string())?;
        let count = Arc::new(AtomicU64::new(0));
        let tid = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (count, tid, stop) = (Arc::clone(&count), Arc::clone(&tid), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("raw-sink".into())
                .spawn(move || {
                    tid.store(procfs::thread_id(), Ordering::Release);
                    let mut batch = RecvBatch::new(64, MAX_DATAGRAM + 1);
                    while !stop.load(Ordering::Acquire) {
                        if let Ok(n) = batch.recv(&socket, true) {
                            count.fetch_add(n as u64, Ordering::AcqRel);
                        }
                    }
                })
                .map_err(|e| e.to_string())?
        };
        while tid.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        Ok(Sink {
            addr,
            count,
            tid,
            stop,
            thread: Some(thread),
        })
    }

    fn tid(&self) -> u64 {
        self.tid.load(Ordering::Acquire)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A one-line progress display on stderr (rewritten in place on a
/// terminal, a line every few seconds otherwise).
struct Progress {
    tty: bool,
    label: &'static str,
    last: std::cell::Cell<Option<Instant>>,
}

impl Progress {
    fn new(target: Target) -> Progress {
        Progress {
            tty: std::io::stderr().is_terminal(),
            label: match target {
                Target::Server => "server",
                Target::Sink => "raw sink",
            },
            last: std::cell::Cell::new(None),
        }
    }

    fn show(&self, line: &str) {
        if self.tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            let due = self
                .last
                .get()
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(5));
            if due {
                self.last.set(Some(Instant::now()));
                eprintln!("{line}");
            }
        }
    }

    fn opening(&self, welcomed: usize, n: usize) {
        self.show(&format!(
            "[{}] opening sessions: {welcomed}/{n} welcomed",
            self.label
        ));
    }

    fn beating(&self, shared: &Shared, now_us: u64, until_us: u64, sent: u64) {
        let secs = now_us as f64 / 1e6;
        let bar_width = 30;
        let filled = ((now_us as f64 / until_us as f64) * bar_width as f64) as usize;
        self.show(&format!(
            "[{}] [{}{}] {:>5.1}s/{:.0}s  {:>9.0} hb/s  false expiries {}  silent detected {}",
            self.label,
            "#".repeat(filled.min(bar_width)),
            " ".repeat(bar_width - filled.min(bar_width)),
            secs,
            until_us as f64 / 1e6,
            sent as f64 / secs.max(1e-3),
            shared.false_expiries.load(Ordering::Acquire),
            shared.detected.load(Ordering::Acquire),
        ));
    }

    fn done(&self) {
        if self.tty {
            eprint!("\r\x1b[2K");
        }
    }
}

fn idle_check(args: &Args, window: Duration) -> Result<(), String> {
    let pid = args
        .pid
        .ok_or("--idle needs --pid: the server's process id")?
        .to_string();
    let before = procfs::voluntary_switches(&pid).ok_or(format!("no process {pid} in /proc"))?;
    std::thread::sleep(window);
    let after = procfs::voluntary_switches(&pid).ok_or(format!("process {pid} went away"))?;
    let wakeups = after - before;
    if args.json {
        let mut j = Json::default();
        j.num("idle_seconds", window.as_secs_f64())
            .num("wakeups", wakeups);
        println!("{}", j.finish());
    } else {
        println!(
            "server {pid}: {wakeups} voluntary context switches (all threads) in {:.1} s idle",
            window.as_secs_f64()
        );
    }
    Ok(())
}

fn cpu_per_datagram_us(r: &RunResult) -> Option<f64> {
    let cpu = r.target_cpu?;
    (r.target_datagrams > 0).then(|| cpu.as_secs_f64() * 1e6 / r.target_datagrams as f64)
}

/// The causes the junk flood sends, as the server's drop counter labels.
const CAUSES: [&str; 5] = [
    "malformed",
    "too_large",
    "bad_mac",
    "replay",
    "unknown_session",
];

/// How much a server counter grew between two scrapes.
fn counter_delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> u64 {
    let value = |scrape: &HashMap<String, f64>| scrape.get(series).copied().unwrap_or(0.0);
    (value(after) - value(before)).max(0.0) as u64
}

fn describe_hostile(h: &Hostile, text: &mut String, json: &mut Json) {
    use std::fmt::Write as _;
    if let Some(junk) = &h.junk {
        let total: u64 = junk.sent.values().sum();
        let rate = total as f64 / junk.elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(
            text,
            "  junk sent               {total:>12}   ({rate:.0}/s; {} bytes)",
            junk.bytes_sent
        );
        let unanswerable = junk
            .replies
            .iter()
            .filter(|(k, _)| **k != "unknown_session")
            .map(|(_, v)| v)
            .sum::<u64>();
        let _ = writeln!(
            text,
            "  junk answered           {:>12}   UNKNOWN_SESSION of {} sent; {unanswerable} replies to malformed, bad-MAC or replayed (must be 0)",
            junk.replies("unknown_session"),
            junk.sent("unknown_session")
        );
        let ratio = junk.bytes_received as f64 / junk.bytes_sent.max(1) as f64;
        let _ = writeln!(
            text,
            "  amplification           {ratio:>12.3}   (bytes the server sent back / bytes of junk; must be <= 1)"
        );
        json.num("junk_sent", total)
            .float("junk_rate", rate)
            .num("junk_bytes_sent", junk.bytes_sent)
            .num("junk_bytes_received", junk.bytes_received)
            .num(
                "junk_replies_unknown_session",
                junk.replies("unknown_session"),
            )
            .num("junk_replies_other", unanswerable)
            .float("amplification", ratio);
        if let Some((before, after)) = &h.counters {
            let delta = |series: &str| counter_delta(before, after, series);
            // Datagrams the kernel dropped at the server's socket never
            // reached it; they are the only allowed difference.
            let kernel_drops = delta("tether_receive_buffer_drops_total");
            let mut each_within = true;
            let mut missing = 0;
            for cause in CAUSES {
                let counted = delta(&format!(
                    "tether_datagrams_dropped_total{{cause=\"{cause}\"}}"
                ));
                let sent = junk.sent(cause);
                each_within &= counted <= sent;
                missing += sent.saturating_sub(counted);
                let verdict = if counted == sent {
                    "(equal)"
                } else if counted < sent {
                    "(fewer: see kernel drops)"
                } else {
                    "(MORE than sent)"
                };
                let _ = writeln!(
                    text,
                    "  server counted {cause:<16} {counted:>10}   of {sent} sent {verdict}"
                );
                json.num(&format!("sent_{cause}"), sent)
                    .num(&format!("counted_{cause}"), counted);
            }
            let accounted = each_within && missing <= kernel_drops;
            let _ = writeln!(
                text,
                "  kernel drops at server  {kernel_drops:>12}   ({missing} junk datagrams never reached it; every one that did was counted under its cause: {accounted})"
            );
            json.num("junk_missing", missing)
                .num("counters_match", accounted);
        } else {
            let _ = writeln!(text, "  server counters         not read (pass --metrics ADDR of the server's --metrics)");
        }
    }
    if let Some(hellos) = &h.hellos {
        let rejected = hellos.replies("rejected");
        let welcomed = hellos.replies("welcome");
        let _ = writeln!(
            text,
            "  hello flood             {:>12}   sent; {welcomed} welcomed, {rejected} rejected (too many sessions)",
            hellos.sent("hello")
        );
        let ratio = hellos.bytes_received as f64 / hellos.bytes_sent.max(1) as f64;
        let rate = hellos.sent("hello") as f64 / hellos.elapsed.as_secs_f64().max(1e-9);
        let _ = writeln!(
            text,
            "  hello flood rate        {rate:>12.0}/s  amplification {ratio:.3} (bytes back / bytes of HELLO; 1.091 if every one is answered)"
        );
        json.num("hellos_sent", hellos.sent("hello"))
            .float("hellos_rate", rate)
            .num("hellos_welcomed", welcomed)
            .num("hellos_rejected", rejected)
            .num("hellos_bytes_sent", hellos.bytes_sent)
            .num("hellos_bytes_received", hellos.bytes_received)
            .float("hellos_amplification", ratio);
        if let Some((before, after)) = &h.counters {
            let delta = |series: &str| counter_delta(before, after, series);
            let refused = delta("tether_sessions_refused_total");
            let shed = delta("tether_replies_withheld_total{reason=\"backlog\"}");
            let unpaid = delta("tether_replies_withheld_total{reason=\"amplification\"}");
            let kernel_drops = delta("tether_receive_buffer_drops_total");
            let _ = writeln!(
                text,
                "  server refused          {refused:>12}   HELLOs past --max-sessions; answers not sent: {shed} while flooded, {unpaid} unpaid (amplification limit); {kernel_drops} datagrams dropped by the kernel at its socket"
            );
            json.num("server_refused", refused)
                .num("server_replies_shed", shed)
                .num("server_replies_unpaid", unpaid);
        }
    }
    if let Some((before, after)) = &h.counters {
        let drops = counter_delta(before, after, "tether_receive_buffer_drops_total");
        json.num("server_kernel_drops", drops);
    }
}

fn summarize(args: &Args, results: &[RunResult]) {
    let mut text = String::new();
    use std::fmt::Write as _;
    let mut lateness = Vec::new();
    let mut rtt = Vec::new();
    let mut json = Json::default();
    json.num("clients", args.clients)
        .num("interval_ms", args.interval.as_millis())
        .num("ttl_ms", args.ttl.as_millis())
        .num("duration_s", args.duration.as_secs_f64())
        .num("keyed", args.key_file.is_some());
    for r in results {
        let mut j_hostile = Json::default();
        let name = match r.target {
            Target::Server => "server",
            Target::Sink => "raw_sink",
        };
        let rate = r.heartbeats as f64 / r.phase.as_secs_f64();
        let phase_s = r.phase.as_secs_f64();
        let tool_pct = r.tool_cpu.as_secs_f64() / phase_s * 100.0;
        let sender_pct = r.sender_cpu.as_secs_f64() / phase_s * 100.0;
        let target_pct = r.target_cpu.map(|c| c.as_secs_f64() / phase_s * 100.0);
        let per_dgram = cpu_per_datagram_us(r);
        let mut late = r.received.lateness_ms.clone();
        let late_p = Percentiles::of(&mut late);
        let mut rt = r.received.rtt_us.clone();
        let rtt_p = Percentiles::of(&mut rt);
        let bottleneck = if rate >= 0.98 * r.target_rate {
            "none: the target rate was reached"
        } else if sender_pct >= 90.0 {
            "the load tool's sender thread (one core) saturated first"
        } else if target_pct.is_some_and(|p| p >= 90.0) {
            "the measured side saturated first"
        } else {
            "unclear: neither side used a full core; see send errors"
        };
        let _ = writeln!(
            text,
            "== {} ({} clients, every {:?}, TTL {:?})",
            name.replace('_', " "),
            r.clients,
            args.interval,
            args.ttl
        );
        let _ = writeln!(
            text,
            "  heartbeats sent         {:>12}   ({rate:.0}/s of {:.0}/s target; {} send errors)",
            r.heartbeats, r.target_rate, r.send_errors
        );
        if r.target == Target::Server {
            let _ = writeln!(
                text,
                "  sessions opened         {:>12}   ({} refused)",
                r.welcomed, r.refused
            );
            let _ = writeln!(text, "  false expiries          {:>12}", r.false_expiries);
            let _ = writeln!(text, "  early expiries          {:>12}", r.received.early);
            let _ = writeln!(
                text,
                "  silent detected         {:>12}   of {} ({} never reported)",
                r.detected,
                r.silent,
                r.silent.saturating_sub(r.detected)
            );
            let _ = writeln!(text, "  detection lateness ms   p50 {:.2}  p99 {:.2}  max {:.2}   (arrival - last send - TTL)", late_p.p50, late_p.p99, late_p.max);
            let _ = writeln!(
                text,
                "  round trip us           p50 {:.0}  p99 {:.0}   ({} acks)",
                rtt_p.p50, rtt_p.p99, rtt_p.count
            );
            let _ = writeln!(
                text,
                "  replies received        {:>12}   ({} bytes, {:.3} of the {} bytes sent; {} UNKNOWN_SESSION)",
                r.received.datagrams,
                r.received.bytes,
                r.received.bytes as f64 / r.bytes_sent.max(1) as f64,
                r.bytes_sent,
                r.received.unknown_session
            );
        } else {
            let _ = writeln!(text, "  datagrams received      {:>12}", r.target_datagrams);
        }
        match (target_pct, per_dgram) {
            (Some(pct), Some(us)) => {
                let _ = writeln!(
                    text,
                    "  {} CPU              {:>11.1}%   ({us:.3} us per datagram)",
                    if r.target == Target::Server {
                        "server"
                    } else {
                        "sink  "
                    },
                    pct
                );
            }
            _ => {
                let _ = writeln!(text, "  server CPU              unknown (pass --pid)");
            }
        }
        if let Some(kb) = r.target_peak_rss_kb {
            let _ = writeln!(text, "  server peak RSS         {:>9} kB", kb);
        }
        if let Some(b) = r.bytes_per_session {
            let _ = writeln!(
                text,
                "  server memory/session   {:>12.1} bytes   (RSS growth while opening / sessions)",
                b
            );
        }
        let includes = match r.target {
            Target::Sink => ", and the sink thread",
            Target::Server => "",
        };
        let _ = writeln!(
            text,
            "  load tool CPU           {tool_pct:>11.1}%   (sender thread {sender_pct:.1}%{includes})"
        );
        if let Some(drops) = r.kernel_drops {
            let _ = writeln!(
                text,
                "  kernel drops            {drops:>12}   (UDP receive buffers full, whole machine)"
            );
        }
        let _ = writeln!(text, "  bottleneck              {bottleneck}");
        if let Some(h) = &r.hostile {
            describe_hostile(h, &mut text, &mut j_hostile);
        }
        let mut j = Json::default();
        j.num("heartbeats", r.heartbeats)
            .float("rate", rate)
            .float("target_rate", r.target_rate)
            .num("send_errors", r.send_errors)
            .float("tool_cpu_pct", tool_pct)
            .float("sender_cpu_pct", sender_pct)
            .str("bottleneck", bottleneck);
        if let Some(drops) = r.kernel_drops {
            j.num("kernel_rcvbuf_drops", drops);
        }
        if let Some(p) = target_pct {
            j.float("cpu_pct", p);
        }
        if let Some(us) = per_dgram {
            j.float("cpu_us_per_datagram", us);
        }
        if r.target == Target::Server {
            j.num("sessions", r.welcomed)
                .num("refused", r.refused)
                .num("false_expiries", r.false_expiries)
                .num("early_expiries", r.received.early)
                .num("silent", r.silent)
                .num("silent_detected", r.detected)
                .num("silent_missed", r.silent.saturating_sub(r.detected))
                .raw("lateness_ms", &late_p.json())
                .raw("rtt_us", &rtt_p.json())
                .num("replies", r.received.datagrams)
                .num("reply_bytes", r.received.bytes)
                .num("bytes_sent", r.bytes_sent)
                .float(
                    "amplification",
                    r.received.bytes as f64 / r.bytes_sent.max(1) as f64,
                );
            if let Some(kb) = r.target_peak_rss_kb {
                j.num("peak_rss_kb", kb);
            }
            if let Some(b) = r.bytes_per_session {
                j.float("bytes_per_session", b);
            }
            lateness.extend_from_slice(&r.received.lateness_ms);
            rtt.extend_from_slice(&r.received.rtt_us);
        }
        if r.hostile.is_some() {
            j.raw("hostile", &j_hostile.finish());
        }
        json.raw(name, &j.finish());
    }
    if let [sink, server] = results {
        if let (Some(a), Some(b)) = (cpu_per_datagram_us(sink), cpu_per_datagram_us(server)) {
            let _ = writeln!(
                text,
                "== CPU per datagram: server {b:.3} us, raw sink {a:.3} us: ratio {:.2}x",
                b / a
            );
            json.float("cpu_ratio_server_to_sink", b / a);
        }
    }
    if let Some(path) = &args.plot {
        let svg = histogram_svg(&[
            ("detection lateness", "ms past the TTL", &lateness),
            ("heartbeat round trip", "microseconds", &rtt),
        ]);
        match std::fs::write(path, svg) {
            Ok(()) => {
                let _ = writeln!(text, "plot written to {}", path.display());
            }
            Err(e) => {
                let _ = writeln!(text, "could not write {}: {e}", path.display());
            }
        }
    }
    if args.json {
        eprint!("{text}");
        println!("{}", json.finish());
    } else {
        print!("{text}");
    }
}
