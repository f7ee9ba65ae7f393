//! The socket: how it is set up, how the loop reads it in batches, and how
//! replies leave in batches.
//!
//! ```text
//!   kernel ─BPF─► members' buffer   ──recvmmsg, 64 a call, all of it──┐
//!          └───► strangers' buffer ──recvmmsg, 512 a turn at most ───┴─► engine
//!   engine ──poll_transmit──► Outgoing slots ──sendmmsg, 64 a call──► kernel
//!                              (kept, in order, while the socket would block)
//! ```

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use mio::net::UdpSocket;
use socket2::{Domain, Protocol, Socket, Type};

use crate::batch::{RecvBatch, SendBatch};
use crate::engine::{Engine, Timestamp};
use crate::wire::MAX_DATAGRAM;

/// Datagrams read per system call.
pub(super) const RECV_BATCH: usize = 64;

/// Datagrams sent per system call.
const SEND_BATCH: usize = 64;

/// Receive buffer the server asks the kernel for.
pub const RECV_BUFFER_BYTES: usize = 4 << 20;

/// Kernel accounting per queued datagram is at least this many bytes (the
/// sk_buff and its data), so a receive buffer of N bytes holds at most
/// N / this many datagrams.
const MIN_DATAGRAM_TRUESIZE: usize = 512;

/// Bytes the kernel charges a queued heartbeat against the receive buffer
/// (its sk_buff and data; measured on Linux 6 at 832 for 28 bytes).
pub const QUEUED_DATAGRAM_COST: usize = 832;

/// About how many heartbeats a receive buffer the kernel reports as
/// `granted` bytes holds: what a stalled server can find queued and still
/// read, rather than lose.
pub fn datagrams_held(granted: usize) -> usize {
    granted / QUEUED_DATAGRAM_COST
}

/// One listening socket: non-blocking, `SO_REUSEPORT` when it is to share
/// its address with the other, with a large receive buffer and arrival
/// stamps on. Returns it with the buffer size the kernel reports.
fn bind_socket(
    addr: SocketAddr,
    recv_buffer: usize,
    reuse_port: bool,
) -> io::Result<(std::net::UdpSocket, usize)> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    socket.set_reuse_port(reuse_port)?;
    // Best effort: unless privileged, the kernel caps it at
    // net.core.rmem_max (and the send buffer at wmem_max).
    let granted = crate::batch::set_recv_buffer(&socket, recv_buffer)?;
    let _ = socket.set_send_buffer_size(RECV_BUFFER_BYTES);
    // Without stamps, a datagram counts as arriving when it is read (the
    // loop's older rule): the server works, judging liveness a little
    // later than it could. `Inlet::new` finds out which it is.
    let _ = crate::batch::set_arrival_stamps(&socket, true);
    socket.bind(&addr.into())?;
    Ok((socket.into(), granted))
}

/// The sockets the server listens on, one address for both.
pub(super) struct Listeners {
    /// Every kind but HELLO; also sends every reply.
    pub(super) members: (std::net::UdpSocket, usize),
    /// HELLO, when the kernel steers it here.
    pub(super) strangers: Option<(std::net::UdpSocket, usize)>,
    /// Why HELLOs share the members' socket, when they do.
    pub(super) unsteered: Option<io::Error>,
}

/// The strangers' receive buffer at most, whatever `--recv-buffer` asks
/// for the members': HELLOs that wait long are retried anyway, and a HELLO
/// flood should pin little kernel memory. About 5,000 HELLOs, some 50 ms
/// of admission.
const STRANGERS_BUFFER_BYTES: usize = RECV_BUFFER_BYTES;

