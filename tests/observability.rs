//! Metrics, event stream, structured logs and the terminal client, against
//! the real binary over loopback. Every wait is bounded.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{metrics_addr, scrape, value, Raw, ServerProcess};
use tether::wire::Message;
use tether::{Client, ClientConfig, TaskStatus};

#[test]
fn metrics_move_as_traffic_is_sent() {
    let server = ServerProcess::start(&["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    let before = scrape(metrics);
    assert_eq!(value(&before, "tether_sessions_live"), 0.0);
    assert!(before.contains("# TYPE tether_task_run_seconds histogram"));

    let mut raw = Raw::new(server.addr, 21);
    raw.ask(Message::Hello {
        ttl_ms: 60_000,
        name: "",
    });
    for _ in 0..5 {
        raw.send(Message::Heartbeat);
    }
    raw.send_bytes(b"not a tether datagram at all.......");
    let mut config = ClientConfig::new(server.addr, 22);
    config.ttl = Duration::from_secs(60);
    let client = Client::connect(config).unwrap();
    let task = client.submit("sleep", &20u32.to_be_bytes()).unwrap();
    assert_eq!(
        client.wait(task, Duration::from_secs(10)).unwrap(),
        TaskStatus::Done(vec![])
    );
    // Bounded wait for the loop to publish.
    let until = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let text = scrape(metrics);
        // Counters are published every 50 ms; histograms at once.
        if value(&text, "tether_heartbeats_total") >= 5.0
            && value(&text, "tether_task_run_seconds_count") >= 1.0
            && value(&text, "tether_tasks_ended_total{outcome=\"done\"}") >= 1.0
            && value(&text, "tether_datagrams_dropped_total{cause=\"malformed\"}") >= 1.0
            && value(&text, "tether_sessions_live") >= 2.0
        {
            break text;
        }
        assert!(Instant::now() < until, "metrics did not move:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(value(&after, "tether_sessions_live"), 2.0);
    assert_eq!(value(&after, "tether_sessions_opened_total"), 2.0);
    assert_eq!(
        value(
            &after,
            "tether_datagrams_dropped_total{cause=\"malformed\"}"
        ),
        1.0
    );
    assert_eq!(
        value(&after, "tether_tasks_ended_total{outcome=\"done\"}"),
        1.0
    );
    assert!(value(&after, "tether_task_run_seconds_sum") >= 0.02);
    assert!(value(&after, "tether_loop_iteration_seconds_count") > 0.0);
    assert!(value(&after, "tether_replies_sent_total") >= 3.0);
}

#[test]
fn event_stream_and_debug_logs_trace_a_cancellation_to_its_cause() {
    let dir = std::env::temp_dir().join(format!("tether-events-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("events.jsonl");
    let _ = std::fs::remove_file(&path);
    let server = ServerProcess::start_with_env(
        &["--events", path.to_str().unwrap(), "--log-format", "json"],
        &[("RUST_LOG", "debug")],
    );
    let mut config = ClientConfig::new(server.addr, 23);
    config.ttl = Duration::from_millis(300);
    let client = Client::connect(config).unwrap();
    let task = client.submit("sleep", &60_000u32.to_be_bytes()).unwrap();
    client.pause_heartbeats(true);
    let ended = client.next_event(Duration::from_secs(5));
    assert!(
        matches!(ended, Some(tether::ClientEvent::TaskEnded { .. })),
        "{ended:?}"
    );
    let until = Instant::now() + Duration::from_secs(5);
    let events = loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.contains("\"task_ended\"") {
            break text;
        }
        assert!(Instant::now() < until, "no task_ended event in {text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let kinds: Vec<&str> = events
        .lines()
        .map(|l| {
            l.split("\"event\":\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "session_opened",
            "task_accepted",
            "session_ended",
            "task_ended"
        ]
    );
    let task_line = events.lines().last().unwrap();
    for part in [
        &format!("\"task_id\":\"{}\"", task.0)[..],
        "\"client_id\":\"23\"",
        "\"job\":\"sleep\"",
        "\"state\":\"cancelled\"",
        "\"reason\":\"expired\"",
        "\"cause\":\"expiry of session incarnation",
        "\"ts\":\"20",
    ] {
        assert!(task_line.contains(part), "{part} missing from {task_line}");
    }
    // The same story in the JSON log, at debug.
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let line = server
            .stderr
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .expect("no task-ended log line");
        if line.contains("task ended") {
            assert!(line.starts_with('{'), "not JSON: {line}");
            assert!(line.contains("expiry of session incarnation"), "{line}");
            assert!(line.contains("\"level\":\"DEBUG\""), "{line}");
            break;
        }
    }
}

#[test]
fn terminal_client_submits_follows_and_reads_status() {
    let server = ServerProcess::start(&[]);
    let addr = server.addr.to_string();
    let runtime = std::env::temp_dir().join(format!("tether-terminal-{}", std::process::id()));
    std::fs::create_dir_all(&runtime).unwrap();
    // Exit codes (README): 0 done, 4 cancelled, 6 not finished yet.
    let run_expecting = |code: i32, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["client", "--server", &addr, "--client-id", "424242"])
            .args(args)
            .env("XDG_RUNTIME_DIR", &runtime)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(code),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let run = |args: &[&str]| run_expecting(0, args);
    let out = run(&["submit", "echo", "hello there", "--follow"]);
    let task = out
        .lines()
        .next()
        .unwrap()
        .strip_prefix("task ")
        .unwrap()
        .to_owned();
    assert_eq!(
        out.lines().nth(1),
        Some(&format!("task {task}: done: hello there")[..])
    );
    assert_eq!(
        run(&["status", &task]).trim(),
        format!("task {task}: done: hello there")
    );
    let out = run(&["submit", "sleep", "u32:60000"]);
    let sleeping = out.trim().strip_prefix("task ").unwrap().to_owned();
    // A later command continues the same session, so the task lives on.
    let status = run_expecting(6, &["status", &sleeping]);
    assert!(
        status.trim() == format!("task {sleeping}: running")
            || status.trim() == format!("task {sleeping}: queued"),
        "{status}"
    );
    assert_eq!(
        run(&["cancel", &sleeping]).trim(),
        format!("task {sleeping}: cancelled")
    );
    assert_eq!(
        run_expecting(4, &["status", &sleeping]).trim(),
        format!("task {sleeping}: cancelled (cancelled)")
    );
    assert!(run(&["hello"]).contains("TTL 3s, tick 10ms"));
}
