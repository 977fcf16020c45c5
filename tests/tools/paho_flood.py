#!/usr/bin/env python3
"""Publishes COUNT messages at QOS with paho-mqtt's in-flight window set to WINDOW (paho
ignores the CONNACK's Receive Maximum), then reports what happened as one JSON line:
{"acked": ..., "connects": ..., "disconnects": ..., "seconds": ...}; "seconds" runs from the
first publish to the last acknowledgement (or the time limit).

Usage: paho_flood.py HOST PORT {3.1.1|5} CLIENT_ID TOPIC [COUNT] [WINDOW] [QOS] [SIZE]
Each payload is the message's number, padded to SIZE bytes. Exit status 0 if every message
was acknowledged within the time limit, 1 otherwise.
"""
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def main():
    host, port, version, client_id, topic = sys.argv[1:6]
    count = int(sys.argv[6]) if len(sys.argv) > 6 else 1000
    window = int(sys.argv[7]) if len(sys.argv) > 7 else 1000
    qos = int(sys.argv[8]) if len(sys.argv) > 8 else 1
    size = int(sys.argv[9]) if len(sys.argv) > 9 else 0
    protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
    stats = {"acked": 0, "connects": 0, "disconnects": 0}
    lock = threading.Lock()
    connected = threading.Event()
    done = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        with lock:
            stats["connects"] += 1
        connected.set()

    def on_disconnect(client, userdata, flags, reason_code, properties):
        with lock:
            stats["disconnects"] += 1

    def on_publish(client, userdata, mid, reason_code, properties):
        with lock:
            stats["acked"] += 1
            if stats["acked"] >= count:
                done.set()

    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=protocol,
        clean_session=None if protocol == mqtt.MQTTv5 else True,
    )
    client.max_inflight_messages_set(window)
    client.max_queued_messages_set(0)
    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_publish = on_publish
    client.connect(host, int(port), keepalive=30)
    client.loop_start()
    if not connected.wait(10):
        print(json.dumps({**stats, "error": "no CONNACK"}))
        return 1
    start = time.monotonic()
    for i in range(count):
        client.publish(topic, payload=str(i).rjust(size, "."), qos=qos)
    ok = done.wait(60)
    stats["seconds"] = round(time.monotonic() - start, 3)
    time.sleep(0.2)
    client.disconnect()
    client.loop_stop()
    with lock:
        print(json.dumps(stats), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
