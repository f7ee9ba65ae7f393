"""A tether client in pure Python (standard library only, Python 3.9+).

Two interfaces over one wire codec, with one shape:

* ``Client``: blocking. A background thread receives replies and sends
  heartbeats. ``submit(job, payload)`` returns a ``Task`` handle
  (``.id``, ``.result(timeout)``, ``.status()``, ``.cancel()``);
  ``run(job, payload)`` returns the final ``TaskResult``.
* ``AsyncSession``: asyncio. ``async with AsyncSession(...) as s`` (or
  ``s = await AsyncSession.connect(...)`` ... ``await s.aclose()``) opens a
  session that heartbeats in a background task. ``await s.submit(job,
  payload)`` returns an ``AsyncTask`` handle (``.id``, ``await handle``,
  ``await handle.status()``, ``await handle.cancel()``); ``await s.run(job,
  payload)`` returns the final ``TaskResult``. Cancelling the coroutine that
  awaits a handle (or ``run``) sends CANCEL to the server.

Payloads are bytes: ``u32``, ``u64`` and ``text`` make those of the
standard jobs (``sleep`` takes milliseconds as u32, ``spin`` rounds as
u64), ``parse_u32``, ``parse_u64`` and ``parse_text`` read results. The
client id defaults to the one ``tether client`` uses for this user on this
host (``default_client_id``). A client id has one session at a time: a
second program with the same id (another script, or a ``tether client``
command) replaces the first one's session, cancelling its tasks (reason
'replaced'), so programs that run at the same time need a client_id each.

Both take one server ``(host, port)`` or a list of them; a name stands for
all its A/AAAA records. With several servers, each client ranks them by
rendezvous (highest-random-weight) hashing of its client_id (``rank``, the
same bit for bit as the Rust client's) and talks to its first choice only.
When that host has been silent for a TTL, the client moves to its next
choice and opens a fresh session there; it stays on a host that answers,
so a host that joins takes only new clients and those of lost hosts. Names
are resolved again every ``resolve_every`` seconds, and a client whose host
has left the list moves at once. A task is never moved: on the lost host it
is cancelled (reason expired) when the abandoned session expires there.

The wire format is described in PROTOCOL.md at the top of the repository.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import itertools
import operator
import os
import random
import socket
import struct
import sys
import threading
import time
from types import TracebackType
from typing import (Any, Callable, Deque, Dict, FrozenSet, Generator, List, NamedTuple,
                    Optional, Sequence, Set, Tuple, Type, TypeVar, Union, cast)

# Read by pyproject.toml (setuptools' ``attr:``) as the package's version.
__version__ = "0.1.0"

__all__ = [
    "AsyncSession",
    "AsyncTask",
    "Client",
    "Rejected",
    "SessionLost",
    "Task",
    "TaskResult",
    "TetherError",
    "Timeout",
    "TimeoutError_",
    "default_client_id",
    "parse_text",
    "parse_u32",
    "parse_u64",
    "rank",
    "text",
    "u32",
    "u64",
    "weight",
]

MAX_EVENTS = 1024  # unclaimed events kept by the blocking client, newest last

MAGIC = b"TH"
VERSION = 1
HEADER = struct.Struct(">2sBBBBHQQI")  # 28 bytes
MAC_LEN = 16
MAX_DATAGRAM = 1200
MAX_JOB_NAME = 32  # bytes of UTF-8 (a SUBMIT body rule)
MAX_PAYLOAD = 1024  # bytes (a SUBMIT body rule)
FLAG_MAC = 0x01
FLAG_ACK = 0x02

HELLO, HEARTBEAT, SUBMIT, CANCEL, STATUS, BYE = 0x01, 0x02, 0x03, 0x04, 0x05, 0x06
WELCOME, HEARTBEAT_ACK, ACCEPTED, REJECTED = 0x81, 0x82, 0x83, 0x84
TASK_STATE, CANCEL_RESULT, UNKNOWN_SESSION, BYE_ACK = 0x85, 0x86, 0x87, 0x88

STATES = ["scheduled", "queued", "running", "done", "failed", "cancelled", "unknown"]
REASONS = {1: "expired", 2: "left", 3: "replaced", 4: "cancelled", 5: "deadline", 6: "shutdown"}
OUTCOMES = {0: "cancelled", 1: "already_finished", 2: "unknown"}
REJECT_CODES = {
    1: "unknown job",
    2: "queue full",
    3: "too many tasks for this session",
    4: "bad request",
    5: "shutting down",
    6: "too many sessions",
}


class TetherError(Exception):
    """Base class of this module's errors."""


