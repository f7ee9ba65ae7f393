//! `--servers A,B,C`: clients spread over several hosts, each picking its
//! host by rendezvous hashing of its id and moving to the next in its own
//! order when its host has been silent for a TTL, as the Rust and Python
//! clients do (`tether::client::hosts`).
//!
//! ```text
//!   one thread, every client once per --interval (phases spread evenly):
//!     live, heard from within a TTL ── HEARTBEAT (asking an ACK when
//!                                      nothing was heard for half an interval)
//!     live or opening, silent a TTL ── move: next host in its order, new
//!                                      incarnation, HELLO there at once
//!     opening                       ── HELLO again after the backoff
//!   replies (recvmmsg-free: a few tens of thousands a second) mark the
//!   client heard; WELCOME makes it live; UNKNOWN_SESSION to a live client
//!   is a false expiry (it reopens on the same host); a refusal moves it on
//! ```
//!
//! It does not probe between heartbeats as the clients do (every
//! `retry_after` once an ACK is missing): it checks each client once per
//! interval. Run it where nothing is lost, or expect moves the clients
//! would not make.
//!
//! `--kill-at D --pid PID` SIGKILLs one host's server D into the measured
//! phase: the report then tells how long its clients took to be in a
//! session elsewhere, counted from the kill, and where they went. Unlike
//! the one-server mode this plays each client's failover itself, so it
//! sends without GSO and reads no server's /proc or metrics.

use std::io::ErrorKind;
use std::net::{SocketAddr, SocketAddrV6, UdpSocket};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};

use tether::client::{hello_backoff, hosts};
use tether::wire::{Datagram, Flags, Header, MacKey, Message, RejectCode, MAX_DATAGRAM};

use crate::args::Args;
use crate::report::{Json, Percentiles};
use crate::sender::mix;

/// Hosts a client can rank (the order is kept per client in a fixed array).
pub const MAX_HOSTS: usize = 16;

/// One simulated client.
struct Client {
    /// Indices into the server list, in this client's order of preference.
    order: [u8; MAX_HOSTS],
    /// Where in `order` it is now.
    pos: u8,
    incarnation: u64,
    seq: u32,
    live: bool,
    /// When its current host last answered, or when it turned to it (µs on
    /// the run's clock).
    heard_us: u64,
    hello_attempt: u16,
    next_hello_us: u64,
    /// When it last left a host: the moment it gave up on it.
    moved_us: Option<u64>,
    /// Hosts that refused it (full, stopping) since its last WELCOME: once
    /// every host has, it waits out its backoff where it is.
    refusals: u8,
    false_expiry: bool,
}

/// Per host, what the report says.
#[derive(Default, Clone)]
struct HostCount {
    /// Live sessions when the host was killed (or at the end of opening).
    before: usize,
    after: usize,
    moved_from: usize,
    moved_to: usize,
    /// Last datagram heard from it (µs), for "answering at the end".
    last_heard_us: u64,
}

struct Cluster<'a> {
    args: &'a Args,
    servers: Vec<SocketAddr>,
    /// The servers as the sockets address them (IPv4-mapped on a dual-stack
    /// socket).
    destinations: Vec<SocketAddr>,
    key: Option<MacKey>,
    clients: Vec<Client>,
    base_id: u64,
    sockets: Vec<mio::net::UdpSocket>,
    start: Instant,
    ttl_us: u64,
    interval_us: u64,
    hosts: Vec<HostCount>,
    counting: bool,
    killed_us: Option<u64>,
    /// µs from the kill to a WELCOME elsewhere, per moved client.
    since_kill_ms: Vec<f64>,
    /// µs from giving up on a host to a WELCOME on the next.
    move_to_welcome_ms: Vec<f64>,
    false_expiries: usize,
    send_errors: u64,
    sent: u64,
    received: u64,
    scratch: Vec<u8>,
}

/// Runs the multi-host scenario; prints its table (and `--json`).
pub fn run(args: &Args, servers: &[SocketAddr], key: Option<MacKey>) -> Result<(), String> {
    let mut c = Cluster::new(args, servers, key)?;
    c.open()?;
    c.measure()?;
    c.report();
    Ok(())
}

