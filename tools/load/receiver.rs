//! The receiving side of the simulated clients: one thread reading every
//! reply in batches and accounting for it per client (sessions opened,
//! round trips, silent clients detected, false expiries).

use std::net::UdpSocket;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token};

use tether::batch::RecvBatch;
use tether::wire::{CancelReason, Datagram, MacKey, Message, RejectCode, TaskReport, MAX_DATAGRAM};

use crate::outbox::GAP_TOLERANCE_US;
use crate::shared::{
    Shared, ACCEPTED, ANSWERED, CHECKED, DETECTED, FALSE_EXPIRY, REFUSED, SILENT, WELCOMED,
};

/// What the receiver saw.
#[derive(Default)]
pub struct Received {
    pub datagrams: u64,
    pub bytes: u64,
    pub early: u64,
    pub unknown_session: u64,
    pub lateness_ms: Vec<f64>,
    pub rtt_us: Vec<f64>,
}

/// Starts the receiver thread on clones of the clients' `sockets`; it runs
/// until `shared.stop` and returns what it saw.
pub fn spawn(
    sockets: &[UdpSocket],
    shared: &Arc<Shared>,
    key: Option<MacKey>,
) -> Result<JoinHandle<Received>, String> {
    let sockets: Vec<UdpSocket> = sockets
        .iter()
        .map(|s| s.try_clone().map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let shared = Arc::clone(shared);
    std::thread::Builder::new()
        .name("load-rx".into())
        .spawn(move || receive(sockets, &shared, key.as_ref()))
        .map_err(|e| e.to_string())
}

fn receive(sockets: Vec<UdpSocket>, shared: &Shared, key: Option<&MacKey>) -> Received {
    let mut out = Received::default();
    let Ok(mut poll) = Poll::new() else {
        return out;
    };
    let mut sockets: Vec<mio::net::UdpSocket> = sockets
        .into_iter()
        .map(mio::net::UdpSocket::from_std)
        .collect();
    for (i, s) in sockets.iter_mut().enumerate() {
        let _ = poll.registry().register(s, Token(i), Interest::READABLE);
    }
    let mut events = Events::with_capacity(256);
    let mut batch = RecvBatch::new(64, MAX_DATAGRAM + 1);
    // Edge-triggered: a socket that signalled is read until empty.
    let mut ready: Vec<usize> = (0..sockets.len()).collect();
    while !shared.stop.load(Ordering::Acquire) {
        while let Some(s) = ready.pop() {
            loop {
                let n = match batch.recv(&sockets[s], false) {
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                let now_us = shared.now_us();
                for d in 0..n {
                    let (bytes, _) = batch.get(d);
                    out.datagrams += 1;
                    out.bytes += bytes.len() as u64;
                    if let Ok(datagram) = Datagram::decode(bytes, key) {
                        account(shared, &datagram, now_us, &mut out);
                    }
                }
            }
        }
        if poll
            .poll(&mut events, Some(Duration::from_millis(50)))
            .is_ok()
        {
            ready.extend(events.iter().map(|e| e.token().0));
        }
    }
    out
}

fn account(shared: &Shared, d: &Datagram<'_>, now_us: u64, out: &mut Received) {
    let Some(i) = shared.index(d.header.client_id) else {
        return;
    };
    let counting = shared.counting.load(Ordering::Acquire);
    let count_once = |bit: u8, counter: &AtomicUsize| {
        if shared.set(i, bit) {
            counter.fetch_add(1, Ordering::AcqRel);
        }
    };
    // Counted once per client: false unless the client has sent nothing
    // for a TTL now (the expiry of a client with a task is pushed at once),
    // or has just ended such a gap (the answer to its first datagram after
    // it, or, if that answer was lost, to the next).
    let lost = || {
        if shared.set(i, FALSE_EXPIRY) {
            let quiet_us = now_us.saturating_sub(shared.last_sent_us[i].load(Ordering::Acquire));
            let gap_end = shared.gap_end_us[i].load(Ordering::Acquire);
            let after_gap = gap_end != 0
                && now_us.saturating_sub(gap_end) <= shared.interval_us + shared.ttl_us;
            if after_gap || quiet_us + GAP_TOLERANCE_US >= shared.ttl_us {
                shared.explained_expiries.fetch_add(1, Ordering::AcqRel);
            } else {
                shared.false_expiries.fetch_add(1, Ordering::AcqRel);
            }
        }
    };
    match d.message {
        // A WELCOME to an earlier round is one the client gave up on.
        Message::Welcome { .. }
            if d.header.incarnation == shared.incarnation(i) && shared.set(i, WELCOMED) =>
        {
            // The session lives from about now: a gap before it (a HELLO
            // retried late) is no gap in the session's heartbeats.
            shared.last_sent_us[i].fetch_max(now_us, Ordering::AcqRel);
            shared.welcomed.fetch_add(1, Ordering::AcqRel);
            shared.last_welcome_us.fetch_max(now_us, Ordering::AcqRel);
        }
        Message::Rejected {
            request_id: 0,
            code: RejectCode::TooManySessions | RejectCode::ShuttingDown,
            ..
        } => count_once(REFUSED, &shared.refused),
        Message::Accepted { .. } => count_once(ACCEPTED, &shared.accepted),
        Message::HeartbeatAck { acked_seq }
            if shared.flag(i) & CHECKED != 0
                && acked_seq >= shared.check_from_seq[i].load(Ordering::Acquire) =>
        {
            shared.set(i, ANSWERED);
        }
        Message::HeartbeatAck { acked_seq }
            if shared.ack_seq[i].load(Ordering::Acquire) == acked_seq
                && shared.recording_rtt.load(Ordering::Acquire) =>
        {
            let sent = shared.ack_sent_us[i].load(Ordering::Acquire);
            out.rtt_us.push(now_us.saturating_sub(sent) as f64);
        }
        Message::TaskState {
            report: TaskReport::Cancelled(CancelReason::Expired),
            ..
        } => {
            if shared.flag(i) & SILENT != 0 {
                if shared.set(i, DETECTED) {
                    shared.detected.fetch_add(1, Ordering::AcqRel);
                    let last = shared.last_sent_us[i].load(Ordering::Acquire);
                    let lateness_us = now_us as i64 - last as i64 - shared.ttl_us as i64;
                    if lateness_us < 0 {
                        out.early += 1;
                    }
                    out.lateness_ms.push(lateness_us as f64 / 1000.0);
                }
            } else if counting {
                lost();
            }
        }
        Message::UnknownSession => {
            out.unknown_session += 1;
            let silent = shared.flag(i) & SILENT != 0;
            if counting && !silent {
                lost();
            }
        }
        _ => {}
    }
}
