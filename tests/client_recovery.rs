//! The Rust client against a scripted stand-in for the server on loopback
//! (lost BYE_ACKs and lost sessions, the cases a real server rarely
//! produces on cue), and against a real server that restarts under it.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use tether::wire::{Datagram, Flags, Header, Message, MAX_DATAGRAM};
use tether::{Client, ClientConfig, ClientError};

/// A UDP socket that plays the server, one datagram at a time.
struct FakeServer {
    socket: UdpSocket,
    seq: u32,
}

/// A datagram the fake server received, decoded.
struct Received {
    from: SocketAddr,
    header: Header,
    kind: tether::wire::Kind,
}

impl FakeServer {
    fn new() -> FakeServer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        FakeServer { socket, seq: 0 }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    fn recv(&self) -> Received {
        let mut buf = [0u8; 2048];
        let (n, from) = self
            .socket
            .recv_from(&mut buf)
            .expect("the client sent nothing");
        let d = Datagram::decode(&buf[..n], None).expect("the client sent a malformed datagram");
        Received {
            from,
            header: d.header,
            kind: d.message.kind(),
        }
    }

    /// Sends `message` in the session of `to`, numbered by this server.
    fn reply(&mut self, to: &Received, message: Message<'_>) {
        self.seq += 1;
        let header = Header {
            flags: Flags::empty(),
            seq: self.seq,
            ..to.header
        };
        self.send(to.from, header, message);
    }

    /// Sends UNKNOWN_SESSION, which copies the header of what it answers.
    fn unknown_session(&self, to: &Received) {
        let header = Header {
            flags: Flags::empty(),
            ..to.header
        };
        self.send(to.from, header, Message::UnknownSession);
    }

    fn send(&self, to: SocketAddr, header: Header, message: Message<'_>) {
        let mut buf = [0u8; MAX_DATAGRAM];
        let n = Datagram { header, message }.emit(None, &mut buf).unwrap();
        self.socket.send_to(&buf[..n], to).unwrap();
    }

    /// Receives until a datagram of `kind`, answering nothing else.
    fn expect(&self, kind: tether::wire::Kind) -> Received {
        loop {
            let r = self.recv();
            if r.kind == kind {
                return r;
            }
        }
    }

    /// Accepts the client's HELLO.
    fn welcome(&mut self) -> Received {
        let hello = self.expect(tether::wire::Kind::Hello);
        self.reply(
            &hello,
            Message::Welcome {
                ttl_ms: 3000,
                tick_ms: 10,
            },
        );
        hello
    }
}

fn config(server: &FakeServer) -> ClientConfig {
    let mut config = ClientConfig::new(server.addr(), 77);
    config.retry_after = Duration::from_millis(100);
    config.heartbeat_interval = Some(Duration::from_secs(30));
    config
}

#[test]
fn a_bye_whose_ack_was_lost_succeeds_when_its_retry_finds_the_session_gone() {
    let mut server = FakeServer::new();
    let handle = std::thread::spawn({
        let config = config(&server);
        move || Client::connect(config).unwrap().bye()
    });
    server.welcome();
    // The first BYE ends the session; its BYE_ACK is lost on the way.
    server.expect(tether::wire::Kind::Bye);
    // So the retry finds no session.
    let retry = server.expect(tether::wire::Kind::Bye);
    server.unknown_session(&retry);
    assert!(handle.join().unwrap().is_ok(), "the BYE took effect");
}

#[test]
fn a_bye_that_finds_the_session_already_gone_says_so() {
    let mut server = FakeServer::new();
    let handle = std::thread::spawn({
        let config = config(&server);
        move || Client::connect(config).unwrap().bye()
    });
    server.welcome();
    let first = server.expect(tether::wire::Kind::Bye);
    server.unknown_session(&first);
    assert!(matches!(
        handle.join().unwrap(),
        Err(ClientError::SessionLost)
    ));
}

/// Runs `f` (the async client) on a runtime of its own thread, while the
/// test thread plays the server.
#[cfg(feature = "tokio")]
fn on_tokio<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
}

#[cfg(feature = "tokio")]
#[test]
fn the_async_client_takes_a_retried_bye_finding_no_session_as_success() {
    let mut server = FakeServer::new();
    let config = config(&server);
    let handle = on_tokio(async move {
        tether::AsyncClient::connect(config)
            .await
            .unwrap()
            .bye()
            .await
    });
    server.welcome();
    server.expect(tether::wire::Kind::Bye); // its BYE_ACK is lost
    let retry = server.expect(tether::wire::Kind::Bye);
    server.unknown_session(&retry);
    assert!(handle.join().unwrap().is_ok(), "the BYE took effect");
}

