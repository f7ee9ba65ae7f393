//! Engine scenarios on a simulated clock: no sockets, threads or sleeps, so
//! hours of protocol time run in milliseconds.

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

#[test]
fn hello_grants_clamped_ttl_and_reports_tick() {
    let mut sim = Sim::new(config());
    for (asked, granted) in [(0, 3000), (5, 100), (2500, 2500), (u32::MAX, 3_600_000)] {
        let mut c = Client::new(u64::from(asked) + 1);
        let reply = sim.hello(&mut c, asked);
        assert_eq!(
            reply.message(),
            Message::Welcome {
                ttl_ms: granted,
                tick_ms: 10
            }
        );
        assert_eq!(reply.to, c.addr);
        let h = reply.header();
        assert_eq!(
            (h.client_id, h.incarnation, h.seq),
            (c.id, c.incarnation, 1)
        );
    }
    assert_eq!(sim.engine.live_sessions(), 4);
}

#[test]
fn repeated_hello_repeats_welcome_with_first_ttl() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 1000);
    let again = sim.hello(&mut c, 9000);
    assert_eq!(
        again.message(),
        Message::Welcome {
            ttl_ms: 1000,
            tick_ms: 10
        }
    );
    assert_eq!(again.header().seq, 2, "server numbers its datagrams");
    assert_eq!(sim.engine.stats().sessions_opened, 1);
}

#[test]
fn heartbeats_keep_a_session_alive_for_hours_then_silence_expires_it_on_time() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    let mut s = Client::new(2);
    sim.hello(&mut s, TTL);
    let task = accepted_task(&sim.submit(&mut s, 1, "sleep", &[0, 0, 0, 1]));
    sim.effects();
    sim.event(task, TaskEvent::Started);
    // Three hours of one heartbeat a second, with jitter up to 1.9 s.
    let end = Timestamp::from_millis(3 * 3600 * 1000);
    let mut i = 0u64;
    while sim.now < end {
        i += 1;
        sim.run_ms(1000 + (i * 7919) % 900);
        assert!(sim.send(&mut c, Message::Heartbeat).unwrap().is_empty());
        assert!(sim.send(&mut s, Message::Heartbeat).unwrap().is_empty());
    }
    assert_eq!(sim.engine.stats().sessions_expired, 0);
    assert_eq!(sim.engine.stats().heartbeats, 2 * i);
    // Now `s` goes silent: its task is cancelled, reason expired, no earlier
    // than TTL after its last datagram and within one tick after that.
    let last = sim.now;
    let mut expired_at = None;
    while expired_at.is_none() {
        let due = sim.engine.poll_timeout().expect("a timer is pending");
        sim.now = due;
        sim.engine.handle_timeout(due);
        for effect in sim.effects() {
            assert_eq!(
                effect,
                Effect::Cancel {
                    task,
                    reason: CancelReason::Expired
                }
            );
            expired_at = Some(due);
        }
        if sim.now.0 - last.0 < 2000 * 1000 {
            // Keep `c` alive meanwhile.
            sim.send(&mut c, Message::Heartbeat).unwrap();
        }
    }
    let late_us = expired_at.unwrap().0 - last.0;
    assert!(late_us >= u64::from(TTL) * 1000, "early by {late_us} us");
    assert!(
        late_us <= u64::from(TTL) * 1000 + 10_000,
        "late: {late_us} us"
    );
    let replies = sim.event(task, TaskEvent::Finished(JobOutcome::Done(vec![])));
    assert_eq!(replies.len(), 1);
    assert!(is_cancelled_with(&replies[0], CancelReason::Expired));
    assert_eq!(replies[0].to, s.addr);
    assert_eq!(sim.engine.live_sessions(), 1);
}

#[test]
fn many_clients_with_jitter_never_expire_early_or_late() {
    let mut sim = Sim::new(config());
    let ttl_ms = |id: u64| 1000 + (id as u32 * 37) % 2000;
    let mut clients: Vec<Client> = (1..=200).map(Client::new).collect();
    let mut last_seen = vec![Timestamp(0); clients.len()];
    for c in clients.iter_mut() {
        sim.hello(c, ttl_ms(c.id));
    }
    let mut alive = vec![true; clients.len()];
    let mut step = 0u64;
    // An hour in uneven steps of 1–97 ms; each client heartbeats at
    // pseudo-random moments, sometimes too rarely to stay alive.
    while sim.now < Timestamp::from_millis(3600 * 1000) {
        step += 1;
        let target = Timestamp(sim.now.0 + 1000 + (step * 7_654_321) % 96_000);
        // Drive the clock as the server does, checking every client each
        // time an expiry is decided.
        while let Some(due) = sim.engine.poll_timeout().filter(|&d| d <= target) {
            sim.now = due;
            let before = sim.engine.stats().sessions_expired;
            sim.engine.handle_timeout(due);
            if sim.engine.stats().sessions_expired == before {
                continue;
            }
            for (i, c) in clients.iter().enumerate() {
                if alive[i] && sim.engine.live_session(c.id).is_none() {
                    let since = due.0 - last_seen[i].0;
                    let ttl_us = u64::from(ttl_ms(c.id)) * 1000;
                    assert!(since >= ttl_us, "client {} expired early: {since} us", c.id);
                    assert!(
                        since <= ttl_us + 10_000,
                        "client {} expired late: {since} us",
                        c.id
                    );
                    alive[i] = false;
                }
            }
        }
        sim.now = target;
        sim.engine.handle_timeout(target);
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(alive[i], sim.engine.live_session(c.id).is_some());
            if (c.id * 2_654_435_761 + step * 40_503) % 1000 < 12 {
                if alive[i] {
                    sim.send(c, Message::Heartbeat).unwrap();
                } else {
                    *c = c.next_incarnation();
                    sim.hello(c, ttl_ms(c.id));
                    alive[i] = true;
                }
                last_seen[i] = sim.now;
            }
        }
    }
    assert!(
        sim.engine.stats().sessions_expired > 50,
        "{:?}",
        sim.engine.stats()
    );
}

#[test]
fn late_datagrams_after_expiry_get_unknown_session_and_do_not_revive() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 500);
    sim.run_ms(511);
    assert_eq!(sim.engine.live_sessions(), 0);
    for message in [
        Message::Heartbeat,
        Message::Status { task_id: 1 },
        Message::Bye,
    ] {
        let reply = sim.ask(&mut c, message);
        assert_eq!(reply.message(), Message::UnknownSession);
        let h = reply.header();
        assert_eq!(
            (h.client_id, h.incarnation, h.seq),
            (c.id, c.incarnation, c.seq)
        );
        assert_eq!(reply.bytes.len(), 28);
    }
    assert_eq!(sim.engine.live_sessions(), 0);
    // A HELLO of the same incarnation is stale now: dropped, no reply.
    let mut same = c.clone();
    assert_eq!(
        sim.send(
            &mut same,
            Message::Hello {
                ttl_ms: 0,
                name: ""
            }
        )
        .unwrap_err(),
        Dropped::StaleHello
    );
    let mut next = c.next_incarnation();
    assert!(matches!(
        sim.hello(&mut next, 0).message(),
        Message::Welcome { .. }
    ));
}

#[test]
fn newer_incarnation_replaces_and_older_is_stale() {
    let mut sim = Sim::new(config());
    let mut old = Client::new(7);
    sim.hello(&mut old, TTL);
    let task = accepted_task(&sim.submit(&mut old, 1, "sleep", &[0, 0, 1, 0]));
    sim.effects();
    sim.event(task, TaskEvent::Started);
    let mut new = old.next_incarnation();
    new.addr = "127.0.0.1:4444".parse().unwrap();
    sim.hello(&mut new, TTL);
    assert_eq!(
        sim.effects(),
        vec![Effect::Cancel {
            task,
            reason: CancelReason::Replaced
        }]
    );
    assert_eq!(sim.engine.stats().sessions_replaced, 1);
    // The old session's datagrams are now unknown; its HELLO is stale.
    assert_eq!(
        sim.ask(&mut old, Message::Heartbeat).message(),
        Message::UnknownSession
    );
    let mut older = old.clone();
    older.incarnation -= 1;
    assert_eq!(
        sim.send(
            &mut older,
            Message::Hello {
                ttl_ms: 0,
                name: ""
            }
        )
        .unwrap_err(),
        Dropped::StaleHello
    );
    // The task's final state goes to the old session's address, under its
    // identity and numbering.
    let replies = sim.event(task, TaskEvent::Finished(JobOutcome::Done(vec![1])));
    assert!(is_cancelled_with(&replies[0], CancelReason::Replaced));
    assert_eq!(replies[0].to, old.addr);
    let h = replies[0].header();
    assert_eq!((h.incarnation, h.seq), (old.incarnation, 3));
    // The new session reads it too.
    let status = sim.ask(&mut new, Message::Status { task_id: task.0 });
    assert!(is_cancelled_with(&status, CancelReason::Replaced));
    assert_eq!(sim.engine.sessions.len(), 1, "old slot released");
}

