//! Sessions: opening, liveness, expiry, incarnations, replays, framing.
use super::*;

#[test]
fn hello_grants_clamped_ttl_and_reports_tick() {
    let mut sim = Sim::new(config());
    for (asked, granted) in [(0, 3000), (5, 100), (2500, 2500), (u32::MAX, 3_600_000)] {
        let mut c = Client::new(u64::from(asked) + 1);
        let reply = sim.hello(&mut c, asked);
        assert_eq!(
            reply.message(),
            Message::Welcome {
                ttl_ms: granted,
                tick_ms: 10
            }
        );
        assert_eq!(reply.to, c.addr);
        let h = reply.header();
        assert_eq!(
            (h.client_id, h.incarnation, h.seq),
            (c.id, c.incarnation, 1)
        );
    }
    assert_eq!(sim.engine.live_sessions(), 4);
}

#[test]
fn repeated_hello_repeats_welcome_with_first_ttl() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 1000);
    let again = sim.hello(&mut c, 9000);
    assert_eq!(
        again.message(),
        Message::Welcome {
            ttl_ms: 1000,
            tick_ms: 10
        }
    );
    assert_eq!(again.header().seq, 2, "server numbers its datagrams");
    assert_eq!(sim.engine.stats().sessions_opened, 1);
}

#[test]
fn heartbeats_keep_a_session_alive_for_hours_then_silence_expires_it_on_time() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    let mut s = Client::new(2);
    sim.hello(&mut s, TTL);
    let task = accepted_task(&sim.submit(&mut s, 1, "sleep", &[0, 0, 0, 1]));
    sim.effects();
    sim.event(task, TaskEvent::Started);
    // Three hours of one heartbeat a second, with jitter up to 1.9 s.
    let end = Timestamp::from_millis(3 * 3600 * 1000);
    let mut i = 0u64;
    while sim.now < end {
        i += 1;
        sim.run_ms(1000 + (i * 7919) % 900);
        assert!(sim.send(&mut c, Message::Heartbeat).unwrap().is_empty());
        assert!(sim.send(&mut s, Message::Heartbeat).unwrap().is_empty());
    }
    assert_eq!(sim.engine.stats().sessions_expired, 0);
    assert_eq!(sim.engine.stats().heartbeats, 2 * i);
    // Now `s` goes silent: its task is cancelled, reason expired, no earlier
    // than TTL after its last datagram and within one tick after that.
    let last = sim.now;
    let mut expired_at = None;
    while expired_at.is_none() {
        let due = sim.engine.poll_timeout().expect("a timer is pending");
        sim.now = due;
        sim.engine.handle_timeout(due);
        for effect in sim.effects() {
            assert_eq!(
                effect,
                Effect::Cancel {
                    task,
                    reason: CancelReason::Expired
                }
            );
            expired_at = Some(due);
        }
        if sim.now.0 - last.0 < 2000 * 1000 {
            // Keep `c` alive meanwhile.
            sim.send(&mut c, Message::Heartbeat).unwrap();
        }
    }
    let late_us = expired_at.unwrap().0 - last.0;
    assert!(late_us >= u64::from(TTL) * 1000, "early by {late_us} us");
    assert!(
        late_us <= u64::from(TTL) * 1000 + 10_000,
        "late: {late_us} us"
    );
    let replies = sim.event(task, TaskEvent::Finished(JobOutcome::Done(vec![])));
    assert_eq!(replies.len(), 1);
    assert!(is_cancelled_with(&replies[0], CancelReason::Expired));
    assert_eq!(replies[0].to, s.addr);
    assert_eq!(sim.engine.live_sessions(), 1);
}

