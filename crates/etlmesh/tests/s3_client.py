"""A client of object storage that is not ours: boto3 (AWS's SDK), with DuckDB to read
what the files hold. Used by the object-storage tests against a moto server.

    s3_client.py ENDPOINT mkbucket BUCKET
    s3_client.py ENDPOINT list BUCKET PREFIX      -> [{"key": ..., "size": ...}, ...]
    s3_client.py ENDPOINT uploads BUCKET          -> [{"key": ..., "upload_id": ...}, ...] (unfinished)
    s3_client.py ENDPOINT put BUCKET KEY TEXT     -> {"put": KEY}
    s3_client.py ENDPOINT lines BUCKET PREFIX     -> {"lines": n, "files": n} over every object under PREFIX
    s3_client.py ENDPOINT kill-during-upload BUCKET PID SECONDS
        -> {"killed": true, "waited_s": ...}: watches the unfinished uploads and kills
           PID (-9) as soon as one exists; {"killed": false, ...} if none began
    s3_client.py ENDPOINT rows BUCKET PREFIX [KEYCOLS]
        -> {"rows": n, "files": n, "keys": [[...], ...]} over every Parquet or CSV object
           under PREFIX, Hive partition columns included; KEYCOLS (comma-separated)
           asks for the distinct values of those columns.

It prints one JSON document.
"""

import json
import os
import sys
import tempfile

import boto3
from botocore.config import Config


def client(endpoint):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 2}),
    )


def objects(s3, bucket, prefix):
    out = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.extend({"key": o["Key"], "size": o["Size"]} for o in page.get("Contents", []))
    return out


def rows(s3, bucket, prefix, keycols):
    import duckdb

    found = [o for o in objects(s3, bucket, prefix) if o["key"].endswith((".parquet", ".csv"))]
    result = {"rows": 0, "files": len(found), "keys": []}
    if not found:
        return result
    with tempfile.TemporaryDirectory() as tmp:
        for o in found:
            local = os.path.join(tmp, o["key"])
            os.makedirs(os.path.dirname(local), exist_ok=True)
            s3.download_file(bucket, o["key"], local)
        root = os.path.join(tmp, prefix)
        if found[0]["key"].endswith(".parquet"):
            source = f"read_parquet('{root}/**/*.parquet', hive_partitioning = true)"
        else:
            source = f"read_csv('{root}/**/*.csv', hive_partitioning = true)"
        con = duckdb.connect()
        result["rows"] = con.execute(f"SELECT count(*) FROM {source}").fetchone()[0]
        if keycols:
            cols = ", ".join(keycols.split(","))
            result["keys"] = [list(r) for r in con.execute(f"SELECT DISTINCT {cols} FROM {source}").fetchall()]
    return result


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_during_upload(s3, bucket, pid, seconds):
    import signal
    import time

    start = time.monotonic()
    while time.monotonic() - start < seconds:
        if s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
            os.kill(pid, signal.SIGKILL)
            return {"killed": True, "waited_s": round(time.monotonic() - start, 2)}
        if not alive(pid):
            return {"killed": False, "reason": "the process ended before any upload began"}
        time.sleep(0.02)
    return {"killed": False, "reason": f"no upload began within {seconds} s"}


def main():
    endpoint, cmd, bucket = sys.argv[1], sys.argv[2], sys.argv[3]
    s3 = client(endpoint)
    if cmd == "mkbucket":
        s3.create_bucket(Bucket=bucket)
        out = {"created": bucket}
    elif cmd == "list":
        out = objects(s3, bucket, sys.argv[4])
    elif cmd == "uploads":
        listed = s3.list_multipart_uploads(Bucket=bucket)
        out = [{"key": u["Key"], "upload_id": u["UploadId"]} for u in listed.get("Uploads", [])]
    elif cmd == "put":
        s3.put_object(Bucket=bucket, Key=sys.argv[4], Body=sys.argv[5].encode())
        out = {"put": sys.argv[4]}
    elif cmd == "lines":
        found = objects(s3, bucket, sys.argv[4])
        lines = sum(
            s3.get_object(Bucket=bucket, Key=o["key"])["Body"].read().count(b"\n") for o in found
        )
        out = {"lines": lines, "files": len(found)}
    elif cmd == "kill-during-upload":
        out = kill_during_upload(s3, bucket, int(sys.argv[4]), float(sys.argv[5]))
    elif cmd == "rows":
        out = rows(s3, bucket, sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "")
    else:
        raise SystemExit(f"unknown command {cmd}")
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main()
