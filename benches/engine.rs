//! The engine without sockets: a heartbeat's whole path (bytes in →
//! decoded → session found → replay checked → deadline moved) at 1K, 100K
//! and 1M sessions, and 100K sessions expiring in the same tick with a
//! running task each (flags flipped, TASK_STATE encoded), in index order
//! and scattered over a million.

use std::collections::HashMap;
use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};

use tether::engine::{Config, Effect, Engine, JobOutcome, TaskEvent, TaskId, Timestamp};
use tether::pool::{CancelFlag, Registry};
use tether::wire::{Datagram, Flags, MacKey, Message, MAX_DATAGRAM};

mod common;
use common::{shuffle, xorshift};

const INCARNATION: u64 = 1_700_000_000_000_000_000;

fn addr(i: u32) -> SocketAddr {
    SocketAddr::from((
        [127, 0, (i >> 8) as u8, i as u8],
        10_000 + (i % 50_000) as u16,
    ))
}

fn datagram(client_id: u64, seq: u32, message: Message<'_>) -> Vec<u8> {
    signed(None, client_id, seq, message)
}

fn signed(key: Option<&MacKey>, client_id: u64, seq: u32, message: Message<'_>) -> Vec<u8> {
    Datagram::new(Flags::empty(), client_id, INCARNATION, seq, message)
        .to_vec(key)
        .unwrap()
}

fn bench_key() -> MacKey {
    MacKey::new(&[0x5a; 32]).unwrap()
}

fn engine_with_sessions(n: u32, ttl_ms: u32) -> Engine {
    engine_with(n, ttl_ms, None)
}

fn engine_with(n: u32, ttl_ms: u32, key: Option<MacKey>) -> Engine {
    let mut config = Config::default();
    config.key = key.clone();
    config.max_sessions = n as usize;
    config.max_client_records = n as usize;
    config.max_waiting_tasks = n as usize;
    config.max_finished_tasks = n as usize;
    config.jobs = Registry::with_standard_jobs().table();
    let mut engine = Engine::new(config, Timestamp(0)).expect("valid config");
    open_sessions(&mut engine, key.as_ref(), 1, n, ttl_ms);
    engine
}

/// Opens `n` sessions at 0: client `first_id + i` from `addr(i)`.
fn open_sessions(engine: &mut Engine, key: Option<&MacKey>, first_id: u64, n: u32, ttl_ms: u32) {
    let mut buf = [0u8; MAX_DATAGRAM];
    for i in 0..n {
        let hello = signed(
            key,
            first_id + u64::from(i),
            1,
            Message::Hello { ttl_ms, name: "" },
        );
        engine
            .handle_datagram(Timestamp(0), addr(i), &hello)
            .unwrap();
        while engine.poll_transmit(&mut buf).is_some() {}
    }
}

