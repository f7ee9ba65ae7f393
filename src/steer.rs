//! Steering datagrams to sockets in the kernel: a `SO_REUSEPORT` group of
//! UDP sockets on one address, and a classic BPF program the kernel runs on
//! every arriving datagram to pick the socket that gets it.
//!
//! ```text
//!                            ┌─► socket 0: members (every kind but HELLO)
//!   datagram ──► BPF: kind? ─┤
//!                            └─► socket 1: strangers (HELLO)
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

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// The kind byte of a HELLO (PROTOCOL.md).
const HELLO: u32 = 0x01;

/// Offset of the kind byte in the header.
const KIND_OFFSET: u32 = 3;

/// Where a datagram goes: an index into the reuseport group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Socket {
    /// Index 0: members of sessions (everything but HELLO).
    Members = 0,
    /// Index 1: strangers (HELLO).
    Strangers = 1,
}

/// The steering program: `ldb [3]; jeq #HELLO, strangers, members`.
pub fn program() -> Vec<libc::sock_filter> {
    // Opcodes from linux/filter.h (bpf_common.h).
    const BPF_LD: u16 = 0x00;
    const BPF_B: u16 = 0x10;
    const BPF_ABS: u16 = 0x20;
    const BPF_JMP: u16 = 0x05;
    const BPF_JEQ: u16 = 0x10;
    const BPF_K: u16 = 0x00;
    const BPF_RET: u16 = 0x06;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    vec![
        op(BPF_LD | BPF_B | BPF_ABS, 0, 0, KIND_OFFSET),
        op(BPF_JMP | BPF_JEQ | BPF_K, 0, 1, HELLO),
        op(BPF_RET | BPF_K, 0, 0, Socket::Strangers as u32),
        op(BPF_RET | BPF_K, 0, 0, Socket::Members as u32),
    ]
}

/// What [`program`] decides for `datagram`, computed in Rust: for tests
/// and for readers, who can check the two agree.
pub fn decide(datagram: &[u8]) -> Socket {
    match datagram.get(KIND_OFFSET as usize) {
        Some(&kind) if u32::from(kind) == HELLO => Socket::Strangers,
        _ => Socket::Members,
    }
}

/// Attaches [`program`] to the reuseport group of `socket` (any member of
/// it). From then on the kernel steers every datagram for the group's
/// address by it.
pub fn attach(socket: &impl AsRawFd) -> io::Result<()> {
    let mut filter = program();
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `filter`, which lives until the call returns
    // (the kernel copies the program); the size passed is the struct's own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
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
        let mut a = 0u32;
        let mut pc = 0;
        loop {
            let i = program[pc];
            match i.code {
                0x30 => match packet.get(i.k as usize) {
                    Some(&b) => a = u32::from(b),
                    None => return 0, // a load out of bounds aborts: 0
                },
                0x15 => {
                    pc += if a == i.k { i.jt } else { i.jf } as usize;
                }
                0x06 => return i.k,
                other => panic!("opcode {other:#x} not modelled"),
            }
            pc += 1;
        }
    }

    #[test]
    fn the_program_and_its_rust_twin_agree_on_every_kind_and_length() {
        let program = program();
        for kind in 0..=255u8 {
            for len in 0..6 {
                let mut packet = vec![0x54, 0x48, 1, kind, 0, 0];
                packet.truncate(len);
                assert_eq!(
                    run(&program, &packet),
                    decide(&packet) as u32,
                    "kind {kind:#x}, {len} bytes"
                );
            }
        }
        assert_eq!(decide(&[0x54, 0x48, 1, 0x01]), Socket::Strangers);
        assert_eq!(decide(&[0x54, 0x48, 1, 0x02]), Socket::Members);
        assert_eq!(decide(&[0x54]), Socket::Members);
    }
}
