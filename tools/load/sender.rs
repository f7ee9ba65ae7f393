//! The sending side of the simulated clients: their local sockets, the
//! schedule that spreads every client's datagram evenly over each interval,
//! HELLO retries with backoff in a herd, and the hand-off to the outboxes
//! that send them (see `outbox.rs`).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::batch::SendBatch;
use tether::wire::{Datagram, Flags, Header, MacKey, Message, MAX_DATAGRAM};

use crate::args::Args;
use crate::outbox::{Mode, Outbox, Sent};
use crate::progress::Progress;
use crate::shared::{
    Ids, Shared, ACCEPTED, ANSWERED, CHECKED, FALSE_EXPIRY, REFUSED, SILENT, WELCOMED,
};

/// Builds each client's datagrams on schedule and queues them per socket.
pub struct Sender {
    sockets: Vec<UdpSocket>,
    outboxes: Vec<Outbox>,
    batch: SendBatch,
    pub mode: Mode,
    shared: Arc<Shared>,
    pub key: Option<MacKey>,
    seq: Vec<u32>,
    /// When a silent client stops, after the measured phase starts.
    silent_offset_us: Vec<u64>,
    /// The same, on the schedule's clock, once the measured phase started.
    silent_at_us: Vec<u64>,
    sleep_payload: [u8; 4],
    ack_per_10k: u64,
    loss_per_million: u64,
    next_event: u64,
    /// With `--herd`: HELLO retries by backoff instead of every interval.
    herd: Option<Herd>,
    /// Whether the switch from id order to slot order needs bridging
    /// heartbeats (see `visit`).
    bridging: bool,
    /// `--pace`: each datagram leaves on its own, at its time.
    pace: bool,
    /// During the final check: the share of live clients (per million)
    /// whose heartbeats ask for an ACK until one is answered.
    check_per_million: Option<u64>,
    pub send_errors: u64,
    sent: u64,
    pub bytes_sent: u64,
    pub hellos: u64,
    /// Heartbeats dropped on purpose (`--loss`).
    pub lost: u64,
    /// The kernel refused GSO on this route, so datagrams went one by one.
    pub gso_refused: bool,
    /// HELLOs and heartbeats of clients that stay live, to replay as junk.
    pub captured: Vec<Vec<u8>>,
    captured_hellos: usize,
    scratch: Vec<u8>,
}

/// Whose turn `turn` of interval `lap` is (a slot), and, in the interval
/// of the switch, whose bridging heartbeat goes with it. With shuffled ids
/// (`Ids`) the first interval goes in id order, so the server's session
/// table fills in id order, and every later one in slot order, so the
/// server meets its sessions scattered while the tool walks its own state
/// in order. At the switch a client whose slot comes after its id goes up
/// to two intervals unheard; when the TTL leaves less than an interval's
/// margin over that (`bridging`), such a client also beats at its old time
/// in the second interval, so none goes longer than an interval. With the
/// usual TTL of three intervals or more there are no bridges and the switch
/// adds no traffic (in a herd of a million, half a million datagrams).
fn visit(ids: Option<&Ids>, bridging: bool, lap: u64, turn: usize) -> (usize, Option<usize>) {
    let Some(ids) = ids else {
        return (turn, None);
    };
    match lap {
        0 => (ids.slot_of_id[turn] as usize, None),
        1 => {
            let slot = ids.slot_of_id[turn] as usize;
            (turn, (bridging && slot > turn).then_some(slot))
        }
        _ => (turn, None),
    }
}

/// Queued datagrams per socket before they are sent without waiting for
/// the end of the schedule step.
const FLUSH_AT: usize = 1024;

/// HELLO retries of a herd: each client's first HELLO on its turn in the
/// first interval, then after [`tether::client::hello_backoff`] (the Rust
/// client's own schedule), a new incarnation each round, until welcomed or
/// refused.
struct Herd {
    base: Duration,
    cap: Duration,
    attempts: Vec<u16>,
    retries: RetryWheel,
    due: Vec<u32>,
}

