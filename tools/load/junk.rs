//! Hostile traffic alongside the live clients: junk of every kind the
//! server must drop without a reply, and HELLO floods against its session
//! limit. Counted by category on the way out and by reply kind on the way
//! back, so the summary can check the server's drop counters cause by cause
//! and that it never sent more bytes than it got.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use tether::batch::{RecvBatch, SendBatch};
use tether::wire::{Datagram, Flags, Header, Kind, MacKey, Message, MAX_DATAGRAM};

/// What a junk run sent, by the drop cause the server should count.
#[derive(Debug, Default, Clone)]
pub struct JunkReport {
    pub sent: HashMap<&'static str, u64>,
    pub bytes_sent: u64,
    pub replies: HashMap<&'static str, u64>,
    pub bytes_received: u64,
    pub elapsed: Duration,
}

impl JunkReport {
    pub fn sent(&self, cause: &str) -> u64 {
        self.sent.get(cause).copied().unwrap_or(0)
    }
    pub fn replies(&self, kind: &str) -> u64 {
        self.replies.get(kind).copied().unwrap_or(0)
    }
}

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn encode(header: Header, message: Message<'_>, key: Option<&MacKey>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = Datagram { header, message }
        .emit(key, &mut buf)
        .expect("junk templates are small");
    buf.truncate(n);
    buf
}