#[test]
fn bye_acks_and_cancels_with_reason_left() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(3);
    sim.hello(&mut c, TTL);
    let queued = accepted_task(&sim.submit(&mut c, 1, "echo", b"x"));
    let scheduled = accepted_task(&sim.submit_timed(&mut c, 2, 500, 0, "echo", b"y"));
    let replies = sim.send(&mut c, Message::Bye).unwrap();
    assert_eq!(replies[0].message(), Message::ByeAck);
    // The scheduled task never reached the queue: it ends at once.
    let finals: Vec<_> = replies[1..].iter().map(task_report).collect();
    assert_eq!(finals, vec![(scheduled.0, "Cancelled(Left)".to_string())]);
    assert_eq!(sim.engine.stats().sessions_left, 1);
    // The queued one is the queue owner's to withdraw; until it says so,
    // the task still counts against the queue.
    let effects = sim.effects();
    assert!(effects.contains(&Effect::Cancel {
        task: queued,
        reason: CancelReason::Left
    }));
    assert_eq!(sim.engine.unfinished_tasks(), 1);
    assert_eq!(sim.engine.footprint().ended_sessions_held, 1);
    let withdrawn = sim.event(queued, TaskEvent::Withdrawn);
    assert_eq!(
        withdrawn.iter().map(task_report).collect::<Vec<_>>(),
        vec![(queued.0, "Cancelled(Left)".to_string())]
    );
    assert_eq!(sim.engine.unfinished_tasks(), 0);
    assert_eq!(sim.engine.footprint().ended_sessions_held, 0);
    // Reports after that change nothing.
    assert!(sim.event(queued, TaskEvent::Started).is_empty());
    assert!(sim
        .event(queued, TaskEvent::Finished(JobOutcome::Done(vec![])))
        .is_empty());
    // The delay timer is gone: nothing ever runs.
    sim.run_ms(10_000);
    assert!(sim.effects().is_empty());
}

#[test]
fn a_cancel_that_crosses_a_workers_start_lets_it_run_and_records_the_cancel() {
    // The queue's owner answers a cancel of a queued task in one of two
    // ways; the engine reports the task cancelled only when that answer
    // makes it true, so a task reported cancelled never runs afterwards.
    let mut sim = Sim::new(config());
    let mut c = Client::new(4);
    sim.hello(&mut c, TTL);
    let task = accepted_task(&sim.submit_timed(&mut c, 1, 0, 60_000, "sleep", &[0; 4]));
    sim.effects();
    let reply = sim.ask(&mut c, Message::Cancel { task_id: task.0 });
    assert_eq!(
        reply.message(),
        Message::CancelResult {
            task_id: task.0,
            outcome: CancelOutcome::CancelledNow
        }
    );
    assert_eq!(sim.engine.stats().tasks_cancelled, 0, "not final yet");
    assert_eq!(
        sim.effects(),
        vec![Effect::Cancel {
            task,
            reason: CancelReason::Cancelled
        }]
    );
    // A worker had claimed it: Started, then the job sees its flag.
    assert!(sim.event(task, TaskEvent::Started).is_empty());
    assert_eq!(sim.engine.stats().tasks_running_now, 1);
    assert!(
        sim.event(task, TaskEvent::Withdrawn).is_empty(),
        "a running task cannot be withdrawn"
    );
    for _ in 0..60 {
        sim.run_ms(1_000);
        sim.send(&mut c, Message::Heartbeat).unwrap();
    }
    assert!(
        sim.effects().is_empty(),
        "no deadline timer for a task already told to stop"
    );
    let last = sim.event(task, TaskEvent::Finished(JobOutcome::Done(vec![])));
    assert!(is_cancelled_with(&last[0], CancelReason::Cancelled));
    assert_eq!(sim.engine.unfinished_tasks(), 0);
    assert_eq!(sim.engine.stats().tasks_queued_now, 0);
}

#[test]
fn submit_is_idempotent_per_request_id() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    let first = sim.submit(&mut c, 77, "echo", b"hi");
    let again = sim.submit(&mut c, 77, "echo", b"different");
    assert_eq!(first.message(), again.message());
    assert_ne!(first.header().seq, again.header().seq);
    let runs = sim.effects();
    assert_eq!(runs.len(), 1, "{runs:?}");
    let bad = sim.submit(&mut c, 78, "nope", b"");
    assert_eq!(rejected_code(&bad), RejectCode::UnknownJob);
    // The same request id gets the same REJECTED even though it would now
    // be accepted.
    let bad_again = sim.submit(&mut c, 78, "echo", b"");
    assert_eq!(rejected_code(&bad_again), RejectCode::UnknownJob);
    assert!(sim.effects().is_empty());
    assert_eq!(sim.engine.stats().tasks_accepted, 1);
}

#[test]
fn rejection_codes() {
    let mut cfg = config();
    cfg.max_tasks_per_session = 2;
    cfg.max_waiting_tasks = 3;
    cfg.max_sessions = 2;
    let mut sim = Sim::new(cfg);
    let mut a = Client::new(1);
    let mut b = Client::new(2);
    sim.hello(&mut a, TTL);
    sim.hello(&mut b, TTL);
    assert_eq!(
        rejected_code(&sim.submit(&mut a, 1, "zzz", b"")),
        RejectCode::UnknownJob
    );
    assert_eq!(
        rejected_code(&sim.submit(&mut a, 2, "sleep", b"123")),
        RejectCode::BadRequest
    );
    accepted_task(&sim.submit(&mut a, 3, "sleep", &[0; 4]));
    accepted_task(&sim.submit(&mut a, 4, "sleep", &[0; 4]));
    assert_eq!(
        rejected_code(&sim.submit(&mut a, 5, "sleep", &[0; 4])),
        RejectCode::TooManyTasks
    );
    accepted_task(&sim.submit(&mut b, 1, "echo", b""));
    assert_eq!(
        rejected_code(&sim.submit(&mut b, 2, "echo", b"")),
        RejectCode::QueueFull
    );
    // A third session is refused, copying the HELLO's header.
    let mut c = Client::new(3);
    let refused = sim.hello(&mut c, TTL);
    assert_eq!(rejected_code(&refused), RejectCode::TooManySessions);
    let h = refused.header();
    assert_eq!((h.client_id, h.incarnation, h.seq), (3, c.incarnation, 1));
    assert!(refused.bytes.len() <= 28 + 4 + 2 + 1);
    assert_eq!(sim.engine.live_sessions(), 2);
    sim.engine.begin_shutdown(sim.now);
    sim.replies();
    assert_eq!(
        rejected_code(&sim.submit(&mut b, 3, "echo", b"")),
        RejectCode::ShuttingDown
    );
    let mut d = Client::new(4);
    assert_eq!(
        rejected_code(&sim.hello(&mut d, TTL)),
        RejectCode::ShuttingDown
    );
}

#[test]
fn delay_then_queue_then_run_then_done_with_status_at_each_step() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 60_000);
    let task = accepted_task(&sim.submit_timed(&mut c, 1, 250, 0, "echo", b"payload"));
    let status = |sim: &mut Sim, c: &mut Client| {
        task_report(&sim.ask(c, Message::Status { task_id: task.0 })).1
    };
    assert_eq!(status(&mut sim, &mut c), "Scheduled");
    assert!(sim.effects().is_empty());
    sim.run_ms(249);
    assert!(sim.effects().is_empty(), "delay must not end early");
    sim.run_ms(11);
    assert_eq!(
        sim.effects(),
        vec![Effect::Run {
            task,
            client_id: 1,
            job: JobId(1),
            payload: b"payload".to_vec()
        }]
    );
    assert_eq!(status(&mut sim, &mut c), "Queued");
    sim.event(task, TaskEvent::Started);
    assert_eq!(status(&mut sim, &mut c), "Running");
    let pushed = sim.event(task, TaskEvent::Finished(JobOutcome::Done(b"out".to_vec())));
    assert_eq!(
        pushed[0].message(),
        Message::TaskState {
            task_id: task.0,
            report: TaskReport::Done(b"out")
        }
    );
    assert_eq!(status(&mut sim, &mut c), "Done([111, 117, 116])");
}

#[test]
fn deadline_counts_from_start_and_cancels_with_reason_deadline() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 60_000);
    let task = accepted_task(&sim.submit_timed(&mut c, 1, 0, 300, "sleep", &[0; 4]));
    sim.effects();
    sim.run_ms(1000); // queued time does not count
    assert!(sim.effects().is_empty());
    sim.event(task, TaskEvent::Started);
    sim.run_ms(299);
    assert!(sim.effects().is_empty(), "deadline must not fire early");
    sim.run_ms(11);
    assert_eq!(
        sim.effects(),
        vec![Effect::Cancel {
            task,
            reason: CancelReason::Deadline
        }]
    );
    // The job returns a result anyway; the cancellation wins.
    let pushed = sim.event(task, TaskEvent::Finished(JobOutcome::Done(vec![9])));
    assert!(is_cancelled_with(&pushed[0], CancelReason::Deadline));
}

