#!/usr/bin/env python3
"""Elastic scaling under `etlmesh up` with the process scaler:

1. cold start: a pipeline at zero workers, one request, time to its answer
   (p50 and max over --tries; goal under 100 ms);
2. reaction: 1 client, then a step to 32 clients; time from the step to the first new
   worker ready (p50 and max over --steps; goal under 1 s);
3. a ramp of clients up and down: replicas (ready and desired), throughput and p99
   latency every half second, as a table and as an SVG plot (bench/out/scale.svg).

Workers add 100 ms to each request (--inject-latency) so that in-flight load is real
and the figures do not depend on the transform's speed.

    cargo build --release && python3 bench/scale.py [--tries 20] [--steps 5] [--stage 5]
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("ETLMESH_BIN", ROOT / "target" / "release" / "etlmesh")).resolve()
OUT = ROOT / "bench" / "out"

PIPELINE = """
platform: {{ threads: 1, batch_size: 8192 }}
pipelines:
  clean:
    scaling: {scaling}
    schema:
      device_id: {{ type: utf8, nullable: false }}
      ts: {{ type: timestamp_ms, nullable: false }}
      temperature_c: float64
      status: utf8
    transform: |
      SELECT device_id, ts, temperature_c * 9 / 5 + 32 AS temperature_f
      FROM input WHERE status <> 'err'
    sinks: [ {{ type: stdout, format: ndjson }} ]
