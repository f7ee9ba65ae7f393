//! `tether top`: a full-screen view of a running server, refreshed every
//! interval from its metrics endpoint (`/metrics` for the counters,
//! `/sessions?late=1` for the clients closest to expiry).
//!
//! ```text
//!   every interval: GET /metrics ──► Sample ─┐
//!                   GET /sessions?late=1 ────┼─► View (rates from two samples) ──► render
//!                   (a few pages a turn,     │
//!                    resumed where it left)  ┘
//! ```
//!
//! Not on a terminal (or with `--once`) it prints one frame as text and
//! exits, which is what the tests read.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::layout::{Constraint, Direction, Layout, Rect};
use ratatui::style::{Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{BarChart, Block, Borders, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use serde_json::Value;

use super::sessions::get;

/// `/sessions` pages read per refresh, at most: the late clients are
/// looked for in up to this many pages (of at most 4096 slab slots each,
/// some 50 µs of the loop's time a page) a turn, resuming where the last
/// turn stopped; a sweep of a million sessions takes a few turns.
const LATE_PAGES_PER_TURN: usize = 64;

/// Late clients shown.
const LATE_SHOWN: usize = 10;

/// One scrape of `/metrics`: each series' value, shards summed (the
/// `shard` label dropped).
#[derive(Debug, Clone, Default)]
pub struct Sample {
    values: HashMap<String, f64>,
    /// Event loops seen (distinct `shard` labels; 1 without any).
    loops: usize,
}

impl Sample {
    /// Parses the OpenMetrics text.
    pub fn parse(text: &str) -> Sample {
        let mut values = HashMap::new();
        let mut shards = std::collections::HashSet::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            if let Some(at) = line.find("shard=\"") {
                let rest = &line[at + 7..];
                shards.insert(rest[..rest.find('"').unwrap_or(0)].to_owned());
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            *values.entry(without_shard(series)).or_insert(0.0) += value;
        }
        Sample {
            values,
            loops: shards.len().max(1),
        }
    }

    fn get(&self, series: &str) -> f64 {
        self.values.get(series).copied().unwrap_or(0.0)
    }
}

/// `name{a="x",shard="1"}` as `name{a="x"}`; `name{shard="0"}` as `name`.
fn without_shard(series: &str) -> String {
    let Some((name, labels)) = series.split_once('{') else {
        return series.to_owned();
    };
    let labels = labels.trim_end_matches('}');
    let kept: Vec<&str> = labels
        .split(',')
        .filter(|l| !l.starts_with("shard=") && !l.is_empty())
        .collect();
    if kept.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{}}}", kept.join(","))
    }
}

/// A client close to expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct LateClient {
    pub client_id: String,
    pub peer: String,
    pub silent_ms: u64,
    pub ttl_ms: u64,
}

/// What one frame shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    pub server: String,
    pub sessions: f64,
    pub heartbeats_per_s: f64,
    pub opened_per_s: f64,
    /// Sessions ended a second, by reason.
    pub ended_per_s: Vec<(String, f64)>,
    /// Unfinished tasks by state.
    pub tasks: Vec<(String, f64)>,
    /// Datagrams dropped a second, by cause (kernel buffer drops too).
    pub drops_per_s: Vec<(String, f64)>,
    /// Expiries decided in the last interval, by lateness bucket (upper
    /// bound, count).
    pub lateness: Vec<(String, u64)>,
    /// Share of the interval the event loops spent working (not waiting),
    /// averaged over them.
    pub loop_busy: f64,
    /// How many event loops (shards) the server runs.
    pub loops: usize,
    pub late: Vec<LateClient>,
    pub status: String,
}

const ENDED: [&str; 4] = ["expired", "left", "replaced", "shutdown"];
const TASK_STATES: [&str; 3] = ["scheduled", "queued", "running"];
const DROP_CAUSES: [&str; 6] = [
    "malformed",
    "bad_mac",
    "replay",
    "unknown_session",
    "stale_hello",
    "too_large",
];
const LATENESS_BUCKETS: [(&str, &str); 6] = [
    ("0.001", "1ms"),
    ("0.005", "5ms"),
    ("0.01", "10ms"),
    ("0.05", "50ms"),
    ("0.1", "100ms"),
    ("+Inf", "more"),
];

