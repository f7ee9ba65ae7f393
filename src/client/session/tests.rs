//! The client session on a simulated clock: a scripted server answers (or
//! does not), and minutes of retries, heartbeats and reopenings run in
//! microseconds.

use super::*;
use crate::wire::{Datagram, Flags, Header, Kind, Message, TaskReport};
use std::net::SocketAddr;

/// The client's datagrams, decoded, with a scripted server's replies.
struct Harness {
    session: ClientSession,
    now: Instant,
    server_seq: u32,
}

/// A datagram the client sent.
#[derive(Debug, Clone)]
struct Sent {
    /// The host it went to.
    to: SocketAddr,
    header: Header,
    kind: Kind,
    request_id: Option<u32>,
}

fn config() -> ClientConfig {
    let server: SocketAddr = "127.0.0.1:7900".parse().unwrap();
    let mut config = ClientConfig::new(server, 42);
    config.retry_after = Duration::from_millis(250);
    config.tries = 4;
    config
}

impl Harness {
    fn new(config: ClientConfig) -> Harness {
        let now = Instant::now();
        Harness {
            session: ClientSession::new(config, now, 1_000_000),
            now,
            server_seq: 0,
        }
    }

    /// Everything the client has to send now.
    fn sent(&mut self) -> Vec<Sent> {
        let to = self.session.server();
        std::iter::from_fn(|| self.session.poll_transmit())
            .map(|bytes| {
                let d = Datagram::decode(&bytes, None).expect("the client sent a valid datagram");
                let request_id = match d.message {
                    Message::Submit { request_id, .. } => Some(request_id),
                    _ => None,
                };
                Sent {
                    to,
                    header: d.header,
                    kind: d.message.kind(),
                    request_id,
                }
            })
            .collect()
    }

    /// Moves the clock to `until`, calling `handle_timeout` whenever the
    /// session asks to be, and returns what it sent on the way, with when.
    fn run(&mut self, until: Instant) -> Vec<(Duration, Sent)> {
        self.run_handling(until, |_, _| {})
    }

    /// As [`Harness::run`], handing each datagram sent to `each` (a
    /// scripted server's answer) as it goes.
    fn run_handling(
        &mut self,
        until: Instant,
        mut each: impl FnMut(&mut Harness, &Sent),
    ) -> Vec<(Duration, Sent)> {
        let start = self.now;
        let mut out = Vec::new();
        let mut calls = 0;
        while let Some(due) = self.session.poll_timeout() {
            if due > until {
                break;
            }
            calls += 1;
            assert!(
                calls < 1_000_000,
                "the session keeps asking for {due:?}: spinning"
            );
            self.now = self.now.max(due);
            self.session.handle_timeout(self.now);
            for s in self.sent() {
                each(self, &s);
                out.push((self.now - start, s));
            }
        }
        self.now = until;
        out
    }

    fn reply(&mut self, to: &Header, message: Message<'_>) {
        self.server_seq += 1;
        let header = Header {
            flags: Flags::empty(),
            seq: self.server_seq,
            ..*to
        };
        self.deliver(header, message);
    }

    fn unknown_session(&mut self, to: &Header) {
        let header = Header {
            flags: Flags::empty(),
            ..*to
        };
        self.deliver(header, Message::UnknownSession);
    }

    fn deliver(&mut self, header: Header, message: Message<'_>) {
        let from = self.session.server();
        self.deliver_from(from, header, message);
    }

    fn deliver_from(&mut self, from: SocketAddr, header: Header, message: Message<'_>) {
        let mut buf = [0u8; 1200];
        let n = Datagram { header, message }.emit(None, &mut buf).unwrap();
        self.session.handle_datagram(self.now, from, &buf[..n]);
        self.session.handle_timeout(self.now);
    }

    /// Runs a second of heartbeats, answers the last with UNKNOWN_SESSION,
    /// and returns that heartbeat and the HELLO that reopens the session.
    fn lose_session(&mut self) -> (Sent, Sent) {
        let beat = self
            .run(self.now + Duration::from_secs(1))
            .pop()
            .expect("a heartbeat")
            .1;
        assert_eq!(beat.kind, Kind::Heartbeat);
        self.unknown_session(&beat.header);
        let hello = self.sent().pop().expect("a HELLO");
        (beat, hello)
    }

    fn welcome(&mut self, hello: &Header) {
        self.reply(
            hello,
            Message::Welcome {
                ttl_ms: 3000,
                tick_ms: 10,
            },
        );
    }

    /// Opens the session: the first HELLO, welcomed with `ttl_ms`.
    fn open(&mut self, ttl_ms: u32) -> Header {
        let hello = self.sent().pop().expect("a HELLO");
        assert_eq!(hello.kind, Kind::Hello);
        self.reply(
            &hello.header,
            Message::Welcome {
                ttl_ms,
                tick_ms: 10,
            },
        );
        assert_eq!(self.session.opened(), Some(Ok(())));
        hello.header
    }
}

