//! What a run measured, and the summary made of it: a table (on stdout, or
//! stderr with `--json`), one JSON line, and optionally an SVG histogram.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use crate::args::{Args, Target};
use crate::junk;
use crate::receiver::Received;
use crate::report::{histogram_svg, Json, Percentiles};

/// The outcome of one run against one target.
pub struct RunResult {
    pub target: Target,
    pub clients: usize,
    pub phase: Duration,
    pub heartbeats: u64,
    pub send_errors: u64,
    /// Bytes the live clients sent, all run long (opening included).
    pub bytes_sent: u64,
    pub target_rate: f64,
    pub silent: usize,
    /// Silent clients whose expiry never came (those whose session had
    /// expired before they fell silent are not among them).
    pub silent_missed: usize,
    /// Opened as a herd: when the last session was welcomed (from the
    /// first HELLO), and a reading a second.
    pub herd: bool,
    pub welcomed_by: Option<Duration>,
    pub timeline: Vec<crate::timeline::Sample>,
    pub hellos: u64,
    /// Heartbeats dropped on purpose (`--loss`).
    pub lost: u64,
    /// Whether the datagrams left as GSO runs.
    pub gso: bool,
    /// `--pace`: one datagram a system call, each at its moment.
    pub paced: bool,
    /// Expiries of clients that had sent nothing for a TTL.
    pub explained: usize,
    /// The server's live sessions and the clients this run believes
    /// alive, after the last heartbeats (`--metrics`).
    pub live_check: Option<(u64, u64)>,
    /// The final check (`--final-check`), after the measured phase.
    pub final_check: Option<FinalCheck>,
    pub received: Received,
    pub welcomed: usize,
    pub refused: usize,
    pub detected: usize,
    pub false_expiries: usize,
    /// CPU the measured side (server process, or the sink thread) used
    /// during the heartbeat phase, and the datagrams it got.
    pub target_cpu: Option<Duration>,
    pub target_datagrams: u64,
    pub target_peak_rss_kb: Option<u64>,
    pub bytes_per_session: Option<f64>,
    pub tool_cpu: Duration,
    pub sender_cpu: Duration,
    /// Datagrams the kernel dropped for full receive buffers, machine-wide,
    /// during the measured phase.
    pub kernel_drops: Option<u64>,
    /// What the junk and HELLO floods sent and got back.
    pub hostile: Option<Hostile>,
}

/// The final check: live clients asked for an ACK after the measured
/// phase, those unanswered asked again with the load stopped.
#[derive(Clone, Copy, Default)]
pub struct FinalCheck {
    pub asked: usize,
    pub answered: usize,
    /// Found their session gone: the server said UNKNOWN_SESSION (or
    /// pushed an expiry), counted among the false or explained expiries.
    pub said_gone: usize,
    /// Never answered at all, with the load stopped and three asks: counted
    /// as false expiries (a session the server lost without a word).
    pub never_answered: usize,
    /// The asks repeated with the load stopped.
    pub asked_again: usize,
}