/// Sends `count` junk datagrams as fast as the socket takes them, in equal
/// shares: random bytes (some longer than 1200), broken headers, bad MACs,
/// replays of `captured` datagrams of live clients (HELLOs and
/// heartbeats, each already seen by the server), and HEARTBEATs for
/// sessions that do not exist. `key` is the server's key, if it has one
/// (bad MACs are then signed with another key; keyless, they carry a MAC the
/// server has no key for).
pub fn flood(
    server: SocketAddr,
    count: u64,
    rate: Option<u64>,
    key: Option<&MacKey>,
    captured: &[Vec<u8>],
) -> std::io::Result<JunkReport> {
    let socket = flood_socket(server)?;
    let wrong_key = MacKey::new(&[0xeeu8; 32]).expect("valid key length");
    let mut rng = 0x1234_5678_9abc_def1u64 ^ count;
    let mut report = JunkReport::default();
    let mut send = SendBatch::new(64);
    let mut recv = RecvBatch::new(64, MAX_DATAGRAM + 1);
    let started = Instant::now();
    let mut pending: Vec<(Vec<u8>, &'static str)> = Vec::with_capacity(64);
    let mut i = 0u64;
    while i < count {
        pending.clear();
        while pending.len() < 64 && i < count {
            let r = xorshift(&mut rng);
            let item = match i % 5 {
                0 => {
                    let len = (r % 1400) as usize;
                    let mut bytes = vec![0u8; len];
                    for chunk in bytes.chunks_mut(8) {
                        let v = xorshift(&mut rng).to_le_bytes();
                        chunk.copy_from_slice(&v[..chunk.len()]);
                    }
                    let cause = if len > MAX_DATAGRAM {
                        "too_large"
                    } else {
                        "malformed"
                    };
                    (bytes, cause)
                }
                1 => {
                    // A valid-looking HEARTBEAT broken in one header rule.
                    let mut bytes = encode(header(r), Message::Heartbeat, key);
                    match r % 4 {
                        0 => bytes[0] = b'X',
                        1 => bytes[2] = 2,
                        2 => bytes[4] |= 0x80,
                        _ => bytes[6] = 0xff,
                    }
                    (bytes, "malformed")
                }
                // Keyed, the wrong key fails the MAC; keyless, any MAC is
                // one the server cannot check: both are bad_mac.
                2 => (
                    encode(header(r), Message::Heartbeat, Some(&wrong_key)),
                    "bad_mac",
                ),
                3 if !captured.is_empty() => (
                    captured[(r % captured.len() as u64) as usize].clone(),
                    "replay",
                ),
                _ => (
                    encode(header(r), Message::Heartbeat, key),
                    "unknown_session",
                ),
            };
            pending.push(item);
            i += 1;
        }
        let slices: Vec<&[u8]> = pending.iter().map(|(b, _)| b.as_slice()).collect();
        send_all(&socket, &mut send, &slices, &mut recv, &mut report)?;
        for (bytes, cause) in &pending {
            *report.sent.entry(cause).or_default() += 1;
            report.bytes_sent += bytes.len() as u64;
        }
        drain(&socket, &mut recv, &mut report);
        pace(started, i, rate);
    }
    report.elapsed = started.elapsed();
    collect_late_replies(&socket, &mut recv, &mut report);
    Ok(report)
}

/// A non-blocking socket connected to the server, with room for replies.
fn flood_socket(server: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    socket.connect(server)?;
    socket.set_nonblocking(true)?;
    let _ = socket2::SockRef::from(&socket).set_recv_buffer_size(8 << 20);
    Ok(socket)
}

/// Reads replies that arrive in the half second after the last send.
fn collect_late_replies(socket: &UdpSocket, recv: &mut RecvBatch, report: &mut JunkReport) {
    let until = Instant::now() + Duration::from_millis(500);
    while Instant::now() < until {
        drain(socket, recv, report);
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Holds `sent` datagrams since `started` to `rate` a second, if given.
fn pace(started: Instant, sent: u64, rate: Option<u64>) {
    let Some(rate) = rate else { return };
    let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
    if let Some(wait) = due.checked_sub(started.elapsed()) {
        std::thread::sleep(wait);
    }
}

/// A header for a client that never opened a session: ids far from the
/// load tool's own.
fn header(r: u64) -> Header {
    Header {
        flags: Flags::empty(),
        client_id: (r | 1) ^ 0xdead_0000_0000_0000,
        incarnation: (r >> 7) | 1,
        seq: (r as u32) | 1,
    }
}

/// Sends every datagram of `slices`, draining replies while the socket's
/// send buffer is full.
fn send_all(
    socket: &UdpSocket,
    send: &mut SendBatch,
    slices: &[&[u8]],
    recv: &mut RecvBatch,
    report: &mut JunkReport,
) -> std::io::Result<()> {
    let mut done = 0;
    while done < slices.len() {
        match send.send(socket, &slices[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                drain(socket, recv, report);
                std::thread::sleep(Duration::from_micros(50));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn drain(socket: &UdpSocket, batch: &mut RecvBatch, report: &mut JunkReport) {
    while let Ok(n) = batch.recv(socket, false) {
        for i in 0..n {
            let (bytes, _) = batch.get(i);
            report.bytes_received += bytes.len() as u64;
            let kind = bytes
                .get(3)
                .and_then(|&k| Kind::from_byte(k))
                .map_or("other", kind_name);
            *report.replies.entry(kind).or_default() += 1;
        }
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::UnknownSession => "unknown_session",
        Kind::Welcome => "welcome",
        Kind::Rejected => "rejected",
        _ => "other",
    }
}

/// Sends a HELLO for each of `count` distinct new client ids, as fast as
/// the socket takes them, and counts WELCOMEs and REJECTEDs.
pub fn hello_flood(
    server: SocketAddr,
    count: u64,
    rate: Option<u64>,
    key: Option<&MacKey>,
) -> std::io::Result<JunkReport> {
    let socket = flood_socket(server)?;
    let mut report = JunkReport::default();
    let mut send = SendBatch::new(64);
    let mut recv = RecvBatch::new(64, MAX_DATAGRAM + 1);
    let base = 0x5eed_0000_0000_0000u64 | (std::process::id() as u64) << 24;
    let started = Instant::now();
    let mut i = 0;
    while i < count {
        let batch: Vec<Vec<u8>> = (i..(i + 64).min(count))
            .map(|n| {
                let h = Header {
                    flags: Flags::empty(),
                    client_id: base + n + 1,
                    incarnation: 1,
                    seq: 1,
                };
                encode(
                    h,
                    Message::Hello {
                        ttl_ms: 0,
                        name: "",
                    },
                    key,
                )
            })
            .collect();
        let slices: Vec<&[u8]> = batch.iter().map(Vec::as_slice).collect();
        send_all(&socket, &mut send, &slices, &mut recv, &mut report)?;
        *report.sent.entry("hello").or_default() += slices.len() as u64;
        report.bytes_sent += slices.iter().map(|s| s.len() as u64).sum::<u64>();
        i += slices.len() as u64;
        drain(&socket, &mut recv, &mut report);
        pace(started, i, rate);
    }
    report.elapsed = started.elapsed();
    collect_late_replies(&socket, &mut recv, &mut report);
    Ok(report)
}

/// A sample's name and its `key="value"` labels.
fn split_labels(sample: &str) -> (&str, Vec<&str>) {
    match sample.split_once('{') {
        Some((name, labels)) => (
            name,
            labels
                .trim_end_matches('}')
                .split(',')
                .filter(|l| !l.is_empty())
                .collect(),
        ),
        None => (sample, Vec::new()),
    }
}

/// The sum of every sample of `series` whose labels include the ones
/// `series` names (`tether_sessions_live`, or
/// `tether_datagrams_dropped_total{cause="replay"}`): a sharded server
/// has a sample per shard. `None` if the scrape has none of it.
pub fn series_sum(scrape: &HashMap<String, f64>, series: &str) -> Option<f64> {
    let (name, wanted) = split_labels(series);
    let values: Vec<f64> = scrape
        .iter()
        .filter(|(sample, _)| {
            let (n, labels) = split_labels(sample);
            n == name && wanted.iter().all(|w| labels.contains(w))
        })
        .map(|(_, v)| *v)
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// The server's counters from its metrics endpoint (`host:port`), as
/// `series → value` (series names with their labels).
pub fn scrape(addr: SocketAddr) -> std::io::Result<HashMap<String, f64>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: tether\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_sums_over_shards_and_keeps_to_the_labels_asked_for() {
        let scrape: HashMap<String, f64> = [
            ("tether_sessions_live{shard=\"0\"}", 3.0),
            ("tether_sessions_live{shard=\"1\"}", 4.0),
            (
                "tether_datagrams_dropped_total{cause=\"replay\",shard=\"0\"}",
                1.0,
            ),
            (
                "tether_datagrams_dropped_total{cause=\"replay\",shard=\"1\"}",
                2.0,
            ),
            (
                "tether_datagrams_dropped_total{cause=\"malformed\",shard=\"1\"}",
                9.0,
            ),
            ("tether_heartbeats_total", 5.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(series_sum(&scrape, "tether_sessions_live"), Some(7.0));
        assert_eq!(
            series_sum(&scrape, "tether_datagrams_dropped_total{cause=\"replay\"}"),
            Some(3.0)
        );
        assert_eq!(series_sum(&scrape, "tether_heartbeats_total"), Some(5.0));
        assert_eq!(series_sum(&scrape, "tether_sessions_opened_total"), None);
    }
}
