"""Tests of the Python client against the real `tether` binary over loopback.

Run by `cargo test` (tests/python.rs sets TETHER_BIN), or by hand:

    TETHER_BIN=target/debug/tether python3 -m unittest discover -s tools/python -v

They import the package from this directory (tools/python/tether_client),
not an installed copy. PackagingTests also install it with pip into a fresh
virtual environment and run README.md's examples with it, and type-check it
with a pinned mypy; both need PyPI (for flit_core and mypy).
"""

import asyncio
import functools
import inspect
import os
import random
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tether_client as tc  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
BIN = os.environ.get("TETHER_BIN") or os.path.join(REPO, "target", "debug", "tether")


class Server:
    """`tether serve` on a free loopback port (or ``listen``); stopped on exit."""

    def __init__(self, *args, listen="127.0.0.1:0"):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", listen, *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = self._first_line(timeout=30)
        host, port = line.strip().rsplit(" ", 1)[1].rsplit(":", 1)
        self.addr = (host, int(port))

    def _first_line(self, timeout):
        result = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0].startswith("listening on "):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {result!r}")
        return result[0]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class OneServerForTheClass(unittest.TestCase):
    """Starts one `tether serve` for all the tests of a class, stopped after
    the last."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server()

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)


class CodecTests(unittest.TestCase):
    def test_task_state_decodes_and_replays_are_refused(self):
        body = struct.pack(">QB", 77, 5) + bytes([1])
        data = tc.encode(tc.TASK_STATE, 5, 9, 3, body)
        kind, flags, client_id, incarnation, seq, result = tc.decode(data)
        self.assertEqual((kind, client_id, incarnation, seq), (tc.TASK_STATE, 5, 9, 3))
        self.assertEqual(result, tc.TaskResult(77, "cancelled", reason="expired"))
        session = tc._Session(5, None)
        session.incarnation = 9
        self.assertIsNotNone(session.accept(data))
        self.assertIsNone(session.accept(data), "a replay must be refused")

    def test_mac_is_checked_and_malformed_input_is_refused(self):
        key = b"k" * 32
        data = tc.encode(tc.WELCOME, 1, 1, 1, struct.pack(">II", 3000, 10), key)
        self.assertEqual(tc.decode(data, key)[5], (3000, 10))
        self.assertIsNone(tc.decode(data, b"x" * 32))
        self.assertIsNone(tc.decode(data, None), "a MAC without a key")
        tampered = bytearray(data)
        tampered[30] ^= 1
        self.assertIsNone(tc.decode(bytes(tampered), key))
        for bad in (b"", b"TH", data[:27], b"XX" + data[2:], data + b"\0"):
            self.assertIsNone(tc.decode(bad, key))

    def test_hello_backoff_is_full_jitter_capped_at_the_ttl(self):
        base, cap = 0.25, 3.0
        # The ceiling doubles each try up to the cap; the draw spans it.
        for attempt, ceiling in enumerate([0.25, 0.5, 1.0, 2.0, 3.0, 3.0]):
            self.assertAlmostEqual(tc.hello_backoff(attempt, base, cap, rand=lambda: 0.999999), ceiling, places=4)
            self.assertEqual(tc.hello_backoff(attempt, base, cap, rand=lambda: 0.0), base / 4)
            self.assertAlmostEqual(tc.hello_backoff(attempt, base, cap, rand=lambda: 0.5), max(base / 4, ceiling / 2))
        # A fleet's waits spread over the whole range instead of clumping.
        rng = random.Random(7)
        waits = [tc.hello_backoff(3, base, cap, rand=rng.random) for _ in range(1000)]
        self.assertTrue(all(base / 4 <= w <= 2.0 for w in waits))
        self.assertGreater(max(waits) - min(waits), 1.5)
        # A TTL under the base never makes the wait shorter than the base allows.
        self.assertAlmostEqual(tc.hello_backoff(5, 1.0, 0.1, rand=lambda: 0.999999), 1.0, places=4)

    def test_replay_window(self):
        w = tc.ReplayWindow(10)
        self.assertTrue(w.accept(12))
        self.assertTrue(w.accept(11))
        self.assertFalse(w.accept(11))
        self.assertTrue(w.accept(200))
        self.assertFalse(w.accept(136))
        self.assertTrue(w.accept(137))


class RankingTests(unittest.TestCase):
    """The choice of host is part of the protocol: these hold in the Rust
    client's tests too (src/client/hosts.rs)."""

    V4, V6 = ("10.0.0.1", 7900), ("fd00::2", 7900)

    def test_weights_match_the_published_vectors(self):
        self.assertEqual(tc._fnv1a64(tc._identity(self.V4)), 0x6D3083F77039B59E)
        self.assertEqual(tc.weight(1, self.V4), 0x8AACCBB049FDE5DD)
        self.assertEqual(tc.weight(42, self.V4), 0x5B20B37587B9881B)
        self.assertEqual(tc.weight(42, self.V6), 0x9467C84C503B192B)
        self.assertEqual(tc.weight(2 ** 64 - 1, self.V6), 0x93E6378CF555EE9A)

    def test_ranking_is_a_permutation_without_duplicates(self):
        servers = [("10.0.0.1", 7900), ("10.0.0.2", 7900), ("fd00::2", 7900), ("10.0.0.1", 7901)]
        rng = random.Random(5)
        for client_id in (1, 7, 42, 2 ** 64 - 1):
            ranked = tc.rank(client_id, servers + servers[:2])
            self.assertEqual(sorted(ranked), sorted(servers))
            weights = [tc.weight(client_id, s) for s in ranked]
            self.assertEqual(weights, sorted(weights, reverse=True))
            # The order is the client's own, not the list's.
            for _ in range(5):
                shuffled = servers[:]
                rng.shuffle(shuffled)
                self.assertEqual(tc.rank(client_id, shuffled), ranked)
        # One address written two ways is one server.
        self.assertEqual(tc.rank(7, [("FD00:0::2", 7900), ("fd00::2", 7900)]), [("fd00::2", 7900)])

    def test_spread_and_minimal_movement(self):
        three = [("10.0.0.1", 7900), ("10.0.0.2", 7900), ("10.0.0.3", 7900)]
        survivors = three[1:]
        ids = range(1000, 31000)
        before = {i: tc.rank(i, three) for i in ids}
        for s in three:
            held = sum(1 for r in before.values() if r[0] == s)
            self.assertTrue(9700 <= held <= 10300, f"{s} holds {held} of 30000")
        gained = {s: 0 for s in survivors}
        for i in ids:
            after = tc.rank(i, survivors)[0]
            if before[i][0] != three[0]:
                self.assertEqual(after, before[i][0], f"client {i} moved between survivors")
            else:
                # It goes where its own order says next.
                self.assertEqual(after, before[i][1])
                gained[after] += 1
        lost = sum(gained.values())
        for s, g in gained.items():
            self.assertTrue(45 <= 100 * g / lost <= 55, f"{s} gained {g} of {lost}")


