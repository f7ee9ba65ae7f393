//! Traffic from strangers: the amplification limit and shedding under a
//! flood.
use super::*;

fn limited() -> Config {
    Config {
        amplification_limit: true,
        ..config()
    }
}

#[test]
fn amplification_limit_holds_an_empty_name_hello_until_its_retry() {
    let mut sim = Sim::new(limited());
    let mut c = Client::new(1);
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "",
    };
    // 33 bytes cannot pay for a 36-byte WELCOME, but the session is open.
    assert!(sim.send(&mut c, hello).unwrap().is_empty());
    assert_eq!(sim.engine.stats().replies_unpaid, 1);
    assert_eq!(sim.engine.live_sessions(), 1);
    // The retry (a new datagram) brings 33 more: now it is answered.
    let welcome = sim.ask(&mut c, hello);
    assert_eq!(welcome.bytes.len(), 36);
    assert!(matches!(welcome.message(), Message::Welcome { .. }));
    // A three-byte name pays for its own WELCOME at once.
    let mut d = Client::new(2);
    let welcome = sim.ask(
        &mut d,
        Message::Hello {
            ttl_ms: 0,
            name: "abc",
        },
    );
    assert!(matches!(welcome.message(), Message::Welcome { .. }));
}

#[test]
fn amplification_limit_pays_acks_from_what_the_client_sent() {
    let mut sim = Sim::new(limited());
    let mut c = Client::new(1);
    sim.ask(
        &mut c,
        Message::Hello {
            ttl_ms: 0,
            name: "abcd",
        },
    );
    // 37 in, 36 out: 1 byte banked. Eight ACK'd heartbeats bring 224 bytes
    // and would cost 256: one of them goes unanswered.
    let mut acks = 0;
    for _ in 0..8 {
        acks += sim
            .send_flags(&mut c, Flags::ACK, Message::Heartbeat)
            .unwrap()
            .len();
    }
    assert_eq!(acks, 7);
    // Plain heartbeats bank credit, and then every ACK is paid for.
    for _ in 0..4 {
        assert!(sim.send(&mut c, Message::Heartbeat).unwrap().is_empty());
    }
    for _ in 0..8 {
        assert_eq!(
            sim.send_flags(&mut c, Flags::ACK, Message::Heartbeat)
                .unwrap()
                .len(),
            1
        );
    }
}

#[test]
fn keyed_engines_and_engines_without_the_limit_answer_every_hello() {
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "",
    };
    let mut open = Sim::new(config());
    open.ask(&mut Client::new(1), hello);
    let mut keyed = Sim::new(Config {
        key: Some(test_key()),
        ..limited()
    });
    // Keyed, every reply answers an authenticated datagram.
    keyed.ask(&mut Client::new(1), hello);
    assert_eq!(keyed.engine.stats().replies_unpaid, 0);
}

#[test]
fn a_backlogged_engine_sheds_only_answers_to_strangers() {
    let mut cfg = config();
    cfg.max_sessions = 1;
    let mut sim = Sim::new(cfg);
    let mut member = Client::new(1);
    sim.hello(&mut member, 0);
    sim.engine.set_backlogged(true);
    // A stranger's HEARTBEAT and a HELLO past the limit: no answer, counted.
    let mut stranger = Client::new(2);
    assert!(sim
        .send(&mut stranger, Message::Heartbeat)
        .unwrap()
        .is_empty());
    assert!(sim
        .send(
            &mut stranger,
            Message::Hello {
                ttl_ms: 0,
                name: ""
            }
        )
        .unwrap()
        .is_empty());
    assert_eq!(sim.engine.stats().replies_shed, 2);
    assert_eq!(sim.engine.stats().sessions_refused, 1);
    assert_eq!(sim.engine.stats().unknown_session, 1);
    // A live session is still answered in full.
    let ack = sim
        .send_flags(&mut member, Flags::ACK, Message::Heartbeat)
        .unwrap();
    assert!(matches!(ack[0].message(), Message::HeartbeatAck { .. }));
    assert!(matches!(
        sim.submit(&mut member, 1, "echo", b"x").message(),
        Message::Accepted { .. }
    ));
    // A HELLO with room opens its session but is not welcomed until its
    // retry, which comes from a member and is answered even now.
    sim.engine.config.max_sessions = 2;
    let mut newcomer = Client::new(3);
    let hello = Message::Hello {
        ttl_ms: 0,
        name: "",
    };
    assert!(sim.send(&mut newcomer, hello).unwrap().is_empty());
    assert_eq!(sim.engine.live_sessions(), 2);
    assert_eq!(sim.engine.stats().replies_shed, 3);
    let welcome = sim.ask(&mut newcomer, hello);
    assert!(matches!(welcome.message(), Message::Welcome { .. }));
    // Once the socket is drained, strangers hear back again.
    sim.engine.set_backlogged(false);
    let reply = sim.ask(&mut stranger, Message::Heartbeat);
    assert_eq!(reply.message(), Message::UnknownSession);
    let reply = sim.ask(
        &mut stranger,
        Message::Hello {
            ttl_ms: 0,
            name: "",
        },
    );
    assert_eq!(rejected_code(&reply), RejectCode::TooManySessions);
}

