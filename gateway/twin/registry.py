"""TwinRegistry: the live Things in memory, persisted to SQLite behind a short write-behind window.

Every change runs on the event loop, so a version check and the change it guards are one atomic
step (optimistic concurrency without locks). Telemetry and feature changes mark the Thing dirty and
are written at most `flush_interval_s` later in one transaction; creates, replaces and deletes are
written before the API answers, so an acknowledged admin change survives a crash.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from gateway.bus import EventBus, StateChanged, ThingLifecycle
from gateway.common.errors import Conflict, Invalid, NotFound
from gateway.common.readings import Sample, Status, dumps_utf8
from gateway.common.sqlite import SqliteWorker
from gateway.common.tasks import cancel_and_wait
from gateway.common.timefmt import iso_utc
from gateway.twin.model import (
    Feature,
    Thing,
    check_name,
    message_rank,
    parse_features,
    parse_relationships,
    thing_from_document,
)
from gateway.twin.query import ThingFilter

log = logging.getLogger(__name__)

CONNECTIVITY = "connectivity"
COMMANDS = "commands"
MAX_PENDING_COMMANDS = 10_000
COMMAND_TTL_S = 3600.0


@dataclass(frozen=True, slots=True)
class PendingCommand:
    cmd_id: str
    thing_id: str
    feature: str
    desired: dict[str, Any]
    issued: float


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch in place: objects merge, `null` removes, anything else replaces.

    Only `target` itself changes in place: a nested object is replaced by a merged copy, because
    events waiting in subscriber queues may share it and must keep the state they were made with.
    """
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict):
            current = target.get(key)
            merged = dict(current) if isinstance(current, dict) else {}
            merge_patch(merged, value)
            target[key] = merged
        else:
            target[key] = value


def _snapshot(thing: Thing) -> dict[str, Any]:
    """The Thing's document with copies of its live dicts, for an event that may wait in a queue."""
    return copy.deepcopy(thing.to_document())