def _valid_server_datagrams():
    """One well-formed datagram of every server kind, keyless."""
    bodies = [
        (tc.WELCOME, struct.pack(">II", 3000, 10)),
        (tc.HEARTBEAT_ACK, struct.pack(">I", 4)),
        (tc.ACCEPTED, struct.pack(">IQ", 1, 2)),
        (tc.REJECTED, struct.pack(">IHB", 1, 2, 3) + b"abc"),
        (tc.TASK_STATE, struct.pack(">QB", 1, 3) + b"result"),
        (tc.TASK_STATE, struct.pack(">QBB", 1, 4, 2) + b"no"),
        (tc.TASK_STATE, struct.pack(">QBB", 1, 5, 1)),
        (tc.TASK_STATE, struct.pack(">QB", 1, 2)),
        (tc.CANCEL_RESULT, struct.pack(">QB", 1, 0)),
        (tc.UNKNOWN_SESSION, b""),
        (tc.BYE_ACK, b""),
    ]
    return [tc.encode(kind, 5, 9, seq + 1, body) for seq, (kind, body) in enumerate(bodies)]


class DecoderFuzzTests(unittest.TestCase):
    """Whatever arrives, the decoder returns a datagram or None and never
    raises, so nothing a server (or anyone spoofing it) sends can kill a
    client's receiver."""

    def test_out_of_range_values_are_malformed(self):
        for kind, body in [
            (tc.CANCEL_RESULT, struct.pack(">QB", 1, 3)),
            (tc.CANCEL_RESULT, struct.pack(">QB", 1, 255)),
            (tc.TASK_STATE, struct.pack(">QBB", 1, 5, 0)),
            (tc.TASK_STATE, struct.pack(">QBB", 1, 5, 7)),
            (tc.TASK_STATE, struct.pack(">QB", 1, 7)),
            (tc.REJECTED, struct.pack(">IHB", 1, 2, 9) + b"abc"),
            (tc.TASK_STATE, struct.pack(">QBB", 1, 4, 2) + b"\xff\xfe"),
        ]:
            self.assertIsNone(tc.decode(tc.encode(kind, 5, 9, 1, body)), (kind, body))

    def test_random_and_mutated_datagrams_never_raise(self):
        rng = random.Random(1234)
        valid = _valid_server_datagrams()
        session = tc._Session(5, None)
        session.incarnation = 9
        for _ in range(20_000):
            if rng.random() < 0.3:
                data = bytes(rng.randrange(256) for _ in range(rng.randrange(60)))
            else:
                data = bytearray(rng.choice(valid))
                for _ in range(rng.randrange(1, 4)):
                    op = rng.randrange(3)
                    if op == 0 and data:
                        data[rng.randrange(len(data))] = rng.randrange(256)
                    elif op == 1 and data:
                        del data[rng.randrange(len(data)):]
                    else:
                        data += bytes([rng.randrange(256)])
                data = bytes(data)
            tc.decode(data)
            tc.decode(data, b"k" * 32)
            session.accept(data)
        self.assertGreater(session.dropped, 0)


