#!/usr/bin/env python3
"""What metrics and tracing cost: gateway throughput with them on and off, in the same run.

One control plane, one gateway and one worker serve the clean pipeline. Each request
carries 20 NDJSON readings, so that the per-request work (where metrics and spans are
paid) weighs as much as it can against the transform. wrk drives 16 connections
through the gateway. A new mesh is started for every run, in turn: telemetry on (the
default: Prometheus counters and histograms, trace context with the request's trace
id and pipeline on its log lines, log capture), off (`ETLMESH_NO_TELEMETRY=true`: no
per-request metric or log context in gateway and worker), and
on with spans exported over OTLP/HTTP to a minimal collector on this machine (which
takes CPU from the same two cores; every trace, or the share `--otlp-ratio` gives the
head sampler); the modes alternate, round after round, every other round in reverse.
Runs of one mode differ by up to ~15 % on a shared virtual machine, and its speed
drifts, so three figures are printed: the means over all rounds, the median of each
round's ratio (a round's "on" run against its own "off" run, taken a few seconds
apart), and the CPU the gateway and the worker spent per request (from /proc, in
microseconds). Goal: the cost of metrics and tracing is under 5 %.

    apt-get install wrk && cargo build --release && python3 bench/telemetry.py [--seconds N] [--rounds N] [--no-otlp] [--otlp-ratio R]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mesh import BIN, LUA, PIPELINES, free_port, prepare, stop, wait_http, wrk  # noqa: E402


class Collector(BaseHTTPRequestHandler):
    """Takes OTLP/HTTP posts and counts the bytes."""

    received = 0

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        self.rfile.read(n)
        Collector.received += n
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def cpu_seconds(pid):
    """User + system CPU of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_mesh(work, lua, mode, seconds, collector, otlp_ratio):
    env = dict(os.environ)
    env.setdefault("ETLMESH_LOG", "info")
    for k in ["ETLMESH_NO_TELEMETRY", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
              "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"]:
        env.pop(k, None)
    if mode == "off":
        env["ETLMESH_NO_TELEMETRY"] = "true"
    if mode == "otlp":
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = collector
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = str(otlp_ratio)
    procs = []

    def start(*argv):
        p = subprocess.Popen([BIN, *argv], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)

    try:
        cp = free_port()
        start("control-plane", "--listen", f"127.0.0.1:{cp}")
        wait_http(f"http://127.0.0.1:{cp}/healthz", timeout=60)
        start("worker", "-c", "mesh.yaml", "--id", "w1", "--control-plane", f"http://127.0.0.1:{cp}",
              "--threads", "1", "--max-in-flight", "256")
        gw = free_port()
        start("gateway", "--listen", f"127.0.0.1:{gw}", "--flight", "off", "--control-plane", f"http://127.0.0.1:{cp}",
              "--threads", "1", "--endpoint-concurrency", "256", "--queue", "1024")
        began = time.time()
        while True:
            pipes = json.loads(wait_http(f"http://127.0.0.1:{gw}/v1/pipelines", timeout=60))
            if pipes and pipes[0]["ready_workers"] == 1:
                break
            if time.time() - began > 20:
                sys.exit("the worker did not become ready")
            time.sleep(0.1)
        url = f"http://127.0.0.1:{gw}/v1/pipelines/clean"
        wrk(url, lua, 16, 2)  # warm up
        before = [cpu_seconds(p.pid) for p in procs[1:]]
        r = wrk(url, lua, 16, seconds)
        after = [cpu_seconds(p.pid) for p in procs[1:]]
        served = max(r["rps"] * seconds, 1)
        r["worker_us"], r["gateway_us"] = ((a - b) / served * 1e6 for a, b in zip(after, before))
        return r
    finally:
        stop(procs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each mode")
    ap.add_argument("--no-otlp", action="store_true", help="only telemetry on and off")
    ap.add_argument("--otlp-ratio", type=float, default=1.0,
                    help="share of traces the OTLP mode exports (OTEL_TRACES_SAMPLER_ARG; default all)")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install wrk")
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: cargo build --release")
    work = Path(tempfile.mkdtemp(prefix="etlmesh-bench-"))
    lua = prepare(work, PIPELINES, "mesh.yaml", 20, "ndjson", LUA)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    collector = f"http://127.0.0.1:{server.server_address[1]}"
    labels = {"on": "metrics + tracing on", "off": "off", "otlp": f"on + OTLP ({args.otlp_ratio:g})"}
    modes = ["on", "off"] if args.no_otlp else ["on", "off", "otlp"]
    labels = {m: labels[m] for m in modes}
    runs = {m: [] for m in labels}
    # Every other round runs the modes in reverse (on, off, otlp, otlp, off, on, …), so
    # that a machine speeding up or slowing down during the run favours no mode.
    order = [m for i in range(args.rounds) for m in (modes if i % 2 == 0 else modes[::-1])]
    for mode in order:
        r = run_mesh(work, lua, mode, args.seconds, collector, args.otlp_ratio)
        runs[mode].append(r)
        print(f"{labels[mode]:22}: {r['rps']:8.0f} req/s  p50 {r['p50']:6.2f} ms  "
              f"p99 {r['p99']:6.2f} ms  failed {r['failed']}  CPU per request: "
              f"gateway {r['gateway_us']:5.1f} us, worker {r['worker_us']:5.1f} us", flush=True)
    mean = {m: statistics.fmean(r["rps"] for r in v) for m, v in runs.items()}
    cpu = {m: statistics.fmean(r["gateway_us"] + r["worker_us"] for r in v) for m, v in runs.items()}
    off = mean["off"]
    print()
    for m, v in runs.items():
        rps = [r["rps"] for r in v]
        print(f"{labels[m]:22}: mean {mean[m]:8.0f} req/s over {len(v)} runs, "
              f"spread {(max(rps) - min(rps)) / mean[m] * 100:.1f} %, "
              f"gateway + worker CPU {cpu[m]:.1f} us per request")

    def cost(m):
        paired = statistics.median(on["rps"] / o["rps"] for on, o in zip(runs[m], runs["off"]))
        return ((off - mean[m]) / off * 100, (1 - paired) * 100, (cpu[m] - cpu["off"]) / cpu["off"] * 100)

    print(f"without telemetry {off:.0f} req/s; with metrics and tracing {mean['on']:.0f} req/s "
          f"(ratio {mean['on'] / off:.3f})")
    by_mean, by_pairs, by_cpu = cost("on")
    print(f"cost of metrics and tracing (goal: under 5 %): {by_mean:.1f} % of gateway throughput "
          f"(means), {by_pairs:.1f} % (median of the rounds' ratios), {by_cpu:.1f} % more CPU per request")
    if "otlp" in mean:
        by_mean, by_pairs, by_cpu = cost("otlp")
        print(f"with OTLP export as well {mean['otlp']:.0f} req/s (ratio {mean['otlp'] / off:.3f}, "
              f"{Collector.received / 1e6:.1f} MB of spans received): {by_mean:.1f} % (means), "
              f"{by_pairs:.1f} % (pairs), {by_cpu:.1f} % more CPU per request")
    server.shutdown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
