//! tether: a UDP heartbeat monitor that runs each client's tasks exactly as
//! long as the client keeps heartbeating.
//!
//! A client opens a session with HELLO and keeps it alive with HEARTBEATs;
//! every datagram pushes the session's deadline out by its TTL. When the
//! heartbeats stop, the TTL runs out and every task of that session is
//! cancelled, cooperatively, with the reason recorded and pushed to the
//! client. The wire protocol is described in `PROTOCOL.md` at the top of the
//! repository.
//!
//! # Embedding
//!
//! Run a server inside your program with your own jobs, and talk to it with
//! the [`Client`]:
//!
//! ```
//! use std::time::Duration;
//! use tether::{Client, ClientConfig, JobError, PayloadRule, Server, TaskStatus};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let server = Server::builder()
//!     .listen("127.0.0.1:0".parse()?)          // any free port
//!     .workers(2)
//!     .job("countdown", PayloadRule::Exactly(4), |ctx| {
//!         let mut n = u32::from_be_bytes(ctx.payload().try_into().unwrap());
//!         while n > 0 {
//!             // Returns early, with Err, the moment the task is cancelled
//!             // (its client went silent, said BYE, or sent CANCEL).
//!             ctx.sleep(Duration::from_millis(1))?;
//!             n -= 1;
//!         }
//!         Ok(b"liftoff".to_vec())
//!     })
//!     .job("refuse", PayloadRule::Any, |_| Err(JobError::new("no")))
//!     .bind()?
//!     .spawn()?;
//!
//! let client = Client::connect(ClientConfig::new(server.local_addr(), 7))?;
//! let task = client.submit("countdown", &3u32.to_be_bytes())?;
//! assert_eq!(client.wait(task, Duration::from_secs(10))?, TaskStatus::Done(b"liftoff".to_vec()));
//! let task = client.submit("refuse", b"")?;
//! assert_eq!(client.wait(task, Duration::from_secs(10))?, TaskStatus::Failed("no".into()));
//! client.bye()?;
//! server.shutdown()?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layers
//!
//! The crate is layered so the rules live in code that does no I/O (see
//! `ARCHITECTURE.md` at the top of the repository):
//!
//! | module | does | I/O |
//! |---|---|---|
//! | `wire` | encode / decode / MAC / replay window | none |
//! | `wheel` | hashed timing wheel over slab indices | none |
//! | `engine` | sessions and tasks: datagrams and time in, replies and task commands out | none |
//! | [`client::ClientSession`] | the client's side of the protocol | none |
//! | `pool` | worker threads running named jobs with cancel flags | threads |
//! | `server` | the mio loop: socket, clock, signals, pool | all of it |
//! | [`client::Client`] | a blocking client over the session | socket, a thread |
//! | `metrics`, `observe` | Prometheus metrics, logs, the event stream | HTTP, files |
//! | `batch` | `recvmmsg` / `sendmmsg` behind a safe interface | syscalls |
//!
//! What a program embedding tether or talking to it uses is exported here
//! at the root (and the clients in [`client`]). The internal modules are
//! public only so the benchmarks, fuzz targets and tools can reach them;
//! they are hidden from these docs and may change in any release.
//!
//! tether runs on Linux: the server reads and writes in batches with
//! `recvmmsg` / `sendmmsg`, which other systems do not have.
#![deny(unsafe_code)]
#![deny(missing_docs)]

#[cfg(not(target_os = "linux"))]
compile_error!(
    "tether needs Linux: its server reads and writes datagrams in batches with recvmmsg and \
     sendmmsg (and steers them with SO_REUSEPORT). Build it on Linux, or in a Linux container."
);

#[doc(hidden)]
pub mod batch;
pub mod client;
#[doc(hidden)]
pub mod engine;
#[doc(hidden)]
pub mod keyfile;
#[doc(hidden)]
pub mod metrics;
#[doc(hidden)]
pub mod observe;
#[doc(hidden)]
pub mod pool;
#[doc(hidden)]
pub mod server;
#[doc(hidden)]
pub mod steer;
#[doc(hidden)]
pub mod wheel;
#[doc(hidden)]
pub mod wire;

#[cfg(feature = "tokio")]
pub use client::{AsyncClient, AsyncTask};
pub use client::{
    Client, ClientConfig, ClientError, ClientEvent, Resume, ServerNames, SubmitOptions, TaskStatus,
};
pub use engine::{Config as EngineConfig, ConfigError, PayloadRule, Stats, TaskId};
pub use keyfile::{load as load_key_file, KeyFileError};
pub use metrics::Metrics;
pub use observe::EventsTarget;
pub use pool::{Cancelled, JobError, JobResult, Registry, RegistryError, TaskContext};
pub use server::{
    Clock, RunningServer, Server, ServerBuilder, ServerConfig, ServerError, ServerHandle,
    ShutdownReport, SystemClock,
};
pub use wire::{CancelOutcome, CancelReason, MacKey, MacKeyError, RejectCode};
