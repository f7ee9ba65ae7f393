//! Datagrams on their way out of one local socket: collected in runs of one
//! kind and size, sent as UDP GSO messages (`UDP_SEGMENT`, up to 64
//! datagrams each, many messages per `sendmmsg`), and the clients' send
//! times stamped once per call, just before it.
//!
//! ```text
//!   queue(client, datagram) ──► group (kind 6, 28 bytes): hb hb hb hb …  ─┐
//!                               group (kind 1, 40 bytes): hello hello …   ├─► sendmmsg: one
//!                               group (kind 3, 45 bytes): submit …       ─┘   message per ≤64
//! ```
//!
//! A run never mixes kinds, nor clients of different shards of a sharded
//! server: the server's steering program reads only the first datagram of
//! a GSO message, so a HELLO riding behind a heartbeat would land on the
//! members' socket, and a client behind another shard's client in that
//! shard. Clients are told apart by client_id, not by source port, so one
//! socket can carry many of them.

use std::net::UdpSocket;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tether::batch::{Segmented, SendBatch, MAX_SEGMENTS};

use crate::shared::{Shared, WELCOMED};

/// Datagrams of one kind and size (and shard), laid end to end, and who
/// sent each.
struct Group {
    kind: u8,
    len: usize,
    shard: u32,
    bytes: Vec<u8>,
    clients: Vec<Sent>,
}

/// A queued datagram's client, and whether it asks for an ACK.
#[derive(Clone, Copy)]
pub struct Sent {
    pub client: u32,
    pub ack: bool,
}

/// How the datagrams leave.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Runs as GSO messages.
    Segmented,
    /// One datagram per `sendmmsg` entry (no GSO, or `--no-gso`).
    Single,
}

/// What one flush did.
#[derive(Default)]
pub struct Flushed {
    pub datagrams: u64,
    pub bytes: u64,
    pub errors: u64,
    /// The kernel refused GSO on this route: switch to [`Mode::Single`].
    pub gso_refused: bool,
}

/// The datagrams waiting for one socket.
#[derive(Default)]
pub struct Outbox {
    groups: Vec<Group>,
    queued: usize,
    /// The server's shards (0 or 1: not sharded).
    shards: u32,
}

/// Datagrams per `sendmmsg` call in single mode, and GSO messages in
/// segmented mode.
const ENTRIES: usize = 64;

impl Outbox {
    pub fn queued(&self) -> usize {
        self.queued
    }

    /// An outbox for a server of `shards` shards.
    pub fn for_shards(shards: u32) -> Outbox {
        Outbox {
            shards,
            ..Outbox::default()
        }
    }

    /// Queues `datagram` from `sent.client`.
    pub fn queue(&mut self, datagram: &[u8], sent: Sent) {
        let kind = datagram[3];
        let len = datagram.len();
        let shard = match datagram.get(8..16) {
            Some(id) if self.shards > 1 => tether::steer::shard_of(
                u64::from_be_bytes(id.try_into().expect("8 bytes")),
                self.shards,
            ),
            _ => 0,
        };
        let group = match self
            .groups
            .iter()
            .position(|g| g.kind == kind && g.len == len && g.shard == shard)
        {
            Some(g) => &mut self.groups[g],
            None => {
                self.groups.push(Group {
                    kind,
                    len,
                    shard,
                    bytes: Vec::with_capacity(len * MAX_SEGMENTS * 4),
                    clients: Vec::with_capacity(MAX_SEGMENTS * 4),
                });
                self.groups.last_mut().expect("just pushed")
            }
        };
        group.bytes.extend_from_slice(datagram);
        group.clients.push(sent);
        self.queued += 1;
    }

