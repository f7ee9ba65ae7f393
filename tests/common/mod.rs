//! Shared helpers for the loopback tests: start the real `tether` binary on
//! a free port, and a raw wire-level client for byte-exact scenarios.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tether::wire::{Datagram, Flags, MacKey, Message};

/// A running `tether serve`, killed when dropped.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Lines of stdout after "listening on".
    pub stdout: mpsc::Receiver<String>,
    pub stderr: mpsc::Receiver<String>,
}

impl ServerProcess {
    /// Starts `tether serve --listen 127.0.0.1:0 ARGS` and waits (bounded)
    /// for its "listening on" line.
    pub fn start(args: &[&str]) -> ServerProcess {
        ServerProcess::start_with_env(args, &[])
    }

    /// As `start`, with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        ServerProcess::start_at("127.0.0.1:0", args, env)
    }

    /// As `start`, listening on `listen`. Tests still send to loopback
    /// only: a server on `0.0.0.0` is reached at `127.0.0.1`, see
    /// [`ServerProcess::loopback_addr`].
    pub fn start_at(listen: &str, args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
            .envs(env.iter().copied())
            .arg("serve")
            .args(["--listen", listen])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start tether");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let stderr = child.stderr.take().unwrap();
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = etx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server printed no 'listening on' line");
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        ServerProcess {
            child,
            addr,
            stdout: rx,
            stderr: erx,
        }
    }

    /// The address to send to: the bound one, or loopback in its family
    /// when the server listens on every interface.
    pub fn loopback_addr(&self) -> SocketAddr {
        let mut addr = self.addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        addr
    }

    pub fn pid(&self) -> String {
        self.child.id().to_string()
    }

    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.pid()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits, bounded, for the process to exit.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tether ARGS` to completion (bounded) and returns (exit code, stderr).
pub fn run_tether(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            return (status.code(), err);
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("tether {args:?} did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A client that speaks the wire format by hand.
pub struct Raw {
    pub socket: UdpSocket,
    pub client_id: u64,
    pub incarnation: u64,
    pub seq: u32,
    pub key: Option<MacKey>,
}

impl Raw {
    pub fn new(server: SocketAddr, client_id: u64) -> Raw {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket.connect(server).unwrap();
        Raw {
            socket,
            client_id,
            incarnation: 1_000,
            seq: 0,
            key: None,
        }
    }

    /// Encodes the next datagram (next seq) without sending it.
    pub fn encode(&mut self, flags: Flags, message: Message<'_>) -> Vec<u8> {
        self.seq += 1;
        Datagram::new(flags, self.client_id, self.incarnation, self.seq, message)
            .to_vec(self.key.as_ref())
            .unwrap()
    }

    pub fn send(&mut self, message: Message<'_>) -> Vec<u8> {
        let bytes = self.encode(Flags::empty(), message);
        self.socket.send(&bytes).unwrap();
        bytes
    }

    pub fn send_bytes(&self, bytes: &[u8]) {
        self.socket.send(bytes).unwrap();
    }

    /// The next datagram within `timeout`, if any.
    pub fn recv(&self, timeout: Duration) -> Option<Vec<u8>> {
        self.socket.set_read_timeout(Some(timeout)).unwrap();
        let mut buf = [0u8; 2048];
        match self.socket.recv(&mut buf) {
            Ok(n) => Some(buf[..n].to_vec()),
            Err(_) => None,
        }
    }

    /// Sends and returns the decoded reply (checked with this client's key).
    pub fn ask(&mut self, message: Message<'_>) -> Vec<u8> {
        self.send(message);
        let reply = self.recv(Duration::from_secs(5)).expect("no reply");
        Datagram::decode(&reply, self.key.as_ref()).expect("invalid reply");
        reply
    }
}

/// Decodes a server datagram (with `key` if given) and returns its message.
pub fn message_of<'a>(bytes: &'a [u8], key: Option<&MacKey>) -> Message<'a> {
    Datagram::decode(bytes, key)
        .expect("invalid datagram")
        .message
}

/// A key file with mode 600 in a fresh temp dir.
pub fn key_file(name: &str, secret: &[u8]) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("tether-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("key");
    std::fs::write(&path, secret).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The metrics endpoint's whole response.
pub fn scrape(addr: SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(
        response.starts_with("HTTP/1.1 200") || response.starts_with("HTTP/1.0 200"),
        "{response}"
    );
    response
}

/// The value of the series whose line starts with `series` (name and
/// labels exactly as exported).
pub fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no series {series}"))
        .trim()
        .parse()
        .unwrap()
}

/// The metrics address from the line after "listening on" (needs
/// `--metrics 127.0.0.1:0`).
pub fn metrics_addr(server: &ServerProcess) -> SocketAddr {
    let line = server
        .stdout
        .recv_timeout(Duration::from_secs(10))
        .expect("no metrics line");
    line.strip_prefix("metrics on http://")
        .and_then(|l| l.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("unexpected line {line:?}"))
        .parse()
        .unwrap()
}

/// Waits (bounded) until `name` reaches `at_least`: the loop publishes its
/// counters every 50 ms, so a scrape can lag the events it counts.
pub fn wait_for_metric(
    metrics: &std::sync::Arc<tether::metrics::Metrics>,
    name: &str,
    at_least: f64,
) -> String {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics.render();
        if value(&text, name) >= at_least {
            return text;
        }
        assert!(
            Instant::now() < until,
            "{name} stayed below {at_least}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Binds `builder` on a free loopback port, runs it on a thread of its own,
/// and returns it with its live metrics.
pub fn spawn_embedded(
    builder: tether::ServerBuilder,
) -> (tether::RunningServer, std::sync::Arc<tether::Metrics>) {
    let server = builder
        .listen("127.0.0.1:0".parse().unwrap())
        .bind()
        .expect("bind an embedded server");
    let metrics = server.metrics();
    (server.spawn().expect("spawn the server thread"), metrics)
}
