use super::*;
use proptest::prelude::*;

fn header(seq: u32) -> Header {
    Header {
        flags: Flags::empty(),
        client_id: 0x0102_0304_0506_0708,
        incarnation: 0x1112_1314_1516_1718,
        seq,
    }
}

fn encode(message: Message<'_>, key: Option<&MacKey>) -> Vec<u8> {
    let d = Datagram {
        header: header(9),
        message,
    };
    // A dirty buffer: emit must write every byte it claims, whatever was there.
    let mut buf = vec![0xa5; MAX_DATAGRAM];
    let n = d.emit(key, &mut buf).unwrap();
    assert_eq!(n, d.encoded_len(key.is_some()));
    buf.truncate(n);
    buf
}

fn every_kind() -> Vec<Message<'static>> {
    vec![
        Message::Hello {
            ttl_ms: 3000,
            name: "worker-7",
        },
        Message::Hello {
            ttl_ms: 0,
            name: "",
        },
        Message::Heartbeat,
        Message::Submit {
            request_id: 42,
            delay_ms: 10,
            deadline_ms: 5000,
            job: "sleep",
            payload: &[0, 0, 1, 0],
        },
        Message::Submit {
            request_id: 1,
            delay_ms: 0,
            deadline_ms: 0,
            job: "echo",
            payload: &[],
        },
        Message::Cancel { task_id: u64::MAX },
        Message::Status { task_id: 77 },
        Message::Bye,
        Message::Welcome {
            ttl_ms: 3000,
            tick_ms: 10,
        },
        Message::HeartbeatAck { acked_seq: 12 },
        Message::Accepted {
            request_id: 42,
            task_id: 99,
        },
        Message::Rejected {
            request_id: 42,
            code: RejectCode::QueueFull,
            message: "queue full",
        },
        Message::TaskState {
            task_id: 5,
            report: TaskReport::Scheduled,
        },
        Message::TaskState {
            task_id: 5,
            report: TaskReport::Queued,
        },
        Message::TaskState {
            task_id: 5,
            report: TaskReport::Running,
        },
        Message::TaskState {
            task_id: 5,
            report: TaskReport::Done(b"result bytes"),
        },
        Message::TaskState {
            task_id: 5,
            report: TaskReport::Failed("boom"),
        },
        Message::TaskState {
            task_id: 5,
            report: TaskReport::Cancelled(CancelReason::Deadline),
        },
        Message::TaskState {
            task_id: 5,
            report: TaskReport::Unknown,
        },
        Message::CancelResult {
            task_id: 5,
            outcome: CancelOutcome::AlreadyFinished,
        },
        Message::UnknownSession,
        Message::ByeAck,
    ]
}

#[test]
fn every_kind_round_trips_keyless_and_keyed() {
    let key = MacKey::new(&[3u8; 32]).unwrap();
    for message in every_kind() {
        for k in [None, Some(&key)] {
            let bytes = encode(message, k);
            let d = Datagram::decode(&bytes, k).unwrap();
            assert_eq!(d.message, message);
            assert_eq!(d.header.seq, 9);
            assert_eq!(d.header.flags.contains(Flags::MAC), k.is_some());
        }
    }
}

#[test]
fn heartbeat_known_bytes() {
    let bytes = encode(Message::Heartbeat, None);
    assert_eq!(
        bytes,
        [
            0x54, 0x48, 0x01, 0x02, 0x00, 0x00, 0x00, 0x00, //
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, //
            0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, //
            0x00, 0x00, 0x00, 0x09,
        ]
    );
}

#[test]
fn submit_known_bytes() {
    let bytes = encode(
        Message::Submit {
            request_id: 0x0a0b0c0d,
            delay_ms: 1,
            deadline_ms: 2,
            job: "echo",
            payload: b"hi",
        },
        None,
    );
    assert_eq!(&bytes[6..8], &[0, 19]);
    assert_eq!(
        &bytes[HEADER_LEN..],
        &[0x0a, 0x0b, 0x0c, 0x0d, 0, 0, 0, 1, 0, 0, 0, 2, 4, b'e', b'c', b'h', b'o', b'h', b'i']
    );
}

