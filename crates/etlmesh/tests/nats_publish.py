"""A JetStream publisher that is not ours: nats-py sending readings as JSON.

Used by the JetStream stream tests. It paces `--count` readings at `--rate` per second
over `--devices` subjects `<prefix>.<device>.reading`, each published with JetStream
acknowledgements (at most `--inflight` awaited at once) and a `Nats-Msg-Id` of its
sequence number, so that a publish retried across a server restart is stored once.
A publish that fails (the server is away) is retried until it is stored. It prints one
JSON line: {"good": n, "poison": [], "acked": n, "sent": n}. With `--log FILE` it writes
`seq device ts` of each reading. With `--stream NAME` it creates the stream first
(subjects `<prefix>.>`), if it does not exist.
"""

import argparse
import asyncio
import json
import sys
import time

import nats
from nats.js.api import StreamConfig


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--stream", default="")
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--rate", type=float, default=5000)
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--inflight", type=int, default=256)
    ap.add_argument("--log", default="")
    args = ap.parse_args()
    log = open(args.log, "w") if args.log else None

    nc = await nats.connect(
        args.url, max_reconnect_attempts=-1, reconnect_time_wait=0.1, connect_timeout=5
    )
    js = nc.jetstream(timeout=10)
    if args.stream:
        try:
            await js.stream_info(args.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(StreamConfig(name=args.stream, subjects=[f"{args.prefix}.>"]))

    acked = 0
    sem = asyncio.Semaphore(args.inflight)

    async def publish(subject: str, payload: bytes, msg_id: str) -> None:
        nonlocal acked
        try:
            while True:
                try:
                    await js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
                    acked += 1
                    return
                except Exception:  # the server is away: the same id again, stored once
                    await asyncio.sleep(0.2)
        finally:
            sem.release()

    start = time.monotonic()
    tasks = []
    for seq in range(1, args.count + 1):
        due = start + (seq - 1) / args.rate
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
        await sem.acquire()
        ts = int(time.time() * 1000)
        device = f"dev-{seq % args.devices:04d}"
        payload = json.dumps(
            {
                "device_id": device,
                "seq": seq,
                "ts": ts,
                "temperature_c": 20.0 + (seq % 100) / 10.0,
                "humidity": 50.0,
                "battery_v": 3.7,
                "status": "ok",
            }
        ).encode()
        if log:
            log.write(f"{seq} {device} {ts}\n")
        tasks.append(
            asyncio.create_task(publish(f"{args.prefix}.{device}.reading", payload, str(seq)))
        )
        if len(tasks) >= 4096:
            tasks = [t for t in tasks if not t.done()]
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=180)
    if log:
        log.close()
    await nc.drain()
    print(json.dumps({"good": args.count, "poison": [], "acked": acked, "sent": args.count}))
    return 0 if acked >= args.count else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
