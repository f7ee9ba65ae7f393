//! The `tether` command: parses arguments into a configuration, runs the
//! server or the terminal client, and turns the outcome into an exit code.

#[path = "tether/sessions.rs"]
mod sessions;
#[path = "tether/top.rs"]
mod top;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use tether::engine::{self, ConfigError};
use tether::observe::EventsTarget;
use tether::server::{datagrams_held, Server, ServerConfig, ServerError};
use tether::wire::MacKey;
use tether::{
    CancelOutcome, Client, ClientConfig, ClientError, ClientEvent, Registry, Resume, ServerNames,
    SubmitOptions, TaskId, TaskStatus,
};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "A UDP heartbeat monitor: runs each client's tasks for exactly as long as the client keeps heartbeating.",
    long_about = "A UDP heartbeat monitor: runs each client's tasks for exactly as long as the client \
keeps heartbeating. Clients open a session with HELLO, send HEARTBEATs, and submit named jobs; when a \
session's TTL runs out, every task of it is cancelled with reason 'expired' and the client is told. \
See PROTOCOL.md for the wire format."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server. Prints "listening on ADDR" on stdout once ready;
    /// SIGINT or SIGTERM stops it gracefully (a second one at once).
    Serve(ServeArgs),
    /// Talk to a server from the shell: open a session, submit a job and
    /// follow it, ask for a task's state, cancel a task. Exit codes: 0 the
    /// task is done (or the command succeeded), 1 error, 2 bad arguments,
    /// 3 the task failed, 4 it was cancelled, 5 no such task, 6 not
    /// finished yet, 130 interrupted.
    Client(ClientArgs),
    /// List a running server's live sessions, read from its metrics
    /// endpoint (`tether serve --metrics`): client id, incarnation, peer,
    /// TTL, time since its last datagram, unfinished tasks.
    Sessions {
        /// The server's metrics endpoint.
        #[arg(long, default_value = "127.0.0.1:9900", value_name = "ADDR")]
        server_metrics: SocketAddr,
        /// Only sessions past two thirds of their TTL without a datagram
        /// (about to expire), soonest first.
        #[arg(long)]
        late: bool,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// A full-screen view of a running server, refreshed every second from
    /// its metrics endpoint: sessions, heartbeats/s, sessions ended by
    /// reason, tasks by state, drops by cause, expiry lateness, how busy
    /// the event loop is, and the clients closest to expiry. q quits. Not
    /// on a terminal (or with --once) it prints one frame as text.
    Top {
        /// The server's metrics endpoint.
        #[arg(long, default_value = "127.0.0.1:9900", value_name = "ADDR")]
        server_metrics: SocketAddr,
        /// How often to refresh.
        #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
        interval: Duration,
        /// Print one frame (over one interval) as text and exit.
        #[arg(long)]
        once: bool,
    },
    /// Print a shell completion script (e.g. `tether completions bash >
    /// /etc/bash_completion.d/tether`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual (roff): `tether man > tether.1` gives one page
    /// with every subcommand's options; `--dir DIR` writes a page per
    /// command instead (tether.1, tether-serve.1, tether-client-submit.1,
    /// ...).
    Man {
        /// Write one page per command into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum Switch {
    /// Decided by the setting's rule.
    Auto,
    On,
    Off,
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on (UDP). A non-loopback address needs --key-file,
    /// or --insecure-bind.
    #[arg(long, default_value = "127.0.0.1:7900", value_name = "ADDR")]
    listen: SocketAddr,
    /// TTL granted to a client that asks for none (HELLO ttl_ms = 0).
    #[arg(long, default_value = "3s", value_parser = parse_duration, value_name = "DURATION")]
    ttl: Duration,
    /// Smallest TTL granted; shorter requests are raised to it.
    #[arg(long, default_value = "100ms", value_parser = parse_duration, value_name = "DURATION")]
    min_ttl: Duration,
    /// Largest TTL granted; longer requests are lowered to it.
    #[arg(long, default_value = "1h", value_parser = parse_duration, value_name = "DURATION")]
    max_ttl: Duration,
    /// Timer wheel tick: expiry is decided at most one tick after a TTL runs
    /// out. Whole milliseconds.
    #[arg(long, default_value = "10ms", value_parser = parse_duration, value_name = "DURATION")]
    tick: Duration,
    /// File holding the shared secret (16 to 64 raw bytes, mode 600). With
    /// it, every datagram must carry a valid HMAC-SHA256 and every reply
    /// carries one.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Allow listening on a non-loopback address without a key. Anyone who
    /// can reach the port can then act as any client.
    #[arg(long)]
    insecure_bind: bool,
    /// Keyless: never send an address more bytes than it has sent, so
    /// spoofed requests cannot make this server amplify traffic at a third
    /// party. "auto" turns it on when listening beyond loopback. With it
    /// on, a HELLO with an empty name (33 bytes) waits for its retry to be
    /// welcomed (36 bytes), and at most 7 of 8 ACKs go to a client that asks
    /// for one on every heartbeat and sends nothing else.
    #[arg(long, value_enum, default_value = "auto", value_name = "WHEN")]
    amplification_limit: Switch,
    /// Worker threads running tasks [default: number of cores], split
    /// evenly between the shards.
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Event loops, each on a thread of its own with its own sockets,
    /// sessions and workers; the kernel sends every datagram of a client
    /// to the shard of its client_id. One keeps a million clients at half
    /// a million heartbeats a second in half to three quarters of a core
    /// of a small VM; add shards when the loop's CPU nears 70% of a core
    /// (README, "Scaling out").
    #[arg(long, default_value_t = 1, value_name = "N")]
    shards: usize,
    /// Live sessions at most; further HELLOs get REJECTED 6.
    #[arg(long, default_value_t = 1_000_000, value_name = "N")]
    max_sessions: usize,
    /// Unfinished tasks per session at most; further SUBMITs get REJECTED 3.
    #[arg(long, default_value_t = 64, value_name = "N")]
    max_tasks_per_session: usize,
    /// Tasks waiting for a worker (delayed or queued) at most; further
    /// SUBMITs get REJECTED 2.
    #[arg(long, default_value_t = 65_536, value_name = "N")]
    queue: usize,
    /// How long a shutdown waits for cancelled tasks to stop before exiting
    /// anyway. 0s: tell every task and client, then exit without waiting
    /// (tasks still running are reported as ignoring their flag).
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    grace: Duration,
    /// Serve Prometheus metrics at http://ADDR/metrics (OpenMetrics) and a
    /// health probe at http://ADDR/healthz (TCP). Without a value:
    /// 127.0.0.1:9900.
    #[arg(long, value_name = "ADDR", num_args = 0..=1, default_missing_value = "127.0.0.1:9900")]
    metrics: Option<SocketAddr>,
    /// Write one JSON line per session and task event to PATH (appended;
    /// SIGHUP reopens it), or to stdout with "-" (the startup lines then go
    /// to stderr, so stdout is JSON only).
    #[arg(long, value_name = "PATH")]
    events: Option<EventsTarget>,
    /// Log format on stderr. Filter with RUST_LOG (e.g. RUST_LOG=debug shows
    /// every session and task event). Text is coloured only on a terminal,
    /// and never with NO_COLOR set.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Warn when a task keeps running this long after it was cancelled.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "DURATION")]
    slow_cancel: Duration,
    /// Receive buffer to ask for (e.g. 64MiB): what queues up while the
    /// server is stalled. Past net.core.rmem_max it needs root.
    #[arg(long, default_value = "4MiB", value_parser = parse_bytes, value_name = "BYTES")]
    recv_buffer: usize,
    /// Warn when one event loop iteration takes longer than this.
    #[arg(long, default_value = "100ms", value_parser = parse_duration, value_name = "DURATION")]
    slow_loop: Duration,
    /// Under load, let datagrams gather this long between reads, so each
    /// read takes a batch: 40% of the CPU per heartbeat at 100K/s, for
    /// at most this much more round trip. Never delays expiry. 0 reads as
    /// soon as anything arrives. At most half the tick. With N shards each
    /// waits N times this (at most half the tick), for the same batches.
    #[arg(long, default_value = "500us", value_parser = parse_duration, value_name = "DURATION")]
    coalesce: Duration,
}

#[derive(Args)]
struct ClientArgs {
    /// The server, or several separated by commas (HOST:PORT each; a DNS
    /// name with several addresses gives them all). With several, the
    /// client picks its host by rendezvous hashing of its id, and moves to
    /// the next in its order if the host stays silent for a TTL.
    #[arg(
        long,
        default_value = "127.0.0.1:7900",
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ','
    )]
    server: Vec<String>,
    /// The server's key file, if it has one.
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// This client's id. The default is derived from the user and host
    /// names, so later commands reach tasks submitted by earlier ones.
    #[arg(long, value_name = "N")]
    client_id: Option<u64>,
    /// TTL to ask for.
    #[arg(long, default_value = "3s", value_parser = parse_duration, value_name = "DURATION")]
    ttl: Duration,
    #[command(subcommand)]
    action: ClientAction,
}

