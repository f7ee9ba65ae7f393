//! Steering datagrams to sockets in the kernel: a `SO_REUSEPORT` group of
//! UDP sockets on one address, and a classic BPF program the kernel runs on
//! every arriving datagram to pick the socket that gets it.
//!
//! ```text
//!                            ┌─► socket 0: members (every kind but HELLO)
//!   datagram ──► BPF: kind? ─┤
//!                            └─► socket 1: strangers (HELLO)
//!
//!   with N shards:  shard = (client_id high word ^ low word) mod N
//!                   socket 2·shard (members) or 2·shard + 1 (strangers)
//! ```
//!
//! When one socket overflows the kernel drops whatever arrives; it cannot
//! tell a live session's heartbeat from a stranger's HELLO. With two
//! sockets it does not have to: a herd of HELLOs fills the strangers'
//! buffer, and the members' heartbeats still land in theirs. nginx's QUIC
//! module steers by connection id the same way (`SO_ATTACH_REUSEPORT_CBPF`).
//!
//! For a reuseport program the kernel has already pulled the UDP header, so
//! offset 0 is the first byte of tether's header and the kind is byte 3. A
//! datagram too short to have a kind aborts the program, which returns 0:
//! the member socket, where the decoder counts it as malformed. The
//! program returns an index into the group, in the order the sockets were
//! bound.
//!
//! With shards, the program also reads the client_id (bytes 8..16) and
//! picks the shard from it, so every datagram of a client reaches the
//! shard holding its session whatever address it comes from (NAT
//! rebinding, a moved client), as nginx's QUIC module and quinn steer by
//! connection id. A datagram too short for a client_id goes to shard 0's
//! members, where it is counted malformed.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// The kind byte of a HELLO (PROTOCOL.md).
const HELLO: u32 = 0x01;

/// Offset of the kind byte in the header.
const KIND_OFFSET: u32 = 3;

/// Offset of the client_id's high and low 32-bit words in the header.
const CLIENT_ID_HIGH: u32 = 8;
const CLIENT_ID_LOW: u32 = 12;

/// Where a datagram goes within its shard: members or strangers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// Index 0: members of sessions (everything but HELLO).
    Members = 0,
    /// Index 1: strangers (HELLO).
    Strangers = 1,
}

// Opcodes from linux/filter.h (bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_LDX: u16 = 0x01;
const BPF_ST: u16 = 0x02;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_MISC: u16 = 0x07;
const BPF_W: u16 = 0x00;
const BPF_B: u16 = 0x10;
const BPF_ABS: u16 = 0x20;
const BPF_MEM: u16 = 0x60;
const BPF_JEQ: u16 = 0x10;
const BPF_K: u16 = 0x00;
const BPF_X: u16 = 0x08;
const BPF_A: u16 = 0x10;
const BPF_ADD: u16 = 0x00;
const BPF_LSH: u16 = 0x60;
const BPF_MOD: u16 = 0x90;
const BPF_XOR: u16 = 0xa0;
const BPF_TAX: u16 = 0x00;
const BPF_TXA: u16 = 0x80;

/// The steering program for a group of `shards` pairs of sockets. One
/// shard: `ldb [3]; jeq #HELLO, strangers, members`. More: the shard from
/// the client_id, then the same choice within it.
pub fn program(shards: u32) -> Vec<libc::sock_filter> {
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    if shards <= 1 {
        return vec![
            op(BPF_LD | BPF_B | BPF_ABS, 0, 0, KIND_OFFSET),
            op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, HELLO),
            op(BPF_RET | BPF_K, 0, 0, Socket::Strangers as u32),
            op(BPF_RET | BPF_K, 0, 0, Socket::Members as u32),
        ];
    }
    vec![
        op(BPF_LD | BPF_W | BPF_ABS, 0, 0, CLIENT_ID_LOW), // A = low word
        op(BPF_ST, 0, 0, 0),                               // M[0] = A
        op(BPF_LD | BPF_W | BPF_ABS, 0, 0, CLIENT_ID_HIGH), // A = high word
        op(BPF_LDX | BPF_W | BPF_MEM, 0, 0, 0),            // X = M[0]
        op(BPF_ALU | BPF_XOR | BPF_X, 0, 0, 0),            // A ^= X
        op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, shards),       // A %= shards
        op(BPF_ALU | BPF_LSH | BPF_K, 0, 0, 1),            // A *= 2: members
        op(BPF_MISC | BPF_TAX, 0, 0, 0),                   // X = A
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, KIND_OFFSET),   // A = kind
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, 3, HELLO),
        op(BPF_MISC | BPF_TXA, 0, 0, 0), // HELLO: the shard's strangers
        op(BPF_ALU | BPF_ADD | BPF_K, 0, 0, 1),
        op(BPF_RET | BPF_A, 0, 0, 0),
        op(BPF_MISC | BPF_TXA, 0, 0, 0), // anything else: its members
        op(BPF_RET | BPF_A, 0, 0, 0),
    ]
}

/// The shard a client's datagrams go to, of `shards`.
pub fn shard_of(client_id: u64, shards: u32) -> u32 {
    ((client_id >> 32) as u32 ^ client_id as u32) % shards.max(1)
}

/// What [`program`] decides for `datagram`, computed in Rust: for tests
/// and for readers, who can check the two agree. The shard, and the socket
/// within it.
pub fn decide(datagram: &[u8], shards: u32) -> (u32, Socket) {
    let shard = if shards <= 1 {
        0
    } else {
        match datagram.get(8..16) {
            Some(id) => shard_of(u64::from_be_bytes(id.try_into().expect("8 bytes")), shards),
            // A load out of bounds aborts the program, which returns 0.
            None => return (0, Socket::Members),
        }
    };
    match datagram.get(KIND_OFFSET as usize) {
        Some(&kind) if u32::from(kind) == HELLO => (shard, Socket::Strangers),
        _ => (shard, Socket::Members),
    }
}

