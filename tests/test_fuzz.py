"""Property-based fuzz through a real broker: whatever arrives, the gateway keeps running, applies
what is valid, dead-letters everything else, and good traffic right after still gets through."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.service import GatewayService
from tests.helpers import BROKER_HOST, BROKER_PORT, gateway_config, need_service

SITE = f"fz-{uuid.uuid4().hex[:8]}"
LEVEL = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/+#"), min_size=1, max_size=70)
NAMEISH = st.one_of(st.sampled_from(["temperature", "voltage", "a", "zone_1", "bad name", "", "1x", "x" * 70]),
                    st.text(max_size=12))
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                   st.text(max_size=300))
JSONISH = st.recursive(SCALAR, lambda c: st.lists(c, max_size=5) | st.dictionaries(NAMEISH, c, max_size=5),
                       max_leaves=20)
PROPS = st.dictionaries(NAMEISH, st.one_of(SCALAR, st.lists(st.one_of(st.floats(), st.integers()), max_size=70),
                                           st.dictionaries(NAMEISH, SCALAR, max_size=4)), max_size=6)
NEAR_VALID = st.fixed_dictionaries(
    {"ts": st.one_of(st.just(time.time()), st.floats(), st.integers(), st.text(max_size=5), st.none()),
     "properties": PROPS},
    optional={"seq": st.one_of(st.integers(-5, 2**64), st.floats(), st.text(max_size=3)),
              "extra": JSONISH},
)
BATCH = st.fixed_dictionaries({"samples": st.one_of(st.lists(NEAR_VALID, max_size=4), JSONISH)})
PAYLOAD = st.one_of(
    st.binary(max_size=300),
    JSONISH.map(lambda v: json.dumps(v).encode()),
    NEAR_VALID.map(lambda v: json.dumps(v).encode()),
    BATCH.map(lambda v: json.dumps(v).encode()),
).filter(lambda b: b'"boot"' not in b)  # without a boot id nothing is dropped as a duplicate
TOPIC = st.one_of(
    st.tuples(st.sampled_from(["oven", "mixer", "Oven", "oven.x"]), st.sampled_from(["oven-001", "mixer-001", "_x"]),
              st.sampled_from(["thermal", "motor", "bad-feature"])),
    st.tuples(LEVEL, LEVEL, LEVEL),
).map(lambda t: f"openegiz/{SITE}/{t[0]}/{t[1]}/{t[2]}/telemetry")


class ThreadedGateway:
    """A real gateway on its own event loop thread, so a synchronous hypothesis test can drive it."""

    def __init__(self, tmp: Path) -> None:
        cfg = gateway_config(tmp, (BROKER_HOST, BROKER_PORT), **{"gateway.site": SITE})
        self.service = GatewayService(cfg)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def call(self, coro: Any, timeout: float = 20) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        self.call(self.service.start())
        self.call(asyncio.wait_for(self.service.ingest.connected.wait(), 10))
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadedGateway, paho.Client]]:
    need_service(BROKER_HOST, BROKER_PORT, "Mosquitto", "apt-get install mosquitto")
    with ThreadedGateway(tmp_path_factory.mktemp("fuzz")) as gw:
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2)
        pub.connect(BROKER_HOST, BROKER_PORT)
        pub.loop_start()
        try:
            yield gw, pub
        finally:
            pub.loop_stop()
            pub.disconnect()


SENTINEL_SEQ = iter(range(1, 10**9))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(st.tuples(TOPIC, PAYLOAD), min_size=1, max_size=15))
def test_fuzzed_payloads_and_topics(fuzz_gateway: tuple[ThreadedGateway, paho.Client],
                                    messages: list[tuple[str, bytes]]) -> None:
    gw, pub = fuzz_gateway
    ingest, dead = gw.service.ingest, gw.service.dead_letters
    accepted0, dead0 = ingest.accepted_messages, dead.total
    for topic, payload in messages:
        pub.publish(topic, payload, qos=1).wait_for_publish(5)
    seq = next(SENTINEL_SEQ)
    sentinel = json.dumps({"ts": time.time(), "seq": seq, "boot": "sentinel", "properties": {"n": seq}})
    pub.publish(f"openegiz/{SITE}/sentinel/sentinel-1/check/telemetry", sentinel, qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 10
    while (ingest.accepted_messages - accepted0) + (dead.total - dead0) < len(messages) + 1:
        assert time.monotonic() < deadline, "a message was neither applied nor dead-lettered"
        time.sleep(0.01)
    thing = gw.service.registry.get(f"{SITE}:sentinel-1")
    assert thing is not None and thing.features["check"].properties["n"] == seq  # good traffic got through
    assert (ingest.accepted_messages - accepted0) + (dead.total - dead0) == len(messages) + 1
    assert ingest.connected.is_set()
    assert gw.service.metrics.rejected.labels("internal_error")._value.get() == 0
