//! What can go wrong, and how a shutdown ended.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::engine::{self, ConfigError, TaskId};

/// Why the server could not start or had to stop.
#[derive(Debug)]
#[non_exhaustive]
pub enum ServerError {
    /// A keyless server was asked to bind a non-loopback address.
    InsecureBind(SocketAddr),
    /// The socket could not be created or bound.
    Bind(SocketAddr, io::Error),
    /// Polling, signal registration or thread creation failed.
    Io(&'static str, io::Error),
    /// A second signal arrived during a graceful shutdown.
    Aborted {
        /// Tasks that had not stopped.
        unfinished: usize,
    },
    /// The configuration breaks a rule; the error says which.
    InvalidConfig(ConfigError),
    /// The server's thread panicked (a bug: please report it).
    Panicked,
    /// A job given to the builder could not be registered (a duplicate or
    /// invalid name).
    Job(crate::pool::RegistryError),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::InsecureBind(addr) => write!(
                f,
                "refusing to listen on {addr} without a key: anyone who can reach it could act as \
                 any client; give --key-file, listen on a loopback address, or pass \
                 --insecure-bind if this network is trusted"
            ),
            ServerError::Bind(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            ServerError::Io(what, e) => write!(f, "{what}: {e}"),
            ServerError::InvalidConfig(rule) => write!(f, "invalid configuration: {rule}"),
            ServerError::Panicked => f.write_str("the server thread panicked"),
            ServerError::Job(e) => write!(f, "cannot register the job: {e}"),
            ServerError::Aborted { unfinished } => write!(
                f,
                "second signal: stopped at once with {unfinished} task(s) still running"
            ),
        }
    }
}

impl std::error::Error for ServerError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ServerError::Bind(_, e) | ServerError::Io(_, e) => Some(e),
            ServerError::InvalidConfig(e) => Some(e),
            ServerError::Job(e) => Some(e),
            _ => None,
        }
    }
}

/// How a graceful shutdown ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Tasks that were still running, ignoring their flag, when the grace
    /// period ran out.
    pub ignored_cancel: Vec<TaskId>,
    /// The engine's counters at the end (summed over the shards).
    pub stats: engine::Stats,
}

impl ShutdownReport {
    /// Adds another shard's report to this one.
    pub fn absorb(&mut self, other: ShutdownReport) {
        self.ignored_cancel.extend(other.ignored_cancel);
        self.stats += other.stats;
    }
}