class Rejected(TetherError):
    """The server refused a HELLO or SUBMIT (``code`` as in PROTOCOL.md)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"rejected ({code}, {REJECT_CODES.get(code, '?')}): {message}")
        self.code = code
        self.message = message


class SessionLost(TetherError):
    """The server no longer knows the session (it expired, or the server
    restarted). The client opens a new session on its own; retry the call.
    ``first_try`` says whether the very first datagram of the call was
    answered so (the session was already gone when the call began)."""

    def __init__(self, message: str, first_try: bool = True) -> None:
        super().__init__(message)
        self.first_try = first_try


class Timeout(TetherError, TimeoutError):
    """No reply after every try (is the server running? is the key right?),
    or a task that did not finish in the time given. A ``TimeoutError`` too,
    so code that handles timeouts in general handles this one."""


# The name this error had first; kept so existing ``except`` clauses work.
TimeoutError_ = Timeout


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """A task's state: ``state`` is one of scheduled, queued, running, done,
    failed, cancelled, unknown; ``result`` (done), ``error`` (failed) and
    ``reason`` (cancelled: expired, left, replaced, cancelled, deadline,
    shutdown) are set by state."""

    task_id: int
    state: str
    result: bytes = b""
    error: str = ""
    reason: str = ""

    @property
    def final(self) -> bool:
        """Whether the task has ended (done, failed or cancelled): its state
        will not change again."""
        return self.state in ("done", "failed", "cancelled")


# --- payloads -------------------------------------------------------------


def _unsigned(n: int, bits: int) -> bytes:
    """``n`` as ``bits // 8`` big-endian bytes, or ``ValueError``."""
    n = operator.index(n)
    if not 0 <= n < 1 << bits:
        raise ValueError(f"u{bits} takes 0 to {(1 << bits) - 1}, not {n}")
    return n.to_bytes(bits // 8, "big")


def u32(n: int) -> bytes:
    """``n`` as 4 big-endian bytes: the payload of the standard ``sleep``
    job (milliseconds). Raises ``ValueError`` outside 0 to 2**32 - 1."""
    return _unsigned(n, 32)


def u64(n: int) -> bytes:
    """``n`` as 8 big-endian bytes: the payload of the standard ``spin``
    job (rounds). Raises ``ValueError`` outside 0 to 2**64 - 1."""
    return _unsigned(n, 64)


def text(s: str) -> bytes:
    """``s`` in UTF-8, as ``echo`` and ``fail`` take it. Raises
    ``ValueError`` past the 1024 bytes a payload holds."""
    data = s.encode("utf-8")
    if len(data) > MAX_PAYLOAD:
        raise ValueError(f"a payload holds at most {MAX_PAYLOAD} bytes, not {len(data)}")
    return data


def parse_u32(data: bytes) -> int:
    """The number in 4 big-endian bytes (as ``u32`` writes it). Raises
    ``ValueError`` for any other length."""
    if len(data) != 4:
        raise ValueError(f"a u32 is 4 bytes, not {len(data)}")
    return int.from_bytes(data, "big")


def parse_u64(data: bytes) -> int:
    """The number in 8 big-endian bytes: e.g. the result of ``spin`` (its
    final state). Raises ``ValueError`` for any other length."""
    if len(data) != 8:
        raise ValueError(f"a u64 is 8 bytes, not {len(data)}")
    return int.from_bytes(data, "big")


def parse_text(data: bytes) -> str:
    """``data`` read as UTF-8 (``UnicodeDecodeError``, a ``ValueError``, if
    it is not)."""
    return data.decode("utf-8")


# --- wire codec -----------------------------------------------------------

# Each server datagram's body, by kind: what ``decode`` gives as its fields.


class _Welcome(NamedTuple):
    """WELCOME: the TTL and tick the server granted, in milliseconds."""

    ttl_ms: int
    tick_ms: int


class _HeartbeatAck(NamedTuple):
    """HEARTBEAT_ACK: the seq of the heartbeat it answers."""

    seq: int


class _Accepted(NamedTuple):
    """ACCEPTED: a SUBMIT's request id and the new task's id."""

    request_id: int
    task_id: int


class _Refusal(NamedTuple):
    """REJECTED: the request id (0 for a HELLO), code and message."""

    request_id: int
    code: int
    message: str


class _CancelResult(NamedTuple):
    """CANCEL_RESULT: the task and the outcome (an ``OUTCOMES`` value)."""

    task_id: int
    outcome: str


# () for UNKNOWN_SESSION and BYE_ACK, whose bodies are empty.
_Fields = Union[_Welcome, _HeartbeatAck, _Accepted, _Refusal, TaskResult, _CancelResult, Tuple[()]]
# (kind, flags, client_id, incarnation, seq, fields)
_Decoded = Tuple[int, int, int, int, int, _Fields]
# Whether a reply (kind, fields) is the one a request waits for.
_Wanted = Callable[[int, _Fields], bool]

_F = TypeVar("_F")


def _expect(fields: _Fields, kind: Type[_F]) -> _F:
    """``fields`` as the body type a matcher already chose (so never
    raises, but says so to the type checker)."""
    if not isinstance(fields, kind):
        raise TetherError(f"unexpected reply {fields!r}")
    return fields


def _short_text(s: str) -> bytes:
    """A text field: a length byte, then up to 255 bytes of UTF-8."""
    b = s.encode("utf-8")
    if len(b) > 255:
        raise ValueError("text fields hold at most 255 bytes")
    return bytes([len(b)]) + b


def encode(kind: int, client_id: int, incarnation: int, seq: int, body: bytes,
           key: Optional[bytes] = None, flags: int = 0) -> bytes:
    """One datagram: header, body and, with ``key``, the truncated MAC."""
    flags = (flags & FLAG_ACK) | (FLAG_MAC if key else 0)
    header = HEADER.pack(MAGIC, VERSION, kind, flags, 0, len(body), client_id, incarnation, seq)
    data = header + body
    if key:
        data += hmac.new(key, data, hashlib.sha256).digest()[:MAC_LEN]
    if len(data) > MAX_DATAGRAM:
        raise ValueError("datagram larger than 1200 bytes")
    return data


def decode(data: bytes, key: Optional[bytes] = None) -> Optional[_Decoded]:
    """Returns (kind, flags, client_id, incarnation, seq, fields) for a valid
    server datagram, or None for anything that breaks a rule. ``fields`` is
    a tuple of the body's fields (a named tuple), or a ``TaskResult`` for
    TASK_STATE."""
    if not HEADER.size <= len(data) <= MAX_DATAGRAM:
        return None
    magic, version, kind, flags, reserved, body_len, client_id, incarnation, seq = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION or reserved or flags & ~(FLAG_MAC | FLAG_ACK):
        return None
    mac_len = MAC_LEN if flags & FLAG_MAC else 0
    if body_len != len(data) - HEADER.size - mac_len or not (client_id and incarnation and seq):
        return None
    signed = data[: HEADER.size + body_len]
    if key:
        if not mac_len:
            return None
        expected = hmac.new(key, signed, hashlib.sha256).digest()[:MAC_LEN]
        if not hmac.compare_digest(expected, data[len(signed):]):
            return None
    elif mac_len:
        return None
    body = signed[HEADER.size:]
    try:
        fields = _parse_body(kind, body)
    except Exception:  # noqa: BLE001 - any body the parser cannot read is malformed
        return None
    if fields is None:
        return None
    return kind, flags, client_id, incarnation, seq, fields


def _parse_body(kind: int, body: bytes) -> Optional[_Fields]:
    """The fields of a server datagram's body, None for a kind no server
    sends; raises for a body that breaks its kind's rules."""
    def exact(n: int) -> None:
        if len(body) != n:
            raise ValueError("body length")

    if kind == WELCOME:
        exact(8)
        return _Welcome(*struct.unpack(">II", body))
    if kind == HEARTBEAT_ACK:
        exact(4)
        return _HeartbeatAck(*struct.unpack(">I", body))
    if kind == ACCEPTED:
        exact(12)
        return _Accepted(*struct.unpack(">IQ", body))
    if kind == REJECTED:
        request_id, code, n = struct.unpack_from(">IHB", body)
        exact(7 + n)
        return _Refusal(request_id, code, body[7:].decode("utf-8"))
    if kind == TASK_STATE:
        task_id, state = struct.unpack_from(">QB", body)
        rest = body[9:]
        if state == 3:
            return TaskResult(task_id, "done", result=bytes(rest))
        if state == 4:
            n = rest[0]
            if len(rest) != 1 + n:
                raise ValueError("error text length")
            return TaskResult(task_id, "failed", error=rest[1:].decode("utf-8"))
        if state == 5:
            if len(rest) != 1 or rest[0] not in REASONS:
                raise ValueError("reason")
            return TaskResult(task_id, "cancelled", reason=REASONS[rest[0]])
        if state in (0, 1, 2, 6) and not rest:
            return TaskResult(task_id, STATES[state])
        raise ValueError("state")
    if kind == CANCEL_RESULT:
        exact(9)
        task_id, outcome = struct.unpack(">QB", body)
        if outcome not in OUTCOMES:
            raise ValueError("outcome")
        return _CancelResult(task_id, OUTCOMES[outcome])
    if kind in (UNKNOWN_SESSION, BYE_ACK):
        exact(0)
        return ()
    return None


class ReplayWindow:
    """Highest seq seen and a 64-entry bitmap below it (RFC 4303)."""

    def __init__(self, first: int) -> None:
        self.top, self.seen = first, 1

    def accept(self, seq: int) -> bool:
        """Whether ``seq`` is new (and now seen): above the window, or in it
        and not seen before. Too old or seen: False."""
        if seq > self.top:
            shift = seq - self.top
            self.seen = ((self.seen << shift) | 1) & ((1 << 64) - 1) if shift < 64 else 1
            self.top = seq
            return True
        age = self.top - seq
        if age >= 64 or self.seen >> age & 1:
            return False
        self.seen |= 1 << age
        return True


def _new_incarnation(previous: int = 0) -> int:
    return max(time.time_ns(), previous + 1)


def hello_backoff(attempt: int, base: float, cap: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after HELLO try ``attempt`` (0 is the first): full
    jitter over an exponential backoff, ``uniform(0, min(cap, base *
    2**attempt))`` (AWS, "Exponential Backoff And Jitter"), but never under
    a quarter of ``base``, so a reply can arrive before the next try. A
    fleet that reconnects at once (a server restart) spreads out this way
    instead of retrying in lockstep; ``cap`` is the TTL."""
    ceiling = min(max(cap, base), base * 2.0 ** min(attempt, 20))
    return max(base / 4, rand() * ceiling)


# --- client ids -------------------------------------------------------------

# What Rust's str::trim strips: characters of Unicode's White_Space property.
# (Python's str.strip() also strips U+001C..U+001F, which Rust keeps.)
_RUST_WHITESPACE = ("\t\n\v\f\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                    "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def _client_id_for(user: bytes, hostname: bytes) -> int:
    """``default_client_id``'s rule, given USER's bytes and /etc/hostname's.
    As the CLI reads them: either is empty if it is not UTF-8 (Rust's
    ``env::var`` and ``read_to_string`` fail then), and the hostname is
    trimmed of Unicode whitespace."""
    try:
        user.decode("utf-8")
    except UnicodeDecodeError:
        user = b""
    try:
        host = hostname.decode("utf-8").strip(_RUST_WHITESPACE).encode("utf-8")
    except UnicodeDecodeError:
        host = b""
    return max(_fnv1a64(user + b"\0" + host), 1)


def default_client_id() -> int:
    """The client id ``tether client`` uses when given none, bit for bit:
    FNV-1a 64 over the environment variable USER, a 0 byte, and
    /etc/hostname with surrounding whitespace stripped (each empty if unset
    or unreadable), at least 1. The same user on the same host so gets the
    same id from the CLI and from Python: STATUS and CANCEL reach the same
    tasks, but one id has one session at a time, and a HELLO from another
    program with it replaces this one's session (its tasks are cancelled,
    reason 'replaced')."""
    if sys.platform != "win32":
        user = os.environb.get(b"USER", b"")
    else:  # the environment is text there
        try:
            user = os.environ.get("USER", "").encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: not UTF-8, as for Rust
            user = b""
    try:
        with open("/etc/hostname", "rb") as f:
            hostname = f.read()
    except OSError:
        hostname = b""
    return _client_id_for(user, hostname)


# --- several servers --------------------------------------------------------

Address = Tuple[str, int]  # (ip, port) of one server
Servers = Union[Tuple[str, int], Sequence[Tuple[str, int]]]

_U64 = (1 << 64) - 1


def _ip(host: str) -> Optional[str]:
    """``host`` as ipaddress writes it if it is an IP literal, else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def _identity(server: Address) -> bytes:
    """A server's bytes for hashing: its IP (4 or 16 bytes), then its port,
    big-endian."""
    return ipaddress.ip_address(server[0]).packed + struct.pack(">H", server[1])


def _fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & _U64
    return h


def _fmix64(k: int) -> int:
    """MurmurHash3's 64-bit finalizer: every output bit depends on every
    input bit, so nearby client ids (a fleet numbered 1..N) get unrelated
    weights."""
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _U64
    k ^= k >> 33
    k = (k * 0xC4CEB9FE1A85EC53) & _U64
    return k ^ (k >> 33)


@functools.lru_cache(maxsize=1024)
def _server_key(server: Address) -> Tuple[Address, bytes, int]:
    """``server`` as ipaddress writes it, its identity bytes and their
    FNV-1a hash: kept, as a client ranks the same few servers again and
    again."""
    identity = _identity(server)
    return (str(ipaddress.ip_address(server[0])), int(server[1])), identity, _fnv1a64(identity)


def _check_client_id(client_id: int) -> None:
    if not 0 <= client_id <= _U64:
        raise ValueError("client_id must be a 64-bit number")


def weight(client_id: int, server: Address) -> int:
    """How much ``client_id`` wants ``server`` (an (ip, port) pair): its host
    is the server of highest weight. ``fmix64(client_id ^ fnv1a64(ip bytes +
    port))``, as the Rust client computes it, so clients in any language
    that share a client_id choose the same host."""
    _check_client_id(client_id)
    return _fmix64(client_id ^ _server_key((server[0], server[1]))[2])


def rank(client_id: int, servers: Sequence[Address]) -> List[Address]:
    """``servers`` ((ip, port) pairs) in ``client_id``'s order of
    preference, duplicates removed: the first is its host, the next where
    it goes when that one falls silent. Ties (two equal 64-bit weights) go
    to the smaller identity bytes. A server that leaves the list takes only
    its own clients with it, each to its own next choice."""
    _check_client_id(client_id)
    keyed = []
    for ip, port in servers:
        server, identity, h = _server_key((ip, port))
        keyed.append((-_fmix64(client_id ^ h), identity, server))
    keyed.sort(key=lambda k: (k[0], k[1]))
    ranked: List[Address] = []
    for _, _, server in keyed:
        if server not in ranked[-1:]:  # equal servers sort next to each other
            ranked.append(server)
    return ranked


# One getaddrinfo result: (family, type, proto, canonname, sockaddr).
_AddrInfo = Tuple[Any, Any, Any, Any, Tuple[Any, ...]]
# Lookups by entry index: getaddrinfo's list, or the exception it raised.
_Found = Dict[int, Union[Sequence[_AddrInfo], BaseException]]


def _server_list(server: Servers) -> List[Tuple[str, int]]:
    """``server`` as a list of (host, port) pairs: one pair stands for a
    list of one."""
    if isinstance(server, tuple) and server and isinstance(server[0], str):
        host, port = cast(Tuple[str, int], server)
        return [(host, int(port))]
    return [(host, int(port)) for host, port in cast(Sequence[Tuple[str, int]], server)]


class _Hosts:
    """The servers one client may talk to: the (host, port) pairs it was
    given, what they resolve to, its ranking of those, the one it talks to
    (``current``) and when that one last answered (``heard``, monotonic).
    Not thread-safe: the blocking client holds its lock around every use."""

    def __init__(self, client_id: int, server: Servers) -> None:
        self.entries: List[Tuple[str, int]] = _server_list(server)
        if not self.entries:
            raise ValueError("no server given")
        self.client_id = client_id
        # (index, host, port) of each entry that is a name, not an IP.
        self.names = [(i, host, port) for i, (host, port) in enumerate(self.entries) if _ip(host) is None]
        # Each entry's addresses: an IP's at once, a name's once resolved.
        self._found: List[List[Address]] = []
        for host, port in self.entries:
            ip = _ip(host)
            self._found.append([(ip, port)] if ip is not None else [])
        self.family = socket.AF_INET
        self.dual = False  # an IPv6 socket that reaches IPv4 addresses too
        self.ranked: List[Address] = []
        self._listed: FrozenSet[Address] = frozenset()
        self.current: Optional[Address] = None
        self.heard = time.monotonic()

    @property
    def multi(self) -> bool:
        """Several servers: failover is on."""
        return len(self.ranked) > 1

    def _take(self, found: _Found) -> List[Address]:
        """All addresses, after the lookups in ``found`` ({index:
        getaddrinfo's list, or the exception it raised}). A failed lookup
        keeps the entry's last addresses: a DNS outage must not empty the
        list."""
        for i, infos in found.items():
            if isinstance(infos, BaseException):
                continue
            addrs: List[Address] = []
            for family, _, _, _, sockaddr in infos:
                ip = _ip(sockaddr[0]) if family in (socket.AF_INET, socket.AF_INET6) else None
                if ip is not None and (ip, sockaddr[1]) not in addrs:
                    addrs.append((ip, sockaddr[1]))
            if addrs:
                self._found[i] = addrs
        return [addr for addrs in self._found for addr in addrs]

    def start(self, found: _Found) -> None:
        """Takes the first lookups' results: the socket family and the host.
        Raises the first lookup's error if no address is known at all."""
        addrs = self._take(found)
        if not addrs:
            errors = [e for e in found.values() if isinstance(e, BaseException)]
            raise errors[0] if errors else TetherError("no address for any server")
        v6 = [":" in ip for ip, _ in addrs]
        self.family = socket.AF_INET6 if any(v6) else socket.AF_INET
        self.dual = any(v6) and not all(v6)
        self._rank(addrs)
        self.move(self.ranked[0])

    def update(self, found: _Found) -> bool:
        """Takes a re-resolution's results; True if the current host has
        left the list (the client then moves to the new first choice).
        Addresses the socket cannot reach (IPv6 on an IPv4 socket) are left
        out: the socket's family was fixed by the first list."""
        addrs = [a for a in self._take(found)
                 if self.dual or (":" in a[0]) == (self.family == socket.AF_INET6)]
        if not addrs:
            return False
        self._rank(addrs)
        return self.current not in self._listed

    def _rank(self, addrs: List[Address]) -> None:
        self.ranked = rank(self.client_id, addrs)
        self._listed = frozenset(self.ranked)

    def after(self, server: Optional[Address]) -> Address:
        """The host after ``server`` in this client's ranking, wrapping."""
        if server not in self._listed:
            return self.ranked[0]
        return self.ranked[(self.ranked.index(server) + 1) % len(self.ranked)]

    def move(self, server: Address) -> None:
        """Makes ``server`` the current host, with a whole TTL to answer."""
        self.current = server
        self.heard = time.monotonic()

    def socket(self) -> socket.socket:
        """An unconnected UDP socket of the list's family (the destination
        changes on failover): IPv4 if every address is, else IPv6, which
        also reaches IPv4 addresses through v4-mapped ones."""
        sock = socket.socket(self.family, socket.SOCK_DGRAM)
        try:
            if self.family == socket.AF_INET6:
                try:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                    self.dual = True
                except (OSError, AttributeError):
                    if self.dual:  # a mixed list needs it
                        raise
            sock.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", 0))
        except BaseException:
            sock.close()
            raise
        return sock

    def sockaddr(self) -> Tuple[str, int]:
        """Where to send to reach the current host from this socket."""
        if self.current is None:
            raise TetherError("no server chosen yet")
        ip, port = self.current
        if self.family == socket.AF_INET6 and ":" not in ip:
            return "::ffff:" + ip, port
        return ip, port

    def known(self, addr: Tuple[Any, ...]) -> Optional[Address]:
        """The listed server a datagram came from (``addr`` as recvfrom gives
        it, v4-mapped on a dual socket), or None."""
        server = (addr[0], addr[1])
        if server in self._listed:
            return server
        try:
            ip = ipaddress.ip_address(addr[0])
        except ValueError:
            return None
        server = (str(getattr(ip, "ipv4_mapped", None) or ip), addr[1])
        return server if server in self._listed else None


def _move_on_or_raise(failed: TetherError, left: int, n: int) -> None:
    """Opening's rule, for both clients, after a HELLO to one of `n` hosts
    failed with `failed` and `left` hosts are still untried: returns when
    the client moves on to the next host, else raises. A refusal moves on
    only when the host is full or stopping (another host may take the
    client); silence moves on while a host is left."""
    if isinstance(failed, Rejected):
        if failed.code not in (5, 6) or not left:
            raise failed
    elif not left:
        if n == 1:
            raise failed
        raise Timeout(f"no reply from any of the {n} servers "
                      "(are they running, and is the key right?)") from None


def _lookup(hosts: _Hosts) -> _Found:
    """Resolves ``hosts``' names now: {index: getaddrinfo's list, or the
    exception it raised}."""
    found: _Found = {}
    for i, host, port in hosts.names:
        try:
            found[i] = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as e:
            found[i] = e
    return found


async def _lookup_async(hosts: _Hosts) -> _Found:
    """As ``_lookup``, on the loop's executor."""
    loop = asyncio.get_running_loop()
    got = await asyncio.gather(
        *(loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM) for _, host, port in hosts.names),
        return_exceptions=True)
    return {i: infos for (i, _, _), infos in zip(hosts.names, got)}


