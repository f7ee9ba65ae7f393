//! The `tether` command: parses arguments into a configuration, runs the
//! server, and turns the outcome into an exit code. Nothing else lives here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use tether::engine;
use tether::server::{Server, ServerConfig, ServerError, RECV_BUFFER_BYTES};
use tether::Registry;

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
    /// Worker threads running tasks [default: number of cores].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
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
    /// anyway.
    #[arg(long, default_value = "5s", value_parser = parse_duration, value_name = "DURATION")]
    grace: Duration,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|_| "write durations like 250ms, 3s or 1h".to_owned())
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
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("tether: error: {}", one_line(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Serve(args) => match serve(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(Failure::Aborted(e)) => {
                eprintln!("tether: {e}");
                ExitCode::from(130)
            }
            Err(Failure::Error(e)) => {
                eprintln!("tether: error: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Clap's message without its "error: " prefix, usage block and blank
/// lines, so a bad flag costs the user one line to read.
fn one_line(clap_message: &str) -> String {
    let first = clap_message.lines().next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    format!("{first}; see tether --help")
}

enum Failure {
    Error(String),
    Aborted(ServerError),
}

fn millis(d: Duration, flag: &str) -> Result<u32, String> {
    if d.subsec_nanos() % 1_000_000 != 0 {
        return Err(format!("--{flag} must be whole milliseconds, got {d:?}"));
    }
    u32::try_from(d.as_millis()).map_err(|_| format!("--{flag} {d:?} is too long"))
}

fn config(args: &ServeArgs) -> Result<ServerConfig, String> {
    let tick_ms = millis(args.tick, "tick")?;
    if tick_ms == 0 {
        return Err("--tick must be at least 1ms".into());
    }
    let (ttl, min_ttl, max_ttl) = (
        millis(args.ttl, "ttl")?,
        millis(args.min_ttl, "min-ttl")?,
        millis(args.max_ttl, "max-ttl")?,
    );
    if min_ttl == 0 || !(min_ttl <= ttl && ttl <= max_ttl) {
        return Err(format!(
            "TTLs must satisfy 0 < --min-ttl ({min_ttl}ms) <= --ttl ({ttl}ms) <= --max-ttl ({max_ttl}ms)"
        ));
    }
    if args.max_sessions == 0 || args.max_sessions > u32::MAX as usize / 2 {
        return Err("--max-sessions must be between 1 and 2147483647".into());
    }
    let key = match &args.key_file {
        Some(path) => Some(tether::keyfile::load(path).map_err(|e| e.to_string())?),
        None => None,
    };
    let workers = match args.workers {
        Some(0) => return Err("--workers must be at least 1".into()),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(2, |n| n.get()),
    };
    Ok(ServerConfig {
        listen: args.listen,
        engine: engine::Config {
            tick_us: u64::from(tick_ms) * 1000,
            default_ttl_ms: ttl,
            min_ttl_ms: min_ttl,
            max_ttl_ms: max_ttl,
            max_sessions: args.max_sessions,
            max_client_records: args.max_sessions,
            max_tasks_per_session: args.max_tasks_per_session.max(1),
            max_waiting_tasks: args.queue.max(1),
            key,
            ..engine::Config::default()
        },
        workers,
        grace: args.grace,
        insecure_bind: args.insecure_bind,
        handle_signals: true,
    })
}

fn serve(args: ServeArgs) -> Result<(), Failure> {
    let config = config(&args).map_err(Failure::Error)?;
    let keyed = config.engine.key.is_some();
    let workers = config.workers;
    let server = Server::bind(config, Registry::with_standard_jobs())
        .map_err(|e| Failure::Error(e.to_string()))?;
    let granted = server.recv_buffer_granted();
    eprintln!(
        "tether: receive buffer {granted} bytes (asked {RECV_BUFFER_BYTES}); {workers} workers; {}",
        if keyed {
            "keyed (HMAC-SHA256)"
        } else {
            "keyless"
        }
    );
    // Linux reports twice the usable size it grants.
    if granted < RECV_BUFFER_BYTES {
        eprintln!(
            "tether: warning: the kernel capped the receive buffer at {granted} bytes; heartbeats \
             queued during a stall may be dropped. Raise the cap with: \
             sysctl -w net.core.rmem_max={RECV_BUFFER_BYTES}"
        );
    }
    println!("listening on {}", server.local_addr());
    use std::io::Write;
    let _ = std::io::stdout().flush();
    match server.run() {
        Ok(report) => {
            if !report.ignored_cancel.is_empty() {
                let ids: Vec<String> = report
                    .ignored_cancel
                    .iter()
                    .map(|t| t.to_string())
                    .collect();
                eprintln!(
                    "tether: {} task(s) ignored their cancel flag past the grace period: {}",
                    ids.len(),
                    ids.join(", ")
                );
            }
            eprintln!(
                "tether: stopped: {} sessions opened, {} expired, {} tasks done, {} failed, {} cancelled",
                report.stats.sessions_opened,
                report.stats.sessions_expired,
                report.stats.tasks_done,
                report.stats.tasks_failed,
                report.stats.tasks_cancelled
            );
            Ok(())
        }
        Err(e @ ServerError::Aborted { .. }) => Err(Failure::Aborted(e)),
        Err(e) => Err(Failure::Error(e.to_string())),
    }
}
