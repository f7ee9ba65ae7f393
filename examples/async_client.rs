//! The tokio client against a running `tether serve`:
//!
//! ```sh
//! cargo run --release -- serve &
//! cargo run --example async_client            # or: -- 127.0.0.1:7900
//! ```
//!
//! It opens a session (heartbeats run in a spawned task), runs `echo` and
//! awaits its final state, then starts a long `sleep`, gives up on it after
//! half a second and cancels it, and says BYE.

use std::time::Duration;

use tether::{AsyncClient, ClientConfig, TaskStatus};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let server = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7900".into())
        .parse()?;
    let client = AsyncClient::connect(ClientConfig::new(server, 4242)).await?;
    println!("session {:?} on {}", client.session(), client.server());

    // Submit, then await the handle for the final state.
    let echo = client.submit("echo", b"hello").await?;
    let status = echo.await?;
    println!("echo: {status:?}");
    assert_eq!(status, TaskStatus::Done(b"hello".to_vec()));

    // A task we stop waiting for: cancel it (dropping the handle alone
    // would leave it running on the server).
    let sleep = client.submit("sleep", &60_000u32.to_be_bytes()).await?;
    if tokio::time::timeout(Duration::from_millis(500), client.task(sleep.id()))
        .await
        .is_err()
    {
        sleep.cancel().await?;
        println!("sleep: {:?}", sleep.await?);
    }

    client.bye().await?;
    Ok(())
}