#[test]
fn task_state_known_bytes() {
    let cancelled = encode(
        Message::TaskState {
            task_id: 0x0102,
            report: TaskReport::Cancelled(CancelReason::Expired),
        },
        None,
    );
    assert_eq!(cancelled[3], 0x85);
    assert_eq!(&cancelled[HEADER_LEN..], &[0, 0, 0, 0, 0, 0, 1, 2, 5, 1]);
    let failed = encode(
        Message::TaskState {
            task_id: 1,
            report: TaskReport::Failed("no"),
        },
        None,
    );
    assert_eq!(
        &failed[HEADER_LEN..],
        &[0, 0, 0, 0, 0, 0, 0, 1, 4, 2, b'n', b'o']
    );
}

#[test]
fn mac_covers_header_and_body_and_flag_is_set() {
    let key = MacKey::new(&[1u8; 16]).unwrap();
    let bytes = encode(Message::Status { task_id: 3 }, Some(&key));
    assert_eq!(bytes.len(), HEADER_LEN + 8 + MAC_LEN);
    assert_eq!(bytes[4], Flags::MAC.bits());
    let signed = HEADER_LEN + 8;
    assert_eq!(key.sign(&bytes[..signed]), bytes[signed..]);
}

#[test]
fn ack_flag_survives_and_mac_flag_is_clear_keyless() {
    let d = Datagram {
        header: Header {
            flags: Flags::ACK.with(Flags::MAC),
            ..header(1)
        },
        message: Message::Heartbeat,
    };
    let mut buf = [0u8; 64];
    let n = d.emit(None, &mut buf).unwrap();
    assert_eq!(buf[4], Flags::ACK.bits());
    let back = Datagram::decode(&buf[..n], None).unwrap();
    assert!(back.header.flags.contains(Flags::ACK));
}

// One test per rule a datagram can break.

fn valid() -> Vec<u8> {
    encode(Message::Cancel { task_id: 1 }, None)
}

fn decode_err(bytes: &[u8]) -> Error {
    Datagram::decode(bytes, None).unwrap_err()
}

#[test]
fn rule_too_large() {
    let mut b = encode(
        Message::Submit {
            request_id: 1,
            delay_ms: 0,
            deadline_ms: 0,
            job: "echo",
            payload: &[0; MAX_PAYLOAD_LEN],
        },
        None,
    );
    b.resize(MAX_DATAGRAM + 1, 0);
    assert_eq!(decode_err(&b), Error::TooLarge { len: 1201 });
}

#[test]
fn rule_truncated_header() {
    assert_eq!(decode_err(&valid()[..27]), Error::Truncated { len: 27 });
    assert_eq!(decode_err(&[]), Error::Truncated { len: 0 });
}

#[test]
fn rule_magic() {
    let mut b = valid();
    b[1] = b'X';
    assert_eq!(decode_err(&b), Error::BadMagic);
}

#[test]
fn rule_version() {
    let mut b = valid();
    b[2] = 2;
    assert_eq!(decode_err(&b), Error::BadVersion(2));
}

#[test]
fn rule_kind() {
    let mut b = valid();
    for kind in [0x00, 0x07, 0x80, 0x89, 0xff] {
        b[3] = kind;
        assert_eq!(decode_err(&b), Error::UnknownKind(kind));
    }
}

#[test]
fn rule_reserved_flag_bits() {
    let mut b = valid();
    b[4] = 0b100;
    assert_eq!(decode_err(&b), Error::ReservedFlags(0b100));
}

#[test]
fn rule_reserved_byte() {
    let mut b = valid();
    b[5] = 1;
    assert_eq!(decode_err(&b), Error::ReservedByte(1));
}

#[test]
fn rule_body_len_matches_datagram() {
    let mut b = valid();
    b[7] = 7;
    assert!(matches!(
        decode_err(&b),
        Error::BodyLength {
            declared: 7,
            actual: 8
        }
    ));
    // A MAC flag on a datagram too short to hold a MAC.
    let mut b = encode(Message::Heartbeat, None);
    b[4] = Flags::MAC.bits();
    assert!(matches!(
        decode_err(&b),
        Error::BodyLength { actual: -16, .. }
    ));
}

#[test]
fn rule_zero_client_id_incarnation_seq() {
    let mut b = valid();
    b[8..16].fill(0);
    assert_eq!(decode_err(&b), Error::ZeroClientId);
    let mut b = valid();
    b[16..24].fill(0);
    assert_eq!(decode_err(&b), Error::ZeroIncarnation);
    let mut b = valid();
    b[24..28].fill(0);
    assert_eq!(decode_err(&b), Error::ZeroSeq);
}