impl PartialEq for ClientError {
    fn eq(&self, other: &ClientError) -> bool {
        format!("{self:?}") == format!("{other:?}")
    }
}

#[test]
fn heartbeats_every_third_of_the_ttl_for_an_hour() {
    let mut h = Harness::new(config());
    let start = h.now;
    h.open(3000);
    let sent = h.run(start + Duration::from_secs(3600));
    let beats: Vec<_> = sent
        .iter()
        .filter(|(_, s)| s.kind == Kind::Heartbeat)
        .collect();
    assert_eq!(beats.len(), 3600);
    for pair in beats.windows(2) {
        assert_eq!(pair[1].0 - pair[0].0, Duration::from_secs(1));
    }
    let seqs: Vec<u32> = beats.iter().map(|(_, s)| s.header.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "every datagram a new seq"
    );
}

#[test]
fn hello_retries_back_off_with_jitter_then_give_up() {
    let mut h = Harness::new(config());
    let start = h.now;
    let first = h.sent();
    assert_eq!(first.len(), 1);
    let sent = h.run(start + Duration::from_secs(60));
    let tries: Vec<Duration> = sent
        .iter()
        .filter(|(_, s)| s.kind == Kind::Hello)
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(tries.len(), 3, "4 tries in all: {tries:?}");
    let mut previous = Duration::ZERO;
    for (attempt, at) in tries.iter().enumerate() {
        let gap = *at - previous;
        let ceiling = Duration::from_millis(250 << attempt).min(Duration::from_secs(3));
        assert!(
            gap >= Duration::from_millis(62) && gap <= ceiling,
            "try {} after {gap:?}, ceiling {ceiling:?}",
            attempt + 1
        );
        previous = *at;
    }
    assert_eq!(h.session.opened(), Some(Err(ClientError::Timeout)));
    assert_eq!(h.session.state(), State::Closed);
}

#[test]
fn many_clients_reconnecting_at_once_spread_their_retries() {
    // The same moment, the same server silence: the jitter puts the
    // clients' second HELLOs at different times.
    let mut seconds = std::collections::BTreeSet::new();
    for client in 0..50u64 {
        let mut c = config();
        c.client_id = 1000 + client;
        let now = Instant::now();
        let mut s = ClientSession::new(c, now, 1_000_000 + client * 7919);
        while s.poll_transmit().is_some() {}
        let due = s.poll_timeout().unwrap();
        seconds.insert((due - now).as_micros());
    }
    assert!(
        seconds.len() > 40,
        "retries bunched: {} distinct",
        seconds.len()
    );
}

#[test]
fn a_lost_session_is_reopened_at_once_with_a_larger_incarnation() {
    let mut h = Harness::new(config());
    let start = h.now;
    let hello = h.open(3000);
    let beat = h
        .run(start + Duration::from_millis(1000))
        .pop()
        .expect("a heartbeat")
        .1;
    assert_eq!(beat.kind, Kind::Heartbeat);
    h.unknown_session(&beat.header);
    let next = h.sent();
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(
        next[0].kind,
        Kind::Hello,
        "no heartbeat for the lost session"
    );
    assert!(next[0].header.incarnation > hello.incarnation);
    assert_eq!(next[0].header.seq, 1);
    assert_eq!(h.session.state(), State::Lost);
    assert_eq!(
        h.session.poll_event(),
        Some(ClientEvent::SessionLost {
            incarnation: hello.incarnation
        })
    );
    h.reply(
        &next[0].header,
        Message::Welcome {
            ttl_ms: 3000,
            tick_ms: 10,
        },
    );
    assert_eq!(h.session.state(), State::Live);
    assert!(matches!(
        h.session.poll_event(),
        Some(ClientEvent::SessionReopened { .. })
    ));
}

#[test]
fn while_the_server_is_down_reopening_backs_off_up_to_the_ttl() {
    let mut h = Harness::new(config());
    let start = h.now;
    h.open(3000);
    h.lose_session();
    // The server stays silent for ten minutes.
    let sent = h.run(start + Duration::from_secs(601));
    let hellos: Vec<Duration> = sent
        .iter()
        .filter(|(_, s)| s.kind == Kind::Hello)
        .map(|(at, _)| *at)
        .collect();
    assert!(
        sent.iter().all(|(_, s)| s.kind == Kind::Hello),
        "only HELLOs while lost"
    );
    let gaps: Vec<Duration> = hellos.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        gaps.iter().all(|g| *g <= Duration::from_secs(3)),
        "capped at the TTL: {gaps:?}"
    );
    // Fewer than one a second on average: it backs off, yet keeps trying.
    assert!(
        hellos.len() > 100 && hellos.len() < 600,
        "{} HELLOs",
        hellos.len()
    );
}