fn heartbeat_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_heartbeat");
    g.throughput(Throughput::Elements(1));
    for n in [1_000u32, 100_000, 1_000_000] {
        let mut engine = engine_with_sessions(n, 3000);
        let mut seqs = vec![1u32; n as usize];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut now = Timestamp(0);
        // One 28-byte HEARTBEAT whose id and seq are rewritten per call: a
        // random session each time, with its next seq (the replay window
        // refuses anything else). The rewrite is three stores.
        let mut bytes = datagram(1, 2, Message::Heartbeat);
        g.bench_with_input(BenchmarkId::new("keyless", n), &n, |b, &n| {
            b.iter(|| {
                let i = (xorshift(&mut rng) % u64::from(n)) as usize;
                seqs[i] += 1;
                bytes[8..16].copy_from_slice(&(i as u64 + 1).to_be_bytes());
                bytes[24..28].copy_from_slice(&seqs[i].to_be_bytes());
                now.0 += 1;
                engine
                    .handle_datagram(now, addr(i as u32), black_box(&bytes))
                    .unwrap();
            })
        });
        assert_eq!(engine.live_sessions(), n as usize);
        assert_eq!(engine.stats().dropped_replay, 0);
    }
    g.finish();

    // As the server calls it: a batch of 64 (one recvmmsg) at a time.
    let mut g = c.benchmark_group("engine_heartbeat_batch64");
    g.throughput(Throughput::Elements(64));
    for n in [1_000u32, 100_000, 1_000_000] {
        let mut engine = engine_with_sessions(n, 3000);
        let mut seqs = vec![1u32; n as usize];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut now = Timestamp(0);
        let template = datagram(1, 2, Message::Heartbeat);
        let mut batch: Vec<(SocketAddr, Vec<u8>)> =
            (0..64).map(|_| (addr(0), template.clone())).collect();
        g.bench_with_input(BenchmarkId::new("keyless", n), &n, |b, &n| {
            b.iter(|| {
                for (from, bytes) in batch.iter_mut() {
                    let i = (xorshift(&mut rng) % u64::from(n)) as usize;
                    seqs[i] += 1;
                    bytes[8..16].copy_from_slice(&(i as u64 + 1).to_be_bytes());
                    bytes[24..28].copy_from_slice(&seqs[i].to_be_bytes());
                    *from = addr(i as u32);
                }
                now.0 += 1;
                engine.handle_datagrams(now, batch.iter().map(|(a, b)| (*a, b.as_slice(), None)));
            })
        });
        assert_eq!(engine.stats().dropped_replay, 0);
        assert_eq!(
            engine.stats().heartbeats,
            engine.stats().accepted - u64::from(n)
        );

        // Keyed: every datagram carries its HMAC-SHA256 tag, checked before
        // anything else. The tags are made (the clients' work) outside the
        // timed part: each sample's datagrams are signed before its clock
        // starts.
        let key = bench_key();
        let mut engine = engine_with(n, 3000, Some(key.clone()));
        let mut seqs = vec![1u32; n as usize];
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut now = Timestamp(0);
        g.bench_with_input(BenchmarkId::new("keyed", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                let batches: Vec<Vec<(SocketAddr, Vec<u8>)>> = (0..iters)
                    .map(|_| {
                        (0..64)
                            .map(|_| {
                                let i = (xorshift(&mut rng) % u64::from(n)) as usize;
                                seqs[i] += 1;
                                let bytes =
                                    signed(Some(&key), i as u64 + 1, seqs[i], Message::Heartbeat);
                                (addr(i as u32), bytes)
                            })
                            .collect()
                    })
                    .collect();
                let start = std::time::Instant::now();
                for batch in &batches {
                    now.0 += 1;
                    engine
                        .handle_datagrams(now, batch.iter().map(|(a, b)| (*a, b.as_slice(), None)));
                }
                start.elapsed()
            })
        });
        assert_eq!(engine.stats().dropped_replay, 0);
        assert_eq!(engine.stats().dropped_bad_mac, 0);
    }
    g.finish();
}

/// Gives each client `i` in `clients` (client id `first_id + i`) a running
/// `sleep` task (submitted at `at`), and returns their cancel flags.
fn run_a_task_each(
    engine: &mut Engine,
    first_id: u64,
    clients: &[u32],
    at: Timestamp,
    seq: u32,
) -> HashMap<TaskId, Arc<CancelFlag>> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut flags = HashMap::with_capacity(clients.len());
    for &i in clients {
        let submit = datagram(
            first_id + u64::from(i),
            seq,
            Message::Submit {
                request_id: 1,
                delay_ms: 0,
                deadline_ms: 0,
                job: "sleep",
                payload: &60_000u32.to_be_bytes(),
            },
        );
        engine.handle_datagram(at, addr(i), &submit).unwrap();
        while engine.poll_transmit(&mut buf).is_some() {}
    }
    while let Some(effect) = engine.poll_effect() {
        if let Effect::Run { task, .. } = effect {
            flags.insert(task, Arc::new(CancelFlag::new()));
            engine.handle_task_event(at, task, TaskEvent::Started);
        }
    }
    flags
}

/// The timed part: the tick at `expiry` expires `expected` sessions; every
/// flag is flipped, every worker's report taken, every TASK_STATE encoded.
fn expire_and_report(
    engine: &mut Engine,
    flags: &HashMap<TaskId, Arc<CancelFlag>>,
    cancelled: &mut Vec<TaskId>,
    expiry: Timestamp,
    expected: usize,
) {
    let live_before = engine.live_sessions();
    engine.handle_timeout(expiry);
    while let Some(effect) = engine.poll_effect() {
        if let Effect::Cancel { task, reason } = effect {
            flags[&task].cancel(reason);
            cancelled.push(task);
        }
    }
    for &task in cancelled.iter() {
        let outcome = JobOutcome::Failed("cancelled".into());
        engine.handle_task_event(expiry, task, TaskEvent::Finished(outcome));
    }
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut sent = 0;
    while engine.poll_transmit(&mut buf).is_some() {
        sent += 1;
    }
    assert_eq!(sent, expected);
    assert_eq!(engine.live_sessions(), live_before - expected);
}

