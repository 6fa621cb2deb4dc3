"""The detector's ticks: every reading is scored, a busy line every `tick_ms`, a quiet one in fewer,
larger ticks (in process: the bus, the twin and the detector, no broker)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.bus import EventBus, StateChanged
from gateway.detect.detector import QUIET_TICKS, TICK_READINGS, AnomalyDetector
from gateway.metrics import GatewayMetrics
from gateway.twin.registry import TwinRegistry
from tests.helpers.configs import gateway_config

T0 = 1_700_000_000.0
THING = "s:oven-001"


class Line:
    def __init__(self, bus: EventBus, registry: TwinRegistry, detector: AnomalyDetector, metrics: GatewayMetrics):
        self.bus, self.registry, self.detector, self.metrics = bus, registry, detector, metrics
        self.thing = registry.ensure(THING, "oven", {})
        self.sent = 0
        self.stopped = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.detector.stop()

    def reading(self) -> None:
        self.sent += 1
        self.bus.publish(StateChanged(THING, self.thing, feature="thermal", properties={"temperature": 180.0},
                                      timestamp=T0 + self.sent))

    def scored(self) -> float:
        return float(self.metrics.detect_readings._value.get())

    def ticks(self) -> float:
        return float(sum(s.value for m in self.metrics.detect_tick_seconds.collect() for s in m.samples
                         if s.name.endswith("_count")))

    async def all_scored(self, within: float = 30.0) -> None:
        deadline = time.monotonic() + within
        while self.scored() < self.sent:
            assert time.monotonic() < deadline, (self.scored(), self.sent)
            await asyncio.sleep(0.005)


@pytest.fixture
async def line(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Line]:
    tick_ms = getattr(request, "param", 20)
    cfg = gateway_config(tmp_path, ("127.0.0.1", 1), **{"detect.enabled": True, "detect.tick_ms": tick_ms,
                                                        "gateway.data_dir": str(tmp_path)})
    bus, metrics = EventBus(), GatewayMetrics()
    registry = TwinRegistry(Path(cfg.gateway.data_dir) / "twin.sqlite", bus)
    await registry.start()
    detector = AnomalyDetector(cfg, registry, bus, metrics)
    await detector.start()
    running = Line(bus, registry, detector, metrics)
    try:
        yield running
    finally:
        await running.stop()
        await registry.stop()


async def test_a_quiet_line_is_scored_in_fewer_ticks_and_every_reading_is_scored(line: Line) -> None:
    # 80 readings 5 ms apart at tick_ms = 20: a tick per tick_ms would make one every 20 ms; with
    # fewer than TICK_READINGS waiting a tick comes once per QUIET_TICKS times tick_ms at most.
    start = time.monotonic()
    for _ in range(80):
        line.reading()
        await asyncio.sleep(0.005)
    await line.all_scored()
    elapsed = time.monotonic() - start
    assert line.ticks() <= elapsed / (QUIET_TICKS * 0.020) + 2, (line.ticks(), elapsed)


@pytest.mark.parametrize("line", [1000], indirect=True)
async def test_a_tick_s_worth_of_readings_is_scored_without_waiting_for_the_longest_wait(line: Line) -> None:
    # tick_ms = 1 s: readings that fill a tick are scored a tick_ms after the last tick, not after
    # QUIET_TICKS times tick_ms (1.5 s); fewer wait the longest, and are scored too.
    await asyncio.sleep(0.1)
    start = time.monotonic()
    for _ in range(TICK_READINGS):
        line.reading()
    await line.all_scored()
    assert time.monotonic() - start < QUIET_TICKS * 1.0 - 0.2  # within a tick_ms, whatever the phase
    line.reading()
    await line.all_scored()
    assert line.scored() == TICK_READINGS + 1


async def test_stopping_scores_what_is_waiting(line: Line) -> None:
    for _ in range(5):
        line.reading()
    await line.stop()
    assert line.scored() == 5
