//! Replies waiting to be sent, encoded as soon as they are decided.
//!
//! All queued datagrams share one ring of bytes: a reply is appended at the
//! back and its bytes leave the front as it is sent, so the space of every
//! reply sent is free again at once, even while the queue never empties
//! (a socket that keeps blocking). The ring keeps its capacity, so the steady
//! state allocates nothing. It is bounded; a reply that does not fit is
//! dropped (and counted by the engine) rather than letting a peer that never
//! reads grow the server's memory. A keyless engine can also hold every
//! address to the bytes it has sent ([`ReplyCredit`]); a reply it has not
//! paid for is not queued.

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use super::credit::ReplyCredit;
use crate::wire::{Datagram, Header, MacKey, Message, MAX_DATAGRAM};

/// A peer address in 19 bytes, alignment 1, instead of `SocketAddr`'s 32:
/// sessions store one each, and a million of them is the design point.
/// IPv6 scope and flow labels are not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct PeerAddr {
    ip: [u8; 16],
    port: [u8; 2],
    v6: bool,
}

impl From<SocketAddr> for PeerAddr {
    #[inline]
    fn from(addr: SocketAddr) -> PeerAddr {
        match addr.ip() {
            IpAddr::V4(ip) => PeerAddr {
                ip: ip.to_ipv6_mapped().octets(),
                port: addr.port().to_ne_bytes(),
                v6: false,
            },
            IpAddr::V6(ip) => PeerAddr {
                ip: ip.octets(),
                port: addr.port().to_ne_bytes(),
                v6: true,
            },
        }
    }
}

impl From<PeerAddr> for SocketAddr {
    fn from(peer: PeerAddr) -> SocketAddr {
        let v6 = Ipv6Addr::from(peer.ip);
        let ip = match (peer.v6, v6.to_ipv4_mapped()) {
            (false, Some(v4)) => IpAddr::V4(v4),
            _ => IpAddr::V6(v6),
        };
        SocketAddr::new(ip, u16::from_ne_bytes(peer.port))
    }
}

struct Queued {
    to: PeerAddr,
    len: u16,
}

pub(crate) struct Outbox {
    /// The queued datagrams' bytes, back to back, oldest first.
    bytes: VecDeque<u8>,
    queue: VecDeque<Queued>,
    /// Datagrams put back by `push_front`; sent before the queue.
    front: Vec<(SocketAddr, Vec<u8>)>,
    max_bytes: usize,
    /// Present when replies are limited to what their address has sent.
    credit: Option<ReplyCredit>,
}

