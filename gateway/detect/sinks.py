"""Notification sinks: anomaly events out to a webhook or an MQTT topic, without ever blocking the detector.

Each sink owns a bounded queue (when it is full the oldest event is dropped and counted) and one
delivery task that sends events in order, one at a time. Delivery is at least once: a retry after a
lost response, or a resend after a lost PUBACK, can repeat an event, so receivers de-duplicate by the
event's id and state (the webhook sends them as `Idempotency-Key`; the MQTT payload carries them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import ssl
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import aiohttp
import aiomqtt
from yarl import URL

from gateway import __version__
from gateway.common.backoff import full_jitter, retry_after
from gateway.common.names import THING_ID_RE, TYPE_RE

log = logging.getLogger(__name__)

Event = dict[str, Any]
_RETRY_AFTER_STATUSES = frozenset({429, 503})
_RETRYABLE_4XX = frozenset({408, 429})
_DETAIL_BYTES = 200  # of a refusal's body, for the log


class AnomalySink(Protocol):
    """What the detector needs from a notification channel: hand over an event now, deliver it later."""

    def offer(self, event: Event) -> None: ...

    async def start(self) -> None: ...

    async def stop(self, drain_timeout_s: float = 5.0) -> None: ...


_Item = TypeVar("_Item", bound="_Outgoing")


@dataclass(slots=True)
class _Outgoing:
    label: str  # the event id, for logs
    body: bytes
    attempts: int = 0


@dataclass(slots=True)
class _Request(_Outgoing):
    key: str = ""  # Idempotency-Key


@dataclass(slots=True)
class _Publish(_Outgoing):
    topic: str = ""


class _QueuedSink(ABC, Generic[_Item]):
    """The bounded queue, counters and lifecycle both sinks share; subclasses encode and deliver."""

    kind = "sink"

    def __init__(self, queue_size: int) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, not {queue_size}")
        self.queue_size = queue_size
        self.sent = 0  # delivered (2xx / PUBACK)
        self.retries = 0  # attempts after the first, over all events
        self.failed = 0  # refused, retries exhausted, or not encodable
        self.dropped = 0  # pushed out of a full queue, offered after stop, or abandoned by stop
        self._queue: deque[_Item] = deque()
        self._current: _Item | None = None  # taken from the queue, not settled yet
        self._work = asyncio.Event()
        self._closing = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._overflowing = False

    @property
    @abstractmethod
    def where(self) -> str:
        """The destination, safe to log."""

    @abstractmethod
    def _encode(self, event: Event) -> _Item: ...

    @abstractmethod
    async def _run(self) -> None:
        """Deliver until closing and drained; cancelled by `stop` when the drain takes too long."""

    async def _open(self) -> None:
        """Acquire what delivery needs (called by `start`)."""

    async def _close(self) -> None:
        """Release it (called by `stop` once the delivery task has ended)."""

    def offer(self, event: Event) -> None:
        """Queue `event` for delivery; never blocks and never raises."""
        if self._stopped:
            self.dropped += 1
            log.warning("anomaly event offered after the sink stopped; dropped",
                        extra={"sink": self.kind, "destination": self.where, "event_id": _label(event)})
            return
        try:
            item = self._encode(event)
        except Exception as exc:  # whatever the event holds, the detector must not be disturbed
            self.failed += 1
            log.warning("anomaly event cannot be sent", extra={
                "sink": self.kind, "destination": self.where, "event_id": _label(event),
                "error": f"{type(exc).__name__}: {exc}"})
            return
        if len(self._queue) >= self.queue_size:
            self._queue.popleft()
            self.dropped += 1
            if not self._overflowing:  # once per overflow, not once per event
                self._overflowing = True
                log.warning("anomaly sink queue full; dropping the oldest events", extra={
                    "sink": self.kind, "destination": self.where, "queue_size": self.queue_size})
        self._queue.append(item)
        self._work.set()

    async def start(self) -> None:
        """Begin delivering, including what was offered before."""
        if self._task is not None or self._stopped:
            return
        await self._open()
        self._task = asyncio.create_task(self._run(), name=f"anomaly-{self.kind}")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """Say at once when delivery dies of a bug; the queue then fills and its drops are counted."""
        if not task.cancelled() and task.exception() is not None:
            log.error("anomaly sink delivery stopped by an unexpected error", exc_info=task.exception(),
                      extra={"sink": self.kind, "destination": self.where})

    async def stop(self, drain_timeout_s: float = 5.0) -> None:
        """Deliver what is queued within `drain_timeout_s`, then cancel; what is left is counted dropped."""
        self._stopped = True
        self._closing.set()
        self._work.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=max(0.0, drain_timeout_s))
            if not done:
                task.cancel()
                await asyncio.wait({task})
        abandoned = len(self._queue) + (self._current is not None)
        self._queue.clear()
        self._current = None
        if abandoned:
            self.dropped += abandoned
            log.warning("anomaly sink stopped before delivering everything", extra={
                "sink": self.kind, "destination": self.where, "abandoned": abandoned,
                "drain_timeout_s": drain_timeout_s})
        await self._close()

    async def _next(self) -> _Item | None:
        """The next event to deliver, an unsettled one first; None once closing and drained."""
        while True:
            if self._current is not None:
                return self._current
            if self._queue:
                self._current = self._queue.popleft()
                if not self._queue:
                    self._overflowing = False
                return self._current
            if self._closing.is_set():
                return None
            self._work.clear()
            await self._work.wait()

    def _settle(self) -> None:
        self._current = None


# ------------------------------------------------------------------------------------------- webhook

@dataclass(frozen=True, slots=True)
class _Outcome:
    sent: bool
    retry: bool
    reason: str
    status: int | None = None
    retry_after: float | None = None


class WebhookSink(_QueuedSink[_Request]):
    """POSTs each event as JSON to a URL, in order, retrying what a later attempt may deliver."""

    kind = "webhook"

    def __init__(self, url: str, *, headers: dict[str, str] | None = None, timeout_s: float = 5.0,
                 max_attempts: int = 5, backoff_s: float = 0.5, max_backoff_s: float = 30.0,
                 queue_size: int = 1000) -> None:
        super().__init__(queue_size)
        parsed = URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"webhook url must be an absolute http(s) URL, not {_safe_url(url)!r}")
        for name, value in (("timeout_s", timeout_s), ("backoff_s", backoff_s), ("max_backoff_s", max_backoff_s)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        self.url = url
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._headers = {"User-Agent": f"openegiz-gateway/{__version__}", **(headers or {}),
                         "Content-Type": "application/json"}
        self._where = _safe_url(url)
        self._secrets = tuple(v for v in (headers or {}).values() if len(v) >= 4)  # kept out of logged replies
        self._http: aiohttp.ClientSession | None = None

    @property
    def where(self) -> str:
        return self._where

    def _encode(self, event: Event) -> _Request:
        event_id, state = event.get("id"), event.get("state")
        if not isinstance(event_id, str) or not event_id or state is None:
            raise ValueError("an anomaly event needs an 'id' and a 'state'")
        key = f"{event_id}-{state}"
        revision = event.get("revision")
        if isinstance(revision, int) and not isinstance(revision, bool):
            key = f"{key}-{revision}"  # updates of an open anomaly are distinct deliveries, not retries
        if not (key.isascii() and key.isprintable()):
            raise ValueError("the event's id and state must be printable ASCII to form an Idempotency-Key")
        return _Request(event_id, _to_json(event), key=key)

    async def _open(self) -> None:
        self._http = aiohttp.ClientSession(headers=self._headers,
                                           timeout=aiohttp.ClientTimeout(total=self.timeout_s))

    async def _close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _run(self) -> None:
        while (item := await self._next()) is not None:
            await self._deliver(item)
            self._settle()

    async def _deliver(self, item: _Request) -> None:
        while True:
            if item.attempts:
                self.retries += 1
            item.attempts += 1
            outcome = await self._post(item)
            if outcome.sent:
                self.sent += 1
                return
            if not outcome.retry or item.attempts >= self.max_attempts:
                self.failed += 1
                log.warning("webhook delivery of an anomaly event failed; giving up" if outcome.retry
                            else "webhook refused an anomaly event; not retried", extra={
                                "url": self._where, "status": outcome.status, "reason": outcome.reason,
                                "event_id": item.label, "attempts": item.attempts})
                return
            delay = self._delay(item.attempts, outcome.retry_after)
            log.debug("webhook delivery failed; retrying", extra={
                "url": self._where, "status": outcome.status, "reason": outcome.reason, "event_id": item.label,
                "attempt": item.attempts, "retry_in_s": round(delay, 3)})
            await asyncio.sleep(delay)

    async def _post(self, item: _Request) -> _Outcome:
        assert self._http is not None, "start() opens the session"
        try:
            async with self._http.post(self.url, data=item.body, headers={"Idempotency-Key": item.key},
                                       allow_redirects=False) as r:
                if 200 <= r.status < 300:
                    return _Outcome(sent=True, retry=False, reason="ok", status=r.status)
                detail = self._redact((await r.content.read(_DETAIL_BYTES)).decode("utf-8", "replace"))
                after = retry_after(r.headers.get("Retry-After")) if r.status in _RETRY_AFTER_STATUSES else None
                retry = r.status >= 500 or r.status in _RETRYABLE_4XX
                return _Outcome(sent=False, retry=retry, reason=f"HTTP {r.status} {detail}".strip(),
                                status=r.status, retry_after=after)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # aiohttp's messages may quote the URL, which may carry credentials.
            reason = f"{type(exc).__name__}: {exc}".replace(self.url, self._where)
            return _Outcome(sent=False, retry=True, reason=self._redact(reason))

    def _redact(self, text: str) -> str:
        """A receiver may echo our request in its error body; header values must not reach the log."""
        for secret in self._secrets:
            text = text.replace(secret, "<redacted>")
        return text

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return full_jitter(attempt - 1, self.backoff_s, self.max_backoff_s)  # gateways do not retry in step


# ---------------------------------------------------------------------------------------------- mqtt

class MqttAlertSink(_QueuedSink[_Publish]):
    """Publishes each event to `openegiz/{site}/{type}/{equipment_id}/anomaly`, QoS 1, not retained.

    An event counts as sent once the broker's PUBACK arrives; events queued while the broker is away,
    and one whose PUBACK was lost, are published after reconnecting.
    """

    kind = "mqtt"

    def __init__(self, host: str, port: int, *, username: str | None = None, password: str | None = None,
                 client_id: str, queue_size: int = 1000, tls_context: ssl.SSLContext | None = None,
                 reconnect_min_s: float = 0.5, reconnect_max_s: float = 30.0) -> None:
        super().__init__(queue_size)
        if not 0 < reconnect_min_s <= reconnect_max_s:
            raise ValueError(f"need 0 < reconnect_min_s <= reconnect_max_s, not {reconnect_min_s}, {reconnect_max_s}")
        self.host = host
        self.port = port
        self.client_id = client_id
        self.reconnect_min_s = reconnect_min_s
        self.reconnect_max_s = reconnect_max_s
        self._username = username
        self._password = password
        self._tls = tls_context
        self.connected = asyncio.Event()

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    def _encode(self, event: Event) -> _Publish:
        thing_id, thing_type = event.get("thingId"), event.get("thingType")
        if not isinstance(thing_id, str) or not THING_ID_RE.match(thing_id):
            raise ValueError(f"thingId {thing_id!r} is not 'site:equipment_id'")
        if not isinstance(thing_type, str) or not TYPE_RE.match(thing_type):
            raise ValueError(f"thingType {thing_type!r} is missing or not a valid type")
        site, equipment_id = thing_id.split(":", 1)
        return _Publish(_label(event), _to_json(event), topic=f"openegiz/{site}/{thing_type}/{equipment_id}/anomaly")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        outage_logged = False
        while True:
            if self._closing.is_set() and self._current is None and not self._queue:
                return
            connected_at: float | None = None
            try:
                async with self._new_client() as client:
                    connected_at = loop.time()
                    self.connected.set()
                    if outage_logged:
                        log.info("alert broker reachable again", extra={"broker": self.where})
                        outage_logged = False
                    await self._session(client)
                    return  # closing and drained: leaving the block disconnects cleanly
            except aiomqtt.MqttError as exc:
                failure = exc
            finally:
                self.connected.clear()
            if connected_at is not None and loop.time() - connected_at >= self.reconnect_max_s:
                attempt = 0  # a session that stayed up a while starts the backoff afresh
            delay = full_jitter(attempt, self.reconnect_min_s, self.reconnect_max_s)  # gateways not in step
            attempt += 1
            log.log(logging.DEBUG if outage_logged else logging.WARNING,
                    "alert broker unreachable; reconnecting", extra={
                        "broker": self.where, "client_id": self.client_id, "error": str(failure),
                        "retry_in_s": round(delay, 2), "queued": len(self._queue)})
            outage_logged = True
            await self._pause(delay)

    async def _pause(self, delay: float) -> None:
        """Sleep `delay`; a `stop` that arrives meanwhile ends it, so an empty sink stops at once."""
        if self._closing.is_set():  # draining: keep the backoff, or a dead broker is hammered
            await asyncio.sleep(delay)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._closing.wait()

    def _new_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(self.host, self.port, username=self._username, password=self._password,
                              identifier=self.client_id, clean_session=True, keepalive=30,
                              tls_context=self._tls, timeout=10)

    async def _session(self, client: aiomqtt.Client) -> None:
        """Publish until closing and drained; a lost connection ends the session with MqttError."""
        try:
            async with asyncio.TaskGroup() as tg:
                watcher = tg.create_task(self._watch(client))
                await tg.create_task(self._publish(client))
                watcher.cancel()
        except* aiomqtt.MqttError as group:
            raise group.exceptions[0] from None

    async def _watch(self, client: aiomqtt.Client) -> None:
        # Nothing is subscribed: the message stream is only how a dead connection shows itself, so a
        # publish waiting for its PUBACK is abandoned at once instead of after the client's timeout.
        async for _ in client.messages:
            pass
        raise aiomqtt.MqttError("the broker's message stream ended")

    async def _publish(self, client: aiomqtt.Client) -> None:
        while (item := await self._next()) is not None:
            if item.attempts:
                self.retries += 1
            item.attempts += 1
            try:
                await client.publish(item.topic, item.body, qos=1, retain=False)
            except ValueError as exc:  # paho refuses it (too large): no reconnect will help
                self.failed += 1
                log.warning("anomaly event cannot be published", extra={
                    "broker": self.where, "topic": item.topic, "event_id": item.label, "error": str(exc)})
            else:
                self.sent += 1
            self._settle()
            _raise_if_cancelled()


# ------------------------------------------------------------------------------------------- helpers

def _to_json(event: Event) -> bytes:
    try:
        text = json.dumps(event, separators=(",", ":"), allow_nan=False)
    except ValueError:
        # NaN or inf (a failed read): JSON has no such numbers, and receivers reject them; send null.
        text = json.dumps(_finite(event), separators=(",", ":"), allow_nan=False)
    return text.encode()


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _label(event: Any) -> str:
    event_id = event.get("id") if isinstance(event, dict) else None
    return str(event_id)[:64] if event_id is not None else "?"


def _safe_url(url: str) -> str:
    """Scheme, host and port only: user info, query and even the path may carry credentials
    (chat webhooks put their token in the path)."""
    try:
        u = URL(url)
        return f"{u.scheme}://{u.host}:{u.port}/…" if u.host else "<invalid url>"
    except ValueError:
        return "<invalid url>"


def _raise_if_cancelled() -> None:
    """Restore a cancellation that Python 3.11's `asyncio.wait_for` (inside aiomqtt) can swallow.

    When the PUBACK and the cancellation arrive in the same loop iteration, 3.11's wait_for returns the
    result and drops the CancelledError; the task would then wait for work forever inside its TaskGroup.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