#[test]
fn many_clients_with_jitter_never_expire_early_or_late() {
    let mut sim = Sim::new(config());
    let ttl_ms = |id: u64| 1000 + (id as u32 * 37) % 2000;
    let mut clients: Vec<Client> = (1..=200).map(Client::new).collect();
    let mut last_seen = vec![Timestamp(0); clients.len()];
    for c in clients.iter_mut() {
        sim.hello(c, ttl_ms(c.id));
    }
    let mut alive = vec![true; clients.len()];
    let mut step = 0u64;
    // An hour in uneven steps of 1–97 ms; each client heartbeats at
    // pseudo-random moments, sometimes too rarely to stay alive.
    while sim.now < Timestamp::from_millis(3600 * 1000) {
        step += 1;
        let target = Timestamp(sim.now.0 + 1000 + (step * 7_654_321) % 96_000);
        // Drive the clock as the server does, checking every client each
        // time an expiry is decided.
        while let Some(due) = sim.engine.poll_timeout().filter(|&d| d <= target) {
            sim.now = due;
            let before = sim.engine.stats().sessions_expired;
            sim.engine.handle_timeout(due);
            if sim.engine.stats().sessions_expired == before {
                continue;
            }
            for (i, c) in clients.iter().enumerate() {
                if alive[i] && sim.engine.live_session(c.id).is_none() {
                    let since = due.0 - last_seen[i].0;
                    let ttl_us = u64::from(ttl_ms(c.id)) * 1000;
                    assert!(since >= ttl_us, "client {} expired early: {since} us", c.id);
                    assert!(
                        since <= ttl_us + 10_000,
                        "client {} expired late: {since} us",
                        c.id
                    );
                    alive[i] = false;
                }
            }
        }
        sim.now = target;
        sim.engine.handle_timeout(target);
        for (i, c) in clients.iter_mut().enumerate() {
            assert_eq!(alive[i], sim.engine.live_session(c.id).is_some());
            if (c.id * 2_654_435_761 + step * 40_503) % 1000 < 12 {
                if alive[i] {
                    sim.send(c, Message::Heartbeat).unwrap();
                } else {
                    *c = c.next_incarnation();
                    sim.hello(c, ttl_ms(c.id));
                    alive[i] = true;
                }
                last_seen[i] = sim.now;
            }
        }
    }
    assert!(
        sim.engine.stats().sessions_expired > 50,
        "{:?}",
        sim.engine.stats()
    );
}

#[test]
fn late_datagrams_after_expiry_get_unknown_session_and_do_not_revive() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 500);
    sim.run_ms(511);
    assert_eq!(sim.engine.live_sessions(), 0);
    for message in [
        Message::Heartbeat,
        Message::Status { task_id: 1 },
        Message::Bye,
    ] {
        let reply = sim.ask(&mut c, message);
        assert_eq!(reply.message(), Message::UnknownSession);
        let h = reply.header();
        assert_eq!(
            (h.client_id, h.incarnation, h.seq),
            (c.id, c.incarnation, c.seq)
        );
        assert_eq!(reply.bytes.len(), 28);
    }
    assert_eq!(sim.engine.live_sessions(), 0);
    // A HELLO of the same incarnation is stale now: dropped, no reply.
    let mut same = c.clone();
    assert_eq!(
        sim.send(
            &mut same,
            Message::Hello {
                ttl_ms: 0,
                name: ""
            }
        )
        .unwrap_err(),
        Dropped::StaleHello
    );
    let mut next = c.next_incarnation();
    assert!(matches!(
        sim.hello(&mut next, 0).message(),
        Message::Welcome { .. }
    ));
}

#[test]
fn newer_incarnation_replaces_and_older_is_stale() {
    let mut sim = Sim::new(config());
    let mut old = Client::new(7);
    sim.hello(&mut old, TTL);
    let task = accepted_task(&sim.submit(&mut old, 1, "sleep", &[0, 0, 1, 0]));
    sim.effects();
    sim.event(task, TaskEvent::Started);
    let mut new = old.next_incarnation();
    new.addr = "127.0.0.1:4444".parse().unwrap();
    sim.hello(&mut new, TTL);
    assert_eq!(
        sim.effects(),
        vec![Effect::Cancel {
            task,
            reason: CancelReason::Replaced
        }]
    );
    assert_eq!(sim.engine.stats().sessions_replaced, 1);
    // The old session's datagrams are now unknown; its HELLO is stale.
    assert_eq!(
        sim.ask(&mut old, Message::Heartbeat).message(),
        Message::UnknownSession
    );
    let mut older = old.clone();
    older.incarnation -= 1;
    assert_eq!(
        sim.send(
            &mut older,
            Message::Hello {
                ttl_ms: 0,
                name: ""
            }
        )
        .unwrap_err(),
        Dropped::StaleHello
    );
    // The task's final state goes to the old session's address, under its
    // identity and numbering.
    let replies = sim.event(task, TaskEvent::Finished(JobOutcome::Done(vec![1])));
    assert!(is_cancelled_with(&replies[0], CancelReason::Replaced));
    assert_eq!(replies[0].to, old.addr);
    let h = replies[0].header();
    assert_eq!((h.incarnation, h.seq), (old.incarnation, 3));
    // The new session reads it too.
    let status = sim.ask(&mut new, Message::Status { task_id: task.0 });
    assert!(is_cancelled_with(&status, CancelReason::Replaced));
    assert_eq!(sim.engine.sessions.len(), 1, "old slot released");
}

