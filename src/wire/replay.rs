//! The per-session replay window: the highest `seq` seen and a 64-entry
//! bitmap below it, the sliding window of IPsec (RFC 4303 §3.4.3).
//!
//! ```text
//!   seq:   top-63  ...  top-2  top-1  top
//!   bit:     63    ...    2      1     0      (1 = seen)
//! ```
//!
//! A `seq` above `top` slides the window up; one inside it is accepted once;
//! one below it is too old to tell apart from a replay, so it is refused.

use std::fmt;

/// Width of the window below the highest `seq`.
pub const WINDOW: u32 = 64;

/// Tracks which sequence numbers of one sender have been seen.
///
/// Packed to 12 bytes (alignment 4): every session holds one, and the
/// padding a plain layout adds would be a tenth of a session's budget.
/// Fields are only ever read and written by value, never borrowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C, packed(4))]
pub struct ReplayWindow {
    seen: u64,
    top: u32,
}

impl ReplayWindow {
    /// A window that has seen exactly `first`.
    pub fn new(first: u32) -> ReplayWindow {
        ReplayWindow {
            top: first,
            seen: 1,
        }
    }

    /// The highest `seq` seen.
    pub fn top(&self) -> u32 {
        self.top
    }

    /// Whether `seq` would be accepted, without recording it. Call
    /// [`ReplayWindow::record`] only once the datagram is otherwise accepted,
    /// so a refused datagram changes nothing.
    pub fn check(&self, seq: u32) -> Result<(), ReplayError> {
        if seq > self.top {
            return Ok(());
        }
        let age = self.top - seq;
        if age >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        if self.seen & (1 << age) != 0 {
            return Err(ReplayError::Seen);
        }
        Ok(())
    }

    /// Records `seq` as seen; it must have passed [`ReplayWindow::check`].
    pub fn record(&mut self, seq: u32) {
        debug_assert!(self.check(seq).is_ok(), "record({seq}) on {self:?}");
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = seq;
        } else {
            self.seen |= 1 << (self.top - seq);
        }
    }

    /// [`check`](Self::check) then [`record`](Self::record).
    pub fn accept(&mut self, seq: u32) -> Result<(), ReplayError> {
        self.check(seq)?;
        self.record(seq);
        Ok(())
    }
}

/// Why a `seq` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayError {
    /// Already seen: a replay or a duplicate.
    Seen,
    /// Older than the window: cannot be told from a replay.
    TooOld,
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplayError::Seen => f.write_str("seq already seen"),
            ReplayError::TooOld => write!(f, "seq older than the {WINDOW}-entry replay window"),
        }
    }
}

impl std::error::Error for ReplayError {}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn accepts_each_seq_once_and_out_of_order_within_window() {
        let mut w = ReplayWindow::new(1);
        assert_eq!(w.accept(1), Err(ReplayError::Seen));
        assert_eq!(w.accept(5), Ok(()));
        assert_eq!(w.accept(3), Ok(()));
        assert_eq!(w.accept(3), Err(ReplayError::Seen));
        assert_eq!(w.accept(2), Ok(()));
        assert_eq!(w.accept(100), Ok(()));
        assert_eq!(w.accept(36), Err(ReplayError::TooOld));
        assert_eq!(w.accept(37), Ok(()));
        assert_eq!(w.accept(37), Err(ReplayError::Seen));
        assert_eq!(w.top(), 100);
    }

    #[test]
    fn is_twelve_bytes() {
        assert_eq!(std::mem::size_of::<ReplayWindow>(), 12);
    }

    #[test]
    fn check_does_not_record() {
        let w = ReplayWindow::new(10);
        assert!(w.check(11).is_ok());
        assert!(w.check(11).is_ok());
        assert_eq!(w, ReplayWindow::new(10));
    }

    #[test]
    fn huge_jump_clears_window() {
        let mut w = ReplayWindow::new(1);
        w.accept(u32::MAX).unwrap();
        assert_eq!(w.accept(u32::MAX), Err(ReplayError::Seen));
        assert_eq!(w.accept(u32::MAX - 63), Ok(()));
        assert_eq!(w.accept(u32::MAX - 64), Err(ReplayError::TooOld));
    }

    proptest! {
        /// Against a model that remembers every seq: the window accepts a seq
        /// exactly when it is new and no more than 63 below the highest seen.
        #[test]
        fn matches_model(first in 1u32..1000, seqs in prop::collection::vec(1u32..1200, 1..300)) {
            let mut w = ReplayWindow::new(first);
            let mut seen = BTreeSet::from([first]);
            for seq in seqs {
                let top = *seen.iter().next_back().unwrap();
                let expect_ok = !seen.contains(&seq) && seq + WINDOW > top;
                prop_assert_eq!(w.accept(seq).is_ok(), expect_ok, "seq {} top {}", seq, top);
                if expect_ok {
                    seen.insert(seq);
                }
            }
        }
    }
}
