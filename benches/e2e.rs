//! A HEARTBEAT with ACK and its HEARTBEAT_ACK, over loopback, through the
//! real server loop (socket, recvmmsg, engine, reply), run in-process.

use std::net::UdpSocket;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use tether::server::{Server, ServerConfig};
use tether::wire::{Datagram, Flags, Message};
use tether::Registry;

fn encode(seq: u32, flags: Flags, message: Message<'_>) -> Vec<u8> {
    Datagram::new(flags, 7, 1, seq, message)
        .to_vec(None)
        .unwrap()
}

fn round_trip(c: &mut Criterion) {
    let mut config = ServerConfig::default();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.handle_signals = false;
    config.workers = 1;
    let server = Server::bind(config, Registry::with_standard_jobs()).unwrap();
    let addr = server.local_addr();
    let handle = server.handle();
    let thread = std::thread::spawn(move || server.run());

    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 2048];
    socket
        .send(&encode(
            1,
            Flags::empty(),
            Message::Hello {
                ttl_ms: 3_600_000,
                name: "",
            },
        ))
        .unwrap();
    socket.recv(&mut buf).unwrap();
    let mut seq = 1u32;
    let mut datagram = encode(2, Flags::ACK, Message::Heartbeat);

    let mut g = c.benchmark_group("e2e_loopback");
    g.throughput(Throughput::Elements(1));
    g.bench_function("heartbeat_ack_round_trip", |b| {
        b.iter(|| {
            seq += 1;
            datagram[24..28].copy_from_slice(&seq.to_be_bytes());
            socket.send(&datagram).unwrap();
            let n = socket.recv(&mut buf).expect("HEARTBEAT_ACK");
            assert_eq!(n, 32);
        })
    });
    g.finish();
    handle.shutdown();
    let _ = thread.join();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