#[test]
fn replays_are_dropped_and_change_nothing() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    let hello = sim.encode(
        &mut c,
        Flags::empty(),
        Message::Hello {
            ttl_ms: 500,
            name: "",
        },
    );
    assert_eq!(sim.raw(c.addr, &hello).unwrap().len(), 1);
    let submit = sim.encode(
        &mut c,
        Flags::empty(),
        Message::Submit {
            request_id: 1,
            delay_ms: 0,
            deadline_ms: 0,
            job: "echo",
            payload: b"",
        },
    );
    assert_eq!(sim.raw(c.addr, &submit).unwrap().len(), 1);
    sim.effects();
    let heartbeat = sim.encode(&mut c, Flags::ACK, Message::Heartbeat);
    assert_eq!(sim.raw(c.addr, &heartbeat).unwrap().len(), 1);
    let before = *sim.engine.stats();
    for bytes in [&hello, &submit, &heartbeat] {
        assert_eq!(
            sim.raw(c.addr, bytes).unwrap_err(),
            Dropped::Replay(ReplayError::Seen)
        );
    }
    assert!(sim.effects().is_empty());
    assert_eq!(sim.engine.stats().dropped_replay, before.dropped_replay + 3);
    // A replayed heartbeat does not keep the session alive.
    for _ in 0..20 {
        sim.run_ms(100);
        let _ = sim.raw(c.addr, &heartbeat);
    }
    assert_eq!(sim.engine.live_sessions(), 0);
    // Far-behind seqs are refused too.
    let mut c2 = Client::new(2);
    sim.hello(&mut c2, TTL);
    c2.seq = 100;
    sim.send(&mut c2, Message::Heartbeat).unwrap();
    c2.seq = 30;
    assert_eq!(
        sim.send(&mut c2, Message::Heartbeat).unwrap_err(),
        Dropped::Replay(ReplayError::TooOld)
    );
}

#[test]
fn malformed_and_wrong_direction_are_dropped_silently() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    let before = sim.engine.stats().dropped_malformed;
    let mut bytes = sim.encode(&mut c, Flags::empty(), Message::Heartbeat);
    bytes[0] = b'X';
    assert!(matches!(
        sim.raw(c.addr, &bytes),
        Err(Dropped::Malformed(wire::Error::BadMagic))
    ));
    let welcome = sim.encode(
        &mut c,
        Flags::empty(),
        Message::Welcome {
            ttl_ms: 1,
            tick_ms: 1,
        },
    );
    assert_eq!(
        sim.raw(c.addr, &welcome).unwrap_err(),
        Dropped::WrongDirection
    );
    assert_eq!(
        sim.raw(c.addr, &[0u8; 1201]).unwrap_err(),
        Dropped::TooLarge
    );
    assert_eq!(sim.engine.stats().dropped_malformed, before + 2);
    assert_eq!(sim.engine.stats().dropped_too_large, 1);
    // None of it touched the session's replay window: the next seq works.
    assert!(sim.send(&mut c, Message::Heartbeat).is_ok());
}

#[test]
fn keyed_engine_drops_unauthenticated_and_signs_replies() {
    let mut cfg = config();
    cfg.key = Some(test_key());
    let mut sim = Sim::new(cfg);
    let mut c = Client::new(1);
    let welcome = sim.hello(&mut c, TTL);
    let d = welcome.datagram(Some(&test_key()));
    assert!(d.header.flags.contains(Flags::MAC));
    // Unsigned, and signed with another key: dropped, no reply, even for
    // an unknown session.
    let mut stranger = Client::new(99);
    sim.key = None;
    let unsigned = sim.encode(&mut stranger, Flags::empty(), Message::Heartbeat);
    sim.key = Some(MacKey::new(&[1; 32]).unwrap());
    let wrong = sim.encode(&mut stranger, Flags::empty(), Message::Heartbeat);
    let wrong_hello = sim.encode(
        &mut c,
        Flags::empty(),
        Message::Hello {
            ttl_ms: 0,
            name: "",
        },
    );
    sim.key = Some(test_key());
    assert!(matches!(
        sim.raw(stranger.addr, &unsigned),
        Err(Dropped::Auth(_))
    ));
    assert!(matches!(
        sim.raw(stranger.addr, &wrong),
        Err(Dropped::Auth(_))
    ));
    assert!(matches!(
        sim.raw(c.addr, &wrong_hello),
        Err(Dropped::Auth(_))
    ));
    assert_eq!(sim.engine.stats().dropped_bad_mac, 3);
    // A signed datagram for an unknown session is answered, signed.
    let reply = sim.ask(&mut stranger, Message::Heartbeat);
    assert_eq!(
        reply.datagram(Some(&test_key())).message,
        Message::UnknownSession
    );
    assert_eq!(reply.bytes.len(), 28 + 16);
}