/// The hostile side of a run: what was sent, and the server's counters
/// before and after.
pub struct Hostile {
    pub junk: Option<junk::JunkReport>,
    pub hellos: Option<junk::JunkReport>,
    pub counters: Option<(HashMap<String, f64>, HashMap<String, f64>)>,
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

/// How much `series` grew between two scrapes, summed over its labels (the
/// drop counter has one per listening socket).
fn counter_delta(before: &HashMap<String, f64>, after: &HashMap<String, f64>, series: &str) -> u64 {
    let value = |scrape| junk::series_sum(scrape, series).unwrap_or(0.0);
    (value(after) - value(before)).max(0.0) as u64
}

fn describe_hostile(h: &Hostile, text: &mut String, json: &mut Json) {
    if let Some(junk) = &h.junk {
        describe_junk(junk, text, json);
        match &h.counters {
            Some((before, after)) => check_junk_counters(junk, before, after, text, json),
            None => {
                let _ = writeln!(
                    text,
                    "  server counters         not read (pass --metrics ADDR of the server's --metrics)"
                );
            }
        }
    }
    if let Some(hellos) = &h.hellos {
        describe_hello_flood(hellos, text, json);
        if let Some((before, after)) = &h.counters {
            describe_refusals(before, after, text, json);
        }
    }
    if let Some((before, after)) = &h.counters {
        let drops = counter_delta(before, after, "tether_receive_buffer_drops_total");
        json.num("server_kernel_drops", drops);
    }
}

/// What the junk flood sent, what came back, and the amplification.
fn describe_junk(junk: &junk::JunkReport, text: &mut String, json: &mut Json) {
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
}

/// Checks the server's drop counters against the junk sent, cause by cause.
fn check_junk_counters(
    junk: &junk::JunkReport,
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    text: &mut String,
    json: &mut Json,
) {
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
}

/// What the HELLO flood sent, how it was answered, and the amplification.
fn describe_hello_flood(hellos: &junk::JunkReport, text: &mut String, json: &mut Json) {
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
}

/// The server's side of the HELLO flood: sessions refused, answers withheld.
fn describe_refusals(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    text: &mut String,
    json: &mut Json,
) {
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

/// The numbers derived from one run that its table rows and its JSON share.
struct Figures {
    name: &'static str,
    rate: f64,
    tool_pct: f64,
    sender_pct: f64,
    target_pct: Option<f64>,
    per_dgram: Option<f64>,
    late_p: Percentiles,
    rtt_p: Percentiles,
    bottleneck: &'static str,
}

impl Figures {
    fn of(r: &RunResult) -> Figures {
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
        Figures {
            name,
            rate,
            tool_pct,
            sender_pct,
            target_pct,
            per_dgram,
            late_p,
            rtt_p,
            bottleneck,
        }
    }
}

/// One run's section of the table, up to its hostile part.
fn write_run(args: &Args, r: &RunResult, f: &Figures, text: &mut String) {
    let rate = f.rate;
    let _ = writeln!(
        text,
        "== {} ({} clients, every {:?}, TTL {:?})",
        f.name.replace('_', " "),
        r.clients,
        args.interval,
        args.ttl
    );
    let _ = writeln!(
        text,
        "  {}         {:>12}   ({rate:.0}/s of {:.0}/s target; {} send errors)",
        if r.herd {
            "datagrams sent "
        } else {
            "heartbeats sent"
        },
        r.heartbeats,
        r.target_rate,
        r.send_errors
    );
    if r.target == Target::Server {
        write_sessions(r, f, text);
    } else {
        let _ = writeln!(text, "  datagrams received      {:>12}", r.target_datagrams);
    }
    write_usage(r, f, text);
}

/// The server's correctness rows: sessions, expiries, detection, replies.
fn write_sessions(r: &RunResult, f: &Figures, text: &mut String) {
    let _ = writeln!(
        text,
        "  sessions opened         {:>12}   ({} refused)",
        r.welcomed, r.refused
    );
    if r.herd {
        let never = r.clients.saturating_sub(r.welcomed + r.refused);
        let by = r
            .welcomed_by
            .map_or("-".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()));
        let _ = writeln!(
            text,
            "  herd                    {:>12}   HELLOs sent ({:.2} per client); last welcomed {by} after the first HELLO; {never} never welcomed",
            r.hellos,
            r.hellos as f64 / r.clients.max(1) as f64
        );
    }
    let _ = writeln!(text, "  false expiries          {:>12}", r.false_expiries);
    if r.lost > 0 || r.explained > 0 {
        let _ = writeln!(
            text,
            "  explained expiries      {:>12}   (nothing sent for a TTL; {} heartbeats lost on purpose)",
            r.explained, r.lost
        );
    }
    let _ = writeln!(text, "  early expiries          {:>12}", r.received.early);
    let _ = writeln!(
        text,
        "  silent detected         {:>12}   of {} ({} never reported; {} had expired before falling silent)",
        r.detected,
        r.silent,
        r.silent_missed,
        r.silent.saturating_sub(r.detected + r.silent_missed)
    );
    let _ = writeln!(
        text,
        "  detection lateness ms   p50 {:.2}  p99 {:.2}  max {:.2}   (arrival - last send - TTL)",
        f.late_p.p50, f.late_p.p99, f.late_p.max
    );
    let _ = writeln!(
        text,
        "  round trip us           p50 {:.0}  p99 {:.0}   ({} acks)",
        f.rtt_p.p50, f.rtt_p.p99, f.rtt_p.count
    );
    if let Some(c) = r.final_check {
        let _ = writeln!(
            text,
            "  final check             {:>12}   live clients asked for an ACK after the run: {} answered, {} found their session gone, {} never answered ({} asks repeated with the load stopped)",
            c.asked, c.answered, c.said_gone, c.never_answered, c.asked_again
        );
    }
    if let Some((server, alive)) = r.live_check {
        let _ = writeln!(
            text,
            "  live sessions           {server:>12}   on the server; {alive} clients of this run alive (equal when it is the server's only client)"
        );
    }
    let _ = writeln!(
        text,
        "  replies received        {:>12}   ({} bytes, {:.3} of the {} bytes sent; {} UNKNOWN_SESSION)",
        r.received.datagrams,
        r.received.bytes,
        r.received.bytes as f64 / r.bytes_sent.max(1) as f64,
        r.bytes_sent,
        r.received.unknown_session
    );
}

/// The resource rows: CPU and memory of both sides, drops, the bottleneck.
fn write_usage(r: &RunResult, f: &Figures, text: &mut String) {
    match (f.target_pct, f.per_dgram) {
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
    let (tool_pct, sender_pct) = (f.tool_pct, f.sender_pct);
    let sending = if r.paced {
        "one datagram a call, paced"
    } else if r.gso {
        "GSO runs of up to 64"
    } else {
        "one datagram per entry"
    };
    let _ = writeln!(
        text,
        "  load tool CPU           {tool_pct:>11.1}%   (sender thread {sender_pct:.1}%{includes}; sendmmsg, {sending})"
    );
    if let Some(drops) = r.kernel_drops {
        let _ = writeln!(
            text,
            "  kernel drops            {drops:>12}   (UDP receive buffers full, whole machine)"
        );
    }
    let bottleneck = f.bottleneck;
    let _ = writeln!(text, "  bottleneck              {bottleneck}");
}

/// One run's JSON object, without its hostile part.
fn run_json(r: &RunResult, f: &Figures) -> Json {
    let mut j = Json::default();
    j.num("heartbeats", r.heartbeats)
        .float("rate", f.rate)
        .float("target_rate", r.target_rate)
        .num("send_errors", r.send_errors)
        .float("tool_cpu_pct", f.tool_pct)
        .float("sender_cpu_pct", f.sender_pct)
        .str("bottleneck", f.bottleneck)
        .num("gso", r.gso);
    if let Some(drops) = r.kernel_drops {
        j.num("kernel_rcvbuf_drops", drops);
    }
    if let Some(p) = f.target_pct {
        j.float("cpu_pct", p);
    }
    if let Some(us) = f.per_dgram {
        j.float("cpu_us_per_datagram", us);
    }
    if r.target == Target::Server {
        j.num("sessions", r.welcomed)
            .num("refused", r.refused)
            .num("false_expiries", r.false_expiries)
            .num("explained_expiries", r.explained)
            .num("heartbeats_lost", r.lost)
            .num("hellos", r.hellos)
            .num("early_expiries", r.received.early)
            .num("silent", r.silent)
            .num("silent_detected", r.detected)
            .num("silent_missed", r.silent_missed)
            .raw("lateness_ms", &f.late_p.json())
            .raw("rtt_us", &f.rtt_p.json())
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
        if let Some(c) = r.final_check {
            let mut check = Json::default();
            check
                .num("asked", c.asked)
                .num("answered", c.answered)
                .num("said_gone", c.said_gone)
                .num("never_answered", c.never_answered)
                .num("asked_again", c.asked_again);
            j.raw("final_check", &check.finish());
        }
        if let Some((server, alive)) = r.live_check {
            j.num("server_live_sessions", server)
                .num("clients_alive", alive);
        }
        if r.herd {
            let timeline: Vec<String> = r.timeline.iter().map(|s| s.json()).collect();
            j.num("herd", true)
                .num(
                    "never_welcomed",
                    r.clients.saturating_sub(r.welcomed + r.refused),
                )
                .raw("timeline", &format!("[{}]", timeline.join(",")));
            if let Some(by) = r.welcomed_by {
                j.float("welcomed_by_s", by.as_secs_f64());
            }
        }
        if let Some(b) = r.bytes_per_session {
            j.float("bytes_per_session", b);
        }
    }
    j
}

/// With a raw sink run and a server run, how their CPU per datagram compare.
fn write_ratio(results: &[RunResult], text: &mut String, json: &mut Json) {
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
}

/// Writes the SVG histograms to `path`, noting the outcome in the table.
fn write_plot(path: &Path, lateness: &[f64], rtt: &[f64], text: &mut String) {
    let svg = histogram_svg(&[
        ("detection lateness", "ms past the TTL", lateness),
        ("heartbeat round trip", "microseconds", rtt),
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

/// Prints the table and, with `--json`, the JSON line (the table then on
/// stderr, so stdout stays one line).
pub fn summarize(args: &Args, results: &[RunResult]) {
    let mut text = String::new();
    let mut lateness = Vec::new();
    let mut rtt = Vec::new();
    let mut json = Json::default();
    json.num("clients", args.clients)
        .num("interval_ms", args.interval.as_millis())
        .num("ttl_ms", args.ttl.as_millis())
        .num("duration_s", args.duration.as_secs_f64())
        .num("keyed", args.key_file.is_some())
        .num("herd", args.herd)
        .float("loss", args.loss)
        .str(
            "order",
            match args.order() {
                crate::args::Order::Random => "random",
                crate::args::Order::Index => "index",
            },
        )
        .num("pace", args.pace)
        .float("final_check", args.final_check_share());
    for r in results {
        let figures = Figures::of(r);
        write_run(args, r, &figures, &mut text);
        let mut j_hostile = Json::default();
        if let Some(h) = &r.hostile {
            describe_hostile(h, &mut text, &mut j_hostile);
        }
        let mut j = run_json(r, &figures);
        if r.target == Target::Server {
            lateness.extend_from_slice(&r.received.lateness_ms);
            rtt.extend_from_slice(&r.received.rtt_us);
        }
        if r.hostile.is_some() {
            j.raw("hostile", &j_hostile.finish());
        }
        json.raw(figures.name, &j.finish());
    }
    write_ratio(results, &mut text, &mut json);
    if let Some(path) = &args.plot {
        write_plot(path, &lateness, &rtt, &mut text);
    }
    if args.json {
        eprint!("{text}");
        println!("{}", json.finish());
    } else {
        print!("{text}");
    }
}
