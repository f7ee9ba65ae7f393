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

    /// Welcomes the client, lets its first BYE end the session but loses
    /// the BYE_ACK, and answers the retry UNKNOWN_SESSION.
    fn lose_the_bye_ack(&mut self) {
        self.welcome();
        self.expect(tether::wire::Kind::Bye);
        let retry = self.expect(tether::wire::Kind::Bye);
        self.unknown_session(&retry);
    }

    /// Welcomes the client, and answers its first BYE UNKNOWN_SESSION (the
    /// session had already ended).
    fn find_no_session_for_the_bye(&mut self) {
        self.welcome();
        let first = self.expect(tether::wire::Kind::Bye);
        self.unknown_session(&first);
    }

    /// Welcomes the client, answers its first heartbeat UNKNOWN_SESSION, and
    /// checks that the very next datagram opens a new session (no heartbeat
    /// for the incarnation just said to be unknown, and no waiting out an
    /// interval of 1 s first), which it welcomes. Returns the new
    /// incarnation.
    fn lose_the_session(&mut self) -> u64 {
        let hello = self.welcome();
        let heartbeat = self.expect(tether::wire::Kind::Heartbeat);
        let told = Instant::now();
        self.unknown_session(&heartbeat);
        let next = self.recv();
        assert_eq!(next.kind, tether::wire::Kind::Hello, "sent {:?}", next.kind);
        assert!(next.header.incarnation > hello.header.incarnation);
        assert!(
            told.elapsed() < Duration::from_millis(800),
            "reopened after {:?}, not at once (an interval is 1 s)",
            told.elapsed()
        );
        self.reply(
            &next,
            Message::Welcome {
                ttl_ms: 3000,
                tick_ms: 10,
            },
        );
        next.header.incarnation
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
    server.lose_the_bye_ack();
    assert!(handle.join().unwrap().is_ok(), "the BYE took effect");
}

#[test]
fn a_bye_that_finds_the_session_already_gone_says_so() {
    let mut server = FakeServer::new();
    let handle = std::thread::spawn({
        let config = config(&server);
        move || Client::connect(config).unwrap().bye()
    });
    server.find_no_session_for_the_bye();
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

/// The async client connecting, then saying BYE.
#[cfg(feature = "tokio")]
async fn async_bye(config: ClientConfig) -> Result<(), ClientError> {
    tether::AsyncClient::connect(config)
        .await
        .unwrap()
        .bye()
        .await
}

#[cfg(feature = "tokio")]
#[test]
fn the_async_client_takes_a_retried_bye_finding_no_session_as_success() {
    let mut server = FakeServer::new();
    let config = config(&server);
    let handle = on_tokio(async_bye(config));
    server.lose_the_bye_ack();
    assert!(handle.join().unwrap().is_ok(), "the BYE took effect");
}

#[cfg(feature = "tokio")]
#[test]
fn the_async_client_says_so_when_its_first_bye_finds_no_session() {
    let mut server = FakeServer::new();
    let config = config(&server);
    let handle = on_tokio(async_bye(config));
    server.find_no_session_for_the_bye();
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
    let reopened = server.lose_the_session();
    assert_eq!(handle.join().unwrap(), reopened);
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
    let reopened = server.lose_the_session();
    let client = handle.join().unwrap();
    assert_eq!(client.session().1, reopened);
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
