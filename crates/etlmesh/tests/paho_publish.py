"""A publisher that is not ours: paho-mqtt (MQTT 5, QoS 1) sending readings as JSON.

Used by the stream fault tests. It paces `--count` good readings at `--rate` per
second over `--devices` topics `<prefix>/<device>/reading`; with `--poison-every-ms`
it also sends, that often, a reading whose `status` holds a NUL byte (valid JSON,
which PostgreSQL refuses in a text column). It waits until the broker acknowledged
every message and prints one JSON line: {"good": n, "poison": [seq, ...], "acked": n}.
Sequence numbers are unique across good and poisoned readings. With `--log FILE` it
writes `seq device ts` of each good reading, so that a test can compute what every
event-time window must count. It reconnects by itself when the broker restarts.
"""

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=1883)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--devices", type=int, default=50)
    ap.add_argument("--poison-every-ms", type=float, default=0)
    ap.add_argument("--client-id", default="")
    ap.add_argument("--log", default="", help="write `seq device ts` of every good reading here")
    ap.add_argument("--topic", default="{prefix}/{device}/reading")
    ap.add_argument("--payload-bytes", type=int, default=0, help="pad each reading with a text field this long")
    args = ap.parse_args()
    log = open(args.log, "w") if args.log else None

    acked = 0
    lock = threading.Lock()

    def on_publish(client, userdata, mid, reason_code, properties):
        nonlocal acked
        with lock:
            acked += 1

    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=args.client_id,
        protocol=mqtt.MQTTv5,
    )
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    # A broker that restarts: reconnect soon; what was not acknowledged is sent again,
    # what is published meanwhile waits in paho's queue.
    c.reconnect_delay_set(min_delay=0.05, max_delay=1)
    c.on_publish = on_publish
    c.connect(args.host, args.port, keepalive=30)
    c.loop_start()

    start = time.monotonic()
    next_poison = start
    poison = []
    sent = 0
    seq = 0
    good = 0
    while good < args.count:
        # paho numbers messages 1..65535: never have more than that unacknowledged.
        with lock:
            backlog = sent - acked
        if backlog >= 20000:
            time.sleep(0.005)
            continue
        now = time.monotonic()
        due = start + good / args.rate
        if due > now:
            time.sleep(min(due - now, 0.01))
            continue
        seq += 1
        ts = int(time.time() * 1000)
        device = f"dev-{seq % args.devices:04d}"
        if args.poison_every_ms > 0 and now >= next_poison:
            next_poison = now + args.poison_every_ms / 1000.0
            payload = reading(seq, device, ts, "bad\u0000byte", args.payload_bytes)
            poison.append(seq)
        else:
            payload = reading(seq, device, ts, "ok", args.payload_bytes)
            good += 1
            if log:
                log.write(f"{seq} {device} {ts}\n")
        c.publish(args.topic.format(prefix=args.prefix, device=device), payload, qos=1)
        sent += 1

    if log:
        log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with lock:
            if acked >= sent:
                break
        time.sleep(0.05)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"good": good, "poison": poison, "acked": acked, "sent": sent}))
    return 0 if acked >= sent else 1


def reading(seq: int, device: str, ts: int, status: str, pad: int) -> str:
    r = {
        "device_id": device,
        "seq": seq,
        "ts": ts,
        "temperature_c": 20.0 + (seq % 100) / 10.0,
        "humidity": 50.0,
        "battery_v": 3.7,
        "status": status,
    }
    if pad:
        r["payload"] = "x" * pad
    return json.dumps(r)


if __name__ == "__main__":
    sys.exit(main())
