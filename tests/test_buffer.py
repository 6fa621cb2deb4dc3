"""The DuckDB buffer on a real file: commit and ack, roll-ups against numpy, retention, disk budget,
deadband, outbox cursor, and history through the HTTP API."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

import aiomqtt
import duckdb
import numpy as np
import pytest

from gateway.buffer.buffer import TelemetryBuffer
from gateway.common.readings import Sample
from gateway.config import GatewayConfig
from gateway.memory import native_heap_bytes
from gateway.metrics import GatewayMetrics
from tests.helpers import GatewayFactory, gateway_config, wait_for

T0 = 1_789_999_200.0  # a fixed, minute- and hour-aligned epoch for the reference computations
assert T0 % 3600 == 0


class Acks:
    """A stand-in MQTT client at the hardware edge: records which message ids were acknowledged."""

    def __init__(self) -> None:
        self.acked: list[int] = []
        self.connected = True

    def ack_many(self, acks: list[tuple[int, int]]) -> None:
        self.acked.extend(mid for mid, _qos in acks)

    def is_connected(self) -> bool:
        return self.connected


def config(tmp_path: Path, **overrides: Any) -> GatewayConfig:
    return gateway_config(tmp_path, ("127.0.0.1", 1883), **{"gateway.data_dir": str(tmp_path / "data"), **overrides})


async def open_buffer(cfg: GatewayConfig, *, uplink: bool = False) -> TelemetryBuffer:
    buf = TelemetryBuffer(cfg, GatewayMetrics(), uplink=uplink)
    await buf.start()
    return buf


def samples(values: list[float], times: list[float], feature: str = "thermal", prop: str = "temperature",
            first_seq: int = 1) -> list[Sample]:
    return [Sample(feature, t, first_seq + i, {prop: v}) for i, (v, t) in enumerate(zip(values, times, strict=True))]


async def test_messages_are_acknowledged_only_after_their_points_are_committed(tmp_path: Path) -> None:
    buf = await open_buffer(config(tmp_path, **{"buffer.commit_interval_ms": 5000, "buffer.commit_idle_ms": 5000}))
    try:
        client = Acks()
        buf.add("s:oven-1", "oven", samples([1.0, 2.0], [T0, T0 + 1]), T0 + 2, ("b1", 2, 0b11))
        buf.ack_later(client, 7, 1)
        await asyncio.sleep(0.2)
        assert client.acked == []  # nothing committed yet, so nothing acknowledged
        assert buf.store.point_count() == 0
        await buf.flush()
        assert client.acked == [7]
        assert buf.store.point_count() == 2
        # acknowledgements of a connection that is gone are not sent (the broker redelivers instead)
        client.connected = False
        buf.add("s:oven-1", "oven", samples([3.0], [T0 + 3], first_seq=3), T0 + 4, ("b1", 3, 0b111))
        buf.ack_later(client, 8, 1)
        await buf.flush()
        assert client.acked == [7]
    finally:
        await buf.stop()
    # sequence marks are stored with the points: a restart knows what is already stored
    buf = await open_buffer(config(tmp_path))
    try:
        assert ("s:oven-1", "b1", 3, 0b111) in [(t, b, s, w) for t, b, s, _, w in buf.marks]
        assert buf.store.point_count() == 3
    finally:
        await buf.stop()


async def test_group_commit_by_idle_gap_and_interval(tmp_path: Path) -> None:
    # When the inflow pauses, the commit follows the idle gap, not the (here long) interval
    buf = await open_buffer(config(tmp_path / "idle", **{"buffer.commit_interval_ms": 5000,
                                                          "buffer.commit_idle_ms": 2}))
    try:
        client = Acks()
        start = time.monotonic()
        buf.add("s:m", "mixer", samples([1.0], [T0]), T0, None)
        buf.ack_later(client, 1, 1)
        await wait_for(lambda: client.acked == [1], timeout=4, interval=0.001)
        assert time.monotonic() - start < 2.5  # committed without waiting the 5 s interval
    finally:
        await buf.stop()
    # a steady inflow is committed at the latest after commit_interval_ms, in batches
    buf = await open_buffer(config(tmp_path / "steady", **{"buffer.commit_interval_ms": 100,
                                                            "buffer.commit_idle_ms": 50}))
    try:
        client = Acks()
        stop = time.monotonic() + 0.5
        mid = 1
        while time.monotonic() < stop or mid <= 100:  # half a second, and enough messages on a busy machine
            buf.add("s:m", "mixer", samples([float(mid)], [T0 + mid], first_seq=mid), T0, None)
            buf.ack_later(client, mid, 1)
            mid += 1
            await asyncio.sleep(0.001)
        await buf.flush()
        assert client.acked == list(range(1, mid))
        commits = buf._m.buffer_commits._value.get()
        assert 3 <= commits < mid / 2, commits  # batched, not one commit per message
    finally:
        await buf.stop()


async def test_a_full_acknowledgement_window_is_committed_before_the_interval(tmp_path: Path) -> None:
    # The broker stops sending when its in-flight window is full: the buffer commits once
    # commit_max_messages wait for their acknowledgement, without waiting out a long interval.
    buf = await open_buffer(config(tmp_path, **{"buffer.commit_interval_ms": 5000, "buffer.commit_idle_ms": 5000,
                                                "buffer.commit_max_messages": 40}))
    try:
        client = Acks()
        start = time.monotonic()
        for mid in range(1, 101):
            buf.add("s:m", "mixer", samples([float(mid)], [T0 + mid], first_seq=mid), T0, None)
            buf.ack_later(client, mid, 1)
            await asyncio.sleep(0.001)
        await wait_for(lambda: len(client.acked) >= 80, timeout=4, interval=0.005)
        assert time.monotonic() - start < 2.5  # not the 5 s interval, nor the 5 s idle gap
        assert client.acked == list(range(1, len(client.acked) + 1))  # in arrival order, none twice
        commits = buf._m.buffer_commits._value.get()
        assert 2 <= commits <= 5, commits  # about one per 40 messages, not one per message
        await buf.flush()
        assert client.acked == list(range(1, 101)) and buf.store.point_count() == 100
    finally:
        await buf.stop()


async def test_a_steady_inflow_is_committed_once_per_window_with_the_default_settings(tmp_path: Path) -> None:
    # A line at 500 messages/s never pauses for commit_idle_ms: one commit per commit_interval_ms
    # window, not one per short gap between two messages (which cost a DuckDB transaction each).
    buf = await open_buffer(config(tmp_path))
    try:
        client = Acks()
        start = time.monotonic()
        mid = 1
        while time.monotonic() - start < 1.0:
            buf.add("s:m", "mixer", samples([float(mid)], [T0 + mid], first_seq=mid), T0, None)
            buf.ack_later(client, mid, 1)
            mid += 1
            await asyncio.sleep(0.002)
        elapsed = time.monotonic() - start
        await buf.flush()
        assert client.acked == list(range(1, mid))
        commits = buf._m.buffer_commits._value.get()
        windows = elapsed / 0.1
        assert commits <= windows * 1.5 + 2, (commits, mid)  # a slow machine only makes fewer, larger commits
    finally:
        await buf.stop()


async def test_ten_thousand_new_series_are_stored_in_one_commit_and_known_after_a_restart(tmp_path: Path) -> None:
    # Auto-registration of a large line brings tens of thousands of series at once; row-by-row
    # inserts (about 700 rows/s) would hold the writer, and every acknowledgement, for many seconds.
    cfg = config(tmp_path)
    buf = await open_buffer(cfg)
    things = 5000
    try:
        for i in range(things):
            buf.add(f"s:oven-{i:05d}", "oven", [Sample("thermal", T0, 1, {"a": 1.0, "b": 2.0, "c": 3.0, "d": "x"})],
                    T0, ("b1", 1, 1))
        start = time.monotonic()
        await buf.flush()
        took = time.monotonic() - start
    finally:
        await buf.stop()
    assert took < 15, f"committing {things * 4} new series took {took:.1f} s"
    again = await open_buffer(cfg)
    try:
        assert len(again.series_keys) == things * 4
        assert sum(1 for sid in again.series_keys if sid in again.numeric_series) == things * 3
    finally:
        await again.stop()


def reference_buckets(ts: np.ndarray, vals: np.ndarray, width: int) -> dict[float, tuple[float, ...]]:
    out = {}
    buckets = np.floor(ts / width) * width
    for b in np.unique(buckets):
        sel = buckets == b
        last = vals[sel][np.argmax(ts[sel])]
        out[float(b)] = (vals[sel].min(), vals[sel].max(), vals[sel].mean(), int(sel.sum()), last)
    return out


async def test_rollups_match_numpy_including_late_points_and_survive_retention(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"buffer.late_s": 60, "buffer.raw_retention_days": 1})
    buf = await open_buffer(cfg)
    rng = np.random.default_rng(7)
    try:
        ts = T0 + np.sort(rng.uniform(0, 3 * 3600, 4000))
        vals = np.round(rng.normal(180, 5, len(ts)), 3)
        # the first 3000 arrive in time order; 500 of the rest arrive late, after a roll-up pass
        on_time = np.arange(3000)
        buf.add("s:oven", "oven", samples(vals[on_time].tolist(), ts[on_time].tolist()), T0, None)
        await buf.flush()
        await buf.maintain(now=float(ts[2999]) + 300)
        rest = np.arange(3000, 4000)
        late = rng.permutation(rest)
        buf.add("s:oven", "oven", samples(vals[late].tolist(), ts[late].tolist(), first_seq=3001), T0, None)
        await buf.flush()
        await buf.maintain(now=T0 + 4 * 3600)
        sid = buf.series_of("s:oven")
        for width in (60, 3600, 300):
            got = buf.store.buckets(sid, T0, T0 + 4 * 3600, width)
            ref = reference_buckets(ts, vals, width)
            assert len(got["t"]) == len(ref)
            for i, b in enumerate(got["t"].tolist()):
                lo, hi, avg, n, last = ref[b]
                assert got["min"][i] == pytest.approx(lo)
                assert got["max"][i] == pytest.approx(hi)
                assert got["avg"][i] == pytest.approx(avg)
                assert int(got["count"][i]) == n
                assert got["last"][i] == pytest.approx(last)
        # raw retention (1 day) removes raw points; the roll-ups keep the buckets
        await buf.maintain(now=T0 + 3 * 86400)
        assert buf.store.point_count() == 0
        got = buf.store.buckets(sid, T0, T0 + 4 * 3600, 3600)
        assert int(got["count"].sum()) == 4000
        # and roll-up retention removes those in turn
        await buf.maintain(now=T0 + 400 * 86400)
        assert len(buf.store.buckets(sid, T0, T0 + 4 * 3600, 60)["t"]) == 0
        assert int(buf.store.buckets(sid, T0, T0 + 4 * 3600, 3600)["count"].sum()) == 4000
    finally:
        await buf.stop()


async def fill(buf: TelemetryBuffer, n: int, *, start: int = 0, thing: str = "s:oven") -> None:
    rng = np.random.default_rng(start)
    for chunk in range(start, start + n, 20_000):
        k = min(20_000, start + n - chunk)
        ts = (T0 + np.arange(chunk, chunk + k)).tolist()
        buf.add(thing, "oven", samples(rng.normal(0, 1, k).tolist(), ts, first_seq=chunk + 1), T0, None)
        await buf.flush()


async def test_duckdb_memory_is_measured_and_stays_within_its_limit(tmp_path: Path) -> None:
    buf = await open_buffer(config(tmp_path, **{"buffer.memory_limit_mb": 64}))
    try:
        await fill(buf, 200_000)
        await buf.maintain()
        held = buf._m.buffer_duckdb_memory._value.get()
        assert 0 < held <= 64 * 2**20
    finally:
        await buf.stop()


async def test_the_wal_is_checkpointed_while_the_line_runs(tmp_path: Path) -> None:
    # A steady inflow after a maintenance pass (which measures the file and DuckDB's memory): every
    # commit updates the sequence marks, and DuckDB does not checkpoint such a commit while another
    # transaction is open. A result left unfinished by one of those measurements once held a read
    # transaction open until the next pass, so the WAL and DuckDB's memory grew until the memory
    # limit refused every commit.
    buf = await open_buffer(config(tmp_path, **{"buffer.checkpoint_mb": 1}))
    wal = tmp_path / "data" / "buffer.duckdb.wal"
    try:
        await fill(buf, 20_000)
        await buf.maintain()
        largest = 0
        rng = np.random.default_rng(7)
        for start in range(20_000, 420_000, 20_000):
            ts = (T0 + np.arange(start, start + 20_000)).tolist()
            buf.add("s:oven", "oven", samples(rng.normal(0, 1, 20_000).tolist(), ts, first_seq=start + 1), T0,
                    ("boot-1", start + 20_000, 0))
            await buf.flush()
            largest = max(largest, wal.stat().st_size if wal.exists() else 0)
        assert (tmp_path / "data" / "buffer.duckdb").stat().st_size > 4 * 2**20, "never checkpointed"
        assert largest < 4 * 2**20, f"the WAL grew to {largest / 2**20:.1f} MiB against a 1 MiB threshold"
    finally:
        await buf.stop()


async def marked_fill(buf: TelemetryBuffer, start: int, end: int) -> None:
    """Points with a sequence mark on every commit, as a device's messages bring them."""
    rng = np.random.default_rng(start)
    for first in range(start, end, 20_000):
        ts = (T0 + np.arange(first, first + 20_000)).tolist()
        buf.add("s:oven", "oven", samples(rng.normal(0, 1, 20_000).tolist(), ts, first_seq=first + 1), T0,
                ("boot-1", first + 20_000, 0))
        await buf.flush()


