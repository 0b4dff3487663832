"""Clients that are not ours (paho-mqtt) against a broker: the scenarios of the
embedded broker's tests. Each prints one JSON line with what it saw.

  shared      two MQTT 5 subscribers in one shared group ($share/g/...), a MQTT 3.1.1
              publisher sending --count QoS 1 messages: how many each got, distinct.
  persistent  a MQTT 3.1.1 subscriber with clean_session=False subscribes and leaves;
              --count messages are published while it is away; it comes back and
              counts what it receives (session_present too).
  login       connects with --user/--password: the CONNACK's reason code.
"""

import argparse
import json
import threading
import time

import paho.mqtt.client as mqtt

V2 = mqtt.CallbackAPIVersion.VERSION2


def connect(port, client_id, protocol=mqtt.MQTTv5, clean=True, user=None, password=None, on_message=None):
    seen = {"rc": None, "present": None}
    done = threading.Event()
    if protocol == mqtt.MQTTv5:
        c = mqtt.Client(V2, client_id=client_id, protocol=protocol)
    else:
        c = mqtt.Client(V2, client_id=client_id, protocol=protocol, clean_session=clean)
    if user is not None:
        c.username_pw_set(user, password)

    def on_connect(client, userdata, flags, reason_code, properties):
        seen["rc"] = int(reason_code.value) if hasattr(reason_code, "value") else int(reason_code)
        seen["present"] = bool(flags.session_present)
        done.set()

    c.on_connect = on_connect
    if on_message:
        c.on_message = on_message
    if protocol == mqtt.MQTTv5:
        c.connect("127.0.0.1", port, keepalive=30, clean_start=clean)
    else:
        c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    if not done.wait(10):
        raise SystemExit("no CONNACK within 10 s")
    return c, seen


def publish_all(port, topic, count, protocol=mqtt.MQTTv311):
    p, _ = connect(port, "paho-pub-%d" % time.time_ns(), protocol=protocol)
    infos = [p.publish(topic, str(i), qos=1) for i in range(count)]
    for i in infos:
        i.wait_for_publish(30)
    p.disconnect()
    p.loop_stop()
    return sum(1 for i in infos if i.is_published())


def until(check, within=20):
    end = time.time() + within
    while time.time() < end and not check():
        time.sleep(0.05)


def shared(args):
    got = {"a": [], "b": []}
    lock = threading.Lock()
    subs = []
    for name in ("a", "b"):
        def on_message(client, userdata, msg, name=name):
            with lock:
                got[name].append(msg.payload.decode())
        c, _ = connect(args.port, "%s-%s" % (args.prefix, name), on_message=on_message)
        r = threading.Event()
        c.on_subscribe = lambda *a, r=r: r.set()
        c.subscribe("$share/g/%s/+" % args.prefix, qos=1)
        r.wait(10)
        subs.append(c)
    acked = publish_all(args.port, "%s/x" % args.prefix, args.count)
    until(lambda: len(got["a"]) + len(got["b"]) >= args.count)
    time.sleep(0.3)
    for c in subs:
        c.disconnect()
        c.loop_stop()
    both = got["a"] + got["b"]
    print(json.dumps({"acked": acked, "a": len(got["a"]), "b": len(got["b"]), "distinct": len(set(both)), "total": len(both)}))


def persistent(args):
    cid = "%s-persist" % args.prefix
    c, _ = connect(args.port, cid, protocol=mqtt.MQTTv311, clean=False)
    r = threading.Event()
    c.on_subscribe = lambda *a: r.set()
    c.subscribe("%s/p" % args.prefix, qos=1)
    r.wait(10)
    c.disconnect()
    c.loop_stop()
    acked = publish_all(args.port, "%s/p" % args.prefix, args.count)
    got = []
    c, seen = connect(args.port, cid, protocol=mqtt.MQTTv311, clean=False, on_message=lambda cl, u, m: got.append(m.payload.decode()))
    until(lambda: len(got) >= args.count)
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()
    print(json.dumps({"acked": acked, "present": seen["present"], "received": len(got), "distinct": len(set(got))}))


def login(args):
    try:
        c, seen = connect(args.port, "%s-login" % args.prefix, user=args.user, password=args.password)
        c.disconnect()
        c.loop_stop()
        rc = seen["rc"]
    except SystemExit:
        rc = -1
    print(json.dumps({"rc": rc}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario", choices=["shared", "persistent", "login"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--user")
    ap.add_argument("--password")
    args = ap.parse_args()
    {"shared": shared, "persistent": persistent, "login": login}[args.scenario](args)


if __name__ == "__main__":
    main()