#[derive(Subcommand)]
enum ClientAction {
    /// Open a session, print what the server granted and the round trip,
    /// and close it.
    Hello,
    /// Submit JOB with PAYLOAD and print its task id. With --follow, keep
    /// heartbeating until it ends and print its final state; Ctrl-C cancels
    /// it. Without --follow the task lives until the session's TTL runs out.
    Submit {
        /// The job's name (sleep, spin, echo, fail, panic, or your own).
        job: String,
        /// The payload: u32:N or u64:N for a big-endian number (sleep takes
        /// u32 milliseconds, spin u64 rounds), hex:BYTES, or plain text.
        #[arg(default_value = "")]
        payload: String,
        /// Hold the task back this long before queueing it.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        delay: Duration,
        /// Cancel it this long after it starts (0: never).
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        deadline: Duration,
        /// Wait for the final state, heartbeating meanwhile.
        #[arg(long)]
        follow: bool,
    },
    /// Print a task's state (any task of this client id).
    Status {
        /// The task id, as `submit` printed it.
        task: u64,
    },
    /// Cancel a task (any task of this client id).
    Cancel {
        /// The task id, as `submit` printed it.
        task: u64,
    },
}

fn parse_bytes(text: &str) -> Result<usize, String> {
    let usage = "write sizes like 4194304, 512KiB, 64MiB or 1GiB";
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let scale: usize = match unit {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return Err(usage.into()),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|&n| n > 0)
        .ok_or_else(|| usage.into())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|_| "write durations like 250ms, 3s or 1h".to_owned())
}

