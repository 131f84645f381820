"""The paho ceiling: a paho-mqtt client draining QoS 1 with manual acks and no other work.

Usage: python -m bench.paho_drain PORT COUNT. Prints ``subscribed`` once the SUBACK is in and,
once COUNT messages have been received and acknowledged, ``cpu SECONDS`` (its CPU time since
the SUBACK, every thread) and exits.
"""

from __future__ import annotations

import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main() -> None:
    port, count = int(sys.argv[1]), int(sys.argv[2])
    done = threading.Event()
    seen = 0
    cpu0 = 0.0
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"paho-ceiling-{port}",
                         protocol=mqtt.MQTTv311, clean_session=True, manual_ack=True)
    client.max_inflight_messages_set(1000)

    def on_connect(c: mqtt.Client, u: object, f: object, rc: object, p: object) -> None:
        c.subscribe("substation/#", qos=1)

    def on_subscribe(c: mqtt.Client, u: object, mid: int, rc: object, p: object) -> None:
        nonlocal cpu0
        cpu0 = time.process_time()
        print("subscribed", flush=True)

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal seen
        c.ack(msg.mid, msg.qos)
        seen += 1
        if seen >= count:
            print(f"cpu {time.process_time() - cpu0:.3f}", flush=True)
            done.set()
            c.disconnect()

    client.on_connect, client.on_subscribe = on_connect, on_subscribe
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_forever()


if __name__ == "__main__":
    main()
