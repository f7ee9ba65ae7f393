//! The tokio client (`AsyncClient`) against the real binary on loopback:
//! the blocking client's cases, plus what a handle does when awaited,
//! cancelled or dropped. Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::ServerProcess;
use tether::client::hosts;
use tether::wire::CancelOutcome;
use tether::{AsyncClient, CancelReason, ClientConfig, ClientError, ClientEvent, TaskStatus};
use tokio::time::timeout;

const LIMIT: Duration = Duration::from_secs(10);

async fn connect(server: SocketAddr, id: u64) -> AsyncClient {
    let mut config = ClientConfig::new(server, id);
    config.ttl = Duration::from_secs(1);
    timeout(LIMIT, AsyncClient::connect(config))
        .await
        .expect("connect in time")
        .expect("connect")
}

#[tokio::test]
async fn a_handle_awaits_the_final_state_of_every_standard_job() {
    let server = ServerProcess::start(&[]);
    let client = connect(server.addr, 1).await;
    let run = |job: &'static str, payload: Vec<u8>| {
        let client = &client;
        async move {
            timeout(LIMIT, client.run(job, &payload))
                .await
                .unwrap()
                .unwrap()
        }
    };
    assert_eq!(
        run("echo", b"hi".to_vec()).await,
        TaskStatus::Done(b"hi".to_vec())
    );
    assert_eq!(
        run("sleep", 20u32.to_be_bytes().to_vec()).await,
        TaskStatus::Done(vec![])
    );
    assert_eq!(
        run("fail", b"broke".to_vec()).await,
        TaskStatus::Failed("broke".into())
    );
    assert!(
        matches!(run("panic", b"boom".to_vec()).await, TaskStatus::Failed(e) if e.contains("boom"))
    );
    // A refusal is an error of the submit, not a task.
    match client.submit("no-such-job", b"").await {
        Err(ClientError::Rejected { .. }) => {}
        other => panic!("{:?}", other.map(|t| t.id())),
    }
    timeout(LIMIT, client.bye()).await.unwrap().unwrap();
}

#[tokio::test]
async fn cancelling_through_the_handle_ends_the_task_with_reason_cancelled() {
    let server = ServerProcess::start(&[]);
    let client = connect(server.addr, 2).await;
    let task = client
        .submit("sleep", &60_000u32.to_be_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(task.status().await.unwrap(), TaskStatus::Running);
    assert_eq!(task.cancel().await.unwrap(), CancelOutcome::CancelledNow);
    let started = Instant::now();
    assert_eq!(
        timeout(LIMIT, task).await.unwrap().unwrap(),
        TaskStatus::Cancelled(CancelReason::Cancelled)
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "sleep stops at once"
    );
}

#[tokio::test]
async fn dropping_a_handle_detaches_and_the_task_runs_on() {
    let server = ServerProcess::start(&[]);
    let client = connect(server.addr, 3).await;
    let id = {
        let task = client.submit("sleep", &300u32.to_be_bytes()).await.unwrap();
        task.id()
    }; // the handle is dropped here
    assert_eq!(
        timeout(LIMIT, client.task(id)).await.unwrap().unwrap(),
        TaskStatus::Done(vec![]),
        "it ran to the end"
    );
    // A handle dropped while awaited (a timeout giving up) detaches too.
    let long = client.submit("sleep", &600u32.to_be_bytes()).await.unwrap();
    let id = long.id();
    assert!(timeout(Duration::from_millis(100), long).await.is_err());
    assert_eq!(
        timeout(LIMIT, client.task(id)).await.unwrap().unwrap(),
        TaskStatus::Done(vec![])
    );
}

#[tokio::test]
async fn a_client_outlives_a_server_restart() {
    let first = ServerProcess::start(&[]);
    let addr = first.addr;
    let client = connect(addr, 4).await;
    let (_, old) = client.session();
    assert_eq!(
        timeout(LIMIT, client.run("echo", b"before"))
            .await
            .unwrap()
            .unwrap(),
        TaskStatus::Done(b"before".to_vec())
    );
    drop(first); // killed: every session is gone with it
    let _second = ServerProcess::start_at(&addr.to_string(), &[], &[]);
    let mut reopened = false;
    let until = Instant::now() + LIMIT;
    while !reopened && Instant::now() < until {
        // Heartbeats meet UNKNOWN_SESSION; the client opens a new session.
        if let Ok(Some(ClientEvent::SessionReopened { incarnation })) =
            timeout(Duration::from_millis(200), client.next_event()).await
        {
            assert!(incarnation > old);
            reopened = true;
        }
    }
    assert!(reopened, "no new session after the restart");
    let after = loop {
        match timeout(LIMIT, client.run("echo", b"after")).await.unwrap() {
            Err(ClientError::SessionLost) => continue,
            other => break other.unwrap(),
        }
    };
    assert_eq!(after, TaskStatus::Done(b"after".to_vec()));
}

#[tokio::test]
async fn a_client_whose_host_dies_moves_to_its_next_choice() {
    let mut servers: Vec<ServerProcess> = (0..2).map(|_| ServerProcess::start(&[])).collect();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let order = hosts::rank(5, &addrs);
    let mut config = ClientConfig::with_servers(addrs, 5);
    config.ttl = Duration::from_secs(1);
    let client = timeout(LIMIT, AsyncClient::connect(config))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.server(), order[0]);
    let home = servers.iter().position(|s| s.addr == order[0]).unwrap();
    let killed = Instant::now();
    servers.remove(home);
    loop {
        let event = timeout(LIMIT, client.next_event()).await.unwrap();
        if let Some(ClientEvent::SessionReopened { .. }) = event {
            break;
        }
    }
    assert!(
        killed.elapsed() < Duration::from_secs(2),
        "{:?}",
        killed.elapsed()
    );
    assert_eq!(client.server(), order[1]);
    assert_eq!(
        timeout(LIMIT, client.run("echo", b"moved"))
            .await
            .unwrap()
            .unwrap(),
        TaskStatus::Done(b"moved".to_vec())
    );
}