/// Clap's message, whole (it is short: the problem, the usage line, any
/// "did you mean" tip), with its closing hint pointed at the `--help` of
/// the subcommand that was being parsed.
fn usage_error(e: &clap::Error) -> String {
    // args_os: an argument that is not UTF-8 must not panic here.
    let command = subcommand_path(
        std::env::args_os()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned()),
    );
    e.render()
        .to_string()
        .replace("try '--help'", &format!("try '{command} --help'"))
}

/// "tether client submit" for `tether --x client --server A submit ...`:
/// the words of `args` that name subcommands, in order.
fn subcommand_path(args: impl Iterator<Item = String>) -> String {
    let mut command = Cli::command();
    let mut path = vec!["tether".to_owned()];
    for arg in args {
        let Some(sub) = command.find_subcommand(&arg).cloned() else {
            continue;
        };
        path.push(arg);
        command = sub;
    }
    path.join(" ")
}

/// The manual: one page on stdout (the top-level page, then each
/// command's options under a heading of its own), or a page per command.
fn manual(dir: Option<&Path>) -> std::io::Result<()> {
    let command = Cli::command();
    if let Some(dir) = dir {
        return clap_mangen::generate_to(command, dir);
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(command.clone()).render(&mut page)?;
    let mut pending: Vec<(String, clap::Command)> = command
        .get_subcommands()
        .map(|c| (format!("tether {}", c.get_name()), c.clone()))
        .collect();
    while let Some((path, sub)) = pending.first().cloned() {
        pending.remove(0);
        writeln!(page, ".SH \"{}\"", path.to_uppercase())?;
        if let Some(about) = sub.get_long_about().or(sub.get_about()) {
            writeln!(page, "{about}")?;
        }
        let mut options = Vec::new();
        clap_mangen::Man::new(sub.clone()).render_options_section(&mut options)?;
        // Each command's options under its own heading, not a second
        // top-level OPTIONS section.
        let options = String::from_utf8_lossy(&options).replacen(".SH OPTIONS", ".SS Options", 1);
        page.extend_from_slice(options.as_bytes());
        for child in sub.get_subcommands() {
            pending.push((format!("{path} {}", child.get_name()), child.clone()));
        }
    }
    std::io::stdout().write_all(&page)
}

/// Writes a line of the client's answer to stdout. A closed pipe
/// (`tether client ... | head -1`) is not an error worth a panic: the
/// command goes on to its end and its exit code.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// The documented exit codes (README, "Exit codes"); 0 and 1 are
/// `ExitCode::SUCCESS` and `ExitCode::FAILURE`.
mod exit {
    /// Bad arguments (clap's convention).
    pub const USAGE: u8 = 2;
    /// The task failed: its job returned an error or panicked.
    pub const TASK_FAILED: u8 = 3;
    /// The task was cancelled (by a CANCEL, its deadline, its session's
    /// expiry or a server shutdown).
    pub const TASK_CANCELLED: u8 = 4;
    /// The server knows no such task of this client id.
    pub const TASK_UNKNOWN: u8 = 5;
    /// `status`: the task has not finished yet.
    pub const TASK_PENDING: u8 = 6;
    /// Interrupted (Ctrl-C, or a second stop signal to the server).
    pub const INTERRUPTED: u8 = 130;
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version: print and exit 0.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            return ExitCode::from(exit::USAGE);
        }
        Err(e) => {
            eprint!("{}", usage_error(&e));
            return ExitCode::from(exit::USAGE);
        }
    };
    let result = match cli.command {
        Command::Serve(args) => serve(args).map(|()| ExitCode::SUCCESS),
        Command::Client(args) => client(args).map(ExitCode::from).map_err(Failure::Error),
        Command::Sessions {
            server_metrics,
            late,
            json,
        } => sessions::run(server_metrics, late, json)
            .map(|()| ExitCode::SUCCESS)
            .map_err(Failure::Error),
        Command::Top {
            server_metrics,
            interval,
            once,
        } => top::run(server_metrics, interval, once)
            .map(|()| ExitCode::SUCCESS)
            .map_err(Failure::Error),
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tether", &mut script);
            std::io::stdout()
                .write_all(&script)
                .map(|()| ExitCode::SUCCESS)
                .map_err(|e| Failure::Error(format!("writing the completions: {e}")))
        }
        Command::Man { dir } => manual(dir.as_deref())
            .map(|()| ExitCode::SUCCESS)
            .map_err(|e| Failure::Error(format!("writing the manual: {e}"))),
    };
    match result {
        Ok(code) => code,
        Err(Failure::Aborted(e)) => {
            eprintln!("tether: {e}");
            ExitCode::from(exit::INTERRUPTED)
        }
        Err(Failure::Error(e)) => {
            eprintln!("tether: error: {e}");
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Error(String),
    Aborted(ServerError),
}

/// A duration the way the flags take it (`2h`, `250ms`, `1m 30s`).
fn human(d: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(d)
}

/// A duration from milliseconds, for messages.
fn human_ms(ms: u32) -> humantime::FormattedDuration {
    human(Duration::from_millis(u64::from(ms)))
}

fn millis(d: Duration, flag: &str) -> Result<u32, String> {
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return Err(format!(
            "--{flag} must be whole milliseconds, got {}",
            human(d)
        ));
    }
    u32::try_from(d.as_millis()).map_err(|_| format!("--{flag} {} is too long", human(d)))
}

