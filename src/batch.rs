//! Batched UDP receive and send (`recvmmsg` / `sendmmsg`) behind a small
//! safe interface.
//!
//! One system call moves up to a batch of datagrams. At a hundred thousand
//! heartbeats a second the per-call cost of `recvfrom` (entering the kernel,
//! socket lock, wake-up bookkeeping) is a large share of the server's CPU per
//! heartbeat, and batching divides it by the batch size; the load tool needs
//! `sendmmsg` to reach the rates it must drive. See BENCHMARKS.md.
//!
//! The buffers, `iovec`s, addresses and headers are allocated once, as boxed
//! slices that never move; every call re-points the headers at them, so a
//! batch can itself be moved freely between calls.
#![allow(unsafe_code)]

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};

/// Asks for a receive buffer of `bytes`, past `net.core.rmem_max` when the
/// process may (root, or CAP_NET_ADMIN: `SO_RCVBUFFORCE`), else up to that
/// cap (`SO_RCVBUF`). Returns the size the kernel reports afterwards (Linux
/// reports twice what it grants, counting its bookkeeping).
pub fn set_recv_buffer(socket: &impl AsRawFd, bytes: usize) -> io::Result<usize> {
    let value = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    set_socket_option(socket, libc::SO_RCVBUFFORCE, &value)
        .or_else(|_| set_socket_option(socket, libc::SO_RCVBUF, &value))?;
    let mut granted: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `granted` and `len` are live and sized as declared; the kernel
    // writes at most `len` bytes into `granted`.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&mut granted as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(granted.max(0) as usize)
}

/// Asks the kernel to hand over, with every datagram `socket` receives, the
/// wall-clock time it arrived (`SO_TIMESTAMPNS`), which
/// [`RecvBatch::arrival_ns`] reads back; or, with `on` false, to stop.
///
/// Once turned on, the kernel keeps stamping datagrams as they arrive for
/// as long as the socket lives; turning it off only stops the hand-over
/// (a control message per datagram, a measurable share of a read), so it
/// can be turned back on for datagrams that are already queued.
pub fn set_arrival_stamps(socket: &impl AsRawFd, on: bool) -> io::Result<()> {
    set_socket_option(socket, libc::SO_TIMESTAMPNS, &libc::c_int::from(on))
}

