//! The sending side of the simulated clients: their local sockets, the
//! schedule that spreads every client's datagram evenly over each interval,
//! and the batching onto `sendmmsg`.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::batch::SendBatch;
use tether::wire::{Datagram, Flags, Header, MacKey, Message, MAX_DATAGRAM};

use crate::args::Args;
use crate::progress::Progress;
use crate::shared::{Shared, ACCEPTED, REFUSED, SILENT, WELCOMED};

/// Batches datagrams per socket and sends them with `sendmmsg`.
pub struct Sender {
    sockets: Vec<UdpSocket>,
    pending: Vec<Vec<u8>>,
    pending_lens: Vec<Vec<usize>>,
    batch: SendBatch,
    shared: Arc<Shared>,
    pub key: Option<MacKey>,
    seq: Vec<u32>,
    /// When a silent client stops, after the measured phase starts.
    silent_offset_us: Vec<u64>,
    /// The same, on the schedule's clock, once the measured phase started.
    silent_at_us: Vec<u64>,
    sleep_payload: [u8; 4],
    ack_per_10k: u64,
    next_event: u64,
    pub send_errors: u64,
    sent: u64,
    pub bytes_sent: u64,
    /// HELLOs of clients that stay live, to replay as junk.
    pub captured: Vec<Vec<u8>>,
}

const BATCH: usize = 64;

impl Sender {
    pub fn new(
        sockets: Vec<UdpSocket>,
        shared: Arc<Shared>,
        key: Option<MacKey>,
        ack: f64,
    ) -> Sender {
        let n = shared.flags.len();
        let k = sockets.len();
        Sender {
            pending: vec![Vec::with_capacity(BATCH * 64); k],
            pending_lens: vec![Vec::with_capacity(BATCH); k],
            sockets,
            batch: SendBatch::new(BATCH),
            key,
            seq: vec![0; n],
            silent_offset_us: vec![u64::MAX; n],
            silent_at_us: vec![u64::MAX; n],
            sleep_payload: [0; 4],
            ack_per_10k: (ack * 10_000.0).round() as u64,
            next_event: 0,
            send_errors: 0,
            sent: 0,
            bytes_sent: 0,
            captured: Vec::new(),
            shared,
        }
    }

    fn queue(&mut self, i: usize, flags: Flags, message: Message<'_>) {
        self.seq[i] += 1;
        let d = Datagram {
            header: Header {
                flags,
                client_id: self.shared.base_id + i as u64 + 1,
                incarnation: self.shared.incarnation,
                seq: self.seq[i],
            },
            message,
        };
        let s = i % self.sockets.len();
        let buf = &mut self.pending[s];
        let start = buf.len();
        buf.resize(start + MAX_DATAGRAM, 0);
        let n = d
            .emit(self.key.as_ref(), &mut buf[start..])
            .expect("load datagrams are small");
        buf.truncate(start + n);
        if matches!(message, Message::Hello { .. })
            && self.captured.len() < 1000
            && self.silent_offset_us[i] == u64::MAX
        {
            self.captured.push(buf[start..].to_vec());
        }
        self.pending_lens[s].push(n);
        let now = self.shared.now_us();
        self.shared.last_sent_us[i].store(now, Ordering::Release);
        if flags.contains(Flags::ACK) {
            self.shared.ack_seq[i].store(self.seq[i], Ordering::Release);
            self.shared.ack_sent_us[i].store(now, Ordering::Release);
        }
        if self.pending_lens[s].len() >= BATCH {
            self.flush_socket(s);
        }
    }

