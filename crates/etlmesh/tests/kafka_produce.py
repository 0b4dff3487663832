"""A Kafka producer that is not ours: confluent-kafka (librdkafka, from PyPI).

Used by the Kafka source tests. It produces `--count` readings to `--topic`, as JSON
values {"seq", "ts", "temperature_c"} keyed by the device ("dev-<n>" of `--devices`),
with a header `trace: t-<seq>`, at about `--rate` per second (idempotent, every
delivery report awaited). It prints one JSON line: {"acked": n, "failed": f}.

`committed` mode (`--committed GROUP`): prints {"committed": c, "end": e, "lag": l}
summed over the topic's partitions, as the group's coordinator says.

`commit` mode (`--commit GROUP --offset N`): commits offset N of partition 0 for the
group, as a consumer that stopped there would have.
"""

import argparse
import json
import sys
import time

import confluent_kafka as ck


def produce(args) -> int:
    conf = {
        "bootstrap.servers": args.brokers,
        "enable.idempotence": True,
        "linger.ms": 5,
    }
    if args.one_per_batch:
        # tansu 0.6 answers a fetch from inside a record batch with the batches after
        # it (the rest of that batch is skipped): one record per batch keeps every
        # offset a batch of its own.
        conf.update({"linger.ms": 0, "batch.num.messages": 1})
    p = ck.Producer(conf)
    acked, failed = 0, 0

    def report(err, _msg):
        nonlocal acked, failed
        if err is None:
            acked += 1
        else:
            failed += 1

    start = time.time()
    t0 = 1_700_000_000_000
    for seq in range(args.count):
        device = f"dev-{seq % args.devices}"
        value = json.dumps(
            {"seq": seq, "ts": t0 + seq * args.step_ms, "temperature_c": 20.0 + (seq % 100) / 10}
        )
        while True:
            try:
                p.produce(
                    args.topic,
                    value=value.encode(),
                    key=device.encode(),
                    headers=[("trace", f"t-{seq}".encode())],
                    on_delivery=report,
                )
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
        if args.rate > 0:
            ahead = (seq + 1) / args.rate - (time.time() - start)
            if ahead > 0:
                time.sleep(ahead)
    # Every delivery report, however slow the broker (one record per batch on a loaded
    # machine takes a while): at most 5 minutes.
    deadline = time.time() + 300
    while len(p) > 0 and time.time() < deadline:
        p.flush(5)
    print(json.dumps({"acked": acked, "failed": failed}))
    return 0


def committed(args) -> int:
    c = ck.Consumer({"bootstrap.servers": args.brokers, "group.id": args.committed})
    md = c.list_topics(args.topic, timeout=10)
    parts = [ck.TopicPartition(args.topic, p) for p in md.topics[args.topic].partitions]
    done = c.committed(parts, timeout=10)
    total_committed, total_end = 0, 0
    for tp in done:
        _, high = c.get_watermark_offsets(ck.TopicPartition(args.topic, tp.partition), timeout=10)
        total_end += high
        total_committed += max(tp.offset, 0)
    c.close()
    print(
        json.dumps(
            {"committed": total_committed, "end": total_end, "lag": total_end - total_committed}
        )
    )
    return 0


def commit(args) -> int:
    c = ck.Consumer(
        {"bootstrap.servers": args.brokers, "group.id": args.commit, "enable.auto.commit": False}
    )
    c.commit(offsets=[ck.TopicPartition(args.topic, 0, args.offset)], asynchronous=False)
    c.close()
    print(json.dumps({"committed": args.offset}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--topic", required=True)
    ap.add_argument("--count", type=int, default=0)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--rate", type=float, default=0, help="records per second; 0 is as fast as it can")
    ap.add_argument("--step-ms", type=int, default=100, help="event time between readings")
    ap.add_argument("--one-per-batch", action="store_true", help="one record per record batch (see produce)")
    ap.add_argument("--committed", help="print the committed offsets of this group instead")
    ap.add_argument("--commit", help="commit --offset of partition 0 for this group instead")
    ap.add_argument("--offset", type=int, default=0)
    args = ap.parse_args()
    if args.commit:
        return commit(args)
    if args.committed:
        return committed(args)
    return produce(args)


if __name__ == "__main__":
    sys.exit(main())