#[test]
fn cancel_and_status_reach_earlier_incarnations_but_not_other_clients() {
    let mut sim = Sim::new(config());
    let mut a = Client::new(1);
    sim.hello(&mut a, TTL);
    let t1 = accepted_task(&sim.submit(&mut a, 1, "sleep", &[0; 4]));
    let t2 = accepted_task(&sim.submit(&mut a, 2, "echo", b""));
    sim.effects();
    sim.event(t1, TaskEvent::Started);
    sim.event(t2, TaskEvent::Started);
    sim.event(t2, TaskEvent::Finished(JobOutcome::Failed("bad".into())));
    // The client restarts; its old session expires on its own.
    sim.run_ms(u64::from(TTL) + 20);
    let cancel_effects = sim.effects();
    assert_eq!(cancel_effects.len(), 1);
    sim.event(t1, TaskEvent::Finished(JobOutcome::Done(vec![])));
    let mut a2 = a.next_incarnation();
    sim.hello(&mut a2, TTL);
    let status = sim.ask(&mut a2, Message::Status { task_id: t2.0 });
    assert_eq!(
        status.message(),
        Message::TaskState {
            task_id: t2.0,
            report: TaskReport::Failed("bad")
        }
    );
    let mut other = Client::new(2);
    sim.hello(&mut other, TTL);
    assert_eq!(
        task_report(&sim.ask(&mut other, Message::Status { task_id: t2.0 })).1,
        "Unknown"
    );
    let outcome = |sim: &mut Sim, c: &mut Client, id: u64| match sim
        .ask(c, Message::Cancel { task_id: id })
        .message()
    {
        Message::CancelResult { task_id, outcome } => {
            assert_eq!(task_id, id);
            outcome
        }
        m => panic!("{m:?}"),
    };
    assert_eq!(
        outcome(&mut sim, &mut other, t1.0),
        CancelOutcome::UnknownTask
    );
    assert_eq!(
        outcome(&mut sim, &mut a2, t1.0),
        CancelOutcome::AlreadyFinished
    );
    assert_eq!(
        outcome(&mut sim, &mut a2, 12345),
        CancelOutcome::UnknownTask
    );
    // A running task of the new session: cancelled now, final on report.
    let t3 = accepted_task(&sim.submit(&mut a2, 1, "sleep", &[0; 4]));
    sim.effects();
    sim.event(t3, TaskEvent::Started);
    assert_eq!(
        outcome(&mut sim, &mut a2, t3.0),
        CancelOutcome::CancelledNow
    );
    assert_eq!(
        sim.effects(),
        vec![Effect::Cancel {
            task: t3,
            reason: CancelReason::Cancelled
        }]
    );
    assert_eq!(
        task_report(&sim.ask(&mut a2, Message::Status { task_id: t3.0 })).1,
        "Running"
    );
    let pushed = sim.event(
        t3,
        TaskEvent::Finished(JobOutcome::Failed("stopped".into())),
    );
    assert!(is_cancelled_with(&pushed[0], CancelReason::Cancelled));
}

#[test]
fn final_states_kept_at_least_60s_and_bounded() {
    let mut cfg = config();
    cfg.max_finished_tasks = 5;
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(1);
    sim.hello(&mut c, 3_600_000);
    let mut ids = Vec::new();
    for r in 0..3 {
        let t = accepted_task(&sim.submit(&mut c, r, "echo", b""));
        sim.event(t, TaskEvent::Started);
        sim.event(t, TaskEvent::Finished(JobOutcome::Done(vec![])));
        ids.push(t);
    }
    let state = |sim: &mut Sim, c: &mut Client, t: TaskId| {
        task_report(&sim.ask(c, Message::Status { task_id: t.0 })).1
    };
    sim.run_ms(59_990);
    assert_eq!(state(&mut sim, &mut c, ids[0]), "Done([])");
    sim.run_ms(20);
    assert_eq!(state(&mut sim, &mut c, ids[0]), "Unknown");
    // The bound: the oldest go first.
    let mut more = Vec::new();
    for r in 10..17 {
        let t = accepted_task(&sim.submit(&mut c, r, "echo", b""));
        sim.event(t, TaskEvent::Started);
        sim.event(t, TaskEvent::Finished(JobOutcome::Done(vec![])));
        more.push(t);
    }
    assert_eq!(state(&mut sim, &mut c, more[0]), "Unknown");
    assert_eq!(state(&mut sim, &mut c, more[1]), "Unknown");
    assert_eq!(state(&mut sim, &mut c, more[2]), "Done([])");
    assert_eq!(sim.engine.stats().finished_evicted_early, 2);
    assert!(sim.engine.tasks.len() <= 5);
}

#[test]
fn replays_are_dropped_and_change_nothing() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    let hello = sim.encode(
        &mut c,
        Flags::empty(),
        Message::Hello {
            ttl_ms: 500,
            name: "",
        },
    );
    assert_eq!(sim.raw(c.addr, &hello).unwrap().len(), 1);
    let submit = sim.encode(
        &mut c,
        Flags::empty(),
        Message::Submit {
            request_id: 1,
            delay_ms: 0,
            deadline_ms: 0,
            job: "echo",
            payload: b"",
        },
    );
    assert_eq!(sim.raw(c.addr, &submit).unwrap().len(), 1);
    sim.effects();
    let heartbeat = sim.encode(&mut c, Flags::ACK, Message::Heartbeat);
    assert_eq!(sim.raw(c.addr, &heartbeat).unwrap().len(), 1);
    let before = *sim.engine.stats();
    for bytes in [&hello, &submit, &heartbeat] {
        assert_eq!(
            sim.raw(c.addr, bytes).unwrap_err(),
            Dropped::Replay(ReplayError::Seen)
        );
    }
    assert!(sim.effects().is_empty());
    assert_eq!(sim.engine.stats().dropped_replay, before.dropped_replay + 3);
    // A replayed heartbeat does not keep the session alive.
    for _ in 0..20 {
        sim.run_ms(100);
        let _ = sim.raw(c.addr, &heartbeat);
    }
    assert_eq!(sim.engine.live_sessions(), 0);
    // Far-behind seqs are refused too.
    let mut c2 = Client::new(2);
    sim.hello(&mut c2, TTL);
    c2.seq = 100;
    sim.send(&mut c2, Message::Heartbeat).unwrap();
    c2.seq = 30;
    assert_eq!(
        sim.send(&mut c2, Message::Heartbeat).unwrap_err(),
        Dropped::Replay(ReplayError::TooOld)
    );
}

#[test]
fn malformed_and_wrong_direction_are_dropped_silently() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    let before = sim.engine.stats().dropped_malformed;
    let mut bytes = sim.encode(&mut c, Flags::empty(), Message::Heartbeat);
    bytes[0] = b'X';
    assert!(matches!(
        sim.raw(c.addr, &bytes),
        Err(Dropped::Malformed(wire::Error::BadMagic))
    ));
    let welcome = sim.encode(
        &mut c,
        Flags::empty(),
        Message::Welcome {
            ttl_ms: 1,
            tick_ms: 1,
        },
    );
    assert_eq!(
        sim.raw(c.addr, &welcome).unwrap_err(),
        Dropped::WrongDirection
    );
    assert_eq!(
        sim.raw(c.addr, &[0u8; 1201]).unwrap_err(),
        Dropped::TooLarge
    );
    assert_eq!(sim.engine.stats().dropped_malformed, before + 2);
    assert_eq!(sim.engine.stats().dropped_too_large, 1);
    // None of it touched the session's replay window: the next seq works.
    assert!(sim.send(&mut c, Message::Heartbeat).is_ok());
}

#[test]
fn keyed_engine_drops_unauthenticated_and_signs_replies() {
    let mut cfg = config();
    cfg.key = Some(test_key());
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(1);
    let welcome = sim.hello(&mut c, TTL);
    let d = welcome.datagram(Some(&test_key()));
    assert!(d.header.flags.contains(Flags::MAC));
    // Unsigned, and signed with another key: dropped, no reply, even for
    // an unknown session.
    let mut stranger = Client::new(99);
    sim.key = None;
    let unsigned = sim.encode(&mut stranger, Flags::empty(), Message::Heartbeat);
    sim.key = Some(MacKey::new(&[1; 32]).unwrap());
    let wrong = sim.encode(&mut stranger, Flags::empty(), Message::Heartbeat);
    let wrong_hello = sim.encode(
        &mut c,
        Flags::empty(),
        Message::Hello {
            ttl_ms: 0,
            name: "",
        },
    );
    sim.key = Some(test_key());
    assert!(matches!(
        sim.raw(stranger.addr, &unsigned),
        Err(Dropped::Auth(_))
    ));
    assert!(matches!(
        sim.raw(stranger.addr, &wrong),
        Err(Dropped::Auth(_))
    ));
    assert!(matches!(
        sim.raw(c.addr, &wrong_hello),
        Err(Dropped::Auth(_))
    ));
    assert_eq!(sim.engine.stats().dropped_bad_mac, 3);
    // A signed datagram for an unknown session is answered, signed.
    let reply = sim.ask(&mut stranger, Message::Heartbeat);
    assert_eq!(
        reply.datagram(Some(&test_key())).message,
        Message::UnknownSession
    );
    assert_eq!(reply.bytes.len(), 28 + 16);
}

