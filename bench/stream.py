#!/usr/bin/env python3
"""Streaming throughput and latency, from an MQTT broker into Parquet and PostgreSQL.

In one run, against one private Mosquitto (started here on a free port, with no
limit on queued messages so that a backlog is held rather than dropped):

1. the ceiling: a bare subscriber (`etlmesh subscribe`, MQTT 5, QoS 1) that only
   counts, while `etlmesh simulate` publishes N QoS 1 messages as fast as it can;
2. the same N messages through `etlmesh worker` streams, with 1 and 2 workers, into
   rolling Parquet files and into PostgreSQL (binary COPY): messages per second from
   the first publish to the last acknowledgement (a message is acknowledged only after
   every sink committed it), and the ratio to the ceiling (goal: 80 %) — then the rows
   loaded are counted where they landed (the Parquet files, read back with DuckDB; the
   PostgreSQL table), distinct by (device, seq): every message must be a row, unless
   the workers' own counters say the SQL filtered it or it was dead-lettered; a
   message missing fails the run, a duplicate is counted;
3. latency at half the 1-worker PostgreSQL rate: publish time (the readings' event
   time, no jitter) to when the row is *seen committed* — a poller in another session
   stamps rows as they become visible (every 20 ms), which happens only after the
   transaction commits; an insert-time default would be earlier than the commit —
   p50 and p99 (goal: p99 under 500 ms).

    pip install duckdb && cargo build --release && python3 bench/stream.py [--messages 200000]

Needs mosquitto and PostgreSQL (127.0.0.1:5432, trust auth, database `test`).
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from machine import machine, version

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("ETLMESH_BIN", ROOT / "target" / "release" / "etlmesh")).resolve()
PG = "postgres://postgres@127.0.0.1:5432/test"

PIPELINE = """
pipelines:
  bench:
    source:
      type: mqtt
      broker: mqtt://127.0.0.1:{port}
      topic: {prefix}/+/reading
      batch: {{ records: 5000, wait: 200ms }}
      broker_keeps_queued: true   # this Mosquitto runs with max_queued_messages 0
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