#[cfg(feature = "tokio")]
#[test]
fn the_async_client_says_so_when_its_first_bye_finds_no_session() {
    let mut server = FakeServer::new();
    let config = config(&server);
    let handle = on_tokio(async move {
        tether::AsyncClient::connect(config)
            .await
            .unwrap()
            .bye()
            .await
    });
    server.welcome();
    let first = server.expect(tether::wire::Kind::Bye);
    server.unknown_session(&first);
    assert!(matches!(
        handle.join().unwrap(),
        Err(ClientError::SessionLost)
    ));
}

#[cfg(feature = "tokio")]
#[test]
fn the_async_client_reopens_a_lost_session_at_once() {
    let mut server = FakeServer::new();
    let mut config = config(&server);
    config.heartbeat_interval = Some(Duration::from_secs(1));
    let handle = on_tokio(async move {
        let client = tether::AsyncClient::connect(config).await.unwrap();
        loop {
            if let Some(tether::ClientEvent::SessionReopened { incarnation }) =
                client.next_event().await
            {
                return incarnation;
            }
        }
    });
    let hello = server.welcome();
    let heartbeat = server.expect(tether::wire::Kind::Heartbeat);
    let told = Instant::now();
    server.unknown_session(&heartbeat);
    let next = server.recv();
    assert_eq!(next.kind, tether::wire::Kind::Hello, "sent {:?}", next.kind);
    assert!(next.header.incarnation > hello.header.incarnation);
    assert!(
        told.elapsed() < Duration::from_millis(800),
        "{:?}",
        told.elapsed()
    );
    server.reply(
        &next,
        Message::Welcome {
            ttl_ms: 3000,
            tick_ms: 10,
        },
    );
    assert_eq!(handle.join().unwrap(), next.header.incarnation);
}

#[test]
fn a_lost_session_is_reopened_at_once_not_heartbeated() {
    let mut server = FakeServer::new();
    let mut config = config(&server);
    config.heartbeat_interval = Some(Duration::from_secs(1));
    let handle = std::thread::spawn(move || {
        let client = Client::connect(config).unwrap();
        std::thread::sleep(Duration::from_secs(3));
        client
    });
    let hello = server.welcome();
    let heartbeat = server.expect(tether::wire::Kind::Heartbeat);
    let told = Instant::now();
    server.unknown_session(&heartbeat);
    // The very next datagram opens a new session: no heartbeat for the
    // incarnation the server just said it does not know, and no waiting
    // out an interval first.
    let next = server.recv();
    assert_eq!(next.kind, tether::wire::Kind::Hello, "sent {:?}", next.kind);
    assert!(next.header.incarnation > hello.header.incarnation);
    assert!(
        told.elapsed() < Duration::from_millis(800),
        "reopened after {:?}, not at once (an interval is 1 s)",
        told.elapsed()
    );
    server.reply(
        &next,
        Message::Welcome {
            ttl_ms: 3000,
            tick_ms: 10,
        },
    );
    let client = handle.join().unwrap();
    assert_eq!(client.session().1, next.header.incarnation);
}

#[test]
fn a_client_outlives_a_server_restart() {
    let first = common::ServerProcess::start(&[]);
    let addr = first.addr;
    let mut config = ClientConfig::new(addr, 78);
    config.ttl = Duration::from_secs(1);
    let client = Client::connect(config).unwrap();
    let (_, old) = client.session();
    let before = client.submit("echo", b"before").unwrap();
    assert_eq!(
        client.wait(before, Duration::from_secs(5)).unwrap(),
        tether::TaskStatus::Done(b"before".to_vec())
    );
    drop(first); // killed: every session is gone with it
    let _second = common::ServerProcess::start_at(&addr.to_string(), &[], &[]);
    let restarted = Instant::now();
    while client.session().1 == old {
        assert!(
            restarted.elapsed() < Duration::from_secs(1),
            "not in a new session within one TTL"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The restarted server numbers its tasks afresh, so this task gets the
    // first task's id again: its result must be its own.
    let after = loop {
        match client.submit("echo", b"after") {
            Ok(task) => break task,
            Err(ClientError::SessionLost) => continue,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(after, before, "the restarted server reused the id");
    assert_eq!(
        client.wait(after, Duration::from_secs(5)).unwrap(),
        tether::TaskStatus::Done(b"after".to_vec())
    );
    client.bye().unwrap();
}