    /// Sends everything queued on `socket`. Before each call the clients it
    /// carries are stamped with the time (see [`stamp`]); a full send buffer
    /// is waited out briefly, then what is left counts as errors.
    pub fn flush(
        &mut self,
        socket: &UdpSocket,
        batch: &mut SendBatch,
        mode: Mode,
        shared: &Shared,
    ) -> Flushed {
        let mut out = Flushed::default();
        // (datagrams, their clients) in the order they go out.
        let mut units: Vec<(&[u8], usize, &[Sent])> = Vec::new();
        for g in &self.groups {
            let per_unit = match mode {
                // The kernel takes at most 64 KiB a message.
                Mode::Segmented => MAX_SEGMENTS.min(65_000 / g.len).max(1),
                Mode::Single => 1,
            };
            for (bytes, clients) in g
                .bytes
                .chunks(g.len * per_unit)
                .zip(g.clients.chunks(per_unit))
            {
                units.push((bytes, g.len, clients));
            }
        }
        let mut done = 0;
        let mut stalls = 0;
        while done < units.len() {
            let take = &units[done..(done + ENTRIES).min(units.len())];
            let now_us = shared.now_us();
            for (_, _, clients) in take {
                stamp(shared, clients, now_us);
            }
            let result = match mode {
                Mode::Segmented => {
                    let runs: Vec<Segmented<'_>> = take
                        .iter()
                        .map(|&(bytes, len, _)| Segmented {
                            bytes,
                            segment: len as u16,
                        })
                        .collect();
                    batch.send_segmented(socket, &runs)
                }
                Mode::Single => {
                    let singles: Vec<&[u8]> = take.iter().map(|u| u.0).collect();
                    batch.send(socket, &singles)
                }
            };
            match result {
                Ok(n) => {
                    for (bytes, _, clients) in &take[..n] {
                        out.datagrams += clients.len() as u64;
                        out.bytes += bytes.len() as u64;
                    }
                    done += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && stalls < 100 => {
                    // The socket's send buffer is full: back off briefly.
                    stalls += 1;
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e)
                    if mode == Mode::Segmented
                        && done == 0
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                        ) =>
                {
                    // Nothing left: the caller resends in single mode.
                    out.gso_refused = true;
                    return out;
                }
                Err(_) => {
                    out.errors += units[done..].iter().map(|u| u.2.len() as u64).sum::<u64>();
                    break;
                }
            }
        }
        self.clear();
        out
    }

    fn clear(&mut self) {
        for g in &mut self.groups {
            g.bytes.clear();
            g.clients.clear();
        }
        self.queued = 0;
    }
}

/// Records that `clients` send now: their last send time (the false-expiry
/// and lateness accounting's reference), the ACK send time of those asking
/// for one, and, for a client with an open session, whether a TTL passed
/// since its previous datagram (a gap a loss explains). Gaps between HELLO
/// retries are no gaps in a session.
fn stamp(shared: &Shared, clients: &[Sent], now_us: u64) {
    for sent in clients {
        let i = sent.client as usize;
        let previous = shared.last_sent_us[i].swap(now_us, Ordering::AcqRel);
        let gap =
            previous != 0 && now_us.saturating_sub(previous) + GAP_TOLERANCE_US >= shared.ttl_us;
        if gap && shared.flag(i) & WELCOMED != 0 {
            shared.gap_end_us[i].store(now_us, Ordering::Release);
        }
        if sent.ack {
            shared.ack_sent_us[i].store(now_us, Ordering::Release);
        }
    }
}

