"""A tether client in pure Python (standard library only, Python 3.9+).

Two interfaces over one wire codec:

* ``Client``: blocking. A background thread receives replies and sends
  heartbeats; ``submit`` returns a task id, ``wait`` its final state.
* ``AsyncSession``: asyncio. ``async with AsyncSession(...) as s`` opens a
  session that heartbeats in a background task; ``await s.submit(job,
  payload)`` returns the task's final state, and cancelling the awaiting
  coroutine sends CANCEL to the server.

The wire format is described in PROTOCOL.md at the top of the repository.
"""

import asyncio
import collections
import dataclasses
import hashlib
import hmac
import itertools
import os
import random
import socket
import struct
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

__all__ = [
    "AsyncSession",
    "Client",
    "Rejected",
    "SessionLost",
    "TaskResult",
    "TetherError",
    "TimeoutError_",
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

    @property
    def session(self) -> Tuple[int, int]:
        """(client_id, incarnation) of the current session."""
        return self._s.client_id, self._s.incarnation

    @property
    def dropped(self) -> int:
        """Datagrams received and dropped (malformed, bad MAC, replays)."""
        return self._s.dropped


# --- blocking client --------------------------------------------------------


class Client(_SessionView):
    """A blocking client. Opens a session on construction and heartbeats
    every ``ttl / 3`` from a background thread until ``bye()`` or ``close()``.
    If the server loses the session (it expired, or the server restarted),
    the client opens a new one at once, with a larger incarnation; the call
    that learnt of the loss raises ``SessionLost`` and can be retried.

    >>> with Client(("127.0.0.1", 7900), client_id=42) as c:   # doctest: +SKIP
    ...     task = c.submit("echo", b"hi")
    ...     c.wait(task).result
    b'hi'
    """

    def __init__(self, server: Tuple[str, int], client_id: int, ttl: float = 3.0,
                 key: Optional[bytes] = None, retry_after: float = 0.25, tries: int = 8,
                 name: str = "python"):
        self._s = _Session(client_id, key)
        self._ttl_asked = ttl
        self._name = name
        self._retry_after, self._tries = retry_after, tries
        family = socket.AF_INET6 if ":" in server[0] else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.connect(server)
        self._sock.settimeout(0.05)
        self._lock = threading.Condition()
        self._replies: List[tuple] = []
        self.finals: Dict[int, TaskResult] = {}
        # Unclaimed events, oldest dropped first: ("session_lost",
        # incarnation), ("session_reopened", incarnation), ("task_ended",
        # TaskResult).
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
        # The incarnation each kept final state was pushed under: a restarted
        # server numbers its tasks afresh, so an id can come back.
        self._final_incarnation: Dict[int, int] = {}
        self._rx = threading.Thread(target=self._receive, name="tether-rx", daemon=True)
        self._rx.start()
        try:
            self.ttl, self.tick = self._hello()
        except BaseException:
            self.close()
            raise
        self._live = True
        self._hb = threading.Thread(target=self._heartbeat, name="tether-hb", daemon=True)
        self._hb.start()

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
        """Sends one datagram; returns its (incarnation, seq)."""
        with self._lock:
            seq, data = self._s.datagram(kind, body, flags)
            incarnation = self._s.incarnation
            if kind == HEARTBEAT and flags & FLAG_ACK:
                self._acks = {s: t for s, t in self._acks.items() if s > seq - 64}
                self._acks[seq] = time.monotonic()
        self._sock.send(data)
        return incarnation, seq

    def _request(self, kind: int, body: bytes, wanted: Callable[[int, tuple], bool],
                 backoff: Optional[Callable[[int], float]] = None):
        """Sends and retries until ``wanted`` matches a reply: every
        ``retry_after``, or for a HELLO after ``backoff(try)``. A reopening
        client takes a new incarnation for each such round of tries (see
        ``_reopen``), as the Rust client does, so a session that expired
        while its WELCOME was lost never makes the next round stale."""
        sent: List[Tuple[int, int]] = []  # (incarnation, seq) of each try
        for attempt in range(self._tries):
            if self._closed.is_set():
                raise TetherError("client is closed")
            sent.append(self._send(kind, body))
            wait = self._retry_after if backoff is None else backoff(attempt)
            deadline = time.monotonic() + wait
            with self._lock:
                while True:
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
        kind, fields = self._request(HELLO, body, lambda k, f: k == WELCOME or (k == REJECTED and f[0] == 0),
                                     backoff=self._hello_wait)
        if kind == REJECTED:
            raise Rejected(fields[1], fields[2])
        return fields[0] / 1000.0, fields[1] / 1000.0

    def _reopen(self):
        """Opens a new session, with a larger incarnation, after a loss."""
        with self._lock:
            self._s.renew()
        try:
            self.ttl, self.tick = self._hello()
        except TetherError:
            return  # still lost: the next heartbeat interval tries again
        with self._lock:
            self._live = True
            self.events.append(("session_reopened", self._s.incarnation))
            self._lock.notify_all()

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

    def _heartbeat(self):
        count = 0
        while True:
            self._wake.wait(self.ttl / 3)
            self._wake.clear()
            if self._closed.is_set():
                return
            with self._lock:
                live = self._live
            if self._closing:
                continue
            if not live:
                self._reopen()
                continue
            if self._paused:
                continue
            count += 1
            try:
                self._send(HEARTBEAT, flags=FLAG_ACK if count % 4 == 0 else 0)
            except OSError:
                pass

    def _receive(self):
        while not self._closed.is_set():
            try:
                data = self._sock.recv(2048)
            except (socket.timeout, OSError):
                continue
            try:
                self._file(data)
            except Exception:  # noqa: BLE001 - a datagram must never kill this thread
                with self._lock:
                    self._s.dropped += 1

    def _file(self, data: bytes):
        with self._lock:
            d = self._s.accept(data)
            if d is None:
                return
            kind, _, _, incarnation, seq, fields = d
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
        self.on_datagram(data)


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
    """

    def __init__(self, server: Tuple[str, int], client_id: int, ttl: float = 3.0,
                 key: Optional[bytes] = None, retry_after: float = 0.25, tries: int = 8,
                 name: str = "python-asyncio"):
        self._server = server
        self._s = _Session(client_id, key)
        self._ttl_asked, self._name = ttl, name
        self._retry_after, self._tries = retry_after, tries
        self._waiters: List[Tuple[Callable[..., bool], asyncio.Future]] = []
        self._finals: Dict[int, asyncio.Future] = {}
        self._final_incarnation: Dict[int, int] = {}
        self._transport = None
        self._heartbeat_task = None
        self._reopen_task: Optional[asyncio.Future] = None
        self._live = False
        self._closing = False
        self.ttl = self.tick = None
        self.paused = False

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._on_datagram), remote_addr=self._server)
        try:
            await self._hello()
        except BaseException:
            self._transport.close()
            raise
        self._heartbeat_task = asyncio.ensure_future(self._heartbeat())
        return self

    async def __aexit__(self, exc_type, exc, tb):
        self._closing = True
        for task in (self._heartbeat_task, self._reopen_task):
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
        kind, fields = await self._request(
            HELLO, body, lambda k, f: k == WELCOME or (k == REJECTED and f[0] == 0),
            backoff=lambda attempt: hello_backoff(attempt, self._retry_after, self._ttl_asked or 3.0))
        if kind == REJECTED:
            raise Rejected(fields[1], fields[2])
        self.ttl, self.tick = fields[0] / 1000.0, fields[1] / 1000.0
        self._live = True

    async def _reopen(self):
        """Opens a new session after a loss, trying again every ttl/3."""
        while True:
            self._s.renew()
            try:
                await self._hello()
                return
            except TetherError:
                await asyncio.sleep(self.ttl / 3)

    def _send(self, kind: int, body: bytes = b"", flags: int = 0) -> int:
        seq, data = self._s.datagram(kind, body, flags)
        self._transport.sendto(data)
        return seq

    async def _request(self, kind: int, body: bytes, wanted: Callable[[int, tuple], bool],
                       backoff: Optional[Callable[[int], float]] = None):
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
                sent.append((self._s.incarnation, self._send(kind, body)))
                wait = self._retry_after if backoff is None else backoff(attempt)
                done, _ = await asyncio.wait({future}, timeout=wait)
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

    def _on_datagram(self, data: bytes):
        try:
            self._file(data)
        except Exception:  # noqa: BLE001 - a datagram must never break the session
            self._s.dropped += 1

    def _file(self, data: bytes):
        d = self._s.accept(data)
        if d is None:
            return
        kind, _, _, incarnation, seq, fields = d
        if kind == UNKNOWN_SESSION and self._live:
            self._live = False
            if not self._closing and (self._reopen_task is None or self._reopen_task.done()):
                self._reopen_task = asyncio.ensure_future(self._reopen())
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

    async def _heartbeat(self):
        while True:
            await asyncio.sleep(self.ttl / 3)
            if not self.paused and self._live:
                self._send(HEARTBEAT)

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