class FakeServer:
    """A UDP socket on loopback that plays the server from a script."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(5)
        self.addr = self.sock.getsockname()
        self.seq = 0

    def recv(self):
        """(kind, client_id, incarnation, seq, peer) of the next datagram;
        its body is kept in ``body``."""
        data, peer = self.sock.recvfrom(2048)
        _, _, kind, _, _, body_len, client_id, incarnation, seq = tc.HEADER.unpack_from(data)
        self.body = data[tc.HEADER.size:tc.HEADER.size + body_len]
        return kind, client_id, incarnation, seq, peer

    def expect(self, kind):
        while True:
            got = self.recv()
            if got[0] == kind:
                return got

    def reply(self, to, kind, body=b""):
        self.seq += 1
        _, client_id, incarnation, _, peer = to
        self.sock.sendto(tc.encode(kind, client_id, incarnation, self.seq, body), peer)

    def unknown_session(self, to):
        _, client_id, incarnation, seq, peer = to
        self.sock.sendto(tc.encode(tc.UNKNOWN_SESSION, client_id, incarnation, seq, b""), peer)

    def welcome(self):
        hello = self.expect(tc.HELLO)
        self.reply(hello, tc.WELCOME, struct.pack(">II", 3000, 10))
        return hello

    def close(self):
        self.sock.close()


def _in_thread(fn):
    """Runs ``fn`` in a thread; returns a function that joins it and
    returns its result (or raises its exception)."""
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()

    def join():
        t.join(10)
        if "error" in out:
            raise out["error"]
        return out["value"]

    return join


class ScriptedServerTests(unittest.TestCase):
    def setUp(self):
        self.fake = FakeServer()

    def tearDown(self):
        self.fake.close()

    def test_a_garbled_datagram_is_dropped_and_the_receiver_lives_on(self):
        client = _in_thread(lambda: tc.Client(self.fake.addr, client_id=7, retry_after=0.1))
        hello = self.fake.welcome()
        c = client()
        try:
            # A framed CANCEL_RESULT with an outcome outside {0, 1, 2}.
            self.fake.reply(hello, tc.CANCEL_RESULT, struct.pack(">QB", 1, 9))
            submit = _in_thread(lambda: c.submit("echo", b"x"))
            request = self.fake.expect(tc.SUBMIT)
            self.fake.reply(request, tc.ACCEPTED, struct.pack(">IQ", 1, 42))
            self.assertEqual(submit().id, 42, "the receiver still files replies")
            self.assertGreaterEqual(c.dropped, 1)
        finally:
            c.close()

    def test_a_datagram_from_an_address_not_listed_is_dropped(self):
        client = _in_thread(lambda: tc.Client(self.fake.addr, client_id=13, retry_after=0.1))
        hello = self.fake.welcome()
        c = client()
        stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # A final state for this very session, but from another port.
            final = tc.encode(tc.TASK_STATE, 13, hello[2], 50, struct.pack(">QB", 5, 3))
            stranger.sendto(final, hello[4])
            deadline = time.monotonic() + 5
            while c.dropped < 1:
                self.assertLess(time.monotonic(), deadline, "not dropped")
                time.sleep(0.01)
            self.assertNotIn(5, c.finals)
            self.fake.sock.sendto(final, hello[4])
            self.assertEqual(c.wait(5, timeout=5).state, "done", "the same from the server is filed")
        finally:
            stranger.close()
            c.close()

    def test_lost_acks_bring_probes_and_an_answered_probe_keeps_the_host(self):
        # Two scripted hosts; the client's first choice welcomes it, then
        # answers nothing for two seconds (of a 3 s TTL): the heartbeats
        # that follow ask for an ACK every retry_after, and one answer
        # keeps the client where it is.
        other = FakeServer()
        try:
            servers = [self.fake.addr, other.addr]
            first = tc.rank(77, servers)[0]
            home = self.fake if first == self.fake.addr else other
            client = _in_thread(lambda: tc.Client(servers, client_id=77, retry_after=0.1))
            hello = home.welcome()
            c = client()
            try:
                quiet_until = time.monotonic() + 2.0
                asks = []
                while time.monotonic() < quiet_until:
                    try:
                        data, _ = home.sock.recvfrom(2048)
                    except socket.timeout:
                        break
                    _, _, kind, flags, _, _, _, _, seq = tc.HEADER.unpack_from(data)
                    if kind == tc.HEARTBEAT and flags & tc.FLAG_ACK:
                        asks.append(time.monotonic())
                gaps = [b - a for a, b in zip(asks, asks[1:])]
                self.assertGreaterEqual(len(asks), 8, f"asks at {asks}")
                self.assertLess(min(gaps[1:]), 0.3, f"probes every retry_after: {gaps}")
                beat = home.expect(tc.HEARTBEAT)
                home.reply(beat, tc.HEARTBEAT_ACK, struct.pack(">I", beat[3]))
                time.sleep(2.0)
                self.assertEqual(c.server, first)
                self.assertNotIn("server_changed", [e[0] for e in c.events])
                self.assertEqual(hello[2], c.session[1], "the same session")
            finally:
                c.close()
        finally:
            other.close()

    def test_a_host_that_refuses_for_want_of_room_is_passed_over(self):
        # The client's first choice is full (REJECTED 6 to its HELLO): it
        # opens on its second. Later, reopening, refusals move it on at
        # once only once round the list; then it stays and retries, no
        # faster than a heartbeat interval (as the Rust client).
        other = FakeServer()
        try:
            servers = [self.fake.addr, other.addr]
            first = tc.rank(78, servers)[0]
            full, spare = (self.fake, other) if first == self.fake.addr else (other, self.fake)
            refusal = struct.pack(">IHB", 0, 6, 4) + b"full"
            client = _in_thread(lambda: tc.Client(servers, client_id=78, retry_after=0.1))
            hello = full.expect(tc.HELLO)
            full.reply(hello, tc.REJECTED, refusal)
            welcomed = spare.welcome()
            c = client()
            try:
                self.assertEqual(c.server, spare.addr)
                beat = spare.expect(tc.HEARTBEAT)
                spare.unknown_session(beat)
                hellos = []  # (host, time) of each HELLO, each refused
                started = time.monotonic()
                for host in (spare, full, spare):
                    got = host.expect(tc.HELLO)
                    hellos.append((host, time.monotonic() - started))
                    host.reply(got, tc.REJECTED, refusal)
                # spare -> full -> spare (once round) came at once; the
                # client then stays on spare, its next HELLO an interval on.
                self.assertLess(hellos[2][1], 0.5, hellos)
                again = spare.expect(tc.HELLO)
                self.assertGreater(time.monotonic() - started - hellos[2][1], 0.5)
                self.assertNotEqual(again[2], welcomed[2])
            finally:
                c.close()
        finally:
            other.close()

    def test_late_judgement_asks_again_and_a_pause_does_not_spin(self):
        other = FakeServer()
        try:
            servers = [self.fake.addr, other.addr]
            home = self.fake if tc.rank(79, servers)[0] == self.fake.addr else other
            client = _in_thread(lambda: tc.Client(servers, client_id=79, retry_after=0.1))
            home.welcome()
            c = client()
            try:
                # An ask unanswered, judged 10 s after it was due: the client
                # was not running, so it asks again rather than leave.
                with c._lock:
                    now = time.monotonic()
                    c._hosts.heard = now - 20
                    c._asked_at = now - 15
                    self.assertFalse(c._judge_silence(now))
                    self.assertIsNone(c._asked_at)
                    # Judged on time, the same silence does move it.
                    c._asked_at = now - 0.15
                    self.assertTrue(c._judge_silence(now))
                    c._hosts.heard = now
                # Paused with an ask unanswered: the heartbeat thread sleeps.
                c.pause_heartbeats(True)
                with c._lock:
                    c._asked_at = time.monotonic()
                    c._hosts.heard = c._asked_at - 1
                cpu = time.process_time()
                time.sleep(2.5)  # past the next heartbeat's time (TTL 3 s)
                self.assertLess(time.process_time() - cpu, 1.0, "spinning while paused")
            finally:
                c.close()
        finally:
            other.close()

    def test_unanswered_hellos_back_off(self):
        # The waits come from hello_backoff, try by try, with the client's
        # retry_after as base and its TTL as cap; recorded here, and kept
        # short so the test ends quickly.
        calls = []
        real = tc.hello_backoff

        def recording(attempt, base, cap, rand=None):
            calls.append((attempt, base, cap))
            return 0.02

        tc.hello_backoff = recording
        try:
            client = _in_thread(lambda: tc.Client(self.fake.addr, client_id=9, ttl=2.0,
                                                  retry_after=0.5, tries=4))
            hellos = [self.fake.expect(tc.HELLO) for _ in range(4)]
            with self.assertRaises(tc.TimeoutError_):
                client()
        finally:
            tc.hello_backoff = real
        self.assertEqual(calls, [(0, 0.5, 2.0), (1, 0.5, 2.0), (2, 0.5, 2.0), (3, 0.5, 2.0)])
        self.assertEqual([h[3] for h in hellos], [1, 2, 3, 4], "each try a new datagram")
        self.assertEqual(len({h[2] for h in hellos}), 1, "one incarnation for a round of tries")

    def test_a_bye_whose_ack_was_lost_succeeds_on_its_retry(self):
        client = _in_thread(lambda: tc.Client(self.fake.addr, client_id=8, retry_after=0.1))
        self.fake.welcome()
        c = client()
        bye = _in_thread(c.bye)
        self.fake.expect(tc.BYE)  # took effect; its BYE_ACK is lost
        self.fake.unknown_session(self.fake.expect(tc.BYE))
        bye()  # returns normally

    def test_a_bye_to_a_session_already_gone_raises_session_lost(self):
        client = _in_thread(lambda: tc.Client(self.fake.addr, client_id=9, retry_after=0.1))
        self.fake.welcome()
        c = client()
        bye = _in_thread(c.bye)
        self.fake.unknown_session(self.fake.expect(tc.BYE))
        with self.assertRaises(tc.SessionLost):
            bye()

    def test_a_run_cancelled_while_its_submit_is_in_flight_cancels_the_task(self):
        # The caller gives up before the server has answered the SUBMIT: the
        # SUBMIT is retried all the same, and once its ACCEPTED brings the
        # task's id, a CANCEL follows, so the task does not run on unseen.
        submitted, given_up, answered = threading.Event(), threading.Event(), threading.Event()

        async def main():
            loop = asyncio.get_running_loop()
            # The default retry time: the SUBMIT is retried for 2 s, time
            # enough to give up on it before this test answers it.
            async with tc.AsyncSession(self.fake.addr, client_id=16) as s:
                job = asyncio.ensure_future(s.run("sleep", tc.u32(60_000)))
                await loop.run_in_executor(None, submitted.wait, 5)
                job.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await job
                given_up.set()
                await loop.run_in_executor(None, answered.wait, 5)
                for _ in range(100):
                    if not s._background:
                        break
                    await asyncio.sleep(0.02)
                return len(s._background)

        run = _in_thread(lambda: asyncio.run(main()))
        self.fake.welcome()
        submit = self.fake.expect(tc.SUBMIT)
        request_id = struct.unpack_from(">I", self.fake.body)[0]
        submitted.set()
        self.assertTrue(given_up.wait(5))
        self.fake.reply(submit, tc.ACCEPTED, struct.pack(">IQ", request_id, 99))
        cancel = self.fake.expect(tc.CANCEL)
        self.assertEqual(struct.unpack(">Q", self.fake.body), (99,))
        self.fake.reply(cancel, tc.CANCEL_RESULT, struct.pack(">QB", 99, 0))
        answered.set()
        self.fake.reply(self.fake.expect(tc.BYE), tc.BYE_ACK)
        self.assertEqual(run(), 0, "the CANCEL was answered")

    def test_an_async_block_exits_cleanly_when_its_byes_ack_was_lost(self):
        async def main():
            async with tc.AsyncSession(self.fake.addr, client_id=10, retry_after=0.1):
                pass

        run = _in_thread(lambda: asyncio.run(main()))
        self.fake.welcome()
        self.fake.expect(tc.BYE)
        self.fake.unknown_session(self.fake.expect(tc.BYE))
        run()

    def test_unclaimed_events_are_bounded(self):
        client = _in_thread(lambda: tc.Client(self.fake.addr, client_id=11, retry_after=0.1))
        hello = self.fake.welcome()
        c = client()
        try:
            # Sent in steps of 50, each waited for: 3,000 at once overflowed
            # the client's receive buffer on a loaded machine (960 arrived),
            # and the bound was never reached. Paced, every one arrives.
            last = 3000
            for task_id in range(1, last + 1):
                self.fake.reply(hello, tc.TASK_STATE, struct.pack(">QB", task_id, 3))
                if task_id % 50 == 0:
                    deadline = time.monotonic() + 10
                    while not c.events or c.events[-1][1].task_id != task_id:
                        self.assertLess(time.monotonic(), deadline,
                                        f"task {task_id} never arrived ({len(c.events)} events)")
                        time.sleep(0.002)
            time.sleep(0.2)
            self.assertEqual(len(c.events), tc.MAX_EVENTS)
            self.assertEqual(c.events[-1][1].task_id, last, "the newest is kept")
            self.assertGreater(c.events[0][1].task_id, 1, "the oldest went first")
        finally:
            c.close()


class AsyncFinalsTests(unittest.TestCase):
    def test_final_states_nobody_waits_for_are_bounded(self):
        fake = FakeServer()

        async def main():
            async with tc.AsyncSession(fake.addr, client_id=12, retry_after=0.1) as s:
                for task_id in range(1, 2 * tc.MAX_EVENTS):
                    s._on_datagram(tc.encode(tc.TASK_STATE, 12, s.session[1], 10 + task_id,
                                             struct.pack(">QB", task_id, 3)), fake.addr)
                held = len(s._finals)
                done = await s.wait(2 * tc.MAX_EVENTS - 1)
                return held, done, len(s._finals)

        run = _in_thread(lambda: asyncio.run(main()))
        try:
            fake.welcome()
            fake.unknown_session(fake.expect(tc.BYE))
            held, done, after = run()
        finally:
            fake.close()
        self.assertEqual(held, tc.MAX_EVENTS)
        self.assertEqual(done.state, "done")
        self.assertEqual(after, tc.MAX_EVENTS - 1, "a final state is forgotten once waited for")


class ServerRestartTests(unittest.TestCase):
    """A client outlives a server restart: within one TTL it is in a new
    session, with a larger incarnation, and new work runs."""

    def restart(self, first):
        port = first.addr[1]
        first.__exit__(None, None, None)
        return Server(listen=f"127.0.0.1:{port}")

    def test_blocking_client_reopens_its_session(self):
        first = Server()
        c = tc.Client(first.addr, client_id=301, ttl=1.0)
        try:
            old = c.session
            self.assertEqual(c.wait(c.submit("echo", b"before")).result, b"before")
            with self.restart(first):
                restarted = time.monotonic()
                while c.session == old or not c._live:
                    self.assertLess(time.monotonic() - restarted, 1.0, "not back within one TTL")
                    time.sleep(0.01)
                self.assertGreater(c.session[1], old[1])
                self.assertEqual(c.wait(c.submit("echo", b"after")).result, b"after")
                self.assertIn(("session_lost", old[1]), list(c.events))
                c.bye()
        finally:
            c.close()

    def test_async_session_reopens_its_session(self):
        first = Server()

        async def main():
            async with tc.AsyncSession(first.addr, client_id=302, ttl=1.0) as s:
                old = s.session
                self.assertEqual((await s.run("echo", b"before")).result, b"before")
                with self.restart(first):
                    restarted = time.monotonic()
                    while s.session == old or not s._live:
                        self.assertLess(time.monotonic() - restarted, 1.0, "not back within one TTL")
                        await asyncio.sleep(0.01)
                    self.assertGreater(s.session[1], old[1])
                    return (await s.run("echo", b"after")).result

        self.assertEqual(asyncio.run(main()), b"after")


class BlockingClientTests(OneServerForTheClass):
    def test_standard_jobs(self):
        with tc.Client(self.server.addr, client_id=101) as c:
            self.assertEqual(c.ttl, 3.0)
            self.assertEqual(c.wait(c.submit("echo", b"hi")).result, b"hi")
            failed = c.wait(c.submit("fail", b"broken"))
            self.assertEqual((failed.state, failed.error), ("failed", "broken"))
            slept = c.wait(c.submit("sleep", struct.pack(">I", 20)))
            self.assertEqual(slept.state, "done")
            with self.assertRaises(tc.Rejected) as raised:
                c.submit("sleep", b"abc")
            self.assertEqual(raised.exception.code, 4)
            with self.assertRaises(tc.Rejected) as raised:
                c.submit("no-such-job")
            self.assertEqual(raised.exception.code, 1)

    def test_cancel_and_status(self):
        with tc.Client(self.server.addr, client_id=102) as c:
            task = c.submit("sleep", struct.pack(">I", 60_000))
            deadline = time.monotonic() + 5
            while c.status(task).state != "running":
                self.assertLess(time.monotonic(), deadline)
            self.assertEqual(c.cancel(task), "cancelled")
            self.assertEqual(c.wait(task), tc.TaskResult(task.id, "cancelled", reason="cancelled"))
            self.assertEqual(c.cancel(task), "already_finished")
            self.assertEqual(c.status(1).state, "unknown")

    def test_silent_client_is_expired(self):
        c = tc.Client(self.server.addr, client_id=103, ttl=0.3)
        try:
            task = c.submit("sleep", struct.pack(">I", 60_000))
            c.pause_heartbeats()
            started = time.monotonic()
            deadline = started + 5
            with c._lock:
                while task.id not in c.finals:
                    self.assertLess(time.monotonic(), deadline, "no expiry pushed")
                    c._lock.wait(0.05)
            self.assertEqual(c.finals[task.id].reason, "expired")
            self.assertGreaterEqual(time.monotonic() - started, 0.25)
        finally:
            c.close()

    def test_keyed(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "key")
            with open(path, "wb") as f:
                f.write(b"s" * 32)
            os.chmod(path, 0o600)
            with Server("--key-file", path) as keyed:
                with tc.Client(keyed.addr, client_id=104, key=b"s" * 32) as c:
                    self.assertEqual(c.wait(c.submit("echo", b"signed")).result, b"signed")

                async def signed():
                    async with tc.AsyncSession(keyed.addr, client_id=106, key=b"s" * 32) as s:
                        return await s.run("echo", b"async signed")

                self.assertEqual(asyncio.run(signed()).result, b"async signed")
                with self.assertRaises(tc.TimeoutError_):
                    tc.Client(keyed.addr, client_id=105, key=b"t" * 32, tries=2, retry_after=0.1)


class AsyncSessionTests(OneServerForTheClass):
    def test_run_returns_final_state(self):
        async def main():
            async with tc.AsyncSession(self.server.addr, client_id=201) as s:
                done = await s.run("echo", b"async")
                failed = await s.run("fail", b"bad")
                return done, failed

        done, failed = asyncio.run(main())
        self.assertEqual((done.state, done.result), ("done", b"async"))
        self.assertEqual((failed.state, failed.error), ("failed", "bad"))

    def test_cancelling_the_coroutine_cancels_the_task(self):
        async def main():
            async with tc.AsyncSession(self.server.addr, client_id=202) as s:
                job = asyncio.ensure_future(s.run("sleep", struct.pack(">I", 60_000)))
                await asyncio.sleep(0.2)
                job.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await job
                # The server-side task was cancelled by the CANCEL we sent.
                task_id = next(iter(s._finals)) if s._finals else None
                for _ in range(50):
                    if task_id is not None and s._finals[task_id].done():
                        break
                    await asyncio.sleep(0.05)
                    task_id = next(iter(s._finals)) if s._finals else None
                return s._finals[task_id].result()

        final = asyncio.run(main())
        self.assertEqual((final.state, final.reason), ("cancelled", "cancelled"))

    def test_wait_for_timeout_cancels_and_a_silent_session_expires(self):
        async def main():
            async with tc.AsyncSession(self.server.addr, client_id=203, ttl=0.3) as s:
                with self.assertRaises(asyncio.TimeoutError):
                    await asyncio.wait_for(s.run("sleep", struct.pack(">I", 60_000)), 0.3)
                task_id = await s.start("sleep", struct.pack(">I", 60_000))
                s.paused = True
                return await asyncio.wait_for(s.wait(task_id), 5)

        final = asyncio.run(main())
        self.assertEqual((final.state, final.reason), ("cancelled", "expired"))


def _closed_port():
    """A loopback address where nothing listens (UDP)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    addr = sock.getsockname()
    sock.close()
    return addr


