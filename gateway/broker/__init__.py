"""Start and stop an MQTT broker for the demo and the tests, with the settings the gateway needs.

The gateway subscribes with QoS 1 on a persistent session and acknowledges each message only after
it has applied it (manual PUBACK). Mosquitto's defaults work against that: 20 messages in flight
throttle such a subscriber to 20 messages per round trip, and a queue of 1000 silently drops the
backlog of a gateway that is restarting. `render_mosquitto_conf` writes settings that keep the
broker fast and lossless; docs/broker.md explains each.

`BrokerProcess` runs `mosquitto -c <generated conf>`. When Mosquitto is not installed,
`EmbeddedBroker` (a small MQTT 3.1.1 broker of our own, loopback only) keeps `egiz demo`
working; `start_broker` picks one.

The package: `settings` (what both brokers share), `mosquitto` (the generated configuration and the
process), `passwords` (hashes and password files), `embedded` (the fallback broker).
"""

from __future__ import annotations

import logging
from typing import Literal

from gateway.broker.embedded import EmbeddedBroker, topic_matches, valid_topic_filter, valid_topic_name
from gateway.broker.mosquitto import BrokerProcess, find_mosquitto, render_mosquitto_conf
from gateway.broker.passwords import hash_password, read_password_file, verify_password, write_password_file
from gateway.broker.settings import INSTALL_HINT, MQTT_MAX_PAYLOAD, BrokerError, BrokerSettings, find_free_port

__all__ = [
    "INSTALL_HINT", "MQTT_MAX_PAYLOAD", "BrokerError", "BrokerProcess", "BrokerSettings", "EmbeddedBroker",
    "find_free_port", "find_mosquitto", "hash_password", "read_password_file", "render_mosquitto_conf",
    "start_broker", "topic_matches", "valid_topic_filter", "valid_topic_name", "verify_password",
    "write_password_file",
]

log = logging.getLogger(__name__)


async def start_broker(settings: BrokerSettings, *,
                       prefer: Literal["mosquitto", "embedded"] = "mosquitto") -> BrokerProcess | EmbeddedBroker:
    """Start Mosquitto when it is installed (and preferred), the embedded broker otherwise."""
    broker: BrokerProcess | EmbeddedBroker
    exe = find_mosquitto() if prefer == "mosquitto" else None
    if exe is not None:
        broker = BrokerProcess(settings, executable=exe)
        log.info("using Mosquitto", extra={"executable": exe, "port": settings.port})
    else:
        if prefer == "mosquitto":
            log.info("Mosquitto is not installed; using the embedded broker (demo only)",
                     extra={"install": INSTALL_HINT, "port": settings.port})
        else:
            log.info("using the embedded broker", extra={"port": settings.port})
        broker = EmbeddedBroker(settings)
    await broker.start()
    return broker
