//! A task that ignores its cancel flag, and slow loop iterations, are
//! reported and counted. An embedded server, so the test can register a
//! job that misbehaves on purpose.

mod common;

use std::time::{Duration, Instant};

use common::{spawn_embedded, value, wait_for_metric};
use tether::{CancelOutcome, Client, ClientConfig, PayloadRule, Server, TaskStatus};

#[test]
fn a_task_ignoring_its_flag_is_reported_and_counted() {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .slow_cancel(Duration::from_millis(150))
        .job("stubborn", PayloadRule::Any, |_ctx| {
            // Never looks at its flag: busy for 600 ms whatever happens.
            let until = Instant::now() + Duration::from_millis(600);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            Ok(b"ignored you".to_vec())
        })
        .bind()
        .unwrap();
    let metrics = server.metrics();
    let server = server.spawn().unwrap();
    let client = Client::connect(ClientConfig::new(server.local_addr(), 31)).unwrap();
    let task = client.submit("stubborn", b"").unwrap();
    let started = Instant::now();
    while client.status(task).unwrap() != TaskStatus::Running {
        assert!(started.elapsed() < Duration::from_secs(5), "never started");
    }
    assert_eq!(client.cancel(task).unwrap(), CancelOutcome::CancelledNow);
    // The cancellation wins over the result it returns anyway.
    assert_eq!(
        client.wait(task, Duration::from_secs(10)).unwrap(),
        TaskStatus::Cancelled(tether::CancelReason::Cancelled)
    );
    let text = wait_for_metric(&metrics, "tether_slow_cancels_total", 1.0);
    assert_eq!(
        value(&text, "tether_slow_cancels_total"),
        1.0,
        "reported once"
    );
    client.bye().unwrap();
    server.shutdown().unwrap();
}

#[test]
fn slow_loop_iterations_are_counted() {
    // Every iteration is slower than zero: the mechanism, deterministically.
    let (server, metrics) =
        spawn_embedded(Server::builder().slow_loop(Duration::ZERO).standard_jobs());
    let client = Client::connect(ClientConfig::new(server.local_addr(), 32)).unwrap();
    let task = client.submit("echo", b"x").unwrap();
    client.wait(task, Duration::from_secs(10)).unwrap();
    let text = wait_for_metric(&metrics, "tether_slow_loop_iterations_total", 2.0);
    // Every iteration counts as slow; the histogram is observed at once and
    // the counter published every 50 ms, so the histogram is never behind.
    let slow = value(&text, "tether_slow_loop_iterations_total");
    let all = value(&text, "tether_loop_iteration_seconds_count");
    assert!(slow <= all, "{slow} slow of {all}");
    client.bye().unwrap();
    server.shutdown().unwrap();
}

#[test]
fn tasks_ignoring_their_flag_past_the_grace_are_reported_by_id_and_the_server_still_stops() {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .grace(Duration::from_millis(300))
        .job("deaf", PayloadRule::Any, |_ctx| {
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                std::hint::spin_loop();
            }
            Ok(vec![])
        })
        .standard_jobs()
        .bind()
        .unwrap()
        .spawn()
        .unwrap();
    let client = Client::connect(ClientConfig::new(server.local_addr(), 33)).unwrap();
    let deaf = client.submit("deaf", b"").unwrap();
    let polite = client.submit("sleep", &60_000u32.to_be_bytes()).unwrap();
    let started = Instant::now();
    while [deaf, polite]
        .iter()
        .any(|t| client.status(*t).unwrap() != TaskStatus::Running)
    {
        assert!(started.elapsed() < Duration::from_secs(5), "never started");
    }
    let stopping = Instant::now();
    let report = server.shutdown().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "waited past the grace"
    );
    assert_eq!(
        report.ignored_cancel,
        vec![deaf],
        "only the task that ignored its flag"
    );
    // The polite task stopped at once and its client was told.
    assert_eq!(
        client.wait(polite, Duration::from_secs(5)).unwrap(),
        TaskStatus::Cancelled(tether::CancelReason::Shutdown)
    );
}

/// The wall clock jumps back an hour and forward a day while the server
/// runs; the monotonic clock does not. Deadlines use only the monotonic
/// one, so nothing changes: a heartbeating client stays, a silent one
/// expires a TTL after its last datagram, and the event stream's dates
/// follow the start, not the jumps.
#[derive(Debug)]
struct JumpyWallClock {
    reads: std::sync::atomic::AtomicU32,
}

impl tether::server::Clock for JumpyWallClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn wall(&self) -> std::time::SystemTime {
        let n = self
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let base = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        match n % 3 {
            0 => base,
            1 => base - Duration::from_secs(3600),
            _ => base + Duration::from_secs(86_400),
        }
    }
}

#[test]
fn a_jumping_wall_clock_changes_nothing() {
    let events = std::env::temp_dir().join(format!("tether-clock-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&events);
    let clock = std::sync::Arc::new(JumpyWallClock {
        reads: std::sync::atomic::AtomicU32::new(0),
    });
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .clock(clock)
        .events(tether::observe::EventsTarget::File(events.clone()))
        .standard_jobs()
        .bind()
        .unwrap()
        .spawn()
        .unwrap();
    let ttl = Duration::from_millis(300);
    let mut config = ClientConfig::new(server.local_addr(), 34);
    config.ttl = ttl;
    config.heartbeat_interval = Some(Duration::from_millis(50));
    let steady = Client::connect(config.clone()).unwrap();
    config.client_id = 35;
    let silent = Client::connect(config).unwrap();
    let task = silent.submit("sleep", &60_000u32.to_be_bytes()).unwrap();
    silent.pause_heartbeats(true);
    let ended = silent.next_event(Duration::from_secs(5));
    let after = silent.last_sent().elapsed();
    assert!(
        matches!(ended, Some(tether::ClientEvent::TaskEnded { task: t, status: TaskStatus::Cancelled(tether::CancelReason::Expired) }) if t == task),
        "{ended:?}"
    );
    assert!(
        after >= ttl && after < ttl + Duration::from_millis(200),
        "{after:?}"
    );
    // The heartbeating client was never expired.
    assert_eq!(
        steady.status(task).unwrap(),
        TaskStatus::Unknown,
        "another client's task"
    );
    assert!(steady.next_event(Duration::ZERO).is_none());
    steady.bye().unwrap();
    server.shutdown().unwrap();
    let text = std::fs::read_to_string(&events).unwrap();
    for line in text.lines() {
        // 1,800,000,000 s after the epoch is 2027-01-15: every event is
        // dated from the one start reading, never an hour back or a day on.
        assert!(line.contains("\"ts\":\"2027-01-15T"), "{line}");
    }
    assert!(text.contains("\"reason\":\"expired\""), "{text}");
}
