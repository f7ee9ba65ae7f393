//! tether inside your own program: an embedded server with a custom job,
//! and a client that uses it. The job downloads nothing and sleeps instead,
//! but it behaves as a real one should: it checks its cancel flag between
//! steps, so when its client goes away the work stops within a step.
//!
//! ```sh
//! cargo run --example embedded
//! ```

use std::time::Duration;

use tether::{Client, ClientConfig, ClientEvent, PayloadRule, Server, TaskStatus};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = Server::builder()
        .listen("127.0.0.1:0".parse()?)
        .ttl_bounds(Duration::from_millis(100), Duration::from_secs(60))
        .job("fetch-pages", PayloadRule::Exactly(4), |ctx| {
            let pages = u32::from_be_bytes(ctx.payload().try_into().unwrap());
            let mut fetched = Vec::new();
            for page in 0..pages {
                // Stand-in for real work: 50 ms a page. sleep() returns
                // Err as soon as the task is cancelled, and `?` stops here.
                ctx.sleep(Duration::from_millis(50))?;
                fetched.push(page as u8);
            }
            Ok(fetched)
        })
        .standard_jobs()
        .bind()?
        .spawn()?;
    println!("embedded server on {}", server.local_addr());

    // A client that stays: its task runs to the end.
    let mut config = ClientConfig::new(server.local_addr(), 1);
    config.ttl = Duration::from_millis(500);
    let client = Client::connect(config.clone())?;
    let task = client.submit("fetch-pages", &5u32.to_be_bytes())?;
    let status = client.wait(task, Duration::from_secs(10))?;
    println!("task {task} while heartbeating: {status:?}");
    assert_eq!(status, TaskStatus::Done(vec![0, 1, 2, 3, 4]));

    // A client that goes silent: the server cancels its task, reason
    // expired, about a TTL after its last heartbeat.
    config.client_id = 2;
    let silent = Client::connect(config)?;
    let long = silent.submit("fetch-pages", &1000u32.to_be_bytes())?;
    std::thread::sleep(Duration::from_millis(200));
    silent.pause_heartbeats(true);
    match silent.next_event(Duration::from_secs(5)) {
        Some(ClientEvent::TaskEnded { task, status }) if task == long => {
            println!("task {task} after the client went quiet: {status:?}");
        }
        other => println!("unexpected: {other:?}"),
    }

    client.bye()?;
    let report = server.shutdown()?;
    println!(
        "stopped: {} tasks done, {} cancelled",
        report.stats.tasks_done, report.stats.tasks_cancelled
    );
    Ok(())
}
