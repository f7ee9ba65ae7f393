//! Every datagram the engine sends goes through [`Replies`], which applies
//! the rules for replies in one place:
//!
//! ```text
//!   a member's session ──► send_in_session: the session's own numbering, its last address
//!   a stranger          ──► answer_stranger: the request's header copied; held back
//!                           while the caller's socket is backlogged
//!        │
//!        ▼  encode (and MAC) ─► the byte bound ─► the address's credit ─► outbox
//! ```
//!
//! Each outcome is counted: queued (`replies`), no room (`replies_dropped`),
//! not paid for by its address (`replies_unpaid`, keyless with the
//! amplification limit), held back from a stranger (`replies_shed`).
//!
//! The credit of each address is earned here too, from the bytes that
//! arrived from it ([`Replies::earn`]): it exists only to pay for replies.

use std::net::SocketAddr;

use super::credit::ReplyCredit;
use super::outbox::Outbox;
use super::peer::PeerAddr;
use super::session::Session;
use super::{Config, Stats};
use crate::wire::{Datagram, Flags, Header, MacKey, Message, MAX_DATAGRAM};

pub(crate) struct Replies {
    outbox: Outbox,
    /// Present when replies are limited to what their address has sent.
    credit: Option<ReplyCredit>,
    key: Option<MacKey>,
    /// The caller's socket holds more than it can read at once: answers to
    /// strangers wait (see `Engine::set_backlogged`).
    backlogged: bool,
}

impl Replies {
    pub(crate) fn new(config: &Config) -> Replies {
        let limited = config.amplification_limit && config.key.is_none();
        Replies {
            outbox: Outbox::new(config.max_outbox_bytes),
            credit: limited.then(ReplyCredit::new),
            key: config.key.clone(),
            backlogged: false,
        }
    }

    /// Counts `bytes` that arrived from `from` towards its replies.
    #[inline]
    pub(crate) fn earn(&mut self, from: &PeerAddr, bytes: usize) {
        if let Some(credit) = self.credit.as_mut() {
            credit.earn(from, bytes);
        }
    }

    pub(crate) fn set_backlogged(&mut self, backlogged: bool) {
        self.backlogged = backlogged;
    }

    pub(crate) fn backlogged(&self) -> bool {
        self.backlogged
    }

    /// Sends `message` in `session`: the session's next `seq`, to the
    /// address it last sent from.
    pub(crate) fn send_in_session(
        &mut self,
        stats: &mut Stats,
        session: &mut Session,
        message: &Message<'_>,
    ) {
        let header = session.next_header();
        self.queue(stats, session.peer, &header, message);
    }

    /// Answers a request outside any live session (UNKNOWN_SESSION, a
    /// refused HELLO) with the header fields of the request, as the protocol
    /// asks; held back, and counted, while the socket is backlogged.
    pub(crate) fn answer_stranger(
        &mut self,
        stats: &mut Stats,
        request: &Header,
        to: PeerAddr,
        message: &Message<'_>,
    ) {
        if self.backlogged {
            stats.replies_shed += 1;
            return;
        }
        let header = Header {
            flags: Flags::empty(),
            ..*request
        };
        self.queue(stats, to, &header, message);
    }

    fn queue(&mut self, stats: &mut Stats, to: PeerAddr, header: &Header, message: &Message<'_>) {
        let datagram = Datagram {
            header: *header,
            message: *message,
        };
        let mut encoded = [0u8; MAX_DATAGRAM];
        let len = match datagram.emit(self.key.as_ref(), &mut encoded) {
            Ok(len) => len,
            Err(e) => {
                // The engine bounds every field before it builds a reply, so
                // this is a bug; drop the reply rather than the server.
                debug_assert!(false, "cannot encode {message:?}: {e}");
                stats.replies_dropped += 1;
                return;
            }
        };
        if !self.outbox.fits(len) {
            stats.replies_dropped += 1;
            return;
        }
        if let Some(credit) = self.credit.as_mut() {
            if !credit.spend(&to, len) {
                stats.replies_unpaid += 1;
                return;
            }
        }
        self.outbox.push(to, &encoded[..len]);
        stats.replies += 1;
    }

    /// Copies the next reply into `buf` (room for [`MAX_DATAGRAM`] bytes).
    pub(crate) fn pop(&mut self, buf: &mut [u8]) -> Option<(SocketAddr, usize)> {
        self.outbox.pop(buf)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.outbox.is_empty()
    }

    pub(crate) fn queued_bytes(&self) -> usize {
        self.outbox.queued_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> Session {
        Session {
            client_id: 1,
            incarnation: 1,
            replay: crate::wire::ReplayWindow::new(1),
            peer: PeerAddr::from("127.0.0.1:1".parse::<SocketAddr>().unwrap()),
            tx_seq: 0,
            ttl_ms: 1000,
            live: true,
            work: None,
        }
    }

    #[test]
    fn limited_to_credit_queues_only_what_the_address_paid_for() {
        let config = Config {
            amplification_limit: true,
            ..Config::default()
        };
        let mut replies = Replies::new(&config);
        let mut stats = Stats::default();
        let mut s = session();
        replies.earn(&s.peer, 40);
        replies.send_in_session(&mut stats, &mut s, &Message::ByeAck);
        replies.send_in_session(&mut stats, &mut s, &Message::ByeAck);
        assert_eq!(
            (stats.replies, stats.replies_unpaid),
            (1, 1),
            "12 bytes left for 28"
        );
        replies.earn(&s.peer, 16);
        replies.send_in_session(&mut stats, &mut s, &Message::ByeAck);
        assert_eq!(stats.replies, 2);
    }

    #[test]
    fn strangers_wait_while_backlogged_and_members_do_not() {
        let mut replies = Replies::new(&Config::default());
        let mut stats = Stats::default();
        let mut s = session();
        replies.set_backlogged(true);
        let request = s.next_header();
        replies.answer_stranger(&mut stats, &request, s.peer, &Message::UnknownSession);
        replies.send_in_session(&mut stats, &mut s, &Message::ByeAck);
        assert_eq!((stats.replies, stats.replies_shed), (1, 1));
    }
}