#[test]
fn shutdown_cancels_every_task_with_reason_shutdown() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    let running = accepted_task(&sim.submit(&mut c, 1, "sleep", &[0; 4]));
    let queued = accepted_task(&sim.submit(&mut c, 2, "sleep", &[0; 4]));
    let scheduled = accepted_task(&sim.submit_timed(&mut c, 3, 1000, 0, "sleep", &[0; 4]));
    sim.effects();
    sim.event(running, TaskEvent::Started);
    sim.engine.begin_shutdown(sim.now);
    let pushed = sim.replies();
    assert_eq!(pushed.len(), 1);
    assert_eq!(task_report(&pushed[0]).0, scheduled.0);
    assert!(is_cancelled_with(&pushed[0], CancelReason::Shutdown));
    let effects = sim.effects();
    for task in [running, queued] {
        assert!(effects.contains(&Effect::Cancel {
            task,
            reason: CancelReason::Shutdown
        }));
    }
    assert_eq!(sim.engine.unfinished_tasks(), 2);
    let withdrawn = sim.event(queued, TaskEvent::Withdrawn);
    assert!(is_cancelled_with(&withdrawn[0], CancelReason::Shutdown));
    let last = sim.event(running, TaskEvent::Finished(JobOutcome::Done(vec![])));
    assert!(is_cancelled_with(&last[0], CancelReason::Shutdown));
    assert_eq!(sim.engine.unfinished_tasks(), 0);
}

#[test]
fn ended_clients_are_remembered_for_ten_minutes_then_forgotten() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(5);
    sim.hello(&mut c, TTL);
    sim.send(&mut c, Message::Bye).unwrap();
    sim.run_ms(599_000);
    let mut same = c.clone();
    assert_eq!(
        sim.send(
            &mut same,
            Message::Hello {
                ttl_ms: 0,
                name: ""
            }
        )
        .unwrap_err(),
        Dropped::StaleHello
    );
    sim.run_ms(2_000);
    assert_eq!(sim.engine.records.len(), 0);
    assert_eq!(sim.engine.records.largest_ended(5), None);
}

#[test]
fn client_records_are_bounded_oldest_first() {
    let mut cfg = config();
    cfg.max_client_records = 3;
    let mut sim = Sim::new(cfg);
    for id in 1..=5 {
        let mut c = Client::new(id);
        sim.hello(&mut c, TTL);
        sim.send(&mut c, Message::Bye).unwrap();
    }
    assert_eq!(sim.engine.records.len(), 3);
    assert_eq!(sim.engine.records.largest_ended(1), None);
    assert!(sim.engine.records.largest_ended(5).is_some());
}

#[test]
fn failed_texts_and_oversized_results_fit_a_datagram() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    let a = accepted_task(&sim.submit(&mut c, 1, "echo", b""));
    let b = accepted_task(&sim.submit(&mut c, 2, "echo", b""));
    sim.event(a, TaskEvent::Started);
    sim.event(b, TaskEvent::Started);
    let long = sim.event(a, TaskEvent::Finished(JobOutcome::Failed("é".repeat(300))));
    match long[0].message() {
        Message::TaskState {
            report: TaskReport::Failed(text),
            ..
        } => assert_eq!(text.len(), 254),
        m => panic!("{m:?}"),
    }
    let big = sim.event(b, TaskEvent::Finished(JobOutcome::Done(vec![0; 5000])));
    assert!(matches!(
        big[0].message(),
        Message::TaskState {
            report: TaskReport::Failed(_),
            ..
        }
    ));
}

#[test]
fn poll_timeout_is_none_when_idle() {
    let mut sim = Sim::new(config());
    assert_eq!(sim.engine.poll_timeout(), None);
    let mut c = Client::new(1);
    sim.hello(&mut c, 1000);
    assert_eq!(
        sim.engine.poll_timeout(),
        Some(Timestamp::from_millis(1000))
    );
    sim.send(&mut c, Message::Bye).unwrap();
    assert_eq!(sim.engine.poll_timeout(), None);
}

#[test]
fn address_follows_the_last_datagram() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    c.addr = "[::1]:5000".parse().unwrap();
    let reply = sim.ask(&mut c, Message::Status { task_id: 1 });
    assert_eq!(reply.to, c.addr);
}

#[test]
fn a_stall_expires_nobody_whose_datagrams_are_read_before_the_decision() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 1000);
    sim.run_ms(900);
    sim.send(&mut c, Message::Heartbeat).unwrap();
    // The caller stalls for five seconds; a heartbeat the client sent at
    // 1.8 s sits in the socket. The caller takes the decision instant,
    // reads what is queued (stamped at read time), then decides.
    let decided_at = Timestamp::from_millis(5_900);
    sim.now = decided_at;
    sim.send(&mut c, Message::Heartbeat).unwrap();
    sim.engine.handle_timeout(decided_at);
    assert_eq!(sim.engine.live_sessions(), 1);
    // Deciding for an instant before a datagram's stamp uses that instant,
    // not the later stamp: a datagram read later cannot make time pass.
    let mut d = Client::new(2);
    sim.hello(&mut d, 1000);
    sim.now = sim.now.plus_millis(990);
    sim.send(&mut c, Message::Heartbeat).unwrap();
    sim.engine.handle_timeout(Timestamp(sim.now.0 - 500_000));
    assert_eq!(sim.engine.live_sessions(), 2, "d expired by a later stamp");
    sim.run_ms(20);
    assert_eq!(sim.engine.live_sessions(), 1);
}

/// The per-session budget is 128 bytes of server memory; these are the
/// parts that scale with sessions (see BENCHMARKS.md for the measured RSS).
#[test]
fn per_session_structures_stay_compact() {
    // The slab's entry type is private; this is its shape.
    #[allow(dead_code)]
    enum SlabEntry {
        Vacant(usize),
        Occupied(Session),
    }
    assert_eq!(std::mem::size_of::<Session>(), 64);
    assert_eq!(
        std::mem::size_of::<SlabEntry>(),
        64,
        "the slab tag must fit a niche"
    );
    assert_eq!(std::mem::size_of::<ReplayWindow>(), 12);
}

#[test]
fn a_batch_is_handled_exactly_as_one_datagram_at_a_time() {
    // The same traffic, one engine fed datagram by datagram and the other
    // in batches: identical replies, effects and counters.
    let mut one = Sim::new(config());
    let mut many = Sim::new(config());
    let mut clients: Vec<Client> = (1..=40).map(Client::new).collect();
    let mut traffic: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    for c in clients.iter_mut() {
        let hello = one.encode(
            c,
            Flags::empty(),
            Message::Hello {
                ttl_ms: 0,
                name: "",
            },
        );
        traffic.push((c.addr, hello));
    }
    for round in 0..3u32 {
        for c in clients.iter_mut() {
            let message = match (c.id + u64::from(round)) % 4 {
                0 => Message::Heartbeat,
                1 => Message::Status { task_id: 5 },
                2 => Message::Submit {
                    request_id: round,
                    delay_ms: 0,
                    deadline_ms: 0,
                    job: "echo",
                    payload: b"x",
                },
                _ => Message::Bye,
            };
            let bytes = one.encode(c, Flags::ACK, message);
            traffic.push((c.addr, bytes.clone()));
            // A replay and some junk in the middle of the batch.
            traffic.push((c.addr, bytes));
            traffic.push((c.addr, vec![0x54, 0x48, 1]));
        }
    }
    for (from, bytes) in &traffic {
        let _ = one.engine.handle_datagram(one.now, *from, bytes);
    }
    for chunk in traffic.chunks(64) {
        let now = many.now;
        many.engine
            .handle_datagrams(now, chunk.iter().map(|(a, b)| (*a, b.as_slice())));
    }
    let replies = |sim: &mut Sim| -> Vec<(SocketAddr, Vec<u8>)> {
        sim.replies().into_iter().map(|r| (r.to, r.bytes)).collect()
    };
    assert_eq!(replies(&mut one), replies(&mut many));
    assert_eq!(one.effects(), many.effects());
    assert_eq!(one.engine.stats(), many.engine.stats());
    assert!(one.engine.stats().dropped_replay > 0);
}

