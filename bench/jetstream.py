#!/usr/bin/env python3
"""Streaming from NATS JetStream: throughput and latency into Parquet and PostgreSQL.

In one run, against one private nats-server (JetStream, its store in a temporary
directory, started here on a free port):

1. the ceiling: a bare JetStream consumer (`etlmesh subscribe --nats`: a durable pull
   consumer with explicit acks that only counts and acknowledges) while
   `etlmesh simulate --nats` publishes N readings as fast as JetStream acknowledges them;
2. the same N readings through `etlmesh worker` streams (`source: { type: nats }`), with
   1 and 2 workers, into rolling Parquet files and into PostgreSQL (binary COPY):
   messages per second from the first publish to the last acknowledgement (a message
   is acknowledged only after every sink committed it), and the ratio to the ceiling
   (goal: 80 %);
3. latency at half the 1-worker PostgreSQL rate: publish time (the readings' event
   time, no jitter) to the row's commit (`clock_timestamp()` default column), p50 and
   p99 (goal: p99 under 500 ms).

    cargo build --release && python3 bench/jetstream.py [--messages 200000]

Needs nats-server, nats-py (`pip install nats-py`, to make the streams) and PostgreSQL
(127.0.0.1:5432, trust auth, database `test`).
"""

import argparse
import asyncio
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("ETLMESH_BIN", ROOT / "target" / "release" / "etlmesh")).resolve()
PG = "postgres://postgres@127.0.0.1:5432/test"

PIPELINE = """
pipelines:
  bench:
    source:
      type: nats
      url: {url}
      stream: {stream}
      subject: {prefix}.*.reading
      create: true                # the consumer (the script makes the stream)
      batch: {{ records: 5000, wait: 200ms }}
    schema:
      device_id: {{ type: utf8, nullable: false }}
      seq: {{ type: int64, nullable: false }}
      ts: {{ type: timestamp_ms, nullable: false }}
      temperature_c: float64
      humidity: float64
      battery_v: float64
      status: utf8
    transform: |
      SELECT device_id, seq, ts, temperature_c, temperature_c * 9 / 5 + 32 AS temperature_f,
             humidity, battery_v, status
      FROM input WHERE temperature_c BETWEEN -50 AND 150
    sinks:
      - {sink}
    dead_letter: {{ type: ndjson, path: out/dead }}
"""

PARQUET = "{ type: parquet, path: out/rows, roll_interval: 1s }"
POSTGRES = '{{ type: postgres, url: "{pg}", table: {table}, create: {create} }}'


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def psql(sql):
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qAt", "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


