//! The tether wire format, version 1: typed views of every message, with
//! decoding that checks every rule of the protocol and encoding that can only
//! produce valid datagrams.
//!
//! ```text
//!  0      2   3    4     5      6        8           16            24     28
//!  +------+---+----+-----+------+--------+-----------+-------------+------+------ ~ ------+-------+
//!  | "TH" | 1 |kind|flags| 0    |body_len| client_id | incarnation | seq  | body          | MAC?  |
//!  +------+---+----+-----+------+--------+-----------+-------------+------+------ ~ ------+-------+
//!                                                                           body_len bytes  16 bytes
//! ```
//!
//! The rule followed here is smoltcp's: untrusted bytes are checked once, in
//! [`Datagram::decode`], and every accessor after that cannot panic. Decoding
//! never allocates; the decoded [`Message`] borrows text and payload from the
//! datagram buffer.
//!
//! Decoding order matters for cost and for what an attacker can learn: the
//! cheap framing checks run first, then the MAC, then the body. A datagram
//! that fails any of them is dropped by the caller without a reply, so the
//! order is not observable on the wire.

mod mac;
mod replay;

pub use mac::{MacKey, MacKeyError};
pub use replay::{ReplayError, ReplayWindow};

use std::fmt;

/// The two magic bytes that open every datagram ("TH").
pub const MAGIC: [u8; 2] = *b"TH";
/// The protocol version this module speaks.
pub const VERSION: u8 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 28;
/// Length of the truncated HMAC-SHA256 tag.
pub const MAC_LEN: usize = 16;
/// Largest datagram either side accepts; larger ones are dropped.
pub const MAX_DATAGRAM: usize = 1200;
/// Longest job name in a SUBMIT.
pub const MAX_JOB_LEN: usize = 32;
/// Longest payload in a SUBMIT.
pub const MAX_PAYLOAD_LEN: usize = 1024;
/// Longest text field (the length prefix is one byte).
pub const MAX_TEXT_LEN: usize = 255;
/// Largest `result` a done TASK_STATE can carry and still fit in one keyed
/// datagram: 1200 − header − MAC − task_id − state.
pub const MAX_RESULT_LEN: usize = MAX_DATAGRAM - HEADER_LEN - MAC_LEN - 9;

/// Byte ranges of the header fields.
mod field {
    use std::ops::Range;
    pub const MAGIC: Range<usize> = 0..2;
    pub const VERSION: usize = 2;
    pub const KIND: usize = 3;
    pub const FLAGS: usize = 4;
    pub const RESERVED: usize = 5;
    pub const BODY_LEN: Range<usize> = 6..8;
    pub const CLIENT_ID: Range<usize> = 8..16;
    pub const INCARNATION: Range<usize> = 16..24;
    pub const SEQ: Range<usize> = 24..28;
}

/// The `client_id` of a datagram, read without checking anything else:
/// for steering a datagram (to a session's cache lines, or to a shard)
/// before it is decoded. `None` when the datagram is too short to have one.
#[inline]
pub fn peek_client_id(datagram: &[u8]) -> Option<u64> {
    let bytes = datagram.get(field::CLIENT_ID)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// Header flag bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags(u8);

impl Flags {
    /// A 16-byte MAC follows the body.
    pub const MAC: Flags = Flags(0b01);
    /// A HEARTBEAT asks for a HEARTBEAT_ACK.
    pub const ACK: Flags = Flags(0b10);
    const KNOWN: u8 = 0b11;

    /// No flags set.
    pub const fn empty() -> Flags {
        Flags(0)
    }
    /// The raw bits.
    pub const fn bits(self) -> u8 {
        self.0
    }
    /// Whether every bit of `other` is set in `self`.
    pub const fn contains(self, other: Flags) -> bool {
        self.0 & other.0 == other.0
    }
    /// `self` with the bits of `other` set.
    #[must_use]
    pub const fn with(self, other: Flags) -> Flags {
        Flags(self.0 | other.0)
    }
    const fn without(self, other: Flags) -> Flags {
        Flags(self.0 & !other.0)
    }
}

/// Declares a wire enum once: its variants with their values, and the
/// conversion back from the wire (`$from`), which refuses any other value;
/// `ALL` lists the variants in wire order.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ty, from $from:ident {
            $($(#[$vmeta:meta])* $variant:ident = $value:literal,)+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $($(#[$vmeta])* $variant = $value,)+
        }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The value for this wire number, if it names one.
            pub fn $from(value: $repr) -> Option<$name> {
                match value {
                    $($value => Some($name::$variant),)+
                    _ => None,
                }
            }
        }
    };
}

