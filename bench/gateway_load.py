#!/usr/bin/env python3
"""How the gateway's cost grows with connections: throughput and latency at 1, 16, 64
and 256 connections, past the point where the workers are saturated.

A control plane, two workers and a gateway with their default limits (64 requests in
flight per worker, 256 held in the gateway's queue; beyond that the gateway answers 503
with Retry-After) serve the clean pipeline; each request carries 1,000 NDJSON readings.
wrk runs each connection count in turn for `--seconds`, in alternating rounds. Printed
per count: 2xx answers per second, p50 and p99 latency of every answer, and the answers
that were not 2xx (shed with 503) or failed at the socket. Goal: no collapse past
saturation — throughput holds, latency stays bounded, and excess load is shed with 503
rather than timed out.

    apt-get install wrk && cargo build --release && python3 bench/gateway_load.py [--seconds 10] [--rounds 2]
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine, version  # noqa: E402
from mesh import BIN, LUA, PIPELINES, prepare, start_mesh, stop  # noqa: E402


def wrk(url, lua, connections, seconds):
    out = subprocess.run(
        ["wrk", "-t2" if connections > 1 else "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "15s",
         "--latency", "-s", lua, url],
        capture_output=True, text=True, check=True).stdout
    m = re.search(r"BENCH p50_us=(\d+) p99_us=(\d+) requests=(\d+) errors=(\d+) non2xx=(\d+)", out)
    if not m:
        sys.exit(f"unexpected wrk output:\n{out}")
    p50, p99, n, errors, non2xx = map(int, m.groups())
    return dict(p50=p50 / 1000, p99=p99 / 1000, rps=(n - non2xx) / seconds, shed=non2xx, errors=errors)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10, help="each wrk run")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the connection counts")
    ap.add_argument("--connections", default="1,16,64,256")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install wrk")
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: cargo build --release")
    counts = [int(c) for c in args.connections.split(",")]
    print(f"machine: {machine()}")
    print(f"etlmesh: {version([BIN, '--version'])}; wrk: {version(['wrk', '--version'])}")

    work = Path(tempfile.mkdtemp(prefix="etlmesh-bench-"))
    lua = prepare(work, PIPELINES, "mesh.yaml", 1000, "ndjson", LUA)
    procs = []
    env = dict(os.environ, ETLMESH_LOG="warn")
    try:
        gw, _ = start_mesh(work, env, procs, mtls=False, gateway_defaults=True)
        url = f"http://127.0.0.1:{gw}/v1/pipelines/clean"
        wrk(url, lua, 4, 2)  # warm up
        results = {c: [] for c in counts}
        for r in range(args.rounds):
            order = counts if r % 2 == 0 else list(reversed(counts))
            for c in order:
                res = wrk(url, lua, c, args.seconds)
                results[c].append(res)
                print(f"round {r + 1} {c:4} connections: {res['rps']:7.0f} req/s  p50 {res['p50']:8.2f} ms  "
                      f"p99 {res['p99']:8.2f} ms  shed {res['shed']}  socket errors {res['errors']}", flush=True)
        med = statistics.median
        print()
        print("| connections | 2xx req/s | p50 | p99 | shed (503) | socket errors |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for c in counts:
            rs = results[c]
            print(f"| {c} | {med(x['rps'] for x in rs):,.0f} | {med(x['p50'] for x in rs):.2f} ms | "
                  f"{med(x['p99'] for x in rs):.2f} ms | {sum(x['shed'] for x in rs)} | "
                  f"{sum(x['errors'] for x in rs)} |")
        print(f"\nmedians of {args.rounds} rounds of {args.seconds} s; shed and errors summed over the rounds")
        if any(x["errors"] for rs in results.values() for x in rs):
            sys.exit("socket errors: the gateway collapsed instead of shedding")
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