def _first_choice(servers, wanted, start):
    """A client id from ``start`` on whose first choice is ``wanted``."""
    client_id = start
    while tc.rank(client_id, servers)[0] != wanted:
        client_id += 1
    return client_id


class FailoverTests(unittest.TestCase):
    """Several servers: the client opens on its first choice, and when that
    host falls silent for a TTL it opens a new session on its next one."""

    TTL = 1.0

    def two_servers(self):
        a = Server()
        self.addCleanup(a.__exit__, None, None, None)
        b = Server()
        self.addCleanup(b.__exit__, None, None, None)
        return a, b

    def test_blocking_client_moves_when_its_host_falls_silent(self):
        a, b = self.two_servers()
        by_addr = {a.addr: a, b.addr: b}
        first, second = tc.rank(501, [a.addr, b.addr])
        c = tc.Client([a.addr, b.addr], client_id=501, ttl=self.TTL)
        try:
            self.assertEqual(c.server, first)
            old = c.session
            self.assertEqual(c.wait(c.submit("echo", b"before")).result, b"before")
            killed = time.monotonic()
            by_addr[first].__exit__(None, None, None)
            while c.server != second or not c._live:
                self.assertLess(time.monotonic() - killed, 2 * self.TTL + 0.3, "not moved within 2 TTLs")
                time.sleep(0.01)
            events = list(c.events)
            self.assertIn(("server_changed", (first, second)), events)
            self.assertIn(("session_lost", old[1]), events)
            self.assertIn(("session_reopened", c.session[1]), events)
            self.assertGreater(c.session[1], old[1])
            self.assertEqual(c.wait(c.submit("echo", b"after")).result, b"after")
            self.assertEqual(c.server, second)
            c.bye()
        finally:
            c.close()

    def test_async_session_moves_when_its_host_falls_silent(self):
        a, b = self.two_servers()
        by_addr = {a.addr: a, b.addr: b}
        first, second = tc.rank(502, [a.addr, b.addr])

        async def main():
            async with tc.AsyncSession([a.addr, b.addr], client_id=502, ttl=self.TTL) as s:
                self.assertEqual(s.server, first)
                old = s.session
                self.assertEqual((await s.run("echo", b"before")).result, b"before")
                killed = time.monotonic()
                stop = by_addr[first].__exit__
                await asyncio.get_running_loop().run_in_executor(None, stop, None, None, None)
                while s.server != second or not s._live:
                    self.assertLess(time.monotonic() - killed, 2 * self.TTL + 0.3, "not moved within 2 TTLs")
                    await asyncio.sleep(0.01)
                events = list(s.events)
                self.assertIn(("server_changed", (first, second)), events)
                self.assertIn(("session_lost", old[1]), events)
                self.assertIn(("session_reopened", s.session[1]), events)
                self.assertGreater(s.session[1], old[1])
                result = (await s.run("echo", b"after")).result
                self.assertEqual(s.server, second)
                return result

        self.assertEqual(asyncio.run(main()), b"after")

    def test_a_quiet_host_that_answers_is_kept(self):
        # No calls, only heartbeats: each asks for an ACK once the host has
        # been quiet for an interval, so a live host is heard within a TTL.
        a, b = self.two_servers()
        servers = [a.addr, b.addr]

        async def idle():
            async with tc.AsyncSession(servers, client_id=503, ttl=self.TTL) as s:
                await asyncio.sleep(3 * self.TTL)
                return list(s.events), s.server

        run = _in_thread(lambda: asyncio.run(idle()))
        with tc.Client(servers, client_id=504, ttl=self.TTL) as c:
            time.sleep(3 * self.TTL)
            self.assertEqual((list(c.events), c.server), ([], tc.rank(504, servers)[0]))
        self.assertEqual(run(), ([], tc.rank(503, servers)[0]))

    def test_ipv4_and_ipv6_servers_in_one_list(self):
        try:
            v6 = Server(listen="[::1]:0")
        except RuntimeError:
            self.skipTest("no IPv6 loopback")
        self.addCleanup(v6.__exit__, None, None, None)
        v4 = Server()
        self.addCleanup(v4.__exit__, None, None, None)
        servers = [v4.addr, ("::1", v6.addr[1])]
        on_v4 = _first_choice(servers, servers[0], 1000)
        on_v6 = _first_choice(servers, servers[1], 1000)

        async def on_ipv6():
            async with tc.AsyncSession(servers, client_id=on_v6, ttl=self.TTL) as s:
                return s.server, (await s.run("echo", b"six")).result

        self.assertEqual(asyncio.run(on_ipv6()), (servers[1], b"six"))
        # One socket reaches both: IPv4 through v4-mapped addresses.
        c = tc.Client(servers, client_id=on_v4, ttl=self.TTL)
        try:
            self.assertEqual((c.server, c.wait(c.submit("echo", b"four")).result), (servers[0], b"four"))
            killed = time.monotonic()
            v4.__exit__(None, None, None)
            while c.server != servers[1] or not c._live:
                self.assertLess(time.monotonic() - killed, 2 * self.TTL + 0.3, "not moved within 2 TTLs")
                time.sleep(0.01)
            self.assertEqual(c.wait(c.submit("echo", b"six")).result, b"six")
            c.bye()
        finally:
            c.close()

    def test_blocking_client_opens_on_its_second_choice_if_the_first_is_silent(self):
        with Server() as live:
            closed = _closed_port()
            client_id = _first_choice([closed, live.addr], closed, 600)
            started = time.monotonic()
            with tc.Client([live.addr, closed], client_id=client_id, ttl=0.5) as c:
                opened = time.monotonic() - started
                self.assertEqual(c.server, live.addr)
                self.assertGreaterEqual(opened, 0.45, "the first choice gets a TTL to answer")
                self.assertLess(opened, 1.0)
                self.assertEqual(list(c.events), [("server_changed", (closed, live.addr))])
                self.assertEqual(c.wait(c.submit("echo", b"second")).result, b"second")

    def test_async_session_opens_on_its_second_choice_if_the_first_is_silent(self):
        with Server() as live:
            closed = _closed_port()
            client_id = _first_choice([closed, live.addr], closed, 700)

            async def main():
                async with tc.AsyncSession([closed, live.addr], client_id=client_id, ttl=0.5) as s:
                    self.assertEqual(s.server, live.addr)
                    return (await s.run("echo", b"second")).result

            self.assertEqual(asyncio.run(main()), b"second")

    def test_opening_fails_only_once_every_host_was_tried(self):
        silent = [_closed_port(), _closed_port()]
        started = time.monotonic()
        with self.assertRaises(tc.TimeoutError_) as raised:
            tc.Client(silent, client_id=801, ttl=0.3)
        self.assertGreaterEqual(time.monotonic() - started, 0.55, "a TTL for each host")
        self.assertIn("any of the 2 servers", str(raised.exception))

        async def main():
            async with tc.AsyncSession(silent, client_id=802, ttl=0.3):
                pass

        with self.assertRaises(tc.TimeoutError_):
            asyncio.run(main())

    def test_a_name_is_resolved_again_and_a_host_that_left_is_left_at_once(self):
        # One name with two A records, as a DNS server would give them: the
        # same port on 127.0.0.1 and 127.0.0.2 (loopback, both).
        a = Server()
        self.addCleanup(a.__exit__, None, None, None)
        port = a.addr[1]
        b = Server(listen=f"127.0.0.2:{port}")
        self.addCleanup(b.__exit__, None, None, None)
        first, second = tc.rank(901, [a.addr, b.addr])
        answer = [[first, second]]  # what the name resolves to; None: failure
        real = socket.getaddrinfo

        def getaddrinfo(host, port, *args, **kwargs):
            if host != "tether.test":
                return real(host, port, *args, **kwargs)
            if answer[0] is None:
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            return [(socket.AF_INET, socket.SOCK_DGRAM, 17, "", (ip, port)) for ip, _ in answer[0]]

        socket.getaddrinfo = getaddrinfo
        self.addCleanup(setattr, socket, "getaddrinfo", real)
        # A long TTL: only the list change can explain a move.
        with tc.Client(("tether.test", port), client_id=901, ttl=10.0, resolve_every=0.05) as c:
            self.assertEqual(c.server, first)
            answer[0] = [second]
            changed = time.monotonic()
            while c.server != second or not c._live:
                self.assertLess(time.monotonic() - changed, 2.0, "did not leave a host gone from the list")
                time.sleep(0.01)
            self.assertIn(("server_changed", (first, second)), list(c.events))
            moved = c.session
            # The first choice is back, but the live session stays put; a
            # failed lookup keeps the list.
            answer[0] = [first, second]
            time.sleep(0.3)
            answer[0] = None
            time.sleep(0.3)
            self.assertEqual((c.server, c.session), (second, moved))
            self.assertEqual(c._hosts.ranked, [first, second])
            self.assertEqual(c.wait(c.submit("echo", b"stayed")).result, b"stayed")