wire_enum! {
    /// Message kinds of both directions.
    #[allow(missing_docs)]
    pub enum Kind: u8, from from_byte {
        Hello = 0x01,
        Heartbeat = 0x02,
        Submit = 0x03,
        Cancel = 0x04,
        Status = 0x05,
        Bye = 0x06,
        Welcome = 0x81,
        HeartbeatAck = 0x82,
        Accepted = 0x83,
        Rejected = 0x84,
        TaskState = 0x85,
        CancelResult = 0x86,
        UnknownSession = 0x87,
        ByeAck = 0x88,
    }
}

impl Kind {
    /// Whether clients send this kind (servers send the others).
    pub fn is_from_client(self) -> bool {
        (self as u8) < 0x80
    }
}

wire_enum! {
    /// Why a task was cancelled (`reason` of a cancelled TASK_STATE).
    pub enum CancelReason: u8, from from_byte {
        /// The session's heartbeats stopped and its TTL ran out.
        Expired = 1,
        /// The client said BYE.
        Left = 2,
        /// A HELLO with a larger incarnation replaced the session.
        Replaced = 3,
        /// The client sent CANCEL.
        Cancelled = 4,
        /// The task ran past its `deadline_ms`.
        Deadline = 5,
        /// The server shut down.
        Shutdown = 6,
    }
}

impl CancelReason {
    /// The lowercase name used in logs, metrics and documentation.
    pub fn name(self) -> &'static str {
        match self {
            CancelReason::Expired => "expired",
            CancelReason::Left => "left",
            CancelReason::Replaced => "replaced",
            CancelReason::Cancelled => "cancelled",
            CancelReason::Deadline => "deadline",
            CancelReason::Shutdown => "shutdown",
        }
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

wire_enum! {
    /// REJECTED `code`.
    pub enum RejectCode: u16, from from_u16 {
        /// No job of that name is registered.
        UnknownJob = 1,
        /// The server's task queue is full.
        QueueFull = 2,
        /// The session has as many unfinished tasks as it may.
        TooManyTasks = 3,
        /// The request is well formed but its job refuses it (e.g. payload size).
        BadRequest = 4,
        /// The server is shutting down.
        ShuttingDown = 5,
        /// The server holds as many sessions as it may (reply to HELLO).
        TooManySessions = 6,
    }
}

wire_enum! {
    /// CANCEL_RESULT `outcome`.
    pub enum CancelOutcome: u8, from from_byte {
        /// The task was scheduled, queued or running, and its flag is now set.
        CancelledNow = 0,
        /// The task had already reached a final state; nothing changed.
        AlreadyFinished = 1,
        /// No such task (or not this client's, or aged out).
        UnknownTask = 2,
    }
}

/// A task's state as TASK_STATE reports it, with the fields each state carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskReport<'a> {
    /// Waiting out its `delay_ms`.
    Scheduled,
    /// Waiting for a worker.
    Queued,
    /// On a worker.
    Running,
    /// Finished with this result.
    Done(&'a [u8]),
    /// Failed with this error text.
    Failed(&'a str),
    /// Cancelled for this reason.
    Cancelled(CancelReason),
    /// No such task, or its record has aged out.
    Unknown,
}

impl TaskReport<'_> {
    /// The `state` byte.
    pub fn state_byte(&self) -> u8 {
        match self {
            TaskReport::Scheduled => 0,
            TaskReport::Queued => 1,
            TaskReport::Running => 2,
            TaskReport::Done(_) => 3,
            TaskReport::Failed(_) => 4,
            TaskReport::Cancelled(_) => 5,
            TaskReport::Unknown => 6,
        }
    }

    /// Whether this is done, failed or cancelled.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TaskReport::Done(_) | TaskReport::Failed(_) | TaskReport::Cancelled(_)
        )
    }
}

