"""A Kafka consumer that is not ours: confluent-kafka (librdkafka, from PyPI).

Used by the Kafka stream tests. It reads `--topic` from the beginning in a fresh
consumer group until `--count` distinct readings arrived (and then 2 s more, to see
repeats) or `--timeout` seconds passed, and
prints one JSON line: {"records": n, "distinct": d, "key_mismatch": m, "partitions": p}
where `distinct` counts distinct (device_id, seq) of the JSON values and
`key_mismatch` counts records whose key is not the value's `--key-field`.
"""

import argparse
import json
import time
import uuid

import confluent_kafka as ck


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--timeout", type=float, default=60)
    ap.add_argument("--key-field", default="device_id")
    args = ap.parse_args()
    c = ck.Consumer(
        {
            "bootstrap.servers": args.brokers,
            "group.id": f"etlmesh-test-{uuid.uuid4()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            # Only what transactions committed (librdkafka's default, said aloud).
            "isolation.level": "read_committed",
        }
    )
    c.subscribe([args.topic])
    records, mismatch = 0, 0
    keys, partitions = set(), set()
    start = time.time()
    done_at = None
    while time.time() - start < args.timeout:
        if done_at is None and len(keys) >= args.count:
            done_at = time.time()
        if done_at is not None and time.time() - done_at > 2:
            break
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        records += 1
        partitions.add(m.partition())
        v = json.loads(m.value())
        keys.add((v["device_id"], v["seq"]))
        if (m.key() or b"").decode() != str(v.get(args.key_field)):
            mismatch += 1
    c.close()
    print(
        json.dumps(
            {
                "records": records,
                "distinct": len(keys),
                "key_mismatch": mismatch,
                "partitions": len(partitions),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