#[test]
fn ended_clients_are_remembered_for_ten_minutes_then_forgotten() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(5);
    sim.hello(&mut c, TTL);
    sim.send(&mut c, Message::Bye).unwrap();
    sim.run_ms(599_000);
    let mut same = c.clone();
    assert_eq!(
        sim.send(
            &mut same,
            Message::Hello {
                ttl_ms: 0,
                name: ""
            }
        )
        .unwrap_err(),
        Dropped::StaleHello
    );
    sim.run_ms(2_000);
    assert_eq!(sim.engine.records.len(), 0);
    assert_eq!(sim.engine.records.largest_ended(5), None);
}

#[test]
fn client_records_are_bounded_oldest_first() {
    let mut cfg = config();
    cfg.max_client_records = 3;
    let mut sim = Sim::new(cfg);
    for id in 1..=5 {
        let mut c = Client::new(id);
        sim.hello(&mut c, TTL);
        sim.send(&mut c, Message::Bye).unwrap();
    }
    assert_eq!(sim.engine.records.len(), 3);
    assert_eq!(sim.engine.records.largest_ended(1), None);
    assert!(sim.engine.records.largest_ended(5).is_some());
}

#[test]
fn poll_timeout_is_none_when_idle() {
    let mut sim = Sim::new(config());
    assert_eq!(sim.engine.poll_timeout(), None);
    let mut c = Client::new(1);
    sim.hello(&mut c, 1000);
    assert_eq!(
        sim.engine.poll_timeout(),
        Some(Timestamp::from_millis(1000))
    );
    sim.send(&mut c, Message::Bye).unwrap();
    assert_eq!(sim.engine.poll_timeout(), None);
}

#[test]
fn address_follows_the_last_datagram() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, TTL);
    c.addr = "[::1]:5000".parse().unwrap();
    let reply = sim.ask(&mut c, Message::Status { task_id: 1 });
    assert_eq!(reply.to, c.addr);
}

#[test]
fn a_stall_expires_nobody_whose_datagrams_are_read_before_the_decision() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 1000);
    sim.run_ms(900);
    sim.send(&mut c, Message::Heartbeat).unwrap();
    // The caller stalls for five seconds; a heartbeat the client sent at
    // 1.8 s sits in the socket. The caller takes the decision instant,
    // reads what is queued (stamped at read time), then decides.
    let decided_at = Timestamp::from_millis(5_900);
    sim.now = decided_at;
    sim.send(&mut c, Message::Heartbeat).unwrap();
    sim.engine.handle_timeout(decided_at);
    assert_eq!(sim.engine.live_sessions(), 1);
    // Deciding for an instant before a datagram's stamp uses that instant,
    // not the later stamp: a datagram read later cannot make time pass.
    let mut d = Client::new(2);
    sim.hello(&mut d, 1000);
    sim.now = sim.now.plus_millis(990);
    sim.send(&mut c, Message::Heartbeat).unwrap();
    sim.engine.handle_timeout(Timestamp(sim.now.0 - 500_000));
    assert_eq!(sim.engine.live_sessions(), 2, "d expired by a later stamp");
    sim.run_ms(20);
    assert_eq!(sim.engine.live_sessions(), 1);
}

/// The per-session budget is 128 bytes of server memory; these are the
/// parts that scale with sessions (see BENCHMARKS.md for the measured RSS).
#[test]
fn per_session_structures_stay_compact() {
    // The slab's entry type is private; this is its shape.
    #[allow(dead_code)]
    enum SlabEntry {
        Vacant(usize),
        Occupied(Session),
    }
    assert_eq!(std::mem::size_of::<Session>(), 64);
    assert_eq!(
        std::mem::size_of::<SlabEntry>(),
        64,
        "the slab tag must fit a niche"
    );
    assert_eq!(
        std::mem::align_of::<SlabEntry>(),
        64,
        "a session must sit in one cache line, not straddle two"
    );
    assert_eq!(std::mem::size_of::<ReplayWindow>(), 12);
}