def _submit_body(request_id: int, job: str, payload: bytes, delay: float, deadline: float) -> bytes:
    job_bytes = job.encode("utf-8")
    if len(job_bytes) > MAX_JOB_NAME or len(payload) > MAX_PAYLOAD:
        raise ValueError(f"job names hold at most {MAX_JOB_NAME} bytes, payloads {MAX_PAYLOAD}")
    return struct.pack(">III", request_id, int(delay * 1000), int(deadline * 1000)) + _short_text(job) + payload


class _Session:
    """State shared by both clients: identity, numbering, replay window."""

    def __init__(self, client_id: int, key: Optional[bytes]) -> None:
        if not 0 < client_id < 2 ** 64:
            raise ValueError("client_id must be a non-zero 64-bit number")
        self.client_id = client_id
        self.key = key
        self.incarnation = _new_incarnation()
        self.seq = 0
        self.window: Optional[ReplayWindow] = None
        self.request_ids = itertools.count(1)
        # Datagrams dropped: malformed, failing the MAC, for another client
        # or session, or replays.
        self.dropped = 0

    def datagram(self, kind: int, body: bytes = b"", flags: int = 0) -> Tuple[int, bytes]:
        """The next datagram of this session: (its seq, its bytes)."""
        self.seq += 1
        return self.seq, encode(kind, self.client_id, self.incarnation, self.seq, body, self.key, flags)

    def renew(self) -> None:
        """A new session (larger incarnation): numbering starts again."""
        self.incarnation = _new_incarnation(self.incarnation)
        self.seq = 0
        self.window = None
        self.request_ids = itertools.count(1)

    def accept(self, data: bytes) -> Optional[_Decoded]:
        """The decoded datagram if it is for this client and not a replay;
        anything else is counted in ``dropped`` and gives None."""
        d = self._accept(data)
        if d is None:
            self.dropped += 1
        return d

    def _accept(self, data: bytes) -> Optional[_Decoded]:
        d = decode(data, self.key)
        if d is None:
            return None
        kind, _, client_id, incarnation, seq, fields = d
        if client_id != self.client_id:
            return None
        if kind == UNKNOWN_SESSION:
            # It copies our own header: only meaningful for our incarnation.
            return d if incarnation == self.incarnation else None
        if incarnation != self.incarnation:
            # Final states pushed for an earlier session's tasks still count.
            return d if isinstance(fields, TaskResult) and fields.final else None
        if self.window is None:
            self.window = ReplayWindow(seq)
        elif not self.window.accept(seq):
            return None
        return d


