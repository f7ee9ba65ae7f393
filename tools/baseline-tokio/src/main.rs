//! The baseline tether is measured against: what a Rust user would write
//! instead, an idiomatic tokio server with a `DelayQueue` of session
//! deadlines, one `recv_from` per datagram, a `HashMap` of sessions.
//!
//! It speaks as much of the protocol as `tether-load` exercises, with the
//! same codec (`tether::wire`): HELLO → WELCOME, HEARTBEAT (→ HEARTBEAT_ACK),
//! SUBMIT → ACCEPTED (the task is only recorded), expiry → TASK_STATE
//! cancelled(expired) for the session's task, UNKNOWN_SESSION otherwise, and
//! the replay window. Keyless. It is a yardstick, not a server to deploy.
//!
//! Three ways to run the same loop, `--flavor`:
//!
//! - `current-thread` (default): a `current_thread` runtime: the loop and
//!   the timer on one thread, its best form for a single socket.
//! - `spawned`: a multi-threaded runtime with the loop `tokio::spawn`ed.
//! - `main`: what `#[tokio::main]` gives, the loop inside `block_on` on the
//!   main thread of a multi-threaded runtime (a worker notices readiness
//!   and wakes the main thread: both threads' CPU counts).
//!
//! `--recv-buffer BYTES` (default 4 MiB, as tether asks for) sets
//! `SO_RCVBUF` (capped by `net.core.rmem_max`).
//!
//! ```sh
//! cargo run --release --manifest-path tools/baseline-tokio/Cargo.toml -- 127.0.0.1:7901
//! cargo run --release --bin tether-load -- --server 127.0.0.1:7901 --clients 100000 \
//!     --silent 0.01 --pid $(pgrep -n baseline-tokio)
//! ```

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio_util::time::{delay_queue, DelayQueue};

use tether::wire::{
    CancelReason, Datagram, Flags, Header, Message, ReplayWindow, TaskReport, MAX_DATAGRAM,
};

struct Session {
    incarnation: u64,
    key: delay_queue::Key,
    addr: SocketAddr,
    ttl: Duration,
    replay: ReplayWindow,
    tx_seq: u32,
    task: Option<u64>,
}

impl Session {
    fn header(&mut self, client_id: u64) -> Header {
        self.tx_seq += 1;
        Header {
            flags: Flags::empty(),
            client_id,
            incarnation: self.incarnation,
            seq: self.tx_seq,
        }
    }
}

async fn send(socket: &UdpSocket, to: SocketAddr, header: Header, message: Message<'_>) {
    let mut buf = [0u8; MAX_DATAGRAM];
    if let Ok(n) = (Datagram { header, message }).emit(None, &mut buf) {
        let _ = socket.send_to(&buf[..n], to).await;
    }
}

fn main() -> std::io::Result<()> {
    let mut listen = "127.0.0.1:7901".to_owned();
    let mut flavor = "current-thread".to_owned();
    let mut recv_buffer = 4usize << 20;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--flavor" => flavor = args.next().unwrap_or_default(),
            "--recv-buffer" => {
                recv_buffer = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--recv-buffer takes a number of bytes")
            }
            _ => listen = arg,
        }
    }
    let addr: SocketAddr = listen.parse().expect("listen on IP:PORT");
    let std_socket = {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            None,
        )?;
        let _ = s.set_recv_buffer_size(recv_buffer);
        s.bind(&addr.into())?;
        s.set_nonblocking(true)?;
        std::net::UdpSocket::from(s)
    };
    match flavor.as_str() {
        "current-thread" => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(serve(std_socket)),
        "spawned" => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                tokio::spawn(serve(std_socket))
                    .await
                    .expect("the loop panicked")
            })
        }
        "main" => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(serve(std_socket)),
        other => panic!("--flavor current-thread, spawned or main, not {other:?}"),
    }
}

async fn serve(socket: std::net::UdpSocket) -> std::io::Result<()> {
    let socket = UdpSocket::from_std(socket)?;
    println!("listening on {}", socket.local_addr()?);
    let mut sessions: HashMap<u64, Session> = HashMap::new();
    let mut deadlines: DelayQueue<u64> = DelayQueue::new();
    let mut next_task = 1u64;
    let mut buf = vec![0u8; MAX_DATAGRAM + 1];
    loop {
        tokio::select! {
            received = socket.recv_from(&mut buf) => {
                let Ok((n, from)) = received else { continue };
                let Ok(d) = Datagram::decode(&buf[..n], None) else { continue };
                let h = d.header;
                if let Message::Hello { ttl_ms, .. } = d.message {
                    let ttl = Duration::from_millis(u64::from(ttl_ms.clamp(100, 3_600_000)));
                    let known = sessions.get(&h.client_id).map(|s| s.incarnation);
                    if known.is_some_and(|i| i >= h.incarnation) {
                        continue;
                    }
                    if let Some(old) = sessions.remove(&h.client_id) {
                        deadlines.remove(&old.key);
                    }
                    let key = deadlines.insert(h.client_id, ttl);
                    let mut session = Session {
                        incarnation: h.incarnation,
                        key,
                        addr: from,
                        ttl,
                        replay: ReplayWindow::new(h.seq),
                        tx_seq: 0,
                        task: None,
                    };
                    let header = session.header(h.client_id);
                    sessions.insert(h.client_id, session);
                    let welcome = Message::Welcome { ttl_ms: ttl.as_millis() as u32, tick_ms: 1 };
                    send(&socket, from, header, welcome).await;
                    continue;
                }
                let Some(session) = sessions
                    .get_mut(&h.client_id)
                    .filter(|s| s.incarnation == h.incarnation)
                else {
                    let header = Header { flags: Flags::empty(), ..h };
                    send(&socket, from, header, Message::UnknownSession).await;
                    continue;
                };
                if session.replay.accept(h.seq).is_err() {
                    continue;
                }
                session.addr = from;
                deadlines.reset(&session.key, session.ttl);
                match d.message {
                    Message::Heartbeat if h.flags.contains(Flags::ACK) => {
                        let header = session.header(h.client_id);
                        send(&socket, from, header, Message::HeartbeatAck { acked_seq: h.seq }).await;
                    }
                    Message::Submit { request_id, .. } => {
                        let task_id = *session.task.get_or_insert_with(|| {
                            next_task += 1;
                            next_task
                        });
                        let header = session.header(h.client_id);
                        send(&socket, from, header, Message::Accepted { request_id, task_id }).await;
                    }
                    _ => {}
                }
            }
            // An empty DelayQueue answers Ready(None) at once: polled
            // anyway, the loop would never sleep (and a current_thread
            // runtime would never drive its I/O).
            expired = std::future::poll_fn(|cx| deadlines.poll_expired(cx)), if !deadlines.is_empty() => {
                let Some(expired) = expired else { continue };
                let client_id = expired.into_inner();
                if let Some(mut session) = sessions.remove(&client_id) {
                    if let Some(task_id) = session.task {
                        let header = session.header(client_id);
                        let report = TaskReport::Cancelled(CancelReason::Expired);
                        send(&socket, session.addr, header, Message::TaskState { task_id, report }).await;
                    }
                }
            }
        }
    }
}