/// Thresholds that would make no sense at zero.
fn positive(d: Duration, flag: &str, why: &str) -> Result<(), String> {
    if d.is_zero() {
        return Err(format!("--{flag} must be more than 0s: {why}"));
    }
    Ok(())
}

fn config(args: &ServeArgs) -> Result<ServerConfig, String> {
    positive(
        args.slow_loop,
        "slow-loop",
        "every iteration would be reported as slow",
    )?;
    positive(
        args.slow_cancel,
        "slow-cancel",
        "every cancelled task still running would be reported as slow",
    )?;
    let tick_ms = millis(args.tick, "tick")?;
    let (ttl, min_ttl, max_ttl) = (
        millis(args.ttl, "ttl")?,
        millis(args.min_ttl, "min-ttl")?,
        millis(args.max_ttl, "max-ttl")?,
    );
    let key = load_key(args.key_file.as_ref())?;
    let mut config = ServerConfig::default();
    config.listen = args.listen;
    let engine = &mut config.engine;
    engine.tick_us = u64::from(tick_ms) * 1000;
    engine.default_ttl_ms = ttl;
    engine.min_ttl_ms = min_ttl;
    engine.max_ttl_ms = max_ttl;
    engine.max_sessions = args.max_sessions;
    engine.max_client_records = args.max_sessions;
    engine.max_tasks_per_session = args.max_tasks_per_session;
    engine.max_waiting_tasks = args.queue;
    engine.key = key;
    config.workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    config.shards = args.shards;
    config.grace = args.grace;
    config.insecure_bind = args.insecure_bind;
    config.amplification_limit = match args.amplification_limit {
        Switch::Auto => None,
        Switch::On => Some(true),
        Switch::Off => Some(false),
    };
    config.handle_signals = true;
    config.systemd_notify = true;
    config.metrics = args.metrics;
    config.events = args.events.clone();
    config.slow_loop = args.slow_loop;
    config.coalesce = args.coalesce;
    config.slow_cancel = args.slow_cancel;
    config.recv_buffer = args.recv_buffer;
    config.clock = Arc::new(tether::server::SystemClock);
    config.validate().map_err(|e| flag_error(&e, args))?;
    Ok(config)
}