/// How much earlier than a full TTL a gap between two sends still counts
/// as one a loss explains: the send times are read before the call that
/// carries them, so each may be early by up to that call's duration.
pub const GAP_TOLERANCE_US: u64 = 2_000;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A datagram of `len` bytes whose kind byte is `kind`, tagged `tag`.
    fn datagram(kind: u8, len: usize, tag: u8) -> Vec<u8> {
        let mut d = vec![tag; len];
        d[3] = kind;
        d
    }

    #[test]
    fn for_a_sharded_server_a_run_never_mixes_shards() {
        let mut outbox = Outbox::for_shards(3);
        for id in 1..=90u64 {
            let mut d = datagram(6, 28, 0);
            d[8..16].copy_from_slice(&id.to_be_bytes());
            outbox.queue(
                &d,
                Sent {
                    client: id as u32,
                    ack: false,
                },
            );
        }
        assert_eq!(outbox.groups.len(), 3);
        for g in &outbox.groups {
            assert!(g.bytes.chunks(g.len).all(|d| {
                let id = u64::from_be_bytes(d[8..16].try_into().unwrap());
                tether::steer::shard_of(id, 3) == g.shard
            }));
        }
    }

    #[test]
    fn runs_keep_to_one_kind_and_size_and_every_datagram_arrives_whole() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // Room for every datagram at once, whatever rmem_default is.
        tether::batch::set_recv_buffer(&rx, 4 << 20).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let shared = Shared::new(300, Duration::from_secs(1), Duration::from_secs(3));
        for mode in [Mode::Segmented, Mode::Single] {
            let mut outbox = Outbox::default();
            // HELLOs (kind 1) and other kinds interleaved, one of them the
            // HELLO's size; more than one GSO message's worth of each.
            let mut queued = Vec::new();
            for i in 0..300u32 {
                let d = match i % 4 {
                    0 => datagram(1, 40, i as u8),
                    1 => datagram(6, 28, i as u8),
                    2 => datagram(6, 44, i as u8),
                    _ => datagram(3, 40, i as u8),
                };
                let sent = Sent {
                    client: i,
                    ack: false,
                };
                outbox.queue(&d, sent);
                queued.push(d);
            }
            assert_eq!(outbox.queued(), 300);
            // The steering program reads a GSO message's first datagram
            // only: a HELLO must never share a message with another kind.
            let groups: Vec<(u8, usize, usize)> = outbox
                .groups
                .iter()
                .map(|g| (g.kind, g.len, g.bytes.len() / g.len))
                .collect();
            assert_eq!(groups, [(1, 40, 75), (6, 28, 75), (6, 44, 75), (3, 40, 75)]);
            assert!(outbox
                .groups
                .iter()
                .all(|g| g.bytes.chunks(g.len).all(|d| d[3] == g.kind)));
            let f = outbox.flush(&tx, &mut SendBatch::new(64), mode, &shared);
            if f.gso_refused {
                // A kernel without UDP GSO: the sender falls back to single
                // datagrams, checked in the next round.
                assert_eq!(outbox.queued(), 300, "nothing sent, nothing lost");
                continue;
            }
            assert_eq!((f.datagrams, f.errors, outbox.queued()), (300, 0, 0));
            let mut got = Vec::new();
            let mut buf = [0u8; 128];
            while got.len() < 300 {
                let n = rx.recv(&mut buf).unwrap();
                got.push(buf[..n].to_vec());
            }
            got.sort();
            queued.sort();
            assert_eq!(got, queued);
            assert!(
                (0..300).all(|i| shared.last_sent_us[i].load(Ordering::Acquire) > 0),
                "every client's send is stamped"
            );
        }
    }

    #[test]
    fn a_gap_of_a_ttl_between_sends_of_an_open_session_is_marked() {
        let shared = Shared::new(3, Duration::from_secs(1), Duration::from_secs(3));
        let sent = |client| Sent { client, ack: false };
        for i in [0, 1] {
            shared.set(i, WELCOMED);
        }
        stamp(&shared, &[sent(0), sent(1), sent(2)], 1_000_000);
        stamp(&shared, &[sent(0), sent(2)], 3_999_000);
        stamp(&shared, &[sent(1)], 3_997_000);
        let gap_end = |i: usize| shared.gap_end_us[i].load(Ordering::Acquire);
        assert_eq!(
            gap_end(0),
            3_999_000,
            "2.999 s: within the tolerance of a TTL"
        );
        assert_eq!(gap_end(1), 0, "2.997 s: short of a TTL");
        assert_eq!(gap_end(2), 0, "not welcomed: HELLO retries, no session");
    }
}