async def test_a_reader_in_a_long_transaction_does_not_hold_the_wal(tmp_path: Path) -> None:
    # Commits only append (the sequence marks too), so DuckDB checkpoints beside an open reader.
    buf = await open_buffer(config(tmp_path, **{"buffer.checkpoint_mb": 1}))
    wal = tmp_path / "data" / "buffer.duckdb.wal"
    reader = buf.store.con.cursor()
    try:
        await fill(buf, 20_000)
        reader.execute("BEGIN")  # a reader in the middle of a long transaction (an export, say)
        reader.execute("SELECT count(*) FROM points").fetchall()
        await marked_fill(buf, 20_000, 220_000)
        held = wal.stat().st_size if wal.exists() else 0
        assert held < 4 * 2**20, f"the WAL grew to {held / 2**20:.1f} MiB against a 1 MiB threshold"
        assert (tmp_path / "data" / "buffer.duckdb").stat().st_size > 4 * 2**20, "never checkpointed"
        reader.execute("COMMIT")
    finally:
        reader.close()
        await buf.stop()


async def test_the_pass_checkpoints_a_wal_past_its_threshold_and_measures_it(tmp_path: Path) -> None:
    buf = await open_buffer(config(tmp_path, **{"buffer.checkpoint_mb": 1}))
    wal = tmp_path / "data" / "buffer.duckdb.wal"
    try:
        buf.store.con.execute("SET checkpoint_threshold = '1GB'")  # DuckDB's own checkpoint did not come
        await marked_fill(buf, 0, 200_000)
        assert wal.stat().st_size > 4 * 2**20
        await buf.maintain()
        assert buf.wal_bytes == (wal.stat().st_size if wal.exists() else 0) < 2**20
        assert buf._m.buffer_wal_bytes._value.get() == buf.wal_bytes
    finally:
        await buf.stop()