/// The configuration rule `e` in the words of the flags that set it.
fn flag_error(e: &ConfigError, args: &ServeArgs) -> String {
    match e {
        ConfigError::Tick { .. } => "--tick must be at least 1ms".into(),
        ConfigError::TtlBounds {
            min_ms,
            default_ms,
            max_ms,
        } => format!(
            "TTLs must satisfy 0 < --min-ttl ({}) <= --ttl ({}) <= --max-ttl ({})",
            human_ms(*min_ms),
            human_ms(*default_ms),
            human_ms(*max_ms)
        ),
        ConfigError::MaxSessions(_) => format!(
            "--max-sessions must be between 1 and {}",
            engine::MAX_SESSIONS_LIMIT
        ),
        ConfigError::ZeroLimit("queue") => "--queue must be at least 1".into(),
        ConfigError::ZeroLimit("max tasks per session") => {
            "--max-tasks-per-session must be at least 1".into()
        }
        ConfigError::NoWorkers => "--workers must be at least 1".into(),
        ConfigError::Shards(_) => format!(
            "--shards must be between 1 and {}",
            tether::server::MAX_SHARDS
        ),
        ConfigError::CoalesceTooLong => format!(
            "--coalesce ({}) must be at most half of --tick ({}): expiry is decided on ticks",
            human(args.coalesce),
            human(args.tick)
        ),
        ConfigError::InsecureMetrics(addr) => format!(
            "refusing to serve metrics on {addr}, a non-loopback address: pass --insecure-bind if that network is trusted"
        ),
        other => other.to_string(),
    }
}

fn load_key(path: Option<&PathBuf>) -> Result<Option<MacKey>, String> {
    path.map(|p| tether::keyfile::load(p).map_err(|e| e.to_string()))
        .transpose()
}

/// Colour codes only for a person at a terminal: never into files,
/// pipes or journald, and never when NO_COLOR is set (no-color.org).
fn colour_logs() -> bool {
    use std::io::IsTerminal;
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color && std::io::stderr().is_terminal()
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colour_logs())
        .with_target(false);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    init_logging(args.log_format);
    tether::pool::quiet_worker_panics();
    let config = config(&args).map_err(Failure::Error)?;
    let keyed = config.engine.key.is_some();
    let workers = config.workers;
    let shards = config.shards;
    let server = Server::bind(config, Registry::with_standard_jobs())
        .map_err(|e| Failure::Error(e.to_string()))?;
    let granted = server.recv_buffer_granted();
    let held = datagrams_held(granted);
    tracing::info!(
        receive_buffer = granted,
        holds_heartbeats = held,
        workers,
        shards,
        auth = if keyed { "HMAC-SHA256" } else { "none" },
        metrics = server.metrics_addr().map(|a| format!("http://{a}/metrics")),
        "starting"
    );
    // Linux reports twice the usable size it grants.
    if granted < 2 * args.recv_buffer {
        tracing::warn!(
            "the kernel granted a receive buffer of {granted} bytes of the {} asked for: it holds \
             about {held} heartbeats, so a stall longer than {:.2} s at 100,000 heartbeats/s \
             loses datagrams. Run as root, or raise the cap: sysctl -w net.core.rmem_max={}",
            args.recv_buffer,
            held as f64 / 100_000.0,
            args.recv_buffer
        );
    }
    // With the event stream on stdout, stdout carries JSON lines only.
    let startup_lines: &mut dyn std::io::Write = if args.events == Some(EventsTarget::Stdout) {
        &mut std::io::stderr()
    } else {
        &mut std::io::stdout()
    };
    let _ = writeln!(startup_lines, "listening on {}", server.local_addr());
    if let Some(metrics) = server.metrics_addr() {
        let _ = writeln!(startup_lines, "metrics on http://{metrics}/metrics");
    }
    let _ = startup_lines.flush();
    match server.run() {
        Ok(report) => {
            if !report.ignored_cancel.is_empty() {
                let ids: Vec<String> = report
                    .ignored_cancel
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
                tracing::warn!(
                    "{} task(s) ignored their cancel flag past the grace period: {}",
                    ids.len(),
                    ids.join(", ")
                );
            }
            Ok(())
        }
        Err(e @ ServerError::Aborted { .. }) => Err(Failure::Aborted(e)),
        Err(e) => Err(Failure::Error(e.to_string())),
    }
}

