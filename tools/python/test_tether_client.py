"""Tests of the Python client against the real `tether` binary over loopback.

Run by `cargo test` (tests/python.rs sets TETHER_BIN), or by hand:

    TETHER_BIN=target/debug/tether python3 -m unittest discover -s tools/python -v
"""

import asyncio
import os
import random
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
BIN = os.environ.get("TETHER_BIN") or os.path.join(HERE, "..", "..", "target", "debug", "tether")


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
        """(kind, client_id, incarnation, seq, peer) of the next datagram."""
        data, peer = self.sock.recvfrom(2048)
        _, _, kind, _, _, _, client_id, incarnation, seq = tc.HEADER.unpack_from(data)
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
            self.assertEqual(submit(), 42, "the receiver still files replies")
            self.assertGreaterEqual(c.dropped, 1)
        finally:
            c.close()

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
            for task_id in range(1, 3001):
                self.fake.reply(hello, tc.TASK_STATE, struct.pack(">QB", task_id, 3))
            # Some of the 3,000 may be dropped by the kernel on the way (the
            # client's receive buffer); far more than the bound arrive, and
            # the bound holds, the oldest going first.
            deadline = time.monotonic() + 10
            while len(c.events) < tc.MAX_EVENTS:
                self.assertLess(time.monotonic(), deadline, f"{len(c.events)} events")
                time.sleep(0.01)
            time.sleep(0.2)
            self.assertEqual(len(c.events), tc.MAX_EVENTS)
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
                                             struct.pack(">QB", task_id, 3)))
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
                self.assertEqual((await s.submit("echo", b"before")).result, b"before")
                with self.restart(first):
                    restarted = time.monotonic()
                    while s.session == old or not s._live:
                        self.assertLess(time.monotonic() - restarted, 1.0, "not back within one TTL")
                        await asyncio.sleep(0.01)
                    self.assertGreater(s.session[1], old[1])
                    return (await s.submit("echo", b"after")).result

        self.assertEqual(asyncio.run(main()), b"after")


class BlockingClientTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

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
            self.assertEqual(c.wait(task), tc.TaskResult(task, "cancelled", reason="cancelled"))
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
                while task not in c.finals:
                    self.assertLess(time.monotonic(), deadline, "no expiry pushed")
                    c._lock.wait(0.05)
            self.assertEqual(c.finals[task].reason, "expired")
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
                        return await s.submit("echo", b"async signed")

                self.assertEqual(asyncio.run(signed()).result, b"async signed")
                with self.assertRaises(tc.TimeoutError_):
                    tc.Client(keyed.addr, client_id=105, key=b"t" * 32, tries=2, retry_after=0.1)


class AsyncSessionTests(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()

    @classmethod
    def tearDownClass(cls):
        cls.server.__exit__(None, None, None)

    def test_run_returns_final_state(self):
        async def main():
            async with tc.AsyncSession(self.server.addr, client_id=201) as s:
                done = await s.submit("echo", b"async")
                failed = await s.submit("fail", b"bad")
                return done, failed

        done, failed = asyncio.run(main())
        self.assertEqual((done.state, done.result), ("done", b"async"))
        self.assertEqual((failed.state, failed.error), ("failed", "bad"))

    def test_cancelling_the_coroutine_cancels_the_task(self):
        async def main():
            async with tc.AsyncSession(self.server.addr, client_id=202) as s:
                job = asyncio.ensure_future(s.submit("sleep", struct.pack(">I", 60_000)))
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
                    await asyncio.wait_for(s.submit("sleep", struct.pack(">I", 60_000)), 0.3)
                task_id = await s.start("sleep", struct.pack(">I", 60_000))
                s.paused = True
                return await asyncio.wait_for(s.wait(task_id), 5)

        final = asyncio.run(main())
        self.assertEqual((final.state, final.reason), ("cancelled", "expired"))


if __name__ == "__main__":
    unittest.main()
