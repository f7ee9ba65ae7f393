//! One worker pool shared by two event loops, against a pool per loop (what
//! `--shards 2` runs): the same two workers in all, the same tasks, and in
//! both each loop takes its own tasks' reports (started, finished) off its
//! own channel, as a shard does. What differs is the queue: one, locked by
//! both loops and both workers, whose workers take any loop's task; or one
//! per loop, with a worker each.
//!
//! - even: both loops queue 2,000 tasks.
//! - skewed: one loop queues 4,000 tasks and the other none, the case a
//!   shared pool exists for (per loop, half the workers sit idle).
//!
//! `echo` measures the pool's own cost per task (queue, claim, two
//! reports, wake); `spin 20000` a task that works (~40 µs here). A run's
//! time is from the first task queued to the last report taken.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use crossbeam_channel::{unbounded, Receiver};

use tether::engine::{JobId, TaskId};
use tether::pool::{Pool, Registry, Report, Route};

const TASKS: usize = 4_000;

/// How the two loops' tasks are split between them.
#[derive(Clone, Copy)]
enum Split {
    Even,
    Skewed,
}

impl Split {
    fn tasks_of(self, lp: usize) -> usize {
        match (self, lp) {
            (Split::Even, _) => TASKS / 2,
            (Split::Skewed, 0) => TASKS,
            (Split::Skewed, _) => 0,
        }
    }
}

/// Task ids of loop `lp` are `2k + lp + 1`: the shared pool routes by them.
fn loop_of(task: TaskId) -> usize {
    ((task.0 - 1) % 2) as usize
}

/// The two loops on `pools` (one shared, or one each); `reports[lp]` is
/// loop `lp`'s channel.
fn run(
    pools: &[Arc<Pool>],
    reports: &[Receiver<Report>; 2],
    job: JobId,
    payload: &[u8],
    split: Split,
) -> Duration {
    let start = Instant::now();
    let ends: Vec<Instant> = std::thread::scope(|scope| {
        let loops: Vec<_> = (0..2)
            .map(|lp| {
                let pool = Arc::clone(&pools[lp % pools.len()]);
                let rx = reports[lp].clone();
                let payload = payload.to_vec();
                scope.spawn(move || {
                    let n = split.tasks_of(lp);
                    for t in 0..n {
                        pool.run(TaskId((t * 2 + lp) as u64 + 1), 1, job, payload.clone());
                    }
                    for _ in 0..2 * n {
                        rx.recv().expect("a report");
                    }
                    Instant::now()
                })
            })
            .collect();
        loops.into_iter().map(|l| l.join().unwrap()).collect()
    });
    ends.into_iter().max().unwrap() - start
}

fn pools(c: &mut Criterion) {
    tether::pool::quiet_worker_panics();
    let registry = Arc::new(Registry::with_standard_jobs());
    let table = registry.table();
    let jobs = [
        ("echo", table.lookup("echo").unwrap(), b"x".to_vec()),
        (
            "spin 20000",
            table.lookup("spin").unwrap(),
            20_000u64.to_be_bytes().to_vec(),
        ),
    ];
    let route = || {
        let (tx, rx) = unbounded();
        let route = Route {
            reports: tx,
            notify: Arc::new(|| {}),
        };
        (route, rx)
    };
    let (shared_routes, shared_rx): (Vec<Route>, Vec<Receiver<Report>>) =
        (0..2).map(|_| route()).unzip();
    let shared =
        Arc::new(Pool::start_routed(2, Arc::clone(&registry), shared_routes, loop_of).unwrap());
    let shared_rx = [shared_rx[0].clone(), shared_rx[1].clone()];
    let (own_routes, own_rx): (Vec<Route>, Vec<Receiver<Report>>) = (0..2).map(|_| route()).unzip();
    let own: Vec<Arc<Pool>> = own_routes
        .into_iter()
        .map(|r| Arc::new(Pool::start_routed(1, Arc::clone(&registry), vec![r], |_| 0).unwrap()))
        .collect();
    let own_rx = [own_rx[0].clone(), own_rx[1].clone()];

    let mut group = c.benchmark_group("pool");
    group.throughput(Throughput::Elements(TASKS as u64));
    group.sample_size(20);
    for (name, job, payload) in &jobs {
        for (split, split_name) in [(Split::Even, "even"), (Split::Skewed, "skewed")] {
            let label = format!("{name}, {split_name}");
            group.bench_function(BenchmarkId::new("shared by 2 loops", &label), |bench| {
                bench.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| {
                            run(
                                std::slice::from_ref(&shared),
                                &shared_rx,
                                *job,
                                payload,
                                split,
                            )
                        })
                        .sum()
                });
            });
            group.bench_function(BenchmarkId::new("one per loop", &label), |bench| {
                bench.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| run(&own, &own_rx, *job, payload, split))
                        .sum()
                });
            });
        }
    }
    group.finish();
}

criterion_group!(benches, pools);
criterion_main!(benches);