/// A message body, borrowing its text and payload from the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum Message<'a> {
    Hello {
        ttl_ms: u32,
        name: &'a str,
    },
    Heartbeat,
    Submit {
        request_id: u32,
        delay_ms: u32,
        deadline_ms: u32,
        job: &'a str,
        payload: &'a [u8],
    },
    Cancel {
        task_id: u64,
    },
    Status {
        task_id: u64,
    },
    Bye,
    Welcome {
        ttl_ms: u32,
        tick_ms: u32,
    },
    HeartbeatAck {
        acked_seq: u32,
    },
    Accepted {
        request_id: u32,
        task_id: u64,
    },
    Rejected {
        request_id: u32,
        code: RejectCode,
        message: &'a str,
    },
    TaskState {
        task_id: u64,
        report: TaskReport<'a>,
    },
    CancelResult {
        task_id: u64,
        outcome: CancelOutcome,
    },
    UnknownSession,
    ByeAck,
}

impl<'a> Message<'a> {
    /// The kind byte this body travels under.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello { .. } => Kind::Hello,
            Message::Heartbeat => Kind::Heartbeat,
            Message::Submit { .. } => Kind::Submit,
            Message::Cancel { .. } => Kind::Cancel,
            Message::Status { .. } => Kind::Status,
            Message::Bye => Kind::Bye,
            Message::Welcome { .. } => Kind::Welcome,
            Message::HeartbeatAck { .. } => Kind::HeartbeatAck,
            Message::Accepted { .. } => Kind::Accepted,
            Message::Rejected { .. } => Kind::Rejected,
            Message::TaskState { .. } => Kind::TaskState,
            Message::CancelResult { .. } => Kind::CancelResult,
            Message::UnknownSession => Kind::UnknownSession,
            Message::ByeAck => Kind::ByeAck,
        }
    }

    /// Length of the encoded body.
    pub fn body_len(&self) -> usize {
        match *self {
            Message::Heartbeat | Message::Bye | Message::UnknownSession | Message::ByeAck => 0,
            Message::Hello { name, .. } => 4 + 1 + name.len(),
            Message::Submit { job, payload, .. } => 12 + 1 + job.len() + payload.len(),
            Message::Cancel { .. } | Message::Status { .. } => 8,
            Message::Welcome { .. } => 8,
            Message::HeartbeatAck { .. } => 4,
            Message::Accepted { .. } => 12,
            Message::Rejected { message, .. } => 4 + 2 + 1 + message.len(),
            Message::TaskState { report, .. } => {
                9 + match report {
                    TaskReport::Done(result) => result.len(),
                    TaskReport::Failed(error) => 1 + error.len(),
                    TaskReport::Cancelled(_) => 1,
                    _ => 0,
                }
            }
            Message::CancelResult { .. } => 9,
        }
    }

    pub(crate) fn parse(kind: Kind, body: &'a [u8]) -> Result<Message<'a>, Error> {
        let mut r = Reader { buf: body, kind };
        let message = match kind {
            Kind::Hello => Message::Hello {
                ttl_ms: r.u32()?,
                name: r.text()?,
            },
            Kind::Heartbeat => Message::Heartbeat,
            Kind::Submit => {
                let request_id = r.u32()?;
                let delay_ms = r.u32()?;
                let deadline_ms = r.u32()?;
                let job = r.text()?;
                if job.len() > MAX_JOB_LEN {
                    return Err(Error::JobTooLong { len: job.len() });
                }
                let payload = r.rest();
                if payload.len() > MAX_PAYLOAD_LEN {
                    return Err(Error::PayloadTooLarge { len: payload.len() });
                }
                Message::Submit {
                    request_id,
                    delay_ms,
                    deadline_ms,
                    job,
                    payload,
                }
            }
            Kind::Cancel => Message::Cancel { task_id: r.u64()? },
            Kind::Status => Message::Status { task_id: r.u64()? },
            Kind::Bye => Message::Bye,
            Kind::Welcome => Message::Welcome {
                ttl_ms: r.u32()?,
                tick_ms: r.u32()?,
            },
            Kind::HeartbeatAck => Message::HeartbeatAck {
                acked_seq: r.u32()?,
            },
            Kind::Accepted => Message::Accepted {
                request_id: r.u32()?,
                task_id: r.u64()?,
            },
            Kind::Rejected => {
                let request_id = r.u32()?;
                let raw = r.u16()?;
                let code = RejectCode::from_u16(raw).ok_or(Error::BadRejectCode(raw))?;
                Message::Rejected {
                    request_id,
                    code,
                    message: r.text()?,
                }
            }
            Kind::TaskState => {
                let task_id = r.u64()?;
                let state = r.u8()?;
                let report = match state {
                    0 => TaskReport::Scheduled,
                    1 => TaskReport::Queued,
                    2 => TaskReport::Running,
                    3 => TaskReport::Done(r.rest()),
                    4 => TaskReport::Failed(r.text()?),
                    5 => {
                        let raw = r.u8()?;
                        TaskReport::Cancelled(
                            CancelReason::from_byte(raw).ok_or(Error::BadCancelReason(raw))?,
                        )
                    }
                    6 => TaskReport::Unknown,
                    other => return Err(Error::BadTaskState(other)),
                };
                Message::TaskState { task_id, report }
            }
            Kind::CancelResult => {
                let task_id = r.u64()?;
                let raw = r.u8()?;
                Message::CancelResult {
                    task_id,
                    outcome: CancelOutcome::from_byte(raw).ok_or(Error::BadCancelOutcome(raw))?,
                }
            }
            Kind::UnknownSession => Message::UnknownSession,
            Kind::ByeAck => Message::ByeAck,
        };
        if !r.buf.is_empty() {
            return Err(Error::BodyTooLong {
                kind,
                extra: r.buf.len(),
            });
        }
        Ok(message)
    }

    /// Checks the limits that a decoder would enforce, so that nothing
    /// encoded here can be rejected by a conforming peer.
    fn check_emittable(&self) -> Result<(), EmitError> {
        let text_ok = |text: &str| text.len() <= MAX_TEXT_LEN;
        let ok = match *self {
            Message::Hello { name, .. } => text_ok(name),
            Message::Submit { job, payload, .. } => {
                job.len() <= MAX_JOB_LEN && payload.len() <= MAX_PAYLOAD_LEN
            }
            Message::Rejected { message, .. } => text_ok(message),
            Message::TaskState {
                report: TaskReport::Failed(error),
                ..
            } => text_ok(error),
            _ => true,
        };
        if ok {
            Ok(())
        } else {
            Err(EmitError::FieldTooLong)
        }
    }

    fn write_body(&self, out: &mut [u8]) {
        let mut w = Writer { buf: out, at: 0 };
        match *self {
            Message::Hello { ttl_ms, name } => {
                w.u32(ttl_ms);
                w.text(name);
            }
            Message::Submit {
                request_id,
                delay_ms,
                deadline_ms,
                job,
                payload,
            } => {
                w.u32(request_id);
                w.u32(delay_ms);
                w.u32(deadline_ms);
                w.text(job);
                w.bytes(payload);
            }
            Message::Cancel { task_id } | Message::Status { task_id } => w.u64(task_id),
            Message::Welcome { ttl_ms, tick_ms } => {
                w.u32(ttl_ms);
                w.u32(tick_ms);
            }
            Message::HeartbeatAck { acked_seq } => w.u32(acked_seq),
            Message::Accepted {
                request_id,
                task_id,
            } => {
                w.u32(request_id);
                w.u64(task_id);
            }
            Message::Rejected {
                request_id,
                code,
                message,
            } => {
                w.u32(request_id);
                w.u16(code as u16);
                w.text(message);
            }
            Message::TaskState { task_id, report } => {
                w.u64(task_id);
                w.u8(report.state_byte());
                match report {
                    TaskReport::Done(result) => w.bytes(result),
                    TaskReport::Failed(error) => w.text(error),
                    TaskReport::Cancelled(reason) => w.u8(reason as u8),
                    _ => {}
                }
            }
            Message::CancelResult { task_id, outcome } => {
                w.u64(task_id);
                w.u8(outcome as u8);
            }
            Message::Heartbeat | Message::Bye | Message::UnknownSession | Message::ByeAck => {}
        }
        debug_assert_eq!(w.at, out.len(), "body length mismatch for {self:?}");
    }
}