/// Why [`Outbox::push`] did not queue a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotQueued {
    /// The outbox already holds its byte limit.
    Full,
    /// Its address has not sent enough bytes to pay for it.
    NoCredit,
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize, limit_to_credit: bool) -> Outbox {
        Outbox {
            bytes: VecDeque::new(),
            queue: VecDeque::new(),
            front: Vec::new(),
            max_bytes,
            credit: limit_to_credit.then(ReplyCredit::new),
        }
    }

    /// Counts `bytes` that arrived from `from` towards its replies.
    #[inline]
    pub(crate) fn received(&mut self, from: &PeerAddr, bytes: usize) {
        if let Some(credit) = self.credit.as_mut() {
            credit.earn(from, bytes);
        }
    }

    /// Encodes and queues a datagram, unless the outbox is full or its
    /// address cannot pay for it.
    pub(crate) fn push(
        &mut self,
        to: PeerAddr,
        header: &Header,
        message: &Message<'_>,
        key: Option<&MacKey>,
    ) -> Result<(), NotQueued> {
        let datagram = Datagram {
            header: *header,
            message: *message,
        };
        let len = datagram.encoded_len(key.is_some());
        if self.queued_bytes() + len > self.max_bytes {
            return Err(NotQueued::Full);
        }
        if let Some(credit) = self.credit.as_mut() {
            if !credit.spend(&to, len) {
                return Err(NotQueued::NoCredit);
            }
        }
        let mut encoded = [0u8; MAX_DATAGRAM];
        match datagram.emit(key, &mut encoded) {
            Ok(n) => {
                debug_assert_eq!(n, len);
                self.bytes.extend(&encoded[..n]);
                self.queue.push_back(Queued { to, len: n as u16 });
                Ok(())
            }
            Err(e) => {
                // The engine bounds every field before it builds a reply, so
                // this is a bug; drop the reply rather than the server.
                debug_assert!(false, "cannot encode {message:?}: {e}");
                Err(NotQueued::Full)
            }
        }
    }

    pub(crate) fn push_front(&mut self, to: PeerAddr, datagram: &[u8]) {
        self.front.push((to.into(), datagram.to_vec()));
    }

    pub(crate) fn pop(&mut self, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        if let Some((to, bytes)) = self.front.pop() {
            buf[..bytes.len()].copy_from_slice(&bytes);
            return Some((to, bytes.len()));
        }
        let q = self.queue.pop_front()?;
        let len = usize::from(q.len);
        for (out, byte) in buf[..len].iter_mut().zip(self.bytes.drain(..len)) {
            *out = byte;
        }
        Some((q.to.into(), len))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.front.is_empty()
    }

    /// Bytes of the datagrams waiting.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_addr_round_trips_v4_and_v6() {
        for s in [
            "127.0.0.1:7900",
            "[::1]:7900",
            "[::ffff:10.0.0.1]:1",
            "0.0.0.0:0",
        ] {
            let addr: SocketAddr = s.parse().unwrap();
            assert_eq!(SocketAddr::from(PeerAddr::from(addr)), addr, "{s}");
        }
    }

    #[test]
    fn bounded_and_reused() {
        let header = Header {
            flags: crate::wire::Flags::empty(),
            client_id: 1,
            incarnation: 1,
            seq: 1,
        };
        let to = PeerAddr::from("127.0.0.1:1".parse::<SocketAddr>().unwrap());
        let mut outbox = Outbox::new(60, false);
        assert_eq!(outbox.push(to, &header, &Message::ByeAck, None), Ok(()));
        assert_eq!(outbox.push(to, &header, &Message::ByeAck, None), Ok(()));
        assert_eq!(
            outbox.push(to, &header, &Message::ByeAck, None),
            Err(NotQueued::Full),
            "over 60 bytes"
        );
        let mut buf = [0u8; 1200];
        assert_eq!(outbox.pop(&mut buf).map(|(_, n)| n), Some(28));
        assert_eq!(outbox.pop(&mut buf).map(|(_, n)| n), Some(28));
        assert!(outbox.pop(&mut buf).is_none());
        assert_eq!(
            outbox.push(to, &header, &Message::ByeAck, None),
            Ok(()),
            "room again"
        );
    }

    #[test]
    fn space_is_reclaimed_while_the_queue_never_empties() {
        // The socket keeps blocking: one reply goes out for each new one, so
        // the queue never drains. Every reply sent frees its bytes at once,
        // so ten times the bound passes through without a drop, in order.
        let to = PeerAddr::from("127.0.0.1:1".parse::<SocketAddr>().unwrap());
        let mut outbox = Outbox::new(64 * 28, false);
        let header = |seq| Header {
            flags: crate::wire::Flags::empty(),
            client_id: 1,
            incarnation: 1,
            seq,
        };
        for seq in 1..=32 {
            assert_eq!(
                outbox.push(to, &header(seq), &Message::ByeAck, None),
                Ok(())
            );
        }
        let mut buf = [0u8; 1200];
        for seq in 33..=640 {
            let (_, n) = outbox.pop(&mut buf).unwrap();
            let d = Datagram::decode(&buf[..n], None).unwrap();
            assert_eq!(d.header.seq, seq - 32, "in order");
            assert_eq!(
                outbox.push(to, &header(seq), &Message::ByeAck, None),
                Ok(()),
                "reply {seq} dropped with {} bytes queued",
                outbox.queued_bytes()
            );
        }
        assert_eq!(outbox.queued_bytes(), 32 * 28);
    }

    #[test]
    fn limited_to_credit_queues_only_what_the_address_paid_for() {
        let header = Header {
            flags: crate::wire::Flags::empty(),
            client_id: 1,
            incarnation: 1,
            seq: 1,
        };
        let to = PeerAddr::from("127.0.0.1:1".parse::<SocketAddr>().unwrap());
        let mut outbox = Outbox::new(1 << 20, true);
        outbox.received(&to, 40);
        assert_eq!(outbox.push(to, &header, &Message::ByeAck, None), Ok(()));
        assert_eq!(
            outbox.push(to, &header, &Message::ByeAck, None),
            Err(NotQueued::NoCredit),
            "12 bytes left for a 28-byte reply"
        );
        outbox.received(&to, 16);
        assert_eq!(outbox.push(to, &header, &Message::ByeAck, None), Ok(()));
    }
}
