//! `GET /sessions` and `tether sessions` against the real binary on
//! loopback: every live session listed once across pages (and shards),
//! one client's session by id, the late ones, and bad requests refused.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{metrics_addr, ServerProcess};
use tether::{Client, ClientConfig};

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    (head[9..12].parse().unwrap(), body.to_owned())
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn clients(server: SocketAddr, ids: std::ops::Range<u64>, ttl: Duration) -> Vec<Client> {
    ids.map(|id| {
        let mut config = ClientConfig::new(server, id);
        config.ttl = ttl;
        Client::connect(config).unwrap()
    })
    .collect()
}

/// Every page in turn; the client ids seen.
fn all_pages(metrics: SocketAddr, limit: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut path = format!("/sessions?limit={limit}");
    for _ in 0..1000 {
        let (status, body) = get(metrics, &path);
        assert_eq!(status, 200, "{body}");
        let page = json(&body);
        let sessions = page["sessions"].as_array().unwrap();
        assert!(sessions.len() <= limit);
        ids.extend(
            sessions
                .iter()
                .map(|s| s["client_id"].as_str().unwrap().parse::<u64>().unwrap()),
        );
        match page["next"].as_str() {
            Some(next) => path = format!("/sessions?limit={limit}&after={next}"),
            None => return ids,
        }
    }
    panic!("paging never ended");
}

#[test]
fn every_live_session_is_listed_once_across_pages_and_shards() {
    for shards in ["1", "2"] {
        let server = ServerProcess::start(&["--metrics", "127.0.0.1:0", "--shards", shards]);
        let metrics = metrics_addr(&server);
        let live = clients(server.addr, 1..26, Duration::from_secs(3));
        let gone = clients(server.addr, 100..105, Duration::from_secs(3));
        for c in gone {
            c.bye().unwrap();
        }
        let mut ids = all_pages(metrics, 3);
        ids.sort_unstable();
        assert_eq!(ids, (1..26).collect::<Vec<_>>(), "with {shards} shard(s)");
        drop(live);
    }
}

#[test]
fn one_session_by_id_with_its_tasks_and_silence() {
    let server = ServerProcess::start(&["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    let c = &clients(server.addr, 7..8, Duration::from_secs(3))[0];
    let task = c.submit("sleep", &10_000u32.to_be_bytes()).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (status, body) = get(metrics, "/sessions/7");
    assert_eq!(status, 200, "{body}");
    let s = json(&body);
    assert_eq!(s["client_id"], "7");
    assert_eq!(s["incarnation"], c.session().1.to_string());
    assert_eq!(s["ttl_ms"], 3000);
    assert_eq!(s["tasks"]["running"], 1);
    assert!(s["silent_ms"].as_u64().unwrap() <= 1100, "{s}");
    assert_eq!(s["late"], false);
    c.cancel(task).unwrap();
    assert_eq!(get(metrics, "/sessions/8").0, 404);
    assert_eq!(get(metrics, "/sessions/x").0, 400);
    assert_eq!(get(metrics, "/sessions?limit=0").0, 400);
    assert_eq!(get(metrics, "/sessions?limit=5000").0, 400);
    assert_eq!(get(metrics, "/sessions?after=zz").0, 400);
    assert_eq!(get(metrics, "/sessions?colour=red").0, 400);
}

#[test]
fn the_command_lists_sessions_and_the_late_ones_first_to_expire() {
    let server = ServerProcess::start(&["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    let all = clients(server.addr, 1..4, Duration::from_secs(3));
    // Client 2 goes quiet: past two thirds of its TTL it is late.
    all[1].pause_heartbeats(true);
    std::thread::sleep(Duration::from_millis(2300));
    let tether = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_tether"))
            .arg("sessions")
            .args(["--server-metrics", &metrics.to_string()])
            .args(args)
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (table, summary) = tether(&[]);
    assert!(table.starts_with("CLIENT_ID"), "{table}");
    assert_eq!(table.lines().count(), 4, "{table}");
    assert!(summary.contains("3 live sessions"), "{summary}");
    let (late, summary) = tether(&["--late"]);
    let rows: Vec<&str> = late.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{late}");
    assert!(rows[0].starts_with("2 "), "{late}");
    assert!(summary.contains("1 late session"), "{summary}");
    let (lines, _) = tether(&["--json"]);
    assert_eq!(lines.lines().count(), 3);
    for line in lines.lines() {
        json(line);
    }
    // Nothing listening: an error that says what to check.
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["sessions", "--server-metrics", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("tether serve --metrics"));
}

#[test]
fn top_shows_a_live_server_and_its_clients_closest_to_expiry() {
    let server = ServerProcess::start(&["--metrics", "127.0.0.1:0"]);
    let metrics = metrics_addr(&server);
    // TTL 6 s: the paused client is late from 4 s of silence and expires at
    // 6 s; the frame's second reading (1.5 s after the first) comes when it
    // has been silent about 5 s.
    let all = clients(server.addr, 11..14, Duration::from_secs(6));
    let _task = all[0].submit("sleep", &30_000u32.to_be_bytes()).unwrap();
    all[2].pause_heartbeats(true);
    let silent = all[2].last_sent().elapsed();
    std::thread::sleep(Duration::from_millis(3500).saturating_sub(silent));
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["top", "--once", "--interval", "1500ms"])
        .args(["--server-metrics", &metrics.to_string()])
        .output()
        .unwrap();
    let frame = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(frame.contains(&format!("tether top: {metrics}")), "{frame}");
    assert!(frame.contains("sessions 3 "), "{frame}");
    // Two clients heartbeat every 2 s: about one a second.
    assert!(!frame.contains("heartbeats/s 0 "), "{frame}");
    let running = frame.lines().find(|l| l.contains("running")).unwrap();
    assert!(running.contains(" 1 "), "{running}");
    // The paused client, and only it, is close to expiry.
    let late: Vec<&str> = frame
        .lines()
        .filter(|l| l.contains("127.0.0.1:") && !l.contains("tether top"))
        .collect();
    assert_eq!(late.len(), 1, "{frame}");
    assert!(late[0].contains("13 "), "{frame}");
    // Nothing there: an error, not a blank screen.
    let output = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["top", "--once", "--server-metrics", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
}
