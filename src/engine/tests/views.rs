//! Views of live sessions (`GET /sessions`): paging, lateness, task counts.
use super::*;

/// An engine with 10,000 live sessions (TTL 3 s), and their clients.
fn ten_thousand_sessions() -> (Sim, Vec<Client>) {
    let mut c = config();
    c.max_sessions = 20_000;
    c.max_client_records = 20_000;
    let mut sim = Sim::new(c);
    let mut clients: Vec<Client> = (1..=10_000).map(Client::new).collect();
    for c in &mut clients {
        sim.hello(c, 3000);
    }
    (sim, clients)
}

#[test]
fn pages_cover_every_live_session_once_and_end() {
    let (mut sim, mut clients) = ten_thousand_sessions();
    // A thousand leave: their slots are holes a page walks past.
    for c in clients.iter_mut().step_by(10) {
        sim.send(c, Message::Bye).unwrap();
    }
    let mut seen = std::collections::HashSet::new();
    let (mut after, mut pages) = (0, 0);
    loop {
        let page = sim.engine.sessions_page(after, 100, false);
        assert!(page.sessions.len() <= 100);
        for s in &page.sessions {
            assert!(seen.insert(s.client_id), "{} twice", s.client_id);
        }
        pages += 1;
        match page.next {
            Some(next) => {
                assert!(next > after, "the cursor moves on");
                after = next;
            }
            None => break,
        }
        assert!(pages < 10_000, "paging never ends");
    }
    assert_eq!(seen.len(), 9_000);
    assert!(clients.iter().step_by(10).all(|c| !seen.contains(&c.id)));
    // A page past the end is empty and final.
    let past = sim.engine.sessions_page(u64::MAX, 100, false);
    assert_eq!(past, SessionPage::default());
}

#[test]
fn a_page_looks_at_a_bounded_number_of_slots() {
    let (mut sim, mut clients) = ten_thousand_sessions();
    // Only the last session stays: a page from the start finds nothing in
    // its budget, and says where to go on.
    for c in clients.iter_mut().take(9_999) {
        sim.send(c, Message::Bye).unwrap();
    }
    let page = sim.engine.sessions_page(0, 100, false);
    assert!(page.sessions.is_empty());
    assert_eq!(page.next, Some(SCAN_PER_PAGE as u64));
}

#[test]
fn silence_and_lateness_follow_the_last_datagram() {
    let mut sim = Sim::new(config());
    let mut quiet = Client::new(1);
    let mut chatty = Client::new(2);
    sim.hello(&mut quiet, 3000);
    sim.hello(&mut chatty, 3000);
    sim.run_ms(2100);
    sim.send(&mut chatty, Message::Heartbeat).unwrap();
    let q = sim.engine.session_view(1).unwrap();
    let c = sim.engine.session_view(2).unwrap();
    // To within a tick (10 ms).
    assert!((2090..=2110).contains(&q.silent_ms), "{q:?}");
    assert!(c.silent_ms <= 10, "{c:?}");
    assert!(q.is_late() && !c.is_late());
    assert_eq!((q.ttl_ms, q.incarnation, q.peer), (3000, 1000, quiet.addr));
    let late = sim.engine.sessions_page(0, 100, true);
    let ids: Vec<u64> = late.sessions.iter().map(|s| s.client_id).collect();
    assert_eq!(ids, [1]);
    assert_eq!(sim.engine.session_view(99), None);
}

#[test]
fn unfinished_tasks_are_counted_by_state() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(5);
    sim.hello(&mut c, 3000);
    let queued = accepted_task(&sim.submit(&mut c, 1, "echo", b"x"));
    let running = accepted_task(&sim.submit(&mut c, 2, "echo", b"y"));
    accepted_task(&sim.submit_timed(&mut c, 3, 5000, 0, "echo", b"z"));
    let done = accepted_task(&sim.submit(&mut c, 4, "echo", b"w"));
    sim.effects();
    sim.event(running, TaskEvent::Started);
    sim.event(done, TaskEvent::Started);
    sim.event(done, TaskEvent::Finished(JobOutcome::Done(vec![])));
    let view = sim.engine.session_view(5).unwrap();
    assert_eq!(
        view.tasks,
        TaskCounts {
            scheduled: 1,
            queued: 1,
            running: 1
        },
        "{queued:?}"
    );
}
