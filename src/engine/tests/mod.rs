//! Engine scenarios on a simulated clock: no sockets, threads or sleeps, so
//! hours of protocol time run in milliseconds. This file is the harness
//! (`Sim`, a scripted `Client`, reply helpers); the scenarios are by topic:
//! `sessions`, `tasks`, `limits` (what a client can make the engine hold)
//! and `hostile` (amplification and floods).

use super::*;
use crate::wire::{
    CancelReason, Datagram, Flags, Header, MacKey, Message, ReplayError, ReplayWindow, TaskReport,
    MAX_DATAGRAM,
};

const TTL: u32 = 3000;

fn config() -> Config {
    let mut jobs = JobTable::default();
    jobs.add("sleep", PayloadRule::Exactly(4));
    jobs.add("echo", PayloadRule::Any);
    Config {
        jobs,
        max_sessions: 1000,
        max_client_records: 1000,
        ..Config::default()
    }
}

struct Sim {
    engine: Engine,
    now: Timestamp,
    key: Option<MacKey>,
}

#[derive(Clone)]
struct Client {
    id: u64,
    incarnation: u64,
    seq: u32,
    addr: SocketAddr,
}

impl Client {
    fn new(id: u64) -> Client {
        Client {
            id,
            incarnation: 1_000,
            seq: 0,
            addr: format!("127.0.0.1:{}", 10_000 + id % 50_000)
                .parse()
                .unwrap(),
        }
    }
    fn next_incarnation(&self) -> Client {
        Client {
            incarnation: self.incarnation + 1,
            seq: 0,
            ..self.clone()
        }
    }
}

/// A reply as bytes, decoded on demand.
#[derive(Debug, Clone)]
struct Reply {
    to: SocketAddr,
    bytes: Vec<u8>,
}

impl Reply {
    fn datagram(&self, key: Option<&MacKey>) -> Datagram<'_> {
        Datagram::decode(&self.bytes, key).expect("engine emitted an invalid datagram")
    }
    /// The body, without checking a MAC: tests that need the MAC checked
    /// call `Reply::datagram` with the key.
    fn message(&self) -> Message<'_> {
        let body_len = usize::from(u16::from_be_bytes([self.bytes[6], self.bytes[7]]));
        let kind = crate::wire::Kind::from_byte(self.bytes[3]).unwrap();
        Message::parse(kind, &self.bytes[28..28 + body_len]).unwrap()
    }
    fn header(&self) -> Header {
        let field = |r: std::ops::Range<usize>| {
            self.bytes[r]
                .iter()
                .fold(0u64, |acc, &b| acc << 8 | u64::from(b))
        };
        Header {
            flags: Flags::empty(),
            client_id: field(8..16),
            incarnation: field(16..24),
            seq: field(24..28) as u32,
        }
    }
}

fn test_key() -> MacKey {
    MacKey::new(&[0x42; 32]).unwrap()
}

impl Sim {
    fn new(config: Config) -> Sim {
        let key = config.key.clone();
        Sim {
            engine: Engine::new(config, Timestamp(0)).expect("valid test config"),
            now: Timestamp(0),
            key,
        }
    }

    fn encode(&self, c: &mut Client, flags: Flags, message: Message<'_>) -> Vec<u8> {
        c.seq += 1;
        Datagram::new(flags, c.id, c.incarnation, c.seq, message)
            .to_vec(self.key.as_ref())
            .unwrap()
    }

    fn raw(&mut self, from: SocketAddr, bytes: &[u8]) -> Result<Vec<Reply>, Dropped> {
        self.engine.handle_datagram(self.now, from, bytes)?;
        Ok(self.replies())
    }

    fn send(&mut self, c: &mut Client, message: Message<'_>) -> Result<Vec<Reply>, Dropped> {
        self.send_flags(c, Flags::empty(), message)
    }

    fn send_flags(
        &mut self,
        c: &mut Client,
        flags: Flags,
        message: Message<'_>,
    ) -> Result<Vec<Reply>, Dropped> {
        let bytes = self.encode(c, flags, message);
        self.raw(c.addr, &bytes)
    }

    /// Sends and expects exactly one reply.
    fn ask(&mut self, c: &mut Client, message: Message<'_>) -> Reply {
        let mut replies = self.send(c, message).expect("dropped");
        assert_eq!(replies.len(), 1, "replies: {replies:?}");
        replies.pop().unwrap()
    }

    fn hello(&mut self, c: &mut Client, ttl_ms: u32) -> Reply {
        self.ask(c, Message::Hello { ttl_ms, name: "t" })
    }

    fn submit(&mut self, c: &mut Client, request_id: u32, job: &str, payload: &[u8]) -> Reply {
        self.submit_timed(c, request_id, 0, 0, job, payload)
    }

    fn submit_timed(
        &mut self,
        c: &mut Client,
        request_id: u32,
        delay_ms: u32,
        deadline_ms: u32,
        job: &str,
        payload: &[u8],
    ) -> Reply {
        self.ask(
            c,
            Message::Submit {
                request_id,
                delay_ms,
                deadline_ms,
                job,
                payload,
            },
        )
    }

    fn replies(&mut self) -> Vec<Reply> {
        let mut out = Vec::new();
        let mut buf = [0u8; MAX_DATAGRAM];
        while let Some((to, n)) = self.engine.poll_transmit(&mut buf) {
            out.push(Reply {
                to,
                bytes: buf[..n].to_vec(),
            });
        }
        out
    }

    fn effects(&mut self) -> Vec<Effect> {
        std::iter::from_fn(|| self.engine.poll_effect()).collect()
    }

    /// Moves the clock to `t`, calling `handle_timeout` at every time
    /// `poll_timeout` asks for on the way, as the server's loop does.
    fn run_until(&mut self, t: Timestamp) {
        while let Some(due) = self.engine.poll_timeout() {
            if due > t {
                break;
            }
            self.now = self.now.max(due);
            self.engine.handle_timeout(self.now);
        }
        self.now = t;
        self.engine.handle_timeout(t);
    }

    fn run_ms(&mut self, ms: u64) {
        self.run_until(self.now.plus_millis(ms));
    }

    fn event(&mut self, task: TaskId, event: TaskEvent) -> Vec<Reply> {
        self.engine.handle_task_event(self.now, task, event);
        self.replies()
    }
}

fn accepted_task(reply: &Reply) -> TaskId {
    match reply.message() {
        Message::Accepted { task_id, .. } => TaskId(task_id),
        other => panic!("expected ACCEPTED, got {other:?}"),
    }
}

fn rejected_code(reply: &Reply) -> RejectCode {
    match reply.message() {
        Message::Rejected { code, .. } => code,
        other => panic!("expected REJECTED, got {other:?}"),
    }
}

fn task_report(reply: &Reply) -> (u64, String) {
    match reply.message() {
        Message::TaskState { task_id, report } => (task_id, format!("{report:?}")),
        other => panic!("expected TASK_STATE, got {other:?}"),
    }
}

fn is_cancelled_with(reply: &Reply, reason: CancelReason) -> bool {
    matches!(
        reply.message(),
        Message::TaskState {
            report: TaskReport::Cancelled(r),
            ..
        } if r == reason
    )
}

mod hostile;
mod limits;
mod sessions;
mod tasks;
mod views;