/// Binds the group on `listen`: the members' socket, then the strangers'
/// on the same address with the steering program attached (see
/// `crate::steer`). Where that fails (an old kernel, a sandbox refusing
/// BPF), the group is closed again and one socket, without
/// `SO_REUSEPORT`, takes every datagram, as before. Refuses an address
/// another process already listens on with `SO_REUSEPORT`, before joining
/// its group: joining would share its traffic, and attaching a program
/// would replace its own.
pub(super) fn listen(listen: SocketAddr, recv_buffer: usize) -> io::Result<Listeners> {
    refuse_held(listen)?;
    let members = bind_socket(listen, recv_buffer, true)?;
    let bound = members.0.local_addr()?;
    let strangers =
        bind_socket(bound, recv_buffer.min(STRANGERS_BUFFER_BYTES), true).and_then(|strangers| {
            crate::steer::attach(&members.0, 1)?;
            Ok(strangers)
        });
    match strangers {
        Ok(strangers) => Ok(Listeners {
            members,
            strangers: Some(strangers),
            unsteered: None,
        }),
        Err(e) => {
            // Bound again alone: a lone socket left in a reuseport group
            // would let a later process of the same user take a share of
            // its heartbeats.
            drop(members);
            Ok(Listeners {
                members: bind_socket(bound, recv_buffer, false)?,
                strangers: None,
                unsteered: Some(e),
            })
        }
    }
}

/// Binds the group on `listen` for `shards` shards: a members' and a
/// strangers' socket each, in that order (the steering program's indexes),
/// with the program that picks the shard from the client_id attached.
/// Without the program there is no sharding: a kernel that refuses it
/// fails the bind, saying so.
pub(super) fn listen_sharded(
    listen: SocketAddr,
    recv_buffer: usize,
    shards: u32,
) -> io::Result<Vec<Listeners>> {
    refuse_held(listen)?;
    let first = bind_socket(listen, recv_buffer, true)?;
    let bound = first.0.local_addr()?;
    let mut groups = Vec::with_capacity(shards as usize);
    let mut members = Some(first);
    for _ in 0..shards {
        let members = match members.take() {
            Some(first) => first,
            None => bind_socket(bound, recv_buffer, true)?,
        };
        let strangers = bind_socket(bound, recv_buffer.min(STRANGERS_BUFFER_BYTES), true)?;
        groups.push(Listeners {
            members,
            strangers: Some(strangers),
            unsteered: None,
        });
    }
    crate::steer::attach(&groups[0].members.0, shards).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("--shards {shards} needs the kernel to steer datagrams by client_id (a reuseport BPF program), and it refused: {e}; run with --shards 1"),
        )
    })?;
    Ok(groups)
}

/// Refuses an address another process already listens on with
/// `SO_REUSEPORT`, before joining its group.
fn refuse_held(listen: SocketAddr) -> io::Result<()> {
    if listen.port() != 0 {
        let others = crate::metrics::udp_sockets(&listen).len();
        if others > 0 {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{others} other socket(s) already listen on {listen} with SO_REUSEPORT (another tether?); they would share its traffic"),
            ));
        }
    }
    Ok(())
}

/// Strangers' datagrams (HELLOs) read per turn at most, once the members'
/// socket is empty: new sessions are admitted at the rate the loop
/// sustains, and a herd waits in the strangers' buffer (or is dropped
/// there by the kernel, costing the loop nothing) instead of delaying the
/// members' heartbeats. About a millisecond of work.
pub(super) const STRANGERS_PER_TURN: usize = 512;

/// How long datagrams may have waited in a socket (it was last found empty
/// this long ago) before their kernel stamps are asked for: below it, each
/// counts from its reading, at most this much after it arrived. Past it,
/// stamps are asked for only if an arrival somewhere in the wait could
/// round to an earlier deadline than the reading (the engine's
/// `arrival_can_move_deadlines`: a tick begins within the wait, or some
/// session's TTL is not a whole number of ticks). Also how close a due
/// deadline must be for stamps to be asked for, so that whether a datagram
/// came in time is always judged by its stamp.
pub(super) const STAMPS_NEEDED_AFTER: Duration = Duration::from_millis(1);

