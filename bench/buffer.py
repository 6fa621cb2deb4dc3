"""Buffer benchmark: prints one JSON line per figure (see DESIGN.md for the targets).

On a real DuckDB file: append points/s through the ingest path (flatten, series ids, group commit
of NumPy columns), history for 24 h of one 1 Hz property (86,400 raw points, and 1-minute buckets)
out of a line's day, answered as the API answers (JSON), and bytes per point on disk.

    python bench/buffer.py [--series 40] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from harness import emit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.buffer.buffer import TelemetryBuffer
from gateway.common.history import HistoryQuery, run_query
from gateway.common.readings import Sample
from gateway.config import GatewayConfig, load_config
from gateway.metrics import GatewayMetrics

DAY = 86_400
T0 = 1_789_948_800.0  # a UTC midnight


def config(data: Path) -> GatewayConfig:
    return load_config(GatewayConfig, None, environ={}, overrides={
        "gateway.site": "bench", "gateway.line": "line-a", "gateway.id": "gw-bench", "gateway.data_dir": str(data),
        "auth.open": True, "buffer.disk_budget_mb": 0, "buffer.late_s": 0,
    })


def signal(rng: np.random.Generator, n: int, base: float) -> np.ndarray:
    """A sensor-like 1 Hz signal: slow cycle, small noise, two decimals."""
    t = np.arange(n)
    return np.round(base + 5 * np.sin(t / 900) + rng.normal(0, 0.2, n), 2)


async def main(series: int, quick: bool) -> None:
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory(prefix="egiz-bench-") as tmp:
        buf = TelemetryBuffer(config(Path(tmp)), GatewayMetrics())
        await buf.start()
        seconds = DAY // (8 if quick else 1)
        things = max(1, series // 4)
        # A line's day: `things` ovens x 4 properties at 1 Hz, as 10-sample batched messages.
        values = {i: {p: signal(rng, seconds, 150 + 10 * k) for k, p in enumerate(("t0", "t1", "t2", "power"))}
                  for i in range(things)}
        appended = 0
        start = time.perf_counter()
        for chunk in range(0, seconds, 10):
            for i in range(things):
                vals = values[i]
                batch = [Sample("thermal", T0 + s, s + 1, {p: float(vals[p][s]) for p in ("t0", "t1", "t2", "power")})
                         for s in range(chunk, min(chunk + 10, seconds))]
                buf.add(f"bench:oven-{i:03d}", "oven", batch, T0 + chunk, ("b", chunk + 10, (1 << 10) - 1))
                appended += 4 * len(batch)
            if len(buf._batch) >= 50_000:
                await buf.flush()
        await buf.flush()
        elapsed = time.perf_counter() - start
        emit("buffer_append", appended / elapsed, "points/s", "reference (>= 100000 to keep up with ingest)",
             points=appended)
        await buf.maintain(now=T0 + seconds + 3600)
        await asyncio.get_running_loop().run_in_executor(None, buf.store.checkpoint)
        db = Path(tmp) / "buffer.duckdb"
        size = db.stat().st_size + (db.with_suffix(".duckdb.wal").stat().st_size
                                    if db.with_suffix(".duckdb.wal").exists() else 0)
        emit("buffer_bytes_per_point", size / appended, "bytes", "reference", points=appended)

        def timed(q: HistoryQuery, runs: int = 7) -> tuple[float, int]:
            times, body = [], ""
            for _ in range(runs):
                t = time.perf_counter()
                body, _ct = run_query(buf, buf.store, q)
                times.append((time.perf_counter() - t) * 1000)
            doc = json.loads(body)
            n = sum(len(s["points"]["t"]) for s in doc["series"])
            return statistics.median(times), n

        raw_q = HistoryQuery("bench:oven-000", T0, T0 + seconds, "thermal", "t1", "raw")
        ms, n = await buf.read(lambda: timed(raw_q))
        emit("history_24h_raw", ms, "ms", "<= 100", points=n, series_in_file=things * 4)
        bucket_q = HistoryQuery("bench:oven-000", T0, T0 + seconds, "thermal", "t1", "1m")
        ms, n = await buf.read(lambda: timed(bucket_q))
        emit("history_24h_1m_buckets", ms, "ms", "<= 30", buckets=n, series_in_file=things * 4)
        await buf.stop()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--series", type=int, default=40, help="stored properties in the file (4 per oven)")
    ap.add_argument("--quick", action="store_true", help="3 hours instead of 24")
    args = ap.parse_args()
    asyncio.run(main(args.series, args.quick))
