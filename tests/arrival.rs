//! Liveness by arrival time, over a real socket: the kernel stamps each
//! datagram as it arrives, and a server that was stopped judges sessions
//! by those stamps, not by when it got round to reading.

mod common;

use std::time::{Duration, Instant};

use common::{message_of, Raw, ServerProcess};
use tether::wire::{Message, TaskReport};
use tether::CancelReason;

/// Everything `raw` receives within `window`.
fn collect(raw: &Raw, window: Duration) -> Vec<Vec<u8>> {
    let until = Instant::now() + window;
    let mut got = Vec::new();
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match raw.recv(left.max(Duration::from_millis(1))) {
            Some(bytes) => got.push(bytes),
            None => break,
        }
    }
    got
}

#[test]
fn a_stopped_server_judges_sessions_by_when_their_datagrams_arrived() {
    let server = ServerProcess::start(&[]);
    let hello = Message::Hello {
        ttl_ms: 1000,
        name: "arrival",
    };
    // `late` goes silent for 2 s of a 3 s stop, then sends one heartbeat;
    // `kept` heartbeats every 200 ms throughout.
    let mut late = Raw::new(server.addr, 61);
    let mut kept = Raw::new(server.addr, 62);
    for raw in [&mut late, &mut kept] {
        let welcome = raw.ask(hello);
        assert!(matches!(
            message_of(&welcome, None),
            Message::Welcome { .. }
        ));
    }
    let submit = Message::Submit {
        request_id: 1,
        delay_ms: 0,
        deadline_ms: 0,
        job: "sleep",
        payload: &600_000u32.to_be_bytes(),
    };
    let accepted = late.ask(submit);
    let Message::Accepted { task_id, .. } = message_of(&accepted, None) else {
        panic!("not accepted: {:?}", message_of(&accepted, None));
    };
    server.signal("STOP");
    let stopped = Instant::now();
    let mut sent_late = false;
    while stopped.elapsed() < Duration::from_secs(3) {
        kept.send(Message::Heartbeat);
        if !sent_late && stopped.elapsed() >= Duration::from_secs(2) {
            // Its TTL ran out a second ago; this arrives too late.
            late.send(Message::Heartbeat);
            sent_late = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    server.signal("CONT");
    // The heartbeats that arrived in time, read late, kept the other: its
    // next request, read right after them, finds its session.
    let answer = kept.ask(Message::Status { task_id: 1 });
    assert_eq!(
        message_of(&answer, None),
        Message::TaskState {
            task_id: 1,
            report: TaskReport::Unknown
        },
        "the session that kept heartbeating was lost"
    );
    let heard = collect(&late, Duration::from_secs(2));
    let messages: Vec<Message<'_>> = heard.iter().map(|b| message_of(b, None)).collect();
    assert!(
        messages.contains(&Message::UnknownSession),
        "the late heartbeat revived the session: {messages:?}"
    );
    assert!(
        messages.contains(&Message::TaskState {
            task_id,
            report: TaskReport::Cancelled(CancelReason::Expired)
        }),
        "the session's task was not cancelled as expired: {messages:?}"
    );
}