class PayloadTests(unittest.TestCase):
    def test_numbers_are_big_endian_and_range_checked(self):
        self.assertEqual(tc.u32(0), b"\0\0\0\0")
        self.assertEqual(tc.u32(60_000), struct.pack(">I", 60_000))
        self.assertEqual(tc.u32(2 ** 32 - 1), b"\xff" * 4)
        self.assertEqual(tc.u64(10_000), struct.pack(">Q", 10_000))
        self.assertEqual(tc.u64(2 ** 64 - 1), b"\xff" * 8)
        for bad in (-1, 2 ** 32):
            with self.assertRaises(ValueError):
                tc.u32(bad)
        for bad in (-1, 2 ** 64):
            with self.assertRaises(ValueError):
                tc.u64(bad)
        for encode in (tc.u32, tc.u64):
            for bad in (1.5, "1", None):
                with self.assertRaises(TypeError):
                    encode(bad)
        self.assertEqual(tc.parse_u32(tc.u32(123_456)), 123_456)
        self.assertEqual(tc.parse_u64(tc.u64(2 ** 64 - 1)), 2 ** 64 - 1)
        for bad in (b"", b"\0" * 3, b"\0" * 5):
            with self.assertRaises(ValueError):
                tc.parse_u32(bad)
        for bad in (b"\0" * 4, b"\0" * 9):
            with self.assertRaises(ValueError):
                tc.parse_u64(bad)

    def test_text_is_utf8_up_to_a_payload(self):
        self.assertEqual(tc.text("héllo"), "héllo".encode("utf-8"))
        self.assertEqual(len(tc.text("é" * 512)), 1024)
        with self.assertRaises(ValueError):
            tc.text("é" * 512 + "x")
        self.assertEqual(tc.parse_text(tc.text("héllo")), "héllo")
        with self.assertRaises(ValueError):
            tc.parse_text(b"\xff")