@pytest.mark.skipif(native_heap_bytes() is None, reason="measures glibc's heap")
async def test_the_uplinks_durable_numbers_leave_the_native_heap_flat(tmp_path: Path) -> None:
    """The uplink writes its batch numbers twice a batch, for as long as the gateway runs. Written with
    DuckDB's INSERT OR REPLACE, each write left about 2.5 KiB of native memory behind for good; an
    UPDATE of the stored numbers does not. Memory, not time: the figures do not depend on how fast
    the machine is."""
    buf = await open_buffer(config(tmp_path))
    try:
        async def write(n: int, start: int) -> None:
            for i in range(start, start + n):
                await buf.set_state({"uplink.inflight_seq": i + 1, "uplink.inflight_lo": i,
                                     "uplink.inflight_hi": i + 1})
                await buf.confirm_outbox(i + 1, {"uplink.batch_seq": i + 1})

        await write(300, 0)  # DuckDB's own caches and Python's first allocations settle
        before = native_heap_bytes()
        await write(600, 300)
        grown = (native_heap_bytes() or 0) - (before or 0)
        assert grown < 2**20, f"{grown / 2**20:.2f} MiB more after 1,200 writes"
        assert await buf.get_state("uplink.batch_seq") == 900.0
        assert await buf.get_state("uplink.inflight_lo") == 899.0
        assert buf.synced_id == 900
    finally:
        await buf.stop()