#[test]
fn a_batch_is_handled_exactly_as_one_datagram_at_a_time() {
    // The same traffic, one engine fed datagram by datagram and the other
    // in batches: identical replies, effects and counters.
    let mut one = Sim::new(config());
    let mut many = Sim::new(config());
    let mut clients: Vec<Client> = (1..=40).map(Client::new).collect();
    let mut traffic: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    for c in clients.iter_mut() {
        let hello = one.encode(
            c,
            Flags::empty(),
            Message::Hello {
                ttl_ms: 0,
                name: "",
            },
        );
        traffic.push((c.addr, hello));
    }
    for round in 0..3u32 {
        for c in clients.iter_mut() {
            let message = match (c.id + u64::from(round)) % 4 {
                0 => Message::Heartbeat,
                1 => Message::Status { task_id: 5 },
                2 => Message::Submit {
                    request_id: round,
                    delay_ms: 0,
                    deadline_ms: 0,
                    job: "echo",
                    payload: b"x",
                },
                _ => Message::Bye,
            };
            let bytes = one.encode(c, Flags::ACK, message);
            traffic.push((c.addr, bytes.clone()));
            // A replay and some junk in the middle of the batch.
            traffic.push((c.addr, bytes));
            traffic.push((c.addr, vec![0x54, 0x48, 1]));
        }
    }
    for (from, bytes) in &traffic {
        let _ = one.engine.handle_datagram(one.now, *from, bytes);
    }
    for chunk in traffic.chunks(64) {
        let now = many.now;
        many.engine
            .handle_datagrams(now, chunk.iter().map(|(a, b)| (*a, b.as_slice(), None)));
    }
    let replies = |sim: &mut Sim| -> Vec<(SocketAddr, Vec<u8>)> {
        sim.replies().into_iter().map(|r| (r.to, r.bytes)).collect()
    };
    assert_eq!(replies(&mut one), replies(&mut many));
    assert_eq!(one.effects(), many.effects());
    assert_eq!(one.engine.stats(), many.engine.stats());
    assert!(one.engine.stats().dropped_replay > 0);
}

/// Sends `message` from `c`, arrived at `arrived` but read now.
fn arrive_late(
    sim: &mut Sim,
    c: &mut Client,
    arrived: Timestamp,
    message: Message<'_>,
) -> Vec<Reply> {
    let bytes = sim.encode(c, Flags::empty(), message);
    sim.engine
        .handle_arrival(sim.now, arrived, c.addr, &bytes)
        .expect("not dropped");
    sim.replies()
}

#[test]
fn a_datagram_that_arrived_after_the_ttl_ran_out_finds_the_session_expired() {
    // The server was stopped: the client's TTL ran out at 1 s, its next
    // heartbeat arrived at 2 s, and the server reads it at 3 s, before it
    // has decided any expiry. It must not revive the session.
    let mut sim = Sim::new(config());
    let mut c = Client::new(1);
    sim.hello(&mut c, 1000);
    let task = accepted_task(&sim.submit(&mut c, 1, "sleep", &[0; 4]));
    sim.effects();
    sim.event(task, TaskEvent::Started);
    sim.now = Timestamp::from_millis(3000);
    let replies = arrive_late(
        &mut sim,
        &mut c,
        Timestamp::from_millis(2000),
        Message::Heartbeat,
    );
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].message(), Message::UnknownSession);
    assert_eq!(sim.engine.stats().sessions_expired, 1);
    assert_eq!(sim.engine.live_sessions(), 0);
    assert_eq!(
        sim.effects(),
        vec![Effect::Cancel {
            task,
            reason: CancelReason::Expired
        }]
    );
    // And a HELLO of that session, arriving as late, is stale now.
    let mut again = c.clone();
    let hello = sim.encode(
        &mut again,
        Flags::empty(),
        Message::Hello {
            ttl_ms: 1000,
            name: "t",
        },
    );
    assert_eq!(
        sim.engine
            .handle_arrival(sim.now, Timestamp::from_millis(2500), again.addr, &hello),
        Err(Dropped::StaleHello)
    );
}

