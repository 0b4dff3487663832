#!/usr/bin/env python3
"""The loss window of a stream under kill -9, measured as a new user would meet it.

Each run: `etlmesh up --workers 2` with a stream from the machine's Mosquitto (its
stock configuration unless --port names another broker) into PostgreSQL with a dedup
key; a paho-mqtt publisher sends N QoS 1 readings at a steady rate; 4 s in, one worker
is killed with kill -9 (the process scaler restarts it at once). When the publisher is
done and the rows stop coming, the run counts the well-formed readings that are
neither a row nor a dead letter: the loss. Runs repeat (`--runs`, 20 by default) and
the table shows the loss of each, the duplicates, and the kill-to-resubscribe gap.

    cargo build --release && pip install paho-mqtt && python3 bench/kill_loop.py --rate 3000
    python3 bench/kill_loop.py --rate 3000 --extra 'receive_maximum: 400'

ETLMESH_BIN picks the binary (default target/release/etlmesh).
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("ETLMESH_BIN", ROOT / "target" / "release" / "etlmesh")).resolve()
PAHO = ROOT / "crates" / "etlmesh" / "tests" / "paho_publish.py"
PG = "postgres://postgres@127.0.0.1:5432/test"

YAML = """
pipelines:
  live:
    source: {{ type: mqtt, broker: "mqtt://127.0.0.1:{port}", topic: "{prefix}/+/reading"{extra} }}
    schema: {{ device_id: utf8, seq: int64, ts: timestamp_ms, temperature_c: float64, status: utf8 }}
    dedup: [device_id, seq]
    sinks: [{{ type: postgres, url: "{pg}", table: {table}, create: true }}]
    dead_letter: {{ type: ndjson, path: out/dead }}
"""


def psql(sql):
    return subprocess.run(
        ["psql", "-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-qAt", "-c", sql],
        check=True, capture_output=True, text=True,
    ).stdout.strip()


def one_run(i, args):
    d = tempfile.mkdtemp(prefix="etlmesh-killloop-")
    prefix = f"killloop-{os.getpid()}-{i}"
    table = f"killloop_{os.getpid()}_{i}"
    extra = f", {args.extra}" if args.extra else ""
    Path(d, "s.yaml").write_text(YAML.format(port=args.port, prefix=prefix, pg=PG, table=table, extra=extra))
    psql(f"DROP TABLE IF EXISTS {table}")
    up = subprocess.Popen(
        [str(BIN), "up", "-c", "s.yaml", "--workers", "2", "--http", "127.0.0.1:0",
         "--admin", "127.0.0.1:0", "--flight", "off"],
        cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "ETLMESH_LOG_FORMAT": "text", "NO_COLOR": "1"},
    )
    admin, started, lines = None, 0, []
    deadline = time.time() + 60
    while started < 2 and time.time() < deadline:
        line = up.stderr.readline()
        lines.append(line)
        m = re.search(r"control plane listening on (http://\S+)", line)
        if m:
            admin = m.group(1)
        started += "stream started" in line
    if started < 2:
        sys.exit("the workers did not start:\n" + "".join(lines))
    log = Path(d, "sent.log")
    pub = subprocess.Popen(
        [sys.executable, str(PAHO), "--port", str(args.port), "--prefix", prefix,
         "--count", str(args.messages), "--rate", str(args.rate), "--log", str(log)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    t0 = time.time()
    time.sleep(4)
    workers = json.load(urllib.request.urlopen(f"{admin}/api/v1/workers", timeout=5))
    victim = workers[0]
    os.kill(victim["pid"], signal.SIGKILL)
    out, err = pub.communicate()
    published_in = time.time() - t0
    sent = json.loads(out)
    # Rows stop coming: no change for 3 s.
    last, same_since = -1, time.time()
    while time.time() - same_since < 3:
        n = int(psql(f"SELECT count(*) FROM {table}") or 0)
        if n != last:
            last, same_since = n, time.time()
        time.sleep(0.5)
    distinct = int(psql(f"SELECT count(DISTINCT (device_id, seq)) FROM {table}"))
    up.send_signal(signal.SIGINT)
    try:
        _, rest = up.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        up.kill()
        _, rest = up.communicate()
    text = "".join(lines) + rest
    psql(f"DROP TABLE IF EXISTS {table}")
    return {
        "sent": sent["good"],
        "rows": last,
        "distinct": distinct,
        "lost": sent["good"] - distinct,
        "duplicates": last - distinct,
        "rate": sent["good"] / published_in,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rate", type=int, default=3000)
    ap.add_argument("--messages", type=int, default=30000)
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--extra", default="", help="more source settings, e.g. 'broker_keeps_queued: true'")
    args = ap.parse_args()
    if not BIN.exists():
        sys.exit(f"{BIN} missing: cargo build --release")
    version = subprocess.run([str(BIN), "--version"], capture_output=True, text=True).stdout.strip()
    print(f"{version}; {os.cpu_count()} CPUs; broker 127.0.0.1:{args.port}; "
          f"{args.messages} readings at {args.rate}/s, kill -9 of one of 2 workers at 4 s")
    losses = []
    for i in range(args.runs):
        r = one_run(i, args)
        losses.append(r["lost"])
        print(f"run {i + 1:>2}: sent {r['sent']} at {r['rate']:,.0f}/s, rows {r['rows']}, "
              f"lost {r['lost']}, duplicates {r['duplicates']}", flush=True)
    clean = sum(1 for x in losses if x == 0)
    print(f"\n{clean}/{len(losses)} runs lost nothing; lost per run: {losses}")


if __name__ == "__main__":
    main()