@pytest.mark.parametrize("policy", ["drop_oldest", "drop_oldest_synced", "reject_new"])
async def test_disk_budget_policies(tmp_path: Path, policy: str) -> None:
    cfg = config(tmp_path, **{"buffer.disk_budget_mb": 6, "buffer.disk_policy": policy,
                              "buffer.maintenance_interval_s": 3600})
    buf = await open_buffer(cfg, uplink=True)
    try:
        total = 0
        while buf.used_bytes < 6 * 2**20:
            await fill(buf, 200_000, start=total)
            total += 200_000
            await buf.maintain(now=T0)
            if buf.refusing or buf._m.buffer_dropped.labels(policy)._value.get():
                break
        assert total < 3_000_000, "the budget was never reached"
        m = buf._m
        if policy == "drop_oldest":
            assert m.buffer_dropped.labels(policy)._value.get() > 0
            assert buf.used_bytes < 6 * 2**20 and not buf.refusing
            got = buf.store.raw(buf.series_of("s:oven"), 0, 2e9, 10_000_000)
            assert got["ts"].max() == T0 + total - 1  # the newest are kept, the oldest removed
            assert got["ts"].min() > T0
            assert m.buffer_unsent_dropped._value.get() > 0  # nothing was confirmed by the uplink
        elif policy == "drop_oldest_synced":
            # nothing confirmed yet: nothing may be removed, so new points are refused (counted)
            assert buf.refusing
            before = m.buffer_refused._value.get()
            await fill(buf, 1000, start=total)
            assert m.buffer_refused._value.get() == before + 1000
            # the uplink confirms half: exactly those may go, the unsent half stays
            half = buf.store.high_id() // 2
            await buf.confirm_outbox(half)
            await buf.maintain(now=T0)
            assert not buf.refusing
            ids = buf.store.reader().execute("SELECT min(id), count(*) FROM points").fetchone()
            assert ids[0] > 1 and ids[0] <= half + 1
            assert m.buffer_unsent_dropped._value.get() == 0
        else:
            assert buf.refusing and m.buffer_dropped.labels(policy)._value.get() == 0
            stored = buf.store.point_count()
            await fill(buf, 1000, start=total)
            assert buf.store.point_count() == stored
            assert m.buffer_refused._value.get() >= 1000
    finally:
        await buf.stop()