/// Sets the `SOL_SOCKET` option `name` of `socket` to `value`, passed to
/// the kernel as `size_of::<T>()` bytes: the one `setsockopt` of the crate.
/// `T` is the plain C value the option takes (a `c_int`, a
/// `sock_fprog`); pointers inside it are the kernel's to check (a bad one
/// is `EFAULT`).
pub(crate) fn set_socket_option<T>(
    socket: &impl AsRawFd,
    name: libc::c_int,
    value: &T,
) -> io::Result<()> {
    // SAFETY: `value` is a live `T` for the whole call and its exact size
    // is passed; the kernel only reads it (copying what it keeps).
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Room for the control messages of one datagram: a `SCM_TIMESTAMPNS`
/// (a `cmsghdr` and a `timespec`, 32 bytes on 64-bit Linux) with margin,
/// aligned as `cmsghdr` must be.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct Control([u8; 64]);

/// A reusable batch of receive buffers.
pub struct RecvBatch {
    slot_len: usize,
    data: Box<[u8]>,
    iovecs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
    controls: Box<[Control]>,
    headers: Box<[libc::mmsghdr]>,
    received: usize,
}

// SAFETY: the raw pointers inside `iovecs` and `headers` only ever point
// into this struct's own boxed slices; nothing is shared across threads.
unsafe impl Send for RecvBatch {}

impl RecvBatch {
    /// Room for `capacity` datagrams of up to `slot_len` bytes each. A
    /// datagram longer than `slot_len` arrives cut to `slot_len` bytes, so
    /// make the slot one byte longer than the largest datagram accepted to
    /// tell the two apart.
    pub fn new(capacity: usize, slot_len: usize) -> RecvBatch {
        let capacity = capacity.max(1);
        RecvBatch {
            slot_len,
            data: vec![0u8; capacity * slot_len].into_boxed_slice(),
            iovecs: (0..capacity)
                .map(|_| libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                })
                .collect(),
            // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
            addrs: (0..capacity)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            controls: vec![Control([0; 64]); capacity].into_boxed_slice(),
            // SAFETY: mmsghdr is plain old data; all-zero (null pointers,
            // zero lengths) is valid and is overwritten before each call.
            headers: (0..capacity)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect(),
            received: 0,
        }
    }

    /// How many datagrams one call can return.
    pub fn capacity(&self) -> usize {
        self.headers.len()
    }

    /// Receives up to a batch from a non-blocking socket. Returns how many
    /// arrived (`WouldBlock` when none). With `wait_for_one` on a blocking
    /// socket, blocks until at least one arrives, then takes what is there.
    pub fn recv(&mut self, socket: &impl AsRawFd, wait_for_one: bool) -> io::Result<usize> {
        self.received = 0;
        let n = self.capacity();
        for i in 0..n {
            self.iovecs[i] = libc::iovec {
                iov_base: self.data[i * self.slot_len..].as_mut_ptr().cast(),
                iov_len: self.slot_len,
            };
            let header = &mut self.headers[i];
            header.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            header.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            header.msg_hdr.msg_iov = &mut self.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = self.controls[i].0.as_mut_ptr().cast();
            header.msg_hdr.msg_controllen = std::mem::size_of::<Control>() as _;
            header.msg_hdr.msg_flags = 0;
            header.msg_len = 0;
        }
        let flags = if wait_for_one {
            libc::MSG_WAITFORONE
        } else {
            0
        };
        let fd: RawFd = socket.as_raw_fd();
        // SAFETY: `headers` holds `n` initialised mmsghdr whose name, iov and
        // control pointers point into `addrs`, `iovecs`, `data` and
        // `controls`, all owned by self, sized as declared (controllen is
        // reset above for every call), and alive for the call; the kernel
        // writes only within those bounds.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                self.headers.as_mut_ptr(),
                n as _,
                flags as _,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            return Err(io::Error::last_os_error());
        }
        self.received = got as usize;
        Ok(self.received)
    }

    /// Datagrams received by the last [`recv`](Self::recv).
    pub fn len(&self) -> usize {
        self.received
    }

    /// Whether the last call received nothing.
    pub fn is_empty(&self) -> bool {
        self.received == 0
    }

    /// The datagrams of the last call with their IP source addresses, in
    /// order (datagrams from other address families are skipped).
    pub fn iter(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> + Clone + '_ {
        (0..self.received).filter_map(|i| {
            let (bytes, from) = self.get(i);
            Some((from?, bytes))
        })
    }

    /// The wall-clock time the `i`-th datagram of the last call arrived, in
    /// nanoseconds since the Unix epoch, if the socket stamps its datagrams
    /// ([`set_arrival_stamps`]).
    pub fn arrival_ns(&self, i: usize) -> Option<u64> {
        assert!(i < self.received, "datagram {i} of {}", self.received);
        let header = &self.headers[i].msg_hdr;
        // SAFETY: `header` was filled by the kernel's recvmmsg: its control
        // pointer and length describe `controls[i]`, which is alive and
        // aligned for cmsghdr; CMSG_FIRSTHDR/CMSG_NXTHDR stay within
        // msg_controllen and return null at the end.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(header);
            while !cmsg.is_null() {
                let c = &*cmsg;
                if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_TIMESTAMPNS {
                    // The data may be unaligned for timespec: read it so.
                    let ts =
                        std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::timespec>());
                    let ns = u64::try_from(ts.tv_sec).ok()?.checked_mul(1_000_000_000)?
                        + u64::try_from(ts.tv_nsec).ok()?;
                    return Some(ns);
                }
                cmsg = libc::CMSG_NXTHDR(header, cmsg);
            }
        }
        None
    }

    /// The datagrams of the last call by index, with their IP source
    /// addresses and arrival stamps (see [`RecvBatch::arrival_ns`]), in
    /// order; [`RecvBatch::bytes`] gives each one's bytes.
    pub fn iter_stamped(&self) -> impl Iterator<Item = (usize, SocketAddr, Option<u64>)> + '_ {
        (0..self.received).filter_map(|i| Some((i, self.get(i).1?, self.arrival_ns(i))))
    }

    /// The `i`-th datagram of the last call and its source address.
    pub fn get(&self, i: usize) -> (&[u8], Option<SocketAddr>) {
        (self.bytes(i), to_socket_addr(&self.addrs[i]))
    }

    /// The `i`-th datagram of the last call.
    pub fn bytes(&self, i: usize) -> &[u8] {
        assert!(i < self.received, "datagram {i} of {}", self.received);
        let len = (self.headers[i].msg_len as usize).min(self.slot_len);
        &self.data[i * self.slot_len..i * self.slot_len + len]
    }
}