/// The header fields a sender chooses; `kind` and `body_len` follow from the
/// message, and the `MAC` flag from whether a key is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Sender's flags. Only `ACK` is meaningful here; `MAC` is set by
    /// [`Datagram::emit`] when it signs.
    pub flags: Flags,
    /// Names the client; non-zero.
    pub client_id: u64,
    /// Names the session of that client; non-zero.
    pub incarnation: u64,
    /// The sender's datagram counter in this session; non-zero.
    pub seq: u32,
}

/// A decoded, fully checked datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Datagram<'a> {
    /// The header (with the `MAC` flag as it arrived).
    pub header: Header,
    /// The body.
    pub message: Message<'a>,
}

impl<'a> Datagram<'a> {
    /// Decodes `buf`, checking every rule of the protocol. With `key`, the
    /// datagram must carry a MAC that verifies; without, it must carry none.
    ///
    /// Never panics, whatever the bytes.
    pub fn decode(buf: &'a [u8], key: Option<&MacKey>) -> Result<Datagram<'a>, Error> {
        if buf.len() > MAX_DATAGRAM {
            return Err(Error::TooLarge { len: buf.len() });
        }
        if buf.len() < HEADER_LEN {
            return Err(Error::Truncated { len: buf.len() });
        }
        if buf[field::MAGIC] != MAGIC {
            return Err(Error::BadMagic);
        }
        if buf[field::VERSION] != VERSION {
            return Err(Error::BadVersion(buf[field::VERSION]));
        }
        let kind = Kind::from_byte(buf[field::KIND]).ok_or(Error::UnknownKind(buf[field::KIND]))?;
        let flags = Flags(buf[field::FLAGS]);
        if flags.bits() & !Flags::KNOWN != 0 {
            return Err(Error::ReservedFlags(flags.bits()));
        }
        if buf[field::RESERVED] != 0 {
            return Err(Error::ReservedByte(buf[field::RESERVED]));
        }
        let mac_len = if flags.contains(Flags::MAC) {
            MAC_LEN
        } else {
            0
        };
        let declared = usize::from(be_u16(&buf[field::BODY_LEN]));
        let actual = buf.len().saturating_sub(HEADER_LEN + mac_len);
        if buf.len() < HEADER_LEN + mac_len || declared != actual {
            return Err(Error::BodyLength {
                declared,
                actual: buf.len() as isize - (HEADER_LEN + mac_len) as isize,
            });
        }
        let header = Header {
            flags,
            client_id: be_u64(&buf[field::CLIENT_ID]),
            incarnation: be_u64(&buf[field::INCARNATION]),
            seq: be_u32(&buf[field::SEQ]),
        };
        if header.client_id == 0 {
            return Err(Error::ZeroClientId);
        }
        if header.incarnation == 0 {
            return Err(Error::ZeroIncarnation);
        }
        if header.seq == 0 {
            return Err(Error::ZeroSeq);
        }
        let signed_len = HEADER_LEN + declared;
        match (key, flags.contains(Flags::MAC)) {
            (Some(key), true) => {
                if !key.verify(&buf[..signed_len], &buf[signed_len..]) {
                    return Err(Error::BadMac);
                }
            }
            (Some(_), false) => return Err(Error::MissingMac),
            (None, true) => return Err(Error::UnexpectedMac),
            (None, false) => {}
        }
        let message = Message::parse(kind, &buf[HEADER_LEN..signed_len])?;
        Ok(Datagram { header, message })
    }

    /// Length of this datagram once encoded, with or without a MAC.
    pub fn encoded_len(&self, keyed: bool) -> usize {
        HEADER_LEN + self.message.body_len() + if keyed { MAC_LEN } else { 0 }
    }

    /// The datagram of `message` in the session `(client_id, incarnation)`
    /// with number `seq` and `flags` (the `MAC` flag is set by encoding
    /// with a key).
    pub fn new(
        flags: Flags,
        client_id: u64,
        incarnation: u64,
        seq: u32,
        message: Message<'a>,
    ) -> Datagram<'a> {
        Datagram {
            header: Header {
                flags,
                client_id,
                incarnation,
                seq,
            },
            message,
        }
    }