impl View {
    /// The view from the samples `before` and `now`, `elapsed` apart.
    pub fn from_samples(before: &Sample, now: &Sample, elapsed: Duration) -> View {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = |series: &str| ((now.get(series) - before.get(series)) / secs).max(0.0);
        let mut drops: Vec<(String, f64)> = DROP_CAUSES
            .iter()
            .map(|c| {
                let series = format!("tether_datagrams_dropped_total{{cause=\"{c}\"}}");
                (c.replace('_', " "), rate(&series))
            })
            .collect();
        for socket in ["members", "strangers"] {
            let series = format!("tether_receive_buffer_drops_total{{socket=\"{socket}\"}}");
            drops.push((format!("kernel buffer ({socket})"), rate(&series)));
        }
        let mut lateness = Vec::new();
        let mut below = 0.0;
        for (le, label) in LATENESS_BUCKETS {
            let series = format!("tether_expiry_lateness_seconds_bucket{{le=\"{le}\"}}");
            let cumulative = now.get(&series) - before.get(&series);
            lateness.push((label.to_owned(), (cumulative - below).max(0.0) as u64));
            below = cumulative.max(below);
        }
        View {
            server: String::new(),
            sessions: now.get("tether_sessions_live"),
            heartbeats_per_s: rate("tether_heartbeats_total"),
            opened_per_s: rate("tether_sessions_opened_total"),
            ended_per_s: ENDED
                .iter()
                .map(|r| {
                    let series = format!("tether_sessions_ended_total{{reason=\"{r}\"}}");
                    ((*r).to_owned(), rate(&series))
                })
                .collect(),
            tasks: TASK_STATES
                .iter()
                .map(|s| {
                    let series = format!("tether_tasks{{state=\"{s}\"}}");
                    ((*s).to_owned(), now.get(&series))
                })
                .collect(),
            drops_per_s: drops,
            lateness,
            loops: now.loops,
            loop_busy: (rate("tether_loop_iteration_seconds_sum") / now.loops as f64).min(1.0),
            late: Vec::new(),
            status: String::new(),
        }
    }
}

/// Draws `view` into `frame`.
pub fn render(frame: &mut Frame<'_>, view: &View) {
    let rows = Layout::default()
        .direction(Direction::Vertical)
        .constraints([
            Constraint::Length(3),
            Constraint::Length(8),
            Constraint::Length(9),
            Constraint::Min(5),
            Constraint::Length(1),
        ])
        .split(frame.area());
    let bold = Style::default().add_modifier(Modifier::BOLD);

    let headline = Line::from(format!(
        "sessions {:.0}   heartbeats/s {:.0}   opened/s {:.0}   loop busy {:.0}%{}",
        view.sessions,
        view.heartbeats_per_s,
        view.opened_per_s,
        view.loop_busy * 100.0,
        if view.loops > 1 {
            format!(" (average of {} loops)", view.loops)
        } else {
            String::new()
        }
    ))
    .style(bold);
    frame.render_widget(
        Paragraph::new(headline).block(titled(&format!(" tether top: {} ", view.server))),
        rows[0],
    );

    let middle = Layout::default()
        .direction(Direction::Horizontal)
        .constraints([
            Constraint::Percentage(30),
            Constraint::Percentage(25),
            Constraint::Percentage(45),
        ])
        .split(rows[1]);
    frame.render_widget(
        Paragraph::new(per_second(&view.ended_per_s, 10)).block(titled(" sessions ended/s ")),
        middle[0],
    );
    let tasks: Vec<Line> = view
        .tasks
        .iter()
        .map(|(state, n)| Line::from(format!("{state:<10} {n:>8.0}")))
        .collect();
    frame.render_widget(Paragraph::new(tasks).block(titled(" tasks ")), middle[1]);
    frame.render_widget(
        Paragraph::new(per_second(&view.drops_per_s, 26)).block(titled(" dropped/s ")),
        middle[2],
    );

    let bars: Vec<(&str, u64)> = view
        .lateness
        .iter()
        .map(|(label, n)| (label.as_str(), *n))
        .collect();
    frame.render_widget(
        BarChart::default()
            .block(titled(
                " expiry lateness, last interval (past the deadline) ",
            ))
            .bar_width(7)
            .bar_gap(2)
            .data(&bars),
        rows[2],
    );

    let table_rows: Vec<Row> = view
        .late
        .iter()
        .map(|c| {
            Row::new(vec![
                c.client_id.clone(),
                c.peer.clone(),
                format!("{:.1}s", c.silent_ms as f64 / 1000.0),
                format!(
                    "{:.1}s",
                    c.ttl_ms.saturating_sub(c.silent_ms) as f64 / 1000.0
                ),
            ])
        })
        .collect();
    frame.render_widget(
        Table::new(
            table_rows,
            [
                Constraint::Length(22),
                Constraint::Length(24),
                Constraint::Length(10),
                Constraint::Length(10),
            ],
        )
        .header(Row::new(vec!["client", "peer", "silent", "expires in"]).style(bold))
        .block(titled(" closest to expiry (past 2/3 of their TTL) ")),
        rows[3],
    );
    frame.render_widget(Paragraph::new(view.status.as_str()), rows[4]);
}

