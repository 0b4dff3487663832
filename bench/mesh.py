#!/usr/bin/env python3
"""The gateway's cost: latency and throughput through etlmesh's gateway, directly to
one worker, and through nginx as a plain reverse proxy in front of the same workers —
and through a second mesh with mTLS on every hop (the default of `etlmesh up`).

Two workers serve the clean pipeline; each request carries 1,000 NDJSON readings. For
each path wrk runs twice: one connection (latency: p50, p99) and 16 connections
(2xx answers per second, p50, p99). Everything runs on this machine. The machine's
speed drifts by 15-25 % over minutes, so the paths run in alternating rounds (the
order rotated every round) and the comparisons are medians of each round's own
differences or ratios. Any non-2xx answer or socket error fails the run.

    apt-get install nginx wrk && cargo build --release && python3 bench/mesh.py [--rounds N] [--seconds N]
"""

import argparse
import json
import os
import re
import statistics
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from machine import machine, version

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("ETLMESH_BIN", ROOT / "target" / "release" / "etlmesh"))

PIPELINES = """
platform: { threads: 1, batch_size: 8192 }
pipelines:
  clean:
    schema:
      device_id: { type: utf8, nullable: false }
      ts: { type: timestamp_ms, nullable: false }
      temperature_c: float64
      humidity: float64
      battery_v: float64
      status: utf8
    transform: |
      SELECT device_id, ts, temperature_c, temperature_c * 9 / 5 + 32 AS temperature_f,
             humidity, battery_v, status
      FROM input WHERE status <> 'err' AND temperature_c BETWEEN -50 AND 150
    sinks: [ { type: stdout, format: ndjson } ]
"""

