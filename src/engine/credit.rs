//! Anti-amplification for a keyless server: never send an address more bytes
//! than it has sent us.
//!
//! Without a key, a datagram's source address proves nothing, so anyone can
//! make the server answer a third party by writing that party's address on
//! their datagrams. Protocol v1 makes some answers a few bytes larger than
//! their requests (a 33-byte HELLO with an empty name gets a 36-byte WELCOME,
//! a 28-byte HEARTBEAT asking for an ACK a 32-byte HEARTBEAT_ACK), so a
//! reflector would even gain a little. QUIC solves the same problem for
//! unvalidated addresses by capping what it sends at 3× what it received
//! (RFC 9000 §8.1); tether has nothing to validate an address with, so it
//! caps at 1×, per address:
//!
//! ```text
//!   datagram of n bytes from A ──► credit[A] += n   (capped at CREDIT_CAP)
//!   reply of m bytes to A      ──► sent only if credit[A] ≥ m, then credit[A] -= m
//! ```
//!
//! Credit comes only from bytes that claimed to come from `A`, so whatever
//! an attacker writes on its datagrams, the victim receives at most what the
//! attacker sent in its name. The cap bounds how much a quiet address's
//! banked credit (its own ack-less heartbeats) can be spent on it in one
//! burst by someone spoofing it.
//!
//! The table has a fixed number of slots, so a flood of spoofed addresses
//! costs no memory. Each slot carries a 32-bit fingerprint of its address;
//! an address that lands on a slot held by another takes it over with zero
//! credit, so one address never spends another's bytes. The hash is seeded
//! per process, so which addresses collide cannot be planned.

use std::hash::BuildHasher;

use super::peer::PeerAddr;

/// Slots in the table (a power of two): 512 KiB.
const SLOTS: usize = 1 << 16;

/// Most credit an address can bank: enough for a few of the largest replies.
pub(crate) const CREDIT_CAP: u32 = 16 * 1024;

#[derive(Clone, Copy, Default)]
struct Slot {
    /// Fingerprint of the address holding the slot; 0 when free.
    tag: u32,
    bytes: u32,
}

pub(crate) struct ReplyCredit {
    slots: Box<[Slot]>,
    hasher: foldhash::fast::RandomState,
}

impl ReplyCredit {
    pub(crate) fn new() -> ReplyCredit {
        ReplyCredit::with_slots(SLOTS)
    }

    fn with_slots(slots: usize) -> ReplyCredit {
        assert!(slots.is_power_of_two());
        ReplyCredit {
            slots: vec![Slot::default(); slots].into_boxed_slice(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    #[inline]
    fn locate(&self, addr: &PeerAddr) -> (usize, u32) {
        let hash = self.hasher.hash_one(addr);
        (
            (hash as usize) & (self.slots.len() - 1),
            ((hash >> 32) as u32).max(1),
        )
    }

    /// Records `bytes` received from `addr`.
    #[inline]
    pub(crate) fn earn(&mut self, addr: &PeerAddr, bytes: usize) {
        let (i, tag) = self.locate(addr);
        let slot = &mut self.slots[i];
        if slot.tag != tag {
            *slot = Slot { tag, bytes: 0 };
        }
        let bytes = u32::try_from(bytes).unwrap_or(u32::MAX);
        slot.bytes = slot.bytes.saturating_add(bytes).min(CREDIT_CAP);
    }

    /// Takes `bytes` of `addr`'s credit for a reply; false (and nothing
    /// taken) when it has less.
    #[inline]
    pub(crate) fn spend(&mut self, addr: &PeerAddr, bytes: usize) -> bool {
        let (i, tag) = self.locate(addr);
        let slot = &mut self.slots[i];
        match u32::try_from(bytes) {
            Ok(bytes) if slot.tag == tag && slot.bytes >= bytes => {
                slot.bytes -= bytes;
                true
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::net::SocketAddr;

    fn addr(s: &str) -> PeerAddr {
        PeerAddr::from(s.parse::<SocketAddr>().unwrap())
    }

    #[test]
    fn a_reply_is_paid_for_by_what_its_address_sent() {
        let mut credit = ReplyCredit::new();
        let a = addr("127.0.0.1:1000");
        assert!(!credit.spend(&a, 1), "an address never heard from has none");
        credit.earn(&a, 33);
        assert!(!credit.spend(&a, 36), "a 33-byte HELLO cannot pay for 36");
        credit.earn(&a, 33);
        assert!(credit.spend(&a, 36));
        assert!(credit.spend(&a, 30));
        assert!(!credit.spend(&a, 1), "66 earned, 66 spent");
    }

    #[test]
    fn addresses_do_not_share_credit_even_on_one_host() {
        let mut credit = ReplyCredit::new();
        credit.earn(&addr("127.0.0.1:1000"), 1000);
        assert!(!credit.spend(&addr("127.0.0.1:1001"), 28));
        assert!(!credit.spend(&addr("127.0.0.2:1000"), 28));
        assert!(!credit.spend(&addr("[::1]:1000"), 28));
        assert!(credit.spend(&addr("127.0.0.1:1000"), 1000));
    }

    #[test]
    fn banked_credit_is_capped() {
        let mut credit = ReplyCredit::new();
        let a = addr("[::1]:7");
        for _ in 0..10_000 {
            credit.earn(&a, 1200);
        }
        assert!(credit.spend(&a, CREDIT_CAP as usize));
        assert!(!credit.spend(&a, 1));
    }

    proptest! {
        /// Whatever the mix of addresses (many sharing slots) and sizes, no
        /// address is ever sent more than it sent.
        #[test]
        fn no_address_gets_more_than_it_sent(
            ops in proptest::collection::vec((0u16..5000, any::<bool>(), 0usize..1300), 1..2000)
        ) {
            // 64 slots for up to 5000 addresses: most share a slot.
            let mut credit = ReplyCredit::with_slots(64);
            let mut received: HashMap<u16, u64> = HashMap::new();
            let mut sent: HashMap<u16, u64> = HashMap::new();
            for (port, is_reply, bytes) in ops {
                let a = addr(&format!("10.0.{}.{}:{port}", port % 7, port % 251));
                if is_reply {
                    if credit.spend(&a, bytes) {
                        *sent.entry(port).or_default() += bytes as u64;
                    }
                } else {
                    credit.earn(&a, bytes);
                    *received.entry(port).or_default() += bytes as u64;
                }
                let s = sent.get(&port).copied().unwrap_or(0);
                prop_assert!(s <= received.get(&port).copied().unwrap_or(0));
            }
        }
    }
}