class Server:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="etlmesh-bench-nats-")
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            ["nats-server", "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        sys.exit("nats-server did not start")

    def stream(self, name, prefix):
        import nats
        from nats.js.api import StreamConfig

        async def make():
            nc = await nats.connect(self.url)
            await nc.jetstream().add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"]))
            await nc.close()

        asyncio.run(make())

    def stop(self):
        self.proc.terminate()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def simulate(url, prefix, count, rate, extra=()):
    return subprocess.run(
        [str(BIN), "simulate", "--nats", url,
         "--topic", f"{prefix}.{{device_id}}.reading", "--count", str(count),
         "--rate", str(rate), "--devices", "100", "--late", "0",
         "--malformed", "0", "--out-of-order", "0", *extra],
        check=True, capture_output=True, text=True,
    ).stderr


class Worker:
    def __init__(self, dirname, wid, env=None):
        self.lines = []
        self.proc = subprocess.Popen(
            [str(BIN), "worker", "-c", "s.yaml", "--listen", "127.0.0.1:0", "--id", wid],
            cwd=dirname, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "ETLMESH_LOG_FORMAT": "text", "NO_COLOR": "1", **(env or {})},
        )
        self.metrics = None
        deadline = time.time() + 30
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            m = re.search(r"worker listening on (http://\S+)", line)
            if m:
                self.metrics = m.group(1) + "/metrics"
            if "stream started" in line:
                return
        sys.exit("worker did not start:\n" + "".join(self.lines))

    def acked(self):
        import urllib.request
        text = urllib.request.urlopen(self.metrics, timeout=2).read().decode()
        m = re.search(r'etlmesh_stream_messages_total\{pipeline="bench",outcome="acknowledged"\} (\d+)', text)
        return int(m.group(1)) if m else 0

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ceiling(server, n):
    prefix, stream = "bench-bare", "BENCH_BARE"
    server.stream(stream, prefix)
    sub = subprocess.Popen(
        [str(BIN), "subscribe", "--nats", server.url, "--stream", stream,
         "--topic", f"{prefix}.*.reading", "--count", str(n), "--idle", "30s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    for _ in range(50):
        line = sub.stderr.readline()
        if "subscribed" in line or not line:
            break
    assert "subscribed" in line, line
    t0 = time.time()
    pub = simulate(server.url, prefix, n, 1e9)
    sub.wait()
    elapsed = time.time() - t0
    return n / elapsed, pub


def through_workers(server, n, workers, sink, case):
    d = tempfile.mkdtemp(prefix=f"etlmesh-bench-{case}-")
    prefix, stream = f"bench-{case}", f"BENCH_{case.upper().replace('-', '_')}"
    server.stream(stream, prefix)
    Path(d, "s.yaml").write_text(
        PIPELINE.format(url=server.url, stream=stream, prefix=prefix, sink=sink))
    ws = [Worker(d, f"w{i}") for i in range(workers)]
    t0 = time.time()
    simulate(server.url, prefix, n, 1e9)
    while sum(w.acked() for w in ws) < n:
        if time.time() - t0 > 600:
            sys.exit(f"{case}: not every message was acknowledged within 600 s")
        time.sleep(0.02)
    elapsed = time.time() - t0
    for w in ws:
        w.stop()
    shutil.rmtree(d, ignore_errors=True)
    return n / elapsed


def latency(server, rate, seconds):
    table = "bench_nats_latency"
    psql(f"DROP TABLE IF EXISTS {table}")
    psql(f"CREATE TABLE {table} (device_id text, seq bigint, ts timestamptz, temperature_c float8, "
         "temperature_f float8, humidity float8, battery_v float8, status text, "
         "loaded_at timestamptz DEFAULT clock_timestamp())")
    d = tempfile.mkdtemp(prefix="etlmesh-bench-nats-latency-")
    sink = POSTGRES.format(pg=PG, table=table, create="false")
    server.stream("BENCH_LAT", "bench-lat")
    Path(d, "s.yaml").write_text(
        PIPELINE.format(url=server.url, stream="BENCH_LAT", prefix="bench-lat", sink=sink))
    w = Worker(d, "w0")
    n = int(rate * seconds)
    simulate(server.url, "bench-lat", n, rate, ["--jitter", "0ms"])
    deadline = time.time() + 60
    while w.acked() < n and time.time() < deadline:
        time.sleep(0.05)
    w.stop()
    row = psql(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), "
        f"max(ms), count(*) FROM (SELECT extract(epoch FROM loaded_at - ts) * 1000 AS ms FROM {table}) t"
    )
    psql(f"DROP TABLE IF EXISTS {table}")
    p50, p99, mx, count = row.split("|")
    return float(p50), float(p99), float(mx), int(count)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200_000)
    ap.add_argument("--latency-seconds", type=int, default=15)
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit(f"{BIN} missing: cargo build --release")
    version = subprocess.run(["nats-server", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{version}; {os.cpu_count()} cores, {platform.processor() or platform.machine()}; {BIN}")
    server = Server()
    try:
        n = args.messages
        bare, pub = ceiling(server, n)
        published = [l for l in pub.splitlines() if l.startswith("published")]
        print(f"publisher: {published[-1] if published else pub.strip()[-200:]}")
        print(f"ceiling (bare JetStream consumer, explicit acks): {bare:,.0f} msg/s\n")
        rows = []
        for sink_name in ("parquet", "postgres"):
            for workers in (1, 2):
                case = f"{sink_name}-{workers}"
                if sink_name == "postgres":
                    table = f"bench_nats_{workers}w"
                    psql(f"DROP TABLE IF EXISTS {table}")
                    sink = POSTGRES.format(pg=PG, table=table, create="true")
                else:
                    sink = PARQUET
                rate = through_workers(server, n, workers, sink, case)
                if sink_name == "postgres":
                    loaded = int(psql(f"SELECT count(*) FROM {table}"))
                    psql(f"DROP TABLE IF EXISTS {table}")
                    case += f" ({loaded:,} rows)"
                rows.append((case, rate))
        print(f"{'case':<28} {'msg/s':>10} {'of ceiling':>11}")
        for case, rate in rows:
            print(f"{case:<28} {rate:>10,.0f} {rate / bare:>10.0%}")
        pg1 = next(r for c, r in rows if c.startswith("postgres-1"))
        half = pg1 / 2
        p50, p99, mx, count = latency(server, half, args.latency_seconds)
        print(f"\nlatency at {half:,.0f} msg/s (half the 1-worker PostgreSQL rate), {count:,} rows: "
              f"publish → committed row p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {mx:.0f} ms (goal p99 < 500 ms)")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