def _task_id(task: Union[int, Task, AsyncTask]) -> int:
    """The id of ``task``: a handle's, or the number itself."""
    if isinstance(task, (Task, AsyncTask)):
        return task.id
    return operator.index(task)


class _SessionView:
    """What both clients tell about their session."""

    _s: _Session
    _hosts: _Hosts
    _ttl_asked: float
    _retry_after: float
    _asked_at: Optional[float]  # last ask (HELLO, or heartbeat asking an ACK)
    ttl: Optional[float]
    tick: Optional[float]

    @property
    def server(self) -> Optional[Address]:
        """(ip, port) of the host the session is on (None until an
        AsyncSession is opened)."""
        return self._hosts.current

    @property
    def session(self) -> Tuple[int, int]:
        """(client_id, incarnation) of the current session."""
        return self._s.client_id, self._s.incarnation

    @property
    def client_id(self) -> int:
        """This client's id (given, or ``default_client_id()``)."""
        return self._s.client_id

    @property
    def dropped(self) -> int:
        """Datagrams received and dropped (malformed, bad MAC, replays, or
        from an address that is not a listed server)."""
        return self._s.dropped

    def _watching(self) -> bool:
        """Whether a silent host is left (see each client's)."""
        raise NotImplementedError

    def _interval(self) -> float:
        """Seconds between heartbeats: a third of the TTL."""
        return self._silence_limit() / 3

    def _ask(self, now: float) -> bool:
        """With several servers: whether the host has been quiet for half a
        heartbeat interval, so the heartbeat asks it for an ACK (a live host
        is then heard from several times a TTL). As the Rust client."""
        if not self._hosts.multi or not self.ttl:
            return False
        return now - self._hosts.heard >= self.ttl / 6

    def _probe_at(self) -> Optional[float]:
        """With several servers: when to probe the host again, if the last
        heartbeat that asked for an ACK is unanswered. Probes follow every
        ``retry_after`` until one is answered, so a host is left only when
        it answered none of a TTL's probes: a lost ACK or two never moves a
        client. As the Rust client."""
        asked = self._asked_at
        if not self._watching() or asked is None or self._hosts.heard >= asked:
            return None
        return asked + self._retry_after

    def _silence_due(self) -> Optional[float]:
        """With several servers: when the host counts as silent, a TTL after
        it was last heard from and not before an ask (HELLO, or heartbeat
        asking an ACK) has gone unanswered for ``retry_after``, so a client
        that was itself quiet asks before it judges. As the Rust client."""
        asked = self._asked_at
        if not self._hosts.multi or asked is None or self._hosts.heard >= asked:
            return None
        return max(self._hosts.heard + self._silence_limit(), asked + self._retry_after)

    def _judge_silence(self, now: float) -> bool:
        """Whether to leave the host now. Woken long after the host was due
        to be judged, this client was not running (stopped, starved): it
        asks again instead of judging a silence it did not watch."""
        due = self._silence_due()
        if due is None or now < due or not self._watching():
            return False
        if now - due > self._retry_after:
            self._asked_at = None
            return False
        return True

    def _silence_limit(self) -> float:
        """How long the host may be silent: the granted TTL (kept while a
        lost session is reopened), else the one asked for, else 3 s."""
        return self.ttl or self._ttl_asked or 3.0

    def _counts_as_heard(self, server: Address, incarnation: int, fields: _Fields) -> bool:
        """Whether a datagram shows the host answering: a datagram of the
        current session from the current host, but not a refusal for want of
        room or because the host is stopping (only a WELCOME keeps a client
        there)."""
        if server != self._hosts.current or incarnation != self._s.incarnation:
            return False
        return not (isinstance(fields, _Refusal) and fields.request_id == 0 and fields.code in (5, 6))

    def _take_in(self, data: bytes, addr: Tuple[Any, ...]) -> Optional[_Decoded]:
        """The datagram, if it came from the current host and passes the
        session's checks (noting that the host answered); anything else is
        counted in ``dropped`` and gives None. Called with the lock held,
        for the blocking client."""
        server = self._hosts.known(addr)
        if server is None or server != self._hosts.current:
            # Not a listed server, or a host this client left: either way
            # nothing for it.
            self._s.dropped += 1
            return None
        d = self._s.accept(data)
        if d is not None and self._counts_as_heard(server, d[3], d[5]):
            self._hosts.heard = time.monotonic()
        return d


# --- blocking client --------------------------------------------------------


class Task:
    """A task started by ``Client.submit``: ``id`` is its task id;
    ``result()`` waits for its final state, ``status()`` asks for its state
    now, ``cancel()`` cancels it. ``Client.wait``, ``status`` and ``cancel``
    take a ``Task`` or its id alike."""

    def __init__(self, client: Client, task_id: int) -> None:
        self._client = client
        self.id = task_id
        self._final: Optional[TaskResult] = None

    def result(self, timeout: Optional[float] = 30.0) -> TaskResult:
        """The task's final state, waiting up to ``timeout`` seconds (None:
        as long as it runs). Raises ``Timeout`` if it has not ended by then;
        the task runs on (``cancel()`` it if it is no longer wanted). A task
        the server does not know gives state 'unknown'."""
        if self._final is None:
            state = self._client.wait(self.id, timeout)
            if not state.final:
                return state  # unknown: it may be asked again later
            self._final = state
        return self._final

    def status(self) -> TaskResult:
        """The task's state: the final one once known, else the server's
        answer to STATUS now."""
        if self._final is not None:
            return self._final
        state = self._client.status(self.id)
        if state.final:
            self._final = state
        return state

    def cancel(self) -> str:
        """Sends CANCEL: returns 'cancelled', 'already_finished' or
        'unknown'. The final state (reason 'cancelled') follows."""
        return self._client.cancel(self.id)

    def __repr__(self) -> str:
        return f"Task(id={self.id})"


_C = TypeVar("_C", bound="Client")