/// A stable, non-zero client id for this user on this host.
fn default_client_id() -> u64 {
    let user = std::env::var("USER").unwrap_or_default();
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    // FNV-1a: stable across runs and builds, which std's hasher is not.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in user.bytes().chain([0]).chain(host.trim().bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

fn parse_payload(text: &str) -> Result<Vec<u8>, String> {
    if let Some(n) = text.strip_prefix("u32:") {
        let n: u32 = n
            .parse()
            .map_err(|_| format!("{text:?}: u32:N takes a number up to 4294967295"))?;
        Ok(n.to_be_bytes().to_vec())
    } else if let Some(n) = text.strip_prefix("u64:") {
        let n: u64 = n
            .parse()
            .map_err(|_| format!("{text:?}: u64:N takes a number"))?;
        Ok(n.to_be_bytes().to_vec())
    } else if let Some(hex) = text.strip_prefix("hex:") {
        if hex.len() % 2 != 0 {
            return Err(format!("{text:?}: hex: takes an even number of hex digits"));
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| {
                u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| format!("{text:?}: not hex"))
            })
            .collect()
    } else {
        Ok(text.as_bytes().to_vec())
    }
}

fn describe(status: &TaskStatus) -> String {
    match status {
        TaskStatus::Done(result) => match std::str::from_utf8(result) {
            Ok(text) if !text.is_empty() && !text.chars().any(char::is_control) => {
                format!("done: {text}")
            }
            _ if result.is_empty() => "done".into(),
            _ => format!(
                "done: {}",
                result
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            ),
        },
        TaskStatus::Failed(error) => format!("failed: {error}"),
        TaskStatus::Cancelled(reason) => format!("cancelled ({reason})"),
        TaskStatus::Scheduled => "scheduled".into(),
        TaskStatus::Queued => "queued".into(),
        TaskStatus::Running => "running".into(),
        TaskStatus::Unknown => "unknown (no such task of this client, or it aged out)".into(),
    }
}

/// Where the command-line client keeps its session between invocations,
/// so `status` or `cancel` continue the session a `submit` opened instead
/// of replacing it (a new incarnation would cancel the submitted task).
/// `None` (said once) when there is no private place for it.
fn session_file(servers: &[String], client_id: u64) -> Option<PathBuf> {
    let dir = private_dir()
        .map_err(|why| {
            eprintln!("note: the session cannot be kept for the next command: {why}");
        })
        .ok()?;
    let mut servers = servers.to_vec();
    servers.sort();
    servers.dedup();
    let server = servers.join("+").replace([':', '[', ']', '.', '/'], "_");
    Some(dir.join(format!("client-{client_id}-{server}.session")))
}

/// The first usable of `$XDG_RUNTIME_DIR/tether`, `$XDG_CACHE_HOME/tether`
/// and `~/.cache/tether`: a real directory (not a symlink) owned by this
/// user that nobody else can enter, created 0700 inside a base that exists
/// (only `~/.cache` itself is created, as the XDG spec says). Never a
/// shared directory such as /tmp, where another user could plant the file
/// or a symlink in its place. `Err` says what was tried.
fn private_dir() -> Result<PathBuf, String> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut candidates = Vec::new();
    if let Some(runtime) = var("XDG_RUNTIME_DIR") {
        candidates.push((runtime, false));
    }
    if let Some(cache) = var("XDG_CACHE_HOME") {
        candidates.push((cache, false));
    } else if let Some(home) = var("HOME") {
        candidates.push((home.join(".cache"), true));
    }
    if candidates.is_empty() {
        return Err("neither XDG_RUNTIME_DIR nor HOME is set".into());
    }
    let mut refused = Vec::new();
    for (base, create_base) in candidates {
        match private_subdir(&base, create_base) {
            Ok(dir) => return Ok(dir),
            Err(why) => refused.push(format!("{}/tether {why}", base.display())),
        }
    }
    Err(refused.join("; "))
}

fn private_subdir(base: &Path, create_base: bool) -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let make = |dir: &Path| match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(format!("cannot be created: {e}"))
        }
        _ => Ok(()),
    };
    if create_base && base.parent().is_some_and(Path::is_dir) {
        make(base)?;
    }
    if !base.is_dir() {
        return Err("is not usable: its parent does not exist".into());
    }
    let dir = base.join("tether");
    make(&dir)?;
    // The owner of /proc/self is this process's effective user (fail-safe:
    // without /proc nothing is kept).
    let me = std::fs::metadata("/proc/self")
        .map_err(|e| format!("cannot be checked (no /proc/self: {e})"))?
        .uid();
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("cannot be read: {e}"))?;
    if !meta.is_dir() {
        return Err("is not a directory (a symlink?)".into());
    }
    if meta.uid() != me {
        return Err(format!("belongs to uid {}, not {me}", meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("cannot be made private: {e}"))?;
    }
    Ok(dir)
}