    /// Encodes into a new buffer of exactly the datagram's length (see
    /// [`Datagram::emit`]).
    pub fn to_vec(&self, key: Option<&MacKey>) -> Result<Vec<u8>, EmitError> {
        let mut buf = vec![0; self.encoded_len(key.is_some())];
        let n = self.emit(key, &mut buf)?;
        buf.truncate(n);
        Ok(buf)
    }

    /// Encodes into the front of `out` and returns the length written. With
    /// `key`, sets the `MAC` flag and appends the tag; without, clears it.
    pub fn emit(&self, key: Option<&MacKey>, out: &mut [u8]) -> Result<usize, EmitError> {
        self.message.check_emittable()?;
        let body_len = self.message.body_len();
        let len = self.encoded_len(key.is_some());
        if len > MAX_DATAGRAM {
            return Err(EmitError::TooLarge { len });
        }
        if out.len() < len {
            return Err(EmitError::BufferTooSmall {
                needed: len,
                available: out.len(),
            });
        }
        let flags = match key {
            Some(_) => self.header.flags.with(Flags::MAC),
            None => self.header.flags.without(Flags::MAC),
        };
        out[field::MAGIC].copy_from_slice(&MAGIC);
        out[field::VERSION] = VERSION;
        out[field::KIND] = self.message.kind() as u8;
        out[field::FLAGS] = flags.bits();
        out[field::RESERVED] = 0;
        out[field::BODY_LEN].copy_from_slice(&(body_len as u16).to_be_bytes());
        out[field::CLIENT_ID].copy_from_slice(&self.header.client_id.to_be_bytes());
        out[field::INCARNATION].copy_from_slice(&self.header.incarnation.to_be_bytes());
        out[field::SEQ].copy_from_slice(&self.header.seq.to_be_bytes());
        let signed_len = HEADER_LEN + body_len;
        self.message.write_body(&mut out[HEADER_LEN..signed_len]);
        if let Some(key) = key {
            let tag = key.sign(&out[..signed_len]);
            out[signed_len..len].copy_from_slice(&tag);
        }
        Ok(len)
    }
}