class TwinRegistry:
    """Owns every Thing of the line; the only writer of twin state."""

    def __init__(self, path: Path, bus: EventBus, *, flush_interval_s: float = 1.0) -> None:
        self._sqlite = SqliteWorker(path)
        self._bus = bus
        self._flush_interval = flush_interval_s
        self._things: dict[str, Thing] = {}
        self._dirty: set[str] = set()
        self._deleted: set[str] = set()
        self._commands: OrderedDict[str, PendingCommand] = OrderedDict()
        self.deletions: deque[tuple[float, str]] = deque(maxlen=10_000)  # (when, id): for the uplink
        self._flush_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self.flushes = 0
        self.flush_errors = 0
        self._failing = False

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Open the file, create tables, load every Thing with its last known state."""
        await self._sqlite.open()
        rows = await self._sqlite.call(_load)
        for row in rows:
            thing = _from_row(row)
            self._things[thing.id] = thing
        log.info("twin registry loaded", extra={"things": len(self._things)})
        self._flusher = asyncio.create_task(self._flush_loop(), name="twin-flush")

    async def stop(self) -> None:
        """Write what is dirty and close the file."""
        await cancel_and_wait(self._flusher)
        self._flusher = None
        await self.flush()
        await self._sqlite.close()

    async def check(self, timeout_s: float = 2.0) -> str:
        """"ok" when the registry file answers a query within `timeout_s`, else what is wrong (for /ready)."""
        try:
            await asyncio.wait_for(self._sqlite.call(lambda db: db.execute("SELECT count(*) FROM things").fetchone()),
                                   timeout_s)
        except TimeoutError:
            return f"the registry file did not answer within {timeout_s:g} s"
        except Exception as exc:  # sqlite3.Error, or a worker that is closed
            return f"the registry file cannot be read: {str(exc)[:160]}"
        return "ok"

    @property
    def sqlite(self) -> SqliteWorker:
        return self._sqlite

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self._flush_interval)
            try:
                await self.flush()
            except Exception:  # a full disk must not stop the twin; it is counted, logged once, retried
                self.flush_errors += 1
                if not self._failing:
                    log.exception("twin flush failed; retrying every %.1f s", self._flush_interval)
                self._failing = True
            else:
                if self._failing:
                    log.warning("twin flush works again", extra={"failed_attempts": self.flush_errors})
                self._failing = False

    async def flush(self) -> None:
        """Persist every dirty Thing and every delete in one transaction."""
        async with self._flush_lock:
            if not self._dirty and not self._deleted:
                return
            dirty, deleted = self._dirty, self._deleted
            self._dirty, self._deleted = set(), set()
            rows = [_to_row(self._things[tid]) for tid in dirty if tid in self._things]
            try:
                await self._sqlite.call(lambda db: _write(db, rows, sorted(deleted)))
            except BaseException:
                self._dirty |= dirty  # keep them for the next try
                self._deleted |= deleted
                raise
            self.flushes += 1

    # ----------------------------------------------------------------- reads
    def __len__(self) -> int:
        return len(self._things)

    def get(self, thing_id: str) -> Thing | None:
        return self._things.get(thing_id)

    def changed_since(self, t: float) -> list[Thing]:
        """Things whose state changed after `t` (by their `lastUpdated`)."""
        return [thing for thing in self._things.values() if thing.last_updated > t]

    def newest_update(self) -> float:
        """The latest `lastUpdated` of any Thing (0 when there are none)."""
        return max((t.last_updated for t in self._things.values()), default=0.0)

    def require(self, thing_id: str) -> Thing:
        thing = self._things.get(thing_id)
        if thing is None:
            raise NotFound(f"no Thing {thing_id!r}", thing_id=thing_id)
        return thing

    def query(self, flt: ThingFilter, *, limit: int, offset: int) -> tuple[list[Thing], int]:
        """Things matching `flt`, ordered by id, and the total number of matches."""
        matched = [t for t in self._things.values() if flt.matches(t)]
        matched.sort(key=lambda t: t.id)
        return matched[offset : offset + limit], len(matched)

    # ----------------------------------------------------------------- admin writes
    async def create(self, doc: Any) -> Thing:
        now = time.time()
        thing = thing_from_document(doc, now=now)
        if thing.id in self._things:
            raise Conflict(f"Thing {thing.id!r} exists", thing_id=thing.id)
        self._insert(thing)
        await self.flush()
        return thing

    def ensure(self, thing_id: str, thing_type: str, metadata: dict[str, Any]) -> Thing:
        """The Thing for `thing_id`, registered now if it is new (auto-registration from ingest)."""
        thing = self._things.get(thing_id)
        if thing is None:
            now = time.time()
            thing = Thing(thing_id, thing_type, dict(metadata), last_updated=now, created=now)
            self._insert(thing)
            log.info("registered new Thing", extra={"thing_id": thing_id, "type": thing_type})
        return thing

    def _insert(self, thing: Thing) -> None:
        self._things[thing.id] = thing
        self._deleted.discard(thing.id)
        self._dirty.add(thing.id)
        self._bus.publish(
            ThingLifecycle(thing.id, thing, kind="ThingCreated", version=thing.version,
                           timestamp=thing.last_updated, document=_snapshot(thing))
        )

    async def replace(self, thing_id: str, doc: Any, *, expected_version: int | None) -> Thing:
        """Replace metadata, features and relationships (PUT /things/{id}); keeps id and type."""
        thing = self.require(thing_id)
        self._check_version(thing, expected_version)
        if not isinstance(doc, dict):
            raise Invalid("a Thing must be a JSON object")
        if doc.get("id", thing_id) != thing_id:
            raise Invalid("the id in the body differs from the id in the path")
        if "type" in doc and doc["type"] != thing.type:
            raise Invalid("type cannot be changed; delete and create the Thing instead")
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, dict):
            raise Invalid("metadata must be an object")
        features = parse_features(doc.get("features"))
        relationships = parse_relationships(doc.get("relationships"))
        for name in (CONNECTIVITY,):  # owned by the gateway, not by clients
            if name in thing.features:
                features[name] = thing.features[name]
        thing.metadata = dict(metadata)
        thing.features = features
        thing.relationships = relationships
        self._bump(thing, time.time())
        self._bus.publish(
            ThingLifecycle(thing.id, thing, kind="ThingUpdated", version=thing.version,
                           timestamp=thing.last_updated, document=_snapshot(thing))
        )
        await self.flush()
        return thing

    async def delete(self, thing_id: str, *, expected_version: int | None = None) -> None:
        thing = self.require(thing_id)
        self._check_version(thing, expected_version)
        del self._things[thing_id]
        self.deletions.append((time.time(), thing_id))
        self._dirty.discard(thing_id)
        self._deleted.add(thing_id)
        self._bus.publish(
            ThingLifecycle(thing_id, thing, kind="ThingDeleted", version=thing.version + 1,
                           timestamp=time.time())
        )
        await self.flush()

    # ----------------------------------------------------------------- state changes
    def merge_feature(
        self,
        thing_id: str,
        feature: str,
        *,
        properties: dict[str, Any] | None,
        desired: dict[str, Any] | None,
        expected_version: int | None,
        source: str = "api",
    ) -> Thing:
        """Partial update of one feature (merge patch); never replaces the Thing."""
        check_name(feature, "feature")
        thing = self.require(thing_id)
        self._check_version(thing, expected_version)
        f = thing.features.get(feature)
        if f is None:
            f = thing.features[feature] = Feature()
        if properties:
            merge_patch(f.properties, properties)
        if desired:
            merge_patch(f.desired, desired)
        now = time.time()
        self._bump(thing, now)
        self._bus.publish(  # the event keeps its own copy of the patch, whoever holds the original
            StateChanged(thing.id, thing, feature=feature, properties=copy.deepcopy(properties or {}),
                         desired=copy.deepcopy(desired), version=thing.version, timestamp=now, source=source)
        )
        return thing

    def apply_samples(self, thing: Thing, samples: list[Sample], now: float,
                      generation: int | None = None) -> None:
        """Telemetry: each property takes the newest value; one version step per message.

        `generation` (of the node's boot, from the sequence tracker) and each sample's seq order the
        messages of a node (`message_rank`). A late message — one
        that arrives after a newer message of the same feature was applied — does not overwrite
        the newer values: it only fills properties the feature does not have yet, and changes
        nothing (no version step, no event) when there are none. Its points are stored anyway.

        The event and the live state share the samples' values (a `voltage` object, a list) without
        copying them: nothing changes those in place (`merge_patch` replaces nested objects).
        """
        changed: dict[str, dict[str, Any]] = {}
        features = thing.features
        for s in samples:
            f = features.get(s.feature)
            if f is None:
                f = features[s.feature] = Feature()
            props = s.properties
            if generation is not None and s.seq is not None:
                rank = message_rank(generation, s.seq)
                if rank < f.rank:
                    held = f.properties
                    props = {k: v for k, v in props.items() if k not in held}
                    if not props:
                        continue
                else:
                    f.rank = rank
            f.properties.update(props)
            c = changed.get(s.feature)
            if c is None:
                changed[s.feature] = dict(props)
            else:
                c.update(props)
        if not changed:
            return
        thing.version += 1
        thing.last_updated = now
        self._dirty.add(thing.id)
        publish = self._bus.publish
        for feature, props in changed.items():
            readings = tuple((s.ts, s.properties) for s in samples if s.feature == feature)
            publish(StateChanged(thing.id, thing, feature=feature, properties=props,
                                 version=thing.version, timestamp=now, samples=readings))

    def restore(self, thing: Thing, feature: str, properties: dict[str, Any], stored_at: float) -> None:
        """At start: values the buffer stored after this Thing was last written to the registry file."""
        f = thing.features.get(feature)
        if f is None:
            f = thing.features[feature] = Feature()
        f.properties.update(properties)
        self._bump(thing, max(stored_at, thing.last_updated))

    def set_connectivity(self, thing: Thing, status: Status, now: float) -> bool:
        """Node status / Last Will → the `connectivity` feature; True when something changed."""
        f = thing.features.get(CONNECTIVITY)
        if f is None:
            f = thing.features[CONNECTIVITY] = Feature()
        props = f.properties
        if props.get("state") == status.state and (status.fw is None or props.get("fw") == status.fw):
            return False
        change: dict[str, Any] = {"state": status.state, "since": iso_utc(status.ts or now)}
        if status.fw is not None:
            change["fw"] = status.fw
        props.update(change)
        self._bump(thing, now)
        self._bus.publish(
            StateChanged(thing.id, thing, feature=CONNECTIVITY, properties=change,
                         version=thing.version, timestamp=now, source="status")
        )
        return True

    # ----------------------------------------------------------------- commands
    def register_command(self, thing: Thing, feature: str, desired: dict[str, Any]) -> PendingCommand:
        now = time.time()
        while self._commands and (
            len(self._commands) >= MAX_PENDING_COMMANDS
            or next(iter(self._commands.values())).issued < now - COMMAND_TTL_S
        ):
            self._commands.popitem(last=False)
        cmd = PendingCommand(uuid.uuid4().hex, thing.id, feature, dict(desired), now)
        self._commands[cmd.cmd_id] = cmd
        return cmd

    def apply_command_ack(self, cmd_id: str, status: str, detail: str | None,
                          properties: dict[str, Any] | None, now: float, *, thing_id: str | None = None) -> bool:
        """A node's `cmd/ack`: on success the desired values become reported ones.

        `thing_id` is the Thing whose topic the ack came on; an ack for another Thing's command is
        ignored and leaves that command pending, so one node cannot complete another's command.
        """
        cmd = self._commands.get(cmd_id)
        if cmd is None or (thing_id is not None and thing_id != cmd.thing_id):
            return False
        del self._commands[cmd_id]
        thing = self._things.get(cmd.thing_id)
        if thing is None:
            return False
        f = thing.features.setdefault(cmd.feature, Feature())
        if status == "ok":
            for key, value in cmd.desired.items():
                if f.desired_now.get(key) == value:
                    f.desired.pop(key, None)
            merge_patch(f.properties, properties if properties is not None else cmd.desired)
        record: dict[str, Any] = {"cmdId": cmd_id, "feature": cmd.feature, "status": status,
                                  "ackedAt": iso_utc(now)}
        if detail:
            record["detail"] = detail[:256]
        cf = thing.features.setdefault(COMMANDS, Feature())
        cf.properties["last"] = record
        self._bump(thing, now)
        self._bus.publish(StateChanged(thing.id, thing, feature=cmd.feature, properties=dict(f.properties),
                                       desired=dict(f.desired_now), version=thing.version, timestamp=now,
                                       source="command"))
        return True

    # ----------------------------------------------------------------- helpers
    def _bump(self, thing: Thing, now: float) -> None:
        thing.version += 1
        thing.last_updated = now
        self._dirty.add(thing.id)

    @staticmethod
    def _check_version(thing: Thing, expected: int | None) -> None:
        if expected is not None and expected != thing.version:
            raise Conflict(
                f"version {expected} is stale; {thing.id} is at version {thing.version}",
                thing_id=thing.id, version=thing.version,
            )


# --------------------------------------------------------------------- SQLite side (worker thread)
THINGS = "things"


def _load(db: sqlite_utils.Database) -> list[dict[str, Any]]:
    if THINGS not in db.table_names():
        db[THINGS].create(  # type: ignore[union-attr]
            {"id": str, "type": str, "metadata": str, "features": str, "relationships": str,
             "version": int, "last_updated": float, "created": float},
            pk="id",
        )
    return list(db[THINGS].rows)


_COLUMNS = ("id", "type", "metadata", "features", "relationships", "version", "last_updated",
            "created")
_UPSERT = (
    f"INSERT INTO {THINGS} ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))}) "
    f"ON CONFLICT(id) DO UPDATE SET {', '.join(f'{c} = excluded.{c}' for c in _COLUMNS[1:])}"
)


def _write(db: sqlite_utils.Database, rows: list[dict[str, Any]], deleted: list[str]) -> None:
    """One transaction: upserts of changed Things and deletes, all or nothing."""
    conn = db.conn
    conn.execute("BEGIN")
    try:
        conn.executemany(_UPSERT, [tuple(r[c] for c in _COLUMNS) for r in rows])
        conn.executemany(f"DELETE FROM {THINGS} WHERE id = ?", [(t,) for t in deleted])
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _to_row(t: Thing) -> dict[str, Any]:
    # Every dirty Thing is written each flush interval: the fast encoder keeps that cheap.
    return {
        "id": t.id,
        "type": t.type,
        "metadata": dumps_utf8(t.metadata).decode(),
        "features": dumps_utf8({n: f.to_document() for n, f in t.features.items()}).decode(),
        "relationships": dumps_utf8([r.to_document() for r in t.relationships]).decode(),
        "version": t.version,
        "last_updated": t.last_updated,
        "created": t.created,
    }


def _from_row(row: dict[str, Any]) -> Thing:
    return Thing(
        id=row["id"],
        type=row["type"],
        metadata=json.loads(row["metadata"] or "{}"),
        features=parse_features(json.loads(row["features"] or "{}")),
        relationships=parse_relationships(json.loads(row["relationships"] or "[]")),
        version=row["version"],
        last_updated=row["last_updated"] or 0.0,
        created=row["created"] or 0.0,
    )
