"""Runs queries with DuckDB over Parquet directories, for crates/etlmesh/tests/query.rs.

stdin: {"views": {"name": "dir", ...}, "queries": ["SQL", ...]}
stdout: one list of rows per query, as JSON (timestamps and decimals as text).
Partition directories (col=value/) are read as text, as etlmesh reads them.
"""

import json
import sys

import duckdb

req = json.load(sys.stdin)
con = duckdb.connect()
con.execute("SET threads = 2")
con.execute("SET TimeZone = 'UTC'")
for name, d in req["views"].items():
    con.execute(
        f"CREATE VIEW {name} AS SELECT * FROM read_parquet('{d}/**/*.parquet', "
        "hive_partitioning = true, hive_types_autocast = false)"
    )
print(json.dumps([con.execute(q).fetchall() for q in req["queries"]], default=str))
