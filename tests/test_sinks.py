"""Anomaly sinks against real receivers: an aiohttp server that fails on cue, and Mosquitto.

What a user notices: every event arrives once per id and state, in order, through 5xx, 429, timeouts
and dropped connections; a refusal is not hammered; a full queue loses its oldest events and says so;
`stop()` delivers what is queued; the alert topic gets the event even across a broker restart.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from aiohttp import web

from gateway.detect.sinks import AnomalySink, MqttAlertSink, WebhookSink
from tests.helpers import private_mosquitto, receive, serve, unique_site, wait_for

TOKEN = "Bearer webhook-secret-0000000001"
QUERY_SECRET = "query-secret-0000000002"
CLOSE = "close"  # a scripted reply: drop the connection without answering
SLOW = "slow"  # a scripted reply: answer after the sink's timeout


@dataclass
class Seen:
    key: str | None
    body: Any
    headers: dict[str, str]
    at: float


Reply = tuple[int, dict[str, str]] | str


@dataclass
class Receiver:
    """A webhook receiver that answers the first requests from `script`, then `default`."""

    url: str = ""
    script: list[Reply] = field(default_factory=list)
    default: int = 204
    attempts: list[Seen] = field(default_factory=list)
    accepted: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        seen = Seen(request.headers.get("Idempotency-Key"), await request.json(), dict(request.headers),
                    asyncio.get_running_loop().time())
        self.attempts.append(seen)
        reply: Reply = self.script.pop(0) if self.script else (self.default, {})
        if isinstance(reply, str):
            if reply == CLOSE:
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)  # never reaches the client
            await asyncio.sleep(0.5)  # SLOW
            return web.Response(status=503, text="too late")
        status, headers = reply
        if 200 <= status < 300:
            self.accepted.append(seen)
        # Like careless servers, the error body echoes the request's credentials.
        text = "" if status < 300 else f"scripted {status}; you sent {request.headers.get('Authorization')}"
        return web.Response(status=status, headers=headers, text=text)

    def keys(self, which: list[Seen] | None = None) -> list[str | None]:
        return [s.key for s in (self.accepted if which is None else which)]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner, port = await serve(app)
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    await runner.cleanup()



@pytest.fixture
async def sinks() -> AsyncIterator[list[AnomalySink]]:
    """Sinks a test made; each is stopped at the end even when the test fails."""
    made: list[AnomalySink] = []
    yield made
    for sink in made:
        await sink.stop(drain_timeout_s=0)


def webhook(sinks: list[AnomalySink], url: str, **kw: Any) -> WebhookSink:
    kw = {"backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 2.0, **kw}
    sink = WebhookSink(url, **kw)
    sinks.append(sink)
    return sink


def event(event_id: str, state: str = "open", site: str = "plant-1", **more: Any) -> dict[str, Any]:
    return {"id": event_id, "thingId": f"{site}:oven-01", "thingType": "oven", "severity": "warning",
            "state": state, "explanation": f"{event_id} runs hot", "score": 0.91, **more}


# ------------------------------------------------------------------------------------------- webhook

async def test_failures_are_retried_until_each_event_arrives_once_and_in_order(
        receiver: Receiver, sinks: list[AnomalySink]) -> None:
    receiver.script = [(503, {"Retry-After": "0"}), (500, {}), CLOSE, SLOW, (408, {}), (429, {"Retry-After": "0"})]
    sink = webhook(sinks, receiver.url, max_attempts=10, timeout_s=0.2, headers={"Authorization": TOKEN})
    events = [event("e1"), event("e2"), event("e1", "resolved"), event("e3")]
    for e in events:
        sink.offer(e)
    await sink.start()
    await wait_for(lambda: sink.sent == 4, timeout=5)

    assert receiver.keys() == ["e1-open", "e2-open", "e1-resolved", "e3-open"]
    assert receiver.keys(receiver.attempts[:7]) == ["e1-open"] * 7  # the same key on every retry
    assert len(receiver.attempts) == 10
    assert [s.body for s in receiver.accepted] == events
    first = receiver.accepted[0].headers
    assert first["Content-Type"] == "application/json" and first["Authorization"] == TOKEN
    assert (sink.sent, sink.retries, sink.failed, sink.dropped) == (4, 6, 0, 0)


async def test_a_400_is_not_retried_and_is_logged_once_without_secrets(
        receiver: Receiver, sinks: list[AnomalySink], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.detect.sinks")
    receiver.script = [(400, {})]
    sink = webhook(sinks, f"{receiver.url}?token={QUERY_SECRET}", headers={"Authorization": TOKEN})
    sink.offer(event("e1"))
    sink.offer(event("e2"))
    await sink.start()
    await wait_for(lambda: sink.sent + sink.failed == 2, timeout=5)

    assert receiver.keys(receiver.attempts) == ["e1-open", "e2-open"]
    assert (sink.sent, sink.retries, sink.failed) == (1, 0, 1)
    refusals = [r for r in caplog.records if getattr(r, "status", None) == 400]
    assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
    assert getattr(refusals[0], "url", None) == receiver.url.rsplit("/", 1)[0] + "/…"  # no path: it may hold a key
    assert getattr(refusals[0], "event_id", None) == "e1"
    logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert TOKEN not in logged and QUERY_SECRET not in logged


async def test_exhausted_retries_count_failed_and_the_next_event_still_goes(
        receiver: Receiver, sinks: list[AnomalySink]) -> None:
    receiver.script = [(500, {}), (502, {}), CLOSE]
    sink = webhook(sinks, receiver.url, max_attempts=3)
    sink.offer(event("e1"))
    sink.offer(event("e2"))
    await sink.start()
    await wait_for(lambda: sink.sent + sink.failed == 2, timeout=5)
    assert receiver.keys(receiver.attempts) == ["e1-open"] * 3 + ["e2-open"]
    assert (sink.sent, sink.retries, sink.failed) == (1, 2, 1)


async def test_retry_after_is_honoured_and_capped(receiver: Receiver, sinks: list[AnomalySink]) -> None:
    # Our own backoff would wait up to 30 s; Retry-After: 0 says now.
    receiver.script = [(503, {"Retry-After": "0"})]
    eager = webhook(sinks, receiver.url, backoff_s=30, max_backoff_s=30)
    eager.offer(event("e1"))
    await eager.start()
    await wait_for(lambda: eager.sent == 1, timeout=1.5)

    # An hour is capped at max_backoff_s.
    receiver.script = [(429, {"Retry-After": "3600"})]
    capped = webhook(sinks, receiver.url, backoff_s=30, max_backoff_s=0.3)
    capped.offer(event("e2"))
    await capped.start()
    await wait_for(lambda: capped.sent == 1, timeout=3)
    first, second = receiver.attempts[-2:]
    assert (first.key, second.key) == ("e2-open", "e2-open")
    assert 0.29 <= second.at - first.at < 1.5
    assert (eager.retries, capped.retries) == (1, 1)


async def test_a_full_queue_drops_the_oldest_and_counts_them(
        receiver: Receiver, sinks: list[AnomalySink], caplog: pytest.LogCaptureFixture) -> None:
    sink = webhook(sinks, receiver.url, queue_size=3)
    for i in range(1, 6):
        sink.offer(event(f"e{i}"))  # before start: nothing is being delivered
    assert sink.dropped == 2
    assert len([r for r in caplog.records if "queue full" in r.getMessage()]) == 1  # once per overflow
    await sink.start()
    await wait_for(lambda: sink.sent == 3, timeout=5)
    assert receiver.keys() == ["e3-open", "e4-open", "e5-open"]


async def test_stop_delivers_what_is_queued(receiver: Receiver, sinks: list[AnomalySink]) -> None:
    receiver.script = [(503, {"Retry-After": "0"})]
    sink = webhook(sinks, receiver.url)
    await sink.start()
    for i in range(20):
        sink.offer(event(f"e{i}"))
    await sink.stop(drain_timeout_s=5)
    assert receiver.keys() == [f"e{i}-open" for i in range(20)]
    assert (sink.sent, sink.retries, sink.failed, sink.dropped) == (20, 1, 0, 0)


async def test_stop_gives_up_at_its_timeout_and_counts_what_it_abandons(
        receiver: Receiver, sinks: list[AnomalySink]) -> None:
    receiver.default = 500
    sink = webhook(sinks, receiver.url, max_attempts=1000, backoff_s=0.02, max_backoff_s=0.02)
    for i in range(3):
        sink.offer(event(f"e{i}"))
    await sink.start()
    await wait_for(lambda: len(receiver.attempts) >= 2, timeout=5)
    loop = asyncio.get_running_loop()
    began = loop.time()
    await sink.stop(drain_timeout_s=0.3)
    assert 0.25 <= loop.time() - began < 1.5
    assert (sink.sent, sink.failed, sink.dropped) == (0, 0, 3)
    sink.offer(event("late"))
    assert sink.dropped == 4


async def test_events_that_cannot_be_sent_count_failed_and_never_raise(
        receiver: Receiver, sinks: list[AnomalySink]) -> None:
    sink = webhook(sinks, receiver.url)
    sink.offer({"state": "open"})  # no id: no Idempotency-Key
    sink.offer(event("bad\r\nX-Injected: 1"))  # would split the header
    sink.offer(event("e0", extra=object()))  # not JSON
    sink.offer("not even a dict")  # type: ignore[arg-type]
    sink.offer(event("e1", score=math.nan))  # a failed read: sent as null
    await sink.start()
    await wait_for(lambda: sink.sent == 1, timeout=5)
    assert sink.failed == 4
    assert receiver.accepted[0].body["score"] is None and receiver.keys() == ["e1-open"]


def test_invalid_settings_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="absolute http"):
        WebhookSink("ftp://example.com/hook")
    with pytest.raises(ValueError, match="max_attempts"):
        WebhookSink("http://127.0.0.1/hook", max_attempts=0)
    with pytest.raises(ValueError, match="queue_size"):
        MqttAlertSink("127.0.0.1", 1883, client_id="x", queue_size=0)


# ---------------------------------------------------------------------------------------------- mqtt

def mqtt_sink(sinks: list[AnomalySink], broker: tuple[str, int], site: str, **kw: Any) -> MqttAlertSink:
    sink = MqttAlertSink(*broker, client_id=f"alerts-{site}", reconnect_min_s=0.05, reconnect_max_s=0.2, **kw)
    sinks.append(sink)
    return sink


async def test_an_alert_arrives_on_its_thing_topic_at_qos1_not_retained(
        mosquitto: tuple[str, int], sinks: list[AnomalySink]) -> None:
    site = unique_site()
    sink = mqtt_sink(sinks, mosquitto, site)
    sink.offer({**event("e0", site=site), "thingType": None})  # no type: no topic
    sink.offer(event("e0", site=site, thingId="no-colon"))
    assert sink.failed == 2
    alert = event("e1", site=site)
    async with aiomqtt.Client(*mosquitto) as sub:
        await sub.subscribe(f"openegiz/{site}/#", qos=1)
        sink.offer(alert)
        await sink.start()
        (m,) = await receive(sub, 1)
        await wait_for(lambda: sink.sent == 1, timeout=5)
    assert (m.topic.value, m.qos, m.retain) == (f"openegiz/{site}/oven/oven-01/anomaly", 1, False)
    assert isinstance(m.payload, bytes) and json.loads(m.payload) == alert
    assert (sink.sent, sink.retries, sink.failed, sink.dropped) == (1, 0, 2, 0)


async def test_a_full_alert_queue_drops_the_oldest(mosquitto: tuple[str, int], sinks: list[AnomalySink]) -> None:
    site = unique_site()
    sink = mqtt_sink(sinks, mosquitto, site, queue_size=2)
    async with aiomqtt.Client(*mosquitto) as sub:
        await sub.subscribe(f"openegiz/{site}/+/+/anomaly", qos=1)
        for i in range(1, 4):
            sink.offer(event(f"e{i}", site=site))
        await sink.start()
        got = await receive(sub, 2)
    assert [json.loads(m.payload)["id"] for m in got if isinstance(m.payload, bytes)] == ["e2", "e3"]
    assert (sink.sent, sink.dropped) == (2, 1)


async def test_alerts_queued_while_the_broker_is_down_arrive_after_it_returns(
        tmp_path: Path, sinks: list[AnomalySink]) -> None:
    broker = private_mosquitto(tmp_path)
    await broker.start()
    try:
        site = unique_site()

        def subscriber() -> aiomqtt.Client:
            """A persistent session: the broker keeps its QoS 1 messages while it is away."""
            return aiomqtt.Client(broker.host, broker.port, identifier=f"sub-{site}", clean_session=False)

        async with subscriber() as sub:
            await sub.subscribe(f"openegiz/{site}/+/+/anomaly", qos=1)
        sink = mqtt_sink(sinks, (broker.host, broker.port), site)
        await sink.start()
        sink.offer(event("e1", site=site))
        await wait_for(lambda: sink.sent == 1, timeout=5)

        await broker.stop()
        await wait_for(lambda: not sink.connected.is_set(), timeout=5)
        sink.offer(event("e2", site=site))
        sink.offer(event("e3", site=site))
        await asyncio.sleep(0.3)  # several reconnect attempts fail meanwhile
        assert sink.sent == 1
        await broker.start()
        await wait_for(lambda: sink.sent == 3, timeout=5)

        async with subscriber() as sub:
            got = await receive(sub, 3)
        assert [json.loads(m.payload)["id"] for m in got if isinstance(m.payload, bytes)] == ["e1", "e2", "e3"]
        assert (sink.failed, sink.dropped) == (0, 0)
        await sink.stop()
    finally:
        await broker.stop()
