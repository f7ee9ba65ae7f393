//! The raw sink: the machine's own receive limit, to compare the server's
//! CPU per datagram against.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tether::batch::RecvBatch;
use tether::wire::MAX_DATAGRAM;

use crate::procfs;

/// The machine's own limit: a thread that only receives, in batches of up
/// to 64 (`recvmmsg`), blocking until at least one datagram is there, and
/// counts. With `coalesce`, after a read that found two or more it sleeps
/// that long before the next, as tether's loop does under load: the floor
/// for a reader that batches the way tether does.
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
        let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(4 << 20);
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let addr = socket.local_addr().map_err(|e| e.to_string())?;
        let count = Arc::new(AtomicU64::new(0));
        let tid = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (count, tid, stop) = (Arc::clone(&count), Arc::clone(&tid), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("raw-sink".into())
                .spawn(move || {
                    tid.store(procfs::thread_id(), Ordering::Release);
                    let mut batch = RecvBatch::new(64, MAX_DATAGRAM + 1);
                    while !stop.load(Ordering::Acquire) {
                        if let Ok(n) = batch.recv(&socket, true) {
                            count.fetch_add(n as u64, Ordering::AcqRel);
                            if n >= 2 && !coalesce.is_zero() {
                                std::thread::sleep(coalesce);
                            }
                        }
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

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
