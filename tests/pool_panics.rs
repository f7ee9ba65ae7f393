//! Ten thousand panicking jobs in a row: the pool keeps its size, keeps
//! serving, and memory stays flat. In a test binary of its own, so the
//! process's RSS is this test's alone.

use std::sync::Arc;
use std::time::Duration;

use tether::engine::{JobOutcome, TaskEvent, TaskId};
use tether::pool::{quiet_worker_panics, Pool, Registry};

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn ten_thousand_panics_keep_the_pool_whole_and_memory_flat() {
    quiet_worker_panics();
    let registry = Arc::new(Registry::with_standard_jobs());
    let panic_job = registry.table().lookup("panic").unwrap();
    let echo_job = registry.table().lookup("echo").unwrap();
    let (tx, rx) = crossbeam_channel::unbounded();
    let pool = Pool::start(2, registry, tx, Arc::new(|| {})).unwrap();
    let run_batch = |from: u64, n: u64| {
        for i in from..from + n {
            pool.run(TaskId(i), 1, panic_job, b"boom".to_vec());
        }
        let mut finished = 0;
        while finished < n {
            let (_, event, _) = rx.recv_timeout(Duration::from_secs(30)).expect("report");
            if let TaskEvent::Finished(outcome) = event {
                assert!(matches!(outcome, JobOutcome::Failed(ref e) if e.contains("boom")));
                finished += 1;
            }
        }
    };
    run_batch(0, 1_000);
    let settled = rss_kb();
    run_batch(1_000, 9_000);
    let after = rss_kb();
    assert!(
        after <= settled + 2_048,
        "RSS grew from {settled} kB to {after} kB over 9,000 panics"
    );
    assert_eq!(pool.size(), 2);
    // Both workers still take work.
    pool.run(TaskId(99_999), 1, echo_job, b"alive".to_vec());
    loop {
        let (task, event, _) = rx.recv_timeout(Duration::from_secs(10)).expect("report");
        if let (TaskId(99_999), TaskEvent::Finished(outcome)) = (task, event) {
            assert_eq!(outcome, JobOutcome::Done(b"alive".to_vec()));
            break;
        }
    }
    pool.join();
}