fn load_resume(path: &Path) -> Option<Resume> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = String::new();
    std::fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .ok()?
        .read_to_string(&mut text)
        .ok()?;
    let mut fields = text.split_whitespace();
    let mut resume = Resume::new(
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
        fields.next()?.parse().ok()?,
    );
    // Older files have no host: the session is looked for on the client's
    // first choice.
    resume.server = fields.next().and_then(|s| s.parse().ok());
    Some(resume)
}

/// Writes the file beside its place, mode 0600, and renames it over: a
/// symlink planted there is replaced, never followed.
fn save_resume(path: &Path, client: &Client) {
    use std::os::unix::fs::OpenOptionsExt;
    let r = client.resume_point();
    let temporary = path.with_extension(format!("{}.new", std::process::id()));
    let written = std::fs::File::options()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut f| {
            let server = r.server.map(|s| s.to_string()).unwrap_or_default();
            writeln!(
                f,
                "{} {} {} {server}",
                r.incarnation, r.next_seq, r.next_request_id
            )
        })
        .and_then(|()| std::fs::rename(&temporary, path));
    // Best effort: without it the next command opens a new session.
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
}

/// The exit code that tells a script what became of a task.
fn task_exit(status: &TaskStatus) -> u8 {
    match status {
        TaskStatus::Done(_) => 0,
        TaskStatus::Failed(_) => exit::TASK_FAILED,
        TaskStatus::Cancelled(_) => exit::TASK_CANCELLED,
        TaskStatus::Unknown => exit::TASK_UNKNOWN,
        TaskStatus::Scheduled | TaskStatus::Queued | TaskStatus::Running => exit::TASK_PENDING,
    }
}

/// Runs one client command; the exit code says how it went (see `exit`).
fn client(args: ClientArgs) -> Result<u8, String> {
    let client_id = args.client_id.unwrap_or_else(default_client_id);
    let saved = session_file(&args.server, client_id);
    let names = ServerNames::new(args.server.clone());
    let servers = names.resolve().map_err(|e| {
        format!(
            "cannot find the server {}: {e} (give HOST:PORT, e.g. 127.0.0.1:7900)",
            args.server.join(",")
        )
    })?;
    let mut config = ClientConfig::with_servers(servers, client_id);
    // Names (not addresses) are looked up again while the command runs.
    if args.server.iter().any(|s| s.parse::<SocketAddr>().is_err()) {
        config.names = Some(names);
    }
    config.ttl = args.ttl;
    config.key = load_key(args.key_file.as_ref())?;
    config.name = "tether-cli".into();
    config.resume = saved.as_deref().and_then(load_resume);
    let connect = |config: ClientConfig| {
        Client::connect(config).map_err(|e| match e {
            ClientError::Timeout => format!(
                "no answer from {}: is `tether serve` running there, and is the key file right?",
                args.server.join(", ")
            ),
            e => e.to_string(),
        })
    };
    let payload = match &args.action {
        ClientAction::Submit { payload, .. } => Some(parse_payload(payload)?),
        _ => None,
    };
    if matches!(args.action, ClientAction::Hello) {
        config.ack_every = 1;
        config.heartbeat_interval = Some(Duration::from_millis(50));
    }
    let c = connect(config)?;
    let outcome = run_action(&c, args.action, payload.unwrap_or_default());
    // Whatever happened after connecting, the session's place (sequence
    // numbers) is kept: a command that failed must not make the next one
    // open a new session, which would cancel this one's tasks.
    match (&saved, &outcome) {
        (Some(saved), Ok(Acted::Interrupted)) => {
            // As the user asked to stop: end the session too.
            let _ = std::fs::remove_file(saved);
        }
        (Some(saved), _) => save_resume(saved, &c),
        (None, _) => {}
    }
    match outcome? {
        Acted::Code(code) => Ok(code),
        Acted::Interrupted => {
            if let Err(e) = c.bye() {
                eprintln!("could not close the session: {e}");
            }
            Ok(exit::INTERRUPTED)
        }
    }
}

/// How a client command ended.
enum Acted {
    /// With this exit code.
    Code(u8),
    /// Ctrl-C while following a task.
    Interrupted,
}

