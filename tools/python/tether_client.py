"""A tether client in pure Python (standard library only, Python 3.9+).

Two interfaces over one wire codec:

* ``Client``: blocking. A background thread receives replies and sends
  heartbeats; ``submit`` returns a task id, ``wait`` its final state.
* ``AsyncSession``: asyncio. ``async with AsyncSession(...) as s`` opens a
  session that heartbeats in a background task; ``await s.submit(job,
  payload)`` returns the task's final state, and cancelling the awaiting
  coroutine sends CANCEL to the server.

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

import asyncio
import collections
import dataclasses
import functools
import hashlib
import hmac
import ipaddress
import itertools
import os
import random
import socket
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

__all__ = [
    "AsyncSession",
    "Client",
    "Rejected",
    "SessionLost",
    "TaskResult",
    "TetherError",
    "TimeoutError_",
    "rank",
    "weight",
]

MAX_EVENTS = 1024  # unclaimed events kept by the blocking client, newest last

MAGIC = b"TH"
VERSION = 1
HEADER = struct.Struct(">2sBBBBHQQI")  # 28 bytes
MAC_LEN = 16
MAX_DATAGRAM = 1200
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

    def __init__(self, code: int, message: str):
        super().__init__(f"rejected ({code}, {REJECT_CODES.get(code, '?')}): {message}")
        self.code = code
        self.message = message


class SessionLost(TetherError):
    """The server no longer knows the session (it expired, or the server
    restarted). The client opens a new session on its own; retry the call.
    ``first_try`` says whether the very first datagram of the call was
    answered so (the session was already gone when the call began)."""

    def __init__(self, message: str, first_try: bool = True):
        super().__init__(message)
        self.first_try = first_try


class TimeoutError_(TetherError):
    """No reply after every try (is the server running? is the key right?)."""


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
        return self.state in ("done", "failed", "cancelled")


# --- wire codec -----------------------------------------------------------


def _text(s: str) -> bytes:
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


def decode(data: bytes, key: Optional[bytes] = None):
    """Returns (kind, flags, client_id, incarnation, seq, fields) for a valid
    server datagram, or None for anything that breaks a rule."""
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


def _parse_body(kind: int, body: bytes):
    def exact(n):
        if len(body) != n:
            raise ValueError("body length")

    if kind == WELCOME:
        exact(8)
        return struct.unpack(">II", body)  # ttl_ms, tick_ms
    if kind == HEARTBEAT_ACK:
        exact(4)
        return struct.unpack(">I", body)
    if kind == ACCEPTED:
        exact(12)
        return struct.unpack(">IQ", body)  # request_id, task_id
    if kind == REJECTED:
        request_id, code, n = struct.unpack_from(">IHB", body)
        exact(7 + n)
        return request_id, code, body[7:].decode("utf-8")
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
        return task_id, OUTCOMES[outcome]
    if kind in (UNKNOWN_SESSION, BYE_ACK):
        exact(0)
        return ()
    return None


class ReplayWindow:
    """Highest seq seen and a 64-entry bitmap below it (RFC 4303)."""

    def __init__(self, first: int):
        self.top, self.seen = first, 1

    def accept(self, seq: int) -> bool:
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
    ceiling = min(max(cap, base), base * 2 ** min(attempt, 20))
    return max(base / 4, rand() * ceiling)


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


def _check_client_id(client_id: int):
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


class _Hosts:
    """The servers one client may talk to: the (host, port) pairs it was
    given, what they resolve to, its ranking of those, the one it talks to
    (``current``) and when that one last answered (``heard``, monotonic).
    Not thread-safe: the blocking client holds its lock around every use."""

    def __init__(self, client_id: int, server: Servers):
        if isinstance(server, tuple) and server and isinstance(server[0], str):
            server = [server]
        self.entries: List[Tuple[str, int]] = [(host, int(port)) for host, port in server]
        if not self.entries:
            raise ValueError("no server given")
        self.client_id = client_id
        # (index, host, port) of each entry that is a name, not an IP.
        self.names = [(i, host, port) for i, (host, port) in enumerate(self.entries) if _ip(host) is None]
        # Each entry's addresses: an IP's at once, a name's once resolved.
        self._found: List[List[Address]] = [
            [(_ip(host), port)] if _ip(host) else [] for host, port in self.entries]
        self.family = socket.AF_INET
        self.dual = False  # an IPv6 socket that reaches IPv4 addresses too
        self.ranked: List[Address] = []
        self._listed = frozenset()
        self.current: Optional[Address] = None
        self.heard = time.monotonic()

    @property
    def multi(self) -> bool:
        """Several servers: failover is on."""
        return len(self.ranked) > 1

    def _take(self, found: dict) -> List[Address]:
        """All addresses, after the lookups in ``found`` ({index:
        getaddrinfo's list, or the exception it raised}). A failed lookup
        keeps the entry's last addresses: a DNS outage must not empty the
        list."""
        for i, infos in found.items():
            if isinstance(infos, BaseException):
                continue
            addrs = []
            for family, _, _, _, sockaddr in infos:
                ip = _ip(sockaddr[0]) if family in (socket.AF_INET, socket.AF_INET6) else None
                if ip is not None and (ip, sockaddr[1]) not in addrs:
                    addrs.append((ip, sockaddr[1]))
            if addrs:
                self._found[i] = addrs
        return [addr for addrs in self._found for addr in addrs]

    def start(self, found: dict):
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

    def update(self, found: dict) -> bool:
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

    def _rank(self, addrs: List[Address]):
        self.ranked = rank(self.client_id, addrs)
        self._listed = frozenset(self.ranked)

    def after(self, server: Address) -> Address:
        """The host after ``server`` in this client's ranking, wrapping."""
        try:
            return self.ranked[(self.ranked.index(server) + 1) % len(self.ranked)]
        except ValueError:
            return self.ranked[0]

    def move(self, server: Address):
        self.current = server
        self.heard = time.monotonic()  # a new host gets a whole TTL to answer

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

    def sockaddr(self) -> tuple:
        """Where to send to reach the current host from this socket."""
        ip, port = self.current
        if self.family == socket.AF_INET6 and ":" not in ip:
            return "::ffff:" + ip, port
        return ip, port

    def known(self, addr: tuple) -> Optional[Address]:
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


def _lookup(hosts: _Hosts) -> dict:
    """Resolves ``hosts``' names now: {index: getaddrinfo's list, or the
    exception it raised}."""
    found = {}
    for i, host, port in hosts.names:
        try:
            found[i] = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        except (OSError, UnicodeError) as e:
            found[i] = e
    return found


async def _lookup_async(hosts: _Hosts) -> dict:
    """As ``_lookup``, on the loop's executor."""
    loop = asyncio.get_running_loop()
    got = await asyncio.gather(
        *(loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM) for _, host, port in hosts.names),
        return_exceptions=True)
    return {i: infos for (i, _, _), infos in zip(hosts.names, got)}


def _submit_body(request_id: int, job: str, payload: bytes, delay: float, deadline: float) -> bytes:
    job_bytes = job.encode("utf-8")
    if len(job_bytes) > 32 or len(payload) > 1024:
        raise ValueError("job names hold at most 32 bytes, payloads 1024")
    return struct.pack(">III", request_id, int(delay * 1000), int(deadline * 1000)) + _text(job) + payload


class _Session:
    """State shared by both clients: identity, numbering, replay window."""

    def __init__(self, client_id: int, key: Optional[bytes]):
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
        self.seq += 1
        return self.seq, encode(kind, self.client_id, self.incarnation, self.seq, body, self.key, flags)

    def renew(self):
        self.incarnation = _new_incarnation(self.incarnation)
        self.seq = 0
        self.window = None
        self.request_ids = itertools.count(1)

    def accept(self, data: bytes):
        """The decoded datagram if it is for this client and not a replay;
        anything else is counted in ``dropped`` and gives None."""
        d = self._accept(data)
        if d is None:
            self.dropped += 1
        return d

    def _accept(self, data: bytes):
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
            return d if kind == TASK_STATE and fields.final else None
        if self.window is None:
            self.window = ReplayWindow(seq)
        elif not self.window.accept(seq):
            return None
        return d


class _SessionView:
    """What both clients tell about their session."""

    _s: _Session
    _hosts: _Hosts

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
    def dropped(self) -> int:
        """Datagrams received and dropped (malformed, bad MAC, replays, or
        from an address that is not a listed server)."""
        return self._s.dropped

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

    def _counts_as_heard(self, server: Address, kind: int, incarnation: int, fields) -> bool:
        """Whether a datagram shows the host answering: a datagram of the
        current session from the current host, but not a refusal for want of
        room or because the host is stopping (only a WELCOME keeps a client
        there)."""
        if server != self._hosts.current or incarnation != self._s.incarnation:
            return False
        return not (kind == REJECTED and fields[0] == 0 and fields[1] in (5, 6))


# --- blocking client --------------------------------------------------------


class Client(_SessionView):
    """A blocking client. Opens a session on construction and heartbeats
    every ``ttl / 3`` from a background thread until ``bye()`` or ``close()``.
    If the server loses the session (it expired, or the server restarted),
    the client opens a new one at once, with a larger incarnation; the call
    that learnt of the loss raises ``SessionLost`` and can be retried.

    ``server`` is one ``(host, port)`` or a list of them (see the module's
    docstring): with several, the client opens on its first choice (or, if
    that one stays silent for a TTL, the next), and moves on when its host
    has been silent for a TTL; calls in flight then raise ``SessionLost``.
    Names are resolved again every ``resolve_every`` seconds.

    >>> with Client(("127.0.0.1", 7900), client_id=42) as c:   # doctest: +SKIP
    ...     task = c.submit("echo", b"hi")
    ...     c.wait(task).result
    b'hi'
    """

    def __init__(self, server: Servers, client_id: int, ttl: float = 3.0,
                 key: Optional[bytes] = None, retry_after: float = 0.25, tries: int = 8,
                 name: str = "python", resolve_every: float = 30.0):
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
        self._replies: List[tuple] = []
        self.finals: Dict[int, TaskResult] = {}
        # Unclaimed events, oldest dropped first: ("session_lost",
        # incarnation), ("session_reopened", incarnation), ("task_ended",
        # TaskResult), ("server_changed", (old (ip, port), new (ip, port))).
        self.events: collections.deque = collections.deque(maxlen=MAX_EVENTS)
        self.rtt: Optional[float] = None
        self._acks: Dict[int, float] = {}
        self._closed = threading.Event()
        # Set to wake the heartbeat thread early: on close, or when the
        # server said it lost the session.
        self._wake = threading.Event()
        self._live = False
        self._closing = False
        self._paused = False
        self._asked_at: Optional[float] = None  # last ask (HELLO, or heartbeat asking an ACK)
        self._refusal_moves = 0  # moves on refusals since the last WELCOME
        # Moves to another host so far: a call in flight across one raises
        # SessionLost (its session was left behind on the old host).
        self._moves = 0
        self.ttl: Optional[float] = None
        self.tick: Optional[float] = None
        # The incarnation each kept final state was pushed under: a restarted
        # server numbers its tasks afresh, so an id can come back.
        self._final_incarnation: Dict[int, int] = {}
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
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.bye()
            except SessionLost:
                pass  # it had expired already: the session is over either way
        else:
            self.close()

    def pause_heartbeats(self, paused: bool = True):
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

    def _request(self, kind: int, body: bytes, wanted: Callable[[int, tuple], bool],
                 backoff: Optional[Callable[[int], float]] = None, until: Optional[float] = None):
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
        raise TimeoutError_("no reply from the server (is it running, and is the key right?)")

    def _hello_wait(self, attempt: int) -> float:
        return hello_backoff(attempt, self._retry_after, self._ttl_asked or 3.0)

    def _hello(self):
        body = struct.pack(">I", int(self._ttl_asked * 1000)) + _text(self._name)
        with self._lock:
            # With several servers a round of HELLOs ends when the host has
            # been silent for a TTL: the next host is tried instead.
            until = self._hosts.heard + self._silence_limit() if self._hosts.multi else None
        kind, fields = self._request(HELLO, body, lambda k, f: k == WELCOME or (k == REJECTED and f[0] == 0),
                                     backoff=self._hello_wait, until=until)
        if kind == REJECTED:
            raise Rejected(fields[1], fields[2])
        return fields[0] / 1000.0, fields[1] / 1000.0

    def _open(self):
        """The first HELLO: on the host, then, with several servers, on each
        next one in turn while the one tried stays silent for a TTL."""
        n = len(self._hosts.ranked)
        for left in reversed(range(n)):
            try:
                return self._hello()
            except Rejected as refused:
                # Full or stopping: another host may take the client.
                if refused.code not in (5, 6) or not left:
                    raise
            except TimeoutError_:
                if not left:
                    if n == 1:
                        raise
                    raise TimeoutError_(f"no reply from any of the {n} servers "
                                        "(are they running, and is the key right?)") from None
            with self._lock:
                self._move(self._hosts.after(self._hosts.current))

    def _reopen(self):
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

    def _move(self, to: Address):
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

    def _resolve(self):
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

    def submit(self, job: str, payload: bytes = b"", delay: float = 0.0, deadline: float = 0.0) -> int:
        """Starts ``job``; returns its task id. Raises ``Rejected``."""
        with self._lock:
            request_id = next(self._s.request_ids)
        body = _submit_body(request_id, job, payload, delay, deadline)
        kind, fields = self._request(
            SUBMIT, body, lambda k, f: k in (ACCEPTED, REJECTED) and f[0] == request_id)
        if kind == REJECTED:
            raise Rejected(fields[1], fields[2])
        return fields[1]

    def status(self, task_id: int) -> TaskResult:
        _, result = self._request(STATUS, struct.pack(">Q", task_id),
                                  lambda k, f: k == TASK_STATE and f.task_id == task_id)
        return result

    def cancel(self, task_id: int) -> str:
        """Returns 'cancelled', 'already_finished' or 'unknown'."""
        _, (_, outcome) = self._request(CANCEL, struct.pack(">Q", task_id),
                                        lambda k, f: k == CANCEL_RESULT and f[0] == task_id)
        return outcome

    def wait(self, task_id: int, timeout: float = 30.0) -> TaskResult:
        """The task's final state: from the server's push, or by asking
        with STATUS when none has come for a while (it may have been lost)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                ask_at = min(time.monotonic() + 0.5, deadline)
                while task_id not in self.finals and time.monotonic() < ask_at:
                    self._lock.wait(ask_at - time.monotonic())
                if task_id in self.finals:
                    return self.finals[task_id]
            state = self.status(task_id)
            if state.final or state.state == "unknown":
                return state
            if time.monotonic() >= deadline:
                raise TimeoutError_(f"task {task_id} did not finish in {timeout} s")

    def bye(self):
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

    def close(self):
        """Stops heartbeating without a BYE: the session expires on its own."""
        self._closed.set()
        self._wake.set()
        with self._lock:
            self._lock.notify_all()
        for t in (getattr(self, "_hb", None), self._rx):
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

    def _heartbeat(self):
        count = 0
        beat_at = time.monotonic() + self.ttl / 3
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
                beat_at = time.monotonic() + self.ttl / 3
                continue
            if not live:
                self._reopen()
                beat_at = time.monotonic() + self.ttl / 3
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
                beat_at = now + self.ttl / 3
                if not self._paused:
                    count += 1
            if self._paused:
                continue
            try:
                self._send(HEARTBEAT, flags=FLAG_ACK if count % 4 == 0 or ask or probing else 0)
            except OSError:
                pass

    def _receive(self):
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

    def _file(self, data: bytes, addr: tuple):
        with self._lock:
            server = self._hosts.known(addr)
            if server is None:
                self._s.dropped += 1  # not from a listed server
                return
            if server != self._hosts.current:
                self._s.dropped += 1  # a host this client left: nothing more to say
                return
            d = self._s.accept(data)
            if d is None:
                return
            kind, _, _, incarnation, seq, fields = d
            if self._counts_as_heard(server, kind, incarnation, fields):
                self._hosts.heard = time.monotonic()
            if kind == HEARTBEAT_ACK:
                sent = self._acks.pop(fields[0], None)
                if sent is not None:
                    self.rtt = time.monotonic() - sent
                return
            if kind == UNKNOWN_SESSION and self._live:
                self._live = False
                self.events.append(("session_lost", self._s.incarnation))
                self._wake.set()
            if kind == ACCEPTED and self._final_incarnation.get(fields[1], incarnation) != incarnation:
                # The id was reused by a restarted server: the old state is
                # another task's.
                del self.finals[fields[1]]
                del self._final_incarnation[fields[1]]
            if kind == TASK_STATE and fields.final and fields.task_id not in self.finals:
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


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_datagram):
        self.on_datagram = on_datagram

    def datagram_received(self, data, addr):
        self.on_datagram(data, addr)


class AsyncSession(_SessionView):
    """An asyncio session: ``async with AsyncSession(server, client_id) as s``
    opens it and heartbeats in a background task until the block ends (then
    BYE, which cancels whatever is still running, reason 'left'). If the
    server loses the session (it expired, or the server restarted), a new
    one is opened at once, with a larger incarnation; the call that learnt
    of the loss raises ``SessionLost`` and can be retried.

    ``await s.submit(job, payload)`` returns the task's final TaskResult
    (``await s.start(...)`` only starts it and returns its id).
    Cancelling the coroutine that awaits it (``task.cancel()``,
    ``asyncio.wait_for`` timing out) sends CANCEL for the server-side task.

    ``server`` is one ``(host, port)`` or a list of them, as for ``Client``:
    with several, opening tries each in turn while the one tried stays
    silent for a TTL, and a host silent for a TTL is left for the next.
    ``events`` holds ("session_lost", incarnation), ("session_reopened",
    incarnation) and ("server_changed", (old, new)), oldest dropped first.
    """

    def __init__(self, server: Servers, client_id: int, ttl: float = 3.0,
                 key: Optional[bytes] = None, retry_after: float = 0.25, tries: int = 8,
                 name: str = "python-asyncio", resolve_every: float = 30.0):
        self._s = _Session(client_id, key)
        self._hosts = _Hosts(client_id, server)
        self._ttl_asked, self._name = ttl, name
        self._retry_after, self._tries = retry_after, tries
        self._resolve_every = resolve_every
        self._waiters: List[Tuple[Callable[..., bool], asyncio.Future]] = []
        self._finals: Dict[int, asyncio.Future] = {}
        self._final_incarnation: Dict[int, int] = {}
        self._transport = None
        self._heartbeat_task: Optional[asyncio.Future] = None
        self._resolve_task: Optional[asyncio.Future] = None
        # Made on entry: before Python 3.10 an Event binds to the loop
        # current when it is made.
        self._wake: Optional[asyncio.Event] = None
        self._live = False
        self._closing = False
        self.ttl = self.tick = None
        self.paused = False
        self._asked_at: Optional[float] = None  # last ask (HELLO, or heartbeat asking an ACK)
        self._refusal_moves = 0  # moves on refusals since the last WELCOME
        self.events: collections.deque = collections.deque(maxlen=MAX_EVENTS)

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._hosts.start(await _lookup_async(self._hosts))
        sock = self._hosts.socket()
        try:
            self._transport, _ = await loop.create_datagram_endpoint(
                lambda: _Protocol(self._on_datagram), sock=sock)
        except BaseException:
            sock.close()
            raise
        try:
            await self._open()
        except BaseException:
            self._transport.close()
            raise
        self._wake.clear()  # set by moves while opening; nothing to wake for
        self._heartbeat_task = asyncio.ensure_future(self._heartbeat())
        if self._hosts.names:
            self._resolve_task = asyncio.ensure_future(self._resolve())
        return self

    async def __aexit__(self, exc_type, exc, tb):
        self._closing = True
        for task in (self._heartbeat_task, self._resolve_task):
            if task is not None:
                task.cancel()
        try:
            # Leaving the block ends the session however the BYE is
            # answered: BYE_ACK, UNKNOWN_SESSION to a retry (the BYE took
            # effect but its ack was lost), or to the first try (the session
            # had already expired).
            await self._request(BYE, b"", lambda k, f: k == BYE_ACK)
        except TetherError:
            pass
        finally:
            self._transport.close()

    async def _hello(self):
        body = struct.pack(">I", int(self._ttl_asked * 1000)) + _text(self._name)
        # With several servers a round of HELLOs ends when the host has been
        # silent for a TTL: the next host is tried instead.
        until = self._hosts.heard + self._silence_limit() if self._hosts.multi else None
        kind, fields = await self._request(
            HELLO, body, lambda k, f: k == WELCOME or (k == REJECTED and f[0] == 0),
            backoff=lambda attempt: hello_backoff(attempt, self._retry_after, self._ttl_asked or 3.0),
            until=until)
        if kind == REJECTED:
            raise Rejected(fields[1], fields[2])
        self.ttl, self.tick = fields[0] / 1000.0, fields[1] / 1000.0
        self._live = True

    async def _open(self):
        """As the blocking client's: each host in turn while the one tried
        stays silent for a TTL."""
        n = len(self._hosts.ranked)
        for left in reversed(range(n)):
            try:
                return await self._hello()
            except Rejected as refused:
                # Full or stopping: another host may take the client.
                if refused.code not in (5, 6) or not left:
                    raise
            except TimeoutError_:
                if not left:
                    if n == 1:
                        raise
                    raise TimeoutError_(f"no reply from any of the {n} servers "
                                        "(are they running, and is the key right?)") from None
            self._move(self._hosts.after(self._hosts.current))

    async def _reopen(self):
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

    def _move(self, to: Address):
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

    async def _resolve(self):
        """As the blocking client's."""
        while True:
            await asyncio.sleep(self._resolve_every)
            found = await _lookup_async(self._hosts)
            if self._closing:
                return
            if self._hosts.update(found):
                self._move(self._hosts.ranked[0])

    def _send(self, kind: int, body: bytes = b"", flags: int = 0) -> int:
        seq, data = self._s.datagram(kind, body, flags)
        if kind == HELLO or (kind == HEARTBEAT and flags & FLAG_ACK):
            self._asked_at = time.monotonic()
        self._transport.sendto(data, self._hosts.sockaddr())
        return seq

    async def _request(self, kind: int, body: bytes, wanted: Callable[[int, tuple], bool],
                       backoff: Optional[Callable[[int], float]] = None, until: Optional[float] = None):
        """As the blocking client's: HELLO retries back off."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        sent: List[Tuple[int, int]] = []  # (incarnation, seq) of each try

        def match(k, f, incarnation, seq):
            if k == UNKNOWN_SESSION:
                return (incarnation, seq) in sent
            return wanted(k, f)

        entry = (match, future)
        self._waiters.append(entry)
        try:
            for attempt in range(self._tries):
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
            raise TimeoutError_("no reply from the server (is it running, and is the key right?)")
        finally:
            if entry in self._waiters:
                self._waiters.remove(entry)

    def _on_datagram(self, data: bytes, addr: tuple):
        try:
            self._file(data, addr)
        except Exception:  # noqa: BLE001 - a datagram must never break the session
            self._s.dropped += 1

    def _file(self, data: bytes, addr: tuple):
        server = self._hosts.known(addr)
        if server is None:
            self._s.dropped += 1  # not from a listed server
            return
        if server != self._hosts.current:
            self._s.dropped += 1  # a host this client left: nothing more to say
            return
        d = self._s.accept(data)
        if d is None:
            return
        kind, _, _, incarnation, seq, fields = d
        if self._counts_as_heard(server, kind, incarnation, fields):
            self._hosts.heard = time.monotonic()
        if kind == UNKNOWN_SESSION and self._live:
            # The heartbeat task reopens it (not while the block is ending).
            self._live = False
            self.events.append(("session_lost", self._s.incarnation))
            self._wake.set()
        if kind == ACCEPTED and self._final_incarnation.get(fields[1], incarnation) != incarnation:
            # The id was reused by a restarted server: the old state is
            # another task's.
            del self._finals[fields[1]]
            del self._final_incarnation[fields[1]]
        if kind == TASK_STATE and fields.final:
            future = self._final_future(fields.task_id)
            if not future.done():
                future.set_result(fields)
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

    async def _heartbeat(self):
        """Heartbeats every ttl/3; reopens a lost session; leaves a host
        silent for a TTL (with several servers)."""
        beat_at = time.monotonic() + self.ttl / 3
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
                beat_at = time.monotonic() + self.ttl / 3
                continue
            now = time.monotonic()
            probe = self._probe_at()
            probing = probe is not None and now >= probe
            if now < beat_at and not probing:
                continue  # woken early (a move, or the silence check)
            if now >= beat_at:
                # The regular heartbeat (asking, if a probe is due too).
                beat_at = now + self.ttl / 3
            if self.paused:
                continue
            self._send(HEARTBEAT, flags=FLAG_ACK if self._ask(now) or probing else 0)

    async def start(self, job: str, payload: bytes = b"", delay: float = 0.0, deadline: float = 0.0) -> int:
        """Starts ``job`` and returns its task id without waiting for it.
        Raises ``Rejected``."""
        request_id = next(self._s.request_ids)
        body = _submit_body(request_id, job, payload, delay, deadline)
        kind, fields = await self._request(
            SUBMIT, body, lambda k, f: k in (ACCEPTED, REJECTED) and f[0] == request_id)
        if kind == REJECTED:
            raise Rejected(fields[1], fields[2])
        return fields[1]

    async def status(self, task_id: int) -> TaskResult:
        _, result = await self._request(STATUS, struct.pack(">Q", task_id),
                                        lambda k, f: k == TASK_STATE and f.task_id == task_id)
        return result

    async def cancel(self, task_id: int) -> str:
        _, (_, outcome) = await self._request(CANCEL, struct.pack(">Q", task_id),
                                              lambda k, f: k == CANCEL_RESULT and f[0] == task_id)
        return outcome

    async def wait(self, task_id: int) -> TaskResult:
        """The task's final state, from the push or, if it was lost, STATUS.
        Once returned, the session forgets it (ask ``status`` again if
        needed)."""
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

    def _final_future(self, task_id: int) -> asyncio.Future:
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

    async def submit(self, job: str, payload: bytes = b"", delay: float = 0.0, deadline: float = 0.0) -> TaskResult:
        """Submits ``job`` and returns its final state. If the coroutine is
        cancelled while waiting, the task is cancelled on the server too.
        Raises ``Rejected``."""
        task_id = await self.start(job, payload, delay, deadline)
        try:
            return await self.wait(task_id)
        except asyncio.CancelledError:
            try:
                await asyncio.shield(self.cancel(task_id))
            except TetherError:
                pass
            raise


def default_client_id() -> int:
    """A client id that stays the same for this process's user and host."""
    digest = hashlib.sha256(f"{os.getuid() if hasattr(os, 'getuid') else 0}@{socket.gethostname()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") or 1