impl<'a> Cluster<'a> {
    fn new(
        args: &'a Args,
        servers: &[SocketAddr],
        key: Option<MacKey>,
    ) -> Result<Cluster<'a>, String> {
        let mut list = servers.to_vec();
        list.sort();
        list.dedup();
        if list.len() > MAX_HOSTS {
            return Err(format!("--servers takes at most {MAX_HOSTS} addresses"));
        }
        let dual = list.iter().any(SocketAddr::is_ipv6);
        let destinations = list
            .iter()
            .map(|&s| match s {
                SocketAddr::V4(v4) if dual => {
                    SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into()
                }
                s => s,
            })
            .collect();
        let sockets = (0..args.sockets.clamp(1, 256))
            .map(|_| open_socket(dual))
            .collect::<Result<Vec<_>, String>>()?;
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        let base_id = (now_ns & 0x0000_ffff_ffff_ffff) << 16;
        let clients = (0..args.clients)
            .map(|i| {
                let id = base_id + i as u64 + 1;
                let mut order = [0u8; MAX_HOSTS];
                for (slot, server) in order.iter_mut().zip(hosts::rank(id, &list)) {
                    *slot = list.iter().position(|&s| s == server).unwrap_or(0) as u8;
                }
                Client {
                    order,
                    pos: 0,
                    incarnation: now_ns,
                    seq: 0,
                    live: false,
                    heard_us: 0,
                    hello_attempt: 0,
                    next_hello_us: 0,
                    moved_us: None,
                    refusals: 0,
                    false_expiry: false,
                }
            })
            .collect();
        Ok(Cluster {
            args,
            hosts: vec![HostCount::default(); list.len()],
            servers: list,
            destinations,
            key,
            clients,
            base_id,
            sockets,
            start: Instant::now(),
            ttl_us: args.ttl.as_micros() as u64,
            interval_us: args.interval.as_micros() as u64,
            counting: false,
            killed_us: None,
            since_kill_ms: Vec::new(),
            move_to_welcome_ms: Vec::new(),
            false_expiries: 0,
            send_errors: 0,
            sent: 0,
            received: 0,
            scratch: vec![0; MAX_DATAGRAM],
        })
    }

    fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    fn host_of(&self, i: usize) -> usize {
        let c = &self.clients[i];
        usize::from(c.order[usize::from(c.pos)])
    }

    /// Runs the schedule until every client is live (at most ten intervals).
    fn open(&mut self) -> Result<(), String> {
        let limit = 10 * self.interval_us.max(self.ttl_us);
        let mut schedule = Schedule::new(self.clients.len(), self.interval_us, 0);
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        self.register(&mut poll)?;
        let mut last_line = 0;
        loop {
            let now = self.now_us();
            let live = self.clients.iter().filter(|c| c.live).count();
            if live == self.clients.len() && now >= self.interval_us {
                break;
            }
            if now >= limit {
                if live == 0 {
                    return Err(format!(
                        "no WELCOME from any of {} in ten intervals: are the servers running there (and is the key right)?",
                        self.server_list()
                    ));
                }
                break;
            }
            self.step(&mut poll, &mut schedule)?;
            if now >= last_line + 1_000_000 {
                last_line = now;
                eprintln!(
                    "opening: {live}/{} clients in a session",
                    self.clients.len()
                );
            }
        }
        self.snapshot_before();
        Ok(())
    }

    /// The measured phase: `--duration` of heartbeats (and the kill).
    fn measure(&mut self) -> Result<(), String> {
        let from = self.now_us();
        let until = from + self.args.duration.as_micros() as u64;
        let kill_at = self.args.kill_at.map(|d| from + d.as_micros() as u64);
        let mut schedule = Schedule::new(self.clients.len(), self.interval_us, from);
        let mut poll = Poll::new().map_err(|e| e.to_string())?;
        self.register(&mut poll)?;
        self.counting = true;
        let mut last_line = from;
        while self.now_us() < until {
            if kill_at.is_some_and(|at| self.now_us() >= at) && self.killed_us.is_none() {
                self.kill()?;
            }
            self.step(&mut poll, &mut schedule)?;
            let now = self.now_us();
            if now >= last_line + 1_000_000 {
                last_line = now;
                self.progress_line(now - from);
            }
        }
        self.counting = false;
        for h in 0..self.hosts.len() {
            self.hosts[h].after = (0..self.clients.len())
                .filter(|&i| self.clients[i].live && self.host_of(i) == h)
                .count();
        }
        Ok(())
    }

    fn register(&mut self, poll: &mut Poll) -> Result<(), String> {
        for (t, s) in self.sockets.iter_mut().enumerate() {
            // A socket registered with an earlier Poll is moved over.
            let _ = poll.registry().deregister(s);
            poll.registry()
                .register(s, Token(t), Interest::READABLE)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Sessions per host now, as "before" figures.
    fn snapshot_before(&mut self) {
        for h in 0..self.hosts.len() {
            self.hosts[h].before = (0..self.clients.len())
                .filter(|&i| self.clients[i].live && self.host_of(i) == h)
                .count();
        }
    }

    fn kill(&mut self) -> Result<(), String> {
        let pid = self
            .args
            .pid
            .ok_or("--kill-at needs --pid (the server to kill)")?;
        self.snapshot_before();
        // SAFETY: kill(2) with a pid the user named and a constant signal;
        // no memory is involved.
        let killed = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        if killed != 0 {
            return Err(format!(
                "cannot kill pid {pid}: {}",
                std::io::Error::last_os_error()
            ));
        }
        self.killed_us = Some(self.now_us());
        eprintln!("killed pid {pid}");
        Ok(())
    }

    /// Reads what has arrived, then gives every client whose turn is due
    /// its turn, then waits for the next turn or a reply.
    fn step(&mut self, poll: &mut Poll, schedule: &mut Schedule) -> Result<(), String> {
        let mut events = Events::with_capacity(64);
        let now = self.now_us();
        let wait = schedule.next_due_us().saturating_sub(now).clamp(0, 2_000);
        poll.poll(&mut events, Some(Duration::from_micros(wait)))
            .map_err(|e| e.to_string())?;
        // Read every socket: cheap with a few sockets, and nothing waits on
        // a readiness edge that was missed.
        for s in 0..self.sockets.len() {
            self.drain(s);
        }
        let now = self.now_us();
        let mut work = 0;
        while work < 4096 {
            let Some(i) = schedule.take_due(now) else {
                break;
            };
            self.turn(i, now);
            work += 1;
        }
        Ok(())
    }

    fn drain(&mut self, s: usize) {
        let mut buf = [0u8; MAX_DATAGRAM + 1];
        loop {
            match self.sockets[s].recv_from(&mut buf) {
                Ok((n, from)) => {
                    self.received += 1;
                    let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                    let now = self.now_us();
                    self.on_datagram(&buf[..n], from, now);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }

    fn on_datagram(&mut self, bytes: &[u8], from: SocketAddr, now: u64) {
        let Ok(d) = Datagram::decode(bytes, self.key.as_ref()) else {
            return;
        };
        let Some(i) = d
            .header
            .client_id
            .checked_sub(self.base_id + 1)
            .map(|i| i as usize)
            .filter(|&i| i < self.clients.len())
        else {
            return;
        };
        let Some(h) = self.servers.iter().position(|&s| s == from) else {
            return;
        };
        self.hosts[h].last_heard_us = now;
        // Only the client's current host and session count: a late reply
        // from a host it left changes nothing.
        if h != self.host_of(i) || d.header.incarnation != self.clients[i].incarnation {
            return;
        }
        let refused = matches!(
            d.message,
            Message::Rejected {
                request_id: 0,
                code: RejectCode::TooManySessions | RejectCode::ShuttingDown,
                ..
            }
        );
        if !refused {
            // A refusal does not keep a client on a host; anything else
            // shows the host answering.
            self.clients[i].heard_us = now;
        }
        match d.message {
            Message::Welcome { .. } if !self.clients[i].live => {
                let counting = self.counting;
                let c = &mut self.clients[i];
                c.live = true;
                c.refusals = 0;
                if let Some(moved) = c.moved_us.filter(|_| counting) {
                    self.move_to_welcome_ms
                        .push(now.saturating_sub(moved) as f64 / 1000.0);
                    if let Some(killed) = self.killed_us.filter(|&k| moved >= k) {
                        self.since_kill_ms
                            .push(now.saturating_sub(killed) as f64 / 1000.0);
                    }
                }
            }
            Message::UnknownSession if self.clients[i].live => {
                if self.counting && !self.clients[i].false_expiry {
                    self.clients[i].false_expiry = true;
                    self.false_expiries += 1;
                }
                // Lost where it is: reopen there.
                let c = &mut self.clients[i];
                c.live = false;
                c.incarnation += 1;
                c.seq = 0;
                c.hello_attempt = 0;
                self.hello(i, now);
            }
            _ if refused => {
                let c = &mut self.clients[i];
                if usize::from(c.refusals) < self.servers.len() {
                    c.refusals += 1;
                    self.move_on(i, now);
                }
                // Else every host refused: its HELLO backoff paces it.
            }
            _ => {}
        }
    }

    /// Client `i`'s turn at `now`.
    fn turn(&mut self, i: usize, now: u64) {
        let c = &self.clients[i];
        if now.saturating_sub(c.heard_us) > self.ttl_us {
            self.move_on(i, now);
        } else if c.live {
            let unheard = now.saturating_sub(c.heard_us) >= self.interval_us / 2;
            let flags = if unheard { Flags::ACK } else { Flags::empty() };
            self.send(i, flags, Message::Heartbeat);
        } else if now >= c.next_hello_us {
            self.hello(i, now);
        }
    }

    /// Gives up on client `i`'s host: the next in its order, a new
    /// incarnation, a HELLO there now.
    fn move_on(&mut self, i: usize, now: u64) {
        let from = self.host_of(i);
        let hosts = self.servers.len() as u8;
        let c = &mut self.clients[i];
        c.pos = (c.pos + 1) % hosts;
        c.incarnation += 1;
        c.seq = 0;
        c.live = false;
        c.heard_us = now;
        c.hello_attempt = 0;
        c.moved_us = Some(now);
        let to = self.host_of(i);
        if self.counting {
            self.hosts[from].moved_from += 1;
            self.hosts[to].moved_to += 1;
        }
        self.hello(i, now);
    }

    fn hello(&mut self, i: usize, now: u64) {
        let ttl_ms = self.args.ttl.as_millis().min(u128::from(u32::MAX)) as u32;
        self.send(
            i,
            Flags::empty(),
            Message::Hello {
                ttl_ms,
                name: "load",
            },
        );
        let c = &mut self.clients[i];
        let random = (i as u64) << 16 ^ u64::from(c.hello_attempt) ^ c.incarnation;
        let wait = hello_backoff(
            self.args.hello_retry,
            self.args.ttl,
            c.hello_attempt.into(),
            mix(random),
        );
        c.hello_attempt = c.hello_attempt.saturating_add(1);
        c.next_hello_us = now + wait.as_micros() as u64;
    }

    fn send(&mut self, i: usize, flags: Flags, message: Message<'_>) {
        let c = &mut self.clients[i];
        c.seq = c.seq.wrapping_add(1).max(1);
        let d = Datagram {
            header: Header {
                flags,
                client_id: self.base_id + i as u64 + 1,
                incarnation: c.incarnation,
                seq: c.seq,
            },
            message,
        };
        let Ok(n) = d.emit(self.key.as_ref(), &mut self.scratch) else {
            return;
        };
        let to = self.destinations[self.host_of(i)];
        let socket = &self.sockets[i % self.sockets.len()];
        match socket.send_to(&self.scratch[..n], to) {
            Ok(_) => self.sent += 1,
            Err(_) => self.send_errors += 1,
        }
    }

    fn progress_line(&self, since_us: u64) {
        let mut per_host = vec![0usize; self.servers.len()];
        let mut opening = 0;
        for i in 0..self.clients.len() {
            if self.clients[i].live {
                per_host[self.host_of(i)] += 1;
            } else {
                opening += 1;
            }
        }
        let moved: usize = self.hosts.iter().map(|h| h.moved_from).sum();
        eprintln!(
            "{:>4}s  sessions per host {per_host:?}  opening {opening}  moved {moved}  false expiries {}",
            since_us / 1_000_000,
            self.false_expiries
        );
    }

    fn server_list(&self) -> String {
        self.servers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Clients not on their first choice among the hosts that answered
    /// in the last TTL: where a fresh client would not have gone.
    fn misplaced(&self) -> usize {
        let now = self.now_us();
        let answering: Vec<bool> = self
            .hosts
            .iter()
            .map(|h| now.saturating_sub(h.last_heard_us) <= self.ttl_us)
            .collect();
        (0..self.clients.len())
            .filter(|&i| {
                let c = &self.clients[i];
                let first = c.order[..self.servers.len()]
                    .iter()
                    .find(|&&h| answering[usize::from(h)]);
                first.is_some_and(|&h| usize::from(h) != self.host_of(i))
            })
            .count()
    }

    fn report(&self) {
        let n = self.clients.len();
        let live = self.clients.iter().filter(|c| c.live).count();
        let misplaced = self.misplaced();
        let since_kill = Percentiles::of(&mut self.since_kill_ms.clone());
        let to_welcome = Percentiles::of(&mut self.move_to_welcome_ms.clone());
        let moved: usize = self.hosts.iter().map(|h| h.moved_from).sum();
        eprintln!();
        eprintln!(
            "{n} clients over {} hosts, TTL {:?}, interval {:?}",
            self.servers.len(),
            self.args.ttl,
            self.args.interval
        );
        eprintln!("  host                      before     after   moved out   moved in");
        for (h, s) in self.servers.iter().enumerate() {
            let c = &self.hosts[h];
            eprintln!(
                "  {:<24} {:>8} {:>9} {:>11} {:>10}",
                s.to_string(),
                c.before,
                c.after,
                c.moved_from,
                c.moved_to
            );
        }
        eprintln!("  in a session at the end   {live} of {n}");
        eprintln!("  moved                     {moved}");
        if self.killed_us.is_some() {
            eprintln!(
                "  kill to a new session     p50 {:.0} ms  p99 {:.0} ms  max {:.0} ms  ({} clients)",
                since_kill.p50, since_kill.p99, since_kill.max, since_kill.count
            );
        }
        eprintln!(
            "  giving up to welcomed     p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
            to_welcome.p50, to_welcome.p99, to_welcome.max
        );
        eprintln!("  false expiries            {}", self.false_expiries);
        eprintln!("  off their HRW choice      {misplaced} (among hosts answering at the end)");
        eprintln!(
            "  datagrams                 {} sent, {} received, {} send errors",
            self.sent, self.received, self.send_errors
        );
        if self.args.json {
            let hosts: Vec<String> = self
                .servers
                .iter()
                .zip(&self.hosts)
                .map(|(s, c)| {
                    let mut j = Json::default();
                    j.str("server", &s.to_string())
                        .num("before", c.before)
                        .num("after", c.after)
                        .num("moved_out", c.moved_from)
                        .num("moved_in", c.moved_to);
                    j.finish()
                })
                .collect();
            let mut j = Json::default();
            j.str("mode", "cluster")
                .num("clients", n)
                .float("ttl_s", self.args.ttl.as_secs_f64())
                .float("interval_s", self.args.interval.as_secs_f64())
                .raw("hosts", &format!("[{}]", hosts.join(",")))
                .num("live_at_end", live)
                .num("moved", moved)
                .raw("kill_to_session_ms", &since_kill.json())
                .raw("give_up_to_welcome_ms", &to_welcome.json())
                .num("false_expiries", self.false_expiries)
                .num("misplaced", misplaced)
                .num("sent", self.sent)
                .num("received", self.received)
                .num("send_errors", self.send_errors);
            println!("{}", j.finish());
        }
    }
}

/// Every client once per interval, client `i` at offset `i / n` of it.
struct Schedule {
    n: u64,
    interval_us: u64,
    from_us: u64,
    next: u64,
}

impl Schedule {
    fn new(n: usize, interval_us: u64, from_us: u64) -> Schedule {
        Schedule {
            n: n.max(1) as u64,
            interval_us,
            from_us,
            next: 0,
        }
    }

    fn due_us(&self, event: u64) -> u64 {
        self.from_us
            + (u128::from(event) * u128::from(self.interval_us) / u128::from(self.n)) as u64
    }

    fn next_due_us(&self) -> u64 {
        self.due_us(self.next)
    }

    fn take_due(&mut self, now_us: u64) -> Option<usize> {
        (self.due_us(self.next) <= now_us).then(|| {
            let i = (self.next % self.n) as usize;
            self.next += 1;
            i
        })
    }
}

fn open_socket(dual_stack: bool) -> Result<mio::net::UdpSocket, String> {
    let socket = if dual_stack {
        let s = socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )
        .map_err(|e| e.to_string())?;
        s.set_only_v6(false).map_err(|e| e.to_string())?;
        s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())
            .map_err(|e| format!("bind a local socket: {e}"))?;
        UdpSocket::from(s)
    } else {
        UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(|e| format!("bind a local socket: {e}"))?
    };
    let sock = socket2::SockRef::from(&socket);
    let _ = sock.set_recv_buffer_size(4 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok(mio::net::UdpSocket::from_std(socket))
}
