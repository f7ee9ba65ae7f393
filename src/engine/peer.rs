//! Peer addresses as the engine stores them and replies go to them.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

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
}