    fn flush_socket(&mut self, s: usize) {
        let mut offsets = Vec::with_capacity(self.pending_lens[s].len());
        let mut at = 0;
        for &len in &self.pending_lens[s] {
            offsets.push(&self.pending[s][at..at + len]);
            at += len;
        }
        let mut done = 0;
        let mut stalls = 0;
        while done < offsets.len() {
            match self.batch.send(&self.sockets[s], &offsets[done..]) {
                Ok(n) => {
                    self.bytes_sent += offsets[done..done + n]
                        .iter()
                        .map(|d| d.len() as u64)
                        .sum::<u64>();
                    done += n;
                    self.sent += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && stalls < 100 => {
                    // The socket's send buffer is full: back off briefly.
                    stalls += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(_) => {
                    self.send_errors += (offsets.len() - done) as u64;
                    break;
                }
            }
        }
        self.pending[s].clear();
        self.pending_lens[s].clear();
    }

    fn flush(&mut self) {
        for s in 0..self.sockets.len() {
            if !self.pending_lens[s].is_empty() {
                self.flush_socket(s);
            }
        }
    }

    /// Picks the silent clients and when, after the measured phase starts,
    /// each goes quiet: between 10% of the run and a TTL + 2 s before its
    /// end, so every detection falls inside the run. Returns how many.
    pub fn choose_silent(&mut self, args: &Args) -> usize {
        if args.silent <= 0.0 {
            return 0;
        }
        let per_million = (args.silent * 1_000_000.0).round() as u64;
        let run_us = args.duration.as_micros() as u64;
        let lo = run_us / 10;
        let hi = run_us
            .saturating_sub(self.shared.ttl_us + 2_000_000)
            .max(lo + 1);
        let sleep_ms = (args.duration + args.ttl + Duration::from_secs(120)).as_millis();
        self.sleep_payload = (sleep_ms.min(u128::from(u32::MAX)) as u32).to_be_bytes();
        let mut chosen = 0;
        for i in 0..self.seq.len() {
            if mix(i as u64) % 1_000_000 < per_million {
                self.silent_offset_us[i] = lo + mix(i as u64 ^ 0x5eed) % (hi - lo);
                chosen += 1;
            }
        }
        chosen
    }

    /// Runs the schedule until every client is welcomed (or refused) and
    /// every silent client's task accepted, for at least one interval and
    /// at most ten.
    pub fn warm_up(
        &mut self,
        args: &Args,
        schedule_start: Instant,
        silent: usize,
        progress: &Progress,
    ) -> Result<(), String> {
        let n = self.seq.len();
        let interval = args.interval;
        loop {
            let elapsed = schedule_start.elapsed();
            self.run_schedule(
                args,
                schedule_start,
                elapsed + Duration::from_millis(100),
                None,
            );
            let welcomed = self.shared.welcomed.load(Ordering::Acquire);
            let answered = welcomed + self.shared.refused.load(Ordering::Acquire);
            let accepted = self.shared.accepted.load(Ordering::Acquire);
            progress.opening(welcomed, n);
            let elapsed = schedule_start.elapsed();
            if elapsed >= interval && answered >= n && accepted >= silent {
                return Ok(());
            }
            if elapsed >= 10 * interval {
                if welcomed == 0 {
                    return Err(format!(
                        "no WELCOME from {} in ten intervals of HELLO: is `tether serve` running there (and is the key right)?",
                        args.server
                    ));
                }
                // Silent clients whose task was never accepted cannot be
                // detected; they heartbeat like the rest.
                for i in 0..n {
                    if self.shared.flag(i) & ACCEPTED == 0 {
                        self.silent_offset_us[i] = u64::MAX;
                    }
                }
                return Ok(());
            }
        }
    }

    /// Makes the silence times absolute, now that the measured phase starts
    /// `measure_from` after the schedule's start.
    pub fn start_silences(&mut self, measure_from: Duration) {
        let from_us = measure_from.as_micros() as u64;
        for (at, &offset) in self.silent_at_us.iter_mut().zip(&self.silent_offset_us) {
            if offset != u64::MAX {
                *at = from_us + offset;
            }
        }
    }

    /// Every client once per interval, client `i` at offset `i / n` of the
    /// interval, until `until` after `schedule_start`: a HELLO while it is
    /// not welcomed, its SUBMIT while a silent client's task is not yet
    /// accepted, else a heartbeat until its silence begins. Returns the
    /// datagrams sent.
    pub fn run_schedule(
        &mut self,
        args: &Args,
        schedule_start: Instant,
        until: Duration,
        progress: Option<&Progress>,
    ) -> u64 {
        let n = self.seq.len() as u64;
        let interval_us = args.interval.as_micros() as u64;
        let until_us = until.as_micros() as u64;
        let ttl_ms = args.ttl.as_millis().min(u128::from(u32::MAX)) as u32;
        let sent_before = self.sent;
        let measured_from_us = schedule_start.elapsed().as_micros() as u64;
        let mut last_progress = Instant::now();
        let due_at =
            |event: u64| (u128::from(event) * u128::from(interval_us) / u128::from(n)) as u64;
        loop {
            let now_us = schedule_start.elapsed().as_micros() as u64;
            if now_us >= until_us {
                break;
            }
            let mut work = 0;
            while work < 4096 && due_at(self.next_event) <= now_us {
                let due_us = due_at(self.next_event);
                let i = (self.next_event % n) as usize;
                self.next_event += 1;
                work += 1;
                self.take_turn(i, due_us, ttl_ms);
            }
            self.flush();
            if let Some(progress) = progress {
                if last_progress.elapsed() >= Duration::from_secs(1) {
                    last_progress = Instant::now();
                    let done_us = now_us - measured_from_us;
                    let span_us = until_us - measured_from_us;
                    progress.beating(&self.shared, done_us, span_us, self.sent - sent_before);
                }
            }
            if work < 4096 {
                let wait = due_at(self.next_event)
                    .saturating_sub(schedule_start.elapsed().as_micros() as u64);
                std::thread::sleep(Duration::from_micros(wait.clamp(50, 1000)));
            }
        }
        self.sent - sent_before
    }

    /// Client `i`'s turn, due at `due_us` on the schedule's clock.
    /// `next_event` is already past this turn and the ACK draw hashes it as
    /// is: moving the increment would change which heartbeats ask for an ACK.
    fn take_turn(&mut self, i: usize, due_us: u64, ttl_ms: u32) {
        let flags = self.shared.flag(i);
        if flags & REFUSED != 0 {
            return;
        }
        if flags & WELCOMED == 0 {
            self.queue(
                i,
                Flags::empty(),
                Message::Hello {
                    ttl_ms,
                    name: "load",
                },
            );
        } else if self.silent_offset_us[i] != u64::MAX && flags & ACCEPTED == 0 {
            let payload = self.sleep_payload;
            let submit = Message::Submit {
                request_id: 1,
                delay_ms: 0,
                deadline_ms: 0,
                job: "sleep",
                payload: &payload,
            };
            self.queue(i, Flags::empty(), submit);
        } else if due_us >= self.silent_at_us[i] {
            self.shared.set(i, SILENT);
        } else {
            let ack = mix(self.next_event) % 10_000 < self.ack_per_10k;
            let flags = if ack { Flags::ACK } else { Flags::empty() };
            self.queue(i, flags, Message::Heartbeat);
        }
    }
}

/// A 64-bit mixer (splitmix64's finaliser) for cheap, reproducible choices.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `count` non-blocking local sockets, each connected to `addr`, with
/// buffers large enough for a burst of a batch per socket.
pub fn connect_sockets(addr: SocketAddr, count: usize) -> Result<Vec<UdpSocket>, String> {
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        let local: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).map_err(|e| format!("bind a local socket: {e}"))?;
        socket
            .connect(addr)
            .map_err(|e| format!("connect to {addr}: {e}"))?;
        let socket2 = socket2::SockRef::from(&socket);
        let _ = socket2.set_recv_buffer_size(4 << 20);
        let _ = socket2.set_send_buffer_size(4 << 20);
        socket
            .set_nonblocking(true)
            .map_err(|e| format!("socket: {e}"))?;
        sockets.push(socket);
    }
    Ok(sockets)
}