class Client(_SessionView):
    """A blocking client. Opens a session on construction and heartbeats
    every ``ttl / 3`` from a background thread until ``bye()`` or ``close()``
    (``with Client(...) as c:`` says BYE at the end of the block). If the
    server loses the session (it expired, or the server restarted), the
    client opens a new one at once, with a larger incarnation; the call that
    learnt of the loss raises ``SessionLost`` and can be retried.

    ``client_id`` defaults to ``default_client_id()``, the id ``tether
    client`` uses for this user on this host.

    ``server`` is one ``(host, port)`` or a list of them (see the module's
    docstring): with several, the client opens on its first choice (or, if
    that one stays silent for a TTL, the next), and moves on when its host
    has been silent for a TTL; calls in flight then raise ``SessionLost``.
    Names are resolved again every ``resolve_every`` seconds.

    >>> with Client(("127.0.0.1", 7900)) as c:   # doctest: +SKIP
    ...     task = c.submit("sleep", u32(100))
    ...     (task.result().state, c.run("echo", b"hi").result)
    ('done', b'hi')
    """

    def __init__(self, server: Servers, client_id: Optional[int] = None, ttl: float = 3.0,
                 key: Optional[bytes] = None, retry_after: float = 0.25, tries: int = 8,
                 name: str = "python", resolve_every: float = 30.0) -> None:
        if client_id is None:
            client_id = default_client_id()
        self._s = _Session(client_id, key)
        self._ttl_asked = ttl
        self._name = name
        self._retry_after, self._tries = retry_after, tries
        self._resolve_every = resolve_every
        self._hosts = _Hosts(client_id, server)
        self._hosts.start(_lookup(self._hosts))
        self._sock = self._hosts.socket()
        self._sock.settimeout(0.05)
        self._lock = threading.Condition()
        self._replies: List[Tuple[int, int, int, _Fields]] = []
        # Final states pushed by the server, by task id.
        self.finals: Dict[int, TaskResult] = {}
        # Unclaimed events, oldest dropped first: ("session_lost",
        # incarnation), ("session_reopened", incarnation), ("task_ended",
        # TaskResult), ("server_changed", (old (ip, port), new (ip, port))).
        self.events: Deque[Tuple[str, Any]] = collections.deque(maxlen=MAX_EVENTS)
        # Round trip of the last heartbeat answered, in seconds.
        self.rtt: Optional[float] = None
        self._acks: Dict[int, float] = {}
        self._closed = threading.Event()
        # Set to wake the heartbeat thread early: on close, or when the
        # server said it lost the session.
        self._wake = threading.Event()
        self._live = False
        self._closing = False
        self._paused = False
        self._asked_at = None
        self._refusal_moves = 0  # moves on refusals since the last WELCOME
        # Moves to another host so far: a call in flight across one raises
        # SessionLost (its session was left behind on the old host).
        self._moves = 0
        self.ttl = None
        self.tick = None
        # The incarnation each kept final state was pushed under: a restarted
        # server numbers its tasks afresh, so an id can come back.
        self._final_incarnation: Dict[int, int] = {}
        self._hb: Optional[threading.Thread] = None
        self._rx = threading.Thread(target=self._receive, name="tether-rx", daemon=True)
        self._rx.start()
        try:
            self.ttl, self.tick = self._open()
        except BaseException:
            self.close()
            raise
        self._live = True
        self._wake.clear()  # set by moves while opening; nothing to wake for
        self._hb = threading.Thread(target=self._heartbeat, name="tether-hb", daemon=True)
        self._hb.start()
        if self._hosts.names:
            threading.Thread(target=self._resolve, name="tether-resolve", daemon=True).start()

    # context manager: BYE on a clean exit, plain close otherwise
    def __enter__(self: _C) -> _C:
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc_type is None:
            try:
                self.bye()
            except SessionLost:
                pass  # it had expired already: the session is over either way
        else:
            self.close()

    def pause_heartbeats(self, paused: bool = True) -> None:
        """Stop (or resume) heartbeating, to play a client that went quiet."""
        self._paused = paused

    def _send(self, kind: int, body: bytes = b"", flags: int = 0) -> Tuple[int, int]:
        """Sends one datagram to the current host; returns its (incarnation,
        seq)."""
        with self._lock:
            seq, data = self._s.datagram(kind, body, flags)
            incarnation = self._s.incarnation
            if kind == HEARTBEAT and flags & FLAG_ACK:
                self._acks = {s: t for s, t in self._acks.items() if s > seq - 64}
                self._acks[seq] = time.monotonic()
            if kind == HELLO or (kind == HEARTBEAT and flags & FLAG_ACK):
                self._asked_at = time.monotonic()
            to, multi = self._hosts.sockaddr(), self._hosts.multi
        try:
            self._sock.sendto(data, to)
        except OSError:
            if not multi:
                raise
            # With several servers an unreachable host is as good as a
            # silent one: the silence check moves on from it.
        return incarnation, seq

    def _request(self, kind: int, body: bytes, wanted: _Wanted,
                 backoff: Optional[Callable[[int], float]] = None,
                 until: Optional[float] = None) -> Tuple[int, _Fields]:
        """Sends and retries until ``wanted`` matches a reply: every
        ``retry_after``, or for a HELLO after ``backoff(try)``, and never
        past ``until`` (monotonic). A reopening client takes a new
        incarnation for each such round of tries (see ``_reopen``), as the
        Rust client does, so a session that expired while its WELCOME was
        lost never makes the next round stale."""
        sent: List[Tuple[int, int]] = []  # (incarnation, seq) of each try
        with self._lock:
            moves = self._moves
        for attempt in range(self._tries):
            if self._closed.is_set():
                raise TetherError("client is closed")
            # At least one try, however late the round begins; and the
            # last try gets its retry time to be answered (as the Rust
            # client judges a host only by an ask that long unanswered).
            if attempt and until is not None and time.monotonic() >= until:
                break
            sent.append(self._send(kind, body))
            wait = self._retry_after if backoff is None else backoff(attempt)
            deadline = time.monotonic() + wait
            if until is not None:
                deadline = min(deadline, max(until, time.monotonic() + min(wait, self._retry_after)))
            with self._lock:
                while True:
                    if self._moves != moves:
                        raise SessionLost("the client moved to another server", first_try=False)
                    for i, (k, incarnation, seq, fields) in enumerate(self._replies):
                        if k == UNKNOWN_SESSION and (incarnation, seq) in sent:
                            del self._replies[i]
                            raise SessionLost("the server no longer knows this session",
                                              first_try=(incarnation, seq) == sent[0])
                        if wanted(k, fields):
                            del self._replies[i]
                            return k, fields
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._lock.wait(left)
        raise Timeout("no reply from the server (is it running, and is the key right?)")

    def _hello_wait(self, attempt: int) -> float:
        return hello_backoff(attempt, self._retry_after, self._ttl_asked or 3.0)

    def _hello(self) -> Tuple[float, float]:
        """One round of HELLOs: (ttl, tick) granted, in seconds."""
        body = struct.pack(">I", int(self._ttl_asked * 1000)) + _short_text(self._name)
        with self._lock:
            # With several servers a round of HELLOs ends when the host has
            # been silent for a TTL: the next host is tried instead.
            until = self._hosts.heard + self._silence_limit() if self._hosts.multi else None
        _, fields = self._request(
            HELLO, body,
            lambda k, f: isinstance(f, _Welcome) or (isinstance(f, _Refusal) and f.request_id == 0),
            backoff=self._hello_wait, until=until)
        if isinstance(fields, _Refusal):
            raise Rejected(fields.code, fields.message)
        welcome = _expect(fields, _Welcome)
        return welcome.ttl_ms / 1000.0, welcome.tick_ms / 1000.0

    def _open(self) -> Tuple[float, float]:
        """The first HELLO: on the host, then, with several servers, on each
        next one in turn while the one tried stays silent for a TTL."""
        n = len(self._hosts.ranked)
        for left in reversed(range(n)):
            try:
                return self._hello()
            except (Rejected, Timeout) as failed:
                _move_on_or_raise(failed, left, n)
            with self._lock:
                self._move(self._hosts.after(self._hosts.current))
        raise TetherError("no server to open a session on")  # n == 0: _Hosts refuses that

    def _reopen(self) -> None:
        """Opens a new session, with a larger incarnation, after a loss."""
        with self._lock:
            self._s.renew()
            incarnation = self._s.incarnation
        try:
            ttl, tick = self._hello()
        except Rejected as refused:
            # Full or stopping: with several servers the next is tried at
            # once, once round the list; after that the client stays and
            # retries each heartbeat interval (as the Rust client).
            if refused.code in (5, 6) and self._hosts.multi:
                with self._lock:
                    if self._s.incarnation == incarnation and self._refusal_moves < len(self._hosts.ranked):
                        self._refusal_moves += 1
                        self._move(self._hosts.after(self._hosts.current))
            return
        except TetherError:
            return  # still lost: the next heartbeat interval tries again
        with self._lock:
            if self._s.incarnation != incarnation:
                return  # moved to another host meanwhile: that one is next
            self.ttl, self.tick = ttl, tick
            self._live = True
            self._refusal_moves = 0
            self.events.append(("session_reopened", self._s.incarnation))
            self._lock.notify_all()

    def _watching(self) -> bool:
        """Whether a silent host is left: several servers, and the client
        neither playing dead nor ending its session. Called with the lock."""
        return self._hosts.multi and not self._paused and not self._closing

    def _move(self, to: Address) -> None:
        """Leaves the current host for ``to``, with a new incarnation; the
        old host is told nothing and expires the session on its own. Called
        with the lock."""
        old = self._hosts.current
        self._hosts.move(to)
        self.events.append(("server_changed", (old, to)))
        if self._live:
            self.events.append(("session_lost", self._s.incarnation))
        self._live = False
        self._s.renew()
        self._moves += 1
        self._replies.clear()  # the old session's: a new one reuses request ids
        self._lock.notify_all()
        self._wake.set()

    def _resolve(self) -> None:
        """Resolves the names again every ``resolve_every`` seconds. A host
        still listed is kept even if no longer the first choice: moving a
        live session would cancel its tasks on the old host."""
        while not self._closed.wait(self._resolve_every):
            found = _lookup(self._hosts)
            with self._lock:
                if self._closed.is_set() or self._closing:
                    return
                if self._hosts.update(found):
                    self._move(self._hosts.ranked[0])

    def start(self, job: str, payload: bytes = b"", delay: float = 0.0, deadline: float = 0.0) -> int:
        """Starts ``job`` and returns its task id (``submit`` returns a
        handle). Raises ``Rejected``."""
        with self._lock:
            request_id = next(self._s.request_ids)
        body = _submit_body(request_id, job, payload, delay, deadline)
        _, fields = self._request(
            SUBMIT, body,
            lambda k, f: isinstance(f, (_Accepted, _Refusal)) and f.request_id == request_id)
        if isinstance(fields, _Refusal):
            raise Rejected(fields.code, fields.message)
        return _expect(fields, _Accepted).task_id

    def submit(self, job: str, payload: bytes = b"", delay: float = 0.0, deadline: float = 0.0) -> Task:
        """Starts ``job`` with ``payload`` and returns its handle at once. The
        server holds it ``delay`` seconds before queueing it, and cancels it
        (reason 'deadline') ``deadline`` seconds after submission if it has
        not ended (0: no deadline). Raises ``Rejected`` (unknown job, full
        queue, bad payload) and ``ValueError`` for a job name over 32 bytes
        or a payload over 1024."""
        return Task(self, self.start(job, payload, delay, deadline))

    def run(self, job: str, payload: bytes = b"", delay: float = 0.0, deadline: float = 0.0,
            timeout: Optional[float] = None) -> TaskResult:
        """Submits ``job`` and returns its final state, waiting up to
        ``timeout`` seconds (None: as long as it runs). If the wait is given
        up (``Timeout``, or an exception such as ``KeyboardInterrupt``
        while waiting), the task is cancelled on the server before the
        exception goes on, as cancelling ``AsyncSession.run`` does."""
        task = self.submit(job, payload, delay, deadline)
        try:
            return task.result(timeout)
        except BaseException:
            try:
                task.cancel()
            except TetherError:
                pass  # the session is gone, and its tasks with it
            raise

    def status(self, task: Union[int, Task]) -> TaskResult:
        """The task's state now (asks the server with STATUS)."""
        task_id = _task_id(task)
        _, fields = self._request(
            STATUS, struct.pack(">Q", task_id),
            lambda k, f: isinstance(f, TaskResult) and f.task_id == task_id)
        return _expect(fields, TaskResult)

    def cancel(self, task: Union[int, Task]) -> str:
        """Cancels the task: returns 'cancelled', 'already_finished' or
        'unknown'."""
        task_id = _task_id(task)
        _, fields = self._request(
            CANCEL, struct.pack(">Q", task_id),
            lambda k, f: isinstance(f, _CancelResult) and f.task_id == task_id)
        return _expect(fields, _CancelResult).outcome

    def wait(self, task: Union[int, Task], timeout: Optional[float] = 30.0) -> TaskResult:
        """The task's final state: from the server's push, or by asking
        with STATUS when none has come for a while (it may have been lost).
        Raises ``Timeout`` after ``timeout`` seconds (None: no limit); a
        task the server does not know gives state 'unknown'."""
        task_id = _task_id(task)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                ask_at = time.monotonic() + 0.5
                if deadline is not None:
                    ask_at = min(ask_at, deadline)
                while task_id not in self.finals and time.monotonic() < ask_at:
                    self._lock.wait(ask_at - time.monotonic())
                if task_id in self.finals:
                    return self.finals[task_id]
            state = self.status(task_id)
            if state.final or state.state == "unknown":
                return state
            if deadline is not None and time.monotonic() >= deadline:
                raise Timeout(f"task {task_id} did not finish in {timeout} s")

    def bye(self) -> None:
        """Ends the session (its tasks are cancelled, reason 'left').

        If the BYE_ACK is lost, the retry finds the session gone and is
        answered UNKNOWN_SESSION: the BYE took effect, and this returns
        normally. Only an UNKNOWN_SESSION to the first BYE raises
        ``SessionLost``: the session had ended before the BYE arrived."""
        self._closing = True  # no reopening once the session is being ended
        try:
            if not self._closed.is_set():
                self._request(BYE, b"", lambda k, f: k == BYE_ACK)
        except SessionLost as lost:
            if lost.first_try:
                raise
        finally:
            self.close()

    def close(self) -> None:
        """Stops heartbeating without a BYE: the session expires on its own."""
        self._closed.set()
        self._wake.set()
        with self._lock:
            self._lock.notify_all()
        for t in (self._hb, self._rx):
            if t is not None and t is not threading.current_thread():
                t.join(timeout=2)
        self._sock.close()

    def _next_wait(self, beat_at: float) -> float:
        """Seconds until the next heartbeat, or sooner, until the host has
        been silent for a TTL."""
        with self._lock:
            now = time.monotonic()
            wait = beat_at - now
            due = self._silence_due()
            if self._watching() and due is not None:
                wait = min(wait, due - now)
            if self._watching():
                probe = self._probe_at()
                if probe is not None and self._live:
                    wait = min(wait, probe - now)
        return max(wait, 0.0)

    def _heartbeat(self) -> None:
        count = 0
        beat_at = time.monotonic() + self._interval()
        while True:
            self._wake.wait(self._next_wait(beat_at))
            self._wake.clear()
            if self._closed.is_set():
                return
            with self._lock:
                if self._judge_silence(time.monotonic()):
                    self._move(self._hosts.after(self._hosts.current))
                live = self._live
            if self._closing:
                beat_at = time.monotonic() + self._interval()
                continue
            if not live:
                self._reopen()
                beat_at = time.monotonic() + self._interval()
                continue
            now = time.monotonic()
            with self._lock:
                probe = self._probe_at()
                ask = self._ask(now)
            probing = probe is not None and now >= probe
            if now < beat_at and not probing:
                continue  # woken early (a move, or the silence check)
            if now >= beat_at:
                # The regular heartbeat (asking, if a probe is due too).
                beat_at = now + self._interval()
                if not self._paused:
                    count += 1
            if self._paused:
                continue
            try:
                self._send(HEARTBEAT, flags=FLAG_ACK if count % 4 == 0 or ask or probing else 0)
            except OSError:
                pass

    def _receive(self) -> None:
        while not self._closed.is_set():
            try:
                data, addr = self._sock.recvfrom(2048)
            except (socket.timeout, OSError):
                continue
            try:
                self._file(data, addr)
            except Exception:  # noqa: BLE001 - a datagram must never kill this thread
                with self._lock:
                    self._s.dropped += 1

    def _file(self, data: bytes, addr: Tuple[Any, ...]) -> None:
        with self._lock:
            d = self._take_in(data, addr)
            if d is None:
                return
            kind, _, _, incarnation, seq, fields = d
            if isinstance(fields, _HeartbeatAck):
                sent = self._acks.pop(fields.seq, None)
                if sent is not None:
                    self.rtt = time.monotonic() - sent
                return
            if kind == UNKNOWN_SESSION and self._live:
                self._live = False
                self.events.append(("session_lost", self._s.incarnation))
                self._wake.set()
            if isinstance(fields, _Accepted) and self._final_incarnation.get(fields.task_id, incarnation) != incarnation:
                # The id was reused by a restarted server: the old state is
                # another task's.
                del self.finals[fields.task_id]
                del self._final_incarnation[fields.task_id]
            if isinstance(fields, TaskResult) and fields.final and fields.task_id not in self.finals:
                if len(self.finals) >= 65536:
                    self.finals.clear()
                    self._final_incarnation.clear()
                self.finals[fields.task_id] = fields
                self._final_incarnation[fields.task_id] = incarnation
                self.events.append(("task_ended", fields))
            self._replies.append((kind, incarnation, seq, fields))
            del self._replies[:-256]
            self._lock.notify_all()


