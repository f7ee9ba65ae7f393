"""Tests of the Python client against the real `tether` binary over loopback.

Run by `cargo test` (tests/python.rs sets TETHER_BIN), or by hand:

    TETHER_BIN=target/debug/tether python3 -m unittest discover -s tools/python -v
"""

import asyncio
import os
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
    """`tether serve` on a free loopback port; stopped on exit."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", *args],
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

    def test_replay_window(self):
        w = tc.ReplayWindow(10)
        self.assertTrue(w.accept(12))
        self.assertTrue(w.accept(11))
        self.assertFalse(w.accept(11))
        self.assertTrue(w.accept(200))
        self.assertFalse(w.accept(136))
        self.assertTrue(w.accept(137))


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
