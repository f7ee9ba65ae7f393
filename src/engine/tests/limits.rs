//! What one client can make the engine hold: floods of SUBMITs, churned
//! sessions, request ids, final states, configuration, and the memory
//! property over arbitrary scripts.
use super::*;
use crate::engine::config::request_memory;

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
    cfg.max_tasks_per_session = 16; // request memory: 64
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(3);
    sim.hello(&mut c, TTL);
    let mut finished = Vec::new();
    for r in 1..=48 {
        let t = accepted_task(&sim.submit(&mut c, r, "echo", b""));
        sim.event(t, TaskEvent::Started);
        sim.event(t, TaskEvent::Finished(JobOutcome::Done(vec![])));
        finished.push(t);
    }
    let sleeps: Vec<TaskId> = (49..=64)
        .map(|r| accepted_task(&sim.submit(&mut c, r, "sleep", &[0; 4])))
        .collect();
    sim.effects();
    for &t in &sleeps {
        sim.event(t, TaskEvent::Started);
    }
    sim.event(sleeps[0], TaskEvent::Finished(JobOutcome::Done(vec![])));
    // 48 tasks that ended within the retry window and 15 unfinished ones,
    // plus the one just ended: every answer may still be retried, so there
    // is no room to remember a new one, and it is refused (not remembered).
    let reply = sim.submit(&mut c, 65, "echo", b"");
    assert_eq!(rejected_code(&reply), RejectCode::TooManyTasks);
    assert_eq!(
        accepted_task(&sim.submit(&mut c, 1, "echo", b"")),
        finished[0]
    );
    // Past the window (5 s, the TTL being shorter), with the session kept
    // alive, the old answers may go.
    for _ in 0..6 {
        sim.run_ms(1_000);
        sim.send(&mut c, Message::Heartbeat).unwrap();
    }
    let fresh = accepted_task(&sim.submit(&mut c, 66, "echo", b""));
    assert!(!finished.contains(&fresh));
    assert!(sim.engine.footprint().remembered_requests <= request_memory(16));
}

#[test]
fn a_rejection_is_repeated_to_a_retry_within_the_window_however_many_follow() {
    let mut cfg = config();
    cfg.max_tasks_per_session = 16; // request memory: 64
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(6);
    sim.hello(&mut c, TTL);
    let first = sim.submit(&mut c, 1, "no-such-job", b"");
    assert_eq!(rejected_code(&first), RejectCode::UnknownJob);
    for r in 2..200 {
        sim.submit(&mut c, r, "echo", b"");
    }
    // A retry of request 1, still within its window, however many SUBMITs
    // came since: the same REJECTED, not a fresh look.
    assert_eq!(
        rejected_code(&sim.submit(&mut c, 1, "echo", b"")),
        RejectCode::UnknownJob
    );
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
                    let applied = queue.apply(effect, std::time::Instant::now());
                    if let Some((task, event)) = applied.report() {
                        sim.engine.handle_task_event(sim.now, task, event);
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

#[test]
fn an_ended_session_held_for_its_running_task_keeps_no_request_ids() {
    let mut cfg = config();
    cfg.max_tasks_per_session = 16; // request memory: 64
    let bound = cfg.client_bound(8).remembered_requests;
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(4);
    for _ in 0..8 {
        sim.hello(&mut c, TTL);
        // One long task on a worker, then the memory filled with answers.
        let long = accepted_task(&sim.submit(&mut c, 1, "sleep", &[0; 4]));
        sim.effects();
        sim.event(long, TaskEvent::Started);
        for r in 2..200 {
            sim.submit(&mut c, r, "no-such-job", b"");
        }
        // A new incarnation replaces the session; the task keeps its slot.
        c = c.next_incarnation();
    }
    sim.hello(&mut c, TTL);
    let held = sim.engine.footprint();
    assert_eq!(held.ended_sessions_held, 8);
    assert!(
        held.remembered_requests <= bound,
        "{} remembered, bound {bound}",
        held.remembered_requests
    );
}

#[test]
fn shards_share_one_session_count_and_a_replacement_at_the_bound_is_welcomed() {
    let shared = crate::engine::SharedSessions::default();
    let shard = || {
        Sim::new(Config {
            max_sessions: 2,
            shared_sessions: Some(shared.clone()),
            ..config()
        })
    };
    let (mut a, mut b) = (shard(), shard());
    let (mut one, mut two, mut three) = (Client::new(1), Client::new(2), Client::new(3));
    assert!(matches!(
        a.hello(&mut one, 600).message(),
        Message::Welcome { .. }
    ));
    assert!(matches!(
        b.hello(&mut two, 600).message(),
        Message::Welcome { .. }
    ));
    assert_eq!(shared.live(), 2);
    // Shard a holds one session, under its own bound, but the server is full.
    assert_eq!(
        rejected_code(&a.hello(&mut three, 600)),
        RejectCode::TooManySessions
    );
    assert_eq!(shared.live(), 2);
    // At the bound, a client's newer incarnation replaces its session.
    let mut again = one.next_incarnation();
    assert!(matches!(
        a.hello(&mut again, 600).message(),
        Message::Welcome { .. }
    ));
    assert_eq!(shared.live(), 2);
    // Ending (expiry on b, a BYE on a) gives the places back.
    b.run_ms(2_000);
    assert_eq!(shared.live(), 1);
    a.ask(&mut again, Message::Bye);
    assert_eq!(shared.live(), 0);
    assert!(matches!(
        b.hello(&mut three, 600).message(),
        Message::Welcome { .. }
    ));
    assert_eq!(shared.live(), 1);
}
