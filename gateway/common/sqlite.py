"""One SQLite file owned by one worker thread, so blocking SQLite calls never run on the event loop."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import sqlite_utils

T = TypeVar("T")


class SqliteWorker:
    """Runs every call against the file on a single dedicated thread (SQLite connections are thread-bound)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-{path.name}")
        self._db: sqlite_utils.Database | None = None

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None)
        # WAL + NORMAL: one fsync per checkpoint instead of per commit, kind to SD cards; a crash
        # can lose the last commits but never corrupts the file.
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=5000")
        self._db = sqlite_utils.Database(conn)

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open)

    async def call(self, fn: Callable[[sqlite_utils.Database], T]) -> T:
        """Run `fn(db)` on the worker thread and return its result."""
        def run() -> T:
            assert self._db is not None, "SqliteWorker.open() was not awaited"
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.conn.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)
