//! The metrics thread's HTTP endpoints: `GET /metrics` (OpenMetrics) and
//! `GET /healthz` (is the event loop making progress?).
//!
//! ```text
//!   GET /healthz ── answered by a probe <100 ms ago (ok)
//!                   or <1 s ago (not ok)?                   ── that answer
//!                   else wake the loop (mio Waker), wait up
//!                   to 1 s for its iteration count to move  ── 200 ok
//!                   still not                               ── 503 reason
//! ```
//!
//! An idle loop sleeps in the kernel for as long as nothing is due (no
//! wake-ups at all), so "it iterated recently" cannot be the test by
//! itself: the probe wakes it and watches it answer. A loop stuck in one
//! iteration, or in a deadlock, cannot. Reusing a recent answer bounds what
//! a flood of probes costs the loop (a wake-up per 100 ms) and how long
//! they hold up `/metrics` behind a stuck loop (a second per second).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::Waker;

use super::Metrics;

/// What `/metrics` serves: the OpenMetrics text format, which
/// prometheus-client's encoder writes (`# EOF`, `# UNIT`, counters
/// declared without `_total`). Prometheus asks for it first.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long the loop has to answer a health probe.
pub const HEALTH_DEADLINE: Duration = Duration::from_secs(1);

/// The loop's progress, as the health probe sees it.
#[derive(Debug, Default)]
pub struct Health {
    iterations: AtomicU64,
    stopping: AtomicBool,
    waker: OnceLock<Arc<Waker>>,
    /// The last probe's answer and when it was given.
    last: parking_lot::Mutex<Option<(Instant, Result<(), String>)>>,
}

/// How long a passing probe's answer is reused.
const HEALTHY_FOR: Duration = Duration::from_millis(100);
/// How long a failing probe's answer is reused.
const UNHEALTHY_FOR: Duration = Duration::from_secs(1);

impl Health {
    /// The loop finished an iteration. Its only writer: one relaxed add.
    pub fn iteration_done(&self) {
        self.iterations.fetch_add(1, Ordering::Relaxed);
    }

    /// The server is shutting down: probes fail from now on, so a load
    /// balancer stops sending clients here.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    /// How to wake the loop for a probe.
    pub fn set_waker(&self, waker: Arc<Waker>) {
        let _ = self.waker.set(waker);
    }

    /// Wakes the loop (for a watchdog ping that vouches for it).
    pub fn wake(&self) {
        if let Some(waker) = self.waker.get() {
            let _ = waker.wake();
        }
    }

    /// Whether the server is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Loop iterations completed so far.
    pub fn iterations(&self) -> u64 {
        self.iterations.load(Ordering::Relaxed)
    }

    /// Waits up to `deadline` for the loop to complete an iteration
    /// (waking it first). `Err` says why it is not healthy, in one line.
    pub fn probe(&self, deadline: Duration) -> Result<(), String> {
        if self.stopping.load(Ordering::Relaxed) {
            return Err("shutting down".into());
        }
        let mut last = self.last.lock();
        if let Some((at, answer)) = last.as_ref() {
            let reuse_for = if answer.is_ok() {
                HEALTHY_FOR
            } else {
                UNHEALTHY_FOR
            };
            if at.elapsed() < reuse_for {
                return answer.clone();
            }
        }
        let answer = self.wait_for_iteration(deadline);
        *last = Some((Instant::now(), answer.clone()));
        answer
    }

    fn wait_for_iteration(&self, deadline: Duration) -> Result<(), String> {
        let before = self.iterations();
        self.wake();
        let started = Instant::now();
        while started.elapsed() < deadline {
            if self.iterations() != before {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Err(format!(
            "the event loop has not completed an iteration within {deadline:?} of being woken (stuck in one, or blocked)"
        ))
    }
}

/// Serves `GET /metrics` and `GET /healthz` on `addr` from a thread of its
/// own. Anything else gets 404, and a method other than GET 405.
/// With several shards, `/metrics` has each one's figures (labelled) and
/// `/healthz` asks every loop.
pub fn serve(
    addr: SocketAddr,
    shards: Vec<Arc<Metrics>>,
) -> io::Result<(SocketAddr, JoinHandle<()>)> {
    let server = tiny_http::Server::http(addr).map_err(io::Error::other)?;
    let bound = server
        .server_addr()
        .to_ip()
        .ok_or_else(|| io::Error::other("metrics server has no IP address"))?;
    let thread = std::thread::Builder::new()
        .name("tether-metrics".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let response = respond(&request, &shards);
                let _ = request.respond(response);
            }
        })?;
    Ok((bound, thread))
}

