//! The kernel steers each datagram to its listening socket: HELLOs to the
//! strangers' socket, everything else (heartbeats, requests, junk) to the
//! members'. Loopback, an embedded server.

mod common;

use std::net::UdpSocket;

use common::{value, wait_for_metric};
use tether::wire::{Datagram, Flags, Message};
use tether::Server;

#[test]
fn hellos_reach_the_strangers_socket_and_everything_else_the_members() {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse().unwrap())
        .bind()
        .unwrap();
    assert!(
        server.steering(),
        "this kernel refused the steering program (SO_ATTACH_REUSEPORT_CBPF): \
         the server falls back to one socket, and this test has nothing to check"
    );
    let metrics = server.metrics();
    let server = server.spawn().unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    sender.connect(server.local_addr()).unwrap();
    let send = |client_id: u64, message: Message<'_>| {
        let bytes = Datagram::new(Flags::empty(), client_id, 1, 1, message)
            .to_vec(None)
            .unwrap();
        sender.send(&bytes).unwrap();
    };
    for id in 1..=50 {
        send(
            id,
            Message::Hello {
                ttl_ms: 0,
                name: "steered",
            },
        );
    }
    for id in 1000..1030 {
        send(id, Message::Heartbeat);
    }
    for id in 2000..2010 {
        send(id, Message::Status { task_id: 1 });
    }
    // Junk: too short to have a kind, and a header of an unknown kind.
    for len in 0..5 {
        sender.send(&[0x54, 0x48, 1, 0x01][..len.min(4)]).unwrap();
    }
    sender.send(&[0x54, 0x48, 1, 0x7f, 0, 0, 0, 0]).unwrap();
    let text = wait_for_metric(
        &metrics,
        "tether_datagrams_read_total{socket=\"strangers\"}",
        51.0,
    );
    let text = if value(&text, "tether_datagrams_read_total{socket=\"members\"}") < 45.0 {
        wait_for_metric(
            &metrics,
            "tether_datagrams_read_total{socket=\"members\"}",
            45.0,
        )
    } else {
        text
    };
    // The four-byte datagram is a HELLO's prefix: the program sees kind
    // 0x01 and steers it with the HELLOs (where the decoder drops it).
    assert_eq!(
        value(&text, "tether_datagrams_read_total{socket=\"strangers\"}"),
        51.0
    );
    assert_eq!(
        value(&text, "tether_datagrams_read_total{socket=\"members\"}"),
        45.0
    );
    assert_eq!(value(&text, "tether_sessions_opened_total"), 50.0);
    server.shutdown().unwrap();
}
