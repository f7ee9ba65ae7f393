//! tether: a UDP heartbeat monitor that runs each client's tasks exactly as
//! long as the client keeps heartbeating.
#![deny(unsafe_code)]

pub mod engine;
pub mod wheel;
pub mod wire;