/// Why a datagram was refused. Each variant names the rule it broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// Longer than 1200 bytes.
    TooLarge {
        /// Datagram length.
        len: usize,
    },
    /// Shorter than the 28-byte header.
    Truncated {
        /// Datagram length.
        len: usize,
    },
    /// The first two bytes are not "TH".
    BadMagic,
    /// Not version 1.
    BadVersion(u8),
    /// The kind byte names no message.
    UnknownKind(u8),
    /// A flag bit other than MAC and ACK is set.
    ReservedFlags(u8),
    /// The reserved byte is not zero.
    ReservedByte(u8),
    /// `body_len` disagrees with the datagram's length.
    BodyLength {
        /// What the header says.
        declared: usize,
        /// What the datagram holds (negative when shorter than the MAC).
        actual: isize,
    },
    /// `client_id` is zero.
    ZeroClientId,
    /// `incarnation` is zero.
    ZeroIncarnation,
    /// `seq` is zero.
    ZeroSeq,
    /// A keyed receiver got a datagram without a MAC.
    MissingMac,
    /// A keyless receiver got a datagram with a MAC.
    UnexpectedMac,
    /// The MAC does not verify.
    BadMac,
    /// The body ends before its kind's fields do.
    BodyTooShort {
        /// The message kind.
        kind: Kind,
    },
    /// The body has bytes after its kind's fields.
    BodyTooLong {
        /// The message kind.
        kind: Kind,
        /// Bytes left over.
        extra: usize,
    },
    /// A text field is not UTF-8.
    BadUtf8,
    /// A SUBMIT's job name is longer than 32 bytes.
    JobTooLong {
        /// Its length.
        len: usize,
    },
    /// A SUBMIT's payload is longer than 1024 bytes.
    PayloadTooLarge {
        /// Its length.
        len: usize,
    },
    /// A TASK_STATE `state` outside 0..=6.
    BadTaskState(u8),
    /// A cancel `reason` outside 1..=6.
    BadCancelReason(u8),
    /// A REJECTED `code` outside 1..=6.
    BadRejectCode(u16),
    /// A CANCEL_RESULT `outcome` outside 0..=2.
    BadCancelOutcome(u8),
}

