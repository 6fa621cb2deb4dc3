"""The aggregator's storage: one interface, DuckDB (default, one machine) and PostgreSQL (replicas).

Both keep the gateway's point layout (series + points), so the history answer is built by the same
code on the gateway and on the aggregator (`gateway.common.history`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gateway.common.alarms import JournalQuery
from gateway.common.series import SeriesKey
from gateway.common.wire import Action, Batch


@dataclass(frozen=True)
class Applied:
    """What applying a batch did: `status` is applied, duplicate or out_of_order (then `expected`)."""

    status: str
    points: int = 0
    expected: int = 0


@dataclass
class GatewayRow:
    gateway_id: str
    site: str
    line: str
    last_seq: int
    last_seen: float
    points: int
    backlog: dict[str, float] = field(default_factory=dict)
    lag_s: float = 0.0
    clock_offset_s: float = 0.0


class AggregatorStore(Protocol):
    """What the aggregator needs of a backend. Blocking; called from worker threads."""

    @property
    def numeric_series(self) -> Collection[int]: ...
    @property
    def series_keys(self) -> Mapping[int, tuple[SeriesKey, str]]: ...

    def open(self) -> None: ...
    def close(self) -> None: ...
    def apply(self, batch: Batch, received_at: float) -> Applied: ...
    def gateways(self) -> list[GatewayRow]: ...
    def things(self, *, site: str | None, line: str | None, type_: str | None, limit: int,
               offset: int) -> tuple[list[dict[str, Any]], int]: ...
    def thing(self, thing_id: str) -> dict[str, Any] | None: ...
    def series_of(self, thing_id: str, feature: str | None = None, prop: str | None = None) -> list[int]: ...
    def maintain(self, now: float) -> int: ...
    def point_count(self) -> int: ...
    def stored_seqs(self, thing_id: str, path: str) -> list[tuple[int, int]]: ...
    # anomalies across sites, and operators' actions waiting for their gateway
    # `now` (default: the clock) decides which shelves still silence
    def anomalies(self, query: JournalQuery, now: float | None = None) -> tuple[list[dict[str, Any]], int]: ...
    def anomaly(self, anomaly_id: str, now: float | None = None) -> dict[str, Any] | None: ...
    def add_action(self, gateway_id: str, act: Action) -> None: ...
    # ownership: the gateway that first wrote a Thing, until an admin transfers it
    def owner(self, thing_id: str) -> str | None: ...
    def transfer(self, thing_id: str, gateway_id: str, line: str) -> str | None: ...
    def actions_for(self, gateway_id: str) -> list[Action]: ...
    # the history reads, as the gateway's store has them
    def raw(self, series: list[int], start: float, end: float, limit: int, *,
            text: bool = True) -> dict[str, np.ndarray]: ...
    def count(self, series: list[int], start: float, end: float) -> int: ...
    def buckets(self, series: list[int], start: float, end: float, width: float) -> dict[str, np.ndarray]: ...
    def context_points(self, series: list[int], start: float, end: float) -> dict[str, np.ndarray]: ...


class StoreError(Exception):
    """The backend could not apply or answer; the batch is not applied (the gateway retries)."""


class Refused(StoreError):
    """The batch may never be applied as it is (nothing of it was): answered with `status` (400 or 403)
    and `reason`, naming the Things and anomalies at fault so the gateway can set them aside."""

    def __init__(self, status: int, reason: str, detail: str, thing_ids: Sequence[str] = (),
                 anomaly_ids: Sequence[str] = ()) -> None:
        super().__init__(detail)
        self.status = status
        self.reason = reason
        self.detail = detail
        self.thing_ids = tuple(thing_ids)
        self.anomaly_ids = tuple(anomaly_ids)
