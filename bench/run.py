#!/usr/bin/env python3
"""etlmesh against DuckDB on the two reference jobs of issue 2.

Generates 5,000,000 readings as CSV and NDJSON (once; kept in bench/out), then runs
each job (clean → Parquet, per-minute aggregates → Parquet) from each format with
etlmesh and with DuckDB (2 threads, zstd Parquet) in the same run, each as a child
process, alternating the two in each round, and prints the median time, the peak RSS
and the ratios, with the versions and the machine. It checks that both tools give the
same rows.

    pip install duckdb && cargo build --release && python3 bench/run.py [--rows N] [--repeat N]

How each is measured, so that neither is flattered:
- time: etlmesh's is the wall time of its whole process (start included); DuckDB's is
  the COPY statement timed inside its Python child, without the interpreter's start or
  the import of duckdb (its wall time is printed beside it);
- memory: the peak RSS of each child, gross, both the same way (DuckDB's includes the
  interpreter; that baseline, with duckdb imported and no query, is printed too);
- output: zstd level 1 on both sides (etlmesh's default; DuckDB's COMPRESSION_LEVEL).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
BIN = Path(os.environ.get("ETLMESH_BIN", ROOT / "target" / "release" / "etlmesh"))
PIPELINES = ROOT / "bench" / "pipelines.yaml"

FILTER = "status <> 'err' AND temperature_c BETWEEN -50 AND 150"
CLEAN = f"""SELECT device_id, ts, temperature_c, temperature_c * 9 / 5 + 32 AS temperature_f,
       humidity, battery_v, status FROM src WHERE {FILTER}"""
AGG = f"""SELECT device_id, date_trunc('minute', ts) AS minute,
       avg(temperature_c * 9 / 5 + 32) AS avg_temperature_f,
       max(humidity) AS max_humidity, count(*) AS readings