impl Error {
    /// Whether this is an authentication failure rather than a framing one
    /// (the two are counted apart).
    pub fn is_auth(&self) -> bool {
        matches!(
            self,
            Error::MissingMac | Error::UnexpectedMac | Error::BadMac
        )
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::TooLarge { len } => write!(f, "datagram of {len} bytes exceeds {MAX_DATAGRAM}"),
            Error::Truncated { len } => {
                write!(
                    f,
                    "datagram of {len} bytes is shorter than the {HEADER_LEN}-byte header"
                )
            }
            Error::BadMagic => f.write_str("magic is not \"TH\""),
            Error::BadVersion(v) => write!(f, "version {v} is not {VERSION}"),
            Error::UnknownKind(k) => write!(f, "kind {k:#04x} names no message"),
            Error::ReservedFlags(b) => write!(f, "flags {b:#04x} set a reserved bit"),
            Error::ReservedByte(b) => write!(f, "reserved byte is {b}, not 0"),
            Error::BodyLength { declared, actual } => {
                write!(f, "body_len {declared} but the datagram holds {actual}")
            }
            Error::ZeroClientId => f.write_str("client_id is 0"),
            Error::ZeroIncarnation => f.write_str("incarnation is 0"),
            Error::ZeroSeq => f.write_str("seq is 0"),
            Error::MissingMac => f.write_str("no MAC, and this side requires one"),
            Error::UnexpectedMac => f.write_str("a MAC, and this side has no key"),
            Error::BadMac => f.write_str("MAC does not verify"),
            Error::BodyTooShort { kind } => write!(f, "{kind:?} body ends before its fields"),
            Error::BodyTooLong { kind, extra } => {
                write!(f, "{kind:?} body has {extra} bytes past its fields")
            }
            Error::BadUtf8 => f.write_str("text field is not UTF-8"),
            Error::JobTooLong { len } => write!(f, "job name of {len} bytes exceeds {MAX_JOB_LEN}"),
            Error::PayloadTooLarge { len } => {
                write!(f, "payload of {len} bytes exceeds {MAX_PAYLOAD_LEN}")
            }
            Error::BadTaskState(s) => write!(f, "task state {s} is not 0..=6"),
            Error::BadCancelReason(r) => write!(f, "cancel reason {r} is not 1..=6"),
            Error::BadRejectCode(c) => write!(f, "reject code {c} is not 1..=6"),
            Error::BadCancelOutcome(o) => write!(f, "cancel outcome {o} is not 0..=2"),
        }
    }
}

impl std::error::Error for Error {}

/// Why a message could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmitError {
    /// The encoded datagram would exceed 1200 bytes.
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// The output buffer is too small.
    BufferTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes given.
        available: usize,
    },
    /// A text, job or payload field exceeds its limit.
    FieldTooLong,
}

impl fmt::Display for EmitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmitError::TooLarge { len } => {
                write!(f, "encoded datagram of {len} bytes exceeds {MAX_DATAGRAM}")
            }
            EmitError::BufferTooSmall { needed, available } => {
                write!(f, "buffer of {available} bytes, {needed} needed")
            }
            EmitError::FieldTooLong => f.write_str("a text, job or payload field is too long"),
        }
    }
}

impl std::error::Error for EmitError {}

/// Cuts `text` to at most `max` bytes at a character boundary, for error and
/// reject texts that must fit a one-byte length prefix.
pub fn truncate_text(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// A bounds-checked cursor over a body: every read either succeeds or
/// reports the kind whose body was too short.
struct Reader<'a> {
    buf: &'a [u8],
    kind: Kind,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.buf.len() < n {
            return Err(Error::BodyTooShort { kind: self.kind });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, Error> {
        Ok(be_u16(self.take(2)?))
    }
    fn u32(&mut self) -> Result<u32, Error> {
        Ok(be_u32(self.take(4)?))
    }
    fn u64(&mut self) -> Result<u64, Error> {
        Ok(be_u64(self.take(8)?))
    }
    fn text(&mut self) -> Result<&'a str, Error> {
        let len = usize::from(self.u8()?);
        std::str::from_utf8(self.take(len)?).map_err(|_| Error::BadUtf8)
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.buf)
    }
}

/// A cursor that writes a body whose length was computed beforehand.
struct Writer<'a> {
    buf: &'a mut [u8],
    at: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) {
        self.buf[self.at..self.at + b.len()].copy_from_slice(b);
        self.at += b.len();
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }
    fn text(&mut self, s: &str) {
        // check_emittable has bounded every text to 255 bytes.
        self.u8(s.len() as u8);
        self.bytes(s.as_bytes());
    }
}

#[cfg(test)]
mod tests;
