"""Restart recovery: the live twin takes the newest stored values it had not yet written to its file.

The registry file is written behind (`twin.flush_interval_s`); the buffer commits within
`buffer.commit_interval_ms`, so after a crash the buffer can hold newer values than the registry.
Only series that received points after the registry's newest write are read, which keeps the
start fast however large the history is.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from typing import Any

from gateway.buffer.buffer import TelemetryBuffer
from gateway.twin.registry import TwinRegistry

_ARRAY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\[(\d+)\]")
MARGIN_S = 60.0  # clock steps between the registry's and the buffer's time stamps
EMPTY_LOOKBACK_S = 3600.0  # a registry file with no Things: look this far back for auto-registered ones


def unflatten(current: dict[str, Any], flat: dict[str, Any]) -> dict[str, Any]:
    """Stored paths back to properties: `voltage.a` into a dict, `zones[1]` into a list.

    Arrays are completed from the current value; an array that cannot be completed is left as it is.
    """
    out: dict[str, Any] = {}
    arrays: dict[str, dict[int, Any]] = defaultdict(dict)
    for path, value in flat.items():
        m = _ARRAY.fullmatch(path)
        if m:
            arrays[m[1]][int(m[2])] = value
        elif "." in path:
            name, key = path.split(".", 1)
            if name not in out:
                cur = current.get(name)
                out[name] = dict(cur) if isinstance(cur, dict) else {}
            out[name][key] = value
        else:
            out[path] = value
    for name, items in arrays.items():
        cur = current.get(name)
        base = list(cur) if isinstance(cur, list) else []
        size = max(len(base), max(items) + 1)
        if any(i not in items for i in range(len(base), size)):
            continue
        base.extend([None] * (size - len(base)))
        for i, v in items.items():
            base[i] = v
        out[name] = base
    return out


async def restore_twin(buffer: TelemetryBuffer, registry: TwinRegistry, *, auto_register: bool,
                       line: str = "") -> int:
    """Apply stored values newer than each Thing's registry state; returns how many Things changed."""
    newest = registry.newest_update()
    since = newest - MARGIN_S if newest else time.time() - EMPTY_LOOKBACK_S
    rows = await buffer.read(lambda: buffer.store.latest_since(since))
    per_thing: dict[str, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    stamp: dict[str, float] = {}
    types: dict[str, str] = {}
    for thing_id, ttype, feature, path, value, text, recv, _ts in rows:
        thing = registry.get(thing_id)
        if thing is not None and recv <= thing.last_updated:
            continue
        per_thing[thing_id][feature][path] = text if value is None else value
        stamp[thing_id] = max(stamp.get(thing_id, 0.0), recv)
        types[thing_id] = ttype
    changed = 0
    for thing_id, features in per_thing.items():
        thing = registry.get(thing_id)
        if thing is None:
            if not auto_register or not types[thing_id]:
                continue
            equipment = thing_id.split(":", 1)[1]
            thing = registry.ensure(thing_id, types[thing_id],
                                    {"name": equipment, "line": line, "registeredBy": "ingest"})
        for feature, flat in features.items():
            current = thing.features[feature].properties if feature in thing.features else {}
            registry.restore(thing, feature, unflatten(current, flat), stamp[thing_id])
        changed += 1
    return changed
