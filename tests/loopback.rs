//! End-to-end tests: the real `tether` binary on a free loopback port,
//! driven by the library client and by hand-made datagrams. Every wait is
//! bounded.

mod common;

use std::time::{Duration, Instant};

use common::{key_file, message_of, metrics_addr, run_tether, scrape, value, Raw, ServerProcess};
use tether::wire::{Flags, MacKey, Message, TaskReport};
use tether::{
    CancelReason, Client, ClientConfig, ClientError, ClientEvent, RejectCode, TaskStatus,
};

fn client(server: &ServerProcess, id: u64, ttl: Duration) -> Client {
    let mut config = ClientConfig::new(server.addr, id);
    config.ttl = ttl;
    Client::connect(config).expect("connect")
}

fn wait_event(client: &Client, limit: Duration) -> Option<ClientEvent> {
    client.next_event(limit)
}

#[test]
fn every_standard_job_runs() {
    let server = ServerProcess::start(&[]);
    let c = client(&server, 1, Duration::from_secs(3));
    let run = |job: &str, payload: &[u8]| {
        let task = c.submit(job, payload).expect("submit");
        c.wait(task, Duration::from_secs(10)).expect("final state")
    };
    assert_eq!(run("sleep", &30u32.to_be_bytes()), TaskStatus::Done(vec![]));
    match run("spin", &100_000u64.to_be_bytes()) {
        TaskStatus::Done(state) => assert_eq!(state.len(), 8),
        other => panic!("spin: {other:?}"),
    }
    assert_eq!(run("echo", b"hello"), TaskStatus::Done(b"hello".to_vec()));
    assert_eq!(
        run("fail", b"it broke"),
        TaskStatus::Failed("it broke".into())
    );
    match run("panic", b"worker panic") {
        TaskStatus::Failed(error) => assert!(error.contains("worker panic"), "{error}"),
        other => panic!("panic: {other:?}"),
    }
    // The workers outlive panics: more panics than workers, then real work.
    for _ in 0..4 {
        assert!(matches!(run("panic", b"again"), TaskStatus::Failed(_)));
    }
    assert_eq!(
        run("echo", b"still here"),
        TaskStatus::Done(b"still here".to_vec())
    );
    match c.submit("sleep", b"abc") {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, RejectCode::BadRequest),
        other => panic!("wrong-size sleep payload: {other:?}"),
    }
    match c.submit("nosuchjob", b"") {
        Err(ClientError::Rejected { code, .. }) => assert_eq!(code, RejectCode::UnknownJob),
        other => panic!("unknown job: {other:?}"),
    }
    c.bye().unwrap();
}

#[test]
fn silent_client_is_expired_between_ttl_and_ttl_plus_tick() {
    let server = ServerProcess::start(&["--tick", "10ms"]);
    let ttl = Duration::from_millis(400);
    let c = client(&server, 2, ttl);
    assert_eq!(c.ttl(), ttl);
    let task = c.submit("sleep", &600_000u32.to_be_bytes()).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while c.status(task).unwrap() != TaskStatus::Running {
        assert!(Instant::now() < until, "task never started");
    }
    c.pause_heartbeats(true);
    let event = wait_event(&c, Duration::from_secs(5)).expect("no expiry within 5 s");
    let detected = Instant::now();
    let last = c.last_sent();
    assert_eq!(
        event,
        ClientEvent::TaskEnded {
            task,
            status: TaskStatus::Cancelled(CancelReason::Expired)
        }
    );
    let after = detected - last;
    // The server stamps arrival after we sent, so expiry comes at least a
    // TTL after our last send; at most a tick later, plus scheduling slack
    // on a shared 2-core machine.
    assert!(
        after >= ttl,
        "expired {after:?} after the last datagram, TTL {ttl:?}"
    );
    let slack = Duration::from_millis(150);
    assert!(
        after <= ttl + c.tick() + slack,
        "detected {after:?} after the last datagram (TTL {ttl:?} + tick {:?} + slack {slack:?})",
        c.tick()
    );
}