#[test]
fn rule_mac_required_forbidden_and_verified() {
    let key = MacKey::new(&[5u8; 16]).unwrap();
    let keyless = valid();
    assert_eq!(
        Datagram::decode(&keyless, Some(&key)).unwrap_err(),
        Error::MissingMac
    );
    let keyed = encode(Message::Cancel { task_id: 1 }, Some(&key));
    assert_eq!(
        Datagram::decode(&keyed, None).unwrap_err(),
        Error::UnexpectedMac
    );
    let wrong = MacKey::new(&[6u8; 16]).unwrap();
    assert_eq!(
        Datagram::decode(&keyed, Some(&wrong)).unwrap_err(),
        Error::BadMac
    );
    for i in 0..keyed.len() {
        let mut b = keyed.clone();
        b[i] ^= 0x40;
        assert!(
            Datagram::decode(&b, Some(&key)).is_err(),
            "flipping byte {i} went unnoticed"
        );
    }
}

#[test]
fn rule_body_exactly_its_fields() {
    // A non-empty HEARTBEAT or BYE.
    for kind in [Kind::Heartbeat, Kind::Bye] {
        let mut b = encode(Message::Heartbeat, None);
        b[3] = kind as u8;
        b.push(0);
        b[7] = 1;
        assert_eq!(decode_err(&b), Error::BodyTooLong { kind, extra: 1 });
    }
    // A CANCEL of 7 bytes, and one of 9.
    let mut b = valid();
    b.pop();
    b[7] = 7;
    assert_eq!(decode_err(&b), Error::BodyTooShort { kind: Kind::Cancel });
    let mut b = valid();
    b.push(0);
    b[7] = 9;
    assert_eq!(
        decode_err(&b),
        Error::BodyTooLong {
            kind: Kind::Cancel,
            extra: 1
        }
    );
    // A HELLO whose name length runs past the body.
    let mut b = encode(
        Message::Hello {
            ttl_ms: 1,
            name: "ab",
        },
        None,
    );
    b[HEADER_LEN + 4] = 3;
    assert_eq!(decode_err(&b), Error::BodyTooShort { kind: Kind::Hello });
    // A HELLO with a byte after its name.
    b[HEADER_LEN + 4] = 1;
    assert_eq!(
        decode_err(&b),
        Error::BodyTooLong {
            kind: Kind::Hello,
            extra: 1
        }
    );
}

#[test]
fn rule_text_is_utf8() {
    let mut b = encode(
        Message::Hello {
            ttl_ms: 1,
            name: "ab",
        },
        None,
    );
    b[HEADER_LEN + 5] = 0xff;
    assert_eq!(decode_err(&b), Error::BadUtf8);
}

#[test]
fn rule_job_and_payload_limits() {
    let long_job = "j".repeat(33);
    let body_for = |job: &str, payload: usize| {
        let mut body = vec![0u8; 12];
        body.push(job.len() as u8);
        body.extend_from_slice(job.as_bytes());
        body.resize(body.len() + payload, 7);
        body
    };
    let frame = |body: Vec<u8>| {
        let mut b = encode(Message::Heartbeat, None);
        b[3] = Kind::Submit as u8;
        b[6..8].copy_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(&body);
        b
    };
    assert_eq!(
        decode_err(&frame(body_for(&long_job, 0))),
        Error::JobTooLong { len: 33 }
    );
    assert_eq!(
        decode_err(&frame(body_for("echo", MAX_PAYLOAD_LEN + 1))),
        Error::PayloadTooLarge { len: 1025 }
    );
    assert!(Datagram::decode(&frame(body_for(&"j".repeat(32), MAX_PAYLOAD_LEN)), None).is_ok());
}

#[test]
fn rule_enumerated_values() {
    let mut b = encode(
        Message::TaskState {
            task_id: 1,
            report: TaskReport::Running,
        },
        None,
    );
    b[HEADER_LEN + 8] = 7;
    assert_eq!(decode_err(&b), Error::BadTaskState(7));
    let mut b = encode(
        Message::TaskState {
            task_id: 1,
            report: TaskReport::Cancelled(CancelReason::Left),
        },
        None,
    );
    b[HEADER_LEN + 9] = 0;
    assert_eq!(decode_err(&b), Error::BadCancelReason(0));
    let mut b = encode(
        Message::Rejected {
            request_id: 1,
            code: RejectCode::UnknownJob,
            message: "",
        },
        None,
    );
    b[HEADER_LEN + 5] = 9;
    assert_eq!(decode_err(&b), Error::BadRejectCode(9));
    let mut b = encode(
        Message::CancelResult {
            task_id: 1,
            outcome: CancelOutcome::CancelledNow,
        },
        None,
    );
    b[HEADER_LEN + 8] = 3;
    assert_eq!(decode_err(&b), Error::BadCancelOutcome(3));
}