async def write_history(path: Path, series: int, points: int, start: float, step: float) -> None:
    """A large stored history written with SQL into a closed buffer file: `points` values of `series`
    series (ids 2..series + 1) every `step` seconds from `start`, with ids after the file's highest."""
    con = duckdb.connect(str(path))
    try:
        first = con.execute("SELECT coalesce(max(id), 0) + 1 FROM points").fetchone()[0]
        con.execute("INSERT INTO series SELECT range + 2, 's:oven-' || range, 'oven', 'thermal', 't', true "
                    "FROM range(?)", [series])
        con.execute("INSERT INTO points SELECT ? + range, range % ? + 2, ? + range * ?, ? + range * ?, range, "
                    "sin(range / 1000.0), NULL FROM range(?)", [first, series, start, step, start, step, points])
    finally:
        con.close()


async def test_commits_are_not_held_behind_a_slow_maintenance_pass(tmp_path: Path) -> None:
    # Commits acknowledge the broker's messages; the maintenance pass must not hold them. Four million
    # stored points of a thousand series over a day make the pass's roll-ups take a large part of a
    # second here (tens of milliseconds over a line's 30 s of points); meanwhile commits go on.
    cfg = config(tmp_path, **{"buffer.maintenance_interval_s": 3600})
    buf = await open_buffer(cfg)
    buf.add("s:mixer", "mixer", samples([0.0], [T0]), T0, ("b", 0, 1))
    await buf.flush()
    await buf.stop()
    await write_history(tmp_path / "data" / "buffer.duckdb", 1000, 4_000_000, T0, 86400 / 4_000_000)
    buf = await open_buffer(cfg)
    try:
        client = Acks()
        start = time.perf_counter()
        passing = asyncio.create_task(buf.maintain(now=T0 + 2 * 86400))
        waits = []
        mid = 0
        while not passing.done():
            mid += 1
            buf.add("s:mixer", "mixer", samples([float(mid)], [T0 + mid], first_seq=mid), T0, ("b", mid, 1))
            buf.ack_later(client, mid, 1)
            t = time.perf_counter()
            await buf.flush()
            waits.append(time.perf_counter() - t)
        took = time.perf_counter() - start
        result = await passing
        assert result.rolled >= 1000 * 24 * 60  # every series' every minute of the day
        assert client.acked == list(range(1, mid + 1))
        # Behind the pass, one commit would wait for all of it; beside it, many commits finish meanwhile.
        assert len(waits) >= 3 and max(waits) < took / 3, (f"pass {took * 1000:.0f} ms, commits waited "
                                                          f"{[round(w * 1000) for w in waits]} ms")
        assert buf.store.point_count() == 4_000_000 + 1 + mid
    finally:
        await buf.stop()