#[test]
fn datagrams_that_arrived_in_time_keep_the_session_however_late_they_are_read() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(2);
    sim.hello(&mut c, 1000);
    // Heartbeats every 300 ms while the server is stopped for 2.5 s; it
    // then reads them all at 2.5 s, before deciding expiry.
    sim.now = Timestamp::from_millis(2500);
    for at in [300, 600, 900, 1200, 1500, 1800, 2100] {
        let replies = arrive_late(
            &mut sim,
            &mut c,
            Timestamp::from_millis(at),
            Message::Heartbeat,
        );
        assert!(
            replies.is_empty(),
            "heartbeat of {at} ms answered {replies:?}"
        );
    }
    sim.engine.handle_timeout(sim.now);
    assert_eq!(sim.engine.live_sessions(), 1);
    assert_eq!(sim.engine.stats().sessions_expired, 0);
    // The deadline counts from the last arrival (2.1 s), not the read
    // (2.5 s).
    sim.run_until(Timestamp::from_millis(3090));
    assert_eq!(sim.engine.live_sessions(), 1);
    sim.run_until(Timestamp::from_millis(3110));
    assert_eq!(sim.engine.live_sessions(), 0);
}

#[test]
fn a_batch_handled_out_of_arrival_order_never_moves_a_deadline_back() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(3);
    sim.hello(&mut c, 1000);
    sim.now = Timestamp::from_millis(900);
    arrive_late(
        &mut sim,
        &mut c,
        Timestamp::from_millis(800),
        Message::Heartbeat,
    );
    // An older datagram of the same batch, read after it.
    arrive_late(
        &mut sim,
        &mut c,
        Timestamp::from_millis(100),
        Message::Heartbeat,
    );
    sim.run_until(Timestamp::from_millis(1790));
    assert_eq!(
        sim.engine.live_sessions(),
        1,
        "expired by the older arrival"
    );
    sim.run_until(Timestamp::from_millis(1810));
    assert_eq!(sim.engine.live_sessions(), 0);
}

#[test]
fn a_datagram_is_late_from_the_first_microsecond_of_its_deadline_tick() {
    // TTL 1 s from a HELLO at 5 ms: the deadline is 1.005 s, rounded up to
    // the 10 ms tick that begins at 1.010 s.
    for (arrived_us, kept) in [(1_009_999, true), (1_010_000, false)] {
        let mut sim = Sim::new(config());
        let mut c = Client::new(4);
        sim.now = Timestamp::from_millis(5);
        sim.hello(&mut c, 1000);
        sim.now = Timestamp::from_millis(1_500);
        let replies = arrive_late(&mut sim, &mut c, Timestamp(arrived_us), Message::Heartbeat);
        assert_eq!(
            sim.engine.live_sessions(),
            usize::from(kept),
            "arrived at {arrived_us} us"
        );
        assert_eq!(
            replies.is_empty(),
            kept,
            "arrived at {arrived_us} us: {replies:?}"
        );
    }
}

#[test]
fn a_newer_incarnation_arriving_after_the_deadline_finds_the_old_session_expired() {
    let mut sim = Sim::new(config());
    let mut c = Client::new(5);
    sim.hello(&mut c, 1000);
    let task = accepted_task(&sim.submit(&mut c, 1, "sleep", &[0; 4]));
    sim.effects();
    sim.event(task, TaskEvent::Started);
    sim.now = Timestamp::from_millis(3000);
    let mut next = c.next_incarnation();
    let replies = arrive_late(
        &mut sim,
        &mut next,
        Timestamp::from_millis(2000),
        Message::Hello {
            ttl_ms: 1000,
            name: "t",
        },
    );
    assert!(matches!(replies[0].message(), Message::Welcome { .. }));
    assert_eq!(sim.engine.stats().sessions_expired, 1);
    assert_eq!(sim.engine.stats().sessions_replaced, 0);
    assert_eq!(
        sim.effects(),
        vec![Effect::Cancel {
            task,
            reason: CancelReason::Expired
        }]
    );
}

/// Steps the clock a millisecond at a time until no session is live;
/// returns when that happened.
fn expiry_instant(sim: &mut Sim) -> Timestamp {
    for _ in 0..100_000 {
        if sim.engine.live_sessions() == 0 {
            return sim.now;
        }
        sim.run_ms(1);
    }
    panic!("still live at {:?}", sim.now);
}

