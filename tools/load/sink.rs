//! The raw sink: the machine's own receive limit, to compare the server's
//! CPU per datagram against.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether::batch::RecvBatch;
use tether::wire::MAX_DATAGRAM;

use crate::procfs;

/// Datagrams per `recvmmsg`, as tether reads them.
const BATCH: usize = 64;

/// Datagrams a round reads at most: a cap, so a sender that outruns the
/// sink cannot keep it from stopping (at 100K a second a round is 50–200).
const ROUND: usize = 8192;

const SOCKET: mio::Token = mio::Token(0);

/// The machine's own limit: a thread that only receives, in batches of up
/// to 64 (`recvmmsg`), and counts.
///
/// Without `coalesce`, the naive reader: it blocks until at least one
/// datagram is there and takes one batch of what is, a read per wake-up,
/// on a plain `SO_RCVBUF` (capped at `net.core.rmem_max`).
///
/// With `coalesce`, the floor for a reader that batches the way tether's
/// loop does: tether's receive buffer (4 MiB with `SO_RCVBUFFORCE`, which
/// needs root or `CAP_NET_ADMIN`, else capped as above), and rounds that
/// read until a batch comes back short (the socket is empty), then, after
/// a round of two or more, sleep `coalesce`; after a smaller one it waits
/// in `epoll` for the next datagram. It is below tether's loop in every
/// other way: it does nothing with what it reads, never replies, calls
/// `epoll_wait` only when it waits for a datagram (tether polls every
/// turn), and its sleep is never cut short by a timer due.
pub struct Sink {
    pub addr: SocketAddr,
    pub count: Arc<AtomicU64>,
    tid: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    pub fn start(coalesce: Duration) -> Result<Sink, String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let bytes = tether::server::RECV_BUFFER_BYTES;
        if coalesce.is_zero() {
            let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(bytes);
        } else {
            let _ = tether::batch::set_recv_buffer(&socket, bytes);
        }
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let addr = socket.local_addr().map_err(|e| e.to_string())?;
        let reader = if coalesce.is_zero() {
            Reader::Naive(socket)
        } else {
            Reader::InRounds(Rounds::new(socket, coalesce).map_err(|e| format!("raw sink: {e}"))?)
        };
        let count = Arc::new(AtomicU64::new(0));
        let tid = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (count, tid, stop) = (Arc::clone(&count), Arc::clone(&tid), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("raw-sink".into())
                .spawn(move || {
                    tid.store(procfs::thread_id(), Ordering::Release);
                    match reader {
                        Reader::Naive(socket) => read_naively(&socket, &count, &stop),
                        Reader::InRounds(mut rounds) => rounds.read(&count, &stop),
                    }
                })
                .map_err(|e| e.to_string())?
        };
        while tid.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        Ok(Sink {
            addr,
            count,
            tid,
            stop,
            thread: Some(thread),
        })
    }

    pub fn tid(&self) -> u64 {
        self.tid.load(Ordering::Acquire)
    }
}

/// A read per wake-up: block until a datagram is there, take one batch.
fn read_naively(socket: &UdpSocket, count: &AtomicU64, stop: &AtomicBool) {
    let mut batch = RecvBatch::new(BATCH, MAX_DATAGRAM + 1);
    while !stop.load(Ordering::Acquire) {
        if let Ok(n) = batch.recv(socket, true) {
            count.fetch_add(n as u64, Ordering::AcqRel);
        }
    }
}

enum Reader {
    Naive(UdpSocket),
    InRounds(Rounds),
}

/// Rounds as tether's loop takes them under load: read until the socket is
/// empty; after a round of two or more, sleep `coalesce`, else wait for the
/// next datagram.
struct Rounds {
    socket: mio::net::UdpSocket,
    poll: mio::Poll,
    coalesce: Duration,
}

impl Rounds {
    /// Set up before the thread starts, so a failure is the run's error.
    fn new(socket: UdpSocket, coalesce: Duration) -> std::io::Result<Rounds> {
        socket.set_nonblocking(true)?;
        let mut socket = mio::net::UdpSocket::from_std(socket);
        let poll = mio::Poll::new()?;
        poll.registry()
            .register(&mut socket, SOCKET, mio::Interest::READABLE)?;
        Ok(Rounds {
            socket,
            poll,
            coalesce,
        })
    }

    fn read(&mut self, count: &AtomicU64, stop: &AtomicBool) {
        let mut events = mio::Events::with_capacity(4);
        let mut batch = RecvBatch::new(BATCH, MAX_DATAGRAM + 1);
        let mut last_round = 0;
        while !stop.load(Ordering::Acquire) {
            if last_round >= 2 {
                std::thread::sleep(self.coalesce);
            } else {
                match self
                    .poll
                    .poll(&mut events, Some(Duration::from_millis(100)))
                {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        eprintln!("raw sink: polling failed, the sink stops: {e}");
                        return;
                    }
                }
            }
            last_round = 0;
            // A short batch means the socket is empty (`recvmmsg` stops at
            // the first datagram that is not there), as tether's loop reads
            // it; a round ends there, at ROUND datagrams, or at the stop.
            while last_round < ROUND && !stop.load(Ordering::Relaxed) {
                let Ok(n) = batch.recv(&self.socket, false) else {
                    break;
                };
                count.fetch_add(n as u64, Ordering::AcqRel);
                last_round += n;
                if n < BATCH {
                    break;
                }
            }
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