#[test]
fn emit_refuses_what_decode_would_refuse() {
    let long = "x".repeat(256);
    let d = Datagram {
        header: header(1),
        message: Message::Rejected {
            request_id: 1,
            code: RejectCode::BadRequest,
            message: &long,
        },
    };
    let mut buf = [0u8; MAX_DATAGRAM];
    assert_eq!(d.emit(None, &mut buf), Err(EmitError::FieldTooLong));
    let big = vec![0u8; MAX_RESULT_LEN + 1];
    let d = Datagram {
        header: header(1),
        message: Message::TaskState {
            task_id: 1,
            report: TaskReport::Done(&big),
        },
    };
    let key = MacKey::new(&[1; 16]).unwrap();
    assert!(matches!(
        d.emit(Some(&key), &mut buf),
        Err(EmitError::TooLarge { len: 1201 })
    ));
    let mut small = [0u8; 10];
    assert!(matches!(
        d.emit(None, &mut small),
        Err(EmitError::BufferTooSmall { .. })
    ));
}

#[test]
fn truncate_text_respects_char_boundaries() {
    assert_eq!(truncate_text("héllo", 2), "h");
    assert_eq!(truncate_text("héllo", 3), "hé");
    assert_eq!(truncate_text("ok", 255), "ok");
}

fn arb_text(max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!(".{{0,{}}}", max / 4))
        .unwrap()
        .prop_filter("fits", move |s| s.len() <= max)
}

fn arb_report() -> impl Strategy<Value = (u8, Vec<u8>, String, u8)> {
    (
        0u8..7,
        prop::collection::vec(any::<u8>(), 0..64),
        arb_text(64),
        1u8..7,
    )
}

fn report_of<'a>(state: u8, result: &'a [u8], error: &'a str, reason: u8) -> TaskReport<'a> {
    match state {
        0 => TaskReport::Scheduled,
        1 => TaskReport::Queued,
        2 => TaskReport::Running,
        3 => TaskReport::Done(result),
        4 => TaskReport::Failed(error),
        5 => TaskReport::Cancelled(CancelReason::from_byte(reason).unwrap()),
        _ => TaskReport::Unknown,
    }
}