/// A session of `ttl_ms` opened at 0 whose last heartbeat arrived at
/// `arrived` and was read at `read`, with its stamp or without: when it
/// expires.
fn expiry_after_heartbeat(ttl_ms: u32, arrived: u64, read: u64, stamped: bool) -> Timestamp {
    let mut sim = Sim::new(config());
    let mut c = Client::new(9);
    sim.hello(&mut c, ttl_ms);
    sim.run_until(Timestamp(read));
    let bytes = sim.encode(&mut c, Flags::empty(), Message::Heartbeat);
    let handled = if stamped {
        sim.engine
            .handle_arrival(sim.now, Timestamp(arrived), c.addr, &bytes)
    } else {
        sim.engine.handle_datagram(sim.now, c.addr, &bytes)
    };
    handled.expect("not dropped");
    expiry_instant(&mut sim)
}

#[test]
fn an_arrival_stamp_moves_no_deadline_unless_the_engine_says_it_can() {
    // TTLs of whole ticks (10 ms): within a window holding no tick boundary
    // the stamp is redundant, and the engine says so; across one it is not.
    let sim = {
        let mut sim = Sim::new(config());
        sim.hello(&mut Client::new(1), 3000);
        sim
    };
    let t = |us| Timestamp(us);
    for (earliest, latest) in [
        (1_000_001, 1_010_000),
        (1_012_000, 1_015_500),
        (1_020_000, 1_020_000),
    ] {
        assert!(!sim
            .engine
            .arrival_can_move_deadlines(t(earliest), t(latest)));
        let by_reading = expiry_after_heartbeat(3000, earliest, latest, false);
        for arrived in [earliest, (earliest + latest) / 2, latest] {
            assert_eq!(
                expiry_after_heartbeat(3000, arrived, latest, true),
                by_reading,
                "arrived {arrived} µs, read {latest} µs"
            );
        }
    }
    // A tick begins at 1.01 s: an arrival just before it expires a tick
    // earlier than its reading would say.
    let (earliest, latest) = (1_009_000, 1_011_000);
    assert!(sim
        .engine
        .arrival_can_move_deadlines(t(earliest), t(latest)));
    assert!(
        expiry_after_heartbeat(3000, earliest, latest, true)
            < expiry_after_heartbeat(3000, earliest, latest, false)
    );
}

#[test]
fn a_session_whose_ttl_is_not_whole_ticks_makes_every_wait_need_stamps_while_it_lives() {
    let mut sim = Sim::new(config());
    let (earliest, latest) = (Timestamp(1_001_000), Timestamp(1_002_000));
    let mut whole = Client::new(1);
    sim.hello(&mut whole, 3000);
    assert!(!sim.engine.arrival_can_move_deadlines(earliest, latest));
    // 3005 ms: the instants whose arrival rounds differently sit 5 ms into
    // each tick, so no window is safe.
    let mut odd = Client::new(2);
    sim.hello(&mut odd, 3005);
    assert!(sim.engine.arrival_can_move_deadlines(earliest, latest));
    assert!(
        expiry_after_heartbeat(3005, 1_004_000, 1_006_000, true)
            < expiry_after_heartbeat(3005, 1_004_000, 1_006_000, false)
    );
    let reply = sim.ask(&mut odd, Message::Bye);
    assert_eq!(reply.message(), Message::ByeAck);
    assert!(!sim.engine.arrival_can_move_deadlines(earliest, latest));
    // Expiry ends it as well as BYE does.
    let mut odd = Client::new(3);
    sim.hello(&mut odd, 1005);
    assert!(sim.engine.arrival_can_move_deadlines(earliest, latest));
    sim.run_ms(2000);
    assert_eq!(sim.engine.stats().sessions_expired, 1);
    assert_eq!(sim.engine.live_sessions(), 1);
    assert!(!sim.engine.arrival_can_move_deadlines(earliest, latest));
    // And so does a new incarnation replacing it, whatever its own TTL.
    let odd = Client::new(4);
    sim.hello(&mut odd.clone(), 1005);
    assert!(sim.engine.arrival_can_move_deadlines(earliest, latest));
    sim.hello(&mut odd.next_incarnation(), 3000);
    assert_eq!(sim.engine.stats().sessions_replaced, 1);
    assert!(!sim.engine.arrival_can_move_deadlines(earliest, latest));
}