/// Converts a kernel-filled address; `None` for families other than IP.
fn to_socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family AF_INET), which
            // fits in and is no more aligned than sockaddr_storage.
            let sin =
                unsafe { &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            Some(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6 (family AF_INET6).
            let sin6 = unsafe {
                &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
            Some(SocketAddr::V6(SocketAddrV6::new(
                ip,
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// The most datagrams one segmented send may carry: the kernel's
/// `UDP_MAX_SEGMENTS` on every kernel that has `UDP_SEGMENT` (later kernels
/// allow more).
pub const MAX_SEGMENTS: usize = 64;

/// A run of equal-size datagrams laid end to end, sent as one message that
/// the kernel cuts into datagrams of `segment` bytes (UDP GSO); the last may
/// be shorter. At most [`MAX_SEGMENTS`] datagrams.
#[derive(Clone, Copy, Debug)]
pub struct Segmented<'a> {
    pub bytes: &'a [u8],
    pub segment: u16,
}

impl Segmented<'_> {
    /// How many datagrams the kernel makes of it.
    pub fn datagrams(&self) -> usize {
        self.bytes.len().div_ceil(usize::from(self.segment.max(1)))
    }
}

/// Room for one `UDP_SEGMENT` control message (a `cmsghdr` and a `u16`),
/// aligned as `cmsghdr` must be.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct SegmentControl([u8; 32]);

/// `UDP_SEGMENT` (linux/udp.h), spelled out for libc versions without it.
const UDP_SEGMENT: libc::c_int = 103;

fn cmsg_space(data: usize) -> usize {
    // SAFETY: CMSG_SPACE is pure arithmetic on its argument.
    unsafe { libc::CMSG_SPACE(data as u32) as usize }
}

/// Sends many datagrams on a connected socket in one call.
pub struct SendBatch {
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
    controls: Vec<SegmentControl>,
}

// SAFETY: the pointers are rebuilt from borrowed slices on every call and
// never dereferenced outside it.
unsafe impl Send for SendBatch {}

impl SendBatch {
    /// A batch of up to `capacity` datagrams a call.
    pub fn new(capacity: usize) -> SendBatch {
        SendBatch {
            iovecs: Vec::with_capacity(capacity),
            headers: Vec::with_capacity(capacity),
            controls: vec![SegmentControl([0; 32]); capacity],
        }
    }

    /// Sends `runs` (up to the capacity) on a connected socket, each as one
    /// message the kernel cuts into its datagrams (`UDP_SEGMENT`), so the
    /// stack is walked once per run rather than once per datagram. Returns
    /// how many runs the kernel took, which may be fewer. A kernel or route
    /// without UDP GSO fails the first call (`EIO`, `EINVAL` or
    /// `ENOPROTOOPT`): send the datagrams one by one instead.
    pub fn send_segmented(
        &mut self,
        socket: &impl AsRawFd,
        runs: &[Segmented<'_>],
    ) -> io::Result<usize> {
        let n = runs.len().min(self.controls.len());
        self.iovecs.clear();
        self.headers.clear();
        for run in &runs[..n] {
            self.iovecs.push(libc::iovec {
                iov_base: run.bytes.as_ptr() as *mut _,
                iov_len: run.bytes.len(),
            });
        }
        let space = cmsg_space(std::mem::size_of::<u16>());
        for (i, run) in runs[..n].iter().enumerate() {
            let control = &mut self.controls[i];
            // SAFETY: mmsghdr is plain old data; zero is a valid start.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_iov = &mut self.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = control.0.as_mut_ptr().cast();
            header.msg_hdr.msg_controllen = space as _;
            // SAFETY: the control buffer is 32 bytes, aligned for cmsghdr,
            // and `space` (CMSG_SPACE of a u16, 24 bytes on 64-bit Linux)
            // fits in it, so CMSG_FIRSTHDR is non-null and the header and
            // its two data bytes are written inside the buffer.
            unsafe {
                let cmsg = libc::CMSG_FIRSTHDR(&header.msg_hdr);
                (*cmsg).cmsg_level = libc::SOL_UDP;
                (*cmsg).cmsg_type = UDP_SEGMENT;
                (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<u16>() as u32) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), run.segment);
            }
            self.headers.push(header);
        }
        if n == 0 {
            return Ok(0);
        }
        // SAFETY: `headers` holds `n` initialised mmsghdr whose iov pointers
        // point into `iovecs` (which point at the caller's slices) and whose
        // control pointers into `controls`, all alive for the call; the
        // kernel only reads them.
        let sent =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), self.headers.as_mut_ptr(), n as _, 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }

    /// Sends each datagram to its own destination (an unconnected socket),
    /// up to the capacity; returns how many the kernel took. An error on
    /// the first datagram is returned as the error; on a later one, the
    /// count before it (the next call then reports it).
    pub fn send_to(
        &mut self,
        socket: &impl AsRawFd,
        datagrams: &[(SocketAddr, &[u8])],
    ) -> io::Result<usize> {
        let n = datagrams.len().min(self.headers.capacity());
        let names: Vec<socket2::SockAddr> = datagrams[..n]
            .iter()
            .map(|(to, _)| socket2::SockAddr::from(*to))
            .collect();
        let bytes = datagrams[..n].iter().map(|(_, d)| *d);
        self.send_batch(socket, bytes, Some(&names))
    }

    /// Sends `datagrams` (up to the capacity) on a connected socket;
    /// returns how many the kernel took, which may be fewer.
    pub fn send(&mut self, socket: &impl AsRawFd, datagrams: &[&[u8]]) -> io::Result<usize> {
        let n = datagrams.len().min(self.headers.capacity());
        self.send_batch(socket, datagrams[..n].iter().copied(), None)
    }

    /// One `sendmmsg` of `datagrams`, each to `names[i]` when given (else
    /// the socket's connected peer).
    fn send_batch<'a>(
        &mut self,
        socket: &impl AsRawFd,
        datagrams: impl Iterator<Item = &'a [u8]>,
        names: Option<&[socket2::SockAddr]>,
    ) -> io::Result<usize> {
        self.iovecs.clear();
        self.headers.clear();
        for d in datagrams {
            self.iovecs.push(libc::iovec {
                iov_base: d.as_ptr() as *mut _,
                iov_len: d.len(),
            });
        }
        let n = self.iovecs.len();
        if n == 0 {
            return Ok(0);
        }
        for i in 0..n {
            // SAFETY: mmsghdr is plain old data; zero is a valid start.
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            if let Some(name) = names.map(|names| &names[i]) {
                header.msg_hdr.msg_name = name.as_ptr() as *mut libc::c_void;
                header.msg_hdr.msg_namelen = name.len();
            }
            header.msg_hdr.msg_iov = &mut self.iovecs[i];
            header.msg_hdr.msg_iovlen = 1;
            self.headers.push(header);
        }
        // SAFETY: `headers` holds `n` initialised mmsghdr whose iov pointers
        // point into `iovecs` (which point at the caller's slices) and whose
        // name pointers, if any, into `names`, all alive for the call; the
        // kernel only reads them.
        let sent =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), self.headers.as_mut_ptr(), n as _, 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sent as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::Duration;

    #[test]
    fn sends_and_receives_batches_with_sources_and_truncation() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let big = vec![7u8; 50];
        let datagrams: Vec<&[u8]> = vec![b"one", b"two", b"three", &big];
        let mut send = SendBatch::new(8);
        assert_eq!(send.send(&tx, &datagrams).unwrap(), 4);
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut batch = RecvBatch::new(8, 11);
        let mut got = Vec::new();
        while got.len() < 4 {
            let n = batch.recv(&rx, true).unwrap();
            for i in 0..n {
                let (bytes, from) = batch.get(i);
                assert_eq!(from, Some(tx.local_addr().unwrap()));
                got.push(bytes.to_vec());
            }
        }
        assert_eq!(
            got[..3],
            [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        assert_eq!(got[3], vec![7u8; 11], "cut to the slot");
        rx.set_nonblocking(true).unwrap();
        let err = batch.recv(&rx, false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(batch.is_empty());
    }

    #[test]
    fn sends_each_datagram_to_its_own_address() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut send = SendBatch::new(4);
        let items: Vec<(SocketAddr, &[u8])> = vec![
            (a.local_addr().unwrap(), b"to a"),
            (b.local_addr().unwrap(), b"to b"),
        ];
        assert_eq!(send.send_to(&tx, &items).unwrap(), 2);
        let mut buf = [0u8; 16];
        for (socket, want) in [(&a, &b"to a"[..]), (&b, &b"to b"[..])] {
            socket
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let (n, from) = socket.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (want, tx.local_addr().unwrap()));
        }
    }

    #[test]
    fn segmented_runs_arrive_as_separate_datagrams() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        // Two runs: three 4-byte datagrams, then two 3-byte ones with a
        // shorter last one.
        let first = b"aaaabbbbcccc";
        let second = b"xxxyy";
        let runs = [
            Segmented {
                bytes: first,
                segment: 4,
            },
            Segmented {
                bytes: second,
                segment: 3,
            },
        ];
        assert_eq!(runs.iter().map(Segmented::datagrams).sum::<usize>(), 5);
        let mut send = SendBatch::new(4);
        match send.send_segmented(&tx, &runs) {
            Ok(n) => assert_eq!(n, 2),
            // A kernel without UDP GSO: nothing to check here.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT)
                ) =>
            {
                return
            }
            Err(e) => panic!("{e}"),
        }
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut batch = RecvBatch::new(8, 16);
        let mut got = Vec::new();
        while got.len() < 5 {
            let n = batch.recv(&rx, true).unwrap();
            got.extend((0..n).map(|i| batch.get(i).0.to_vec()));
        }
        let want: Vec<&[u8]> = vec![b"aaaa", b"bbbb", b"cccc", b"xxx", b"yy"];
        assert_eq!(got, want);
    }

    #[test]
    fn receive_buffer_is_set_and_reported() {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        let granted = set_recv_buffer(&socket, 1 << 20).unwrap();
        // Linux doubles the request (or caps it at twice rmem_max).
        assert!(granted >= 256 << 10, "granted {granted}");
    }

    #[test]
    fn ipv6_sources() {
        let Ok(rx) = UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 loopback on this machine
        };
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        tx.send_to(b"v6", rx.local_addr().unwrap()).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut batch = RecvBatch::new(2, 16);
        assert_eq!(batch.recv(&rx, true).unwrap(), 1);
        assert_eq!(batch.get(0), (&b"v6"[..], Some(tx.local_addr().unwrap())));
    }
}
