//! Encoded replies waiting to be sent.
//!
//! All queued datagrams share one ring of bytes: a reply is appended at the
//! back and its bytes leave the front as it is sent, so the space of every
//! reply sent is free again at once, even while the queue never empties
//! (a socket that keeps blocking). The ring keeps its capacity, so the steady
//! state allocates nothing. It is bounded; a reply that does not fit is
//! refused (and counted by the engine) rather than letting a peer that never
//! reads grow the server's memory.

use std::collections::VecDeque;
use std::net::SocketAddr;

use super::peer::PeerAddr;

struct Queued {
    to: PeerAddr,
    len: u16,
}

pub(crate) struct Outbox {
    /// The queued datagrams' bytes, back to back, oldest first.
    bytes: VecDeque<u8>,
    queue: VecDeque<Queued>,
    max_bytes: usize,
}

impl Outbox {
    pub(crate) fn new(max_bytes: usize) -> Outbox {
        Outbox {
            bytes: VecDeque::new(),
            queue: VecDeque::new(),
            max_bytes,
        }
    }

    /// Whether `len` more bytes fit.
    pub(crate) fn fits(&self, len: usize) -> bool {
        self.bytes.len() + len <= self.max_bytes
    }

    /// Queues an encoded datagram; the caller checked that it [fits](Self::fits).
    pub(crate) fn push(&mut self, to: PeerAddr, datagram: &[u8]) {
        debug_assert!(self.fits(datagram.len()) && datagram.len() <= usize::from(u16::MAX));
        self.bytes.extend(datagram);
        self.queue.push_back(Queued {
            to,
            len: datagram.len() as u16,
        });
    }

    pub(crate) fn pop(&mut self, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        let q = self.queue.pop_front()?;
        let len = usize::from(q.len);
        let (front, back) = self.bytes.as_slices();
        let from_front = len.min(front.len());
        buf[..from_front].copy_from_slice(&front[..from_front]);
        buf[from_front..len].copy_from_slice(&back[..len - from_front]);
        self.bytes.drain(..len);
        Some((q.to.into(), len))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Bytes of the datagrams waiting.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to() -> PeerAddr {
        PeerAddr::from("127.0.0.1:1".parse::<SocketAddr>().unwrap())
    }

    #[test]
    fn bounded_and_reused() {
        let mut outbox = Outbox::new(60);
        for _ in 0..2 {
            assert!(outbox.fits(28));
            outbox.push(to(), &[1; 28]);
        }
        assert!(!outbox.fits(28), "over 60 bytes");
        let mut buf = [0u8; 1200];
        assert_eq!(outbox.pop(&mut buf).map(|(_, n)| n), Some(28));
        assert_eq!(outbox.pop(&mut buf).map(|(_, n)| n), Some(28));
        assert!(outbox.pop(&mut buf).is_none());
        assert!(outbox.fits(56), "room again");
    }

    #[test]
    fn space_is_reclaimed_while_the_queue_never_empties() {
        // The socket keeps blocking: one reply goes out for each new one, so
        // the queue never drains. Every reply sent frees its bytes at once,
        // so ten times the bound passes through in order, none refused.
        let mut outbox = Outbox::new(64 * 28);
        let datagram = |n: u32| {
            let mut d = [0u8; 28];
            d[24..].copy_from_slice(&n.to_be_bytes());
            d
        };
        for n in 1..=32 {
            outbox.push(to(), &datagram(n));
        }
        let mut buf = [0u8; 1200];
        for n in 33..=640u32 {
            let (_, len) = outbox.pop(&mut buf).unwrap();
            assert_eq!(buf[24..len], (n - 32).to_be_bytes(), "in order");
            assert!(
                outbox.fits(28),
                "reply {n} refused at {} bytes",
                outbox.queued_bytes()
            );
            outbox.push(to(), &datagram(n));
        }
        assert_eq!(outbox.queued_bytes(), 32 * 28);
    }
}