#[test]
fn events_trace_every_cancellation_to_its_cause() {
    let mut cfg = config();
    cfg.record_events = true;
    let mut sim = Sim::new(cfg);
    let started = |sim: &mut Sim, c: &mut Client, request_id: u32| {
        let t = accepted_task(&sim.submit(c, request_id, "sleep", &[0; 4]));
        sim.effects();
        sim.event(t, TaskEvent::Started);
        t
    };
    let mut a = Client::new(1);
    sim.hello(&mut a, 500);
    let expired = started(&mut sim, &mut a, 1);
    let mut b = Client::new(2);
    sim.hello(&mut b, 60_000);
    let cancelled = started(&mut sim, &mut b, 1);
    let deadline = accepted_task(&sim.submit_timed(&mut b, 2, 0, 200, "sleep", &[0; 4]));
    sim.effects();
    sim.event(deadline, TaskEvent::Started);
    let replaced = started(&mut sim, &mut b, 3);
    let events: Vec<Event> = std::iter::from_fn(|| sim.engine.poll_event()).collect();
    assert!(matches!(
        events[0],
        Event::SessionOpened {
            client_id: 1,
            ttl_ms: 500,
            ..
        }
    ));
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::TaskAccepted { task, .. } if *task == cancelled)));
    assert_eq!(sim.engine.stats().tasks_running_now, 4);

    sim.run_ms(250);
    sim.ask(
        &mut b,
        Message::Cancel {
            task_id: cancelled.0,
        },
    );
    let mut b2 = b.next_incarnation();
    sim.hello(&mut b2, 60_000);
    sim.run_ms(300);
    sim.effects();
    for t in [expired, cancelled, deadline, replaced] {
        sim.event(t, TaskEvent::Finished(JobOutcome::Done(vec![])));
    }
    let events: Vec<Event> = std::iter::from_fn(|| sim.engine.poll_event()).collect();
    let cause_of = |task: TaskId| {
        events.iter().find_map(|e| match e {
            Event::TaskEnded {
                task: t,
                cause,
                ending,
                run_us,
                ..
            } if *t == task => Some((*cause, *ending, *run_us)),
            _ => None,
        })
    };
    let (cause, ending, run_us) = cause_of(expired).unwrap();
    assert_eq!(ending, Ending::Cancelled(CancelReason::Expired));
    assert!(matches!(cause, Some(Cause::Expired { incarnation: 1000, at }) if at.0 >= 500_000));
    assert_eq!(
        run_us,
        Some(550_000),
        "started at 0, ended when reported at 550 ms"
    );
    assert!(matches!(
        cause_of(cancelled).unwrap().0,
        Some(Cause::Cancelled { from, incarnation: 1000 }) if from == b.addr
    ));
    assert_eq!(
        cause_of(deadline).unwrap().0,
        Some(Cause::Deadline { deadline_ms: 200 })
    );
    assert_eq!(
        cause_of(replaced).unwrap().0,
        Some(Cause::Replaced {
            incarnation: 1000,
            by: 1001
        })
    );
    let ended: Vec<(u64, CancelReason, Option<u64>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::SessionEnded {
                client_id,
                reason,
                lateness_us,
                ..
            } => Some((*client_id, *reason, *lateness_us)),
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 2);
    assert_eq!(
        ended[0],
        (2, CancelReason::Replaced, None),
        "b replaced at 250 ms"
    );
    assert!(
        matches!(ended[1], (1, CancelReason::Expired, Some(l)) if l < 10_000),
        "a expired within a tick of its deadline: {:?}",
        ended[1]
    );
    let text = Cause::Cancelled {
        from: b.addr,
        incarnation: 7,
    }
    .to_string();
    assert!(text.contains(&b.addr.to_string()), "{text}");
    let stats = sim.engine.stats();
    assert_eq!(stats.tasks_running_now, 0);
    assert_eq!(
        stats.tasks_cancelled_by_reason[CancelReason::Deadline as usize],
        1
    );
    assert_eq!(
        stats.tasks_cancelled_by_reason[CancelReason::Cancelled as usize],
        1
    );
}

#[test]
fn task_state_gauges_follow_every_move() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 60_000);
    let delayed = accepted_task(&sim.submit_timed(&mut c, 1, 100, 0, "echo", b""));
    let queued = accepted_task(&sim.submit(&mut c, 2, "echo", b""));
    let gauges = |sim: &Sim| {
        let s = sim.engine.stats();
        (
            s.tasks_scheduled_now,
            s.tasks_queued_now,
            s.tasks_running_now,
        )
    };
    assert_eq!(gauges(&sim), (1, 1, 0));
    sim.run_ms(110);
    assert_eq!(gauges(&sim), (0, 2, 0));
    sim.event(queued, TaskEvent::Started);
    assert_eq!(gauges(&sim), (0, 1, 1));
    sim.event(queued, TaskEvent::Finished(JobOutcome::Done(vec![])));
    assert_eq!(gauges(&sim), (0, 1, 0));
    sim.event(delayed, TaskEvent::Started);
    sim.send(&mut c, Message::Cancel { task_id: delayed.0 })
        .unwrap();
    assert_eq!(gauges(&sim), (0, 0, 1), "running until the worker reports");
    sim.event(delayed, TaskEvent::Finished(JobOutcome::Done(vec![])));
    assert_eq!(gauges(&sim), (0, 0, 0));
}

/// Found by the engine fuzz target: a task that finished before its
/// deadline left its timer in the wheel, keyed by a slab slot that the next
/// task reuses; the stale timer then fired for the new task.
#[test]
fn a_finished_tasks_deadline_timer_dies_with_it() {
    let mut cfg = config();
    cfg.max_finished_tasks = 1;
    cfg.finished_retention_ms = 0;
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(1);
    sim.hello(&mut c, 60_000);
    let first = accepted_task(&sim.submit_timed(&mut c, 1, 0, 500, "echo", b""));
    sim.effects();
    sim.event(first, TaskEvent::Started);
    sim.event(first, TaskEvent::Finished(JobOutcome::Done(vec![])));
    // Age the record out so its slab slot is free, then reuse the slot for
    // a task held back by a delay longer than the old deadline.
    sim.run_ms(10);
    let second = accepted_task(&sim.submit_timed(&mut c, 2, 2_000, 0, "echo", b""));
    assert_eq!(second.0 & 0xffff_ffff, first.0 & 0xffff_ffff, "slot reused");
    sim.run_ms(600);
    assert!(
        sim.effects().is_empty(),
        "the old deadline must not start (or cancel) the new task"
    );
    assert_eq!(
        task_report(&sim.ask(&mut c, Message::Status { task_id: second.0 })).1,
        "Scheduled"
    );
    sim.run_ms(1_500);
    assert!(matches!(sim.effects()[..], [Effect::Run { task, .. }] if task == second));
}

#[test]
fn submit_floods_get_rejected_and_never_grow_memory() {
    let mut cfg = config();
    cfg.max_tasks_per_session = 2;
    cfg.max_waiting_tasks = 50;
    cfg.max_finished_tasks = 100;
    let mut sim = Sim::new(cfg);
    let mut clients: Vec<Client> = (1..=30).map(Client::new).collect();
    for c in clients.iter_mut() {
        sim.hello(c, 3_600_000);
    }
    let mut codes = std::collections::HashMap::new();
    // 30 sessions x 5,000 SUBMITs with fresh request ids, tasks finishing
    // now and then: REJECTED 3 per session, REJECTED 2 once the queue is
    // full, and every table stays within its bound throughout.
    for round in 0..5_000u32 {
        for c in clients.iter_mut() {
            let reply = sim.submit(c, round + 1, "echo", b"x");
            let code = match reply.message() {
                Message::Accepted { .. } => 0,
                Message::Rejected { code, .. } => code as u16,
                m => panic!("{m:?}"),
            };
            *codes.entry(code).or_insert(0u64) += 1;
        }
        if round % 7 == 0 {
            for effect in sim.effects() {
                if let Effect::Run { task, .. } = effect {
                    sim.event(task, TaskEvent::Started);
                    sim.event(task, TaskEvent::Finished(JobOutcome::Done(vec![])));
                }
            }
        }
        let e = &sim.engine;
        assert!(e.tasks.len() <= 50 + 100 + 1, "tasks: {}", e.tasks.len());
        for (_, s) in e.sessions.iter() {
            let requests = s.work.as_ref().map_or(0, |w| w.requests.len());
            assert!(requests <= request_memory(2), "request memory {requests}");
        }
    }
    assert!(codes[&(RejectCode::TooManyTasks as u16)] > 0, "{codes:?}");
    assert!(codes[&(RejectCode::QueueFull as u16)] > 0, "{codes:?}");
    assert!(codes[&0] > 0, "{codes:?}");
}

/// A HELLO of `c`'s session again (same incarnation, next seq) is stale.
fn assert_hello_is_stale(sim: &mut Sim, c: &Client, why: &str) {
    let mut replay = c.clone();
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "t",
    };
    assert_eq!(
        sim.send(&mut replay, hello).unwrap_err(),
        Dropped::StaleHello,
        "client {}: {why}",
        c.id
    );
}