/// However busy the members' socket, a batch of strangers is read at least
/// this often: forged member kinds (junk claiming to be a heartbeat shares
/// the members' socket) can slow admission to a batch a tick, never stop it.
pub(super) const STRANGERS_AT_LEAST_EVERY: Duration = Duration::from_millis(10);

/// One listening socket and its read state across turns.
pub(super) struct Inlet {
    pub(super) socket: UdpSocket,
    /// The receive buffer the kernel granted, in bytes.
    pub(super) granted: usize,
    /// Datagrams read per turn at most: everything the receive buffer can
    /// hold, so a turn reads what was queued when it began (and a flood
    /// cannot starve expiry).
    pub(super) budget: usize,
    /// It may hold datagrams not read yet.
    pub(super) pending: bool,
    /// When a read last found it empty (it came back short, or with
    /// nothing): everything read since arrived after that. Read before that
    /// read began, so it is never late.
    pub(super) emptied_at: Instant,
    /// The wall clock then, to tell a step of it from a wait.
    pub(super) emptied_wall: SystemTime,
    /// Whether the kernel hands over arrival stamps now (`None`: it
    /// refused them, so datagrams count from their reading).
    stamping: Option<bool>,
    /// Full batches in a row, across turns.
    full_batches: usize,
    /// Full batches in a row that mean the loop is behind this socket.
    backlog_batches: usize,
}

impl Inlet {
    pub(super) fn new(socket: UdpSocket, granted: usize, now: Instant) -> Inlet {
        let stamping = crate::batch::set_arrival_stamps(&socket, true)
            .ok()
            .map(|()| true);
        Inlet {
            socket,
            stamping,
            granted,
            budget: granted / MIN_DATAGRAM_TRUESIZE + 1024,
            pending: true,
            emptied_at: now,
            emptied_wall: SystemTime::now(),
            full_batches: 0,
            backlog_batches: backlog_batches(granted),
        }
    }

    /// Notes a read of `n` datagrams; returns whether the loop is now
    /// behind this socket.
    pub(super) fn read(&mut self, n: usize) -> bool {
        self.full_batches = if n == RECV_BATCH {
            self.full_batches + 1
        } else {
            0
        };
        self.full_batches >= self.backlog_batches
    }

    /// Has the kernel hand over arrival stamps with the next reads, or not.
    /// A stamp costs a control message per datagram; it only changes a
    /// judgement when a datagram may have waited long across a tick
    /// boundary (see [`STAMPS_NEEDED_AFTER`]) or a deadline falls due about
    /// now.
    pub(super) fn want_stamps(&mut self, on: bool) {
        if self.stamping.is_some_and(|now| now != on) {
            self.stamping = crate::batch::set_arrival_stamps(&self.socket, on)
                .ok()
                .map(|()| on);
        }
    }

    /// Notes that a read found the socket empty; `before` and `wall` were
    /// read before that read began.
    pub(super) fn emptied(&mut self, before: Instant, wall: SystemTime) {
        self.full_batches = 0;
        self.pending = false;
        self.emptied_at = before;
        self.emptied_wall = wall;
    }
}

/// The read side: the listening sockets and the batch they are read into.
pub(super) struct Incoming {
    /// One byte over the limit per slot, so an oversized datagram shows as
    /// such.
    pub(super) batch: RecvBatch,
    /// Each datagram of the batch read last: its index in the batch, source
    /// and arrival, worked out once. The engine walks a batch three times
    /// (two passes of loads it overlaps, then the work), and this keeps
    /// the address parsing and stamp conversion out of the first two.
    pub(super) heard: Vec<(usize, SocketAddr, Option<Timestamp>)>,
    pub(super) members: Inlet,
    pub(super) strangers: Option<Inlet>,
    /// When strangers were last read.
    pub(super) strangers_served_at: Instant,
}

