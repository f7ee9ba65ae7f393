//! Which server a client talks to when there are several: rendezvous
//! (highest-random-weight) hashing of its client_id over the list.
//!
//! ```text
//!   client 42, servers [a, b, c]
//!     weight(42, a) = 0x9e..   ──►  order: b, a, c
//!     weight(42, b) = 0xf3..        b is its host; if b goes silent for a TTL
//!     weight(42, c) = 0x1c..        it opens a fresh session on a, then c
//! ```
//!
//! Every client ranks the servers itself, so there is no coordinator and
//! nothing to share: a host that leaves the list takes exactly its own
//! clients with it (each moves to the host it ranks next, which is where a
//! client starting fresh without that host would go), and a host that joins
//! is the first choice of about `1/(n+1)` of the clients and of no one else
//! (Thaler and Ravishankar, "Using name-based mappings to increase hit
//! rates", IEEE/ACM ToN 1998).
//!
//! The weight is part of the protocol (PROTOCOL.md, "Choosing a host"), so
//! clients in any language that share a client_id pick the same host:
//! `fmix64(client_id XOR fnv1a64(address))`, where the address is the IP's
//! bytes (4 or 16) followed by the port in network order, FNV-1a is the
//! 64-bit variant, and fmix64 is MurmurHash3's finalizer. Ties (which need
//! two 64-bit weights to collide) go to the smaller address bytes.

use std::net::{IpAddr, SocketAddr};

/// A server's identity bytes for hashing: IP (4 or 16 bytes), then port,
/// big-endian.
fn identity(server: &SocketAddr) -> Vec<u8> {
    let mut bytes = match server.ip() {
        IpAddr::V4(ip) => ip.octets().to_vec(),
        IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    bytes.extend_from_slice(&server.port().to_be_bytes());
    bytes
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// MurmurHash3's 64-bit finalizer: a bijection whose every output bit
/// depends on every input bit, so weights of nearby client ids (a fleet
/// numbered 1..N) are unrelated.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^ (k >> 33)
}

/// How much `client_id` wants `server`: the highest weight is its host.
pub fn weight(client_id: u64, server: SocketAddr) -> u64 {
    fmix64(client_id ^ fnv1a64(&identity(&server)))
}

/// `servers` in `client_id`'s order of preference, duplicates removed: the
/// first is its host, the next where it goes if that one falls silent.
pub fn rank(client_id: u64, servers: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut keyed: Vec<(u64, Vec<u8>, SocketAddr)> = servers
        .iter()
        .map(|&s| (weight(client_id, s), identity(&s), s))
        .collect();
    keyed.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    keyed.dedup_by(|a, b| a.2 == b.2);
    keyed.into_iter().map(|(_, _, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// Fixed values, so another language's implementation can be checked
    /// against these (the Python client's tests hold the same table).
    #[test]
    fn weights_match_the_published_vectors() {
        let v4: SocketAddr = "10.0.0.1:7900".parse().unwrap();
        let v6: SocketAddr = "[fd00::2]:7900".parse().unwrap();
        assert_eq!(fnv1a64(&identity(&v4)), 0x6d30_83f7_7039_b59e);
        assert_eq!(weight(1, v4), 0x8aac_cbb0_49fd_e5dd);
        assert_eq!(weight(42, v4), 0x5b20_b375_87b9_881b);
        assert_eq!(weight(42, v6), 0x9467_c84c_503b_192b);
        assert_eq!(weight(u64::MAX, v6), 0x93e6_378c_f555_ee9a);
    }

    #[test]
    fn ranking_is_a_permutation_without_duplicates() {
        let servers = addrs(&["10.0.0.1:7900", "10.0.0.2:7900", "10.0.0.1:7900"]);
        let ranked = rank(7, &servers);
        assert_eq!(ranked.len(), 2);
        assert!(ranked.contains(&servers[0]) && ranked.contains(&servers[1]));
        // The order is the client's own, not the list's.
        let reversed: Vec<SocketAddr> = servers.iter().rev().copied().collect();
        assert_eq!(rank(7, &reversed), ranked);
    }

    /// 30,000 consecutive ids over three hosts: each holds a third (within
    /// 3%); removing one moves only its clients, and each survivor gains
    /// about half of them; adding a fourth takes about a quarter, all from
    /// the others and none between the others.
    #[test]
    fn spread_and_minimal_movement() {
        let three = addrs(&["10.0.0.1:7900", "10.0.0.2:7900", "10.0.0.3:7900"]);
        let ids = 1_000u64..31_000;
        let host = |id: u64, list: &[SocketAddr]| rank(id, list)[0];
        let count = |list: &[SocketAddr], target: SocketAddr| {
            ids.clone().filter(|&id| host(id, list) == target).count()
        };
        for &s in &three {
            let n = count(&three, s);
            assert!((9_700..=10_300).contains(&n), "{s} holds {n} of 30000");
        }
        let survivors = &three[1..];
        let mut gained = [0usize; 2];
        for id in ids.clone() {
            let before = host(id, &three);
            let after = host(id, survivors);
            if before != three[0] {
                assert_eq!(before, after, "client {id} moved between survivors");
            } else {
                // Where it fails over to is where its own order says next.
                assert_eq!(after, rank(id, &three)[1]);
                gained[usize::from(after == survivors[1])] += 1;
            }
        }
        let lost = gained[0] + gained[1];
        for g in gained {
            assert!(g * 100 >= lost * 45 && g * 100 <= lost * 55, "{gained:?}");
        }
        let mut four = three.clone();
        four.push("10.0.0.4:7900".parse().unwrap());
        let mut moved = 0;
        for id in ids.clone() {
            let (before, after) = (host(id, &three), host(id, &four));
            if before != after {
                assert_eq!(after, four[3], "client {id} moved between old hosts");
                moved += 1;
            }
        }
        assert!(
            (7_000..=8_000).contains(&moved),
            "{moved} moved to the new host"
        );
    }
}
