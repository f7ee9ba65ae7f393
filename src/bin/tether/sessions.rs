//! `tether sessions`: the live sessions of a running server, read page by
//! page from its metrics endpoint (`GET /sessions`), for a person (a table)
//! or a program (`--json`, a line per session).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

/// Sessions asked for per page: the endpoint's most.
const PAGE: usize = 1000;

/// A session as the endpoint gives it.
struct Row {
    client_id: String,
    incarnation: String,
    peer: String,
    ttl_ms: u64,
    silent_ms: u64,
    late: bool,
    tasks: (u64, u64, u64),
    shard: Option<u64>,
}

impl Row {
    fn from_json(v: &Value) -> Option<Row> {
        let text = |k: &str| v.get(k)?.as_str().map(str::to_owned);
        let number = |k: &str| v.get(k)?.as_u64();
        let tasks = v.get("tasks")?;
        let count = |k: &str| tasks.get(k).and_then(Value::as_u64).unwrap_or(0);
        Some(Row {
            client_id: text("client_id")?,
            incarnation: text("incarnation")?,
            peer: text("peer")?,
            ttl_ms: number("ttl_ms")?,
            silent_ms: number("silent_ms")?,
            late: v.get("late")?.as_bool()?,
            tasks: (count("scheduled"), count("queued"), count("running")),
            shard: number("shard"),
        })
    }

    /// Milliseconds until it expires without a datagram.
    fn left_ms(&self) -> u64 {
        self.ttl_ms.saturating_sub(self.silent_ms)
    }
}

/// Lists the sessions; `late` keeps only those past two thirds of their
/// TTL without a datagram, soonest to expire first.
pub fn run(metrics: SocketAddr, late: bool, json: bool) -> Result<(), String> {
    let mut after: Option<String> = None;
    let mut rows = Vec::new();
    let mut out = std::io::stdout().lock();
    let mut printed_header = false;
    let mut count = 0usize;
    loop {
        let mut path = format!("/sessions?limit={PAGE}");
        if late {
            path.push_str("&late=1");
        }
        if let Some(cursor) = &after {
            path.push_str("&after=");
            path.push_str(cursor);
        }
        let body = get(metrics, &path)?;
        let page: Value = serde_json::from_str(&body)
            .map_err(|e| format!("{metrics} did not answer /sessions with JSON: {e}"))?;
        for v in page["sessions"].as_array().into_iter().flatten() {
            count += 1;
            if json {
                let _ = writeln!(out, "{v}");
            } else if let Some(row) = Row::from_json(v) {
                if late {
                    rows.push(row);
                } else {
                    if !printed_header {
                        let _ = writeln!(out, "{}", header());
                        printed_header = true;
                    }
                    let _ = writeln!(out, "{}", line(&row));
                }
            }
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    if !json {
        if late {
            rows.sort_by_key(Row::left_ms);
            if !rows.is_empty() {
                let _ = writeln!(out, "{}", header());
            }
            for row in &rows {
                let _ = writeln!(out, "{}", line(row));
            }
        }
        let what = if late { "late session" } else { "live session" };
        let plural = if count == 1 { "" } else { "s" };
        eprintln!("{count} {what}{plural}");
    }
    Ok(())
}

fn header() -> String {
    format!(
        "{:<20}  {:<20}  {:<22}  {:>7}  {:>8}  {:>5}  TASKS s/q/r",
        "CLIENT_ID", "INCARNATION", "PEER", "TTL", "SILENT", "LATE"
    )
}

fn line(r: &Row) -> String {
    let mut line = format!(
        "{:<20}  {:<20}  {:<22}  {:>6}s  {:>7}s  {:>5}  {}/{}/{}",
        r.client_id,
        r.incarnation,
        r.peer,
        format_secs(r.ttl_ms),
        format_secs(r.silent_ms),
        if r.late { "late" } else { "" },
        r.tasks.0,
        r.tasks.1,
        r.tasks.2
    );
    if let Some(shard) = r.shard {
        line.push_str(&format!("  shard {shard}"));
    }
    line
}

fn format_secs(ms: u64) -> String {
    format!("{:.1}", ms as f64 / 1000.0)
}

/// A GET over HTTP/1.0 (so the body comes whole, never chunked, and the
/// connection closes after it): the body of a 200, or an error that says
/// what the server said.
pub fn get(addr: SocketAddr, path: &str) -> Result<String, String> {
    let unreachable = |e: std::io::Error| {
        format!("cannot reach the metrics endpoint at {addr}: {e} (is `tether serve --metrics {addr}` running?)")
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(unreachable)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(unreachable)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(unreachable)?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{addr} sent no HTTP response"))?;
    let status = head.split(' ').nth(1).unwrap_or("?");
    if status != "200" {
        return Err(format!("{addr}{path}: {status}: {}", body.trim()));
    }
    Ok(body.to_owned())
}
