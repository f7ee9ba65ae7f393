//! Shards: the kernel sends every datagram of a client to the shard of its
//! client_id, whatever address it comes from; limits hold for the whole
//! server. Loopback, embedded servers.

mod common;

use std::net::UdpSocket;
use std::time::{Duration, Instant};

use common::{message_of, value, Raw};
use tether::steer::shard_of;
use tether::wire::{Message, RejectCode, TaskReport};
use tether::{Metrics, Server};

fn sharded(
    shards: usize,
    max_sessions: usize,
) -> (tether::RunningServer, Vec<std::sync::Arc<Metrics>>) {
    sharded_with(shards, max_sessions, None)
}

fn sharded_with(
    shards: usize,
    max_sessions: usize,
    events: Option<std::path::PathBuf>,
) -> (tether::RunningServer, Vec<std::sync::Arc<Metrics>>) {
    let mut builder = Server::builder();
    if let Some(path) = events {
        builder = builder.events(tether::EventsTarget::File(path));
    }
    let server = builder
        .listen("127.0.0.1:0".parse().unwrap())
        .shards(shards)
        .workers(2)
        .max_sessions(max_sessions)
        .ttl(Duration::from_millis(600))
        .standard_jobs()
        .bind()
        .expect("bind a sharded server (the kernel must take the steering program)");
    let metrics = server.shard_metrics();
    assert_eq!(metrics.len(), shards);
    (server.spawn().unwrap(), metrics)
}

/// Each shard's value of `series` now.
fn read_shards(metrics: &[std::sync::Arc<Metrics>], series: &str) -> Vec<f64> {
    metrics
        .iter()
        .enumerate()
        .map(|(i, m)| value(&m.render(), &format!("{series}{{shard=\"{i}\"}}")))
        .collect()
}

/// Each shard's value of `series`, after a bounded wait for the loops to
/// publish `expected` (they publish every 50 ms).
fn per_shard(metrics: &[std::sync::Arc<Metrics>], series: &str, expected: &[f64]) -> Vec<f64> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let got = read_shards(metrics, series);
        if got == expected || Instant::now() > until {
            return got;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_client_lands_on_the_shard_of_its_client_id() {
    let events = std::env::temp_dir().join(format!("tether-shards-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&events);
    let (server, metrics) = sharded_with(3, 1_000, Some(events.clone()));
    let mut expected = vec![0.0; 3];
    let mut clients = Vec::new();
    for id in 1..=60u64 {
        expected[shard_of(id, 3) as usize] += 1.0;
        let mut raw = Raw::new(server.local_addr(), id);
        let reply = raw.ask(Message::Hello {
            ttl_ms: 60_000,
            name: "sharded",
        });
        assert!(matches!(message_of(&reply, None), Message::Welcome { .. }));
        clients.push(raw);
    }
    assert!(expected.iter().all(|&n| n > 10.0), "{expected:?}");
    assert_eq!(
        per_shard(&metrics, "tether_sessions_live", &expected),
        expected
    );
    // Heartbeats reach the same shards: each shard counts its own.
    for raw in &mut clients {
        raw.send(Message::Heartbeat);
    }
    assert_eq!(
        per_shard(&metrics, "tether_heartbeats_total", &expected),
        expected
    );
    let report = server.shutdown().unwrap();
    assert_eq!(
        report.stats.sessions_opened, 60,
        "the shards' reports are summed"
    );
    // One stream for all shards, each line naming its shard: the shard of
    // the line's client.
    let text = std::fs::read_to_string(&events).unwrap();
    let opened: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("session_opened"))
        .collect();
    assert_eq!(opened.len(), 60, "{text}");
    for line in opened {
        let field = |name: &str| -> u64 {
            let rest = line.split(&format!("\"{name}\":")).nth(1).unwrap();
            rest.trim_start_matches('"')
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap()
                .parse()
                .unwrap()
        };
        assert_eq!(
            field("shard"),
            u64::from(shard_of(field("client_id"), 3)),
            "{line}"
        );
    }
}

#[test]
fn a_client_that_changes_source_port_keeps_its_session_and_tasks() {
    let (server, metrics) = sharded(2, 1_000);
    // A client of shard 1: were everything sent to one loop, it would
    // show on shard 0.
    let id = (1..).find(|&id| shard_of(id, 2) == 1).unwrap();
    let mut raw = Raw::new(server.local_addr(), id);
    raw.incarnation = 7;
    raw.ask(Message::Hello {
        ttl_ms: 600,
        name: "mover",
    });
    let accepted = raw.ask(Message::Submit {
        request_id: 1,
        delay_ms: 0,
        deadline_ms: 0,
        job: "sleep",
        payload: &60_000u32.to_be_bytes(),
    });
    let Message::Accepted { task_id, .. } = message_of(&accepted, None) else {
        panic!("not accepted: {:?}", message_of(&accepted, None));
    };
    // The NAT rebinds, four times: each time the client's datagrams come
    // from a new port (where the kernel's own hash would pick a shard at
    // random), for most of a TTL.
    for _ in 0..4 {
        let moved = UdpSocket::bind("127.0.0.1:0").unwrap();
        moved.connect(server.local_addr()).unwrap();
        raw.socket = moved;
        for _ in 0..3 {
            raw.send(Message::Heartbeat);
            std::thread::sleep(Duration::from_millis(150));
        }
    }
    let reply = raw.ask(Message::Status { task_id });
    assert_eq!(
        message_of(&reply, None),
        Message::TaskState {
            task_id,
            report: TaskReport::Running
        },
        "the session and its task outlived four address changes"
    );
    assert_eq!(
        per_shard(&metrics, "tether_sessions_live", &[0.0, 1.0]),
        [0.0, 1.0]
    );
    server.shutdown().unwrap();
}

#[test]
fn max_sessions_bounds_the_whole_server_not_each_shard() {
    let (server, metrics) = sharded(2, 5);
    let mut welcomed = 0;
    let mut refused = 0;
    let mut clients = Vec::new();
    for id in 1..=12u64 {
        let mut raw = Raw::new(server.local_addr(), id);
        let reply = raw.ask(Message::Hello {
            ttl_ms: 60_000,
            name: "",
        });
        match message_of(&reply, None) {
            Message::Welcome { .. } => welcomed += 1,
            Message::Rejected {
                code: RejectCode::TooManySessions,
                ..
            } => refused += 1,
            other => panic!("{other:?}"),
        }
        clients.push(raw);
    }
    assert_eq!((welcomed, refused), (5, 7));
    // A session that leaves frees its place for any shard.
    let leaver = clients.iter_mut().next().unwrap();
    leaver.ask(Message::Bye);
    let mut late = Raw::new(server.local_addr(), 1_000);
    let reply = late.ask(Message::Hello {
        ttl_ms: 60_000,
        name: "",
    });
    assert!(matches!(message_of(&reply, None), Message::Welcome { .. }));
    std::thread::sleep(Duration::from_millis(100));
    let live: f64 = read_shards(&metrics, "tether_sessions_live").iter().sum();
    assert_eq!(live, 5.0);
    server.shutdown().unwrap();
}