impl Incoming {
    pub(super) fn new(members: Inlet, strangers: Option<Inlet>) -> Incoming {
        Incoming {
            batch: RecvBatch::new(RECV_BATCH, MAX_DATAGRAM + 1),
            heard: Vec::with_capacity(RECV_BATCH),
            members,
            strangers,
            strangers_served_at: Instant::now(),
        }
    }

    /// Whether a socket may hold datagrams not read yet.
    pub(super) fn pending(&self) -> bool {
        self.members.pending || self.strangers.as_ref().is_some_and(|s| s.pending)
    }
}

/// The loop is behind its socket when full `recvmmsg` batches in a row
/// have brought a quarter of what the receive buffer holds (and at least
/// two batches): whether from a flood or a slow iteration, the buffer is
/// then on its way to overflowing, and answers to strangers wait. A burst
/// of a fleet's HELLOs after a restart stays well below it.
fn backlog_batches(granted: usize) -> usize {
    (datagrams_held(granted) / 4 / RECV_BATCH).max(2)
}

/// Room for one `sendmmsg` batch of replies. A reply taken from the engine
/// stays in its slot until the kernel takes it, so a socket that would
/// block keeps the replies in order, and no reply goes back to the engine.
pub(super) struct Outgoing {
    data: Vec<u8>,
    meta: Vec<(SocketAddr, usize)>,
    batch: SendBatch,
    /// Slots holding replies.
    filled: usize,
    /// Of those, the ones the kernel took.
    sent: usize,
}

/// What [`Outgoing::flush`] did.
#[derive(Debug, Default)]
pub(super) struct Flushed {
    pub(super) sent: u64,
    /// Replies the socket refused (an unreachable peer): each loses only
    /// itself.
    pub(super) errors: u64,
    /// The socket would block: wait until it is writable.
    pub(super) blocked: bool,
}

impl Outgoing {
    pub(super) fn new() -> Outgoing {
        Outgoing {
            data: vec![0; SEND_BATCH * MAX_DATAGRAM],
            meta: vec![(SocketAddr::from(([0, 0, 0, 0], 0)), 0); SEND_BATCH],
            batch: SendBatch::new(SEND_BATCH),
            filled: 0,
            sent: 0,
        }
    }

    /// Whether replies taken from the engine wait here to be sent.
    pub(super) fn is_empty(&self) -> bool {
        self.sent == self.filled
    }

    /// Sends replies, a batch per system call, until the engine has none
    /// left or the socket would block.
    pub(super) fn flush(&mut self, socket: &UdpSocket, engine: &mut Engine) -> Flushed {
        let mut done = Flushed::default();
        loop {
            if self.is_empty() && !self.refill(engine) {
                return done;
            }
            let items: Vec<(SocketAddr, &[u8])> = (self.sent..self.filled)
                .map(|i| {
                    let (to, n) = self.meta[i];
                    (to, &self.data[i * MAX_DATAGRAM..i * MAX_DATAGRAM + n])
                })
                .collect();
            match self.batch.send_to(socket, &items) {
                Ok(k) => {
                    done.sent += k as u64;
                    self.sent += k;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    done.blocked = true;
                    return done;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    done.errors += 1;
                    self.sent += 1;
                }
            }
        }
    }

    /// Takes up to a batch of replies from the engine; false if it had none.
    fn refill(&mut self, engine: &mut Engine) -> bool {
        self.filled = 0;
        self.sent = 0;
        while self.filled < SEND_BATCH {
            let i = self.filled;
            let slot = &mut self.data[i * MAX_DATAGRAM..(i + 1) * MAX_DATAGRAM];
            match engine.poll_transmit(slot) {
                Some(meta) => {
                    self.meta[i] = meta;
                    self.filled += 1;
                }
                None => break,
            }
        }
        self.filled > 0
    }
}