NGINX = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx.err warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_max_body_size 64m;
  client_body_buffer_size 1m;
  client_body_temp_path {dir};
  proxy_temp_path {dir};
  upstream workers {{
    server 127.0.0.1:{w1};
    server 127.0.0.1:{w2};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port};
    location /v1/pipelines/ {{
      proxy_pass http://workers/v1/pipelines/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-ndjson"
wrk.headers["Accept"] = "application/x-ndjson"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
response = function(status, headers, body)
  if status ~= 200 then errors = (errors or 0) + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format("BENCH p50_us=%d p99_us=%d requests=%d errors=%d non2xx=%d\\n",
    latency:percentile(50), latency:percentile(99), summary.requests,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
"""


def stop(procs):
    """SIGTERM to every process, then waits for each (killing one that takes 10 s)."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


def prepare(work, pipelines, name, rows, fmt, lua):
    """Writes the pipeline file `name`, a body of `rows` generated readings in `fmt` and
    the wrk script `lua` posting it into `work`; returns the script's path."""
    (work / name).write_text(pipelines)
    body = work / f"body.{fmt}"
    subprocess.run([BIN, "generate", "--rows", str(rows), "--bad-fraction", "0", "--format", fmt, "-o", body],
                   check=True, capture_output=True)
    script = work / "post.lua"
    script.write_text(lua.format(body=body))
    return script


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url, timeout=20):
    start = time.time()
    while time.time() - start < timeout:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.read()
        except Exception:
            time.sleep(0.1)
    sys.exit(f"{url} did not answer")


def wrk(url, lua, connections, seconds):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", lua, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"BENCH p50_us=(\d+) p99_us=(\d+) requests=(\d+) errors=(\d+) non2xx=(\d+)", out)
    if not m:
        sys.exit(f"unexpected wrk output:\n{out}")
    p50, p99, n, errors, non2xx = map(int, m.groups())
    # Throughput counts 2xx answers only; the caller fails the run on any other.
    return dict(p50=p50 / 1000, p99=p99 / 1000, rps=(n - non2xx) / seconds, failed=errors + non2xx)


def start_mesh(work, env, procs, mtls, gateway_defaults=False):
    """A control plane, two workers and a gateway; with `mtls`, on the control plane's
    mesh listener with the join token. The gateway's and the first worker's URLs.
    Gateway and workers run on one thread each with wide limits, or with their
    defaults (`gateway_defaults`: a thread per core, the default queue and limits)."""

    def start(*argv, extra_env=None):
        p = subprocess.Popen([BIN, *argv], cwd=work, env=dict(env, **(extra_env or {})),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    cp = free_port()
    state = work / ("state-mtls" if mtls else "state")
    cp_args = ["control-plane", "--listen", f"127.0.0.1:{cp}", "--state-dir", str(state)]
    members = f"http://127.0.0.1:{cp}"
    token_env = {}
    if mtls:
        mesh = free_port()
        cp_args += ["--mesh-listen", f"127.0.0.1:{mesh}"]
        members = f"https://127.0.0.1:{mesh}"
    start(*cp_args)
    wait_http(f"http://127.0.0.1:{cp}/healthz")
    if mtls:
        token_file = state / "mesh" / "join-token"
        for _ in range(100):
            if token_file.exists():
                break
            time.sleep(0.1)
        token_env = {"ETLMESH_JOIN_TOKEN": token_file.read_text().strip()}
    workers = [free_port(), free_port()]
    for i, port in enumerate(workers):
        tuning = [] if gateway_defaults else ["--threads", "1", "--max-in-flight", "256"]
        start("worker", "-c", "mesh.yaml", "--listen", f"127.0.0.1:{port}", "--id", f"w{i + 1}",
              "--control-plane", members, *tuning, "--state-dir", str(state), extra_env=token_env)
    gw = free_port()
    tuning = [] if gateway_defaults else ["--threads", "1", "--endpoint-concurrency", "256", "--queue", "1024"]
    start("gateway", "--listen", f"127.0.0.1:{gw}", "--flight", "off", "--control-plane", members,
          *tuning, extra_env=token_env)
    start_wait = time.time()
    while True:
        pipes = json.loads(wait_http(f"http://127.0.0.1:{gw}/v1/pipelines"))
        if pipes and pipes[0]["ready_workers"] == 2:
            break
        if time.time() - start_wait > 30:
            sys.exit("workers did not become ready")
        time.sleep(0.1)
    return gw, workers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=6, help="each wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds over every path")
    args = ap.parse_args()
    for tool in ["wrk", "nginx"]:
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is missing: apt-get install {tool}")
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: cargo build --release")
    print(f"machine: {machine()}")
    print(f"etlmesh: {version([BIN, '--version'])}; nginx: {version(['nginx', '-v'])}; wrk: {version(['wrk', '--version'])}")

    work = Path(tempfile.mkdtemp(prefix="etlmesh-bench-"))
    lua = prepare(work, PIPELINES, "mesh.yaml", 1000, "ndjson", LUA)

    procs = []
    env = dict(os.environ, ETLMESH_LOG="warn")
    try:
        gw, workers = start_mesh(work, env, procs, mtls=False)
        gw_tls, _ = start_mesh(work, env, procs, mtls=True)
        ng = free_port()
        (work / "nginx.conf").write_text(NGINX.format(dir=work, w1=workers[0], w2=workers[1], port=ng))
        procs.append(subprocess.Popen(["nginx", "-c", work / "nginx.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)

        targets = [
            ("direct to one worker", f"http://127.0.0.1:{workers[0]}/v1/pipelines/clean"),
            ("etlmesh gateway", f"http://127.0.0.1:{gw}/v1/pipelines/clean"),
            ("etlmesh gateway, mTLS", f"http://127.0.0.1:{gw_tls}/v1/pipelines/clean"),
            ("nginx", f"http://127.0.0.1:{ng}/v1/pipelines/clean"),
        ]
        for _, url in targets:
            wrk(url, lua, 1, 2)  # warm up connections and caches
        rounds = {name: [] for name, _ in targets}
        failed = 0
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for name, url in order:
                lat = wrk(url, lua, 1, args.seconds)
                thr = wrk(url, lua, 16, args.seconds)
                rounds[name].append((lat, thr))
                failed += lat["failed"] + thr["failed"]
                print(f"round {r + 1} {name:24} 1 conn: p50 {lat['p50']:6.2f} ms  p99 {lat['p99']:6.2f} ms  "
                      f"| 16 conns: {thr['rps']:7.0f} req/s  p50 {thr['p50']:6.2f} ms  p99 {thr['p99']:6.2f} ms  "
                      f"failed {lat['failed'] + thr['failed']}", flush=True)
        print()
        med = statistics.median
        print(f"| path | 1 conn p50 | 1 conn p99 | 16 conns req/s (2xx) | 16 conns p50 | 16 conns p99 |")
        print(f"| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, _ in targets:
            rs = rounds[name]
            print(f"| {name} | {med(l['p50'] for l, _ in rs):.2f} ms | {med(l['p99'] for l, _ in rs):.2f} ms | "
                  f"{med(t['rps'] for _, t in rs):,.0f} | {med(t['p50'] for _, t in rs):.2f} ms | {med(t['p99'] for _, t in rs):.2f} ms |")
        print()

        def paired(a, b, f):
            return med(f(x, y) for x, y in zip(rounds[a], rounds[b]))

        d, g, t, n = "direct to one worker", "etlmesh gateway", "etlmesh gateway, mTLS", "nginx"
        print(f"gateway over direct, 1 connection (median of {args.rounds} paired differences): "
              f"p50 {paired(g, d, lambda x, y: x[0]['p50'] - y[0]['p50']):+.2f} ms, "
              f"p99 {paired(g, d, lambda x, y: x[0]['p99'] - y[0]['p99']):+.2f} ms (goal: at most +0.3 ms and +1 ms)")
        print(f"gateway over nginx, 16 connections: "
              f"{paired(g, n, lambda x, y: x[1]['rps'] / y[1]['rps']):.2f}x the 2xx answers per second (goal: at least 1.0)")
        print(f"mTLS over plain, through the gateway: 16 connections "
              f"{paired(t, g, lambda x, y: x[1]['rps'] / y[1]['rps']):.2f}x the answers per second, "
              f"1 connection p50 {paired(t, g, lambda x, y: x[0]['p50'] - y[0]['p50']):+.2f} ms")
        print(f"nginx over direct, 1 connection: p50 {paired(n, d, lambda x, y: x[0]['p50'] - y[0]['p50']):+.2f} ms, "
              f"p99 {paired(n, d, lambda x, y: x[0]['p99'] - y[0]['p99']):+.2f} ms")
        if failed:
            sys.exit(f"{failed} requests failed (non-2xx or socket errors): the figures above do not count")
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
