//! Who owns a queued task: the worker pool's queue decides whether it still
//! starts, and a cancelled one leaves the pool, payload and all, the moment
//! it is cancelled. Embedded servers on loopback ports.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{spawn_embedded, value, wait_for_metric};
use tether::{Client, ClientConfig, PayloadRule, Server, TaskStatus};

#[test]
fn submit_and_cancel_loops_behind_busy_workers_leave_nothing_in_the_pool() {
    let (server, metrics) = spawn_embedded(Server::builder().workers(1).standard_jobs());
    // The only worker sleeps for a minute: nothing queued will start.
    let holder = Client::connect(ClientConfig::new(server.local_addr(), 1)).unwrap();
    holder
        .submit("sleep", &60_000u32.to_be_bytes())
        .expect("the long task");
    let payload = vec![b'x'; 1024];
    for id in 0..40u64 {
        let c = Client::connect(ClientConfig::new(server.local_addr(), 100 + id)).unwrap();
        for _ in 0..50 {
            let task = c.submit("echo", &payload).unwrap();
            c.cancel(task).unwrap();
            assert_eq!(
                c.wait(task, Duration::from_secs(10)).unwrap(),
                TaskStatus::Cancelled(tether::CancelReason::Cancelled)
            );
        }
        c.bye().unwrap();
    }
    // 2,000 cancelled tasks of 1 KiB each came and went: the pool holds
    // only the running one, and agrees with the engine.
    let text = wait_for_metric(
        &metrics,
        "tether_tasks_cancelled_total{reason=\"cancelled\"}",
        2000.0,
    );
    assert_eq!(value(&text, "tether_pool_tasks{state=\"queued\"}"), 0.0);
    assert_eq!(value(&text, "tether_pool_tasks{state=\"running\"}"), 1.0);
    assert_eq!(value(&text, "tether_tasks{state=\"queued\"}"), 0.0);
    drop(holder);
    server.shutdown().unwrap();
}

#[test]
fn a_task_reported_cancelled_before_it_started_never_runs() {
    let ran: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let dir = std::env::temp_dir().join(format!("tether-ownership-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let events_path = dir.join("events.jsonl");
    let _ = std::fs::remove_file(&events_path);
    let server = {
        let ran = Arc::clone(&ran);
        Server::builder()
            .listen("127.0.0.1:0".parse().unwrap())
            .workers(2)
            .events(tether::observe::EventsTarget::File(events_path.clone()))
            .job("mark", PayloadRule::Any, move |ctx| {
                ran.lock().unwrap().insert(ctx.task_id().0);
                Ok(Vec::new())
            })
            .bind()
            .unwrap()
            .spawn()
            .unwrap()
    };
    // SUBMIT then CANCEL at once, from four clients at a time, with workers
    // free: a cancel often reaches the loop in the same batch as the
    // worker's report that it started the task.
    let addr = server.local_addr();
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            std::thread::spawn(move || {
                for id in 0..5u64 {
                    let c = Client::connect(ClientConfig::new(addr, 500 + t * 10 + id)).unwrap();
                    for n in 0..100 {
                        let task = c
                            .submit("mark", b"")
                            .unwrap_or_else(|e| panic!("client {t}/{id}, SUBMIT {n}: {e:?}"));
                        c.cancel(task)
                            .unwrap_or_else(|e| panic!("client {t}/{id}, CANCEL {n}: {e:?}"));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    server.shutdown().unwrap();
    let events = std::fs::read_to_string(&events_path).unwrap();
    let ran = ran.lock().unwrap();
    let mut never_started = 0;
    for line in events.lines().filter(|l| l.contains("\"task_ended\"")) {
        let task = line
            .split("\"task_id\":")
            .nth(1)
            .and_then(|rest| rest.split([',', '}']).next())
            .and_then(|id| id.trim_matches('"').parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no task id in {line}"));
        if !line.contains("\"run_ms\"") {
            never_started += 1;
            assert!(
                !ran.contains(&task),
                "task {task} ended without starting, yet its job ran: {line}"
            );
        }
    }
    // Every task either ran (claimed by a worker, cancelled or not) or was
    // withdrawn before any worker took it: never both, never neither.
    assert_eq!(
        never_started + ran.len(),
        2000,
        "{never_started} + {}",
        ran.len()
    );
}
