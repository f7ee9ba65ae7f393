//! The timing wheel's hot path: a heartbeat's reset of a random entry, at
//! several sizes, against the floor of one random store into an array of the
//! same size. (The full comparison with DelayQueue and a heap is the
//! benchmarks issue's.)

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

use tether::wheel::{Tick, Wheel, WheelKey};

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn reset(c: &mut Criterion) {
    let mut g = c.benchmark_group("wheel_reset");
    g.throughput(Throughput::Elements(1));
    for n in [1_000u32, 100_000, 1_000_000] {
        let mut wheel = Wheel::new(Tick(0));
        for k in 0..n {
            wheel
                .insert(WheelKey(k), Tick(300 + u64::from(k % 100)))
                .unwrap();
        }
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut deadline = 400u64;
        g.bench_with_input(BenchmarkId::new("tether_wheel", n), &n, |b, &n| {
            b.iter(|| {
                let k = (xorshift(&mut rng) % u64::from(n)) as u32;
                deadline += 1;
                wheel.reset(WheelKey(k), Tick(deadline)).unwrap();
            })
        });
        let mut floor = vec![0u64; n as usize];
        g.bench_with_input(BenchmarkId::new("random_store_floor", n), &n, |b, &n| {
            b.iter(|| {
                let k = (xorshift(&mut rng) % u64::from(n)) as usize;
                deadline += 1;
                floor[k] = black_box(deadline);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, reset);
criterion_main!(benches);