fn respond(request: &tiny_http::Request, shards: &[Arc<Metrics>]) -> tiny_http::ResponseBox {
    let (path, query) = request.url().split_once('?').unwrap_or((request.url(), ""));
    let known =
        matches!(path, "/metrics" | "/healthz" | "/sessions") || path.starts_with("/sessions/");
    if !known {
        return text(
            404,
            "not found; the paths are /metrics, /healthz, /sessions and /sessions/CLIENT_ID\n",
        );
    }
    if *request.method() != tiny_http::Method::Get {
        return text(405, "only GET is served here\n").with_header(header("Allow", "GET"));
    }
    if path == "/sessions" {
        return super::sessions::page_response(query, shards);
    }
    if let Some(id) = path.strip_prefix("/sessions/") {
        return super::sessions::one_response(id, shards);
    }
    match path {
        "/metrics" => {
            let accept = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("Accept"))
                .map(|h| h.value.as_str());
            if !accepts_openmetrics(accept) {
                return text(
                    406,
                    "this endpoint serves OpenMetrics text only; ask for application/openmetrics-text (or */*)\n",
                );
            }
            tiny_http::Response::from_string(super::render_all(shards))
                .with_header(header("Content-Type", OPENMETRICS_CONTENT_TYPE))
                .boxed()
        }
        _ => {
            // Every loop woken first, so that their answers are awaited
            // together rather than one after another.
            for m in shards {
                m.health.wake();
            }
            let failing = shards.iter().enumerate().find_map(|(i, m)| {
                let reason = m.health.probe(HEALTH_DEADLINE).err()?;
                Some(if shards.len() > 1 {
                    format!("shard {i}: {reason}")
                } else {
                    reason
                })
            });
            match failing {
                None => text(200, "ok\n"),
                Some(reason) => text(503, &format!("unhealthy: {reason}\n")),
            }
        }
    }
}

/// Whether an `Accept` header admits OpenMetrics text. No header, `*/*`,
/// `application/*` and the type itself do; an explicit q=0 does not.
fn accepts_openmetrics(accept: Option<&str>) -> bool {
    let Some(accept) = accept else {
        return true;
    };
    accept.split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default().to_ascii_lowercase();
        let refused = parts.any(|p| {
            p.to_ascii_lowercase()
                .strip_prefix("q=")
                .and_then(|q| q.parse::<f64>().ok())
                .is_some_and(|q| q == 0.0)
        });
        !refused
            && matches!(
                media.as_str(),
                "*/*" | "application/*" | "application/openmetrics-text"
            )
    })
}

pub(super) fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes())
        .expect("header names and values here are ASCII")
}

pub(super) fn text(status: u16, body: &str) -> tiny_http::ResponseBox {
    tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "text/plain; charset=utf-8"))
        .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_headers_that_admit_openmetrics() {
        assert!(accepts_openmetrics(None));
        assert!(accepts_openmetrics(Some("*/*")));
        // What Prometheus 2.x and 3.x send.
        assert!(accepts_openmetrics(Some(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        )));
        assert!(accepts_openmetrics(Some("text/plain, application/*;q=0.2")));
        assert!(!accepts_openmetrics(Some("text/plain;version=0.0.4")));
        assert!(!accepts_openmetrics(Some("text/plain, */*;q=0")));
        assert!(!accepts_openmetrics(Some("text/plain, */*;Q=0")));
    }

    #[test]
    fn a_probe_passes_once_the_loop_iterates_and_fails_when_it_does_not() {
        let health = Arc::new(Health::default());
        let looping = Arc::clone(&health);
        let loop_thread = std::thread::spawn(move || {
            for _ in 0..500 {
                looping.iteration_done();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        assert_eq!(health.probe(Duration::from_secs(5)), Ok(()));
        loop_thread.join().unwrap();
        // A passing answer is reused for 100 ms, then the loop is asked again.
        std::thread::sleep(HEALTHY_FOR);
        let stuck = health.probe(Duration::from_millis(50)).unwrap_err();
        assert!(stuck.contains("has not completed an iteration"), "{stuck}");
        health.stopping();
        assert_eq!(
            health.probe(Duration::from_secs(5)),
            Err("shutting down".into())
        );
    }

    /// Two shards, the second stuck: `/healthz` fails and names it, though
    /// the first answers every probe.
    #[test]
    fn healthz_names_the_stuck_shard() {
        use std::io::{Read, Write};
        let shards: Vec<Arc<Metrics>> = (0..2).map(|i| Arc::new(Metrics::for_shard(i))).collect();
        let live = Arc::clone(&shards[0]);
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = Arc::clone(&stop);
        let looping = std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                live.health.iteration_done();
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        let (addr, _server) = serve("127.0.0.1:0".parse().unwrap(), shards).unwrap();
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        stop.store(true, Ordering::Relaxed);
        looping.join().unwrap();
        assert!(response.starts_with("HTTP/1.1 503"), "{response}");
        assert!(
            response.contains("unhealthy: shard 1: the event loop has not completed"),
            "{response}"
        );
    }
}