#[tokio::test]
async fn no_server_answering_is_a_timeout_and_a_dropped_client_says_no_bye() {
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = ClientConfig::new(dead, 6);
    config.retry_after = Duration::from_millis(20);
    config.tries = 3;
    let result = timeout(LIMIT, AsyncClient::connect(config)).await.unwrap();
    assert!(
        matches!(result, Err(ClientError::Timeout)),
        "{:?}",
        result.err()
    );

    // A client dropped says no BYE (that would cancel its task, reason
    // left): its session is still there when the same id opens a new one.
    let server = ServerProcess::start(&[]);
    let client = connect(server.addr, 7).await;
    let task = client
        .submit("sleep", &60_000u32.to_be_bytes())
        .await
        .unwrap()
        .id();
    drop(client);
    let other = connect(server.addr, 7).await; // the same id, a new incarnation
    assert_eq!(
        timeout(LIMIT, other.task(task)).await.unwrap().unwrap(),
        TaskStatus::Cancelled(CancelReason::Replaced)
    );
}

/// `examples/async_client.rs`, built by `cargo test`, run as a user would
/// against `tether serve`.
#[test]
fn the_example_runs_against_the_server() {
    let server = ServerProcess::start(&[]);
    let examples = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/async_client");
    assert!(
        examples.exists(),
        "{} not built (cargo test builds examples)",
        examples.display()
    );
    let output = std::process::Command::new(examples)
        .arg(server.addr.to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains("echo: Done([104, 101, 108, 108, 111])"),
        "{stdout}"
    );
    assert!(stdout.contains("sleep: Cancelled(Cancelled)"), "{stdout}");
}

#[tokio::test]
async fn a_keyed_server_is_reached_with_the_key_and_names_are_looked_up() {
    let key_path = common::key_file("async-keyed", &[7u8; 32]);
    let server = ServerProcess::start(&["--key-file", key_path.to_str().unwrap()]);
    // By name, as a DNS name with the server behind it would be given.
    let mut config = ClientConfig::with_servers(Vec::new(), 9);
    config.names = Some(tether::ServerNames::new(vec![format!(
        "localhost:{}",
        server.addr.port()
    )]));
    config.key = Some(tether::load_key_file(&key_path).unwrap());
    config.ttl = Duration::from_secs(1);
    let client = timeout(LIMIT, AsyncClient::connect(config.clone()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.server(), server.addr);
    assert_eq!(
        timeout(LIMIT, client.run("echo", b"signed"))
            .await
            .unwrap()
            .unwrap(),
        TaskStatus::Done(b"signed".to_vec())
    );
    timeout(LIMIT, client.bye()).await.unwrap().unwrap();
    // Without the key nothing it sends is accepted: no session.
    config.key = None;
    config.retry_after = Duration::from_millis(20);
    config.tries = 3;
    let refused = timeout(LIMIT, AsyncClient::connect(config)).await.unwrap();
    assert!(
        matches!(refused, Err(ClientError::Timeout)),
        "{:?}",
        refused.err()
    );
}
