"""What an operator's tools read from a running `tether serve`, checked with
tools nobody here wrote: the Prometheus Python client's OpenMetrics parser
for /metrics, and the Grafana dashboard's queries against the series
actually served.

Run by tests/python.rs (which provides prometheus_client and TETHER_BIN).
"""

import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest
import urllib.error
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
BIN = os.environ["TETHER_BIN"]
# What Prometheus 2.x/3.x sends when it scrapes.
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
                     "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


class Server:
    def __init__(self, *extra):
        self.proc = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        lines = []
        reader = threading.Thread(
            target=lambda: lines.extend([self.proc.stdout.readline(), self.proc.stdout.readline()]),
            daemon=True)
        reader.start()
        reader.join(30)
        if len(lines) != 2 or not lines[1].startswith("metrics on http://"):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {lines!r}")
        host, port = lines[0].split()[-1].rsplit(":", 1)
        self.udp = (host, int(port))
        self.http = lines[1].split()[-1].rsplit("/", 1)[0]

    def close(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


def get(url, method="GET", accept=None):
    request = urllib.request.Request(url, method=method)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


class OperatorEndpoints(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.server = Server()
        # One HELLO (PROTOCOL.md: magic, version, kind 1, flags, reserved,
        # body_len, client_id, incarnation, seq; body ttl_ms and an empty
        # name), so one session is live.
        hello = struct.pack(">2sBBBBHQQIIB", b"TH", 1, 1, 0, 0, 5, 77, 1, 1, 60_000, 0)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(5)
            s.sendto(hello, cls.server.udp)
            s.recv(1500)

    @classmethod
    def tearDownClass(cls):
        cls.server.close()

    def scrape(self):
        status, headers, body = get(self.server.http + "/metrics", accept=PROMETHEUS_ACCEPT)
        self.assertEqual(status, 200, body)
        return headers, body

    def test_metrics_are_openmetrics_by_content_type_and_by_an_independent_parser(self):
        # The loop publishes its counters every 50 ms: wait (bounded) for
        # the session to show.
        deadline = time.monotonic() + 5
        while True:
            headers, body = self.scrape()
            if "tether_sessions_live 1" in body or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        self.assertEqual(headers["Content-Type"],
                         "application/openmetrics-text; version=1.0.0; charset=utf-8")
        # The parser raises on anything that is not valid OpenMetrics.
        families = {f.name: f for f in text_string_to_metric_families(body)}
        self.assertEqual(families["tether_sessions_live"].type, "gauge")
        self.assertEqual(families["tether_sessions_live"].samples[0].value, 1.0)
        self.assertEqual(families["tether_heartbeats"].type, "counter")
        self.assertEqual(families["tether_expiry_lateness_seconds"].type, "histogram")
        self.assertEqual(families["tether_expiry_lateness_seconds"].unit, "seconds")
        build = families["tether_build"]
        self.assertEqual(build.type, "info")
        self.assertRegex(build.samples[0].labels["version"], r"^\d+\.\d+\.\d+")
        self.assertEqual(families["process_cpu_seconds"].type, "counter")
        self.assertGreaterEqual(families["process_cpu_seconds"].samples[0].value, 0)
        for name in ["process_resident_memory_bytes", "process_open_fds", "process_max_fds",
                     "process_start_time_seconds"]:
            self.assertEqual(families[name].type, "gauge", name)
            self.assertGreater(families[name].samples[0].value, 0, name)
        started = families["process_start_time_seconds"].samples[0].value
        self.assertLess(abs(started - time.time()), 3600, "start time is in Unix seconds")

    def test_a_client_that_refuses_openmetrics_is_told_so(self):
        status, _, body = get(self.server.http + "/metrics", accept="text/plain;version=0.0.4")
        self.assertEqual(status, 406)
        self.assertIn("application/openmetrics-text", body)

    def test_healthz_answers_while_the_idle_loop_answers_its_wakeup(self):
        status, headers, body = get(self.server.http + "/healthz")
        self.assertEqual((status, body), (200, "ok\n"))
        self.assertTrue(headers["Content-Type"].startswith("text/plain"))

    def test_only_get_on_known_paths_answers_200(self):
        self.assertEqual(get(self.server.http + "/metrics", method="POST")[0], 405)
        self.assertEqual(get(self.server.http + "/healthz", method="DELETE")[0], 405)
        self.assertEqual(get(self.server.http + "/metrics", method="HEAD")[0], 405)
        self.assertEqual(get(self.server.http + "/")[0], 404)
        self.assertEqual(get(self.server.http + "/metrics/x")[0], 404)
        self.assertEqual(get(self.server.http + "/metrics?debug=1")[0], 200)

    def test_every_series_the_grafana_dashboard_queries_is_served(self):
        _, body = self.scrape()
        served = {s.name for f in text_string_to_metric_families(body) for s in f.samples}
        with open(os.path.join(ROOT, "deploy", "grafana", "tether.json")) as f:
            dashboard = json.load(f)
        def panels(items):
            for panel in items:
                yield panel
                yield from panels(panel.get("panels", []))  # inside rows
        exprs = [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]
        exprs += [v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
                  for v in dashboard.get("templating", {}).get("list", [])
                  if v.get("type") == "query"]
        self.assertGreater(len(exprs), 10)
        queried = {name for e in exprs
                   for name in re.findall(r"\b(?:tether|process)_[a-zA-Z0-9_]+", e)}
        self.assertIn("tether_sessions_live", queried)
        self.assertEqual(sorted(queried - served), [], "queried by the dashboard, not served")


class ShardedEndpoints(unittest.TestCase):
    def test_a_sharded_server_serves_valid_openmetrics_with_a_shard_label(self):
        server = Server("--shards", "2")
        try:
            status, headers, body = get(server.http + "/metrics", accept=PROMETHEUS_ACCEPT)
            self.assertEqual(status, 200, body)
            # One family each (the parser refuses a family split in two),
            # a sample per shard.
            families = {f.name: f for f in text_string_to_metric_families(body)}
            live = families["tether_sessions_live"].samples
            self.assertEqual(sorted(s.labels["shard"] for s in live), ["0", "1"])
            lateness = families["tether_expiry_lateness_seconds"].samples
            self.assertEqual({s.labels["shard"] for s in lateness}, {"0", "1"})
            self.assertEqual(len(families["tether_build"].samples), 1)
            self.assertEqual(get(server.http + "/healthz")[:1], (200,))
        finally:
            server.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