async def test_passes_beside_commits_fail_no_commit_and_roll_up_every_point_once(tmp_path: Path) -> None:
    # Passes every 50 ms while messages are committed, the uplink moves its cursor and devices reboot:
    # roll-ups, retention (points two hours old, kept ten seconds) and trims of the sequence marks run
    # beside the commits. No commit fails, everything is acknowledged, and every point is in the
    # roll-ups exactly once, also those committed between a pass's roll-up and its retention.
    cfg = config(tmp_path, **{"buffer.maintenance_interval_s": 0.05, "buffer.late_s": 0,
                              "buffer.raw_retention_days": 10 / 86400})
    buf = await open_buffer(cfg, uplink=True)
    try:
        client = Acks()
        old = time.time() - 7200
        mid = 0
        start = time.monotonic()
        while time.monotonic() - start < 3.0:
            for _ in range(50):
                mid += 1
                thing = f"s:oven-{mid % 5}"
                buf.add(thing, "oven", samples([float(mid % 89)], [old + mid * 0.001], first_seq=mid), T0,
                        (f"boot-{mid // 400}", mid, 1))  # a new boot every 400 messages
                buf.ack_later(client, mid, 1)
            if mid % 1000 == 0:
                sent = await buf.read_outbox(limit=500)
                if sent.num_rows:
                    await buf.confirm_outbox(sent.column("id")[-1].as_py(), {"uplink.batch_seq": mid})
            await asyncio.sleep(0.005)
        await buf.flush()
        assert buf.commit_errors == 0
        assert client.acked == list(range(1, mid + 1))
        m = buf._m
        assert m.buffer_dropped.labels("retention")._value.get() > 0  # retention ran during the inflow
        await buf.maintain()
        sids = [sid for i in range(5) for sid in buf.series_of(f"s:oven-{i}")]
        minutes = buf.store.buckets(sids, old - 60, old + 3600, 60)
        assert int(minutes["count"].sum()) == mid
        hours = buf.store.buckets(sids, old - 3600, old + 3600, 3600)
        assert int(hours["count"].sum()) == mid
        assert m.buffer_dropped.labels("retention")._value.get() + buf.store.point_count() == mid
    finally:
        await buf.stop()


