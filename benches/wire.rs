//! Wire costs per datagram: decoding a HEARTBEAT keyless and keyed, and the
//! HMAC-SHA256 candidates measured for the MAC (see BENCHMARKS.md).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::hint::black_box;

use tether::wire::{Datagram, Flags, Header, MacKey, Message, ReplayWindow, MAX_DATAGRAM};

fn heartbeat(key: Option<&MacKey>) -> Vec<u8> {
    let d = Datagram {
        header: Header {
            flags: Flags::empty(),
            client_id: 42,
            incarnation: 1_700_000_000_000_000_000,
            seq: 7,
        },
        message: Message::Heartbeat,
    };
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = d.emit(key, &mut buf).unwrap();
    buf.truncate(n);
    buf
}

fn decode(c: &mut Criterion) {
    let secret = [0x11u8; 32];
    let key = MacKey::new(&secret).unwrap();
    let keyless = heartbeat(None);
    let keyed = heartbeat(Some(&key));
    let mut g = c.benchmark_group("decode_heartbeat");
    g.throughput(Throughput::Elements(1));
    g.bench_function("keyless", |b| {
        b.iter(|| Datagram::decode(black_box(&keyless), None).unwrap())
    });
    g.bench_function("keyed_verify_and_replay_check", |b| {
        let window = ReplayWindow::new(6);
        b.iter(|| {
            let d = Datagram::decode(black_box(&keyed), Some(&key)).unwrap();
            black_box(window.check(d.header.seq)).unwrap();
        })
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let key = MacKey::new(&[0x11u8; 32]).unwrap();
    let d = Datagram {
        header: Header {
            flags: Flags::empty(),
            client_id: 42,
            incarnation: 1_700_000_000_000_000_000,
            seq: 9,
        },
        message: Message::TaskState {
            task_id: 1 << 32 | 17,
            report: tether::wire::TaskReport::Cancelled(tether::CancelReason::Expired),
        },
    };
    let mut out = [0u8; MAX_DATAGRAM];
    let mut g = c.benchmark_group("encode_task_state");
    g.throughput(Throughput::Elements(1));
    g.bench_function("keyless", |b| {
        b.iter(|| black_box(&d).emit(None, black_box(&mut out)).unwrap())
    });
    g.bench_function("keyed", |b| {
        b.iter(|| black_box(&d).emit(Some(&key), black_box(&mut out)).unwrap())
    });
    g.finish();
}

/// The candidates for HMAC-SHA256 over a 28-byte header, truncated to 16
/// bytes, verified in constant time.
fn mac_candidates(c: &mut Criterion) {
    let secret = [0x11u8; 32];
    let keyed = heartbeat(Some(&MacKey::new(&secret).unwrap()));
    let (signed, tag) = keyed.split_at(28);
    let mut g = c.benchmark_group("hmac_sha256_verify_28B");
    g.throughput(Throughput::Elements(1));
    let precomputed = MacKey::new(&secret).unwrap();
    g.bench_function("hmac+sha2, keyed state cloned (chosen)", |b| {
        b.iter(|| assert!(precomputed.verify(black_box(signed), black_box(tag))))
    });
    g.bench_function("hmac+sha2, re-keyed per datagram", |b| {
        b.iter(|| {
            let mut mac = Hmac::<Sha256>::new_from_slice(black_box(&secret)).unwrap();
            mac.update(black_box(signed));
            assert!(mac.verify_truncated_left(black_box(tag)).is_ok());
        })
    });
    let ring_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    g.bench_function("ring, sign then constant-time compare", |b| {
        b.iter(|| {
            let full = ring::hmac::sign(&ring_key, black_box(signed));
            // ring verifies whole tags only; a truncated tag needs its own
            // constant-time comparison.
            let diff = full.as_ref()[..16]
                .iter()
                .zip(black_box(tag))
                .fold(0u8, |acc, (a, b)| acc | (a ^ b));
            assert_eq!(black_box(diff), 0);
        })
    });
    g.finish();
}

criterion_group!(benches, decode, encode, mac_candidates);
criterion_main!(benches);
