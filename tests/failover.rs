//! Several hosts on loopback: a client picks its host by rendezvous hashing
//! of its id, and when that host dies it opens a session on the next in its
//! order within two TTLs, where its work goes on. Every wait is bounded.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{run_tether, ServerProcess};
use tether::client::hosts;
use tether::{Client, ClientConfig, ClientEvent, ServerNames, TaskStatus};

const TTL: Duration = Duration::from_secs(1);

fn three_servers() -> Vec<ServerProcess> {
    (0..3).map(|_| ServerProcess::start(&[])).collect()
}

#[test]
fn a_client_whose_host_dies_goes_on_at_its_next_choice_within_two_ttls() {
    let mut servers = three_servers();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let id = 7;
    let order = hosts::rank(id, &addrs);
    let mut config = ClientConfig::with_servers(addrs.clone(), id);
    config.ttl = TTL;
    let client = Client::connect(config).expect("connect");
    assert_eq!(client.server(), order[0]);
    let task = client.submit("echo", b"before").expect("submit");
    assert_eq!(
        client.wait(task, Duration::from_secs(10)).unwrap(),
        TaskStatus::Done(b"before".to_vec())
    );

    let home = servers.iter().position(|s| s.addr == order[0]).unwrap();
    let killed_at = Instant::now();
    servers.remove(home); // killed (SIGKILL): it says nothing to anyone
    let mut moved = None;
    let mut reopened = None;
    while reopened.is_none() && killed_at.elapsed() < 4 * TTL {
        match client.next_event(Duration::from_millis(50)) {
            Some(ClientEvent::Moved { from, to }) => moved = Some((from, to)),
            Some(ClientEvent::SessionReopened { .. }) => reopened = Some(killed_at.elapsed()),
            _ => {}
        }
    }
    assert_eq!(moved, Some((order[0], order[1])));
    let reopened = reopened.expect("a session on the next host");
    assert!(
        reopened <= 2 * TTL,
        "in a session again {reopened:?} after the kill"
    );
    assert_eq!(client.server(), order[1]);
    let task = client
        .submit("echo", b"after")
        .expect("submit on the new host");
    assert_eq!(
        client.wait(task, Duration::from_secs(10)).unwrap(),
        TaskStatus::Done(b"after".to_vec())
    );
    client.bye().expect("bye");
}

#[test]
fn a_first_choice_that_is_down_is_passed_over_when_connecting() {
    let live = ServerProcess::start(&[]);
    // A port nothing listens on: bound and dropped.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // An id that ranks the dead port first.
    let id = (1..1000u64)
        .find(|&id| hosts::rank(id, &[live.addr, dead])[0] == dead)
        .unwrap();
    let mut config = ClientConfig::with_servers(vec![dead, live.addr], id);
    config.ttl = TTL;
    let started = Instant::now();
    let client = Client::connect(config).expect("connect to the live host");
    assert_eq!(client.server(), live.addr);
    assert!(started.elapsed() <= 2 * TTL, "{:?}", started.elapsed());
    client.bye().expect("bye");
}

#[test]
fn the_command_line_client_takes_a_list_and_uses_its_first_choice() {
    let servers = three_servers();
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let list = addrs
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let runtime = std::env::temp_dir().join(format!("tether-failover-{}", std::process::id()));
    std::fs::create_dir_all(&runtime).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .env("XDG_RUNTIME_DIR", &runtime)
        .args(["client", "--server", &list, "--client-id", "99", "hello"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&runtime);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    let host = hosts::rank(99, &addrs)[0];
    assert!(stdout.contains(&format!("host {host}")), "{stdout}");
    // An address that is not one is refused with what to give instead.
    let (code, stderr) = run_tether(&["client", "--server", "nowhere", "hello"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("HOST:PORT"), "{stderr}");
}

#[test]
fn servers_can_be_given_by_name() {
    let server = ServerProcess::start(&[]);
    let names = ServerNames::new(vec![format!("localhost:{}", server.addr.port())]);
    let mut config = ClientConfig::with_servers(Vec::new(), 5);
    config.names = Some(names);
    config.ttl = TTL;
    // localhost may also name ::1, where nothing listens: then the client
    // moves on after a TTL.
    let client = Client::connect(config).expect("connect by name");
    assert_eq!(client.server(), server.addr);
    client.bye().expect("bye");
    // A name with no address is an error that says so.
    let mut config = ClientConfig::with_servers(Vec::new(), 5);
    config.names = Some(ServerNames::new(vec!["localhost".into()]));
    assert!(Client::connect(config).is_err(), "no port");
}