class ErrorTests(unittest.TestCase):
    def test_timeout_is_a_builtin_timeout_error(self):
        self.assertIs(tc.TimeoutError_, tc.Timeout)
        self.assertTrue(issubclass(tc.Timeout, TimeoutError))
        self.assertTrue(issubclass(tc.Timeout, tc.TetherError))
        self.assertEqual(str(tc.Timeout("no reply")), "no reply")
        # One the client raises: nobody answers the HELLOs.
        with self.assertRaises(TimeoutError) as raised:
            tc.Client(_closed_port(), client_id=15, tries=2, retry_after=0.05)
        self.assertIsInstance(raised.exception, tc.TimeoutError_)


def _fnv1a64_reference(data):
    """FNV-1a 64, written out again from its definition (apart from the
    client's own)."""
    return functools.reduce(lambda h, b: ((h ^ b) * 0x100000001B3) % 2 ** 64, data, 0xCBF29CE484222325)


class _User:
    """Sets (a str or bytes) or unsets (None) USER for a block."""

    def __init__(self, value):
        self.value = value

    def __enter__(self):
        self.saved = os.environb.get(b"USER")
        if self.value is None:
            os.environb.pop(b"USER", None)
        else:
            os.environb[b"USER"] = self.value.encode("utf-8") if isinstance(self.value, str) else self.value

    def __exit__(self, *exc):
        if self.saved is None:
            os.environb.pop(b"USER", None)
        else:
            os.environb[b"USER"] = self.saved


