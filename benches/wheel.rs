//! The timing wheel against what a user would pick instead, at 1K, 100K and
//! 1M entries: tokio-util's `DelayQueue`, a `BinaryHeap` with lazy deletion,
//! and for the heartbeat's reset a floor, one random store into an array of
//! the same size (a single cache miss: the physical limit of a reset).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::hint::black_box;
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BatchSize, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use tokio_util::time::{delay_queue, DelayQueue};

use tether::wheel::{Expired, Tick, Wheel, WheelKey};

mod common;
use common::{shuffle, xorshift};

const SIZES: [u32; 3] = [1_000, 100_000, 1_000_000];

/// A binary heap of deadlines where a reset pushes a new entry and the old
/// one is skipped when popped (its generation no longer matches).
struct LazyHeap {
    heap: BinaryHeap<Reverse<(u64, u32, u32)>>,
    generation: Vec<u32>,
}

impl LazyHeap {
    fn new(n: usize) -> LazyHeap {
        LazyHeap {
            heap: BinaryHeap::with_capacity(n),
            generation: vec![0; n],
        }
    }
    fn insert(&mut self, key: u32, deadline: u64) {
        let g = self.generation[key as usize];
        self.heap.push(Reverse((deadline, key, g)));
    }
    fn reset(&mut self, key: u32, deadline: u64) {
        self.generation[key as usize] += 1;
        self.insert(key, deadline);
    }
    fn expire(&mut self, now: u64, out: &mut Vec<u32>) {
        while let Some(&Reverse((deadline, key, g))) = self.heap.peek() {
            if deadline > now {
                break;
            }
            self.heap.pop();
            if self.generation[key as usize] == g {
                out.push(key);
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap()
}

fn tether_wheel(n: u32, deadline: impl Fn(u32) -> u64) -> Wheel {
    let mut wheel = Wheel::new(Tick(0));
    wheel.reserve_keys(n as usize);
    for k in 0..n {
        wheel.insert(WheelKey(k), Tick(deadline(k))).unwrap();
    }
    wheel
}

fn insert(c: &mut Criterion) {
    let mut g = c.benchmark_group("wheel_insert");
    g.sample_size(10);
    let rt = runtime();
    let _guard = rt.enter();
    for n in SIZES {
        g.throughput(Throughput::Elements(u64::from(n)));
        g.bench_with_input(BenchmarkId::new("tether_wheel", n), &n, |b, &n| {
            b.iter_batched(
                || Wheel::new(Tick(0)),
                |mut wheel| {
                    for k in 0..n {
                        wheel
                            .insert(WheelKey(k), Tick(300 + u64::from(k % 100)))
                            .unwrap();
                    }
                    wheel
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("delay_queue", n), &n, |b, &n| {
            b.iter_batched(
                DelayQueue::<u32>::new,
                |mut dq| {
                    for k in 0..n {
                        dq.insert(k, Duration::from_millis(3000 + u64::from(k % 100)));
                    }
                    dq
                },
                BatchSize::LargeInput,
            )
        });
        g.bench_with_input(BenchmarkId::new("binary_heap_lazy", n), &n, |b, &n| {
            b.iter_batched(
                || LazyHeap::new(n as usize),
                |mut heap| {
                    for k in 0..n {
                        heap.insert(k, 300 + u64::from(k % 100));
                    }
                    heap
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

fn reset(c: &mut Criterion) {
    let mut g = c.benchmark_group("wheel_reset");
    g.throughput(Throughput::Elements(1));
    let rt = runtime();
    let _guard = rt.enter();
    for n in SIZES {
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut deadline = 400u64;
        let mut wheel = tether_wheel(n, |k| 300 + u64::from(k % 100));
        g.bench_with_input(BenchmarkId::new("tether_wheel", n), &n, |b, &n| {
            b.iter(|| {
                let k = (xorshift(&mut rng) % u64::from(n)) as u32;
                deadline += 1;
                wheel.extend(WheelKey(k), Tick(deadline));
            })
        });
        drop(wheel);
        let mut floor = vec![0u64; n as usize];
        g.bench_with_input(BenchmarkId::new("random_store_floor", n), &n, |b, &n| {
            b.iter(|| {
                let k = (xorshift(&mut rng) % u64::from(n)) as usize;
                deadline += 1;
                floor[k] = black_box(deadline);
            })
        });
        drop(floor);
        let mut dq = DelayQueue::<u32>::with_capacity(n as usize);
        let keys: Vec<delay_queue::Key> = (0..n)
            .map(|k| dq.insert(k, Duration::from_millis(3000 + u64::from(k % 100))))
            .collect();
        let mut ms = 3000u64;
        g.bench_with_input(BenchmarkId::new("delay_queue", n), &n, |b, &n| {
            b.iter(|| {
                let k = (xorshift(&mut rng) % u64::from(n)) as usize;
                ms = 3000 + (ms + 1) % 1000;
                dq.reset(&keys[k], Duration::from_millis(ms));
            })
        });
        drop(dq);
        let mut heap = LazyHeap::new(n as usize);
        for k in 0..n {
            heap.insert(k, 300 + u64::from(k % 100));
        }
        g.bench_with_input(BenchmarkId::new("binary_heap_lazy", n), &n, |b, &n| {
            b.iter(|| {
                let k = (xorshift(&mut rng) % u64::from(n)) as u32;
                deadline += 1;
                heap.reset(k, deadline);
            })
        });
    }
    g.finish();
}

/// Every entry due in the same tick; the cost of finding and removing them
/// all, per entry.
fn expire_all(c: &mut Criterion) {
    let mut g = c.benchmark_group("wheel_expire_all_same_tick");
    g.sample_size(10);
    for n in SIZES {
        g.throughput(Throughput::Elements(u64::from(n)));
        expire_wheel_and_heap(&mut g, &(0..n).collect::<Vec<u32>>());
        let rt = runtime();
        g.bench_with_input(BenchmarkId::new("delay_queue", n), &n, |b, &n| {
            b.iter_batched(
                || {
                    let _guard = rt.enter();
                    let mut dq = DelayQueue::<u32>::with_capacity(n as usize);
                    for k in 0..n {
                        dq.insert(k, Duration::from_millis(3000));
                    }
                    dq
                },
                |mut dq| {
                    rt.block_on(async {
                        tokio::time::advance(Duration::from_millis(3001)).await;
                        let mut expired = 0;
                        while let Some(item) = std::future::poll_fn(|cx| dq.poll_expired(cx)).await
                        {
                            black_box(item);
                            expired += 1;
                        }
                        assert_eq!(expired, n);
                    });
                    dq
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// `0..n` in a fixed random order (Fisher-Yates over xorshift).
fn permutation(n: u32, seed: u64) -> Vec<u32> {
    let mut keys: Vec<u32> = (0..n).collect();
    shuffle(&mut keys, &mut (seed | 1));
    keys
}

/// Ticks per heartbeat interval and per TTL: 10 ms ticks, 1 s interval,
/// 3 s TTL, as the server's defaults.
const INTERVAL_TICKS: u64 = 100;
const TTL_TICKS: u64 = 300;

/// The steady state a server lives in: `n` clients, each heartbeating once
/// an interval (in a fixed random order, so consecutive resets touch
/// scattered entries), each heartbeat resetting its deadline to a TTL
/// ahead, and time advanced tick by tick with nothing expiring. One
/// iteration is one whole interval: `n` resets and 100 advances, so the
/// time per element is the all-in cost of a heartbeat, including whatever
/// the structure defers to `advance` (the wheel re-files lazily extended
/// entries when their old slot comes due; the heap pops stale entries).
/// Iterations continue from where the last left off: after the first few
/// TTLs every structure carries its steady load of deferred work.
fn steady_state(c: &mut Criterion) {
    let mut g = c.benchmark_group("wheel_steady_state");
    g.sample_size(10);
    for n in [100_000u32, 1_000_000] {
        g.throughput(Throughput::Elements(u64::from(n)));
        let order = permutation(n, 0x5eed_0f7e_77e7);
        let per_tick = |t: u64| {
            let from = (t % INTERVAL_TICKS) as usize * n as usize / INTERVAL_TICKS as usize;
            let to = ((t % INTERVAL_TICKS) + 1) as usize * n as usize / INTERVAL_TICKS as usize;
            from..to
        };

        let mut wheel = tether_wheel(n, |k| TTL_TICKS + u64::from(k) % INTERVAL_TICKS);
        let mut now = 0u64;
        let mut expired = Vec::new();
        g.bench_with_input(BenchmarkId::new("tether_wheel", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                for _ in 0..iters * INTERVAL_TICKS {
                    now += 1;
                    for &k in &order[per_tick(now)] {
                        wheel.extend(WheelKey(k), Tick(now + TTL_TICKS));
                    }
                    wheel.advance(Tick(now), &mut expired);
                    assert!(expired.is_empty(), "a live entry expired");
                }
                start.elapsed()
            })
        });
        drop(wheel);

        let mut heap = LazyHeap::new(n as usize);
        for k in 0..n {
            heap.insert(k, TTL_TICKS + u64::from(k) % INTERVAL_TICKS);
        }
        let mut now = 0u64;
        let mut out = Vec::new();
        g.bench_with_input(BenchmarkId::new("binary_heap_lazy", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                for _ in 0..iters * INTERVAL_TICKS {
                    now += 1;
                    for &k in &order[per_tick(now)] {
                        heap.reset(k, now + TTL_TICKS);
                    }
                    heap.expire(now, &mut out);
                    assert!(out.is_empty(), "a live entry expired");
                }
                start.elapsed()
            })
        });
        drop(heap);

        // DelayQueue on tokio's paused clock: each tick advances it 10 ms
        // and drains what expired (nothing); resets use `reset_at` with the
        // tick's deadline, one clock read a tick, not one a reset.
        let rt = runtime();
        let (mut dq, keys) = {
            let _guard = rt.enter();
            let mut dq = DelayQueue::<u32>::with_capacity(n as usize);
            let keys: Vec<delay_queue::Key> = (0..n)
                .map(|k| {
                    dq.insert(
                        k,
                        Duration::from_millis(10 * (TTL_TICKS + u64::from(k) % INTERVAL_TICKS)),
                    )
                })
                .collect();
            (dq, keys)
        };
        g.bench_with_input(BenchmarkId::new("delay_queue", n), &n, |b, _| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                rt.block_on(async {
                    for t in 0..iters * INTERVAL_TICKS {
                        tokio::time::advance(Duration::from_millis(10)).await;
                        let deadline =
                            tokio::time::Instant::now() + Duration::from_millis(10 * TTL_TICKS);
                        for &k in &order[per_tick(t + 1)] {
                            dq.reset_at(&keys[k as usize], deadline);
                        }
                        let drained = std::future::poll_fn(|cx| {
                            std::task::Poll::Ready(match dq.poll_expired(cx) {
                                std::task::Poll::Ready(Some(_)) => 1,
                                _ => 0,
                            })
                        })
                        .await;
                        assert_eq!(drained, 0, "a live entry expired");
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

/// Every one of `keys` due in the same tick, inserted in `keys`' order: the
/// wheel's and the lazy heap's cost of finding and removing them all.
fn expire_wheel_and_heap(g: &mut BenchmarkGroup<'_, WallTime>, keys: &[u32]) {
    let n = keys.len();
    g.bench_with_input(BenchmarkId::new("tether_wheel", n), &n, |b, &n| {
        b.iter_batched(
            || {
                let mut wheel = Wheel::new(Tick(0));
                wheel.reserve_keys(n);
                for &k in keys {
                    wheel.insert(WheelKey(k), Tick(300)).unwrap();
                }
                (wheel, Vec::<Expired>::with_capacity(n))
            },
            |(mut wheel, mut out)| {
                wheel.advance(Tick(300), &mut out);
                assert_eq!(out.len(), n);
                (wheel, out)
            },
            BatchSize::LargeInput,
        )
    });
    g.bench_with_input(BenchmarkId::new("binary_heap_lazy", n), &n, |b, &n| {
        b.iter_batched(
            || {
                let mut heap = LazyHeap::new(n);
                for &k in keys {
                    heap.insert(k, 300);
                }
                (heap, Vec::with_capacity(n))
            },
            |(mut heap, mut out)| {
                heap.expire(300, &mut out);
                assert_eq!(out.len(), n);
                (heap, out)
            },
            BatchSize::LargeInput,
        )
    });
}

/// As `expire_all`, with the keys inserted in a random order, as the
/// sessions expiring in one tick are scattered over the slab in a server:
/// the walk cannot ride the prefetcher.
fn expire_all_scattered(c: &mut Criterion) {
    let mut g = c.benchmark_group("wheel_expire_all_same_tick_random_keys");
    g.sample_size(10);
    for n in SIZES {
        g.throughput(Throughput::Elements(u64::from(n)));
        expire_wheel_and_heap(&mut g, &permutation(n, 0xfeed));
    }
    g.finish();
}

criterion_group!(
    benches,
    reset,
    expire_all,
    expire_all_scattered,
    steady_state,
    insert
);
criterion_main!(benches);