/// Attaches [`program`] for `shards` to the reuseport group of `socket`
/// (any member of it). From then on the kernel steers every datagram for
/// the group's address by it.
pub fn attach(socket: &impl AsRawFd, shards: u32) -> io::Result<()> {
    let mut filter = program(shards);
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // `prog` points at `filter`, which lives until the call returns (the
    // kernel copies the program).
    crate::batch::set_socket_option(socket, libc::SO_ATTACH_REUSEPORT_CBPF, &prog)
}

/// The inode of a socket, which names it in `/proc/net/udp` (where the
/// kernel counts the datagrams it dropped for it).
pub fn inode(socket: &impl AsRawFd) -> io::Result<u64> {
    // SAFETY: `stat` is plain old data, all-zero is a valid value, and
    // fstat writes at most one `stat` into it.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: the fd is open (borrowed from a live socket) and `stat` is a
    // valid, writable `stat`.
    let rc = unsafe { libc::fstat(socket.as_raw_fd(), &mut stat) };
    if rc == 0 {
        Ok(stat.st_ino)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs the classic BPF program on `packet` as the kernel would, for
    /// the few instructions it uses.
    fn run(program: &[libc::sock_filter], packet: &[u8]) -> u32 {
        let (mut a, mut x, mut m0) = (0u32, 0u32, 0u32);
        let mut pc = 0;
        loop {
            let i = program[pc];
            match i.code {
                c if c == BPF_LD | BPF_B | BPF_ABS => match packet.get(i.k as usize) {
                    Some(&b) => a = u32::from(b),
                    None => return 0, // a load out of bounds aborts: 0
                },
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    match packet.get(i.k as usize..i.k as usize + 4) {
                        Some(w) => a = u32::from_be_bytes(w.try_into().unwrap()),
                        None => return 0,
                    }
                }
                c if c == BPF_ST => m0 = a,
                c if c == BPF_LDX | BPF_W | BPF_MEM => x = m0,
                c if c == BPF_ALU | BPF_XOR | BPF_X => a ^= x,
                c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
                c if c == BPF_ALU | BPF_LSH | BPF_K => a <<= i.k,
                c if c == BPF_ALU | BPF_ADD | BPF_K => a += i.k,
                c if c == BPF_MISC | BPF_TAX => x = a,
                c if c == BPF_MISC | BPF_TXA => a = x,
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += if a == i.k { i.jt } else { i.jf } as usize;
                }
                c if c == BPF_RET | BPF_K => return i.k,
                c if c == BPF_RET | BPF_A => return a,
                other => panic!("opcode {other:#x} not modelled"),
            }
            pc += 1;
        }
    }

    /// The group index the program returns for a decision.
    fn index((shard, socket): (u32, Socket)) -> u32 {
        2 * shard + socket as u32
    }

    #[test]
    fn the_program_and_its_rust_twin_agree_on_every_kind_and_length() {
        let program = program(1);
        for kind in 0..=255u8 {
            for len in 0..6 {
                let mut packet = vec![0x54, 0x48, 1, kind, 0, 0];
                packet.truncate(len);
                assert_eq!(
                    run(&program, &packet),
                    index(decide(&packet, 1)),
                    "kind {kind:#x}, {len} bytes"
                );
            }
        }
        assert_eq!(decide(&[0x54, 0x48, 1, 0x01], 1), (0, Socket::Strangers));
        assert_eq!(decide(&[0x54, 0x48, 1, 0x02], 1), (0, Socket::Members));
        assert_eq!(decide(&[0x54], 1), (0, Socket::Members));
    }

    #[test]
    fn with_shards_the_program_and_its_twin_agree_on_client_ids_kinds_and_lengths() {
        let ids = [
            1u64,
            2,
            3,
            0xffff_ffff,
            1 << 32,
            (1 << 32) + 1,
            u64::MAX,
            0x0123_4567_89ab_cdef,
            15_606_566_006_069_359_346,
        ];
        for shards in [2u32, 3, 4, 7, 64] {
            let program = program(shards);
            for &id in &ids {
                for kind in [0x01u8, 0x02, 0x03, 0x07, 0xff] {
                    for len in [0, 3, 4, 12, 15, 16, 28] {
                        let mut packet = vec![0x54, 0x48, 1, kind, 0, 0, 0, 0];
                        packet.extend_from_slice(&id.to_be_bytes());
                        packet.resize(28, 0);
                        packet.truncate(len);
                        assert_eq!(
                            run(&program, &packet),
                            index(decide(&packet, shards)),
                            "{shards} shards, id {id}, kind {kind:#x}, {len} bytes"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn consecutive_and_random_client_ids_spread_evenly_over_shards() {
        for shards in [2u32, 3, 8] {
            let mut counts = vec![0u32; shards as usize];
            for id in 1..=30_000u64 {
                counts[shard_of(id, shards) as usize] += 1;
            }
            let mut x = 0x9e37_79b9_7f4a_7c15u64;
            for _ in 0..30_000 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                counts[shard_of(x, shards) as usize] += 1;
            }
            let even = 60_000.0 / f64::from(shards);
            for c in counts {
                assert!(
                    (f64::from(c) - even).abs() / even < 0.05,
                    "{shards}: {c} vs {even}"
                );
            }
        }
    }
}