#[test]
fn a_retried_submit_keeps_its_request_id_and_gets_a_new_seq() {
    let mut h = Harness::new(config());
    let start = h.now;
    h.open(3000);
    let id = h.session.start(
        h.now,
        Request::Submit {
            job: "echo".into(),
            payload: b"x".to_vec(),
            delay: Duration::ZERO,
            deadline: Duration::ZERO,
        },
    );
    let first = h.sent().pop().unwrap();
    let retries: Vec<Sent> = h
        .run(start + Duration::from_millis(600))
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == Kind::Submit)
        .collect();
    assert_eq!(retries.len(), 2);
    for r in &retries {
        assert_eq!(r.request_id, first.request_id);
        assert!(r.header.seq > first.header.seq);
    }
    // The answer to the first try counts as well.
    h.reply(
        &first.header,
        Message::Accepted {
            request_id: first.request_id.unwrap(),
            task_id: 77,
        },
    );
    assert_eq!(
        h.session.completion(id),
        Some(Ok(Answer::Accepted(TaskId(77))))
    );
    assert!(h
        .run(start + Duration::from_secs(10))
        .iter()
        .all(|(_, s)| s.kind == Kind::Heartbeat));
}

#[test]
fn a_request_with_no_answer_times_out_after_its_tries() {
    let mut h = Harness::new(config());
    let start = h.now;
    h.open(3000);
    let id = h.session.start(h.now, Request::Status(TaskId(5)));
    h.run(start + Duration::from_millis(999));
    assert_eq!(h.session.completion(id), None);
    h.run(start + Duration::from_millis(1000));
    assert_eq!(h.session.completion(id), Some(Err(ClientError::Timeout)));
}

#[test]
fn a_bye_retry_answered_unknown_session_means_the_bye_took_effect() {
    let mut h = Harness::new(config());
    let start = h.now;
    h.open(3000);
    let id = h.session.start(h.now, Request::Bye);
    h.sent(); // the first BYE's ack is lost
    let retry = h
        .run(start + Duration::from_millis(260))
        .into_iter()
        .find(|(_, s)| s.kind == Kind::Bye)
        .unwrap()
        .1;
    h.unknown_session(&retry.header);
    assert_eq!(h.session.completion(id), Some(Ok(Answer::Bye)));
    assert_eq!(h.session.state(), State::Closed);
    // An UNKNOWN_SESSION to the first BYE is different: the session was
    // gone before it.
    let mut h = Harness::new(config());
    h.open(3000);
    let id = h.session.start(h.now, Request::Bye);
    let first = h.sent().pop().unwrap();
    h.unknown_session(&first.header);
    assert_eq!(
        h.session.completion(id),
        Some(Err(ClientError::SessionLost))
    );
}

#[test]
fn an_unknown_session_answering_an_old_seq_is_matched_by_incarnation_too() {
    // After a reopening, the new session's seqs start at 1 again: a late
    // UNKNOWN_SESSION for seq 2 of the old incarnation must not fail a
    // request sent as seq 2 of the new one.
    let mut h = Harness::new(config());
    h.open(3000);
    let (beat, hello) = h.lose_session();
    h.welcome(&hello.header);
    let id = h.session.start(h.now, Request::Status(TaskId(9)));
    let status = h.sent().pop().unwrap();
    assert_eq!(
        status.header.seq, beat.header.seq,
        "the same seq, another session"
    );
    h.unknown_session(&beat.header);
    assert_eq!(h.session.completion(id), None);
    h.reply(
        &status.header,
        Message::TaskState {
            task_id: 9,
            report: TaskReport::Unknown,
        },
    );
    assert_eq!(
        h.session.completion(id),
        Some(Ok(Answer::Status(TaskStatus::Unknown)))
    );
}

#[test]
fn requests_started_while_reopening_wait_for_the_welcome() {
    let mut h = Harness::new(config());
    h.open(3000);
    let (_, hello) = h.lose_session();
    let id = h.session.start(h.now, Request::Status(TaskId(1)));
    assert!(
        h.sent().is_empty(),
        "not sent into a session the server has not opened"
    );
    h.welcome(&hello.header);
    let sent = h.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].kind, Kind::Status);
    assert_eq!(sent[0].header.incarnation, hello.header.incarnation);
    assert_eq!(h.session.completion(id), None);
}