#[test]
fn one_client_churning_its_sessions_cannot_evict_another_clients_record() {
    let mut cfg = config();
    cfg.max_client_records = 10;
    let mut sim = Sim::new(cfg);
    let mut ended = Vec::new();
    for id in 1..=5 {
        let mut c = Client::new(id);
        sim.hello(&mut c, TTL);
        sim.send(&mut c, Message::Bye).unwrap();
        ended.push(c);
    }
    // A hundred times the bound in replacements of its own session.
    let mut churner = Client::new(99);
    sim.hello(&mut churner, TTL);
    for _ in 0..1000 {
        churner = churner.next_incarnation();
        sim.hello(&mut churner, TTL);
    }
    assert_eq!(sim.engine.stats().sessions_replaced, 1000);
    sim.run_ms(60_000);
    // Within the ten minutes, a replayed HELLO of each ended session is
    // still stale: it cannot open that session again.
    for c in &ended {
        assert_hello_is_stale(&mut sim, c, "its record was evicted");
    }
    assert_eq!(sim.engine.live_sessions(), 0);
    assert!(sim.engine.records.len() <= 10);
}

#[test]
fn an_ended_session_whose_task_outlives_the_memory_keeps_its_incarnation_stale() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(8);
    sim.hello(&mut c, TTL);
    let task = accepted_task(&sim.submit(&mut c, 1, "sleep", &[0; 4]));
    sim.effects();
    sim.event(task, TaskEvent::Started);
    // BYE sets the task's flag, but the job ignores it for an hour: the
    // ended session keeps its slot so the final state can be pushed.
    sim.send(&mut c, Message::Bye).unwrap();
    sim.run_ms(3_600_000);
    assert_eq!(sim.engine.footprint().ended_sessions_held, 1);
    assert_hello_is_stale(
        &mut sim,
        &c,
        "a second session with the same (client_id, incarnation)",
    );
    assert_eq!(sim.engine.live_sessions(), 0);
    let last = sim.event(task, TaskEvent::Finished(JobOutcome::Done(vec![])));
    assert!(is_cancelled_with(&last[0], CancelReason::Left));
    assert_eq!(
        sim.engine.records.len(),
        0,
        "the record goes with the slot, its ten minutes long past"
    );
}

#[test]
fn a_finished_tasks_request_id_is_kept_through_its_retry_window() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(2);
    sim.hello(&mut c, TTL);
    let first = accepted_task(&sim.submit(&mut c, 1, "echo", b"once"));
    sim.effects();
    sim.event(first, TaskEvent::Started);
    sim.event(first, TaskEvent::Finished(JobOutcome::Done(vec![])));
    // 64 unfinished tasks, then enough rejected SUBMITs to fill the
    // session's memory of request ids several times over.
    let sleeps: Vec<TaskId> = (2..=65)
        .map(|r| accepted_task(&sim.submit(&mut c, r, "sleep", &[0; 4])))
        .collect();
    for r in 100..400 {
        let reply = sim.submit(&mut c, r, "sleep", &[0; 4]);
        assert_eq!(rejected_code(&reply), RejectCode::TooManyTasks);
    }
    for task in sim.effects().into_iter().filter_map(|e| match e {
        Effect::Run { task, .. } => Some(task),
        _ => None,
    }) {
        sim.event(task, TaskEvent::Started);
    }
    // One sleep ends, so a new task would now be admitted: a retry of
    // request 1 must still get its first answer and start nothing.
    sim.event(sleeps[0], TaskEvent::Finished(JobOutcome::Done(vec![])));
    let again = sim.submit(&mut c, 1, "echo", b"once");
    assert_eq!(accepted_task(&again), first);
    assert!(sim.effects().is_empty(), "a duplicate task was started");
}

#[test]
fn a_session_whose_request_memory_holds_only_retryable_ids_refuses_more() {
    let mut cfg = config();
    cfg.max_tasks_per_session = 32; // request memory: 64
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(3);
    sim.hello(&mut c, TTL);
    let mut finished = Vec::new();
    for r in 1..=32 {
        let t = accepted_task(&sim.submit(&mut c, r, "echo", b""));
        sim.event(t, TaskEvent::Started);
        sim.event(t, TaskEvent::Finished(JobOutcome::Done(vec![])));
        finished.push(t);
    }
    let sleeps: Vec<TaskId> = (33..=64)
        .map(|r| accepted_task(&sim.submit(&mut c, r, "sleep", &[0; 4])))
        .collect();
    sim.effects();
    for &t in &sleeps {
        sim.event(t, TaskEvent::Started);
    }
    sim.event(sleeps[0], TaskEvent::Finished(JobOutcome::Done(vec![])));
    // 32 tasks that ended within the TTL and 31 unfinished ones, plus the
    // one just ended: every answer may still be retried, so there is no
    // room to remember a new one, and it is refused (not remembered).
    let reply = sim.submit(&mut c, 65, "echo", b"");
    assert_eq!(rejected_code(&reply), RejectCode::TooManyTasks);
    assert_eq!(
        accepted_task(&sim.submit(&mut c, 1, "echo", b"")),
        finished[0]
    );
    // One TTL later (the session kept alive), the old answers may go.
    for _ in 0..4 {
        sim.run_ms(1_000);
        sim.send(&mut c, Message::Heartbeat).unwrap();
    }
    let fresh = accepted_task(&sim.submit(&mut c, 66, "echo", b""));
    assert!(!finished.contains(&fresh));
    assert!(sim.engine.footprint().remembered_requests <= request_memory(32));
}

#[test]
fn every_bad_setting_is_an_error_not_a_panic() {
    let bad = [
        Config {
            min_ttl_ms: 0,
            ..config()
        },
        Config {
            default_ttl_ms: 0,
            ..config()
        },
        Config {
            tick_us: 1500,
            ..config()
        },
        Config {
            max_sessions: 0,
            ..config()
        },
        Config {
            max_tasks_per_session: 0,
            ..config()
        },
        Config {
            max_waiting_tasks: 0,
            ..config()
        },
        Config {
            max_finished_per_client: 0,
            ..config()
        },
        Config {
            max_outbox_bytes: 100,
            ..config()
        },
    ];
    for cfg in bad {
        let err = Engine::new(cfg.clone(), Timestamp(0)).expect_err("accepted a bad config");
        assert!(!err.to_string().is_empty());
        assert_eq!(cfg.validate(), Err(err));
    }
}

#[test]
fn an_elapsed_deadline_fires_at_the_next_tick_instead_of_panicking() {
    let mut wheel = Wheel::new(Tick(10));
    schedule(&mut wheel, WheelKey(1), Tick(5));
    assert_eq!(wheel.next_due(), Some(Tick(11)));
    // Scheduling a key again moves it.
    schedule(&mut wheel, WheelKey(1), Tick(40));
    assert_eq!(wheel.deadline(WheelKey(1)), Some(Tick(40)));
    let mut expired = Vec::new();
    wheel.advance(Tick(40), &mut expired);
    assert_eq!(expired.len(), 1);
}

#[test]
fn fail_and_panic_take_texts_their_error_can_carry_whole() {
    let mut cfg = config();
    cfg.jobs = crate::pool::Registry::with_standard_jobs().table();
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(6);
    sim.hello(&mut c, TTL);
    let text = "é".repeat(127) + "x"; // 255 bytes
    let failing = accepted_task(&sim.submit(&mut c, 1, "fail", text.as_bytes()));
    let too_long = "x".repeat(256);
    let not_text = [0xff, 0xfe];
    for (r, job, payload) in [
        (2, "fail", too_long.as_bytes()),
        (3, "fail", &not_text[..]),
        (4, "panic", &too_long.as_bytes()[..246]),
        (5, "panic", &not_text[..]),
    ] {
        let reply = sim.submit(&mut c, r, job, payload);
        assert_eq!(rejected_code(&reply), RejectCode::BadRequest, "{job} {r}");
    }
    accepted_task(&sim.submit(&mut c, 6, "panic", &too_long.as_bytes()[..245]));
    sim.effects();
    sim.event(failing, TaskEvent::Started);
    let last = sim.event(
        failing,
        TaskEvent::Finished(JobOutcome::Failed(text.clone())),
    );
    assert_eq!(
        last[0].message(),
        Message::TaskState {
            task_id: failing.0,
            report: TaskReport::Failed(&text)
        },
        "error = the payload, whole"
    );
}

