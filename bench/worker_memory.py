#!/usr/bin/env python3
"""A worker's resident memory idle, under request load and after it — per allocator.

One control plane and one worker (plain HTTP, the worker's default threads) serve the
clean pipeline with a Parquet-free stdout sink; wrk sends 16 connections of 200-row CSV
bodies straight to the worker for `--seconds`. The worker's memory is sampled from
/proc every 0.25 s: RSS (what `top` shows) split into anonymous memory (the heap: the
part an allocator decides) and file pages (the binary's code, shared by every worker on
the machine). Printed per allocator setting, in alternating rounds:

- idle: 3 s after the worker became ready, before any request;
- under load: the median and the peak over the load;
- after load: 10 s after the last request;
- requests per second (2xx only; any other answer fails the run).

Allocator settings compared (the choice is measured, not assumed):
- `glibc`: glibc's malloc as it comes (up to 8 arenas per core) — etlmesh's default;
- `glibc, 2 arenas`: the same with `MALLOC_ARENA_MAX=2` (fewer arenas, less retained);
- `mimalloc`: a binary built with `--features mimalloc`, when `--mimalloc-bin` names one.

    apt-get install wrk && cargo build --release && python3 bench/worker_memory.py [--seconds 60] [--rounds 2]
    # with mimalloc as well (the feature rebuilds only the binary crate):
    cargo build --release -p etlmesh --features mimalloc && cp target/release/etlmesh /tmp/etlmesh-mimalloc && \\
      cargo build --release -p etlmesh && python3 bench/worker_memory.py --mimalloc-bin /tmp/etlmesh-mimalloc
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import machine, version  # noqa: E402
import mesh  # noqa: E402
from mesh import BIN, free_port, prepare, stop, wait_http  # noqa: E402

# mesh.py's clean pipeline, on the worker's default threads; 200-row CSV bodies.
PIPELINES = mesh.PIPELINES.replace("threads: 1, ", "")
LUA = mesh.LUA.replace('"Content-Type"] = "application/x-ndjson"', '"Content-Type"] = "text/csv"')
assert PIPELINES != mesh.PIPELINES and LUA != mesh.LUA


def memory(pid):
    """(RSS, anonymous, file) in MB from /proc/PID/status."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["RssAnon"], fields["RssFile"] + fields.get("RssShmem", 0)


class Sampler(threading.Thread):
    def __init__(self, pid):
        super().__init__(daemon=True)
        self.pid, self.samples, self.stop = pid, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                self.samples.append(memory(self.pid))
            except (OSError, KeyError):
                return
            time.sleep(0.25)


def one_run(binary, env_extra, work, lua, seconds):
    env = dict(os.environ, ETLMESH_LOG="warn", **env_extra)
    if "MALLOC_ARENA_MAX" not in env_extra:
        env.pop("MALLOC_ARENA_MAX", None)
    env.pop("GLIBC_TUNABLES", None)
    procs = []

    def start(*argv):
        p = subprocess.Popen([binary, *argv], cwd=work, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        procs.append(p)
        return p

    try:
        cp = free_port()
        start("control-plane", "--listen", f"127.0.0.1:{cp}", "--state-dir", str(work / "state"))
        wait_http(f"http://127.0.0.1:{cp}/healthz")
        port = free_port()
        worker = start("worker", "-c", "pipelines.yaml", "--listen", f"127.0.0.1:{port}", "--id", "w1",
                       "--control-plane", f"http://127.0.0.1:{cp}", "--state-dir", str(work / "state"))
        wait_http(f"http://127.0.0.1:{port}/healthz")
        time.sleep(3)
        idle = memory(worker.pid)
        sampler = Sampler(worker.pid)
        sampler.start()
        out = subprocess.run(
            ["wrk", "-t1", "-c16", f"-d{seconds}s", "--latency", "-s", lua,
             f"http://127.0.0.1:{port}/v1/pipelines/clean"],
            capture_output=True, text=True, check=True).stdout
        sampler.stop.set()
        sampler.join()
        fields = dict(kv.split("=") for kv in out.split("BENCH ", 1)[1].split("\n", 1)[0].split())
        failed = int(fields["errors"]) + int(fields["non2xx"])
        if failed:
            sys.exit(f"{failed} requests failed (non-2xx or socket errors):\n{out}")
        time.sleep(10)
        after = memory(worker.pid)
        load = sampler.samples
        return dict(
            idle=idle,
            load_median=tuple(statistics.median(s[i] for s in load) for i in range(3)),
            load_peak=tuple(max(s[i] for s in load) for i in range(3)),
            after=after,
            rps=int(fields["requests"]) / seconds,
            p99=int(fields["p99_us"]) / 1000,
        )
    finally:
        stop(procs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=60, help="load per run")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds over the settings")
    ap.add_argument("--mimalloc-bin", type=Path, help="an etlmesh binary built with --features mimalloc")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        sys.exit("wrk is missing: apt-get install wrk")
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: cargo build --release")
    print(f"machine: {machine()}")
    print(f"etlmesh: {version([BIN, '--version'])}; wrk: {version(['wrk', '--version'])}; "
          f"glibc: {version(['ldd', '--version'])}")

    settings = [
        ("glibc (default)", BIN, {}),
        ("glibc, 2 arenas", BIN, {"MALLOC_ARENA_MAX": "2"}),
    ]
    if args.mimalloc_bin:
        settings.append(("mimalloc", args.mimalloc_bin, {}))

    work = Path(tempfile.mkdtemp(prefix="etlmesh-bench-"))
    try:
        lua = prepare(work, PIPELINES, "pipelines.yaml", 200, "csv", LUA)
        results = {name: [] for name, _, _ in settings}
        for r in range(args.rounds):
            order = settings if r % 2 == 0 else list(reversed(settings))
            for name, binary, env_extra in order:
                res = one_run(binary, env_extra, work, lua, args.seconds)
                results[name].append(res)
                print(f"round {r + 1} {name:24} idle {res['idle'][0]:5.1f} MB  load median "
                      f"{res['load_median'][0]:5.1f} peak {res['load_peak'][0]:5.1f}  after {res['after'][0]:5.1f}  "
                      f"(heap: idle {res['idle'][1]:.1f}, peak {res['load_peak'][1]:.1f}, after {res['after'][1]:.1f})  "
                      f"{res['rps']:,.0f} req/s  p99 {res['p99']:.2f} ms", flush=True)
        med = statistics.median
        print()
        print("| allocator | idle RSS (heap + file) | under load: median / peak RSS | after load | req/s | p99 |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, _, _ in settings:
            rs = results[name]

            def m(key, i):
                return med(x[key][i] for x in rs)

            print(f"| {name} | {m('idle', 0):.0f} MB ({m('idle', 1):.0f} + {m('idle', 2):.0f}) | "
                  f"{m('load_median', 0):.0f} / {m('load_peak', 0):.0f} MB | "
                  f"{m('after', 0):.0f} MB ({m('after', 1):.0f} + {m('after', 2):.0f}) | "
                  f"{med(x['rps'] for x in rs):,.0f} | {med(x['p99'] for x in rs):.2f} ms |")
        print(f"\nmedians of {args.rounds} rounds of {args.seconds} s; goal: at most 80 MB under load, 40 MB idle")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