#[test]
fn late_datagrams_after_expiry_get_unknown_session_and_do_not_revive() {
    let server = ServerProcess::start(&[]);
    let mut raw = Raw::new(server.addr, 3);
    let welcome = raw.ask(Message::Hello {
        ttl_ms: 200,
        name: "late",
    });
    assert!(matches!(
        message_of(&welcome, None),
        Message::Welcome { ttl_ms: 200, .. }
    ));
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..3 {
        let reply = raw.ask(Message::Heartbeat);
        assert_eq!(message_of(&reply, None), Message::UnknownSession);
        assert_eq!(reply.len(), 28);
        assert_eq!(
            &reply[24..28],
            &raw.seq.to_be_bytes(),
            "copies the seq it answers"
        );
    }
    let reply = raw.ask(Message::Status { task_id: 1 });
    assert_eq!(message_of(&reply, None), Message::UnknownSession);
    // The same incarnation cannot come back, even with a HELLO.
    raw.send(Message::Hello {
        ttl_ms: 0,
        name: "",
    });
    assert!(
        raw.recv(Duration::from_millis(300)).is_none(),
        "stale HELLO answered"
    );
    raw.incarnation += 1;
    raw.seq = 0;
    let welcome = raw.ask(Message::Hello {
        ttl_ms: 0,
        name: "",
    });
    assert!(matches!(
        message_of(&welcome, None),
        Message::Welcome { .. }
    ));
}

#[test]
fn a_stopped_server_expires_nobody_whose_heartbeats_were_queued() {
    let server = ServerProcess::start(&[]);
    let ttl = Duration::from_millis(500);
    let mut config = ClientConfig::new(server.addr, 4);
    config.ttl = ttl;
    config.heartbeat_interval = Some(Duration::from_millis(100));
    let c = Client::connect(config).unwrap();
    let task = c.submit("sleep", &600_000u32.to_be_bytes()).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while c.status(task).unwrap() != TaskStatus::Running {
        assert!(Instant::now() < until, "task never started");
    }
    server.signal("STOP");
    std::thread::sleep(2 * ttl);
    server.signal("CONT");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.status(task).unwrap(), TaskStatus::Running);
    assert_eq!(
        c.next_event(Duration::ZERO),
        None,
        "the client was told something (an expiry?)"
    );
}

