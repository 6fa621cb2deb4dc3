"""The gateway's memory budget: what the machine offers, DuckDB's share of it, and a check at start.

A line gateway shares a small board (a 1 GB Raspberry Pi 3, a 512 MB Pi Zero 2 W) with Mosquitto
and the system. At start the gateway measures its own resident memory, adds what it may still
grow by (DuckDB's memory limit, live state per Thing, WebSocket queues), and compares the sum with
the memory of the machine (or of its cgroup, under systemd or in a container). Over the share it
may take, it warns once, with the figures and the settings that lower them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MiB = 2**20
DUCKDB_MIN_MB = 64
DUCKDB_MAX_MB = 256
DUCKDB_SHARE = 1 / 16  # of the machine's memory, when buffer.memory_limit_mb is 0 (automatic)
GATEWAY_SHARE = 0.5  # of the machine's memory the whole gateway process may take before we warn
# The live state of a Thing of 3 features x 3 properties (twin, series, sequence marks, detector), measured as
# `bench/footprint.py`'s (peak RSS with 10,000 such Things - RSS when ready) / 10,000 (docs/performance.md)
THING_KIB = 8.4
WS_EVENT_KIB = 0.5  # one queued StateChanged event with its JSON
WS_CLIENTS_BUDGETED = 10  # viewers whose queues are counted full (ws.max_clients bounds connections, not this)


M_ARENA_MAX = -8  # glibc's mallopt() parameter
MALLOC_ARENAS = 2


def limit_native_caches() -> None:
    """Keep freed native memory from piling up in per-thread caches: at most two glibc malloc arenas
    (every DuckDB, SQLite and detector thread would otherwise get its own, each keeping what it
    freed), and Arrow's buffers from the system allocator, which returns memory as it is freed.
    Called before the gateway starts its threads; a no-op where glibc is not the C library.

    Arrow is told through its environment variable, read when it first allocates: the gateway loads
    pyarrow only for the uplink and history exports, and importing it alone takes about 28 MiB."""
    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):  # musl and others: nothing to tune
            ctypes.CDLL(name).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def native_heap_bytes() -> int | None:
    """Bytes glibc's malloc has handed out and not had back, over all its arenas (`mallinfo2`: in use
    in its heaps plus its mmapped blocks). What native code (DuckDB, Arrow, onnxruntime) and Python's
    larger objects hold, without the pages malloc keeps free. None where glibc (2.33 or later) is not
    the C library."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    info = fn()
    return int(info.uordblks + info.hblkhd)


GC_YOUNG_THRESHOLD = 20_000  # allocations between collections of the youngest generation (Python's default: 700)


def settle_heap() -> None:
    """Tell Python's cycle collector what a running gateway looks like. What exists once it has started
    (modules, configuration, the twin and the series of every Thing) lives as long as the process:
    it is collected once and then frozen, so later collections no longer walk it. And the youngest
    generation is collected every 20,000 allocations instead of 700: a message's objects are freed
    by their reference counts as soon as it is applied, so the collector finds almost nothing in
    them, but the events held a moment by the detector and the OEE tracker made it run (and promote
    them) thousands of times a second. Cycles are still collected; the memory they can hold is
    bounded by the threshold."""
    gc.collect()
    gc.freeze()
    _gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, gen1, gen2)


def release_heap() -> None:
    """Undo `settle_heap`'s freeze when the gateway stops: what it froze can be collected again."""
    gc.unfreeze()


def machine_memory_mb(meminfo: Path = Path("/proc/meminfo"),
                      cgroup: Path = Path("/sys/fs/cgroup/memory.max")) -> float | None:
    """The memory this process may use: the machine's, or its cgroup's limit when lower (None: unknown)."""
    total: float | None = None
    try:
        m = re.search(r"^MemTotal:\s+(\d+) kB", meminfo.read_text(), re.M)
        total = int(m.group(1)) / 1024 if m else None
    except OSError:
        total = None
    try:
        limit = cgroup.read_text().strip()
        if limit.isdigit():
            limited = int(limit) / MiB
            total = limited if total is None else min(total, limited)
    except OSError:
        pass
    return total


def resident_mb(status: Path = Path("/proc/self/status")) -> float | None:
    """This process's resident memory now (None where /proc is missing)."""
    try:
        m = re.search(r"^VmRSS:\s+(\d+) kB", status.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) / 1024 if m else None


def duckdb_limit_mb(configured: float, machine_mb: float | None) -> float:
    """DuckDB's memory limit: as configured, or (0) a sixteenth of the machine, 64..256 MB."""
    if configured > 0:
        return configured
    if machine_mb is None:
        return DUCKDB_MAX_MB
    return float(max(DUCKDB_MIN_MB, min(DUCKDB_MAX_MB, int(machine_mb * DUCKDB_SHARE))))


@dataclass(frozen=True)
class MemoryBudget:
    """What the gateway expects to need at most, part by part, against what the machine has."""

    machine_mb: float | None
    resident_mb: float
    duckdb_mb: float
    things_mb: float
    websocket_mb: float

    @property
    def total_mb(self) -> float:
        return self.resident_mb + self.duckdb_mb + self.things_mb + self.websocket_mb

    @property
    def allowed_mb(self) -> float | None:
        return None if self.machine_mb is None else self.machine_mb * GATEWAY_SHARE

    @property
    def over(self) -> bool:
        allowed = self.allowed_mb
        return allowed is not None and self.total_mb > allowed


def budget(*, resident: float, duckdb_mb: float, things: int, ws_queue: int,
           machine_mb: float | None) -> MemoryBudget:
    """The budget of a gateway with `things` Things and ten viewers with full WebSocket queues."""
    return MemoryBudget(machine_mb, resident, duckdb_mb, things * THING_KIB / 1024,
                        WS_CLIENTS_BUDGETED * ws_queue * WS_EVENT_KIB / 1024)


def check_budget(b: MemoryBudget) -> None:
    """Log the budget; warn once, clearly, when it exceeds the share of the machine a gateway may take."""
    figures = {"machine_mb": None if b.machine_mb is None else round(b.machine_mb),
               "resident_mb": round(b.resident_mb), "duckdb_limit_mb": round(b.duckdb_mb),
               "things_mb": round(b.things_mb, 1), "websocket_queues_mb": round(b.websocket_mb, 1),
               "budget_mb": round(b.total_mb)}
    if b.over:
        log.warning(
            "the gateway may need %d MiB, more than half of this machine's %d MiB: lower "
            "buffer.memory_limit_mb, ws.max_clients or ws.queue_size, or run fewer Things per gateway",
            round(b.total_mb), round(b.machine_mb or 0), extra=figures)
    else:
        log.info("memory budget", extra=figures)