mod amplification {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[derive(Debug, Clone)]
    enum Step {
        Hello {
            client: u8,
            name_len: usize,
        },
        Heartbeat {
            client: u8,
            ack: bool,
        },
        Submit {
            client: u8,
            request_id: u32,
            payload_len: usize,
        },
        Cancel {
            client: u8,
            task: u8,
        },
        Status {
            client: u8,
            task: u8,
        },
        Bye {
            client: u8,
        },
        Junk {
            from: u8,
            len: usize,
        },
        Finish {
            result_len: usize,
        },
        Wait {
            ms: u64,
        },
        Move {
            client: u8,
            to: u8,
        },
        NewIncarnation {
            client: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        let client = 0u8..4;
        prop_oneof![
            (client.clone(), 0usize..6)
                .prop_map(|(client, name_len)| Step::Hello { client, name_len }),
            (client.clone(), any::<bool>())
                .prop_map(|(client, ack)| Step::Heartbeat { client, ack }),
            (client.clone(), 0u32..6, 0usize..1024).prop_map(
                |(client, request_id, payload_len)| {
                    Step::Submit {
                        client,
                        request_id,
                        payload_len,
                    }
                }
            ),
            (client.clone(), any::<u8>()).prop_map(|(client, task)| Step::Cancel { client, task }),
            (client.clone(), any::<u8>()).prop_map(|(client, task)| Step::Status { client, task }),
            client.clone().prop_map(|client| Step::Bye { client }),
            (0u8..6, 0usize..1300).prop_map(|(from, len)| Step::Junk { from, len }),
            (0usize..1200).prop_map(|result_len| Step::Finish { result_len }),
            (0u64..5000).prop_map(|ms| Step::Wait { ms }),
            (client.clone(), 0u8..6).prop_map(|(client, to)| Step::Move { client, to }),
            client.prop_map(|client| Step::NewIncarnation { client }),
        ]
    }

    fn address(n: u8) -> SocketAddr {
        // Two hosts, three ports each: addresses on one host never share.
        format!("127.0.0.{}:{}", 1 + n % 2, 7000 + u16::from(n))
            .parse()
            .unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        /// Whatever keyless clients do, from whichever addresses, with
        /// tasks finishing and pushing their states whenever: no address is
        /// ever sent more bytes than arrived from it.
        #[test]
        fn no_address_is_sent_more_than_it_sent(steps in proptest::collection::vec(step(), 1..300)) {
            let mut sim = Sim::new(limited());
            let mut clients: Vec<Client> = (1..=4).map(Client::new).collect();
            let mut received: HashMap<SocketAddr, usize> = HashMap::new();
            let mut sent: HashMap<SocketAddr, usize> = HashMap::new();
            let mut running: Vec<TaskId> = Vec::new();
            let payload = vec![7u8; 1024];
            let name = "abcdef";
            for step in steps {
                let mut datagram = |sim: &mut Sim, c: usize, flags: Flags, m: Message<'_>| {
                    let bytes = sim.encode(&mut clients[c], flags, m);
                    (clients[c].addr, bytes)
                };
                let input = match step {
                    Step::Hello { client, name_len } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Hello { ttl_ms: 0, name: &name[..name_len] })),
                    Step::Heartbeat { client, ack } => Some(datagram(&mut sim, client.into(), if ack { Flags::ACK } else { Flags::empty() }, Message::Heartbeat)),
                    Step::Submit { client, request_id, payload_len } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Submit { request_id, delay_ms: 0, deadline_ms: 0, job: "echo", payload: &payload[..payload_len] })),
                    Step::Cancel { client, task } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Cancel { task_id: u64::from(task) })),
                    Step::Status { client, task } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Status { task_id: u64::from(task) })),
                    Step::Bye { client } => Some(datagram(&mut sim, client.into(), Flags::empty(), Message::Bye)),
                    Step::Junk { from, len } => Some((address(from), vec![0x54; len])),
                    Step::Finish { result_len } => {
                        if let Some(task) = running.pop() {
                            sim.engine.handle_task_event(sim.now, task, TaskEvent::Finished(JobOutcome::Done(vec![1; result_len])));
                        }
                        None
                    }
                    Step::Wait { ms } => {
                        sim.run_ms(ms);
                        None
                    }
                    Step::Move { client, to } => {
                        clients[usize::from(client)].addr = address(to);
                        None
                    }
                    Step::NewIncarnation { client } => {
                        let c = &mut clients[usize::from(client)];
                        *c = c.next_incarnation();
                        None
                    }
                };
                if let Some((from, bytes)) = input {
                    *received.entry(from).or_default() += bytes.len();
                    let _ = sim.engine.handle_datagram(sim.now, from, &bytes);
                }
                for effect in sim.effects() {
                    if let Effect::Run { task, .. } = effect {
                        sim.engine.handle_task_event(sim.now, task, TaskEvent::Started);
                        running.push(task);
                    }
                }
                for reply in sim.replies() {
                    *sent.entry(reply.to).or_default() += reply.bytes.len();
                    let got = received.get(&reply.to).copied().unwrap_or(0);
                    prop_assert!(sent[&reply.to] <= got, "{} sent {} bytes, was sent {got}", reply.to, sent[&reply.to]);
                }
            }
        }
    }
}
