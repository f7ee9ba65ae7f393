//! The engine's datagram input, driven by a script of operations decoded
//! from the fuzzer's bytes: raw datagrams, datagrams with a valid header
//! and a fuzzed body (so they get past framing), time advancing, and worker
//! reports. The engine must never panic, and its books must balance. The
//! first byte turns the amplification limit on (then no address may ever
//! be sent more bytes than it sent) and time steps toggle the backlog.
//! Work goes through the pool's real queue with two workers, and what the
//! engine and the queue hold never exceeds `Config::client_bound` for the
//! four client ids the script can use.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use tether::engine::{Config, Engine, Footprint, JobOutcome, TaskEvent, Timestamp};
use tether::pool::{Registry, WorkQueue};
use tether::wire::{MAX_DATAGRAM, MAX_PAYLOAD_LEN};

const WORKERS: usize = 2;
/// `op >> 5 | 1` names one of four client ids.
const CLIENTS: usize = 4;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let limited = mode & 1 == 1;
    // `Config` is `#[non_exhaustive]`: outside the crate it is built by
    // setting the fields of its default.
    let mut config = Config::default();
    config.amplification_limit = limited;
    config.max_sessions = 8;
    config.max_client_records = 8;
    config.max_tasks_per_session = 4;
    config.max_waiting_tasks = 8;
    config.max_finished_tasks = 16;
    config.max_outbox_bytes = 64 * 1024;
    config.jobs = Registry::with_standard_jobs().table();
    config.record_events = true;
    let one = config.client_bound(WORKERS);
    let bound = Footprint {
        live_sessions: one.live_sessions * CLIENTS,
        ended_sessions_held: one.ended_sessions_held,
        unfinished_tasks: config.max_waiting_tasks + WORKERS,
        final_states: config.max_finished_tasks.min(one.final_states * CLIENTS),
        remembered_requests: one.remembered_requests * CLIENTS,
        client_records: config.max_client_records + WORKERS,
        task_bytes: (config.max_waiting_tasks + WORKERS) * MAX_PAYLOAD_LEN
            + config.max_finished_tasks.min(one.final_states * CLIENTS) * 1147,
        outbox_bytes: one.outbox_bytes * CLIENTS,
    };
    let mut engine = Engine::new(config.clone(), Timestamp(0)).expect("valid config");
    let mut queue = WorkQueue::new();
    let mut now = Timestamp(0);
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut running = Vec::new();
    let mut received: HashMap<SocketAddr, usize> = HashMap::new();
    let mut sent: HashMap<SocketAddr, usize> = HashMap::new();
    let mut input = data;
    while let [op, len, rest @ ..] = input {
        let len = (*len as usize).min(rest.len());
        let (chunk, tail) = rest.split_at(len);
        input = tail;
        let from = SocketAddr::from(([127, 0, 0, 1], 1000 + u16::from(*op >> 4)));
        match op % 4 {
            0 => {
                *received.entry(from).or_default() += chunk.len();
                let _ = engine.handle_datagram(now, from, chunk);
            }
            1 => {
                // A valid header for a few client ids, kinds and seqs, then
                // the fuzzed body.
                let mut datagram = vec![b'T', b'H', 1, chunk.first().map_or(1, |k| k % 7), 0, 0];
                let body = chunk.get(2..).unwrap_or(&[]);
                datagram.extend_from_slice(&(body.len() as u16).to_be_bytes());
                datagram.extend_from_slice(&u64::from(op >> 5 | 1).to_be_bytes());
                datagram.extend_from_slice(&1u64.to_be_bytes());
                datagram.extend_from_slice(
                    &u32::from(chunk.get(1).copied().unwrap_or(1) | 1).to_be_bytes(),
                );
                datagram.extend_from_slice(body);
                *received.entry(from).or_default() += datagram.len();
                let _ = engine.handle_datagram(now, from, &datagram);
            }
            2 => {
                let step = chunk.first().copied().unwrap_or(0);
                now = now.plus_millis(u64::from(step) * 37);
                engine.handle_timeout(now);
                engine.set_backlogged(chunk.get(1).is_some_and(|b| b & 1 == 1));
            }
            _ => {
                if running.len() < WORKERS {
                    if let Some(claim) = queue.claim() {
                        engine.handle_task_event(now, claim.task, TaskEvent::Started);
                        running.push(claim.task);
                    }
                }
                if chunk.first().is_some_and(|b| b & 1 == 1) {
                    if let Some(task) = running.pop() {
                        queue.finish(task);
                        let outcome = JobOutcome::Done(chunk.to_vec());
                        engine.handle_task_event(now, task, TaskEvent::Finished(outcome));
                    }
                }
            }
        }
        while let Some(effect) = engine.poll_effect() {
            let applied = queue.apply(effect, std::time::Instant::now());
            if let Some((task, event)) = applied.report() {
                engine.handle_task_event(now, task, event);
            }
        }
        let held = engine.footprint();
        assert!(held.within(&bound), "held {held:?}\nbound {bound:?}");
        assert!(queue.queued() <= config.max_waiting_tasks);
        assert!(queue.running() <= WORKERS);
        assert!(queue.order_len() <= 2 * queue.queued() + 64);
        while let Some((to, n)) = engine.poll_transmit(&mut buf) {
            let total = sent.entry(to).or_default();
            *total += n;
            if limited {
                let got = received.get(&to).copied().unwrap_or(0);
                assert!(*total <= got, "{to} was sent {total} bytes, sent {got}");
            }
        }
        while engine.poll_event().is_some() {}
        let s = engine.stats();
        assert!(engine.live_sessions() <= 8);
        assert_eq!(
            s.tasks_accepted,
            s.tasks_done + s.tasks_failed + s.tasks_cancelled + engine.unfinished_tasks() as u64,
            "every accepted task is finished or unfinished: {s:?}"
        );
    }
});