#[test]
fn one_client_cannot_push_out_another_clients_final_states() {
    let mut cfg = config();
    cfg.max_finished_per_client = 4;
    let mut sim = Sim::new(cfg);
    let mut quiet = Client::new(1);
    let mut busy = Client::new(2);
    sim.hello(&mut quiet, 3_600_000);
    sim.hello(&mut busy, 3_600_000);
    let kept = accepted_task(&sim.submit(&mut quiet, 1, "echo", b"mine"));
    sim.event(kept, TaskEvent::Started);
    sim.event(
        kept,
        TaskEvent::Finished(JobOutcome::Done(b"mine".to_vec())),
    );
    let mut theirs = Vec::new();
    for r in 1..=100 {
        let t = accepted_task(&sim.submit(&mut busy, r, "echo", b""));
        sim.event(t, TaskEvent::Started);
        sim.event(t, TaskEvent::Finished(JobOutcome::Done(vec![])));
        theirs.push(t);
    }
    let state = |sim: &mut Sim, c: &mut Client, t: TaskId| {
        task_report(&sim.ask(c, Message::Status { task_id: t.0 })).1
    };
    assert_eq!(
        state(&mut sim, &mut quiet, kept),
        "Done([109, 105, 110, 101])"
    );
    assert_eq!(state(&mut sim, &mut busy, theirs[95]), "Unknown");
    assert_eq!(state(&mut sim, &mut busy, theirs[96]), "Done([])");
    assert_eq!(sim.engine.footprint().final_states, 5);
    assert_eq!(sim.engine.stats().finished_evicted_early, 96);
}

/// Item 3 of the review: whatever one client sends, and however the
/// workers report, the engine and the pool hold no more than
/// `Config::client_bound` says.
mod memory {
    use super::*;
    use crate::pool::WorkQueue;
    use proptest::prelude::*;

    const WORKERS: usize = 2;

    #[derive(Debug, Clone)]
    enum Step {
        Hello,
        NewIncarnation,
        Heartbeat(bool),
        Submit {
            request_id: u32,
            job: u8,
            payload_len: usize,
            delay_ms: u32,
            deadline_ms: u32,
        },
        Cancel(u8),
        Status(u8),
        Bye,
        Claim,
        Finish {
            which: u8,
            result_len: usize,
            failed: bool,
        },
        Wait(u64),
        Replay(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            Just(Step::Hello),
            Just(Step::NewIncarnation),
            any::<bool>().prop_map(Step::Heartbeat),
            (
                0u32..200,
                0u8..4,
                0usize..=1024,
                prop_oneof![Just(0u32), 1u32..3000],
                prop_oneof![Just(0u32), 1u32..3000]
            )
                .prop_map(|(request_id, job, payload_len, delay_ms, deadline_ms)| {
                    Step::Submit {
                        request_id,
                        job,
                        payload_len,
                        delay_ms,
                        deadline_ms,
                    }
                }),
            any::<u8>().prop_map(Step::Cancel),
            any::<u8>().prop_map(Step::Status),
            Just(Step::Bye),
            Just(Step::Claim),
            (any::<u8>(), 0usize..1300, any::<bool>()).prop_map(|(which, result_len, failed)| {
                Step::Finish {
                    which,
                    result_len,
                    failed,
                }
            }),
            (0u64..20_000).prop_map(Step::Wait),
            any::<u8>().prop_map(Step::Replay),
        ]
    }

    fn memory_config() -> Config {
        let mut cfg = config();
        cfg.jobs = crate::pool::Registry::with_standard_jobs().table();
        cfg.max_tasks_per_session = 4;
        cfg.max_finished_per_client = 8;
        cfg.max_client_records = 4;
        cfg
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn one_client_holds_at_most_its_bound(steps in proptest::collection::vec(step(), 1..400)) {
            let cfg = memory_config();
            let bound = cfg.client_bound(WORKERS);
            let per_session = cfg.max_tasks_per_session;
            let mut sim = Sim::new(cfg);
            let mut queue = WorkQueue::new();
            let mut client = Client::new(77);
            let mut sent: Vec<Vec<u8>> = Vec::new();
            let mut tasks: Vec<TaskId> = Vec::new();
            let mut running: Vec<TaskId> = Vec::new();
            let payload = vec![b'p'; 1024];
            let jobs = ["echo", "sleep", "fail", "panic"];
            for step in steps {
                let message = match step {
                    Step::Hello => Some((Flags::empty(), Message::Hello { ttl_ms: 1000, name: "m" })),
                    Step::NewIncarnation => {
                        client = client.next_incarnation();
                        Some((Flags::empty(), Message::Hello { ttl_ms: 1000, name: "m" }))
                    }
                    Step::Heartbeat(ack) => Some((if ack { Flags::ACK } else { Flags::empty() }, Message::Heartbeat)),
                    Step::Submit { request_id, job, payload_len, delay_ms, deadline_ms } => {
                        let job = jobs[usize::from(job)];
                        let len = if job == "sleep" { 4 } else { payload_len };
                        Some((Flags::empty(), Message::Submit { request_id, delay_ms, deadline_ms, job, payload: &payload[..len] }))
                    }
                    Step::Cancel(n) | Step::Status(n) => {
                        let task_id = tasks.get(usize::from(n) % tasks.len().max(1)).map_or(u64::from(n), |t| t.0);
                        Some((Flags::empty(), if matches!(step, Step::Cancel(_)) { Message::Cancel { task_id } } else { Message::Status { task_id } }))
                    }
                    Step::Bye => Some((Flags::empty(), Message::Bye)),
                    Step::Claim => {
                        if running.len() < WORKERS {
                            if let Some(claim) = queue.claim() {
                                sim.engine.handle_task_event(sim.now, claim.task, TaskEvent::Started);
                                running.push(claim.task);
                            }
                        }
                        None
                    }
                    Step::Finish { which, result_len, failed } => {
                        if !running.is_empty() {
                            let task = running.swap_remove(usize::from(which) % running.len());
                            queue.finish(task);
                            let outcome = if failed {
                                JobOutcome::Failed("e".repeat(result_len.min(300)))
                            } else {
                                JobOutcome::Done(vec![1; result_len])
                            };
                            sim.engine.handle_task_event(sim.now, task, TaskEvent::Finished(outcome));
                        }
                        None
                    }
                    Step::Wait(ms) => {
                        sim.run_ms(ms);
                        None
                    }
                    Step::Replay(n) => {
                        if let Some(bytes) = sent.get(usize::from(n) % sent.len().max(1)).cloned() {
                            let _ = sim.engine.handle_datagram(sim.now, client.addr, &bytes);
                        }
                        None
                    }
                };
                if let Some((flags, message)) = message {
                    let bytes = sim.encode(&mut client, flags, message);
                    let _ = sim.engine.handle_datagram(sim.now, client.addr, &bytes);
                    if sent.len() < 64 {
                        sent.push(bytes);
                    }
                }
                // The server's part: hand out work, withdraw or signal
                // cancels, as its loop does after every input.
                while let Some(effect) = sim.engine.poll_effect() {
                    if let Effect::Run { task, .. } = effect {
                        tasks.push(task);
                        if tasks.len() > 32 {
                            tasks.remove(0);
                        }
                    }
                    if let Some(task) = queue.apply(effect, std::time::Instant::now()) {
                        sim.engine.handle_task_event(sim.now, task, TaskEvent::Withdrawn);
                    }
                }
                let held = sim.engine.footprint();
                prop_assert!(held.within(&bound), "held {:?}\nbound {:?}", held, bound);
                sim.replies();
                prop_assert!(queue.queued() <= per_session, "pool queue {:?}", queue);
                prop_assert!(queue.queued_bytes() <= per_session * wire::MAX_PAYLOAD_LEN);
                prop_assert!(queue.running() <= WORKERS);
                prop_assert!(queue.order_len() <= 2 * queue.queued() + 64);
                let s = sim.engine.stats();
                prop_assert_eq!(
                    s.tasks_accepted,
                    s.tasks_done + s.tasks_failed + s.tasks_cancelled + sim.engine.unfinished_tasks() as u64
                );
            }
        }
    }
}

fn limited() -> Config {
    Config {
        amplification_limit: true,
        ..config()
    }
}

#[test]
fn amplification_limit_holds_an_empty_name_hello_until_its_retry() {
    let mut sim = Sim::new(limited());
    let mut c = Client::new(1);
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "",
    };
    // 33 bytes cannot pay for a 36-byte WELCOME, but the session is open.
    assert!(sim.send(&mut c, hello).unwrap().is_empty());
    assert_eq!(sim.engine.stats().replies_unpaid, 1);
    assert_eq!(sim.engine.live_sessions(), 1);
    // The retry (a new datagram) brings 33 more: now it is answered.
    let welcome = sim.ask(&mut c, hello);
    assert_eq!(welcome.bytes.len(), 36);
    assert!(matches!(welcome.message(), Message::Welcome { .. }));
    // A three-byte name pays for its own WELCOME at once.
    let mut d = Client::new(2);
    let welcome = sim.ask(
        &mut d,
        Message::Hello {
            ttl_ms: 0,
            name: "abc",
        },
    );
    assert!(matches!(welcome.message(), Message::Welcome { .. }));
}