fn run_action(c: &Client, action: ClientAction, payload: Vec<u8>) -> Result<Acted, String> {
    let code = match action {
        ClientAction::Hello => {
            let (client_id, incarnation) = c.session();
            let until = Instant::now() + Duration::from_secs(2);
            while c.rtt().is_none() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            say!(
                "session {client_id}/{incarnation}: TTL {:?}, tick {:?}, round trip {}, host {}",
                c.ttl(),
                c.tick(),
                c.rtt().map_or("unknown".into(), |r| format!("{r:?}")),
                c.server()
            );
            0
        }
        ClientAction::Submit {
            job,
            delay,
            deadline,
            follow,
            ..
        } => {
            let task = c
                .submit_with(
                    &job,
                    &payload,
                    SubmitOptions::new().delay(delay).deadline(deadline),
                )
                .map_err(|e| e.to_string())?;
            say!("task {task}");
            if !follow {
                eprintln!(
                    "the task lives while this client's session does, about {:?} from now unless another command continues it",
                    c.ttl()
                );
                return Ok(Acted::Code(0));
            }
            match follow_task(c, task)? {
                Followed::Ended(status) => task_exit(&status),
                Followed::Interrupted => return Ok(Acted::Interrupted),
            }
        }
        ClientAction::Status { task } => {
            let status = c.status(TaskId(task)).map_err(|e| e.to_string())?;
            say!("task {task}: {}", describe(&status));
            task_exit(&status)
        }
        ClientAction::Cancel { task } => {
            let outcome = c.cancel(TaskId(task)).map_err(|e| e.to_string())?;
            let (text, code) = match outcome {
                CancelOutcome::CancelledNow => ("cancelled", 0),
                CancelOutcome::AlreadyFinished => ("already finished; nothing changed", 0),
                CancelOutcome::UnknownTask => ("unknown task", exit::TASK_UNKNOWN),
            };
            say!("task {task}: {text}");
            code
        }
    };
    Ok(Acted::Code(code))
}

enum Followed {
    /// The task reached this state (or the server no longer knows it).
    Ended(TaskStatus),
    /// Ctrl-C: the task was cancelled at the user's request.
    Interrupted,
}

fn ending(interrupted: bool, status: TaskStatus) -> Followed {
    if interrupted {
        Followed::Interrupted
    } else {
        Followed::Ended(status)
    }
}

/// Waits for the task's final state, heartbeating (the client does that in
/// the background); Ctrl-C sends CANCEL, then waits for the cancellation.
fn follow_task(c: &Client, task: TaskId) -> Result<Followed, String> {
    let interrupted = Arc::new(AtomicBool::new(false));
    // In this order: a first Ctrl-C sets the flag (the task is cancelled
    // and waited for), a second one, with the flag already set, exits at
    // once with 130 (when the server does not answer, or the job ignores
    // its flag).
    signal_hook::flag::register_conditional_shutdown(
        signal_hook::consts::SIGINT,
        i32::from(exit::INTERRUPTED),
        Arc::clone(&interrupted),
    )
    .and_then(|_| {
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&interrupted))
    })
    .map_err(|e| format!("cannot watch for Ctrl-C: {e}"))?;
    let mut cancel_sent = false;
    let mut last_ask = Instant::now();
    loop {
        match c.next_event(Duration::from_millis(200)) {
            Some(ClientEvent::TaskEnded { task: t, status }) if t == task => {
                say!("task {task}: {}", describe(&status));
                return Ok(ending(cancel_sent, status));
            }
            Some(ClientEvent::Moved { from, to }) => {
                eprintln!(
                    "{from} stopped answering; moving to {to} (a task on {from} ends when its session expires there)"
                );
            }
            Some(ClientEvent::SessionLost { .. }) => {
                eprintln!("the server lost the session (it expired); opening a new one");
            }
            _ => {}
        }
        if interrupted.load(Ordering::Acquire) && !cancel_sent {
            cancel_sent = true;
            eprintln!("interrupted: cancelling task {task} (Ctrl-C again to stop waiting)");
            if let Err(e) = c.cancel(task) {
                eprintln!("could not cancel task {task}: {e}");
                return Ok(Followed::Interrupted);
            }
        }
        // The push may have been lost: ask now and then.
        if last_ask.elapsed() >= Duration::from_secs(2) {
            last_ask = Instant::now();
            let status = match c.status(task) {
                Ok(status) => status,
                Err(_) if cancel_sent => return Ok(Followed::Interrupted),
                Err(e) => return Err(e.to_string()),
            };
            if status.is_final() || status == TaskStatus::Unknown {
                say!("task {task}: {}", describe(&status));
                return Ok(ending(cancel_sent, status));
            }
        }
    }
}
