"""MQTT read benchmark: CPU time to read and parse one single-sample PUBLISH, paho's way and the gateway's.

Feeds `--messages` QoS 1 PUBLISH packets (the footprint benchmark's payload shape, 200 devices) through a
socket pair into the gateway's `ReadAhead` on a real (unconnected) aiomqtt client, once with every packet
left to paho (an `MQTTMessage` per message) and once parsed from the chunk, and prints the reading
thread's CPU time per message (median of `--rounds`). Nothing but the read is measured: the messages are
only counted.

    python bench/mqtt_read.py [--messages 20000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import threading
import time

import aiomqtt
from harness import emit, options, run

from gateway.ingest.mqtt import ReadAhead


def publish(i: int) -> bytes:
    topic = f"openegiz/bench/proofer/proofer-{i % 200:03d}/thermal/telemetry".encode()
    payload = json.dumps({"ts": 1.8e9 + i / 1000, "seq": i // 200 + 1, "boot": "b1",
                          "properties": {"temperature": 31.2, "humidity": 0.71}}).encode()
    body = len(topic).to_bytes(2, "big") + topic + (i % 65535 + 1).to_bytes(2, "big") + payload
    n, length = len(body), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        length.append(byte | (0x80 if n else 0))
        if not n:
            return bytes([0x32]) + bytes(length) + body


async def read_all(data: bytes, n: int, own: bool) -> float:
    """CPU seconds of this thread to read and parse `n` packets."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client = aiomqtt.Client("127.0.0.1")
    paho_client = client._client
    paho_client._sock = ours
    count = [0]

    def on_publish(topic: bytes, payload: bytes, qos: int, mid: int) -> None:
        count[0] += 1

    def on_message(message: object) -> None:
        count[0] += 1

    paho_client._handle_on_message = on_message  # type: ignore[method-assign]
    reader = ReadAhead(client, paho_client, on_publish if own else None)
    reader.PAUSE_S = 0  # no socket watching here: the loop below reads until everything is in
    sender = threading.Thread(target=theirs.sendall, args=(data,))
    sender.start()
    t0 = time.thread_time()
    while count[0] < n:
        reader.loop_read()
        await asyncio.sleep(0)
    spent = time.thread_time() - t0
    sender.join()
    ours.close()
    theirs.close()
    return spent


async def main() -> None:
    args = options(__doc__, {"messages": 2000, "rounds": 2}, messages=20_000, rounds=5)
    data = b"".join(publish(i) for i in range(args.messages))
    for own, label in ((False, "paho"), (True, "chunk")):
        spent = [await read_all(data, args.messages, own) for _ in range(args.rounds)]
        emit("mqtt_read_us_per_msg", statistics.median(spent) / args.messages * 1e6, "us", "reference",
             parser=label, messages=args.messages, rounds=args.rounds)


if __name__ == "__main__":
    run(main)