FROM src WHERE {FILTER} GROUP BY 1, 2"""
COLUMNS = "{'device_id': 'VARCHAR', 'ts': 'TIMESTAMPTZ', 'temperature_c': 'DOUBLE', 'humidity': 'DOUBLE', 'battery_v': 'DOUBLE', 'status': 'VARCHAR'}"


def source(fmt: str, path: Path) -> str:
    if fmt == "csv":
        return f"read_csv('{path}', header = true, columns = {COLUMNS})"
    return f"read_json('{path}', format = 'newline_delimited', columns = {COLUMNS})"


def run_child(cmd, cwd=None):
    """Runs a command under GNU time; returns (seconds, peak RSS in MB, its stdout).

    GNU time forks the command from a small process: a child forked from this Python
    process would inherit its resident size in its peak RSS.
    """
    stats = OUT / ".time"
    start = time.perf_counter()
    p = subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", stats, *cmd], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    elapsed = time.perf_counter() - start
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{p.stderr.decode(errors='replace')}")
    return elapsed, int(stats.read_text().split()[-1]) / 1024, p.stdout.decode(errors="replace")


def duck_cmd(sql: str):
    """DuckDB in a Python child that prints the seconds its statement took."""
    script = (
        "import time, duckdb; con = duckdb.connect(); "
        "con.execute('SET threads = 2'); con.execute('SET preserve_insertion_order = false'); "
        f"t = time.perf_counter(); con.execute({sql!r}); print(time.perf_counter() - t)"
    )
    return [sys.executable, "-c", script]


def generate(rows: int):
    OUT.mkdir(parents=True, exist_ok=True)
    files = {}
    for fmt in ["csv", "ndjson"]:
        path = OUT / f"readings-{rows}.{fmt}"
        if not path.exists():
            print(f"generating {path.name} …", flush=True)
            tmp = path.with_suffix(".tmp")
            subprocess.run(
                [BIN, "generate", "--rows", str(rows), "--bad-fraction", "0", "--format", fmt, "-o", tmp],
                check=True,
            )
            tmp.rename(path)
        files[fmt] = path
    return files


def verify(con, job: str, etl_dir: Path, duck_file: Path):
    if job == "clean":
        cols = "device_id, epoch_ms(ts) AS ts, round(temperature_c, 6), round(temperature_f, 6), humidity, battery_v, status"
    else:
        cols = "device_id, epoch_ms(minute) AS minute, round(avg_temperature_f, 6), max_humidity, readings"
    etl = f"SELECT {cols} FROM read_parquet('{etl_dir}/*.parquet')"
    duck = f"SELECT {cols} FROM read_parquet('{duck_file}')"
    n_etl = con.execute(f"SELECT count(*) FROM ({etl})").fetchone()[0]
    n_duck = con.execute(f"SELECT count(*) FROM ({duck})").fetchone()[0]
    a = con.execute(f"SELECT count(*) FROM ({etl} EXCEPT ALL {duck})").fetchone()[0]
    b = con.execute(f"SELECT count(*) FROM ({duck} EXCEPT ALL {etl})").fetchone()[0]
    same = n_etl == n_duck and a == 0 and b == 0
    return same, n_etl, n_duck


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    try:
        import duckdb
    except ImportError:
        sys.exit("DuckDB is missing: pip install duckdb")
    if not BIN.exists():
        sys.exit(f"{BIN} is missing: cargo build --release")

    files = generate(args.rows)
    sizes = {f: p.stat().st_size / 1e6 for f, p in files.items()}
    print(f"inputs: {args.rows:,} readings, CSV {sizes['csv']:.0f} MB, NDJSON {sizes['ndjson']:.0f} MB")
    _, baseline, _ = run_child(duck_cmd("SELECT 1"))
    version = subprocess.run([BIN, "--version"], capture_output=True, text=True).stdout.strip()
    print(f"machine: {machine()}")
    print(f"{version} ({BIN.name} at {BIN}); DuckDB {duckdb.__version__} on Python {sys.version.split()[0]}")
    print(f"DuckDB's Python child with duckdb imported and no query: {baseline:.0f} MB\n")

    con = duckdb.connect()
    results = []
    for job in ["clean", "agg"]:
        for fmt in ["csv", "ndjson"]:
            etl_dir = OUT / "etl" / job
            duck_file = OUT / "duck" / f"{job}.parquet"
            duck_file.parent.mkdir(parents=True, exist_ok=True)
            sql = (CLEAN if job == "clean" else AGG).replace("src", source(fmt, files[fmt]), 1)
            copy = f"COPY ({sql}) TO '{duck_file}' (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1)"
            etl_t, etl_m, duck_t, duck_wall, duck_m = [], [], [], [], []
            for _ in range(args.repeat):
                shutil.rmtree(etl_dir, ignore_errors=True)
                shutil.rmtree(OUT / "etl" / "dead", ignore_errors=True)
                t, m, _ = run_child(
                    [BIN, "run", "-c", PIPELINES, "--pipeline", job, "--progress", "off", files[fmt]], cwd=OUT
                )
                etl_t.append(t)
                etl_m.append(m)
                duck_file.unlink(missing_ok=True)
                wall, m, out = run_child(duck_cmd(copy))
                duck_t.append(float(out.split()[-1]))
                duck_wall.append(wall)
                duck_m.append(m)
            same, n_etl, n_duck = verify(con, job, etl_dir, duck_file)
            r = dict(
                job=job,
                fmt=fmt,
                etl_t=statistics.median(etl_t),
                duck_t=statistics.median(duck_t),
                duck_wall=statistics.median(duck_wall),
                etl_m=max(etl_m),
                duck_m=max(duck_m),
                same=same,
                rows=(n_etl, n_duck),
            )
            r["ratio"] = r["etl_t"] / r["duck_t"]
            r["mem_ratio"] = r["etl_m"] / r["duck_m"]
            results.append(r)
            print(
                f"{job:5} {fmt:6}  etlmesh {r['etl_t']:6.2f}s {r['etl_m']:6.0f} MB   "
                f"duckdb {r['duck_t']:6.2f}s (wall {r['duck_wall']:5.2f}s) {r['duck_m']:6.0f} MB   "
                f"time ratio {r['ratio']:.2f}   memory ratio {r['mem_ratio']:.2f}   "
                f"{'same rows' if same else 'ROWS DIFFER'} ({n_etl:,} / {n_duck:,})",
                flush=True,
            )
    print(
        f"\nratio = etlmesh / DuckDB (time: median of {args.repeat} alternating rounds, etlmesh's whole process "
        "against DuckDB's statement; memory: peak RSS of each process, gross)"
    )
    if not all(r["same"] for r in results):
        sys.exit("the outputs differ")


if __name__ == "__main__":
    main()
