#!/usr/bin/env python3
"""The gateway's cost: latency and throughput through etlmesh's gateway, directly to
one worker, and through nginx as a plain reverse proxy in front of the same workers.

Two workers serve the clean pipeline; each request carries 1,000 NDJSON readings. For
each path wrk runs twice: one connection (latency: p50, p99) and 16 connections
(requests per second). Everything runs on this machine, in the same run.

    apt-get install nginx wrk && cargo build --release && python3 bench/mesh.py [--seconds N]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

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
      proxy_pass http://workers/v1/transform/;
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
    return dict(p50=p50 / 1000, p99=p99 / 1000, rps=n / seconds, failed=errors + non2xx)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    for tool in ["wrk", "nginx"]:
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"{tool} is missing: apt-get install {tool}")
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: cargo build --release")

    work = Path(tempfile.mkdtemp(prefix="etlmesh-bench-"))
    (work / "mesh.yaml").write_text(PIPELINES)
    body = work / "body.ndjson"
    subprocess.run([BIN, "generate", "--rows", "1000", "--bad-fraction", "0", "--format", "ndjson", "-o", body], check=True, capture_output=True)
    lua = work / "post.lua"
    lua.write_text(LUA.format(body=body))

    procs = []
    env = dict(os.environ, ETLMESH_LOG="warn")

    def start(*argv):
        p = subprocess.Popen([BIN, *argv], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        cp = free_port()
        start("control-plane", "--listen", f"127.0.0.1:{cp}")
        wait_http(f"http://127.0.0.1:{cp}/healthz")
        workers = [free_port(), free_port()]
        for i, port in enumerate(workers):
            start("worker", "-c", "mesh.yaml", "--listen", f"127.0.0.1:{port}", "--id", f"w{i + 1}",
                  "--control-plane", f"http://127.0.0.1:{cp}", "--threads", "1", "--max-in-flight", "256")
        gw = free_port()
        start("gateway", "--listen", f"127.0.0.1:{gw}", "--flight", "off", "--control-plane", f"http://127.0.0.1:{cp}",
              "--threads", "1", "--endpoint-concurrency", "256", "--queue", "1024")
        start_wait = time.time()
        while True:
            pipes = json.loads(wait_http(f"http://127.0.0.1:{gw}/v1/pipelines"))
            if pipes and pipes[0]["ready_workers"] == 2:
                break
            if time.time() - start_wait > 20:
                sys.exit("workers did not become ready")
            time.sleep(0.1)
        ng = free_port()
        (work / "nginx.conf").write_text(NGINX.format(dir=work, w1=workers[0], w2=workers[1], port=ng))
        procs.append(subprocess.Popen(["nginx", "-c", work / "nginx.conf"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        time.sleep(0.5)

        targets = [
            ("direct to one worker", f"http://127.0.0.1:{workers[0]}/v1/transform/clean"),
            ("etlmesh gateway", f"http://127.0.0.1:{gw}/v1/pipelines/clean"),
            ("nginx", f"http://127.0.0.1:{ng}/v1/pipelines/clean"),
        ]
        results = {}
        for name, url in targets:
            wrk(url, lua, 1, 2)  # warm up connections and caches
            lat = wrk(url, lua, 1, args.seconds)
            thr = wrk(url, lua, 16, args.seconds)
            results[name] = (lat, thr)
            print(f"{name:22} 1 conn: p50 {lat['p50']:6.2f} ms  p99 {lat['p99']:6.2f} ms  "
                  f"| 16 conns: {thr['rps']:7.0f} req/s  p50 {thr['p50']:6.2f} ms  p99 {thr['p99']:6.2f} ms  "
                  f"failed {lat['failed'] + thr['failed']}", flush=True)
        d, g, n = results["direct to one worker"], results["etlmesh gateway"], results["nginx"]
        print()
        print(f"gateway over direct, 1 connection: p50 +{g[0]['p50'] - d[0]['p50']:.2f} ms, p99 +{g[0]['p99'] - d[0]['p99']:.2f} ms "
              f"(goal: at most +0.3 ms and +1 ms)")
        print(f"gateway over nginx, 16 connections: {g[1]['rps'] / n[1]['rps']:.2f}x the requests per second (goal: at least 1.0)")
        print(f"nginx over direct, 1 connection: p50 +{n[0]['p50'] - d[0]['p50']:.2f} ms, p99 +{n[0]['p99'] - d[0]['p99']:.2f} ms")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