/// When each datagram of a batch arrived, on the loop's monotonic clock.
///
/// The kernel stamps a datagram with the wall clock (`CLOCK_REALTIME`) as it
/// arrives; the loop reads both clocks after the read. The time a datagram
/// waited is the wall-clock difference, clamped to `[0, since the socket
/// was last found empty]`: nothing read now can have arrived before that
/// read, so a wall-clock step, either way, can never make a datagram look
/// earlier than it was possible, and a step back makes it look read at
/// once.
#[derive(Debug, Clone, Copy)]
pub(super) struct Arrivals {
    read_wall_ns: u64,
    longest_wait: Duration,
    /// The wall clock kept pace with the monotonic one since the socket
    /// was last found empty: its stamps can be trusted.
    steady: bool,
}

/// How far the wall clock may drift from the monotonic one between two
/// reads before stamps taken across them are not trusted.
const WALL_STEP: Duration = Duration::from_millis(1);

fn wall_ns(wall: SystemTime) -> u64 {
    wall.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Arrivals {
    /// For a read that returned at `read_at` (`read_wall` on the wall
    /// clock) from a socket last found empty at `emptied_at`
    /// (`emptied_wall`).
    pub(super) fn new(
        read_wall: SystemTime,
        read_at: Instant,
        emptied_at: Instant,
        emptied_wall: SystemTime,
    ) -> Arrivals {
        let read_wall_ns = wall_ns(read_wall);
        let longest_wait = read_at.saturating_duration_since(emptied_at);
        let wall_passed = read_wall_ns.abs_diff(wall_ns(emptied_wall));
        let steady =
            wall_passed.abs_diff(longest_wait.as_nanos() as u64) <= WALL_STEP.as_nanos() as u64;
        Arrivals {
            read_wall_ns,
            longest_wait,
            steady,
        }
    }

    /// How long a datagram stamped `stamp_ns` waited before the read;
    /// `None` when the wall clock stepped since the socket was last found
    /// empty (set by hand, or by NTP), so the stamp cannot be placed: the
    /// datagram then counts from its reading.
    pub(super) fn waited(&self, stamp_ns: u64) -> Option<Duration> {
        self.steady.then(|| {
            Duration::from_nanos(self.read_wall_ns.saturating_sub(stamp_ns)).min(self.longest_wait)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datagram_waited_the_wall_clock_difference_within_what_is_possible() {
        let read_at = Instant::now();
        let emptied_at = read_at - Duration::from_millis(100);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let wall_ns = 1_000_000 * 1_000_000_000u64;
        let emptied_wall = wall - Duration::from_millis(100);
        let a = Arrivals::new(wall, read_at, emptied_at, emptied_wall);
        assert_eq!(
            a.waited(wall_ns - 30_000_000),
            Some(Duration::from_millis(30))
        );
        // A stamp older than the last empty read is impossible: clamped.
        assert_eq!(
            a.waited(wall_ns - 60_000_000_000),
            Some(Duration::from_millis(100))
        );
        // One "later" than the read: it was read at once.
        assert_eq!(a.waited(wall_ns + 5_000_000_000), Some(Duration::ZERO));
    }

    #[test]
    fn stamps_across_a_step_of_the_wall_clock_are_not_trusted() {
        let read_at = Instant::now();
        let emptied_at = read_at - Duration::from_millis(100);
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let wall_ns = 1_000_000 * 1_000_000_000u64;
        // 100 ms passed, but the wall clock moved 60 s forward or 2 s back.
        for emptied_wall in [
            wall - Duration::from_secs(60),
            wall + Duration::from_secs(2),
        ] {
            let a = Arrivals::new(wall, read_at, emptied_at, emptied_wall);
            assert_eq!(a.waited(wall_ns - 30_000_000), None);
        }
        // Drift under a millisecond is no step.
        let a = Arrivals::new(
            wall,
            read_at,
            emptied_at,
            wall - Duration::from_micros(100_900),
        );
        assert_eq!(
            a.waited(wall_ns - 30_000_000),
            Some(Duration::from_millis(30))
        );
    }
}