async def test_a_pass_that_meets_a_write_conflict_is_tried_again(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    # DuckDB fails the second of two transactions deleting the same row. Another writer holding a
    # roll-up row the pass's retention deletes makes the pass fail that way; once it is gone, the
    # pass is tried again and succeeds.
    caplog.set_level(logging.WARNING, logger="gateway.buffer.buffer")
    buf = await open_buffer(config(tmp_path, **{"buffer.maintenance_interval_s": 3600, "buffer.late_s": 0,
                                                "buffer.rollup_1m_retention_days": 1}))
    try:
        buf.add("s:oven", "oven", samples([1.0, 2.0], [T0, T0 + 61]), T0, None)
        await buf.flush()
        await buf.maintain(now=T0 + 3600)
        con = buf.store.reader()
        assert con.execute("SELECT count(*) FROM rollup_1m").fetchone() == (2,)
        other = buf.store.con.cursor()
        other.execute("BEGIN")
        other.execute("DELETE FROM rollup_1m WHERE bucket = ?", [T0])
        passing = asyncio.create_task(buf.maintain(now=T0 + 2 * 86400))
        await wait_for(lambda: "write conflict" in caplog.text, timeout=10, interval=0.005)
        other.execute("ROLLBACK")
        other.close()
        result = await passing
        assert result.deleted_rollup == 2
        assert con.execute("SELECT count(*) FROM rollup_1m").fetchone() == (0,)
        assert buf.store.point_count() == 2  # raw points are kept 90 days
    finally:
        await buf.stop()


async def test_the_pass_keeps_the_sequence_marks_of_each_things_newest_boots(tmp_path: Path) -> None:
    cfg = config(tmp_path, **{"buffer.maintenance_interval_s": 3600})
    buf = await open_buffer(cfg)
    try:
        for boot in range(6):  # six boots of one Thing, one of another
            buf.add("s:oven", "oven", samples([1.0], [T0 + boot]), T0, (f"b{boot}", 1, 1))
            await buf.flush()
        buf.add("s:mixer", "mixer", samples([1.0], [T0]), T0, ("m", 1, 1))
        await buf.flush()
        await buf.maintain(now=T0)
        # the oldest boot is written again after the trim: it is stored anew, not lost as an update of a gone row
        buf.add("s:oven", "oven", samples([2.0], [T0 + 9], first_seq=2), T0, ("b0", 2, 3))
        await buf.flush()
    finally:
        await buf.stop()
    buf = await open_buffer(cfg)
    try:
        marks = {(t, b): s for t, b, s, _u, _w in buf.marks}
        assert marks == {("s:oven", "b0"): 2, ("s:oven", "b2"): 1, ("s:oven", "b3"): 1, ("s:oven", "b4"): 1,
                         ("s:oven", "b5"): 1, ("s:mixer", "m"): 1}
    finally:
        await buf.stop()


async def test_outbox_reads_in_order_and_its_cursor_is_durable(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    buf = await open_buffer(cfg, uplink=True)
    try:
        await fill(buf, 2500)
        first = await buf.read_outbox(limit=1000)
        assert first.num_rows == 1000
        ids = first.column("id").to_pylist()
        assert ids == sorted(ids) and len(set(ids)) == 1000
        key, ttype = buf.series_keys[first.column("series")[0].as_py()]
        assert (key.thing_id, key.path, ttype) == ("s:oven", "temperature", "oven")
        await buf.confirm_outbox(ids[-1], {"uplink.batch_seq": 7, "uplink.live": 0})
        # several numbers are one transaction: a failure part-way keeps none of them
        with pytest.raises(duckdb.Error):
            await buf.set_state({"uplink.batch_seq": 8, "uplink.live": "not a number"})  # type: ignore[dict-item]
    finally:
        await buf.stop()
    buf = await open_buffer(cfg, uplink=True)
    try:
        rest = await buf.read_outbox(limit=10_000)
        assert rest.num_rows == 1500
        assert rest.column("id")[0].as_py() == ids[-1] + 1
        assert await buf.get_state("uplink.batch_seq") == 7  # moved with the cursor, not by the failed write
    finally:
        await buf.stop()


async def test_deadband_limits_what_is_stored_but_never_what_the_twin_sees(mosquitto, start_gateway: GatewayFactory
                                                                           ) -> None:
    gw = await start_gateway(mosquitto, **{"buffer.deadband": [
        {"type": "oven", "feature": "thermal", "property": "temperature", "absolute": 0.5, "max_interval_s": 0}]})
    topic = f"openegiz/{gw.site}/oven/oven-1/thermal/telemetry"
    values = [180.0, 180.2, 180.4, 180.6, 180.7, 181.2, 181.3, 175.0, 175.1]
    now = time.time()
    async with aiomqtt.Client(*mosquitto) as client:
        for i, v in enumerate(values):
            await client.publish(topic, json.dumps({"ts": now + i, "seq": i + 1, "boot": "b",
                                                    "properties": {"temperature": v, "door": "closed"}}), qos=1)
    await wait_for(lambda: gw.service.ingest.accepted_messages == len(values))
    await gw.service.buffer.flush()
    status, doc = await gw.get(f"/api/v1/things/{gw.thing_id('oven-1')}/history?resolution=raw&property=temperature"
                               f"&from={now - 10}&to={now + 20}")
    assert status == 200
    (series,) = doc["series"]
    assert series["points"]["value"] == [180.0, 180.6, 181.2, 175.0]
    _, thing = await gw.get(f"/api/v1/things/{gw.thing_id('oven-1')}")
    assert thing["features"]["thermal"]["properties"]["temperature"] == 175.1  # the twin saw every value
    _, doc = await gw.get(f"/api/v1/things/{gw.thing_id('oven-1')}/history?resolution=raw&property=door"
                          f"&from={now - 10}&to={now + 20}")
    assert len(doc["series"][0]["points"]["value"]) == len(values)  # no rule: every value stored


async def test_history_api_raw_buckets_csv_and_business_context(mosquitto, start_gateway: GatewayFactory) -> None:
    gw = await start_gateway(mosquitto)
    base = float(int(time.time() // 60 * 60)) - 600
    topic = f"openegiz/{gw.site}/oven/oven-7/thermal/telemetry"
    rows = []
    async with aiomqtt.Client(*mosquitto) as client:
        for i in range(300):  # 10 minutes at 0.5 Hz; batch B-1 for the first 4 minutes, then B-2
            ts = base + 2 * i
            batch = "B-1" if i < 120 else "B-2"
            props = {"temperature": 150 + i % 17, "voltage": {"a": 230.0 + i % 3}, "batch_id": batch}
            rows.append((ts, props))
            await client.publish(topic, json.dumps({"ts": ts, "seq": i + 1, "boot": "b", "properties": props}), qos=1)
    await wait_for(lambda: gw.service.ingest.accepted_messages == 300)
    await gw.service.buffer.flush()
    tid = gw.thing_id("oven-7")
    url = f"/api/v1/things/{tid}/history?from={base}&to={base + 600}"
    status, doc = await gw.get(url + "&resolution=raw&feature=thermal&property=voltage")
    assert status == 200 and doc["resolution"] == "raw"
    (volt,) = doc["series"]
    assert volt["property"] == "voltage.a"
    assert volt["points"]["t"] == [int(ts * 1000) for ts, _ in rows]
    assert volt["points"]["value"] == [p["voltage"]["a"] for _, p in rows]
    status, doc = await gw.get(url + "&resolution=1m&property=temperature")
    temps = np.array([p["temperature"] for _, p in rows], dtype=float)
    times = np.array([ts for ts, _ in rows])
    ref = reference_buckets(times, temps, 60)
    pts = doc["series"][0]["points"]
    assert doc["bucketSeconds"] == 60 and len(pts["t"]) == len(ref) == 10
    for i, t in enumerate(pts["t"]):
        lo, hi, avg, n, last = ref[t / 1000]
        assert (pts["min"][i], pts["max"][i], pts["count"][i], pts["last"][i]) == (lo, hi, n, last)
        assert pts["avg"][i] == pytest.approx(avg)
    # business context: only the times the oven carried batch B-2
    status, doc = await gw.get(url + "&resolution=raw&property=temperature&batch_id=B-2")
    assert status == 200 and doc["context"] == {"batch_id": "B-2"}
    assert doc["series"][0]["points"]["t"] == [int(ts * 1000) for ts, p in rows if p["batch_id"] == "B-2"]
    # CSV export
    status, text = await gw.get(url + "&resolution=raw&property=temperature&format=csv")
    table = list(csv.reader(io.StringIO(text)))
    assert table[0] == ["time", "feature", "property", "value"] and len(table) == 301
    assert table[1][1:] == ["thermal", "temperature", str(float(rows[0][1]["temperature"]))]
    # auto keeps small answers raw
    status, doc = await gw.get(url + "&property=temperature")
    assert doc["resolution"] == "raw"
    # clear errors
    status, err = await gw.get(url + "&resolution=fortnight")
    assert status == 400 and "resolution" in err["detail"]
    status, err = await gw.get(url + "&shift=night")
    assert status == 400 and "shift" in err["detail"]
    status, _ = await gw.get("/api/v1/things/nope:nothing/history")
    assert status == 404


def test_buffer_config_problems_name_their_keys(tmp_path: Path) -> None:
    from gateway.common.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        config(tmp_path, **{"buffer.disk_policy": "keep_everything", "buffer.commit_idle_ms": 600,
                            "buffer.deadband": [{"property": "temperature"}, {"property": "bad name", "absolute": 1}],
                            "buffer.context_keys": ["batch id"]})
    keys = dict(err.value.problems)
    assert set(keys) == {"buffer.disk_policy", "buffer.commit_idle_ms", "buffer.deadband[0]",
                         "buffer.deadband[1].property", "buffer.context_keys[0]"}
    assert "drop_oldest_synced" in keys["buffer.disk_policy"]