#[test]
fn a_final_state_under_a_reused_task_id_is_forgotten_when_the_id_is_reused() {
    let mut h = Harness::new(config());
    let first = h.open(3000);
    h.reply(
        &first,
        Message::TaskState {
            task_id: 4_294_967_296,
            report: TaskReport::Done(b"old"),
        },
    );
    assert!(h.session.final_state(TaskId(4_294_967_296)).is_some());
    // The server restarted; the new session's first task gets that id.
    let (_, hello) = h.lose_session();
    h.welcome(&hello.header);
    let id = h.session.start(
        h.now,
        Request::Submit {
            job: "echo".into(),
            payload: vec![],
            delay: Duration::ZERO,
            deadline: Duration::ZERO,
        },
    );
    let submit = h.sent().pop().unwrap();
    h.reply(
        &submit.header,
        Message::Accepted {
            request_id: submit.request_id.unwrap(),
            task_id: 4_294_967_296,
        },
    );
    assert_eq!(
        h.session.completion(id),
        Some(Ok(Answer::Accepted(TaskId(4_294_967_296))))
    );
    assert_eq!(h.session.final_state(TaskId(4_294_967_296)), None);
}

#[test]
fn a_resumed_session_the_server_no_longer_has_is_replaced_by_a_new_one() {
    let mut c = config();
    c.resume = Some(Resume {
        incarnation: 500,
        next_seq: 10,
        next_request_id: 3,
        server: None,
    });
    let mut h = Harness::new(c);
    let start = h.now;
    let first = h.sent().pop().unwrap();
    assert_eq!((first.header.incarnation, first.header.seq), (500, 10));
    // The server drops a HELLO for a session it does not have (stale).
    let sent = h.run(start + Duration::from_secs(2));
    let hellos: Vec<&Sent> = sent.iter().map(|(_, s)| s).collect();
    assert!(hellos.iter().any(|s| s.header.incarnation > 500));
    let fresh = hellos.iter().find(|s| s.header.incarnation > 500).unwrap();
    assert_eq!(fresh.header.seq, 1);
}

#[test]
fn refusals_while_reopening_do_not_shadow_the_servers_numbering() {
    // Each REJECTED to a HELLO copies the HELLO's seq; were those taken into
    // the window of the server's own numbering, the WELCOME (the server's
    // seq 1) would then look like a replay and be dropped.
    let mut h = Harness::new(config());
    h.open(3000);
    let (_, mut hello) = h.lose_session();
    for _ in 0..3 {
        h.deliver(
            Header {
                flags: Flags::empty(),
                ..hello.header
            },
            Message::Rejected {
                request_id: 0,
                code: crate::wire::RejectCode::TooManySessions,
                message: "",
            },
        );
        assert_eq!(h.session.state(), State::Lost);
        let due = h.session.poll_timeout().unwrap();
        hello = h
            .run(due)
            .into_iter()
            .map(|(_, s)| s)
            .find(|s| s.kind == Kind::Hello)
            .expect("another HELLO after the backoff");
    }
    h.server_seq = 0; // the server's first datagram in this session
    h.welcome(&hello.header);
    assert_eq!(h.session.state(), State::Live);
}

#[test]
fn a_reopening_that_goes_unanswered_moves_to_a_new_incarnation_each_round() {
    let mut h = Harness::new(config());
    let start = h.now;
    h.open(3000);
    let (_, first) = h.lose_session();
    let hellos: Vec<Sent> = h
        .run(start + Duration::from_secs(120))
        .into_iter()
        .map(|(_, s)| s)
        .filter(|s| s.kind == Kind::Hello)
        .collect();
    let incarnations: std::collections::BTreeSet<u64> =
        hellos.iter().map(|s| s.header.incarnation).collect();
    assert!(
        incarnations.len() > 3,
        "{} incarnations over {} HELLOs",
        incarnations.len(),
        hellos.len()
    );
    assert!(incarnations.iter().all(|&i| i >= first.header.incarnation));
    // A round is the configured tries (4): the first 3 retries keep the
    // incarnation of the first HELLO.
    assert!(hellos[..3]
        .iter()
        .all(|s| s.header.incarnation == first.header.incarnation));
    assert!(hellos[3].header.incarnation > first.header.incarnation);
}

#[test]
fn a_bye_that_finds_the_session_gone_does_not_open_another() {
    let mut h = Harness::new(config());
    h.open(3000);
    let id = h.session.start(h.now, Request::Bye);
    let bye = h.sent().pop().unwrap();
    h.unknown_session(&bye.header);
    assert_eq!(
        h.session.completion(id),
        Some(Err(ClientError::SessionLost))
    );
    assert_eq!(h.session.state(), State::Closed);
    assert!(
        h.sent().is_empty(),
        "no HELLO from a client that is leaving"
    );
    assert_eq!(h.session.poll_timeout(), None);
}

// --- several hosts ---------------------------------------------------------

