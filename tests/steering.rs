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

#[test]
fn an_address_another_reuseport_group_holds_is_refused() {
    use socket2::{Domain, Protocol, Socket, Type};
    let other = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    other.set_reuse_port(true).unwrap();
    other
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    let addr = other.local_addr().unwrap().as_socket().unwrap();
    let refused = Server::builder().listen(addr).bind();
    let Err(tether::ServerError::Bind(at, e)) = refused else {
        panic!("bound an address another reuseport socket holds");
    };
    assert_eq!((at, e.kind()), (addr, std::io::ErrorKind::AddrInUse));
    assert!(e.to_string().contains("SO_REUSEPORT"), "{e}");
    // The address is left as it was: the other socket gets every datagram.
    let other: UdpSocket = other.into();
    other
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
    for _ in 0..20 {
        sender.send_to(b"still mine", addr).unwrap();
    }
    let mut buf = [0u8; 16];
    for _ in 0..20 {
        let n = other.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"still mine");
    }
}
