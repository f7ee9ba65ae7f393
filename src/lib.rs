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
//!     })?
//!     .job("refuse", PayloadRule::Any, |_| Err(JobError::from("no")))?
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
//! The crate is layered so the rules live in code that does no I/O:
//!
//! | module | does | I/O |
//! |---|---|---|
//! | [`wire`] | encode / decode / MAC / replay window | none |
//! | [`wheel`] | hashed timing wheel over slab indices | none |
//! | [`engine`] | sessions and tasks: datagrams and time in, replies and task commands out | none |
//! | [`pool`] | worker threads running named jobs with cancel flags | threads |
//! | [`server`] | the mio loop: socket, clock, signals, pool | all of it |
//! | [`client`] | a blocking client | socket, threads |
//! | [`metrics`], [`observe`] | Prometheus metrics, logs, the event stream | HTTP, files |
//! | `batch` | `recvmmsg` / `sendmmsg` behind a safe interface (Linux) | syscalls |
#![deny(unsafe_code)]
#![deny(missing_docs)]

#[cfg(target_os = "linux")]
pub mod batch;
pub mod client;
pub mod engine;
pub mod keyfile;
pub mod metrics;
pub mod observe;
pub mod pool;
pub mod server;
pub mod wheel;
pub mod wire;

pub use client::{
    Client, ClientConfig, ClientError, ClientEvent, Resume, SubmitOptions, TaskStatus,
};
pub use engine::{Engine, PayloadRule, TaskId, Timestamp};
pub use pool::{Cancelled, JobError, JobResult, Registry, TaskContext};
pub use server::{RunningServer, Server, ServerBuilder, ServerConfig, ServerError, ServerHandle};
pub use wire::{CancelOutcome, CancelReason, MacKey, RejectCode};