fn hosts() -> Vec<SocketAddr> {
    ["10.0.0.1:7900", "10.0.0.2:7900", "10.0.0.3:7900"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

fn cluster_config() -> ClientConfig {
    let mut c = ClientConfig::with_servers(hosts(), 42);
    c.retry_after = Duration::from_millis(250);
    c.tries = 4;
    c
}

impl Harness {
    /// Runs to `until`, the host answering each heartbeat that asks for an
    /// ACK; returns the heartbeats sent.
    fn run_answered(&mut self, until: Instant) -> Vec<Sent> {
        self.run_handling(until, |h, s| {
            if s.kind == Kind::Heartbeat && s.header.flags.contains(Flags::ACK) {
                let acked_seq = s.header.seq;
                h.reply(&s.header, Message::HeartbeatAck { acked_seq });
            }
        })
        .into_iter()
        .map(|(_, s)| s)
        .collect()
    }

    fn events(&mut self) -> Vec<ClientEvent> {
        std::iter::from_fn(|| self.session.poll_event()).collect()
    }
}

#[test]
fn the_host_is_the_first_in_the_clients_own_order() {
    let mut h = Harness::new(cluster_config());
    let ranked = super::hosts::rank(42, &hosts());
    assert_eq!(h.session.servers(), &ranked[..]);
    let hello = h.sent().pop().unwrap();
    assert_eq!((hello.kind, hello.to), (Kind::Hello, ranked[0]));
}

#[test]
fn a_host_that_answers_is_kept_for_an_hour_even_with_acks_off() {
    let mut c = cluster_config();
    c.ack_every = 0;
    let mut h = Harness::new(c);
    let start = h.now;
    h.open(3000);
    let beats = h.run_answered(start + Duration::from_secs(3600));
    assert!(beats.len() >= 3599, "{} heartbeats", beats.len());
    let home = h.session.servers()[0];
    assert!(beats.iter().all(|b| b.to == home));
    // With nothing else heard, each heartbeat asks for its answer, so a
    // live host is heard from three times a TTL.
    assert!(beats.iter().all(|b| b.header.flags.contains(Flags::ACK)));
    assert!(h.events().is_empty(), "no move, no loss");
}

#[test]
fn a_host_silent_for_a_ttl_is_left_for_the_next_in_order() {
    let mut c = cluster_config();
    c.tries = 20; // the submit is still being retried when the client moves
    let mut h = Harness::new(c);
    let start = h.now;
    let first = h.open(3000);
    let ranked = h.session.servers().to_vec();
    h.run_answered(start + Duration::from_secs(10));
    let heard_last = h.now;
    // The host goes silent; a submit is in flight when the client leaves.
    let submit = h.session.start(
        h.now,
        Request::Submit {
            job: "echo".into(),
            payload: vec![],
            delay: Duration::ZERO,
            deadline: Duration::ZERO,
        },
    );
    h.sent();
    let sent = h.run(heard_last + Duration::from_secs(4));
    let hello = sent
        .iter()
        .find(|(_, s)| s.kind == Kind::Hello)
        .expect("a HELLO elsewhere");
    // The limit counts from the last datagram heard, here the last ACK.
    assert!(
        hello.0 <= Duration::from_secs(3) + Duration::from_millis(1),
        "{:?}",
        hello.0
    );
    assert!(hello.0 >= Duration::from_millis(2000), "{:?}", hello.0);
    assert_eq!(hello.1.to, ranked[1]);
    assert!(hello.1.header.incarnation > first.incarnation);
    assert!(sent
        .iter()
        .all(|(_, s)| s.kind != Kind::Hello || s.to == ranked[1]));
    assert_eq!(
        h.session.completion(submit),
        Some(Err(ClientError::SessionLost))
    );
    assert_eq!(
        h.events(),
        vec![
            ClientEvent::Moved {
                from: ranked[0],
                to: ranked[1]
            },
            ClientEvent::SessionLost {
                incarnation: first.incarnation
            }
        ]
    );
    h.welcome(&hello.1.header);
    assert_eq!(h.session.state(), State::Live);
    assert_eq!(
        h.events(),
        vec![ClientEvent::SessionReopened {
            incarnation: hello.1.header.incarnation
        }]
    );
    let beats = h.run_answered(h.now + Duration::from_secs(30));
    assert!(
        beats.iter().all(|b| b.to == ranked[1]),
        "stays on its new host"
    );
}

#[test]
fn opening_tries_every_host_for_a_ttl_then_gives_up() {
    let mut c = cluster_config();
    c.tries = 100; // the hosts' silence, not the tries, ends each round
    let mut h = Harness::new(c);
    let start = h.now;
    let ranked = h.session.servers().to_vec();
    let mut sent = vec![(Duration::ZERO, h.sent().pop().unwrap())];
    sent.extend(h.run(start + Duration::from_secs(60)));
    let first_on = |host: SocketAddr| sent.iter().find(|(_, s)| s.to == host).unwrap().0;
    // A TTL on each (and the last HELLO's retry time, 250 ms, at most).
    let ttl = Duration::from_secs(3);
    let retry = Duration::from_millis(250);
    assert_eq!(first_on(ranked[0]), Duration::ZERO);
    let second = first_on(ranked[1]);
    assert!(second >= ttl && second <= ttl + retry, "{second:?}");
    let third = first_on(ranked[2]);
    assert!(
        third >= second + ttl && third <= second + ttl + retry,
        "{third:?}"
    );
    assert!(sent.iter().all(|(_, s)| s.kind == Kind::Hello));
    assert!(sent.last().unwrap().0 < third + ttl + retry);
    assert_eq!(h.session.opened(), Some(Err(ClientError::Timeout)));
}

#[test]
fn a_host_that_refuses_for_want_of_room_is_passed_over_when_opening() {
    let mut h = Harness::new(cluster_config());
    let ranked = h.session.servers().to_vec();
    let hello = h.sent().pop().unwrap();
    h.reply(
        &hello.header,
        Message::Rejected {
            request_id: 0,
            code: RejectCode::TooManySessions,
            message: "full",
        },
    );
    let next = h.sent().pop().expect("a HELLO to the next host");
    assert_eq!((next.kind, next.to), (Kind::Hello, ranked[1]));
    h.welcome(&next.header);
    assert_eq!(h.session.opened(), Some(Ok(())));
    // Refused by every host, opening fails with the last refusal.
    let mut h = Harness::new(cluster_config());
    for _ in 0..3 {
        let hello = h.sent().pop().unwrap();
        h.reply(
            &hello.header,
            Message::Rejected {
                request_id: 0,
                code: RejectCode::TooManySessions,
                message: "full",
            },
        );
    }
    assert!(matches!(
        h.session.opened(),
        Some(Err(ClientError::Rejected {
            code: RejectCode::TooManySessions,
            ..
        }))
    ));
}

#[test]
fn a_new_list_moves_the_client_only_if_its_host_left_it() {
    let mut h = Harness::new(cluster_config());
    h.open(3000);
    let home = h.session.server();
    // A host joins that this client ranks first: a live session stays.
    let joined: SocketAddr = (1..255u8)
        .map(|i| SocketAddr::from(([10, 0, 1, i], 7900)))
        .find(|&s| {
            let mut list = hosts();
            list.push(s);
            super::hosts::rank(42, &list)[0] == s
        })
        .unwrap();
    let mut list = hosts();
    list.push(joined);
    h.session.set_servers(h.now, &list);
    assert_eq!(h.session.server(), home);
    assert!(h.events().is_empty() && h.sent().is_empty());
    // Its host leaves the list: it moves at once to its first choice.
    list.retain(|&s| s != home);
    h.session.set_servers(h.now, &list);
    assert_eq!(h.session.server(), joined);
    let hello = h.sent().pop().expect("a HELLO");
    assert_eq!((hello.kind, hello.to), (Kind::Hello, joined));
    assert!(
        matches!(h.events()[0], ClientEvent::Moved { from, to } if from == home && to == joined)
    );
}

#[test]
fn one_host_is_never_left_however_long_it_is_silent() {
    let mut h = Harness::new(config());
    let start = h.now;
    let first = h.open(3000);
    let sent = h.run(start + Duration::from_secs(600));
    assert!(sent.iter().all(|(_, s)| s.kind == Kind::Heartbeat));
    assert!(sent
        .iter()
        .all(|(_, s)| s.header.incarnation == first.incarnation));
}

#[test]
fn lost_answers_make_heartbeats_probes_and_one_answer_keeps_the_host() {
    let mut h = Harness::new(cluster_config());
    let start = h.now;
    h.open(3000);
    h.run_answered(start + Duration::from_secs(10));
    let quiet_from = h.now;
    // Nothing answered for 2.9 s (just under the TTL).
    let sent = h.run(quiet_from + Duration::from_millis(2900));
    let beats: Vec<Duration> = sent
        .iter()
        .filter(|(_, s)| s.kind == Kind::Heartbeat)
        .map(|(at, _)| *at)
        .collect();
    // Once an answer is overdue (an interval without one), every 250 ms.
    let probes = beats
        .iter()
        .filter(|at| **at >= Duration::from_secs(1))
        .count();
    assert!(probes >= 7, "probes at {beats:?}");
    assert!(sent
        .iter()
        .all(|(_, s)| s.header.flags.contains(Flags::ACK)));
    // The last probe is answered: the client stays, and beats once a second again.
    let last = sent.last().unwrap().1.header;
    h.reply(
        &last,
        Message::HeartbeatAck {
            acked_seq: last.seq,
        },
    );
    let after = h.run_answered(h.now + Duration::from_secs(10));
    assert!(h.events().is_empty(), "no move");
    assert!(
        (9..=11).contains(&after.len()),
        "{} beats in 10 s",
        after.len()
    );
}

#[test]
fn a_stale_resumed_session_is_opened_anew_on_the_same_host() {
    let mut c = cluster_config();
    let hosts = super::hosts::rank(42, &hosts());
    c.resume = Some(Resume {
        incarnation: 500,
        next_seq: 10,
        next_request_id: 3,
        server: Some(hosts[2]),
    });
    let mut h = Harness::new(c);
    let start = h.now;
    let mut sent = vec![(Duration::ZERO, h.sent().pop().unwrap())];
    sent.extend(h.run(start + Duration::from_secs(2)));
    // Two tries of the resumed incarnation, then a new one: all to the
    // host the session was on, where its tasks are.
    assert!(sent.iter().all(|(_, s)| s.to == hosts[2]), "{sent:?}");
    let fresh = sent
        .iter()
        .find(|(_, s)| s.header.incarnation != 500)
        .unwrap();
    h.welcome(&fresh.1.header);
    assert_eq!(h.session.opened(), Some(Ok(())));
    assert_eq!(h.session.server(), hosts[2]);
}

/// Every heartbeat in `beats` asks for an ACK, and none follows another
/// sooner than the retry time (250 ms): probes, not a burst.
fn assert_probes_ask_one_retry_apart(beats: &[&(Duration, Sent)]) {
    assert!(beats
        .iter()
        .all(|(_, s)| s.header.flags.contains(Flags::ACK)));
    for pair in beats.windows(2) {
        assert!(
            pair[1].0 - pair[0].0 >= Duration::from_millis(250),
            "a burst: {beats:?}"
        );
    }
}

/// A client live on its host for 5 s, then one ask of it unanswered.
fn one_ask_unanswered() -> Harness {
    let mut h = Harness::new(cluster_config());
    let start = h.now;
    h.open(3000);
    h.run_answered(start + Duration::from_secs(5));
    let unanswered = h.run(h.now + Duration::from_millis(1100));
    assert!(unanswered
        .iter()
        .any(|(_, s)| s.header.flags.contains(Flags::ACK)));
    h
}

#[test]
fn probes_ask_for_an_ack_whatever_ack_every_says_and_come_one_retry_apart() {
    let mut c = cluster_config();
    c.ack_every = 4;
    let mut h = Harness::new(c);
    let start = h.now;
    h.open(3000);
    h.run_answered(start + Duration::from_secs(10));
    let sent = h.run(h.now + Duration::from_millis(2900));
    let beats: Vec<&(Duration, Sent)> = sent
        .iter()
        .filter(|(_, s)| s.kind == Kind::Heartbeat)
        .collect();
    assert_probes_ask_one_retry_apart(&beats);
}

#[test]
fn a_client_that_was_itself_quiet_asks_before_it_leaves() {
    // One ask goes unanswered, then heartbeats are paused for a minute:
    // the host heard nothing, but the client did not ask either.
    let mut h = one_ask_unanswered();
    let home = h.session.server();
    h.session.pause_heartbeats(true);
    let quiet = h.run(h.now + Duration::from_secs(60));
    assert!(quiet.is_empty(), "{quiet:?}");
    h.session.pause_heartbeats(false);
    // The first heartbeat asks; the host answers it: no move.
    let beats = h.run_answered(h.now + Duration::from_secs(10));
    assert!(!beats.is_empty());
    assert!(h.events().is_empty(), "moved without asking");
    assert_eq!(h.session.server(), home);
}

#[test]
fn a_client_stopped_for_a_minute_asks_again_before_it_leaves() {
    let mut h = one_ask_unanswered();
    let home = h.session.server();
    // The process is stopped for a minute, then runs again.
    h.now += Duration::from_secs(60);
    h.session.handle_timeout(h.now);
    let asked = h.sent();
    assert!(h.events().is_empty(), "moved on waking");
    let ask = asked
        .iter()
        .find(|s| s.header.flags.contains(Flags::ACK))
        .expect("an ask on waking");
    assert_eq!(ask.to, home);
    // Unanswered this time: the client moves a retry later.
    h.run(h.now + Duration::from_millis(600));
    assert!(matches!(h.events().first(), Some(ClientEvent::Moved { from, .. }) if *from == home));
}

#[test]
fn a_probe_asks_even_just_after_other_traffic() {
    // ack_every 4: the fourth heartbeat asks even if the host was heard
    // from just before. Its probe (a quarter second later, the host heard
    // from less than half an interval before) must ask too, or the session
    // would spin sending heartbeats that never clear the probe.
    let mut c = cluster_config();
    c.ack_every = 4;
    let mut h = Harness::new(c);
    let start = h.now;
    let hello = h.open(3000);
    let mut beats_so_far = h.run_answered(start + Duration::from_millis(5500)).len();
    while beats_so_far % 4 != 3 {
        let next = h.session.poll_timeout().unwrap();
        beats_so_far += h.run_answered(next).len();
    }
    // Just before the fourth heartbeat, the host pushes something.
    let due = h.session.poll_timeout().unwrap();
    h.now = due - Duration::from_millis(10);
    h.reply(
        &hello,
        Message::TaskState {
            task_id: 9,
            report: TaskReport::Running,
        },
    );
    let sent = h.run(due + Duration::from_millis(600));
    let beats: Vec<&(Duration, Sent)> = sent
        .iter()
        .filter(|(_, s)| s.kind == Kind::Heartbeat)
        .collect();
    assert!(beats[0].1.header.flags.contains(Flags::ACK), "{beats:?}");
    assert!((2..=4).contains(&beats.len()), "{beats:?}");
    assert_probes_ask_one_retry_apart(&beats);
}

#[test]
fn hosts_that_all_refuse_are_cycled_a_ttl_apart_not_in_a_tight_loop() {
    let mut h = Harness::new(cluster_config());
    let start = h.now;
    h.open(3000);
    let beat = h
        .run(start + Duration::from_secs(1))
        .pop()
        .expect("a heartbeat")
        .1;
    h.unknown_session(&beat.header);
    let mut hellos = 0;
    let until = h.now + Duration::from_secs(60);
    let mut calls = 0;
    while h.now < until {
        calls += 1;
        assert!(calls < 100_000, "spinning");
        for s in h.sent() {
            assert_eq!(s.kind, Kind::Hello);
            hellos += 1;
            h.reply(
                &s.header,
                Message::Rejected {
                    request_id: 0,
                    code: RejectCode::TooManySessions,
                    message: "full",
                },
            );
        }
        let Some(due) = h.session.poll_timeout() else {
            break;
        };
        h.now = due.max(h.now);
        h.session.handle_timeout(h.now);
    }
    // Backing off up to the TTL on each host: dozens of tries a minute,
    // not thousands.
    assert!((10..=120).contains(&hellos), "{hellos} HELLOs in a minute");
    let moves = h
        .events()
        .iter()
        .filter(|e| matches!(e, ClientEvent::Moved { .. }))
        .count();
    assert!((3..=40).contains(&moves), "{moves} moves");
}

#[test]
fn a_host_left_behind_is_not_listened_to() {
    let mut c = cluster_config();
    c.tries = 20;
    let mut h = Harness::new(c);
    let start = h.now;
    let first = h.open(3000);
    let old = h.session.server();
    h.run_answered(start + Duration::from_secs(5));
    let hello = h
        .run(h.now + Duration::from_secs(4))
        .into_iter()
        .find(|(_, s)| s.kind == Kind::Hello)
        .unwrap()
        .1;
    h.welcome(&hello.header);
    assert_ne!(h.session.server(), old);
    // The old host pushes a final state for task 1 of the old session:
    // task ids are per host, so it must not be taken for the new host's.
    h.deliver_from(
        old,
        Header {
            flags: Flags::empty(),
            seq: 77,
            ..first
        },
        Message::TaskState {
            task_id: 1,
            report: TaskReport::Done(b"old"),
        },
    );
    assert_eq!(h.session.final_state(TaskId(1)), None);
}

#[test]
fn a_client_saying_bye_to_a_silent_host_does_not_look_for_another() {
    let mut c = cluster_config();
    c.tries = 40; // BYE retried for 10 s
    let mut h = Harness::new(c);
    let start = h.now;
    h.open(3000);
    let home = h.session.server();
    h.run_answered(start + Duration::from_secs(5));
    let bye = h.session.start(h.now, Request::Bye);
    let sent = h.run(h.now + Duration::from_millis(9900));
    assert!(sent
        .iter()
        .all(|(_, s)| s.to == home && s.kind != Kind::Hello));
    assert!(h.events().is_empty());
    h.run(h.now + Duration::from_millis(200));
    assert_eq!(h.session.completion(bye), Some(Err(ClientError::Timeout)));
}

#[test]
fn opening_that_fails_fails_what_waited_for_it() {
    let mut h = Harness::new(cluster_config());
    let start = h.now;
    let status = h.session.start(start, Request::Status(TaskId(1)));
    h.run(start + Duration::from_secs(60));
    assert_eq!(h.session.opened(), Some(Err(ClientError::Timeout)));
    assert!(h.session.completion(status).is_some_and(|r| r.is_err()));
    assert_eq!(h.session.poll_timeout(), None, "nothing left to time");
}