fn titled(title: &str) -> Block<'_> {
    Block::default()
        .borders(Borders::ALL)
        .title(title.to_owned())
}

fn per_second(items: &[(String, f64)], label_width: usize) -> Vec<Line<'static>> {
    items
        .iter()
        .map(|(what, n)| Line::from(format!("{what:<label_width$} {n:>9.1}")))
        .collect()
}

/// Reads up to [`LATE_PAGES_PER_TURN`] pages of late sessions from the
/// sweep's cursor into `sweep`; true when the sweep reached the end.
fn late_clients(
    metrics: SocketAddr,
    cursor: &mut Option<String>,
    found: &mut Vec<(LateClient, Instant)>,
) -> Result<bool, String> {
    for _ in 0..LATE_PAGES_PER_TURN {
        let mut path = "/sessions?late=1&limit=1000".to_owned();
        if let Some(after) = cursor.as_deref() {
            path.push_str("&after=");
            path.push_str(after);
        }
        let page: Value = serde_json::from_str(&get(metrics, &path)?)
            .map_err(|e| format!("/sessions is not JSON: {e}"))?;
        let read = Instant::now();
        for s in page["sessions"].as_array().into_iter().flatten() {
            let text = |k: &str| s[k].as_str().unwrap_or_default().to_owned();
            let client = LateClient {
                client_id: text("client_id"),
                peer: text("peer"),
                silent_ms: s["silent_ms"].as_u64().unwrap_or(0),
                ttl_ms: s["ttl_ms"].as_u64().unwrap_or(0),
            };
            found.push((client, read));
        }
        *cursor = page["next"].as_str().map(str::to_owned);
        if cursor.is_none() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The late clients to show from what sweeps found: each aged by the time
/// since it was read (one that has gone past its TTL since has expired, or
/// heartbeated: either way it is no longer shown), soonest to expire first.
fn closest(found: &[(LateClient, Instant)], now: Instant) -> Vec<LateClient> {
    // A client read by both sweeps counts by its latest reading.
    let mut latest: HashMap<&str, &(LateClient, Instant)> = HashMap::new();
    for entry in found {
        let kept = latest.entry(entry.0.client_id.as_str()).or_insert(entry);
        if entry.1 > kept.1 {
            *kept = entry;
        }
    }
    let mut shown: Vec<LateClient> = latest
        .into_values()
        .map(|(c, read)| LateClient {
            silent_ms: c.silent_ms + now.saturating_duration_since(*read).as_millis() as u64,
            ..c.clone()
        })
        .filter(|c| c.silent_ms < c.ttl_ms)
        .collect();
    shown.sort_by_key(|c| c.ttl_ms.saturating_sub(c.silent_ms));
    shown.truncate(LATE_SHOWN);
    shown
}

/// One refresh: a new sample and the view from the last one.
struct Watcher {
    metrics: SocketAddr,
    last: Option<(Sample, Instant)>,
    cursor: Option<String>,
    /// Late clients found by the sweep under way, and by the last whole one.
    sweeping: Vec<(LateClient, Instant)>,
    swept: Vec<(LateClient, Instant)>,
}

impl Watcher {
    fn turn(&mut self) -> View {
        let now = Instant::now();
        let sample = match get(self.metrics, "/metrics") {
            Ok(text) => Sample::parse(&text),
            Err(e) => {
                return View {
                    server: self.metrics.to_string(),
                    status: format!("{e}; retrying"),
                    ..View::default()
                }
            }
        };
        let (before, at) = self.last.take().unwrap_or((sample.clone(), now));
        let mut view = View::from_samples(&before, &sample, now - at);
        view.server = self.metrics.to_string();
        match late_clients(self.metrics, &mut self.cursor, &mut self.sweeping) {
            Ok(true) => self.swept = std::mem::take(&mut self.sweeping),
            Ok(false) => {}
            Err(e) => view.status = e,
        }
        let seen: Vec<(LateClient, Instant)> =
            self.swept.iter().chain(&self.sweeping).cloned().collect();
        view.late = closest(&seen, Instant::now());
        self.last = Some((sample, now));
        view
    }
}

/// Runs the view until q, Esc or Ctrl-C; with `once` (or stdout not a
/// terminal), prints one frame as text instead (taken over `interval`, so
/// its rates are real).
pub fn run(metrics: SocketAddr, interval: Duration, once: bool) -> Result<(), String> {
    let mut watcher = Watcher {
        metrics,
        last: None,
        cursor: None,
        sweeping: Vec::new(),
        swept: Vec::new(),
    };
    if once || !std::io::stdout().is_terminal() {
        get(metrics, "/metrics")?; // an unreachable server is an error here
        watcher.turn();
        std::thread::sleep(interval);
        let view = watcher.turn();
        print!("{}", frame_text(&view, 100, 40));
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = (|| -> Result<(), String> {
        let mut view = watcher.turn();
        let mut next = Instant::now();
        loop {
            if Instant::now() >= next {
                view = watcher.turn();
                if view.status.is_empty() {
                    view.status = "q or Esc to quit".into();
                }
                next = Instant::now() + interval;
            }
            terminal
                .draw(|f| render(f, &view))
                .map_err(|e| e.to_string())?;
            let wait = next.saturating_duration_since(Instant::now());
            if event::poll(wait).map_err(|e| e.to_string())? {
                if let Event::Key(key) = event::read().map_err(|e| e.to_string())? {
                    let ctrl_c = key.code == KeyCode::Char('c')
                        && key.modifiers.contains(KeyModifiers::CONTROL);
                    if matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c {
                        return Ok(());
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

/// `view` drawn on a `width` × `height` screen, as text.
pub fn frame_text(view: &View, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("a test backend");
    terminal
        .draw(|f| render(f, view))
        .expect("drawing into a buffer");
    let buffer = terminal.backend().buffer().clone();
    let area: Rect = buffer.area;
    let mut text = String::new();
    for y in 0..area.height {
        let line: String = (0..area.width)
            .map(|x| buffer[(x, y)].symbol().to_owned())
            .collect();
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = r#"# TYPE tether_heartbeats counter
tether_heartbeats_total{shard="0"} 1000
tether_heartbeats_total{shard="1"} 1000
tether_sessions_live{shard="0"} 40
tether_sessions_live{shard="1"} 60
tether_sessions_ended_total{reason="expired",shard="0"} 1
tether_loop_iteration_seconds_sum{shard="0"} 1.0
tether_expiry_lateness_seconds_bucket{le="0.001",shard="0"} 1
tether_expiry_lateness_seconds_bucket{le="0.005",shard="0"} 1
tether_expiry_lateness_seconds_bucket{le="0.01",shard="0"} 1
tether_expiry_lateness_seconds_bucket{le="0.05",shard="0"} 1
tether_expiry_lateness_seconds_bucket{le="0.1",shard="0"} 1
tether_expiry_lateness_seconds_bucket{le="+Inf",shard="0"} 1
# EOF
"#;
    const NOW: &str = r#"tether_heartbeats_total{shard="0"} 3000
tether_heartbeats_total{shard="1"} 3000
tether_sessions_live{shard="0"} 41
tether_sessions_live{shard="1"} 60
tether_sessions_ended_total{reason="expired",shard="0"} 5
tether_tasks{state="running",shard="1"} 7
tether_datagrams_dropped_total{cause="bad_mac",shard="0"} 8
tether_loop_iteration_seconds_sum{shard="0"} 1.5
tether_expiry_lateness_seconds_bucket{le="0.001",shard="0"} 2
tether_expiry_lateness_seconds_bucket{le="0.005",shard="0"} 4
tether_expiry_lateness_seconds_bucket{le="0.01",shard="0"} 5
tether_expiry_lateness_seconds_bucket{le="0.05",shard="0"} 5
tether_expiry_lateness_seconds_bucket{le="0.1",shard="0"} 5
tether_expiry_lateness_seconds_bucket{le="+Inf",shard="0"} 5
"#;

    /// The view from `BEFORE` and `NOW`, two seconds apart.
    fn two_seconds_of_samples() -> View {
        View::from_samples(
            &Sample::parse(BEFORE),
            &Sample::parse(NOW),
            Duration::from_secs(2),
        )
    }

    #[test]
    fn shards_are_summed_and_rates_come_from_two_samples() {
        let view = two_seconds_of_samples();
        assert_eq!(view.sessions, 101.0);
        assert_eq!(view.heartbeats_per_s, 2000.0);
        assert_eq!(view.ended_per_s[0], ("expired".to_owned(), 2.0));
        assert_eq!(view.tasks[2], ("running".to_owned(), 7.0));
        assert_eq!(view.drops_per_s[1], ("bad mac".to_owned(), 4.0));
        // 0.5 s busy in 2 s, over the 2 loops seen: 12.5% each.
        assert_eq!(view.loops, 2);
        assert!((view.loop_busy - 0.125).abs() < 1e-9);
        // 4 expiries in the interval: 1 within 1 ms, 2 within 5, 1 within 10.
        let counts: Vec<u64> = view.lateness.iter().map(|(_, n)| *n).collect();
        assert_eq!(counts, [1, 2, 1, 0, 0, 0]);
    }

    #[test]
    fn a_frame_shows_every_panel() {
        let mut view = two_seconds_of_samples();
        view.server = "127.0.0.1:9900".into();
        view.late = vec![LateClient {
            client_id: "424242".into(),
            peer: "10.0.0.7:5000".into(),
            silent_ms: 2500,
            ttl_ms: 3000,
        }];
        let text = frame_text(&view, 100, 40);
        for expected in [
            "tether top: 127.0.0.1:9900",
            "sessions 101",
            "heartbeats/s 2000",
            "loop busy 12% (average of 2 loops)",
            "sessions ended/s",
            "expired",
            "running",
            "bad mac",
            "expiry lateness",
            "closest to expiry",
            "424242",
            "10.0.0.7:5000",
            "2.5s",
            "0.5s",
        ] {
            assert!(text.contains(expected), "no {expected:?} in\n{text}");
        }
    }

    #[test]
    fn late_clients_are_aged_deduplicated_and_dropped_past_their_ttl() {
        let now = Instant::now();
        let late = |id: &str, silent_ms| LateClient {
            client_id: id.into(),
            peer: "p".into(),
            silent_ms,
            ttl_ms: 3000,
        };
        let ago = |ms| now - Duration::from_millis(ms);
        let found = vec![
            (late("a", 2000), ago(500)), // now 2.5 s silent
            (late("a", 2100), ago(100)), // its later reading: 2.2 s
            (late("b", 2400), ago(0)),   // 2.4 s
            (late("c", 2500), ago(900)), // 3.4 s: past its TTL, gone
        ];
        let shown = closest(&found, now);
        let got: Vec<(&str, u64)> = shown
            .iter()
            .map(|c| (c.client_id.as_str(), c.silent_ms))
            .collect();
        assert_eq!(got, [("b", 2400), ("a", 2200)]);
    }

    #[test]
    fn the_shard_label_is_dropped_wherever_it_is() {
        assert_eq!(without_shard("a{shard=\"3\"}"), "a");
        assert_eq!(without_shard("a{x=\"1\",shard=\"3\"}"), "a{x=\"1\"}");
        assert_eq!(without_shard("a{shard=\"3\",x=\"1\"}"), "a{x=\"1\"}");
        assert_eq!(without_shard("a"), "a");
    }
}