class DefaultClientIdTests(unittest.TestCase):
    """The default client id is the CLI's (src/bin/tether.rs,
    default_client_id): FNV-1a 64 over USER, a 0 byte, and /etc/hostname
    trimmed, at least 1."""

    def test_the_reference_hash_gives_the_published_vectors(self):
        self.assertEqual(_fnv1a64_reference(b""), 0xCBF29CE484222325)
        self.assertEqual(_fnv1a64_reference(b"a"), 0xAF63DC4C8601EC8C)
        self.assertEqual(_fnv1a64_reference(b"foobar"), 0x85944171F73967E8)

    @staticmethod
    def expected(user):
        try:
            with open("/etc/hostname", "rb") as f:
                host = f.read().strip()
        except OSError:
            host = b""
        return max(_fnv1a64_reference(user + b"\0" + host), 1)

    def test_it_hashes_user_and_hostname(self):
        for user, hashed in [("alice", b"alice"), ("zoë", "zoë".encode()), ("", b""), (None, b""),
                             (b"\xff", b"")]:  # not UTF-8: Rust's env::var gives nothing
            with _User(user):
                self.assertEqual(tc.default_client_id(), self.expected(hashed), user)

    def test_the_hostname_is_read_as_rust_reads_it(self):
        def ref(user, host):
            return max(_fnv1a64_reference(user + b"\0" + host), 1)

        self.assertEqual(tc._client_id_for(b"u", b"  host \n"), ref(b"u", b"host"))
        # str::trim strips Unicode whitespace, but not U+001F (which
        # Python's str.strip() would).
        self.assertEqual(tc._client_id_for(b"u", "\u3000host\u00a0\n".encode()), ref(b"u", b"host"))
        self.assertEqual(tc._client_id_for(b"u", b"\x1fhost\x1f"), ref(b"u", b"\x1fhost\x1f"))
        # A hostname file that is not UTF-8 reads as nothing (read_to_string fails).
        self.assertEqual(tc._client_id_for(b"u", b"\xffhost"), ref(b"u", b""))
        real = tc._fnv1a64
        tc._fnv1a64 = lambda data: 0
        try:
            self.assertEqual(tc._client_id_for(b"", b""), 1, "never 0")
        finally:
            tc._fnv1a64 = real

    def test_the_cli_uses_the_same_id(self):
        with Server() as server, tempfile.TemporaryDirectory() as runtime:
            for user in ("alice", None):
                env = dict(os.environ, XDG_RUNTIME_DIR=runtime)
                env.pop("USER", None)
                if user is not None:
                    env["USER"] = user
                hello = subprocess.run(
                    [BIN, "client", "--server", "%s:%d" % server.addr, "hello"],
                    env=env, capture_output=True, text=True, timeout=30)
                self.assertEqual(hello.returncode, 0, hello.stderr)
                cli_id = int(re.search(r"^session (\d+)/", hello.stdout, re.M).group(1))
                with _User(user):
                    self.assertEqual(tc.default_client_id(), cli_id, user)

    def test_both_clients_use_it_by_default(self):
        with Server() as server:
            with tc.Client(server.addr) as c:
                self.assertEqual(c.client_id, tc.default_client_id())
                self.assertEqual(c.session[0], tc.default_client_id())

            async def main():
                async with tc.AsyncSession(server.addr) as s:
                    return s.session[0]

            self.assertEqual(asyncio.run(main()), tc.default_client_id())


class HandleTests(OneServerForTheClass):
    """``submit`` gives a handle in both clients, ``run`` the final state."""

    def test_blocking_handles(self):
        with tc.Client(self.server.addr, client_id=401) as c:
            task = c.submit("sleep", tc.u32(50))
            self.assertIsInstance(task, tc.Task)
            self.assertFalse(task.status().state in ("failed", "cancelled", "unknown"))
            done = task.result(timeout=5)
            self.assertEqual((done.task_id, done.state), (task.id, "done"))
            self.assertIs(task.result(), done, "a final state is kept")
            self.assertEqual(task.status(), done)
            # Ids work where handles do.
            self.assertEqual(c.wait(task.id), done)
            self.assertEqual(c.status(task), done)
            self.assertEqual(tc.parse_text(c.run("echo", tc.text("hé")).result), "hé")
            spun = c.run("spin", tc.u64(10_000))
            self.assertEqual((spun.state, len(spun.result)), ("done", 8))
            self.assertIsInstance(tc.parse_u64(spun.result), int)

            nap = c.submit("sleep", tc.u32(60_000))
            with self.assertRaises(TimeoutError):
                nap.result(timeout=0.3)
            self.assertFalse(nap.status().final, "giving up waiting leaves it running")
            self.assertEqual(nap.cancel(), "cancelled")
            self.assertEqual(nap.result(timeout=5), tc.TaskResult(nap.id, "cancelled", reason="cancelled"))
            self.assertEqual(nap.cancel(), "already_finished")
            self.assertEqual(c.cancel(nap.id), "already_finished")

    def test_a_blocking_run_cancels_the_task_it_gives_up_on(self):
        with tc.Client(self.server.addr, client_id=402) as c:
            with self.assertRaises(tc.Timeout):
                c.run("sleep", tc.u32(60_000), timeout=0.3)
            deadline = time.monotonic() + 5
            while not any(kind == "task_ended" for kind, _ in c.events):
                self.assertLess(time.monotonic(), deadline, "no final state pushed")
                time.sleep(0.01)
            final = next(e for kind, e in c.events if kind == "task_ended")
            self.assertEqual((final.state, final.reason), ("cancelled", "cancelled"))

    def test_async_handles(self):
        async def main():
            async with tc.AsyncSession(self.server.addr, client_id=403) as s:
                task = await s.submit("sleep", tc.u32(50))
                self.assertIsInstance(task, tc.AsyncTask)
                self.assertFalse((await task.status()).state in ("failed", "cancelled", "unknown"))
                done = await task
                self.assertEqual((done.task_id, done.state), (task.id, "done"))
                self.assertIs(await task, done, "a final state is kept")
                self.assertIs(await task.result(), done)
                self.assertEqual(await task.status(), done)
                # Ids work where handles do.
                task_id = await s.start("echo", b"by id")
                self.assertEqual((await s.wait(task_id)).result, b"by id")
                self.assertEqual(await s.status(task_id), tc.TaskResult(task_id, "done", result=b"by id"))
                self.assertEqual((await s.run("spin", tc.u64(10_000))).state, "done")

                nap = await s.submit("sleep", tc.u32(60_000))
                self.assertEqual(await nap.cancel(), "cancelled")
                self.assertEqual(await nap, tc.TaskResult(nap.id, "cancelled", reason="cancelled"))
                self.assertEqual(await s.cancel(nap), "already_finished")

        asyncio.run(main())

    def test_cancelling_the_coroutine_that_awaits_a_handle_cancels_the_task(self):
        async def main():
            async with tc.AsyncSession(self.server.addr, client_id=404) as s:
                nap = await s.submit("sleep", tc.u32(60_000))
                waiter = asyncio.ensure_future(nap)
                await asyncio.sleep(0.2)
                waiter.cancel()
                with self.assertRaises(asyncio.CancelledError):
                    await waiter
                timed = await s.submit("sleep", tc.u32(60_000))
                with self.assertRaises(asyncio.TimeoutError):
                    await asyncio.wait_for(timed, 0.3)
                # Awaited again, each gives its final state.
                return await asyncio.wait_for(asyncio.gather(nap.result(), timed.result()), 5)

        for final in asyncio.run(main()):
            self.assertEqual((final.state, final.reason), ("cancelled", "cancelled"))

    def test_connect_and_aclose(self):
        async def main():
            s = await tc.AsyncSession.connect(self.server.addr, client_id=405)
            try:
                self.assertEqual(s.server, self.server.addr)
                self.assertEqual((await s.run("echo", b"connected")).result, b"connected")
                nap = await s.submit("sleep", tc.u32(60_000))
            finally:
                await s.aclose()
            await s.aclose()  # again: nothing to do
            with self.assertRaises(tc.TetherError):
                await s.status(nap.id)
            # The BYE cancelled what was still running. A connected session
            # also works as a block (it is not opened twice).
            async with await tc.AsyncSession.connect(self.server.addr, client_id=405) as again:
                return await asyncio.wait_for(again.wait(nap.id), 5)

        final = asyncio.run(main())
        self.assertEqual((final.state, final.reason), ("cancelled", "left"))


