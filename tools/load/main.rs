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

mod args;
mod cluster;
mod junk;
mod outbox;
mod procfs;
mod progress;
mod receiver;
mod report;
mod sender;
mod shared;
mod sink;
mod summary;
mod timeline;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clap::Parser;

use tether::wire::MacKey;

use args::{Args, Target};
use junk::JunkReport;
use progress::Progress;
use report::Json;
use sender::Sender;
use shared::{Shared, ACCEPTED, ANSWERED, CHECKED, DETECTED, FALSE_EXPIRY, SILENT, WELCOMED};
use sink::Sink;
use summary::{summarize, FinalCheck, Hostile, RunResult};

fn main() -> ExitCode {
    let mut args = Args::parse();
    if args.shards.is_none() {
        args.shards = args.metrics.and_then(detect_shards);
        if args.shards.is_none() && args.idle.is_none() && args.servers.is_empty() {
            eprintln!(
                "tether-load: assuming an unsharded server (no --shards, and no --metrics to read it from): against `tether serve --shards N`, pass --shards N or the GSO runs will mix shards"
            );
        }
    }
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tether-load: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The server's shard count, from the `shard` labels of its metrics.
fn detect_shards(metrics: std::net::SocketAddr) -> Option<u32> {
    let scrape = junk::scrape(metrics).ok()?;
    let shards = scrape
        .keys()
        .filter(|k| k.starts_with("tether_sessions_live{") && k.contains("shard=\""))
        .count();
    Some(shards.max(1) as u32)
}

fn run(args: &Args) -> Result<(), String> {
    if !args.servers.is_empty() {
        return run_cluster(args);
    }
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
    if !(0.0..1.0).contains(&args.loss) {
        return Err("--loss is a fraction from 0 up to (not including) 1".into());
    }
    if !(0.0..=1.0).contains(&args.final_check_share()) {
        return Err("--final-check is a fraction from 0 to 1".into());
    }
    if args.herd && (args.compare_raw || args.raw_only) {
        return Err("--herd measures a server's opening; drop --compare-raw/--raw-only".into());
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

/// `--servers`: the multi-host scenario (see `cluster.rs`), which takes
/// only the flags that mean something there.
fn run_cluster(args: &Args) -> Result<(), String> {
    if let Some(remote) = args
        .servers
        .iter()
        .find(|s| !s.ip().is_loopback() && !args.allow_remote)
    {
        return Err(format!(
            "{remote} is not a loopback address; pass --allow-remote to load servers elsewhere"
        ));
    }
    let unsupported = [
        (args.herd, "--herd"),
        (
            args.compare_raw || args.raw_only,
            "--compare-raw/--raw-only",
        ),
        (
            args.junk.is_some() || args.hello_flood.is_some(),
            "--junk/--hello-flood",
        ),
        (args.stall.is_some(), "--stall"),
        (args.idle.is_some(), "--idle"),
        (
            args.silent > 0.0 || args.ack > 0.0 || args.loss > 0.0,
            "--silent/--ack/--loss",
        ),
        (
            args.metrics.is_some() || args.plot.is_some(),
            "--metrics/--plot",
        ),
        (
            args.pace || args.order == Some(args::Order::Random) || args.final_check.is_some(),
            "--pace/--order random/--final-check",
        ),
    ];
    if let Some((_, flag)) = unsupported.iter().find(|(given, _)| *given) {
        return Err(format!(
            "{flag} measures one server; with --servers give --clients, --interval, --ttl, --duration, --kill-at and --pid"
        ));
    }
    if !(1..=1_000_000).contains(&args.clients) {
        return Err("--clients must be 1 to 1000000".into());
    }
    let key = match &args.key_file {
        Some(path) => Some(tether::keyfile::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    cluster::run(args, &args.servers, key)
}

/// What the steps of one run against one target share.
struct Run<'a> {
    args: &'a Args,
    target: Target,
    shared: &'a Shared,
    progress: Progress,
    /// The server's pid, as /proc and kill(1) take it.
    pid: Option<String>,
}

/// One run against `target`: open every session, beat for `--duration`
/// (floods and stall alongside), drain the silent clients, and account.
fn run_once(args: &Args, target: Target, key: Option<MacKey>) -> Result<RunResult, String> {
    let sink = match target {
        Target::Sink => Some(Sink::start(args.sink_coalesce)?),
        Target::Server => None,
    };
    let addr = sink.as_ref().map_or(args.server, |s| s.addr);
    let sockets = sender::connect_sockets(addr, args.sockets.clamp(1, args.clients))?;
    let mut shared = Shared::new(args.clients, args.interval, args.ttl);
    if args.order() == args::Order::Random && args.clients > 1 {
        shared.ids = Some(shared::Ids::shuffled(args.clients));
    }
    let shared = Arc::new(shared);
    let receiver = receiver::spawn(&sockets, &shared, key.clone())?;
    let run = Run {
        args,
        target,
        shared: &shared,
        pid: args.pid.map(|p| p.to_string()),
        progress: Progress::new(target),
    };
    let mut sender = Sender::new(sockets, Arc::clone(&shared), key, args);
    let opened = open_sessions(&run, &mut sender)?;
    let timeline = opened.herd.then(|| {
        timeline::spawn(
            Arc::clone(&shared),
            args.server,
            args.metrics,
            opened.schedule_start,
        )
    });

    let meter = Meter {
        sink: sink.as_ref(),
        pid: run.pid.as_deref(),
    };
    let start = meter.start();
    let counters_before = args.metrics.and_then(|m| junk::scrape(m).ok());
    let floods = spawn_floods(&run, &sender);
    let staller = spawn_staller(&run)?;
    let (heartbeats, phase) = beat(&run, &mut sender, &opened)?;
    let usage = meter.end().since(&start);
    let peak_rss = match target {
        Target::Server => run
            .pid
            .as_deref()
            .and_then(|p| procfs::status_field(p, "VmHWM")),
        Target::Sink => None,
    };
    let silent = match target {
        Target::Server => shared.accepted.load(Ordering::Acquire),
        Target::Sink => 0,
    };
    drain_silent(&run, &mut sender, &opened, silent);
    let live_check = live_check(&run);
    // Straight on, so no client's schedule pauses before the check (a
    // pause would come back as a burst, or, past a TTL, as expiries the
    // tool caused). The floods may still be sending: they are bounded.
    let final_check = (target == Target::Server && args.final_check_share() > 0.0)
        .then(|| final_check(args, &shared, &mut sender, opened.schedule_start));
    // Silent clients whose SUBMIT was accepted while draining count too.
    let silent = shared.accepted.load(Ordering::Acquire).max(silent);
    let timeline = timeline.map(timeline::Timeline::finish);
    let welcomed_by = opened.herd.then(|| {
        let last_us = shared.last_welcome_us.load(Ordering::Acquire);
        let offset = opened
            .schedule_start
            .saturating_duration_since(shared.start);
        Duration::from_micros(last_us).saturating_sub(offset)
    });
    join_staller(staller)?;
    let hostile = match floods {
        Some(thread) => Some(collect_floods(args, thread, counters_before)?),
        None => None,
    };
    shared.counting.store(false, Ordering::Release);
    shared.stop.store(true, Ordering::Release);
    let received = receiver
        .join()
        .map_err(|_| "receiver thread panicked".to_string())?;
    run.progress.done();
    Ok(RunResult {
        target,
        clients: args.clients,
        phase,
        heartbeats,
        send_errors: sender.send_errors,
        bytes_sent: sender.bytes_sent,
        target_rate: args.clients as f64 / args.interval.as_secs_f64(),
        silent,
        silent_missed: (0..args.clients)
            .filter(|&i| shared.flag(i) & (ACCEPTED | DETECTED | FALSE_EXPIRY) == ACCEPTED)
            .count(),
        herd: opened.herd,
        welcomed_by,
        timeline: timeline.unwrap_or_default(),
        hellos: sender.hellos,
        lost: sender.lost,
        gso: sender.mode == outbox::Mode::Segmented,
        paced: args.pace,
        explained: shared.explained_expiries.load(Ordering::Acquire),
        live_check,
        final_check,
        welcomed: shared.welcomed.load(Ordering::Acquire),
        refused: shared.refused.load(Ordering::Acquire),
        detected: shared.detected.load(Ordering::Acquire),
        false_expiries: shared.false_expiries.load(Ordering::Acquire),
        received,
        target_cpu: usage.target_cpu,
        // Both sides divided by what reached their socket: the sink counts
        // what it read; the server got what was sent less what the kernel
        // dropped at its socket (so drops cannot flatter either side).
        target_datagrams: usage
            .sink_datagrams
            .unwrap_or(heartbeats.saturating_sub(usage.kernel_drops.unwrap_or(0))),
        target_peak_rss_kb: peak_rss,
        bytes_per_session: opened.bytes_per_session,
        tool_cpu: usage.tool_cpu,
        sender_cpu: usage.sender_cpu,
        kernel_drops: usage.kernel_drops,
        hostile,
    })
}

/// Where the clients stand once the warm-up is over (or, in a herd, at
/// the start).
struct Opened {
    schedule_start: Instant,
    bytes_per_session: Option<f64>,
    /// The sessions open during the measured phase (`--herd`).
    herd: bool,
}

/// Warm-up: the same schedule as the measured phase, in which a client
/// not yet welcomed sends HELLO and a silent client not yet accepted
/// sends its SUBMIT instead of a heartbeat. Opening sessions at the
/// heartbeat rate keeps every open session beating from the start. In a
/// herd there is none: the measured phase opens them.
fn open_sessions(run: &Run, sender: &mut Sender) -> Result<Opened, String> {
    let (args, shared) = (run.args, run.shared);
    let mut bytes_per_session = None;
    let herd = args.herd && run.target == Target::Server;
    let silent = match run.target {
        Target::Server => sender.choose_silent(args),
        Target::Sink => {
            for i in 0..args.clients {
                shared.set(i, WELCOMED);
            }
            0
        }
    };
    let schedule_start = Instant::now();
    if run.target == Target::Sink {
        // The same traffic as the server's measured phase: shuffled, once
        // the order has switched.
        sender.settle_order(args, schedule_start);
    }
    if run.target == Target::Server && !herd {
        let rss = || {
            run.pid
                .as_deref()
                .and_then(|p| procfs::status_field(p, "VmRSS"))
        };
        let rss_before = rss();
        sender.warm_up(args, schedule_start, silent, &run.progress)?;
        if let (Some(before), Some(after)) = (rss_before, rss()) {
            let welcomed = shared.welcomed.load(Ordering::Acquire).max(1);
            bytes_per_session =
                Some((after.saturating_sub(before) * 1024) as f64 / welcomed as f64);
        }
    }
    Ok(Opened {
        schedule_start,
        bytes_per_session,
        herd,
    })
}

/// Where the measured side's CPU time and datagram count are read: the
/// sink's thread, or the server's process.
struct Meter<'a> {
    sink: Option<&'a Sink>,
    pid: Option<&'a str>,
}

/// Counters read at one end of the measured phase.
struct Readings {
    tool_cpu: Duration,
    sender_cpu: Duration,
    target_cpu: Option<Duration>,
    drops: Option<u64>,
    sink_count: Option<u64>,
}

/// What the measured phase cost, between two readings.
struct Usage {
    target_cpu: Option<Duration>,
    kernel_drops: Option<u64>,
    /// What the sink counted; `None` against a server.
    sink_datagrams: Option<u64>,
    tool_cpu: Duration,
    sender_cpu: Duration,
}

impl Meter<'_> {
    fn target_cpu(&self) -> Option<Duration> {
        match (self.sink, self.pid) {
            (Some(sink), _) => procfs::cpu_time(&format!("self/task/{}", sink.tid())),
            (None, Some(pid)) => procfs::cpu_time(pid),
            (None, None) => None,
        }
    }

    fn target_count(&self) -> Option<u64> {
        self.sink.map(|s| s.count.load(Ordering::Acquire))
    }

    /// Called on the sender thread, which "thread-self" then names.
    fn start(&self) -> Readings {
        let tool_cpu = procfs::cpu_time("self").unwrap_or_default();
        let sender_cpu = procfs::cpu_time("thread-self").unwrap_or_default();
        let target_cpu = self.target_cpu();
        let drops = procfs::udp_rcvbuf_errors();
        let sink_count = self.target_count();
        Readings {
            tool_cpu,
            sender_cpu,
            target_cpu,
            drops,
            sink_count,
        }
    }

    /// The measured side first, so its figures stop nearest the phase's end.
    fn end(&self) -> Readings {
        let target_cpu = self.target_cpu();
        let drops = procfs::udp_rcvbuf_errors();
        let sink_count = self.target_count();
        let tool_cpu = procfs::cpu_time("self").unwrap_or_default();
        let sender_cpu = procfs::cpu_time("thread-self").unwrap_or_default();
        Readings {
            tool_cpu,
            sender_cpu,
            target_cpu,
            drops,
            sink_count,
        }
    }
}

impl Readings {
    fn since(&self, start: &Readings) -> Usage {
        Usage {
            target_cpu: start
                .target_cpu
                .zip(self.target_cpu)
                .map(|(a, b)| b.saturating_sub(a)),
            kernel_drops: start
                .drops
                .zip(self.drops)
                .map(|(a, b)| b.saturating_sub(a)),
            sink_datagrams: start.sink_count.zip(self.sink_count).map(|(a, b)| b - a),
            tool_cpu: self.tool_cpu - start.tool_cpu,
            sender_cpu: self.sender_cpu - start.sender_cpu,
        }
    }
}

/// What the junk flood and the HELLO flood each sent, if asked for.
type Floods = (
    Option<std::io::Result<JunkReport>>,
    Option<std::io::Result<JunkReport>>,
);

/// Starts the floods asked for, against a server only, on their own thread.
fn spawn_floods(run: &Run, sender: &Sender) -> Option<JoinHandle<Floods>> {
    let args = run.args;
    if run.target != Target::Server || (args.junk.is_none() && args.hello_flood.is_none()) {
        return None;
    }
    let (server, key, captured) = (args.server, sender.key.clone(), sender.captured.clone());
    let (junk_count, hellos, rate) = (args.junk, args.hello_flood, args.flood_rate);
    Some(std::thread::spawn(move || {
        let junk = junk_count.map(|n| junk::flood(server, n, rate, key.as_ref(), &captured));
        let hellos = hellos.map(|n| junk::hello_flood(server, n, rate, key.as_ref()));
        (junk, hellos)
    }))
}

/// With `--stall`, a thread that stops the server a third of the way into
/// the measured phase and resumes it; it returns whether both signals
/// went through.
fn spawn_staller(run: &Run) -> Result<Option<JoinHandle<bool>>, String> {
    match (run.args.stall, run.pid.as_deref(), run.target) {
        (Some(stall), Some(pid), Target::Server) => {
            let (pid, delay) = (pid.to_owned(), run.args.duration / 3);
            Ok(Some(std::thread::spawn(move || {
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
            })))
        }
        (Some(_), None, _) => Err("--stall needs --pid".into()),
        _ => Ok(None),
    }
}

/// The measured phase: every client on schedule for `--duration`, false
/// expiries counted. Returns the datagrams sent and how long it took.
/// In a herd, an answer must come within ten intervals of the first HELLO
/// or the run stops with an error.
fn beat(run: &Run, sender: &mut Sender, opened: &Opened) -> Result<(u64, Duration), String> {
    run.shared.counting.store(true, Ordering::Release);
    let schedule_start = opened.schedule_start;
    let phase_start = if opened.herd {
        schedule_start
    } else {
        Instant::now()
    };
    let measure_from = phase_start - schedule_start;
    let until = measure_from + run.args.duration;
    sender.start_silences(measure_from);
    let mut heartbeats = 0;
    if opened.herd {
        let first = until.min(run.args.interval * 10);
        heartbeats += sender.run_schedule(run.args, schedule_start, first, Some(&run.progress));
        let answered = run.shared.welcomed.load(Ordering::Acquire)
            + run.shared.refused.load(Ordering::Acquire);
        if answered == 0 {
            return Err(format!(
                "no WELCOME from {} in ten intervals of HELLO: is `tether serve` running there (and is the key right)?",
                run.args.server
            ));
        }
    }
    heartbeats += sender.run_schedule(run.args, schedule_start, until, Some(&run.progress));
    Ok((heartbeats, phase_start.elapsed()))
}

/// Keep the live clients beating while the last silent ones are
/// detected, so the end of the run is not mistaken for silence.
fn drain_silent(run: &Run, sender: &mut Sender, opened: &Opened, silent: usize) {
    if silent == 0 {
        return;
    }
    let (args, schedule_start) = (run.args, opened.schedule_start);
    let drain = args.ttl + Duration::from_secs(2);
    let drain_start = Instant::now();
    let until = drain_start + drain;
    while Instant::now() < until && run.shared.detected.load(Ordering::Acquire) < silent {
        let left = until
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(200));
        sender.run_schedule(args, schedule_start, schedule_start.elapsed() + left, None);
    }
}

/// After the measured phase (its CPU already read): one more interval in
/// which a share of the live clients ask for an ACK, then, with every
/// other client stopped, up to three more asks from those unanswered, half
/// a second apart (each ask is a heartbeat, so their sessions stay open).
/// The server withholds UNKNOWN_SESSION while backlogged and a client
/// without a task hears of no expiry, so under overload an answer is the
/// only proof a session is alive: one that never comes, with the load
/// stopped, is counted as a false expiry.
fn final_check(
    args: &Args,
    shared: &Shared,
    sender: &mut Sender,
    schedule_start: Instant,
) -> FinalCheck {
    let per_million = (args.final_check_share() * 1_000_000.0).round() as u64;
    // Round trips are a measure of the loaded server; these are not.
    shared.recording_rtt.store(false, Ordering::Release);
    sender.set_checking(Some(per_million));
    sender.run_schedule(
        args,
        schedule_start,
        schedule_start.elapsed() + args.interval,
        None,
    );
    sender.set_checking(None);
    let count = |mask: u8, want: u8| {
        (0..args.clients)
            .filter(|&i| shared.flag(i) & mask == want)
            .count()
    };
    let unanswered = || count(CHECKED | ANSWERED | FALSE_EXPIRY, CHECKED);
    let wait_for_answers = || {
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until && unanswered() > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for_answers();
    let mut asked_again = 0;
    for _ in 0..3 {
        if unanswered() == 0 {
            break;
        }
        asked_again += sender.ask_unanswered();
        wait_for_answers();
    }
    // From here an answer no longer counts, so one arriving while the
    // figures are taken cannot be counted twice.
    shared.counting.store(false, Ordering::Release);
    let never_answered = unanswered();
    shared
        .false_expiries
        .fetch_add(never_answered, Ordering::AcqRel);
    FinalCheck {
        asked: count(CHECKED, CHECKED),
        answered: count(CHECKED | ANSWERED, CHECKED | ANSWERED),
        said_gone: count(CHECKED | ANSWERED | FALSE_EXPIRY, CHECKED | FALSE_EXPIRY),
        never_answered,
        asked_again,
    }
}

/// The server's count of live sessions against the clients this run
/// believes alive (welcomed, never silent, never expired), read right after
/// the last heartbeats: a session lost without a word shows as a
/// difference. Needs `--metrics`; skipped with a HELLO flood, whose
/// sessions the server counts too.
fn live_check(run: &Run) -> Option<(u64, u64)> {
    let metrics = run.args.metrics?;
    if run.target != Target::Server || run.args.hello_flood.is_some() {
        return None;
    }
    let scrape = junk::scrape(metrics).ok()?;
    let server = junk::series_sum(&scrape, "tether_sessions_live")? as u64;
    let shared = run.shared;
    let alive = (0..shared.flags.len())
        .filter(|&i| shared.flag(i) & (WELCOMED | FALSE_EXPIRY | SILENT) == WELCOMED)
        .count() as u64;
    Some((server, alive))
}

fn join_staller(staller: Option<JoinHandle<bool>>) -> Result<(), String> {
    if let Some(staller) = staller {
        if !staller.join().unwrap_or(false) {
            return Err("could not SIGSTOP/SIGCONT the server (is --pid right?)".into());
        }
    }
    Ok(())
}

/// Waits for the floods, then reads the server's counters again.
fn collect_floods(
    args: &Args,
    thread: JoinHandle<Floods>,
    counters_before: Option<HashMap<String, f64>>,
) -> Result<Hostile, String> {
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
    Ok(Hostile {
        junk,
        hellos,
        counters: counters_before.zip(after),
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use tether::wire::{Datagram, Flags, Header, Message};

    /// A server that answers the ACKs asked, by client index mod 10: 3 has
    /// lost its session without a word (never answers), 7 says so
    /// (UNKNOWN_SESSION), 5 misses its first ask and answers the next, 1
    /// answers each ask 700 ms late (after the check has asked again), the
    /// rest answer at once.
    fn forgetful_server(
        base_id: u64,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) -> (UdpSocket, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let serving = socket.try_clone().unwrap();
        let thread = std::thread::spawn(move || {
            let (mut buf, mut out) = ([0u8; 2048], [0u8; 2048]);
            let mut missed_once = std::collections::HashSet::new();
            let mut late: Vec<(Instant, Vec<u8>, std::net::SocketAddr)> = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let now = Instant::now();
                late.retain(|(due, bytes, to)| {
                    let keep = *due > now;
                    if !keep {
                        let _ = serving.send_to(bytes, to);
                    }
                    keep
                });
                let Ok((n, from)) = serving.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(asked) = Datagram::decode(&buf[..n], None) else {
                    continue;
                };
                if !asked.header.flags.contains(Flags::ACK) {
                    continue;
                }
                let client = asked.header.client_id - base_id - 1;
                let message = match client % 10 {
                    3 => continue,
                    5 if missed_once.insert(client) => continue,
                    7 => Message::UnknownSession,
                    _ => Message::HeartbeatAck {
                        acked_seq: asked.header.seq,
                    },
                };
                let reply = Datagram {
                    header: Header {
                        flags: Flags::empty(),
                        seq: 1,
                        ..asked.header
                    },
                    message,
                };
                let len = reply.emit(None, &mut out).unwrap();
                if client % 10 == 1 {
                    let due = Instant::now() + Duration::from_millis(700);
                    late.push((due, out[..len].to_vec(), from));
                } else {
                    let _ = serving.send_to(&out[..len], from);
                }
            }
        });
        (socket, thread)
    }

    #[test]
    fn the_final_check_counts_sessions_lost_in_silence_as_false_expiries() {
        let n = 300;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let shared = Arc::new(Shared::new(
            n,
            Duration::from_millis(100),
            Duration::from_secs(3),
        ));
        let (server, serving) = forgetful_server(shared.base_id, Arc::clone(&stop));
        let addr = server.local_addr().unwrap().to_string();
        // Paced, so every ask leaves the moment it is queued.
        let args = Args::parse_from([
            "tether-load",
            "--server",
            &addr,
            "--clients",
            "300",
            "--interval",
            "100ms",
            "--final-check",
            "1",
            "--pace",
        ]);
        let sockets = sender::connect_sockets(args.server, 4).unwrap();
        let receiver = receiver::spawn(&sockets, &shared, None).unwrap();
        let mut sender = Sender::new(sockets, Arc::clone(&shared), None, &args);
        for i in 0..n {
            shared.set(i, WELCOMED);
        }
        shared.counting.store(true, Ordering::Release);
        let check = final_check(&args, &shared, &mut sender, Instant::now());
        shared.stop.store(true, Ordering::Release);
        stop.store(true, Ordering::Release);
        let received = receiver.join().unwrap();
        serving.join().unwrap();

        assert_eq!(check.asked, n, "every live client asked");
        assert_eq!(
            check.answered,
            n * 8 / 10,
            "at once, on the second ask, or late"
        );
        assert_eq!(check.said_gone, n / 10);
        assert_eq!(check.never_answered, n / 10, "lost without a word");
        assert!(
            check.asked_again >= 3 * n / 10 + n / 10,
            "the silent three times, the once-missed at least once: {}",
            check.asked_again
        );
        assert_eq!(
            shared.false_expiries.load(Ordering::Acquire),
            2 * n / 10,
            "both kinds of loss are false expiries"
        );
        assert!(
            received.rtt_us.is_empty(),
            "the check's answers are not round trips under load"
        );
    }
}