/// Clients due for a retry, in slots of 10 ms over a horizon longer than
/// the longest backoff (so a slot only ever holds one lap's clients).
struct RetryWheel {
    slots: Vec<Vec<u32>>,
    /// The first slot number not yet taken.
    next: u64,
}

const SLOT_US: u64 = 10_000;

impl RetryWheel {
    fn new(horizon: Duration) -> RetryWheel {
        let len = (horizon.as_micros() as u64 / SLOT_US + 2) as usize;
        RetryWheel {
            slots: vec![Vec::new(); len],
            next: 0,
        }
    }

    fn push(&mut self, due_us: u64, client: u32) {
        let len = self.slots.len() as u64;
        let slot = (due_us / SLOT_US).clamp(self.next, self.next + len - 1);
        self.slots[(slot % len) as usize].push(client);
    }

    /// Moves the clients due by `now_us` into `out`.
    fn take_due(&mut self, now_us: u64, out: &mut Vec<u32>) {
        let len = self.slots.len() as u64;
        while self.next <= now_us / SLOT_US {
            out.append(&mut self.slots[(self.next % len) as usize]);
            self.next += 1;
        }
    }
}

impl Sender {
    pub fn new(
        sockets: Vec<UdpSocket>,
        shared: Arc<Shared>,
        key: Option<MacKey>,
        args: &Args,
    ) -> Sender {
        let n = shared.flags.len();
        let k = sockets.len();
        let herd = args.herd.then(|| Herd {
            base: args.hello_retry,
            cap: args.ttl,
            attempts: vec![0; n],
            retries: RetryWheel::new(args.ttl.max(args.hello_retry) + Duration::from_secs(1)),
            due: Vec::new(),
        });
        Sender {
            outboxes: (0..k)
                .map(|_| Outbox::for_shards(args.shards.unwrap_or(1)))
                .collect(),
            sockets,
            batch: SendBatch::new(64),
            mode: if args.no_gso {
                Mode::Single
            } else {
                Mode::Segmented
            },
            key,
            seq: vec![0; n],
            silent_offset_us: vec![u64::MAX; n],
            silent_at_us: vec![u64::MAX; n],
            sleep_payload: [0; 4],
            ack_per_10k: (args.ack * 10_000.0).round() as u64,
            loss_per_million: (args.loss * 1_000_000.0).round() as u64,
            next_event: 0,
            herd,
            bridging: args.ttl < 3 * args.interval,
            check_per_million: None,
            pace: args.pace,
            send_errors: 0,
            sent: 0,
            bytes_sent: 0,
            hellos: 0,
            lost: 0,
            gso_refused: false,
            captured: Vec::new(),
            captured_hellos: 0,
            scratch: vec![0; MAX_DATAGRAM],
            shared,
        }
    }

    fn queue(&mut self, i: usize, flags: Flags, message: Message<'_>) {
        self.queue_marked(i, flags, message, false);
    }

    /// `queue`, and with `check` the datagram is one of the final check's
    /// asks: marked so before it can leave, so its answer cannot arrive
    /// first and be taken for a round trip.
    fn queue_marked(&mut self, i: usize, flags: Flags, message: Message<'_>, check: bool) {
        self.seq[i] += 1;
        let d = Datagram {
            header: Header {
                flags,
                client_id: self.shared.client_id(i),
                incarnation: self.shared.incarnation(i),
                seq: self.seq[i],
            },
            message,
        };
        let n = d
            .emit(self.key.as_ref(), &mut self.scratch)
            .expect("load datagrams are small");
        let bytes = &self.scratch[..n];
        let hello = matches!(message, Message::Hello { .. });
        if hello {
            self.hellos += 1;
        }
        // Datagrams of clients that stay live, to replay as junk: a
        // thousand HELLOs and a thousand heartbeats (each already seen by
        // the server when replayed, so each must be dropped as a replay).
        let beat = matches!(message, Message::Heartbeat);
        let room = if hello {
            self.captured_hellos < 1000
        } else {
            beat && self.captured.len() - self.captured_hellos < 1000
        };
        if room && self.silent_offset_us[i] == u64::MAX {
            self.captured.push(bytes.to_vec());
            self.captured_hellos += usize::from(hello);
        }
        let ack = flags.contains(Flags::ACK);
        if ack {
            self.shared.ack_seq[i].store(self.seq[i], Ordering::Release);
        }
        if check {
            let first = &self.shared.check_from_seq[i];
            if first.load(Ordering::Acquire) == 0 {
                first.store(self.seq[i], Ordering::Release);
            }
            self.shared.set(i, CHECKED);
        }
        // Clients in contiguous blocks per socket: the schedule visits them
        // in order, so a step's datagrams share a few sockets and leave in
        // long GSO runs even at low rates.
        let s = i * self.sockets.len() / self.seq.len();
        self.outboxes[s].queue(
            bytes,
            Sent {
                client: i as u32,
                ack,
            },
        );
        if self.pace || self.outboxes[s].queued() >= FLUSH_AT {
            self.flush_socket(s);
        }
    }