/// 100K sessions, each with a running `sleep` task, all expiring in one
/// tick: decide the expiries, flip every flag, take every worker's report,
/// and encode every TASK_STATE. `index_order`: the 100K sessions opened
/// one after the other and expiring in that order (the walk is sequential
/// and prefetches well); then a random tenth of a million sessions (about
/// 100K: the throughput counts 100K), as in the field, where the sessions
/// whose last heartbeat fell in one tick lie anywhere in the session table.
fn mass_expiry(c: &mut Criterion) {
    let mut g = c.benchmark_group("engine_mass_expiry");
    g.sample_size(10);
    let n = 100_000u32;
    g.throughput(Throughput::Elements(u64::from(n)));
    let in_order = || {
        let mut engine = engine_with_sessions(n, 3000);
        let everyone: Vec<u32> = (0..n).collect();
        let flags = run_a_task_each(&mut engine, 1, &everyone, Timestamp(0), 2);
        (engine, flags, Vec::with_capacity(n as usize))
    };
    g.bench_function(BenchmarkId::new("running_task_each/index_order", n), |b| {
        b.iter_batched(
            in_order,
            |(mut engine, flags, mut cancelled)| {
                let expiry = Timestamp::from_millis(3000);
                expire_and_report(&mut engine, &flags, &mut cancelled, expiry, n as usize);
                (engine, flags, cancelled)
            },
            BatchSize::LargeInput,
        )
    });

    // A million sessions open at 0 with a 3 s TTL; at 1 s each heartbeats
    // in one of ten ticks, drawn at random, so its deadline is 4 s plus 0
    // to 90 ms. Moving time to 3 s re-files every one (untimed); the next
    // due tick then expires the tenth that drew the first tick, scattered
    // over the table, a task running in each. Two layouts of that tenth:
    // `slab_order`, the sessions opened in slab order, so the wheel walks
    // them in slab order, ten slots apart on average (the hardware
    // prefetcher still sees a rising walk); `random_order`, the table first
    // filled and emptied in a random order (every session said BYE), so the
    // sessions opened next take its slots in that order and the walk jumps
    // anywhere, as in the field.
    let total = 10 * n;
    let tenth_of_a_million = |random_order: bool| {
        let mut engine = engine_with_sessions(total, 3000);
        let mut rng = 0x5ca7_7e4e_d5ee_d001u64;
        let mut first_id = 1;
        if random_order {
            let mut order: Vec<u32> = (0..total).collect();
            shuffle(&mut order, &mut rng);
            let mut buf = [0u8; MAX_DATAGRAM];
            for &i in &order {
                let bye = datagram(u64::from(i) + 1, 2, Message::Bye);
                engine.handle_datagram(Timestamp(0), addr(i), &bye).unwrap();
                while engine.poll_transmit(&mut buf).is_some() {}
            }
            first_id = u64::from(total) + 1;
            open_sessions(&mut engine, None, first_id, total, 3000);
            while engine.poll_effect().is_some() {}
            assert_eq!(engine.live_sessions(), total as usize);
        }
        let drawn: Vec<u64> = (0..total).map(|_| xorshift(&mut rng) % 10).collect();
        // Submitted first: a SUBMIT is proof of life too.
        let expiring: Vec<u32> = (0..total).filter(|&i| drawn[i as usize] == 0).collect();
        let flags = run_a_task_each(&mut engine, first_id, &expiring, Timestamp(0), 2);
        for tick in 0..10 {
            let at = Timestamp::from_millis(1000 + tick * 10);
            for i in (0..total).filter(|&i| drawn[i as usize] == tick) {
                let beat = datagram(first_id + u64::from(i), 3, Message::Heartbeat);
                engine.handle_datagram(at, addr(i), &beat).unwrap();
            }
        }
        engine.handle_timeout(Timestamp::from_millis(3000));
        assert_eq!(engine.live_sessions(), total as usize);
        let expiry = engine.poll_timeout().expect("sessions are due");
        let capacity = expiring.len();
        (
            engine,
            flags,
            Vec::with_capacity(capacity),
            capacity,
            expiry,
        )
    };
    for (name, random_order) in [("slab_order", false), ("random_order", true)] {
        let id = format!("running_task_each/tenth_of_1M_{name}");
        g.bench_function(BenchmarkId::new(id, n), |b| {
            b.iter_batched(
                || tenth_of_a_million(random_order),
                |(mut engine, flags, mut cancelled, expected, expiry)| {
                    expire_and_report(&mut engine, &flags, &mut cancelled, expiry, expected);
                    (engine, flags, cancelled)
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, heartbeat_path, mass_expiry);
criterion_main!(benches);
