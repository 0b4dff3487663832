#!/usr/bin/env python3
"""What metrics and tracing cost: gateway throughput with them on and off, in the same run.

One control plane, one gateway and one worker serve the clean pipeline. Each request
carries 20 NDJSON readings, so that the per-request work (where metrics and spans are
paid) weighs as much as it can against the transform. wrk drives 16 connections
through the gateway. The mesh is started four times, alternating: telemetry on (the
default: Prometheus counters and histograms, trace spans, log capture) and off
(`ETLMESH_NO_TELEMETRY=1`: no per-request metric or span in gateway and worker);
each side's figure is the mean of its two runs. Goal: the cost is under 5 %.

    apt-get install wrk && cargo build --release && python3 bench/telemetry.py [--seconds N]
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mesh import BIN, LUA, PIPELINES, free_port, wait_http, wrk  # noqa: E402


def run_mesh(work, lua, telemetry, seconds):
    env = dict(os.environ, ETLMESH_LOG="info")
    env.pop("ETLMESH_NO_TELEMETRY", None)
    if not telemetry:
        env["ETLMESH_NO_TELEMETRY"] = "1"
    procs = []

    def start(*argv):
        p = subprocess.Popen([BIN, *argv], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)

    try:
        cp = free_port()
        start("control-plane", "--listen", f"127.0.0.1:{cp}")
        wait_http(f"http://127.0.0.1:{cp}/healthz")
        start("worker", "-c", "mesh.yaml", "--id", "w1", "--control-plane", f"http://127.0.0.1:{cp}",
              "--threads", "1", "--max-in-flight", "256")
        gw = free_port()
        start("gateway", "--listen", f"127.0.0.1:{gw}", "--flight", "off", "--control-plane", f"http://127.0.0.1:{cp}",
              "--threads", "1", "--endpoint-concurrency", "256", "--queue", "1024")
        began = time.time()
        while True:
            pipes = json.loads(wait_http(f"http://127.0.0.1:{gw}/v1/pipelines"))
            if pipes and pipes[0]["ready_workers"] == 1:
                break
            if time.time() - began > 20:
                sys.exit("the worker did not become ready")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{gw}/v1/pipelines/clean"
        wrk(url, lua, 16, 2)  # warm up
        return wrk(url, lua, 16, seconds)
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install wrk")
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: cargo build --release")
    work = Path(tempfile.mkdtemp(prefix="etlmesh-bench-"))
    (work / "mesh.yaml").write_text(PIPELINES)
    body = work / "body.ndjson"
    subprocess.run([BIN, "generate", "--rows", "20", "--bad-fraction", "0", "--format", "ndjson", "-o", body],
                   check=True, capture_output=True)
    lua = work / "post.lua"
    lua.write_text(LUA.format(body=body))
    runs = {True: [], False: []}
    for telemetry in [True, False, True, False]:
        r = run_mesh(work, lua, telemetry, args.seconds)
        runs[telemetry].append(r)
        print(f"telemetry {'on ' if telemetry else 'off'}: {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms  "
              f"p99 {r['p99']:6.2f} ms  failed {r['failed']}", flush=True)
    on = sum(r["rps"] for r in runs[True]) / 2
    off = sum(r["rps"] for r in runs[False]) / 2
    cost = (off - on) / off * 100
    print()
    print(f"with telemetry: {on:.0f} req/s; without: {off:.0f} req/s; ratio {on / off:.3f}")
    print(f"cost of metrics and tracing: {cost:.1f} % of gateway throughput (goal: under 5 %)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
