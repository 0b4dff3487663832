#!/usr/bin/env python3
"""Streaming from Kafka: throughput against a bare consumer, windows on 1 and 2
workers, and a backlog that scales a pool out and back.

In one run, against one private tansu broker (Kafka protocol, in memory, started here
on a free port), over one topic of 8 partitions holding N readings (produced first by
confluent-kafka, keyed by device, event times 10 ms apart):

1. the ceiling: a bare consumer of the same client (`etlmesh subscribe --kafka`:
   librdkafka, a consumer group with cooperative-sticky assignment, that only counts
   and commits);
2. the same N readings through one `etlmesh worker` (`source: { type: kafka }`) into
   rolling Parquet files and into PostgreSQL (binary COPY);
3. a windowed pipeline (per device and 10-second window: count and sum, upserted into
   PostgreSQL) on 1 and on 2 workers.

Each case reads the whole topic as a new consumer group; its rate is taken from the
group's committed offsets (what the coordinator says), from the first commit to the
commit past 95 % of the records, so that start-up, joining the group and the last
windows' idle timeout are left out for every case alike. Rounds alternate the cases and the median is reported.

4. with `--scale N` (default 500,000): a backlog of N readings behind `etlmesh up` with
   `scaling: { min_replicas: 1, max_replicas: 3, target_lag: 100000, target_drain: 5s }`:
   every scaling decision with its reason, the time to drain (all committed) and the
   time back to 1.

    cargo build --release && python3 bench/kafka.py [--records 200000] [--rounds 3] [--scale 500000]

Needs tansu (`cargo install tansu --version 0.6.0 --features dynostore`, or
ETLMESH_TANSU), confluent-kafka and duckdb (`pip install confluent-kafka duckdb`: the
producer, and the Parquet row count) and PostgreSQL
(127.0.0.1:5432, trust auth, database `test`).
"""

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("ETLMESH_BIN", ROOT / "target" / "release" / "etlmesh")).resolve()
TANSU = os.environ.get("ETLMESH_TANSU") or shutil.which("tansu") or str(
    Path.home() / ".cache" / "etlmesh-tools" / "bin" / "tansu")
PRODUCE = ROOT / "crates" / "etlmesh" / "tests" / "kafka_produce.py"
PG = "postgres://postgres@127.0.0.1:5432/test"
TOPIC = "bench-readings"
PARTITIONS = 8

PIPELINE = """
pipelines:
  bench:
    source:
      type: kafka
      brokers: "{brokers}"
      topic: {topic}
      group: {group}
      columns: {{ device_id: key }}
      batch: {{ records: 5000, wait: 200ms }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms, temperature_c: float64 }}
{body}
    dead_letter: {{ type: ndjson, path: out/dead }}
"""

ROWS = """    transform: |
      SELECT device_id, seq, ts, temperature_c, temperature_c * 9 / 5 + 32 AS temperature_f
      FROM input WHERE temperature_c BETWEEN -50 AND 150
    sinks: [{sink}]"""

WINDOWED = """    window: {{ time: ts, size: 10s, allowed_lateness: 0s, idle_timeout: 5s }}
    transform: SELECT device_id, window_start, count(*) AS n, sum(seq) AS s FROM input GROUP BY device_id, window_start
    sinks: [{{ type: postgres, url: "{pg}", table: {table}, create: true, key: [device_id, window_start] }}]"""

