//! Stopping a server from another thread, and a server running on its own
//! thread.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mio::Waker;

use super::{ServerError, ShutdownReport};

/// Stops a running server from another thread, as SIGTERM would.
#[derive(Clone, Debug)]
pub struct ServerHandle {
    /// Each shard's stop flag and waker.
    pub(super) loops: Vec<(Arc<AtomicBool>, Arc<Waker>)>,
}

impl ServerHandle {
    /// Begins a graceful shutdown (of every shard).
    pub fn shutdown(&self) {
        for (stop, waker) in &self.loops {
            stop.store(true, Ordering::Release);
            let _ = waker.wake();
        }
    }
}

/// A server running on a thread of its own (see [`Server::spawn`](super::Server::spawn)).
#[derive(Debug)]
pub struct RunningServer {
    pub(super) addr: SocketAddr,
    pub(super) handle: ServerHandle,
    pub(super) thread: std::thread::JoinHandle<Result<ShutdownReport, ServerError>>,
}

impl RunningServer {
    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// A handle to stop it from anywhere.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }
    /// Stops it gracefully and waits for it: every task is cancelled with
    /// reason `shutdown` and told to its client, within the grace period.
    pub fn shutdown(self) -> Result<ShutdownReport, ServerError> {
        self.handle.shutdown();
        self.thread.join().unwrap_or(Err(ServerError::Panicked))
    }
}
