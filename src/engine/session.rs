//! A session as the engine keeps it.

use std::collections::VecDeque;

use super::peer::PeerAddr;
use super::{TaskId, Timestamp};
use crate::wire::{Flags, Header, RejectCode, ReplayWindow};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RequestReply {
    Accepted(TaskId),
    Rejected(RejectCode),
}

/// An answered SUBMIT, kept so that a retry of it gets the same answer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Request {
    pub(crate) id: u32,
    pub(crate) reply: RequestReply,
    /// When its task reached a final state; `None` while it is unfinished
    /// (or for a rejection).
    pub(crate) ended: Option<Timestamp>,
}

/// What a session holds once it has submitted anything; idle sessions
/// carry only the `None` of the box.
#[derive(Debug, Default)]
pub(crate) struct SessionWork {
    /// Answered request ids, oldest first, at most `request_memory`.
    pub(crate) requests: VecDeque<Request>,
    pub(crate) unfinished: Vec<TaskId>,
}

/// One cache line each (`align(64)`): a heartbeat's look-ahead reads the
/// session right after a cache miss on the index, and the slab's
/// allocation is only 16-aligned, so unaligned its 64 bytes would straddle
/// two lines and a lookup would read both.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Session {
    pub(crate) client_id: u64,
    pub(crate) incarnation: u64,
    pub(crate) replay: ReplayWindow,
    pub(crate) peer: PeerAddr,
    pub(crate) tx_seq: u32,
    pub(crate) ttl_ms: u32,
    pub(crate) live: bool,
    pub(crate) work: Option<Box<SessionWork>>,
}

impl Session {
    /// A live session opened by the HELLO with header `h` from `peer`.
    pub(crate) fn new(h: &Header, peer: PeerAddr, ttl_ms: u32) -> Session {
        Session {
            client_id: h.client_id,
            incarnation: h.incarnation,
            replay: ReplayWindow::new(h.seq),
            peer,
            tx_seq: 0,
            ttl_ms,
            live: true,
            work: None,
        }
    }

    /// The header of this session's next datagram to the client.
    pub(crate) fn next_header(&mut self) -> Header {
        self.tx_seq = self.tx_seq.wrapping_add(1).max(1);
        Header {
            flags: Flags::empty(),
            client_id: self.client_id,
            incarnation: self.incarnation,
            seq: self.tx_seq,
        }
    }
    pub(crate) fn unfinished(&self) -> usize {
        self.work.as_ref().map_or(0, |w| w.unfinished.len())
    }
}

/// Short texts, so a REJECTED stays close to the size of what it answers.
pub(crate) fn reject_text(code: RejectCode) -> &'static str {
    match code {
        RejectCode::UnknownJob => "unknown job",
        RejectCode::QueueFull => "queue full",
        RejectCode::TooManyTasks => "too many tasks",
        RejectCode::BadRequest => "bad payload",
        RejectCode::ShuttingDown => "shutting down",
        RejectCode::TooManySessions => "",
    }
}
