//! Tasks: submission, scheduling, deadlines, cancellation and its causes,
//! final states, shutdown.
use super::*;

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
    cfg.max_finished_per_client = 1;
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(1);
    sim.hello(&mut c, 60_000);
    let first = accepted_task(&sim.submit_timed(&mut c, 1, 0, 500, "echo", b""));
    sim.effects();
    sim.event(first, TaskEvent::Started);
    sim.event(first, TaskEvent::Finished(JobOutcome::Done(vec![])));
    // Another final state pushes the first out (one kept per client here),
    // so its slab slot is free; then reuse the slot for a task held back by
    // a delay longer than the old deadline.
    let filler = accepted_task(&sim.submit(&mut c, 3, "echo", b""));
    sim.effects();
    sim.event(filler, TaskEvent::Started);
    sim.event(filler, TaskEvent::Finished(JobOutcome::Done(vec![])));
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
fn a_cancel_that_comes_after_the_job_returned_leaves_the_outcome_as_it_was() {
    // The job returned Done, but its report is still on the way when the
    // client's CANCEL is handled: the pool finds no such task on a worker
    // (AlreadyReturned), and the final state is the job's, not "cancelled".
    let mut sim = Sim::new(config());
    let mut c = Client::new(9);
    sim.hello(&mut c, TTL);
    let task = accepted_task(&sim.submit(&mut c, 1, "echo", b"x"));
    sim.effects();
    sim.event(task, TaskEvent::Started);
    sim.ask(&mut c, Message::Cancel { task_id: task.0 });
    assert!(sim.event(task, TaskEvent::AlreadyReturned).is_empty());
    let last = sim.event(task, TaskEvent::Finished(JobOutcome::Done(b"x".to_vec())));
    assert_eq!(task_report(&last[0]), (task.0, "Done([120])".to_string()));
    assert_eq!(sim.engine.stats().tasks_cancelled, 0);
}