#[test]
fn amplification_limit_pays_acks_from_what_the_client_sent() {
    let mut sim = Sim::new(limited());
    let mut c = Client::new(1);
    sim.ask(
        &mut c,
        Message::Hello {
            ttl_ms: 0,
            name: "abcd",
        },
    );
    // 37 in, 36 out: 1 byte banked. Eight ACK'd heartbeats bring 224 bytes
    // and would cost 256: one of them goes unanswered.
    let mut acks = 0;
    for _ in 0..8 {
        acks += sim
            .send_flags(&mut c, Flags::ACK, Message::Heartbeat)
            .unwrap()
            .len();
    }
    assert_eq!(acks, 7);
    // Plain heartbeats bank credit, and then every ACK is paid for.
    for _ in 0..4 {
        assert!(sim.send(&mut c, Message::Heartbeat).unwrap().is_empty());
    }
    for _ in 0..8 {
        assert_eq!(
            sim.send_flags(&mut c, Flags::ACK, Message::Heartbeat)
                .unwrap()
                .len(),
            1
        );
    }
}

#[test]
fn keyed_engines_and_engines_without_the_limit_answer_every_hello() {
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "",
    };
    let mut open = Sim::new(config());
    open.ask(&mut Client::new(1), hello);
    let mut keyed = Sim::new(Config {
        key: Some(test_key()),
        ..limited()
    });
    // Keyed, every reply answers an authenticated datagram.
    keyed.ask(&mut Client::new(1), hello);
    assert_eq!(keyed.engine.stats().replies_unpaid, 0);
}

#[test]
fn a_backlogged_engine_sheds_only_answers_to_strangers() {
    let mut cfg = config();
    cfg.max_sessions = 1;
    let mut sim = Sim::new(cfg);
    let mut member = Client::new(1);
    sim.hello(&mut member, 0);
    sim.engine.set_backlogged(true);
    // A stranger's HEARTBEAT and a HELLO past the limit: no answer, counted.
    let mut stranger = Client::new(2);
    assert!(sim
        .send(&mut stranger, Message::Heartbeat)
        .unwrap()
        .is_empty());
    assert!(sim
        .send(
            &mut stranger,
            Message::Hello {
                ttl_ms: 0,
                name: ""
            }
        )
        .unwrap()
        .is_empty());
    assert_eq!(sim.engine.stats().replies_shed, 2);
    assert_eq!(sim.engine.stats().sessions_refused, 1);
    assert_eq!(sim.engine.stats().unknown_session, 1);
    // A live session is still answered in full.
    let ack = sim
        .send_flags(&mut member, Flags::ACK, Message::Heartbeat)
        .unwrap();
    assert!(matches!(ack[0].message(), Message::HeartbeatAck { .. }));
    assert!(matches!(
        sim.submit(&mut member, 1, "echo", b"x").message(),
        Message::Accepted { .. }
    ));
    // A HELLO with room opens its session but is not welcomed until its
    // retry, which comes from a member and is answered even now.
    sim.engine.config.max_sessions = 2;
    let mut newcomer = Client::new(3);
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "",
    };
    assert!(sim.send(&mut newcomer, hello).unwrap().is_empty());
    assert_eq!(sim.engine.live_sessions(), 2);
    assert_eq!(sim.engine.stats().replies_shed, 3);
    let welcome = sim.ask(&mut newcomer, hello);
    assert!(matches!(welcome.message(), Message::Welcome { .. }));
    // Once the socket is drained, strangers hear back again.
    sim.engine.set_backlogged(false);
    let reply = sim.ask(&mut stranger, Message::Heartbeat);
    assert_eq!(reply.message(), Message::UnknownSession);
    let reply = sim.ask(
        &mut stranger,
        Message::Hello {
            ttl_ms: 0,
            name: "",
        },
    );
    assert_eq!(rejected_code(&reply), RejectCode::TooManySessions);
}

mod amplification {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Step {
        Hello {
            client: u8,
            name_len: usize,
        },
        Heartbeat {
            client: u8,
            ack: bool,
        },
        Submit {
            client: u8,
            request_id: u32,
            payload_len: usize,
        },
        Cancel {
            client: u8,
            task: u8,
        },
        Status {
            client: u8,
            task: u8,
        },
        Bye {
            client: u8,
        },
        Junk {
            from: u8,
            len: usize,
        },
        Finish {
            result_len: usize,
        },
        Wait {
            ms: u64,
        },
        Move {
            client: u8,
            to: u8,
        },
        NewIncarnation {
            client: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        let client = 0u8..4;
        prop_oneof![
            (client.clone(), 0usize..6)
                .prop_map(|(client, name_len)| Step::Hello { client, name_len }),
            (client.clone(), any::<bool>())
                .prop_map(|(client, ack)| Step::Heartbeat { client, ack }),
            (client.clone(), 0u32..6, 0usize..1024).prop_map(
                |(client, request_id, payload_len)| {
                    Step::Submit {
                        client,
                        request_id,
                        payload_len,
                    }
                }
            ),
            (client.clone(), any::<u8>()).prop_map(|(client, task)| Step::Cancel { client, task }),
            (client.clone(), any::<u8>()).prop_map(|(client, task)| Step::Status { client, task }),
            client.clone().prop_map(|client| Step::Bye { client }),
            (0u8..6, 0usize..1300).prop_map(|(from, len)| Step::Junk { from, len }),
            (0usize..1200).prop_map(|result_len| Step::Finish { result_len }),
            (0u64..5000).prop_map(|ms| Step::Wait { ms }),
            (client.clone(), 0u8..6).prop_map(|(client, to)| Step::Move { client, to }),
            client.prop_map(|client| Step::NewIncarnation { client }),
        ]
    }

    fn address(n: u8) -> SocketAddr {
        // Two hosts, three ports each: addresses on one host never share.
        format!("127.0.0.{}:{}", 1 + n % 2, 7000 + u16::from(n))
            .parse()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Whatever keyless clients do, from whichever addresses, with
        /// tasks finishing and pushing their states whenever: no address is
        /// ever sent more bytes than arrived from it.
        #[test]
        fn no_address_is_sent_more_than_it_sent(steps in proptest::collection::vec(step(), 1..300)) {
            let mut sim = Sim::new(limited());
            let mut clients: Vec<Client> = (1..=4).map(Client::new).collect();
            let mut received: HashMap<SocketAddr, usize> = HashMap::new();
            let mut sent: HashMap<SocketAddr, usize> = HashMap::new();
            let mut running: Vec<TaskId> = Vec::new();
            let payload = vec![7u8; 1024];
            let name = "abcdef";
            for step in steps {
                let mut datagram = |sim: &mut Sim, c: usize, flags: Flags, m: Message<'_>| {
                    let bytes = sim.encode(&mut clients[c], flags, m);
                    (clients[c].addr, bytes)
                };
                let input = match step {
                    Step::Hello { client, name_len } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Hello { ttl_ms: 0, name: &name[..name_len] })),
                    Step::Heartbeat { client, ack } => Some(datagram(&mut sim, client.into(), if ack { Flags::ACK } else { Flags::empty() }, Message::Heartbeat)),
                    Step::Submit { client, request_id, payload_len } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Submit { request_id, delay_ms: 0, deadline_ms: 0, job: "echo", payload: &payload[..payload_len] })),
                    Step::Cancel { client, task } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Cancel { task_id: u64::from(task) })),
                    Step::Status { client, task } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Status { task_id: u64::from(task) })),
                    Step::Bye { client } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Bye)),
                    Step::Junk { from, len } => Some((address(from), vec![0x54; len])),
                    Step::Finish { result_len } => {
                        if let Some(task) = running.pop() {
                            sim.engine.handle_task_event(sim.now, task, TaskEvent::Finished(JobOutcome::Done(vec![1; result_len])));
                        }
                        None
                    }
                    Step::Wait { ms } => {
                        sim.run_ms(ms);
                        None
                    }
                    Step::Move { client, to } => {
                        clients[usize::from(client)].addr = address(to);
                        None
                    }
                    Step::NewIncarnation { client } => {
                        let c = &mut clients[usize::from(client)];
                        *c = c.next_incarnation();
                        None
                    }
                };
                if let Some((from, bytes)) = input {
                    *received.entry(from).or_default() += bytes.len();
                    let _ = sim.engine.handle_datagram(sim.now, from, &bytes);
                }
                for effect in sim.effects() {
                    if let Effect::Run { task, .. } = effect {
                        sim.engine.handle_task_event(sim.now, task, TaskEvent::Started);
                        running.push(task);
                    }
                }
                for reply in sim.replies() {
                    *sent.entry(reply.to).or_default() += reply.bytes.len();
                    let got = received.get(&reply.to).copied().unwrap_or(0);
                    prop_assert!(sent[&reply.to] <= got, "{} sent {} bytes, was sent {got}", reply.to, sent[&reply.to]);
                }
            }
        }
    }
}