proptest! {
    #[test]
    fn decode_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..1300)) {
        let key = MacKey::new(&[9u8; 16]).unwrap();
        let _ = Datagram::decode(&bytes, None);
        let _ = Datagram::decode(&bytes, Some(&key));
    }

    #[test]
    fn decode_never_panics_on_framed_random_bodies(
        kind in any::<u8>(), flags in 0u8..4, body in prop::collection::vec(any::<u8>(), 0..1100)
    ) {
        let mut b = encode(Message::Heartbeat, None);
        b[3] = kind;
        b[4] = flags & 0b10;
        b[6..8].copy_from_slice(&(body.len() as u16).to_be_bytes());
        b.extend_from_slice(&body);
        if let Ok(d) = Datagram::decode(&b, None) {
            // Whatever decodes must encode back to the same bytes.
            let mut out = vec![0xa5; MAX_DATAGRAM];
            let n = d.emit(None, &mut out).unwrap();
            prop_assert_eq!(&out[..n], &b[..]);
        }
    }

    #[test]
    fn parse_emit_round_trip(
        seq in 1u32.., client_id in 1u64.., incarnation in 1u64.., ack in any::<bool>(),
        a in any::<u32>(), b in any::<u32>(), c in any::<u32>(), id in any::<u64>(),
        name in arb_text(255), job in arb_text(32),
        payload in prop::collection::vec(any::<u8>(), 0..1024),
        (state, result, error, reason) in arb_report(),
        which in 0usize..14, keyed in any::<bool>(),
    ) {
        let message = match which {
            0 => Message::Hello { ttl_ms: a, name: &name },
            1 => Message::Heartbeat,
            2 => Message::Submit { request_id: a, delay_ms: b, deadline_ms: c, job: &job, payload: &payload },
            3 => Message::Cancel { task_id: id },
            4 => Message::Status { task_id: id },
            5 => Message::Bye,
            6 => Message::Welcome { ttl_ms: a, tick_ms: b },
            7 => Message::HeartbeatAck { acked_seq: a },
            8 => Message::Accepted { request_id: a, task_id: id },
            9 => Message::Rejected { request_id: a, code: RejectCode::from_u16((b % 6 + 1) as u16).unwrap(), message: &name },
            10 => Message::TaskState { task_id: id, report: report_of(state, &result, &error, reason) },
            11 => Message::CancelResult { task_id: id, outcome: CancelOutcome::from_byte((a % 3) as u8).unwrap() },
            12 => Message::UnknownSession,
            _ => Message::ByeAck,
        };
        let flags = if ack { Flags::ACK } else { Flags::empty() };
        let d = Datagram { header: Header { flags, client_id, incarnation, seq }, message };
        let key = MacKey::new(&[4u8; 20]).unwrap();
        let key = keyed.then_some(&key);
        let mut buf = vec![0xa5; MAX_DATAGRAM];
        match d.emit(key, &mut buf) {
            Ok(n) => {
                let back = Datagram::decode(&buf[..n], key).unwrap();
                prop_assert_eq!(back.message, d.message);
                prop_assert_eq!(back.header.client_id, client_id);
                prop_assert_eq!(back.header.incarnation, incarnation);
                prop_assert_eq!(back.header.seq, seq);
                prop_assert_eq!(back.header.flags.contains(Flags::ACK), ack);
            }
            Err(EmitError::TooLarge { len }) => prop_assert!(len > MAX_DATAGRAM),
            Err(e) => prop_assert!(false, "unexpected {:?}", e),
        }
    }

    #[test]
    fn mutated_keyed_datagrams_never_verify(which in 0usize..22, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let key = MacKey::new(&[2u8; 32]).unwrap();
        let mut b = encode(every_kind()[which], Some(&key));
        let i = pos.index(b.len());
        b[i] ^= 1 << bit;
        prop_assert!(Datagram::decode(&b, Some(&key)).is_err());
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Extend(Vec<u8>),
    BodyLen(u16),
    Byte(prop::sample::Index, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        prop::collection::vec(any::<u8>(), 1..40).prop_map(Mutation::Extend),
        any::<u16>().prop_map(Mutation::BodyLen),
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, v)| Mutation::Byte(i, v)),
    ]
}

fn mutate(bytes: &mut Vec<u8>, m: &Mutation) {
    // Earlier truncations can leave too little to mutate in place.
    let needs = match m {
        Mutation::Extend(_) => 0,
        Mutation::BodyLen(_) => 8,
        _ => 1,
    };
    if bytes.len() < needs {
        return;
    }
    match m {
        Mutation::FlipBit(i, bit) => {
            let i = i.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
        Mutation::Extend(extra) => bytes.extend_from_slice(extra),
        Mutation::BodyLen(v) => bytes[6..8].copy_from_slice(&v.to_be_bytes()),
        Mutation::Byte(i, v) => {
            let i = i.index(bytes.len());
            bytes[i] = *v;
        }
    }
}

proptest! {
    /// Mutations of valid datagrams of every kind, keyless and keyed, one
    /// or several at a time: decoding never panics, and whatever it accepts
    /// is exactly the encoding of a valid message, so no datagram breaking
    /// a rule of the protocol is ever accepted. Keyed, nothing mutated is
    /// accepted at all.
    #[test]
    fn mutated_datagrams_are_refused_or_canonical(
        which in 0usize..22, keyed in any::<bool>(),
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let key = MacKey::new(&[0x33u8; 32]).unwrap();
        let key = keyed.then_some(&key);
        let original = encode(every_kind()[which], key);
        let mut bytes = original.clone();
        for m in &mutations {
            mutate(&mut bytes, m);
        }
        match Datagram::decode(&bytes, key) {
            Ok(d) if bytes != original => {
                prop_assert!(key.is_none(), "a mutated keyed datagram verified: {:?}", mutations);
                let mut out = vec![0xa5; MAX_DATAGRAM];
                let n = d.emit(None, &mut out).unwrap();
                prop_assert_eq!(&out[..n], &bytes[..], "accepted a non-canonical datagram");
            }
            _ => {}
        }
    }
}