class Broker:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="etlmesh-bench-mqtt-")
        self.port = free_port()
        conf = Path(self.dir) / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "max_queued_messages 0\nmax_inflight_messages 0\npersistence false\n"
        )
        self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(50):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        sys.exit("mosquitto did not start")

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def simulate(port, prefix, count, rate, extra=()):
    return subprocess.run(
        [str(BIN), "simulate", "--broker", f"mqtt://127.0.0.1:{port}",
         "--topic", f"{prefix}/{{device_id}}/reading", "--count", str(count),
         "--rate", str(rate), "--devices", "100", "--qos", "1", "--late", "0",
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

    def counter(self, family, outcome):
        import urllib.request
        text = urllib.request.urlopen(self.metrics, timeout=2).read().decode()
        m = re.search(rf'etlmesh_{family}_total\{{pipeline="bench",outcome="{outcome}"\}} (\d+)', text)
        return int(m.group(1)) if m else 0

    def acked(self):
        return self.counter("stream_messages", "acknowledged")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def ceiling(broker, n):
    prefix = "bench-bare"
    sub = subprocess.Popen(
        [str(BIN), "subscribe", "--broker", f"mqtt://127.0.0.1:{broker.port}",
         "--topic", f"{prefix}/+/reading", "--count", str(n), "--idle", "30s"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert "subscribed" in sub.stderr.readline()
    t0 = time.time()
    pub = simulate(broker.port, prefix, n, 1e9)
    sub.wait()
    elapsed = time.time() - t0
    return n / elapsed, pub


def through_workers(broker, n, workers, sink, case, env=None):
    d = tempfile.mkdtemp(prefix=f"etlmesh-bench-{case}-")
    prefix = f"bench-{case}"
    Path(d, "s.yaml").write_text(PIPELINE.format(port=broker.port, prefix=prefix, sink=sink))
    ws = [Worker(d, f"w{i}", env) for i in range(workers)]
    t0 = time.time()
    simulate(broker.port, prefix, n, 1e9)
    while sum(w.acked() for w in ws) < n:
        if time.time() - t0 > 600:
            sys.exit(f"{case}: not every message was acknowledged within 600 s")
        time.sleep(0.02)
    elapsed = time.time() - t0
    # Rows the SQL filtered out or records dead-lettered are not rows, by design.
    not_rows = sum(w.counter("stream_records", o) for w in ws for o in ("filtered", "dead_lettered"))
    for w in ws:
        w.stop()
    return n / elapsed, Path(d), not_rows


def parquet_rows(d):
    import duckdb
    files = list((d / "out" / "rows").rglob("*.parquet"))
    if not files:
        return 0, 0
    q = (f"SELECT count(*), count(DISTINCT (device_id, seq)) FROM read_parquet({[str(f) for f in files]!r})")
    return duckdb.sql(q).fetchall()[0]


def table_rows(table):
    total, distinct = psql(f"SELECT count(*), count(DISTINCT (device_id, seq)) FROM {table}").split("|")
    return int(total), int(distinct)


LOST = []


def checked(case, n, rows, not_rows):
    total, distinct = rows
    missing = n - not_rows - distinct
    if missing > 0:
        LOST.append(f"{case}: {missing:,} messages are neither rows nor filtered nor dead-lettered")
    return f"{distinct:,} rows" + (f", {total - distinct:,} duplicates" if total > distinct else "") + \
        (f", {not_rows:,} filtered or dead" if not_rows else "")


def latency(broker, rate, seconds):
    table = "bench_latency"
    psql(f"DROP TABLE IF EXISTS {table}")
    psql(f"CREATE TABLE {table} (device_id text, seq bigint, ts timestamptz, temperature_c float8, "
         "temperature_f float8, humidity float8, battery_v float8, status text, "
         "seen_at timestamptz)")
    d = tempfile.mkdtemp(prefix="etlmesh-bench-latency-")
    sink = POSTGRES.format(pg=PG, table=table, create="false")
    Path(d, "s.yaml").write_text(PIPELINE.format(port=broker.port, prefix="bench-lat", sink=sink))
    w = Worker(d, "w0")
    n = int(rate * seconds)
    # Rows are visible to another session only once their transaction committed: this
    # poller stamps them then (within its 20 ms period).
    poller = subprocess.Popen(
        ["psql", PG, "-q", "-v", "ON_ERROR_STOP=1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, text=True,
    )
    poll_sql = (f"UPDATE {table} SET seen_at = clock_timestamp() WHERE seen_at IS NULL;\n"
                "SELECT pg_sleep(0.02);\n")

    def feed():
        try:
            for _ in range(int((seconds + 70) / 0.02)):
                poller.stdin.write(poll_sql)
                poller.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass  # the poller was stopped

    threading.Thread(target=feed, daemon=True).start()
    simulate(broker.port, "bench-lat", n, rate, ["--jitter", "0ms"])
    deadline = time.time() + 60
    while w.acked() < n and time.time() < deadline:
        time.sleep(0.05)
    w.stop()
    time.sleep(0.2)
    poller.kill()
    poller.wait()
    row = psql(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms), percentile_cont(0.99) WITHIN GROUP (ORDER BY ms), "
        f"max(ms), count(*) FROM (SELECT extract(epoch FROM seen_at - ts) * 1000 AS ms FROM {table} "
        "WHERE seen_at IS NOT NULL) t"
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
    print(f"machine: {machine()}")
    print(f"etlmesh: {version([str(BIN), '--version'])}; mosquitto: {version(['mosquitto', '-h'])}; "
          f"PostgreSQL: {version(['psql', '--version'])}")
    broker = Broker()
    try:
        n = args.messages
        bare, pub = ceiling(broker, n)
        print(f"publisher: {pub.strip().splitlines()[-1]}")
        print(f"ceiling (bare subscriber, QoS 1): {bare:,.0f} msg/s\n")
        rows = []
        for sink_name in ("parquet", "postgres"):
            for workers in (1, 2):
                case = f"{sink_name}-{workers}"
                if sink_name == "postgres":
                    table = f"bench_{workers}w"
                    psql(f"DROP TABLE IF EXISTS {table}")
                    sink = POSTGRES.format(pg=PG, table=table, create="true")
                else:
                    sink = PARQUET
                rate, d, not_rows = through_workers(broker, n, workers, sink, case)
                if sink_name == "postgres":
                    counted = table_rows(table)
                    psql(f"DROP TABLE IF EXISTS {table}")
                else:
                    counted = parquet_rows(d)
                case += f" ({checked(case, n, counted, not_rows)})"
                rows.append((case, rate))
        # What durability costs: the same Parquet stream without fsync (files, their
        # directories and dead letters are fsynced before messages are acknowledged).
        nosync, d, not_rows = through_workers(broker, n, 1, PARQUET, "parquet-1-nofsync",
                                              {"ETLMESH_UNSAFE_NO_FSYNC": "1"})
        checked("parquet-1 without fsync", n, parquet_rows(d), not_rows)
        rows.append(("parquet-1 without fsync", nosync))
        print(f"{'case':<52} {'msg/s':>10} {'of ceiling':>11}")
        for case, rate in rows:
            print(f"{case:<52} {rate:>10,.0f} {rate / bare:>10.0%}")
        with_fsync = next(r for c, r in rows if c.startswith("parquet-1 ("))
        print(f"fsync costs {1 - with_fsync / nosync:.1%} of the 1-worker Parquet rate "
              f"({with_fsync:,.0f} vs {nosync:,.0f} msg/s)")
        pg1 = dict(rows).get(next(c for c, _ in rows if c.startswith("postgres-1")))
        half = pg1 / 2
        p50, p99, mx, count = latency(broker, half, args.latency_seconds)
        print(f"\nlatency at {half:,.0f} msg/s (half the 1-worker PostgreSQL rate), {count:,} rows: "
              f"publish → row seen committed p50 {p50:.0f} ms, p99 {p99:.0f} ms, max {mx:.0f} ms (goal p99 < 500 ms)")
        if LOST:
            sys.exit("messages lost:\n  " + "\n  ".join(LOST))
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