class DocstringTests(unittest.TestCase):
    def test_every_public_name_has_a_docstring(self):
        missing = []
        for name, obj in vars(tc).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != tc.__name__:
                continue
            if not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if not obj.__doc__:
                missing.append(name)
            if not inspect.isclass(obj):
                continue
            for attr in dir(obj):
                if attr.startswith("_"):
                    continue
                owner = next(k for k in obj.__mro__ if attr in vars(k))
                if getattr(owner, "__module__", None) != tc.__name__:
                    continue  # inherited from the standard library
                member = vars(owner)[attr]
                if isinstance(member, (classmethod, staticmethod)):
                    member = member.__func__
                if (inspect.isfunction(member) or isinstance(member, property)) and not member.__doc__:
                    missing.append(f"{name}.{attr}")
        self.assertEqual(missing, [])


def _readme_python_blocks():
    """The ```python blocks of README.md's "## From Python" section."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    section = readme.split("\n## From Python\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^```python\n(.*?)^```$", section, re.S | re.M)


def _printed(block):
    """What a README example says it prints: the comment after each
    ``print(...)``."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s+#(.*)$", block, re.M)]


def _clean_env(**extra):
    """This environment without what would make a subprocess's Python or
    pip use anything but its own installation."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_USER", "PIP_REQUIRE_VIRTUALENV", "PIP_TARGET",
                        "PIP_PREFIX", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env.update(extra)
    return env


def _tail(text, lines=15):
    return "\n".join(text.strip().splitlines()[-lines:])


# Pinned, so a new release cannot fail the build: the newest that runs on
# Python 3.9, the oldest Python the package supports.
MYPY = "1.19.1"


class PackagingTests(unittest.TestCase):
    """The package as a user gets it: ``pip install ./tools/python`` in a
    fresh virtual environment, then README.md's examples; and
    ``mypy --strict``."""

    def test_pip_installs_the_package_and_the_readme_examples_run(self):
        blocks = _readme_python_blocks()
        self.assertGreaterEqual(len(blocks), 2, "README.md's From Python examples")
        self.assertIn("AsyncSession", blocks[0], "the first example is the asyncio one")
        with tempfile.TemporaryDirectory() as d:
            venv = os.path.join(d, "venv")
            made = subprocess.run([sys.executable, "-m", "venv", venv], env=_clean_env(),
                                  capture_output=True, text=True, timeout=300)
            if made.returncode != 0:
                self.skipTest(f"`{sys.executable} -m venv` does not work here (on Debian, "
                              f"python3-venv is missing?):\n{_tail(made.stderr + made.stdout)}")
            python = os.path.join(venv, "bin", "python")
            started = time.monotonic()
            installed = subprocess.run(
                [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--timeout", "30", "--retries", "2", os.path.join(REPO, "tools", "python")],
                cwd=d, env=_clean_env(), capture_output=True, text=True, timeout=600)
            self.assertEqual(installed.returncode, 0,
                             "pip install ./tools/python failed (it fetches flit_core from PyPI):\n"
                             + _tail(installed.stderr + installed.stdout))
            self.assertLess(time.monotonic() - started, 300)
            # The copy in the virtual environment is the one imported, with
            # its py.typed and the version pyproject.toml gives.
            where = subprocess.run(
                [python, "-c", "import importlib.metadata as m, os, tether_client as t; "
                 "d = os.path.dirname(t.__file__); "
                 "print(d, os.path.isfile(os.path.join(d, 'py.typed')), m.version('tether-client'))"],
                cwd=d, env=_clean_env(), capture_output=True, text=True, timeout=60)
            self.assertEqual(where.returncode, 0, where.stderr)
            package, typed, version = where.stdout.split()
            self.assertTrue(package.startswith(venv + os.sep), package)
            self.assertEqual((typed, version), ("True", tc.__version__))
            with Server() as server:
                for i, block in enumerate(blocks):
                    # The examples talk to the default port: this test's
                    # server is on another.
                    self.assertEqual(block.count('("127.0.0.1", 7900)'), 1, block)
                    source = block.replace('("127.0.0.1", 7900)', '("127.0.0.1", %d)' % server.addr[1])
                    path = os.path.join(d, f"example_{i}.py")
                    with open(path, "w", encoding="utf-8") as f:
                        f.write(source)
                    ran = subprocess.run([python, path], cwd=d, env=_clean_env(),
                                         capture_output=True, text=True, timeout=60)
                    self.assertEqual(ran.returncode, 0, f"example {i}:\n{ran.stderr}")
                    self.assertEqual(ran.stdout.splitlines(), _printed(block), f"example {i}")
                    self.assertTrue(_printed(block))

    def test_mypy_strict_passes(self):
        with tempfile.TemporaryDirectory() as d:
            target = os.path.join(d, "mypy")
            got = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--timeout", "30", "--retries", "2", "--target", target, f"mypy=={MYPY}"],
                env=_clean_env(), capture_output=True, text=True, timeout=600)
            if got.returncode != 0:
                self.skipTest(f"could not install mypy {MYPY} with pip (is PyPI reachable?):\n"
                              + _tail(got.stderr + got.stdout, 5))
            # The README's examples are checked with it: they show the API.
            examples = []
            for i, block in enumerate(_readme_python_blocks()):
                examples.append(os.path.join(d, f"readme_example_{i}.py"))
                with open(examples[-1], "w", encoding="utf-8") as f:
                    f.write(block)
            checked = subprocess.run(
                [sys.executable, "-m", "mypy", "--strict", "--python-version", "3.9",
                 "--cache-dir", os.path.join(d, "cache"), "tether_client", *examples],
                cwd=HERE, env=_clean_env(PYTHONPATH=target, MYPYPATH=HERE),
                capture_output=True, text=True, timeout=600)
            self.assertEqual(checked.returncode, 0, checked.stdout + checked.stderr)
            self.assertIn("Success", checked.stdout)


if __name__ == "__main__":
    unittest.main()