#[test]
fn sigterm_cancels_running_tasks_with_reason_shutdown_and_exits_zero() {
    let mut server = ServerProcess::start(&["--grace", "5s"]);
    let c = client(&server, 5, Duration::from_secs(3));
    let tasks: Vec<_> = (0..2)
        .map(|_| c.submit("sleep", &600_000u32.to_be_bytes()).unwrap())
        .collect();
    let until = Instant::now() + Duration::from_secs(5);
    while tasks
        .iter()
        .any(|t| c.status(*t).unwrap() != TaskStatus::Running)
    {
        assert!(Instant::now() < until, "tasks never started");
    }
    let queued = c.submit("sleep", &600_000u32.to_be_bytes()).unwrap();
    server.signal("TERM");
    let mut ended = Vec::new();
    while ended.len() < 3 {
        match c.next_event(Duration::from_secs(5)) {
            Some(ClientEvent::TaskEnded { task, status }) => {
                assert_eq!(status, TaskStatus::Cancelled(CancelReason::Shutdown));
                ended.push(task);
            }
            other => panic!("expected a shutdown TASK_STATE, got {other:?}"),
        }
    }
    ended.sort();
    let mut expected = tasks.clone();
    expected.push(queued);
    expected.sort();
    assert_eq!(ended, expected);
    let status = server
        .wait_exit(Duration::from_secs(5))
        .expect("did not exit within grace");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn keyed_server_ignores_unauthenticated_and_signs_its_replies() {
    let secret = [0x5au8; 32];
    let path = key_file("keyed", &secret);
    let server = ServerProcess::start(&["--key-file", path.to_str().unwrap()]);
    let key = MacKey::new(&secret).unwrap();
    // Unsigned: no reply, not even UNKNOWN_SESSION.
    let mut unsigned = Raw::new(server.addr, 6);
    unsigned.send(Message::Hello {
        ttl_ms: 0,
        name: "",
    });
    unsigned.send(Message::Heartbeat);
    assert!(unsigned.recv(Duration::from_millis(300)).is_none());
    // Signed with the wrong key: no reply.
    let mut wrong = Raw::new(server.addr, 6);
    wrong.key = Some(MacKey::new(&[0x5bu8; 32]).unwrap());
    wrong.send(Message::Hello {
        ttl_ms: 0,
        name: "",
    });
    wrong.send(Message::Status { task_id: 1 });
    assert!(wrong.recv(Duration::from_millis(300)).is_none());
    // Signed correctly: answered, and the answer verifies with the key.
    let mut good = Raw::new(server.addr, 6);
    good.key = Some(key.clone());
    let welcome = good.ask(Message::Hello {
        ttl_ms: 0,
        name: "",
    });
    assert_eq!(welcome[4] & Flags::MAC.bits(), Flags::MAC.bits());
    assert!(matches!(
        message_of(&welcome, Some(&key)),
        Message::Welcome { .. }
    ));
    assert!(
        tether::wire::Datagram::decode(&welcome, None).is_err(),
        "MAC flag set"
    );
    // The library client works keyed end to end.
    let mut config = ClientConfig::new(server.addr, 7);
    config.key = Some(key);
    let c = Client::connect(config).unwrap();
    let task = c.submit("echo", b"signed").unwrap();
    assert_eq!(
        c.wait(task, Duration::from_secs(10)).unwrap(),
        TaskStatus::Done(b"signed".to_vec())
    );
    // A keyless client gets nothing back at all.
    let mut keyless = ClientConfig::new(server.addr, 8);
    keyless.tries = 2;
    keyless.retry_after = Duration::from_millis(100);
    assert!(matches!(
        Client::connect(keyless),
        Err(ClientError::Timeout)
    ));
}

#[test]
fn replayed_datagrams_change_nothing() {
    let server = ServerProcess::start(&[]);
    let mut raw = Raw::new(server.addr, 9);
    let hello = raw.encode(
        Flags::empty(),
        Message::Hello {
            ttl_ms: 800,
            name: "",
        },
    );
    raw.send_bytes(&hello);
    assert!(raw.recv(Duration::from_secs(5)).is_some());
    let submit = raw.encode(
        Flags::empty(),
        Message::Submit {
            request_id: 1,
            delay_ms: 0,
            deadline_ms: 0,
            job: "sleep",
            payload: &60_000u32.to_be_bytes(),
        },
    );
    raw.send_bytes(&submit);
    let accepted = raw.recv(Duration::from_secs(5)).unwrap();
    let task_id = match message_of(&accepted, None) {
        Message::Accepted { task_id, .. } => task_id,
        m => panic!("{m:?}"),
    };
    // Byte-identical resends: no reply of any kind.
    raw.send_bytes(&submit);
    raw.send_bytes(&hello);
    assert!(
        raw.recv(Duration::from_millis(250)).is_none(),
        "a replay was answered"
    );
    // A replayed heartbeat does not keep the session alive: replay one for
    // well past the TTL, then the task must have been cancelled (expired).
    let heartbeat = raw.encode(Flags::empty(), Message::Heartbeat);
    raw.send_bytes(&heartbeat);
    let until = Instant::now() + Duration::from_millis(2000);
    let mut pushed = None;
    while Instant::now() < until {
        raw.send_bytes(&heartbeat);
        if let Some(bytes) = raw.recv(Duration::from_millis(50)) {
            pushed = Some(bytes);
            break;
        }
    }
    let pushed = pushed.expect("no TASK_STATE: replays kept the session alive");
    assert_eq!(
        message_of(&pushed, None),
        Message::TaskState {
            task_id,
            report: TaskReport::Cancelled(CancelReason::Expired)
        }
    );
}

#[test]
fn bad_configuration_exits_non_zero_with_one_line() {
    let (code, err) = run_tether(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--insecure-bind"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let path = key_file("open", &[1u8; 32]);
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let (code, err) = run_tether(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--key-file",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(1));
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let (code, err) = run_tether(&["serve", "--ttl", "50ms"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--min-ttl"), "{err}");
    let (code, err) = run_tether(&["serve", "--coalesce", "6ms"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("half of --tick"), "{err}");
}

#[test]
fn client_opens_a_new_session_after_unknown_session() {
    let server = ServerProcess::start(&[]);
    let mut config = ClientConfig::new(server.addr, 10);
    config.ttl = Duration::from_millis(300);
    let c = Client::connect(config).unwrap();
    let (_, first) = c.session();
    let task = c.submit("sleep", &600_000u32.to_be_bytes()).unwrap();
    c.pause_heartbeats(true);
    assert_eq!(
        c.next_event(Duration::from_secs(5)),
        Some(ClientEvent::TaskEnded {
            task,
            status: TaskStatus::Cancelled(CancelReason::Expired)
        })
    );
    // The next heartbeat meets UNKNOWN_SESSION; the client says so and
    // opens a new session with a larger incarnation.
    c.pause_heartbeats(false);
    assert_eq!(
        c.next_event(Duration::from_secs(5)),
        Some(ClientEvent::SessionLost { incarnation: first })
    );
    let until = Instant::now() + Duration::from_secs(5);
    let second = loop {
        let (_, incarnation) = c.session();
        let reopened = incarnation > first && c.submit("echo", b"again").is_ok();
        if reopened {
            break incarnation;
        }
        assert!(Instant::now() < until, "no new session");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(second > first);
    // The new session can still read what the old one left.
    assert_eq!(
        c.status(task).unwrap(),
        TaskStatus::Cancelled(CancelReason::Expired)
    );
}

#[test]
fn bad_flags_say_what_to_write_and_where_help_is() {
    let (code, err) = run_tether(&["serve", "--ttl", "3x"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("250ms"), "{err}");
    assert!(err.contains("tether serve --help"), "{err}");
    let (code, err) = run_tether(&["serve", "--no-such-flag"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("Usage: tether serve"), "{err}");
    assert!(err.trim().lines().count() <= 6, "short: {err}");
}

#[test]
fn sigterm_under_load_cancels_ten_thousand_tasks_and_reports_each() {
    use std::collections::HashSet;
    use std::net::UdpSocket;
    let mut server = ServerProcess::start(&["--workers", "16", "--grace", "5s"]);
    // 1,000 sessions over 8 sockets, 10 long sleeps each.
    let sockets: Vec<UdpSocket> = (0..8)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(server.addr).unwrap();
            let _ = socket2::SockRef::from(&s).set_recv_buffer_size(8 << 20);
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            s
        })
        .collect();
    let encode = |client: u64, seq: u32, message: Message<'_>| {
        let d = tether::wire::Datagram {
            header: tether::wire::Header {
                flags: Flags::empty(),
                client_id: client,
                incarnation: 1,
                seq,
            },
            message,
        };
        let mut buf = [0u8; 1200];
        let n = d.emit(None, &mut buf).unwrap();
        buf[..n].to_vec()
    };
    let recv_within = |limit: Duration, want: usize, pred: &dyn Fn(&Message<'_>) -> bool| {
        let mut got = Vec::new();
        let until = Instant::now() + limit;
        let mut buf = [0u8; 2048];
        while got.len() < want && Instant::now() < until {
            for s in &sockets {
                while let Ok(n) = s.recv(&mut buf) {
                    let m = message_of(&buf[..n], None);
                    if pred(&m) {
                        got.push(buf[..n].to_vec());
                    }
                    if got.len() >= want {
                        break;
                    }
                }
            }
        }
        got
    };
    let recv_all = |want: usize, pred: &dyn Fn(&Message<'_>) -> bool| {
        recv_within(Duration::from_secs(30), want, pred)
    };
    // A burst of 1,000 HELLOs may find the server behind its socket, and
    // then new sessions are opened but welcomed only on a retry: retry,
    // with the next seq, until every client has its WELCOME.
    let mut welcomed = HashSet::new();
    for attempt in 1..=5u32 {
        for client in (1..=1000u64).filter(|c| !welcomed.contains(c)) {
            let s = &sockets[(client % 8) as usize];
            let hello = Message::Hello {
                ttl_ms: 60_000,
                name: "",
            };
            s.send(&encode(client, attempt, hello)).unwrap();
        }
        let want = 1000 - welcomed.len();
        let is_welcome = |m: &Message<'_>| matches!(m, Message::Welcome { .. });
        for reply in recv_within(Duration::from_secs(2), want, &is_welcome) {
            welcomed.insert(u64::from_be_bytes(reply[8..16].try_into().unwrap()));
        }
        if welcomed.len() == 1000 {
            break;
        }
    }
    assert_eq!(welcomed.len(), 1000, "clients never welcomed");
    let payload = 600_000u32.to_be_bytes();
    for client in 1..=1000u64 {
        let s = &sockets[(client % 8) as usize];
        for r in 0..10u32 {
            let submit = Message::Submit {
                request_id: r + 1,
                delay_ms: 0,
                deadline_ms: 0,
                job: "sleep",
                payload: &payload,
            };
            s.send(&encode(client, r + 2, submit)).unwrap();
        }
    }
    let accepted = recv_all(10_000, &|m| matches!(m, Message::Accepted { .. }));
    assert_eq!(accepted.len(), 10_000, "every SUBMIT accepted");
    let started = Instant::now();
    server.signal("TERM");
    let ended = recv_all(10_000, &|m| matches!(m, Message::TaskState { .. }));
    let ids: HashSet<u64> = ended
        .iter()
        .map(|b| match message_of(b, None) {
            Message::TaskState {
                task_id,
                report: TaskReport::Cancelled(CancelReason::Shutdown),
            } => task_id,
            other => panic!("expected cancelled(shutdown), got {other:?}"),
        })
        .collect();
    assert_eq!(ids.len(), 10_000, "one final state per task");
    let status = server
        .wait_exit(Duration::from_secs(10))
        .expect("did not exit");
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "exceeded the 5 s grace"
    );
}

#[test]
fn keyless_beyond_loopback_never_sends_an_address_more_than_it_sent() {
    // Bound to every interface (reached here over loopback only), keyless:
    // the amplification limit is on by default.
    let server = ServerProcess::start_at("0.0.0.0:0", &["--insecure-bind"], &[]);
    let mut raw = Raw::new(server.loopback_addr(), 41);
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "",
    };
    let first = raw.send(hello);
    assert_eq!(first.len(), 33);
    assert!(
        raw.recv(Duration::from_millis(300)).is_none(),
        "a 36-byte WELCOME answered a 33-byte HELLO from an address never heard from"
    );
    let welcome = raw.ask(hello);
    assert!(matches!(
        message_of(&welcome, None),
        Message::Welcome { .. }
    ));

    // The same server with the limit switched off answers at once.
    let open = ServerProcess::start_at(
        "0.0.0.0:0",
        &["--insecure-bind", "--amplification-limit", "off"],
        &[],
    );
    let mut raw = Raw::new(open.loopback_addr(), 42);
    let welcome = raw.ask(hello);
    assert!(matches!(
        message_of(&welcome, None),
        Message::Welcome { .. }
    ));
}

#[test]
fn a_flooded_socket_sheds_answers_to_strangers_not_live_sessions() {
    // A small receive buffer, so that a few hundred datagrams are a flood:
    // the server sheds once a quarter of what the buffer holds is waiting.
    let server = ServerProcess::start(&["--metrics", "127.0.0.1:0", "--recv-buffer", "256KiB"]);
    let metrics = metrics_addr(&server);
    let ttl = Duration::from_millis(500);
    let mut config = ClientConfig::new(server.addr, 5);
    config.ttl = ttl;
    config.heartbeat_interval = Some(Duration::from_millis(100));
    let c = Client::connect(config).unwrap();
    let task = c.submit("sleep", &600_000u32.to_be_bytes()).unwrap();
    let mut stranger = Raw::new(server.addr, 77);
    // While the server is stopped, a stranger queues 400 HEARTBEATs for a
    // session that does not exist (they fit the buffer): on resume the loop
    // must read the live client's heartbeats rather than write 400
    // UNKNOWN_SESSIONs first.
    server.signal("STOP");
    for _ in 0..400 {
        stranger.send(Message::Heartbeat);
    }
    std::thread::sleep(2 * ttl);
    server.signal("CONT");
    while let Some(reply) = stranger.recv(Duration::from_millis(500)) {
        assert_eq!(message_of(&reply, None), Message::UnknownSession);
    }
    // Counters are published every 50 ms: wait (bounded) for all 400.
    let until = Instant::now() + Duration::from_secs(5);
    let (read, shed) = loop {
        let text = scrape(metrics);
        let read = value(
            &text,
            "tether_datagrams_dropped_total{cause=\"unknown_session\"}",
        );
        let shed = value(&text, "tether_replies_withheld_total{reason=\"backlog\"}");
        if read >= 400.0 || Instant::now() > until {
            break (read, shed);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(read, 400.0, "every queued datagram was read");
    assert!(
        shed > 0.0 && shed < 400.0,
        "{shed} of 400 answers shed: the first reads, before the backlog shows, are answered"
    );
    assert_eq!(c.status(task).unwrap(), TaskStatus::Running);
    assert_eq!(
        c.next_event(Duration::ZERO),
        None,
        "the live client was expired"
    );
    let until = Instant::now() + Duration::from_secs(5);
    let warned = std::iter::from_fn(|| {
        server
            .stderr
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .ok()
    })
    .any(|line| line.contains("socket flooded"));
    assert!(warned, "no warning about shed replies in the log");
    // Drained, the server answers strangers again.
    let reply = stranger.ask(Message::Heartbeat);
    assert_eq!(message_of(&reply, None), Message::UnknownSession);
}

#[test]
fn an_embedded_server_can_hold_loopback_peers_to_what_they_sent() {
    let server = tether::Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .amplification_limit(true)
        .bind()
        .unwrap()
        .spawn()
        .unwrap();
    let mut raw = Raw::new(server.local_addr(), 43);
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "",
    };
    raw.send(hello);
    assert!(raw.recv(Duration::from_millis(300)).is_none());
    let welcome = raw.ask(hello);
    assert!(matches!(
        message_of(&welcome, None),
        Message::Welcome { .. }
    ));
    server.shutdown().unwrap();
}

#[test]
fn an_embedded_server_refuses_to_coalesce_past_half_a_tick() {
    let refused = tether::Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .tick(Duration::from_millis(10))
        .coalesce(Duration::from_millis(6))
        .bind();
    assert!(matches!(
        refused,
        Err(tether::ServerError::InvalidConfig(_))
    ));
    let accepted = tether::Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .tick(Duration::from_millis(10))
        .coalesce(Duration::from_millis(5))
        .bind();
    assert!(accepted.is_ok());
}
