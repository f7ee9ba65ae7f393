//! Try tether against a running server (`cargo run --release -- serve`):
//! run a task while heartbeating, then go silent and watch the server cancel
//! the next task with reason `expired`.
//!
//! ```sh
//! cargo run --example try_it              # talks to 127.0.0.1:7900
//! cargo run --example try_it -- 127.0.0.1:7901
//! ```

use std::time::Duration;

use tether::{Client, ClientConfig, ClientEvent};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7900".into())
        .parse()?;
    let mut config = ClientConfig::new(server, std::process::id().into());
    config.ttl = Duration::from_secs(1);
    let client = Client::connect(config)?;
    let (client_id, incarnation) = client.session();
    println!(
        "session {client_id}/{incarnation} open, TTL {:?}, server tick {:?}",
        client.ttl(),
        client.tick()
    );

    let task = client.submit("sleep", &500u32.to_be_bytes())?;
    println!("task {task}: sleep 500 ms while we heartbeat...");
    println!(
        "task {task}: {:?}",
        client.wait(task, Duration::from_secs(10))?
    );
    if let Some(rtt) = client.rtt() {
        println!("heartbeat round trip {rtt:?}");
    }

    let task = client.submit("sleep", &60_000u32.to_be_bytes())?;
    println!("task {task}: sleep 60 s, but we stop heartbeating now...");
    client.pause_heartbeats(true);
    match client.next_event(Duration::from_secs(10)) {
        Some(ClientEvent::TaskEnded { task, status }) => {
            let silent = client.last_sent().elapsed();
            println!("task {task}: {status:?}, {silent:?} after our last datagram");
        }
        other => println!("unexpected: {other:?}"),
    }
    Ok(())
}