# --- asyncio client ---------------------------------------------------------

# What an asyncio request waits for: (kind, fields, (incarnation, seq)).
_Reply = Tuple[int, _Fields, Tuple[int, int]]
# Whether a datagram (kind, fields, incarnation, seq) answers a request.
_Match = Callable[[int, _Fields, int, int], bool]


class _Protocol(asyncio.DatagramProtocol):
    """Hands each datagram received to the session."""

    def __init__(self, on_datagram: Callable[[bytes, Tuple[Any, ...]], None]) -> None:
        self.on_datagram = on_datagram

    def datagram_received(self, data: bytes, addr: Tuple[Any, ...]) -> None:
        """Passes the datagram on."""
        self.on_datagram(data, addr)


class AsyncTask:
    """A task started by ``AsyncSession.submit``: ``id`` is its task id;
    ``await task`` gives its final state (the same as ``await
    task.result()``), ``await task.status()`` its state now, and ``await
    task.cancel()`` cancels it.

    Cancelling the coroutine that awaits the task (``asyncio.wait_for``
    timing out, ``Task.cancel()``, a ``TaskGroup`` failing) sends CANCEL
    for the server-side task before the cancellation goes on.
    ``AsyncSession.wait``, ``status`` and ``cancel`` take an ``AsyncTask``
    or its id alike."""

    def __init__(self, session: AsyncSession, task_id: int) -> None:
        self._session = session
        self.id = task_id
        self._final: Optional[TaskResult] = None

    def __await__(self) -> Generator[Any, None, TaskResult]:
        return self.result().__await__()

    async def result(self) -> TaskResult:
        """The task's final state (the push, or STATUS if it was lost); a
        task the server does not know gives state 'unknown'. If this is
        cancelled, the task is cancelled on the server too."""
        if self._final is None:
            state = await self._session._wait_or_cancel(self.id)
            if not state.final:
                return state  # unknown: it may be asked again later
            self._final = state
        return self._final

    async def status(self) -> TaskResult:
        """The task's state: the final one once known, else the server's
        answer to STATUS now."""
        if self._final is not None:
            return self._final
        state = await self._session.status(self.id)
        if state.final:
            self._final = state
        return state

    async def cancel(self) -> str:
        """Sends CANCEL: returns 'cancelled', 'already_finished' or
        'unknown'. The final state (reason 'cancelled') follows."""
        return await self._session.cancel(self.id)

    def __repr__(self) -> str:
        return f"AsyncTask(id={self.id})"


