//! The command line: the flags, and which side a run measures.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Clone)]
#[command(
    name = "tether-load",
    version,
    about = "Load generator for tether: many heartbeating clients, with correctness accounting.",
    after_help = "Example: tether-load --server 127.0.0.1:7900 --clients 100000 --duration 60s --silent 0.01 --ack 0.01 --pid $(pgrep -n tether)"
)]
pub struct Args {
    /// Server address (UDP).
    #[arg(long, default_value = "127.0.0.1:7900", value_name = "ADDR")]
    pub server: SocketAddr,
    /// Simulated clients, 1 to 1,000,000.
    #[arg(long, default_value_t = 10_000, value_name = "N")]
    pub clients: usize,
    /// Each client heartbeats once per interval.
    #[arg(long, default_value = "1s", value_parser = parse_duration, value_name = "D")]
    pub interval: Duration,
    /// TTL the clients ask for in HELLO.
    #[arg(long, default_value = "3s", value_parser = parse_duration, value_name = "D")]
    pub ttl: Duration,
    /// How long the heartbeat phase lasts.
    #[arg(long, default_value = "30s", value_parser = parse_duration, value_name = "D")]
    pub duration: Duration,
    /// Fraction of clients that submit a long `sleep` task and then, at a
    /// random moment, stop sending.
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    pub silent: f64,
    /// Fraction of heartbeats that ask for HEARTBEAT_ACK (round-trip times).
    #[arg(long, default_value_t = 0.0, value_name = "F")]
    pub ack: f64,
    /// Shared secret of a keyed server.
    #[arg(long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,
    /// The server's pid, to read its CPU time and memory from /proc.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Local UDP sockets the clients are spread over.
    #[arg(long, default_value_t = 64, value_name = "N")]
    pub sockets: usize,
    /// Print one JSON line on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Write an SVG histogram of detection lateness and round-trip time.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// First send the same traffic to a bare batched-receive sink inside
    /// this tool, then to the server, and compare their CPU per datagram.
    #[arg(long)]
    pub compare_raw: bool,
    /// Only measure the raw sink.
    #[arg(long, conflicts_with = "compare_raw")]
    pub raw_only: bool,
    /// How the raw sink reads. 0: the naive reader, one batch per wake-up,
    /// on a plain `SO_RCVBUF` (not what `tether serve --coalesce 0` does).
    /// A wait D: the floor for a reader that batches like `tether serve
    /// --coalesce D`: tether's receive buffer, reads until the socket is
    /// empty, and a sleep of D after a round of two or more datagrams.
    #[arg(long, default_value = "0s", value_parser = parse_duration, value_name = "D")]
    pub sink_coalesce: Duration,
    /// The order the clients' heartbeats go out in each interval. `random`
    /// (a fixed permutation, the same every run): the server meets its
    /// sessions scattered over memory, as it would in the field, while
    /// HELLOs still go in index order. `index`: client after client, so
    /// the server walks its session table nearly in order (the older,
    /// friendlier figures). Default: random (not with --servers, whose
    /// clients go in index order).
    #[arg(long, value_enum, value_name = "ORDER")]
    pub order: Option<Order>,
    /// Send every datagram at its own moment, one per system call, as
    /// independent clients do, instead of gathering each few hundred
    /// microseconds' worth into GSO runs: the server then meets arrivals
    /// spread evenly over the interval (at 100K clients, one every 10 µs)
    /// rather than in bursts. The sender thread spins between sends, so it
    /// takes a core. Not with --servers.
    #[arg(long)]
    pub pace: bool,
    /// Fraction of the live clients whose heartbeats ask for an ACK in one
    /// more interval after the measured phase; those unanswered ask again
    /// with the load stopped. A live client whose session is gone counts as
    /// a false expiry whether the server says so (UNKNOWN_SESSION) or stays
    /// silent. Default: 0.1 (0 turns it off; not with --servers).
    #[arg(long, value_name = "F")]
    pub final_check: Option<f64>,
    /// Instead of a load run: count the server's wake-ups (voluntary context
    /// switches, all threads) over this long while idle. Needs --pid.
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    pub idle: Option<Duration>,
    /// During the measured phase, also send this many junk datagrams as
    /// fast as possible from another socket: random bytes, broken headers,
    /// bad MACs, replays of the clients' own datagrams, HEARTBEATs for
    /// unknown sessions. Checked against the server's counters with
    /// --metrics.
    #[arg(long, value_name = "N")]
    pub junk: Option<u64>,
    /// During the measured phase, also send HELLOs for this many new client
    /// ids as fast as possible (against --max-sessions).
    #[arg(long, value_name = "N")]
    pub hello_flood: Option<u64>,
    /// Datagrams a second for --junk and --hello-flood (default: as fast as
    /// the socket takes them).
    #[arg(long, value_name = "N")]
    pub flood_rate: Option<u64>,
    /// The server's metrics endpoint (ADDR of `tether serve --metrics ADDR`),
    /// to check its drop counters against what was sent.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Stop the server (SIGSTOP, needs --pid) this long, a third of the way
    /// into the measured phase, while the clients keep sending; then
    /// SIGCONT. Heartbeats queued in its socket meanwhile must count.
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    pub stall: Option<Duration>,
    /// Open every session at once, as a fleet does when its server comes
    /// back: each client says HELLO once within the first interval, then
    /// retries with exponential backoff and full jitter (capped at the
    /// TTL) until welcomed, while the welcomed ones heartbeat. Measured
    /// from the first HELLO, with a line a second: sessions welcomed, false
    /// expiries, kernel drops at each of the server's sockets.
    #[arg(long)]
    pub herd: bool,
    /// The first HELLO retry's backoff ceiling, doubled each try (the Rust
    /// client's `retry_after`).
    #[arg(long, default_value = "250ms", value_parser = parse_duration, value_name = "D")]
    pub hello_retry: Duration,
    /// Fraction of heartbeats lost on the way (dropped before sending). An
    /// expiry of a client that had sent nothing for a TTL is counted as
    /// explained by the loss, apart from false ones.
    #[arg(long, default_value_t = 0.0, value_name = "P")]
    pub loss: f64,
    /// Send one datagram per sendmmsg entry instead of UDP GSO runs of up
    /// to 64 (to compare the two).
    #[arg(long)]
    pub no_gso: bool,
    /// The server's shard count (`tether serve --shards`): a GSO run never
    /// mixes clients of different shards, since the kernel steers a whole
    /// GSO message by its first datagram. Read from --metrics when not
    /// given; 1 without either.
    #[arg(long, value_name = "N")]
    pub shards: Option<u32>,
    /// Several servers (comma-separated): each client picks its host by
    /// rendezvous hashing of its id and moves to the next in its order when
    /// the host is silent for a TTL, as the tether clients do. Takes
    /// --clients, --interval, --ttl, --duration, --sockets, --key-file,
    /// --hello-retry, --json, --kill-at with --pid, and --allow-remote.
    #[arg(long, value_name = "ADDR,ADDR...", value_delimiter = ',', num_args = 1..)]
    pub servers: Vec<SocketAddr>,
    /// With --servers: SIGKILL the server --pid this long into the measured
    /// phase, and report how its clients moved.
    #[arg(long, value_parser = parse_duration, value_name = "D", requires = "servers", requires = "pid")]
    pub kill_at: Option<Duration>,
    /// Allow a target outside the loopback range.
    #[arg(long)]
    pub allow_remote: bool,
}

impl Args {
    /// The heartbeats' order, by default random.
    pub fn order(&self) -> Order {
        self.order.unwrap_or(Order::Random)
    }

    /// The share of live clients the final check asks, by default a tenth.
    pub fn final_check_share(&self) -> f64 {
        self.final_check.unwrap_or(0.1)
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|_| "write durations like 250ms, 3s or 1h".to_owned())
}

/// The order of the heartbeats within an interval.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Order {
    Index,
    Random,
}

/// The side a run sends its clients to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Server,
    Sink,
}