SCALING = """    scaling: { min_replicas: 1, max_replicas: 3, target_lag: 100000, target_drain: 5s, scale_down_window: 10s }"""


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
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        url = f"tcp://{self.address}"
        self.proc = subprocess.Popen(
            [TANSU, "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.1)
        sys.exit("tansu did not start")

    def topic(self, name, partitions):
        subprocess.run(
            [TANSU, "topic", "create", name, "--partitions", str(partitions),
             "--broker", f"tcp://{self.address}"],
            check=True, capture_output=True)

    def produce(self, topic, n, one_per_batch=False):
        t0 = time.time()
        extra = ["--one-per-batch"] if one_per_batch else []
        out = subprocess.run(
            [sys.executable, str(PRODUCE), "--brokers", self.address, "--topic", topic,
             "--count", str(n), "--devices", "100", "--step-ms", "10", *extra],
            check=True, capture_output=True, text=True).stdout
        report = json.loads(out.strip().splitlines()[-1])
        assert report == {"acked": n, "failed": 0}, report
        return n / (time.time() - t0)

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


class Committed:
    """The committed offsets of a group, summed over the topic's partitions."""

    def __init__(self, brokers, group, topic):
        import confluent_kafka as ck
        self.c = ck.Consumer({"bootstrap.servers": brokers, "group.id": group})
        self.parts = [ck.TopicPartition(topic, p) for p in range(PARTITIONS)]

    def __call__(self):
        try:
            return sum(max(tp.offset, 0) for tp in self.c.committed(self.parts, timeout=5))
        except Exception:  # the coordinator is busy: ask again
            return -1

    def close(self):
        self.c.close()


def timed(brokers, group, n, limit=900):
    """Polls the group's commits: the rate from the first commit to the one past 95 % of
    the records (a windowed pipeline commits its last windows only at their idle
    timeout), and the seconds to that commit."""
    c = Committed(brokers, group, TOPIC)
    t0 = time.time()
    first = None
    n = int(n * 0.95)
    try:
        while True:
            done = c()
            now = time.time()
            if done > 0 and first is None:
                first = (now, done)
            if done >= n:
                break
            if now - t0 > limit:
                sys.exit(f"group {group}: {done:,} of {n:,} committed after {limit} s")
            time.sleep(0.05)
    finally:
        c.close()
    ft, fc = first
    rate = (n - fc) / max(now - ft, 1e-6) if n > fc else float("nan")
    return rate, now - t0


def spawn(args, cwd=None):
    return subprocess.Popen(
        [str(BIN), *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ETLMESH_LOG_FORMAT": "text", "NO_COLOR": "1"})


def stop(p):
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def bare(broker, n, rnd):
    group = f"bare-{rnd}"
    p = spawn(["subscribe", "--kafka", broker.address, "--topic", TOPIC, "--group", group,
               "--count", str(n), "--idle", "60s"])
    rate, _ = timed(broker.address, group, n)
    p.wait(60)
    return rate


def workers(broker, n, case, body, count, rnd):
    d = tempfile.mkdtemp(prefix=f"etlmesh-bench-kafka-{case}-")
    group = f"etlmesh-{case}-{rnd}"
    Path(d, "s.yaml").write_text(PIPELINE.format(
        brokers=broker.address, topic=TOPIC, group=group, body=body))
    ws = [spawn(["worker", "-c", "s.yaml", "--listen", "127.0.0.1:0", "--id", f"w{i}"], cwd=d)
          for i in range(count)]
    try:
        rate, _ = timed(broker.address, group, n)
    finally:
        for w in ws:
            stop(w)
    dead = sum(1 for f in Path(d, "out").rglob("*.ndjson") for _ in open(f)) if Path(d, "out").exists() else 0
    rows = None
    pq = Path(d, "out", "rows")
    if pq.exists():
        import duckdb
        rows = duckdb.sql(f"SELECT count(*) FROM read_parquet('{pq}/**/*.parquet')").fetchall()[0][0]
    shutil.rmtree(d, ignore_errors=True)
    return rate, dead, rows


def scaling(broker, n):
    topic = "bench-backlog"
    broker.topic(topic, PARTITIONS)
    produced = broker.produce(topic, n)
    table = "bench_kafka_scale"
    # A sink that takes its time (every statement 100 ms more, a trigger), so that one
    # worker would drain the backlog in well over `target_drain` and the pool scales out.
    psql(f"DROP TABLE IF EXISTS {table}")
    psql(f"CREATE TABLE {table} (device_id text, seq bigint, ts timestamptz, temperature_c float8, temperature_f float8)")
    psql(f"CREATE OR REPLACE FUNCTION {table}_slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.1); RETURN NULL; END $$")
    psql(f"CREATE TRIGGER slow AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {table}_slow()")
    d = tempfile.mkdtemp(prefix="etlmesh-bench-kafka-scale-")
    group = "etlmesh-scale"
    body = ROWS.format(sink=f'{{ type: postgres, url: "{PG}", table: {table}, create: true }}') + "\n" + SCALING
    Path(d, "s.yaml").write_text(PIPELINE.format(
        brokers=broker.address, topic=topic, group=group, body=body))
    up = subprocess.Popen(
        [str(BIN), "up", "-c", "s.yaml", "--http", "127.0.0.1:0", "--admin", "127.0.0.1:0",
         "--flight", "off"],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ETLMESH_LOG_FORMAT": "text", "NO_COLOR": "1"})
    admin = None
    seen = []
    for line in up.stderr:
        seen.append(line)
        m = re.search(r"control plane listening on (http://\S+)", line)
        if m:
            admin = m.group(1)
            break
    if admin is None:
        sys.exit("etlmesh up did not say where its control plane is:\n" + "".join(seen[-20:]))
    # Keep reading its output so that it never blocks on a full pipe.
    import threading
    threading.Thread(target=lambda: [None for _ in up.stderr], daemon=True).start()
    c = Committed(broker.address, group, topic)
    t0 = time.time()
    drained = back = None
    try:
        while time.time() - t0 < 900:
            now = time.time() - t0
            if drained is None and c() >= n:
                drained = now
            decisions = json.load(urllib.request.urlopen(f"{admin}/api/v1/scaling", timeout=5)).get("events", [])
            if drained is not None and decisions and decisions[-1].get("to") == 1:
                back = now
                break
            if drained is not None and now - drained > 60:
                break
            time.sleep(0.2)
    finally:
        c.close()
        stop(up)
    loaded = int(psql(f"SELECT count(*) FROM {table}"))
    psql(f"DROP TABLE IF EXISTS {table}")
    psql(f"DROP FUNCTION IF EXISTS {table}_slow()")
    shutil.rmtree(d, ignore_errors=True)
    return produced, decisions, drained, back, loaded


def versions():
    import confluent_kafka as ck
    tansu = subprocess.run([TANSU, "--version"], capture_output=True, text=True).stdout.strip()
    lock = (ROOT / "Cargo.lock").read_text()
    m = re.search(r'name = "rdkafka-sys"\nversion = "([^"]+)"', lock)
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
                 platform.processor() or platform.machine())
    return (f"{tansu} (in memory); etlmesh rdkafka-sys {m.group(1) if m else '?'}, "
            f"confluent-kafka {ck.__version__} (librdkafka {ck.libversion()[0]}); "
            f"{os.cpu_count()} cores, {model}; {BIN}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scale", type=int, default=500_000, help="backlog for the scaling run (0: skip)")
    ap.add_argument("--only-scale", action="store_true", help="the scaling run alone")
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit(f"{BIN} missing: cargo build --release")
    if not Path(TANSU).exists() and not shutil.which(TANSU):
        sys.exit("tansu missing: cargo install tansu --version 0.6.0 --features dynostore (or ETLMESH_TANSU)")
    print(versions())
    broker = Broker()
    try:
        n = args.records
        if args.only_scale:
            n = 0
        if n:
            throughput(broker, n, args.rounds)
        if args.scale:
            produced, decisions, drained, back, loaded = scaling(broker, args.scale)
            print(f"\nbacklog of {args.scale:,} (produced at {produced:,.0f}/s) behind `etlmesh up`, "
                  "scaling { min_replicas: 1, max_replicas: 3, target_lag: 100000, target_drain: 5s }:")
            for d in decisions:
                print(f"  {d.get('time', '')} {d.get('reason', d)}")
            print(f"  drained (all committed) after {drained:.1f} s; back to 1 after {back:.1f} s; "
                  f"{loaded:,} rows loaded" if drained and back else
                  f"  drained: {drained}, back to 1: {back}; {loaded:,} rows loaded")
    finally:
        broker.stop()


def throughput(broker, n, rounds):
    if True:
        broker.topic(TOPIC, PARTITIONS)
        # One record per batch: tansu 0.6 answers a fetch from inside a batch with the
        # batches after it, and the windowed cases resume partitions from commits at
        # window starts when the second worker joins (see the README).
        produced = broker.produce(TOPIC, n, one_per_batch=True)
        print(f"produced {n:,} readings over {PARTITIONS} partitions ({produced:,.0f}/s, confluent-kafka, "
              "one record per batch)\n")
        cases = {"bare consumer": [], "parquet, 1 worker": [], "postgres, 1 worker": [],
                 "windowed, 1 worker": [], "windowed, 2 workers": []}
        notes = {}
        for rnd in range(rounds):
            cases["bare consumer"].append(bare(broker, n, rnd))
            rate, dead, rows = workers(broker, n, "parquet", ROWS.format(
                sink="{ type: parquet, path: out/rows, roll_interval: 1s }"), 1, rnd)
            cases["parquet, 1 worker"].append(rate)
            notes["parquet, 1 worker"] = f"{rows:,} rows, {dead} dead letters"
            table = f"bench_kafka_rows_{rnd}"
            psql(f"DROP TABLE IF EXISTS {table}")
            rate, dead, _ = workers(broker, n, "postgres", ROWS.format(
                sink=f'{{ type: postgres, url: "{PG}", table: {table}, create: true }}'), 1, rnd)
            loaded = int(psql(f"SELECT count(*) FROM {table}"))
            psql(f"DROP TABLE {table}")
            cases["postgres, 1 worker"].append(rate)
            notes["postgres, 1 worker"] = f"{loaded:,} rows, {dead} dead letters"
            for count in (1, 2):
                key = f"windowed, {count} worker{'s' if count > 1 else ''}"
                table = f"bench_kafka_win_{count}_{rnd}"
                psql(f"DROP TABLE IF EXISTS {table}")
                rate, dead, _ = workers(broker, n, f"win{count}", WINDOWED.format(pg=PG, table=table), count, rnd)
                got = psql(f"SELECT count(*), coalesce(sum(n), 0) FROM {table}")
                psql(f"DROP TABLE {table}")
                cases[key].append(rate)
                rows, counted = got.split("|")
                notes[key] = f"{int(rows):,} windows counting {int(counted):,} readings, {dead} dead letters"
        ceiling = statistics.median(cases["bare consumer"])
        print(f"{'case':<22} {'records/s':>10} {'of bare':>8}  (median of {rounds} rounds; last round's check)")
        for case, rates in cases.items():
            m = statistics.median(rates)
            print(f"{case:<22} {m:>10,.0f} {m / ceiling:>8.0%}  {notes.get(case, '')}")
        w1 = statistics.median(cases["windowed, 1 worker"])
        w2 = statistics.median(cases["windowed, 2 workers"])
        print(f"\nwindowed: 2 workers / 1 worker = {w2 / w1:.2f}×")


if __name__ == "__main__":
    main()
