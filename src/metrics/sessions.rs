//! `GET /sessions`: who is alive, asked of the loop that holds the sessions.
//!
//! ```text
//!   metrics thread ── Ask (bounded channel, 8) ──► loop: between iterations,
//!        │            + wake the loop               answers each ask with at
//!        ◄────────── answer (its own channel) ────  most one page (≤ 4096 slots)
//!   wait ≤ 1 s; a full channel is "busy" (503), never a queue that grows
//! ```
//!
//! No snapshot is kept: at a million sessions a copy a second would cost
//! the loop more than all the pages anyone reads. A page costs the loop at
//! most [`SCAN_PER_PAGE`](crate::engine::SCAN_PER_PAGE) slab slots, so
//! reading every session of a big server is many small pauses, none long.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, Sender};

use crate::engine::{Engine, SessionPage, SessionView};

use super::http::{header, text};
use super::{Health, Metrics};

/// What a reader asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Question {
    /// Up to `limit` sessions from slab position `after` (late ones only
    /// if `late`).
    Page {
        /// The cursor: 0, or a page's `next`.
        after: u64,
        /// Sessions at most.
        limit: usize,
        /// Only sessions past two thirds of their TTL without a datagram.
        late: bool,
    },
    /// One client's session.
    One(u64),
}

/// The loop's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A page.
    Page(SessionPage),
    /// The client's session, if it has one.
    One(Option<SessionView>),
}

struct Ask {
    question: Question,
    reply: Sender<Answer>,
}

/// Where readers leave questions for one loop.
pub struct SessionsDesk {
    asks: Sender<Ask>,
    waiting: Receiver<Ask>,
}

/// Questions waiting for the loop, at most: more readers at once are told
/// to come back, rather than queued.
const WAITING: usize = 8;

impl Default for SessionsDesk {
    fn default() -> SessionsDesk {
        let (asks, waiting) = bounded(WAITING);
        SessionsDesk { asks, waiting }
    }
}

impl std::fmt::Debug for SessionsDesk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionsDesk").finish_non_exhaustive()
    }
}

impl SessionsDesk {
    /// Asks the loop (woken through `health`) and waits up to `wait` for
    /// its answer. `Err` says why there is none, in one line.
    pub fn ask(
        &self,
        health: &Health,
        question: Question,
        wait: Duration,
    ) -> Result<Answer, String> {
        let (reply, answer) = bounded(1);
        self.asks
            .try_send(Ask { question, reply })
            .map_err(|_| "busy: too many readers at once; try again".to_owned())?;
        health.wake();
        answer.recv_timeout(wait).map_err(|_| {
            format!("the event loop did not answer within {wait:?} (stuck, or shutting down)")
        })
    }

    /// Answers what is waiting, from the loop, between iterations.
    pub fn answer(&self, engine: &Engine) {
        while let Ok(ask) = self.waiting.try_recv() {
            let answer = match ask.question {
                Question::Page { after, limit, late } => {
                    Answer::Page(engine.sessions_page(after, limit, late))
                }
                Question::One(client_id) => Answer::One(engine.session_view(client_id)),
            };
            // A reader that gave up has dropped its end: nothing to do.
            let _ = ask.reply.send(answer);
        }
    }
}

/// Sessions a page holds unless `?limit=` says otherwise, and at most.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

/// How long a reader waits for the loop.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// The cursor `shard.slot`: where the next page starts. Opaque to readers,
/// who pass back what `next` said.
fn parse_cursor(text: &str) -> Option<(usize, u64)> {
    let (shard, slot) = text.split_once('.')?;
    Some((shard.parse().ok()?, slot.parse().ok()?))
}

/// `GET /sessions?limit=N&after=CURSOR&late=1`.
pub(super) fn page_response(query: &str, shards: &[Arc<Metrics>]) -> tiny_http::ResponseBox {
    let mut limit = DEFAULT_LIMIT;
    let (mut shard, mut after) = (0usize, 0u64);
    let mut late = false;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "limit" => match value.parse::<usize>() {
                Ok(n) if (1..=MAX_LIMIT).contains(&n) => limit = n,
                _ => return text(400, &format!("limit must be 1 to {MAX_LIMIT}\n")),
            },
            "after" => match parse_cursor(value) {
                Some((s, slot)) if s < shards.len() => (shard, after) = (s, slot),
                _ => return text(400, "after must be a page's \"next\" value\n"),
            },
            "late" => late = matches!(value, "" | "1" | "true"),
            _ => {
                return text(
                    400,
                    &format!("unknown parameter {key:?}; give limit, after or late\n"),
                )
            }
        }
    }
    let question = Question::Page { after, limit, late };
    let page = match shards[shard]
        .sessions
        .ask(&shards[shard].health, question, ANSWER_WITHIN)
    {
        Ok(Answer::Page(page)) => page,
        Ok(Answer::One(_)) => unreachable!("a page was asked for"),
        Err(why) => return text(503, &format!("{why}\n")),
    };
    // A shard done, the next one's first page comes next.
    let next = match page.next {
        Some(slot) => Some(format!("{shard}.{slot}")),
        None if shard + 1 < shards.len() => Some(format!("{}.0", shard + 1)),
        None => None,
    };
    let mut body = String::from("{\"sessions\":[");
    for (i, s) in page.sessions.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        write_session(&mut body, s, shard, shards.len());
    }
    body.push_str("],\"next\":");
    match next {
        Some(next) => {
            let _ = write!(body, "\"{next}\"");
        }
        None => body.push_str("null"),
    }
    body.push_str("}\n");
    json(200, body)
}

/// `GET /sessions/CLIENT_ID`: asked of the shard the client's datagrams
/// are steered to.
pub(super) fn one_response(id: &str, shards: &[Arc<Metrics>]) -> tiny_http::ResponseBox {
    let Ok(client_id) = id.parse::<u64>() else {
        return text(400, "give a client id: /sessions/12345\n");
    };
    let shard = crate::steer::shard_of(client_id, shards.len() as u32) as usize;
    let metrics = &shards[shard];
    match metrics
        .sessions
        .ask(&metrics.health, Question::One(client_id), ANSWER_WITHIN)
    {
        Ok(Answer::One(Some(s))) => {
            let mut body = String::new();
            write_session(&mut body, &s, shard, shards.len());
            body.push('\n');
            json(200, body)
        }
        Ok(Answer::One(None)) => text(404, &format!("client {client_id} has no live session\n")),
        Ok(Answer::Page(_)) => unreachable!("one session was asked for"),
        Err(why) => text(503, &format!("{why}\n")),
    }
}

/// One session as JSON; ids as strings (JSON numbers past 2^53 lose
/// digits in JavaScript), as in the event stream.
fn write_session(out: &mut String, s: &SessionView, shard: usize, shards: usize) {
    let _ = write!(
        out,
        "{{\"client_id\":\"{}\",\"incarnation\":\"{}\",\"peer\":\"{}\",\"ttl_ms\":{},\"silent_ms\":{},\"late\":{},\"tasks\":{{\"scheduled\":{},\"queued\":{},\"running\":{}}}",
        s.client_id,
        s.incarnation,
        s.peer,
        s.ttl_ms,
        s.silent_ms,
        s.is_late(),
        s.tasks.scheduled,
        s.tasks.queued,
        s.tasks.running,
    );
    if shards > 1 {
        let _ = write!(out, ",\"shard\":{shard}");
    }
    out.push('}');
}

fn json(status: u16, body: String) -> tiny_http::ResponseBox {
    tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(header("Content-Type", "application/json"))
        .boxed()
}