_A = TypeVar("_A", bound="AsyncSession")


class AsyncSession(_SessionView):
    """An asyncio session: ``async with AsyncSession(server) as s`` opens
    it and heartbeats in a background task until the block ends (then BYE,
    which cancels whatever is still running, reason 'left'). Where a block
    does not fit, ``s = await AsyncSession.connect(server)`` opens one and
    ``await s.aclose()`` ends it. If the server loses the session (it
    expired, or the server restarted), a new one is opened at once, with a
    larger incarnation; the call that learnt of the loss raises
    ``SessionLost`` and can be retried.

    ``await s.submit(job, payload)`` returns an ``AsyncTask`` handle once
    the server accepted the task; ``await s.run(job, payload)`` returns its
    final ``TaskResult``. Cancelling the coroutine that awaits either
    (``task.cancel()``, ``asyncio.wait_for`` timing out) sends CANCEL for
    the server-side task. ``client_id`` defaults to ``default_client_id()``.

    ``server`` is one ``(host, port)`` or a list of them, as for ``Client``:
    with several, opening tries each in turn while the one tried stays
    silent for a TTL, and a host silent for a TTL is left for the next.
    ``events`` holds ("session_lost", incarnation), ("session_reopened",
    incarnation) and ("server_changed", (old, new)), oldest dropped first.
    """

    # Made on opening: before Python 3.10 an Event binds to the loop current
    # when it is made, and the session may be made outside any loop.
    _wake: asyncio.Event

    def __init__(self, server: Servers, client_id: Optional[int] = None, ttl: float = 3.0,
                 key: Optional[bytes] = None, retry_after: float = 0.25, tries: int = 8,
                 name: str = "python-asyncio", resolve_every: float = 30.0) -> None:
        if client_id is None:
            client_id = default_client_id()
        self._s = _Session(client_id, key)
        self._hosts = _Hosts(client_id, server)
        self._ttl_asked, self._name = ttl, name
        self._retry_after, self._tries = retry_after, tries
        self._resolve_every = resolve_every
        self._waiters: List[Tuple[_Match, asyncio.Future[_Reply]]] = []
        self._finals: Dict[int, asyncio.Future[TaskResult]] = {}
        self._final_incarnation: Dict[int, int] = {}
        self._transport: Optional[asyncio.DatagramTransport] = None
        self._heartbeat_task: Optional[asyncio.Task[None]] = None
        self._resolve_task: Optional[asyncio.Task[None]] = None
        # CANCELs for tasks whose start was cancelled while the SUBMIT was
        # in flight (see ``start``).
        self._background: Set[asyncio.Task[None]] = set()
        self._opened = False
        self._closed = False
        self._live = False
        self._closing = False
        self.ttl = self.tick = None
        # True plays a client that went quiet: no heartbeats.
        self.paused = False
        self._asked_at = None
        self._refusal_moves = 0  # moves on refusals since the last WELCOME
        self.events: Deque[Tuple[str, Any]] = collections.deque(maxlen=MAX_EVENTS)

    @classmethod
    async def connect(cls: Type[_A], server: Servers, client_id: Optional[int] = None,
                      ttl: float = 3.0, key: Optional[bytes] = None, retry_after: float = 0.25,
                      tries: int = 8, name: str = "python-asyncio",
                      resolve_every: float = 30.0) -> _A:
        """An opened session (the arguments are the constructor's), for code
        that cannot use ``async with``: end it with ``await s.aclose()``."""
        session = cls(server, client_id, ttl, key, retry_after, tries, name, resolve_every)
        await session._start()
        return session

    async def __aenter__(self: _A) -> _A:
        if not self._opened:
            await self._start()
        return self

    async def __aexit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                        tb: Optional[TracebackType]) -> None:
        await self.aclose()

    async def _start(self) -> None:
        """Opens the session: resolves the names, makes the socket, says
        HELLO, and starts heartbeating."""
        if self._closed:
            raise TetherError("the session is closed")
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._hosts.start(await _lookup_async(self._hosts))
        sock = self._hosts.socket()
        try:
            transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self._on_datagram), sock=sock)
        except BaseException:
            sock.close()
            raise
        self._transport = transport
        try:
            await self._open()
        except BaseException:
            transport.close()
            self._transport = None
            raise
        self._opened = True
        self._wake.clear()  # set by moves while opening; nothing to wake for
        self._heartbeat_task = loop.create_task(self._heartbeat())
        if self._hosts.names:
            self._resolve_task = loop.create_task(self._resolve())

    async def aclose(self) -> None:
        """Ends the session as leaving ``async with`` does: BYE, which
        cancels its tasks still running (reason 'left'), then closes the
        socket. The session ends however the BYE is answered (or if it is
        not). Calls still waiting then raise ``TetherError``. Does nothing
        if the session is not open."""
        if not self._opened or self._closed:
            return
        self._closing = True
        tasks = [t for t in (self._heartbeat_task, self._resolve_task, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        # Nothing of this session's own runs while it says BYE (a heartbeat
        # task reopening could otherwise renew the session under it).
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            # Leaving the block ends the session however the BYE is
            # answered: BYE_ACK, UNKNOWN_SESSION to a retry (the BYE took
            # effect but its ack was lost), or to the first try (the session
            # had already expired).
            await self._request(BYE, b"", lambda k, f: k == BYE_ACK)
        except TetherError:
            pass
        finally:
            self._closed = True
            if self._transport is not None:
                self._transport.close()
            for _, future in self._waiters:
                if not future.done():
                    future.set_exception(TetherError("the session is closed"))

    def pause_heartbeats(self, paused: bool = True) -> None:
        """Stop (or resume) heartbeating, to play a client that went quiet
        (the same as setting ``paused``)."""
        self.paused = paused

    async def _hello(self) -> None:
        """One round of HELLOs; takes the TTL and tick granted."""
        body = struct.pack(">I", int(self._ttl_asked * 1000)) + _short_text(self._name)
        # With several servers a round of HELLOs ends when the host has been
        # silent for a TTL: the next host is tried instead.
        until = self._hosts.heard + self._silence_limit() if self._hosts.multi else None
        _, fields = await self._request(
            HELLO, body,
            lambda k, f: isinstance(f, _Welcome) or (isinstance(f, _Refusal) and f.request_id == 0),
            backoff=lambda attempt: hello_backoff(attempt, self._retry_after, self._ttl_asked or 3.0),
            until=until)
        if isinstance(fields, _Refusal):
            raise Rejected(fields.code, fields.message)
        welcome = _expect(fields, _Welcome)
        self.ttl, self.tick = welcome.ttl_ms / 1000.0, welcome.tick_ms / 1000.0
        self._live = True

    async def _open(self) -> None:
        """As the blocking client's: each host in turn while the one tried
        stays silent for a TTL."""
        n = len(self._hosts.ranked)
        for left in reversed(range(n)):
            try:
                return await self._hello()
            except (Rejected, Timeout) as failed:
                _move_on_or_raise(failed, left, n)
            self._move(self._hosts.after(self._hosts.current))
        raise TetherError("no server to open a session on")  # n == 0: _Hosts refuses that

    async def _reopen(self) -> None:
        """Opens a new session, with a larger incarnation, after a loss."""
        self._s.renew()
        incarnation = self._s.incarnation
        try:
            await self._hello()
        except Rejected as refused:
            # As the blocking client's: full or stopping, the next host at
            # once, once round the list.
            if (refused.code in (5, 6) and self._hosts.multi and self._s.incarnation == incarnation
                    and self._refusal_moves < len(self._hosts.ranked)):
                self._refusal_moves += 1
                self._move(self._hosts.after(self._hosts.current))
            return
        except TetherError:
            return  # still lost: the next heartbeat interval tries again
        self._refusal_moves = 0
        self.events.append(("session_reopened", self._s.incarnation))

    def _watching(self) -> bool:
        """As the blocking client's."""
        return self._hosts.multi and not self.paused and not self._closing

    def _move(self, to: Address) -> None:
        """As the blocking client's: calls in flight raise SessionLost."""
        old = self._hosts.current
        self._hosts.move(to)
        self.events.append(("server_changed", (old, to)))
        if self._live:
            self.events.append(("session_lost", self._s.incarnation))
        self._live = False
        self._s.renew()
        for _, future in self._waiters:
            if not future.done():
                future.set_exception(SessionLost("the client moved to another server", first_try=False))
        self._wake.set()

    async def _resolve(self) -> None:
        """As the blocking client's."""
        while True:
            await asyncio.sleep(self._resolve_every)
            found = await _lookup_async(self._hosts)
            if self._closing:
                return
            if self._hosts.update(found):
                self._move(self._hosts.ranked[0])

    def _send(self, kind: int, body: bytes = b"", flags: int = 0) -> int:
        """Sends one datagram to the current host; returns its seq."""
        if self._transport is None:
            raise TetherError("the session is not open")
        seq, data = self._s.datagram(kind, body, flags)
        if kind == HELLO or (kind == HEARTBEAT and flags & FLAG_ACK):
            self._asked_at = time.monotonic()
        self._transport.sendto(data, self._hosts.sockaddr())
        return seq

    async def _request(self, kind: int, body: bytes, wanted: _Wanted,
                       backoff: Optional[Callable[[int], float]] = None,
                       until: Optional[float] = None) -> Tuple[int, _Fields]:
        """As the blocking client's: HELLO retries back off."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_Reply] = loop.create_future()
        sent: List[Tuple[int, int]] = []  # (incarnation, seq) of each try

        def match(k: int, f: _Fields, incarnation: int, seq: int) -> bool:
            if k == UNKNOWN_SESSION:
                return (incarnation, seq) in sent
            return wanted(k, f)

        entry = (match, future)
        self._waiters.append(entry)
        try:
            for attempt in range(self._tries):
                if self._closed:
                    raise TetherError("the session is closed")
                # As the blocking client's: at least one try, and the last
                # one its retry time to be answered.
                if attempt and until is not None and time.monotonic() >= until:
                    break
                sent.append((self._s.incarnation, self._send(kind, body)))
                wait = self._retry_after if backoff is None else backoff(attempt)
                if until is not None:
                    wait = min(wait, max(until - time.monotonic(), min(wait, self._retry_after)))
                done, _ = await asyncio.wait({future}, timeout=max(wait, 0.0))
                if done:
                    k, fields, answered = future.result()
                    if k == UNKNOWN_SESSION:
                        raise SessionLost("the server no longer knows this session",
                                          first_try=answered == sent[0])
                    return k, fields
            raise Timeout("no reply from the server (is it running, and is the key right?)")
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _on_datagram(self, data: bytes, addr: Tuple[Any, ...]) -> None:
        try:
            self._file(data, addr)
        except Exception:  # noqa: BLE001 - a datagram must never break the session
            self._s.dropped += 1

    def _file(self, data: bytes, addr: Tuple[Any, ...]) -> None:
        d = self._take_in(data, addr)
        if d is None:
            return
        kind, _, _, incarnation, seq, fields = d
        if kind == UNKNOWN_SESSION and self._live:
            # The heartbeat task reopens it (not while the block is ending).
            self._live = False
            self.events.append(("session_lost", self._s.incarnation))
            self._wake.set()
        if isinstance(fields, _Accepted) and self._final_incarnation.get(fields.task_id, incarnation) != incarnation:
            # The id was reused by a restarted server: the old state is
            # another task's.
            del self._finals[fields.task_id]
            del self._final_incarnation[fields.task_id]
        if isinstance(fields, TaskResult) and fields.final:
            final = self._final_future(fields.task_id)
            if not final.done():
                final.set_result(fields)
                self._final_incarnation[fields.task_id] = incarnation
        for match, future in list(self._waiters):
            if not future.done() and match(kind, fields, incarnation, seq):
                future.set_result((kind, fields, (incarnation, seq)))
                break

    def _next_wait(self, beat_at: float) -> float:
        """As the blocking client's."""
        now = time.monotonic()
        wait = beat_at - now
        due = self._silence_due()
        if self._watching() and due is not None:
            wait = min(wait, due - now)
        if self._watching():
            probe = self._probe_at()
            if probe is not None and self._live:
                wait = min(wait, probe - now)
        return max(wait, 0.0)

    async def _heartbeat(self) -> None:
        """Heartbeats every ttl/3; reopens a lost session; leaves a host
        silent for a TTL (with several servers)."""
        beat_at = time.monotonic() + self._interval()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self._next_wait(beat_at))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            if self._judge_silence(time.monotonic()):
                self._move(self._hosts.after(self._hosts.current))
            if not self._live:
                await self._reopen()
                beat_at = time.monotonic() + self._interval()
                continue
            now = time.monotonic()
            probe = self._probe_at()
            probing = probe is not None and now >= probe
            if now < beat_at and not probing:
                continue  # woken early (a move, or the silence check)
            if now >= beat_at:
                # The regular heartbeat (asking, if a probe is due too).
                beat_at = now + self._interval()
            if self.paused:
                continue
            self._send(HEARTBEAT, flags=FLAG_ACK if self._ask(now) or probing else 0)

    async def start(self, job: str, payload: bytes = b"", delay: float = 0.0, deadline: float = 0.0) -> int:
        """Starts ``job`` and returns its task id without waiting for it
        (``submit`` returns a handle). If this is cancelled before the
        server answered, the task the SUBMIT may still start is cancelled
        as soon as its id arrives. Raises ``Rejected``."""
        request_id = next(self._s.request_ids)
        body = _submit_body(request_id, job, payload, delay, deadline)
        # Shielded: a cancelled caller must still learn the task's id, to
        # cancel it (the SUBMIT may be on its way, or accepted already).
        starting = asyncio.ensure_future(self._submit(request_id, body))
        try:
            return await asyncio.shield(starting)
        except asyncio.CancelledError:
            starting.add_done_callback(self._cancel_started)
            raise

    async def _submit(self, request_id: int, body: bytes) -> int:
        """Sends the SUBMIT: the task's id, or ``Rejected``."""
        _, fields = await self._request(
            SUBMIT, body,
            lambda k, f: isinstance(f, (_Accepted, _Refusal)) and f.request_id == request_id)
        if isinstance(fields, _Refusal):
            raise Rejected(fields.code, fields.message)
        return _expect(fields, _Accepted).task_id

    def _cancel_started(self, starting: asyncio.Future[int]) -> None:
        """Cancels the task a cancelled ``start`` started, if it did."""
        if starting.cancelled() or starting.exception() is not None or self._closing:
            return  # nothing started, or the BYE coming cancels it
        task_id = starting.result()

        async def cancel_quietly() -> None:
            try:
                await self.cancel(task_id)
            except TetherError:
                pass  # the session is gone, and its tasks with it

        job = asyncio.ensure_future(cancel_quietly())
        self._background.add(job)
        job.add_done_callback(self._background.discard)

    async def submit(self, job: str, payload: bytes = b"", delay: float = 0.0,
                     deadline: float = 0.0) -> AsyncTask:
        """Starts ``job`` with ``payload`` and returns its handle once the
        server accepted it: ``await`` the handle for the final state. The
        server holds the task ``delay`` seconds before queueing it, and
        cancels it (reason 'deadline') ``deadline`` seconds after submission
        if it has not ended (0: no deadline). Raises ``Rejected`` (unknown
        job, full queue, bad payload) and ``ValueError`` for a job name over
        32 bytes or a payload over 1024."""
        return AsyncTask(self, await self.start(job, payload, delay, deadline))

    async def run(self, job: str, payload: bytes = b"", delay: float = 0.0,
                  deadline: float = 0.0) -> TaskResult:
        """Submits ``job`` and returns its final state. If this is cancelled
        (e.g. by ``asyncio.wait_for``), the task is cancelled on the server
        too. Raises as ``submit``."""
        return await (await self.submit(job, payload, delay, deadline))

    async def status(self, task: Union[int, AsyncTask]) -> TaskResult:
        """The task's state now (asks the server with STATUS)."""
        task_id = _task_id(task)
        _, fields = await self._request(
            STATUS, struct.pack(">Q", task_id),
            lambda k, f: isinstance(f, TaskResult) and f.task_id == task_id)
        return _expect(fields, TaskResult)

    async def cancel(self, task: Union[int, AsyncTask]) -> str:
        """Cancels the task: returns 'cancelled', 'already_finished' or
        'unknown'."""
        task_id = _task_id(task)
        _, fields = await self._request(
            CANCEL, struct.pack(">Q", task_id),
            lambda k, f: isinstance(f, _CancelResult) and f.task_id == task_id)
        return _expect(fields, _CancelResult).outcome

    async def wait(self, task: Union[int, AsyncTask]) -> TaskResult:
        """The task's final state, from the push or, if it was lost, STATUS.
        Once returned, the session forgets it (ask ``status`` again if
        needed). Cancelling this does not cancel the task (awaiting an
        ``AsyncTask`` does)."""
        task_id = _task_id(task)
        future = self._final_future(task_id)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=1.0)
                if done:
                    return future.result()
                state = await self.status(task_id)
                if state.final or state.state == "unknown":
                    return state
        finally:
            self._finals.pop(task_id, None)
            self._final_incarnation.pop(task_id, None)

    async def _wait_or_cancel(self, task_id: int) -> TaskResult:
        """``wait``, but if cancelled, the task is cancelled on the server
        too (the CANCEL is answered before the cancellation goes on)."""
        try:
            return await self.wait(task_id)
        except asyncio.CancelledError:
            try:
                await asyncio.shield(self.cancel(task_id))
            except TetherError:
                pass
            raise

    def _final_future(self, task_id: int) -> asyncio.Future[TaskResult]:
        """The future of ``task_id``'s final state, made if need be. Final
        states nobody waits for are kept for late waiters, the oldest
        dropped first past ``MAX_EVENTS``."""
        future = self._finals.get(task_id)
        if future is None:
            while len(self._finals) >= MAX_EVENTS:
                oldest = next(iter(self._finals))
                del self._finals[oldest]
                self._final_incarnation.pop(oldest, None)
            future = asyncio.get_running_loop().create_future()
            self._finals[task_id] = future
        return future