"""

BODY = "".join(
    f"d{i % 50},{1700000000000 + i},{20 + i % 7}.5,ok\n" for i in range(100)
).encode()
BODY = b"device_id,ts,temperature_c,status\n" + BODY


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Up:
    """`etlmesh up` with one pipeline and a scaling policy."""

    def __init__(self, scaling, worker_args=()):
        self.dir = tempfile.TemporaryDirectory()
        Path(self.dir.name, "p.yaml").write_text(PIPELINE.format(scaling=scaling))
        self.http, self.admin = free_port(), free_port()
        argv = [BIN, "up", "-c", "p.yaml", "--http", f"127.0.0.1:{self.http}",
                "--admin", f"127.0.0.1:{self.admin}", "--flight", "off"]
        argv += [f"--worker-arg={a}" for a in worker_args]
        env = dict(os.environ, ETLMESH_LOG_FORMAT="json", RUST_LOG="warn")
        self.proc = subprocess.Popen(argv, cwd=self.dir.name, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                self.get("/api/v1/scaling")
                return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("etlmesh up did not start")

    def get(self, path):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}", timeout=5) as r:
            return json.load(r)

    def workers(self):
        ws = self.get("/api/v1/workers")
        return len(ws), sum(1 for w in ws if w["state"] == "ready")

    def desired(self):
        pools = self.get("/api/v1/scaling")["pools"]
        return pools[0]["desired"] if pools else 0

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.dir.cleanup()


def post(conn):
    conn.request("POST", "/v1/pipelines/clean", BODY,
                 {"Content-Type": "text/csv", "Accept": "application/x-ndjson"})
    r = conn.getresponse()
    r.read()
    return r.status


class Load:
    """Closed-loop clients; the number can change while running."""

    def __init__(self, port):
        self.port, self.wanted, self.threads = port, 0, []
        self.samples = []  # (finished at, latency s, status)
        self.lock = threading.Lock()
        self.stopped = False

    def set(self, n):
        self.wanted = n
        while len(self.threads) < n:
            i = len(self.threads)
            t = threading.Thread(target=self.client, args=(i,), daemon=True)
            self.threads.append(t)
            t.start()

    def client(self, i):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        while not self.stopped:
            if i >= self.wanted:
                time.sleep(0.02)
                continue
            t0 = time.perf_counter()
            try:
                status = post(conn)
            except (OSError, http.client.HTTPException):
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
                status = 0
            with self.lock:
                self.samples.append((time.perf_counter(), time.perf_counter() - t0, status))

    def stop(self):
        self.stopped = True
        for t in self.threads:
            t.join(35)


def pct(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def cold_start(tries):
    up = Up("{ min_replicas: 0, max_replicas: 2, scale_down_window: 1s, idle_before_zero: 1s }")
    times = []
    try:
        for _ in range(tries):
            while up.workers()[0] != 0:
                time.sleep(0.05)
            conn = http.client.HTTPConnection("127.0.0.1", up.http, timeout=30)
            t0 = time.perf_counter()
            status = post(conn)
            times.append((time.perf_counter() - t0) * 1000)
            conn.close()
            if status != 200:
                raise SystemExit(f"cold start answered {status}")
    finally:
        up.stop()
    return times


def reaction(steps):
    up = Up("{ min_replicas: 1, max_replicas: 8, target_in_flight: 4, scale_down_window: 3s }",
            ["--inject-latency=100ms"])
    out = []
    try:
        for _ in range(steps):
            while up.workers() != (1, 1):
                time.sleep(0.1)
            load = Load(up.http)
            load.set(1)
            time.sleep(1.5)
            t0 = time.perf_counter()
            load.set(32)
            while up.workers()[1] < 2:
                time.sleep(0.01)
            out.append((time.perf_counter() - t0) * 1000)
            load.stop()
    finally:
        up.stop()
    return out


def ramp(stage):
    up = Up("{ min_replicas: 1, max_replicas: 8, target_in_flight: 8, scale_down_window: 10s }",
            ["--inject-latency=100ms"])
    plan = [1, 8, 16, 32, 64, 64, 32, 16, 8, 1, 0, 0, 0]
    rows = []
    load = Load(up.http)
    try:
        start = time.perf_counter()
        for clients in plan:
            load.set(clients)
            end = time.perf_counter() + stage
            while time.perf_counter() < end:
                t = time.perf_counter()
                time.sleep(0.5)
                with load.lock:
                    recent = [s for s in load.samples if s[0] >= t]
                lat = [s[1] * 1000 for s in recent]
                errors = sum(1 for s in recent if s[2] != 200)
                _, ready = up.workers()
                rows.append((time.perf_counter() - start, clients, ready, up.desired(),
                             len(recent) / 0.5, pct(lat, 50), pct(lat, 99), errors))
    finally:
        load.stop()
        up.stop()
    failed = sum(1 for s in load.samples if s[2] != 200)
    return rows, len(load.samples), failed


def svg(rows, path):
    w, h, pad = 900, 420, 50
    tmax = max(r[0] for r in rows) or 1
    rmax = max(max(r[2], r[3], 1) for r in rows)
    lmax = max(max(r[6] for r in rows), 1)
    cmax = max(max(r[1] for r in rows), 1)

    def x(t):
        return pad + (w - 2 * pad) * t / tmax

    legend = []

    def line(values, vmax, colour, label, dash=""):
        pts = " ".join(f"{x(t):.1f},{h - pad - (h - 2 * pad) * v / vmax:.1f}" for t, v in values)
        y = pad + 14 * len(legend)
        legend.append(f'<line x1="{w - 210}" y1="{y - 4}" x2="{w - 185}" y2="{y - 4}" stroke="{colour}" '
                      f'stroke-width="2" {dash}/><text x="{w - 180}" y="{y}" font-size="11">{label}</text>')
        return f'<polyline fill="none" stroke="{colour}" stroke-width="2" {dash} points="{pts}"/>'

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{pad}" y="24" font-size="15">etlmesh up: replicas and p99 latency over a load ramp</text>',
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>',
        f'<text x="{w / 2}" y="{h - 12}" font-size="12">seconds</text>',
    ]
    for t in range(0, int(tmax) + 1, 10):
        parts.append(f'<text x="{x(t):.0f}" y="{h - pad + 14}" font-size="10">{t}</text>')
    parts.append(line([(r[0], r[1]) for r in rows], cmax, "#bbb", f"clients (max {cmax})",
                      'stroke-dasharray="4 3"'))
    parts.append(line([(r[0], r[3]) for r in rows], rmax, "#f39c12", f"desired replicas (max {rmax})",
                      'stroke-dasharray="2 2"'))
    parts.append(line([(r[0], r[2]) for r in rows], rmax, "#2c7be5", "ready replicas"))
    # p99 only where requests completed.
    parts.append(line([(r[0], r[6]) for r in rows if r[4] > 0], lmax, "#e55353", f"p99 ms (max {lmax:.0f})"))
    parts.extend(legend)
    parts.append("</svg>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tries", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--stage", type=float, default=5.0, help="seconds per ramp stage")
    a = ap.parse_args()
    if not BIN.exists():
        sys.exit(f"{BIN} not found: run `cargo build --release` (or set ETLMESH_BIN)")

    cs = cold_start(a.tries)
    print(f"cold start from zero to the first answer, {len(cs)} tries: "
          f"p50 {statistics.median(cs):.1f} ms, max {max(cs):.1f} ms (goal < 100 ms)")
    rt = reaction(a.steps)
    print(f"reaction from a 1 → 32 client step to the first new worker ready, {len(rt)} steps: "
          f"p50 {statistics.median(rt):.0f} ms, max {max(rt):.0f} ms (goal < 1000 ms)")
    rows, total, failed = ramp(a.stage)
    print(f"\nramp ({a.stage:.0f} s per stage, 100 ms per request): {total} requests, {failed} failed")
    print(f"{'t s':>6} {'clients':>7} {'ready':>5} {'desired':>7} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6}")
    for r in rows[1::2]:
        print(f"{r[0]:6.1f} {r[1]:7d} {r[2]:5d} {r[3]:7d} {r[4]:7.0f} {r[5]:7.1f} {r[6]:7.1f} {r[7]:6d}")
    path = OUT / "scale.svg"
    svg(rows, path)
    print(f"\nplot: {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
