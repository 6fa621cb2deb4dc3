"""The alarm journal's query and export, the same on a gateway (its line) and on the aggregator (every
site): one parameter parser, one page or CSV answer, one list of the parameters for both OpenAPI documents.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.common.errors import Invalid
from gateway.common.history import parse_time
from gateway.common.http import int_param, known_params

MAX_LIMIT = 1000  # anomalies of one JSON page
MAX_EXPORT = 100_000  # rows of one CSV export
STATES = frozenset({"open", "acknowledged", "resolved"})
SEVERITIES = frozenset({"info", "warning", "critical"})
# (name, description) of every query parameter of `GET /api/v1/anomalies`, for both OpenAPI documents
PARAMETERS = (
    ("state", "comma-separated: open, acknowledged, resolved; active = open,acknowledged"),
    ("severity", "comma-separated: info, warning, critical"), ("thingId", "Thing ids, comma-separated"),
    ("site", "a site"), ("line", "a line"), ("type", "anomalyType, comma-separated"),
    ("acknowledgedBy", "who acknowledged (API key names), comma-separated"),
    ("from", "ISO 8601 or epoch seconds: anomalies still open at or after this time"),
    ("to", "ISO 8601 or epoch seconds: anomalies opened before this time"), ("shelved", "true or false"),
    ("format", "json or csv"), ("limit", f"at most {MAX_LIMIT} (json) or {MAX_EXPORT} (csv); default 100"),
    ("offset", "default 0"),
)
CSV_COLUMNS = ("id", "thingId", "thingType", "anomalyType", "severity", "state", "openedAt", "lastSeenAt",
               "acknowledgedAt", "acknowledgedBy", "resolvedAt", "resolvedBy", "note", "falsePositive", "score",
               "explanation", "shelvedUntil", "shelvedBy")


@dataclass(frozen=True)
class JournalQuery:
    """One checked `GET /api/v1/anomalies` request: empty lists filter nothing."""

    states: tuple[str, ...] = ()
    severities: tuple[str, ...] = ()
    thing_ids: tuple[str, ...] = ()
    anomaly_types: tuple[str, ...] = ()
    acknowledged_by: tuple[str, ...] = ()
    site: str | None = None
    line: str | None = None
    since: float | None = None
    until: float | None = None
    shelved: bool | None = None
    csv: bool = False
    limit: int = 100
    offset: int = 0


def comma_list(value: str | None, allowed: frozenset[str] | None, name: str) -> tuple[str, ...]:
    """`a,b,c` → its non-empty items; with `allowed`, Invalid naming the unknown ones."""
    items = tuple(v for v in (value or "").split(",") if v)
    if allowed is not None:
        bad = [v for v in items if v not in allowed]
        if bad:
            raise Invalid(f"{name}: unknown {', '.join(bad)[:200]} (one or more of {', '.join(sorted(allowed))})")
    return items


def parse_query(q: Mapping[str, str]) -> JournalQuery:
    """The journal's query parameters, every one checked (unknown ones are an error)."""
    known_params(q, {name for name, _ in PARAMETERS})
    states = comma_list(q.get("state"), STATES | {"active"}, "state")
    if "active" in states:
        states = tuple(sorted((set(states) - {"active"}) | {"open", "acknowledged"}))
    fmt = q.get("format", "json")
    if fmt not in ("json", "csv"):
        raise Invalid("format must be json or csv")
    shelved = q.get("shelved")
    if shelved not in (None, "true", "false"):
        raise Invalid("shelved must be true or false")
    return JournalQuery(
        states=states, severities=comma_list(q.get("severity"), SEVERITIES, "severity"),
        thing_ids=comma_list(q.get("thingId"), None, "thingId"), anomaly_types=comma_list(q.get("type"), None, "type"),
        acknowledged_by=comma_list(q.get("acknowledgedBy"), None, "acknowledgedBy"),
        site=q.get("site") or None, line=q.get("line") or None,
        since=parse_time(q["from"], "from") if q.get("from") else None,
        until=parse_time(q["to"], "to") if q.get("to") else None,
        shelved=None if shelved is None else shelved == "true", csv=fmt == "csv",
        limit=int_param(q.get("limit"), "limit", 100, 1, MAX_EXPORT if fmt == "csv" else MAX_LIMIT),
        offset=int_param(q.get("offset"), "offset", 0, 0, 10**9))


def journal_response(docs: list[dict[str, Any]], total: int, query: JournalQuery,
                     columns: Sequence[str] = CSV_COLUMNS) -> web.Response:
    """A page `{"items", "total", "limit", "offset"}`, or with `format=csv` the rows as a download."""
    if query.csv:
        return web.Response(text=journal_csv(docs, columns), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": 'attachment; filename="alarms.csv"',
                                     "X-Total-Count": str(total)})
    return web.json_response({"items": docs, "total": total, "limit": query.limit, "offset": query.offset})


def journal_csv(docs: list[dict[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> str:
    """The journal as CSV, one anomaly a row (spreadsheet formulas neutralised)."""
    out = io.StringIO()
    w = csv.writer(out)
    w.writerow(columns)
    for d in docs:
        shelf = d.get("shelved") or {}
        row = [shelf.get("until") if c == "shelvedUntil" else shelf.get("by") if c == "shelvedBy" else d.get(c)
               for c in columns]
        w.writerow(["" if v is None else _cell(v) for v in row])
    return out.getvalue()


def _cell(v: Any) -> str:
    text = str(v).lower() if isinstance(v, bool) else str(v)
    return "'" + text if text[:1] in ("=", "+", "-", "@") and not _is_number(text) else text


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
