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
//! | `batch` | `recvmmsg` / `sendmmsg` behind a safe interface (Linux) | syscalls |
#![deny(unsafe_code)]
#![warn(missing_docs)]

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
pub use server::{Server, ServerConfig, ServerError, ServerHandle};
pub use wire::{CancelOutcome, CancelReason, MacKey, RejectCode};
