"""DeviceRunner: one device's life — connect, poll on its own clock, normalise, deliver; and when
the device fails, count it, log the change once, back off with capped jitter, open the circuit
breaker and probe. Polling never stops while the runner runs: every exception of a cycle, expected
or not, is one failed cycle.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

from gateway.common.backoff import full_jitter
from gateway.connectors.base import (
    Connector,
    DeviceConfig,
    DeviceError,
    ProtocolSpec,
    RawValue,
    ReadingSink,
    SharedLinks,
    TagValue,
    WriteRefused,
)
from gateway.connectors.health import ConnectorMetrics, DeviceHealth, HealthSnapshot
from gateway.connectors.normalise import DeviceNormaliser

log = logging.getLogger(__name__)
HEALTH_EVERY_S = 10.0
STOP_WAIT_S = 0.5
STOP_ATTEMPTS = 20  # the connectivity feature's statistics are refreshed this often while nothing changes


class HealthSink(ReadingSink, Protocol):
    """A reading sink that also shows each device's health (the gateway's `ConnectorPipeline`)."""

    def health(self, device: DeviceConfig, snapshot: HealthSnapshot) -> None: ...


class DeviceRunner:
    """Owns one device's connector and polling task."""

    def __init__(self, device: DeviceConfig, spec: ProtocolSpec, links: SharedLinks, sink: HealthSink,
                 metrics: ConnectorMetrics, *, first_delay_s: float) -> None:
        self.device = device
        self.connector: Connector[Any, Any] = spec.connector_type(device, links)
        self.normaliser = DeviceNormaliser(device)
        self.health = DeviceHealth(time.time())
        self._sink = sink
        self._m = metrics
        self._first_delay = first_delay_s
        self._task: asyncio.Task[None] | None = None
        self._connected = False
        self._subscribed = False
        self._last_health = 0.0
        self._stopping = False
        self.cycles = 0

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._sink.health(self.device, self.health.snapshot())
        self._task = asyncio.create_task(self._run(), name=f"connector-{self.device.name}")

    async def stop(self) -> None:
        """Stop polling (an in-flight request is cancelled) and close the connection."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            # asyncio.wait_for before Python 3.12 (which libraries use inside) can swallow a cancellation
            # that arrives as its inner call completes; so cancel again until the task has ended
            for _ in range(STOP_ATTEMPTS):
                task.cancel()
                done, _ = await asyncio.wait({task}, timeout=STOP_WAIT_S)
                if done:
                    break
            else:
                log.error("the device's task did not stop; abandoned", extra={"device": self.device.name})
        await self._close()
        self._m.forget(self.device.name)

    async def _close(self) -> None:
        self._connected = self._subscribed = False
        try:
            await self.connector.close()
        except Exception:  # close must not stop the loop; the connection is dropped either way
            log.debug("closing the connection failed", exc_info=True, extra={"device": self.device.name})

    @property
    def backoff_cap_s(self) -> float:
        return self.device.retry_max_s or self.device.poll_s

    # ----------------------------------------------------------------- the loop
    async def _run(self) -> None:
        dev = self.device
        await asyncio.sleep(self._first_delay)
        failures = 0
        next_at = time.monotonic()
        while not self._stopping:
            try:
                await self._cycle()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every fault of one device is counted, logged once, retried
                if self._stopping:  # a library that turned our cancellation into its own error
                    break
                failures += 1
                self._failed(exc, failures)
                await self._close()
                await asyncio.sleep(self._retry_delay(failures))
                next_at = time.monotonic()
                continue
            failures = 0
            next_at += dev.poll_s
            now = time.monotonic()
            if next_at < now:  # the cycle overran: skip the missed ticks instead of bursting
                missed = int((now - next_at) / dev.poll_s) + 1
                self._m.overruns.labels(dev.name).inc(missed)
                next_at += missed * dev.poll_s
            await asyncio.sleep(next_at - now)

    async def _cycle(self) -> None:
        dev = self.device
        if not self._connected:
            async with asyncio.timeout(dev.timeout_s * 2):
                await self.connector.connect()
            self._connected = True
            if not self._subscribed:
                self._subscribed = await self.connector.subscribe(self._push)
        t0 = time.monotonic()
        # a guard above the connector's own per-request timeouts: a library that hangs still fails the cycle
        async with asyncio.timeout(dev.timeout_s * 4 + dev.poll_s * 2):
            result = await self.connector.read()
        seconds = time.monotonic() - t0
        self._push(result.values)
        self.cycles += 1
        self._m.polls.labels(dev.name, "ok").inc()
        self._m.requests.labels(dev.name).inc(result.requests)
        self._m.poll_seconds.labels(dev.name).observe(seconds)
        self._m.online.labels(dev.name).set(1)
        self._m.breaker_open.labels(dev.name).set(0)
        now = time.time()
        if self.health.succeeded(seconds, result.requests, now):
            log.info("device online", extra={"device": dev.name, "protocol": dev.protocol})
            self._report(now)
        elif now - self._last_health >= HEALTH_EVERY_S:
            self._report(now)

    def _push(self, values: Sequence[RawValue]) -> None:
        if values:
            self._sink.deliver(self.device, self.normaliser.normalise(values))

    def _failed(self, exc: BaseException, failures: int) -> None:
        dev = self.device
        if isinstance(exc, DeviceError):
            reason, text = exc.reason, exc.detail
        elif isinstance(exc, TimeoutError):
            reason, text = "timeout", f"no answer within {dev.timeout_s} s"
        else:
            reason, text = "error", f"{type(exc).__name__}: {exc}"
        error = f"{reason}: {text}"[:300]
        self._m.polls.labels(dev.name, "error").inc()
        self._m.errors.labels(dev.name, reason).inc()
        self._m.online.labels(dev.name).set(0)
        now = time.time()
        was_online = self.health.state == "online"
        changed = self.health.failed(error, now)
        if failures == dev.breaker_failures:
            self.health.breaker = "open"
            self._m.breaker_open.labels(dev.name).set(1)
            log.warning("circuit breaker open: probing the device", extra={
                "device": dev.name, "failures": failures, "probe_s": self._probe_s(), "error": error})
            changed = True
        if changed:
            if was_online or failures == 1:
                log.warning("device offline", extra={"device": dev.name, "protocol": dev.protocol, "error": error})
            self._report(now)
        if not isinstance(exc, DeviceError | TimeoutError | OSError):
            log.debug("unexpected error from the connector", exc_info=exc, extra={"device": dev.name})

    def _probe_s(self) -> float:
        return self.device.breaker_probe_s or self.backoff_cap_s

    def _retry_delay(self, failures: int) -> float:
        if self.health.breaker == "open":
            return self._probe_s()
        return full_jitter(failures - 1, self.device.retry_min_s, self.backoff_cap_s)

    def _report(self, now: float) -> None:
        self._last_health = now
        snap = self.health.snapshot()
        self._m.success_rate.labels(self.device.name).set(snap.success_rate)
        self._sink.health(self.device, snap)

    # ----------------------------------------------------------------- commands
    async def write(self, feature: str, prop: str, value: Any) -> TagValue:
        """Write one tag (inverse scaling), read it back, deliver the value read; returns it (stored unit)."""
        dev = self.device
        tag = self.normaliser.tag(feature, prop)
        if tag is None or tag.calculated:
            raise WriteRefused(f"{dev.name} has no tag {feature}.{prop}", device=dev.name)
        raw = self.normaliser.to_raw(tag, value)
        if not self._connected or self.health.state != "online":
            self._m.writes.labels(dev.name, "offline").inc()
            raise DeviceError("offline", f"{dev.name} is offline: {self.health.last_error}")
        try:
            async with asyncio.timeout(dev.timeout_s * 3):
                back_raw = await self.connector.write(tag, raw)
        except WriteRefused:
            self._m.writes.labels(dev.name, "refused").inc()
            raise
        except DeviceError:
            self._m.writes.labels(dev.name, "failed").inc()
            raise
        except (TimeoutError, OSError) as exc:
            self._m.writes.labels(dev.name, "failed").inc()
            raise DeviceError("timeout", f"writing {feature}.{prop} to {dev.name}: {exc or 'no answer'}") from exc
        self._m.writes.labels(dev.name, "ok").inc()
        back = self.normaliser.from_raw(tag, back_raw)
        return back