    fn flush_socket(&mut self, s: usize) {
        let mut f =
            self.outboxes[s].flush(&self.sockets[s], &mut self.batch, self.mode, &self.shared);
        if f.gso_refused {
            self.gso_refused = true;
            self.mode = Mode::Single;
            f = self.outboxes[s].flush(&self.sockets[s], &mut self.batch, self.mode, &self.shared);
        }
        self.sent += f.datagrams;
        self.bytes_sent += f.bytes;
        self.send_errors += f.errors;
    }

    fn flush(&mut self) {
        for s in 0..self.sockets.len() {
            if self.outboxes[s].queued() > 0 {
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
            // Shuffled, the measured phase starts once the order switched
            // (by the schedule's progress, not the clock, should the sender
            // be behind).
            let laps = if self.shared.ids.is_some() { 2 } else { 1 };
            let switched = self.next_event >= laps * n as u64;
            if switched && answered >= n && accepted >= silent {
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

    /// Runs the schedule (untimed) until the shuffled order has taken over
    /// from the first interval's index order. Nothing to do unshuffled.
    pub fn settle_order(&mut self, args: &Args, schedule_start: Instant) {
        if self.shared.ids.is_none() {
            return;
        }
        let switched_at = 2 * self.seq.len() as u64;
        while self.next_event < switched_at {
            let step = schedule_start.elapsed() + Duration::from_millis(100);
            self.run_schedule(args, schedule_start, step, None);
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

    /// Every client once per interval, slot `i` at offset `i / n` of the
    /// interval (in the first interval of shuffled ids, by id instead: see
    /// `visit`), until `until` after `schedule_start`: a HELLO while it is
    /// not welcomed (in a herd, only the first; the retries come from the
    /// backoff), its SUBMIT while a silent client's task is not yet
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
            // Every turn due before `until` is taken, even when the thread
            // wakes past it: a turn skipped at the end of the last call
            // (the final check's) would never be taken.
            let past_until = now_us >= until_us;
            if past_until && due_at(self.next_event) >= until_us {
                break;
            }
            self.retry_hellos(now_us, ttl_ms);
            let mut work = 0;
            while work < 4096
                && due_at(self.next_event) <= now_us
                && due_at(self.next_event) < until_us
            {
                let due_us = due_at(self.next_event);
                let (lap, turn) = (self.next_event / n, (self.next_event % n) as usize);
                let (i, bridge) = visit(self.shared.ids.as_ref(), self.bridging, lap, turn);
                self.next_event += 1;
                work += 1;
                self.take_turn(i, due_us, ttl_ms);
                if let Some(j) = bridge {
                    self.bridge(j, due_us);
                }
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
            if work < 4096 && !past_until {
                let due = due_at(self.next_event).min(until_us);
                let wait = due.saturating_sub(schedule_start.elapsed().as_micros() as u64);
                if self.pace && wait < PACE_SPIN_US {
                    // A sleep would wake tens of microseconds late and
                    // send the next few datagrams together.
                    while (schedule_start.elapsed().as_micros() as u64) < due {
                        std::hint::spin_loop();
                    }
                } else if self.pace {
                    // Sleep most of the way, spin the rest.
                    std::thread::sleep(Duration::from_micros(wait - PACE_SPIN_US / 2));
                } else {
                    std::thread::sleep(Duration::from_micros(wait.clamp(50, 1000)));
                }
            }
        }
        self.sent - sent_before
    }

    /// The extra heartbeat of the order's switch (see `visit`), for a
    /// client with an open session that is not yet silent.
    fn bridge(&mut self, i: usize, due_us: u64) {
        let flags = self.shared.flag(i);
        if flags & (WELCOMED | REFUSED | SILENT) == WELCOMED && due_us < self.silent_at_us[i] {
            self.queue(i, Flags::empty(), Message::Heartbeat);
        }
    }

    /// Starts (`Some(share)`, of a million) or ends the final check's ACKs.
    pub fn set_checking(&mut self, per_million: Option<u64>) {
        self.check_per_million = per_million;
    }

    /// Whether client `i`'s heartbeat asks for the final check's ACK: a
    /// chosen live client not yet answered. Silent clients are left out:
    /// their sessions are meant to end.
    fn check_asks(&self, i: usize) -> bool {
        let Some(per_million) = self.check_per_million else {
            return false;
        };
        let live = self.silent_offset_us[i] == u64::MAX;
        let flags = self.shared.flag(i);
        if !live || flags & (ANSWERED | FALSE_EXPIRY) != 0 {
            return false;
        }
        if mix(i as u64 ^ CHECK_SALT) % 1_000_000 >= per_million {
            return false;
        }
        true
    }

    /// With the load stopped: one heartbeat asking for an ACK from every
    /// checked client still unanswered, so a server that was too busy to
    /// answer (or whose answer was lost) is asked again where nothing else
    /// competes. Returns how many asked.
    pub fn ask_unanswered(&mut self) -> usize {
        let mut asked = 0;
        for i in 0..self.seq.len() {
            if self.shared.flag(i) & (CHECKED | ANSWERED | FALSE_EXPIRY) == CHECKED {
                self.queue_marked(i, Flags::ACK, Message::Heartbeat, true);
                asked += 1;
            }
        }
        self.flush();
        asked
    }

    /// Sends a HELLO, a new round, for every herd client whose backoff ran
    /// out and who is still waiting.
    fn retry_hellos(&mut self, now_us: u64, ttl_ms: u32) {
        let Some(herd) = &mut self.herd else {
            return;
        };
        let mut due = std::mem::take(&mut herd.due);
        herd.retries.take_due(now_us, &mut due);
        for &i in &due {
            let i = i as usize;
            if self.shared.flag(i) & (WELCOMED | REFUSED) != 0 {
                continue;
            }
            let tries = self.herd.as_ref().map_or(0, |h| h.attempts[i]);
            if tries.is_multiple_of(HELLO_TRIES) {
                let round = &self.shared.rounds[i];
                round.store(
                    round.load(Ordering::Relaxed).saturating_add(1),
                    Ordering::Release,
                );
            }
            self.hello(i, now_us, ttl_ms);
        }
        due.clear();
        if let Some(herd) = &mut self.herd {
            herd.due = due;
        }
    }

    /// Sends client `i`'s HELLO and, in a herd, schedules its next try.
    fn hello(&mut self, i: usize, now_us: u64, ttl_ms: u32) {
        let hello = Message::Hello {
            ttl_ms,
            name: "load",
        };
        self.queue(i, Flags::empty(), hello);
        if let Some(herd) = &mut self.herd {
            let attempt = herd.attempts[i];
            herd.attempts[i] = attempt.saturating_add(1);
            let random = mix(((i as u64) << 16) ^ u64::from(attempt) ^ 0xbac0_ff00);
            let wait = tether::client::hello_backoff(herd.base, herd.cap, attempt.into(), random);
            herd.retries
                .push(now_us + wait.as_micros() as u64, i as u32);
        }
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
            // In a herd only the first HELLO goes on the schedule.
            let first = self.herd.as_ref().is_none_or(|h| h.attempts[i] == 0);
            if first {
                self.hello(i, due_us, ttl_ms);
            }
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
        } else if mix(self.next_event ^ LOSS_SALT) % 1_000_000 < self.loss_per_million {
            // Lost on the way: the sequence number is spent all the same.
            self.seq[i] += 1;
            self.lost += 1;
        } else {
            let drawn = mix(self.next_event) % 10_000 < self.ack_per_10k;
            let check = self.check_asks(i);
            let flags = if drawn || check {
                Flags::ACK
            } else {
                Flags::empty()
            };
            self.queue_marked(i, flags, Message::Heartbeat, check);
        }
    }
}

const LOSS_SALT: u64 = 0x1055_1055;

/// With `--pace`, waits shorter than this are spun, not slept.
const PACE_SPIN_US: u64 = 200;
/// Salts the draw of the clients the final check asks, so it is not the
/// same draw as the silent clients'.
const CHECK_SALT: u64 = 0xc4ec_c4ec;

/// HELLO tries under one incarnation before a new one: the Rust client's
/// default `tries`.
const HELLO_TRIES: u16 = 8;

/// A 64-bit mixer (splitmix64's finaliser) for cheap, reproducible choices.
pub fn mix(mut x: u64) -> u64 {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Each slot's send times, in turns (n to an interval), over four
    /// intervals.
    fn sends(ids: &Ids, bridging: bool, n: usize) -> Vec<Vec<u64>> {
        let mut sends = vec![Vec::new(); n];
        for event in 0..4 * n as u64 {
            let (lap, turn) = (event / n as u64, (event % n as u64) as usize);
            let (i, bridge) = visit(Some(ids), bridging, lap, turn);
            sends[i].push(event);
            if let Some(j) = bridge {
                sends[j].push(event);
            }
        }
        sends
    }

    fn longest_gap(times: &[u64]) -> u64 {
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap()
    }

    #[test]
    fn shuffled_ids_visit_everyone_once_an_interval_and_no_one_waits_longer() {
        let n = 1000;
        let ids = Ids::shuffled(n);
        assert_eq!(Ids::shuffled(n).id_of_slot, ids.id_of_slot, "a fixed seed");
        let in_place = (0..n).filter(|&s| ids.id_of_slot[s] as usize == s).count();
        assert!(in_place < 10, "the ids really are shuffled");
        let bridged = sends(&ids, true, n);
        for (slot, times) in bridged.iter().enumerate() {
            for lap in 0..4 {
                assert!(
                    times.iter().any(|t| t / n as u64 == lap),
                    "slot {slot} missed interval {lap}"
                );
            }
            assert_eq!(
                times[0],
                u64::from(ids.id_of_slot[slot]),
                "the first interval goes in id order"
            );
            let longest = longest_gap(times);
            assert!(
                longest <= n as u64,
                "slot {slot} went {longest} turns (> an interval) unheard"
            );
        }
        // The bridges are the switch's only extra heartbeats.
        let extra: usize = bridged.iter().map(|t| t.len() - 4).sum();
        assert!(extra > n / 3 && extra < 2 * n / 3, "{extra} bridges");

        // Without bridges (a TTL of three intervals or more): no extra
        // heartbeat, and no gap reaches two intervals.
        let unbridged = sends(&ids, false, n);
        assert!(unbridged.iter().all(|t| t.len() == 4));
        let longest = unbridged.iter().map(|t| longest_gap(t)).max().unwrap();
        assert!(longest < 2 * n as u64 && longest > n as u64, "{longest}");
    }

    #[test]
    fn retry_wheel_hands_out_clients_when_due_and_not_before() {
        let mut wheel = RetryWheel::new(Duration::from_secs(3));
        wheel.push(25_000, 1);
        wheel.push(2_500_000, 2);
        wheel.push(60_000_000, 3); // past the horizon: clamped to its end
        let mut due = Vec::new();
        wheel.take_due(19_999, &mut due);
        assert!(due.is_empty());
        wheel.take_due(29_999, &mut due);
        assert_eq!(due, [1]);
        due.clear();
        wheel.take_due(2_499_999, &mut due);
        assert!(due.is_empty());
        wheel.take_due(3_050_000, &mut due);
        assert_eq!(due, [2, 3]);
        due.clear();
        // A due time already past goes out with the next slot taken.
        wheel.push(0, 4);
        wheel.take_due(3_060_000, &mut due);
        assert_eq!(due, [4]);
    }
}
