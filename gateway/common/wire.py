"""The uplink's wire format: one Arrow IPC stream (zstd) per batch, small enough for a cellular link.

A batch carries points and, in the schema metadata, a JSON header (`gateway_id`, `batch_seq`, the
id range of the points in the gateway's outbox, Thing documents, backlog figures). Points are
sorted by series and time and sent as deltas: times as integer milliseconds, values as scaled
integers when the scale is exact (sensor values have few decimals), sequence numbers as steps. zstd
then turns the many small, repeated deltas into about 2-4 bytes per point. Decoding restores every
value exactly, or refuses the batch with a reason.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np

from gateway.common.names import THING_ID_RE
from gateway.common.readings import loads_strict
from gateway.common.timefmt import parse_iso

if TYPE_CHECKING:  # pyarrow is loaded by the codec's functions only: a gateway without an uplink never needs it
    import pyarrow as pa
    import pyarrow.ipc as ipc

D = TypeVar("D")
FORMAT = "egiz-batch/1"
MAX_SCALE = 6  # up to six decimals are sent as exact integers
MAX_POINTS = 2_000_000
MAX_THINGS = 20_000
MAX_HEADER = 16 * 2**20
MAX_COLUMN_BYTES = 192 * 2**20  # decompressed column buffers of one batch, summed while reading
MIN_TS = 946_684_800.0  # 2000-01-01: a device time before it is a clock that was never set
MAX_AHEAD_S = 7 * 86_400.0  # device times this far past the receiver's clock are refused


class WireError(ValueError):
    """A batch that cannot be decoded or does not satisfy the format; `reason` is a short code,
    `thing_ids` the Things the fault lies with when it lies with some (the sender can set them aside)."""

    def __init__(self, reason: str, detail: str, thing_ids: tuple[str, ...] = ()) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.thing_ids = thing_ids


ANOMALY_STATES = frozenset({"open", "acknowledged", "resolved"})
MAX_ID = 64


def _iso_time(value: Any, what: str) -> float:
    try:
        when = parse_iso(value) if isinstance(value, str) else math.nan
    except ValueError:
        when = math.nan
    if not math.isfinite(when):
        raise ValueError(f"{what} must be an ISO 8601 time")
    return when


def feature_properties(doc: Mapping[str, Any], feature: str) -> Mapping[str, Any]:
    """`doc["features"][feature]["properties"]` of a Thing document, or {} where any level is missing."""
    features = doc.get("features")
    f = features.get(feature) if isinstance(features, Mapping) else None
    props = f.get("properties") if isinstance(f, Mapping) else None
    return props if isinstance(props, Mapping) else {}


@dataclass(frozen=True)
class ThingDoc:
    """A Thing document as it travels upstream, checked once: the fields the aggregator files it by,
    and the whole document (`doc`) as the gateway served it."""

    id: str
    type: str
    version: int
    last_updated: float  # epoch seconds of the document's `lastUpdated`
    doc: Mapping[str, Any]

    @classmethod
    def parse(cls, doc: Any) -> ThingDoc:
        """A document from outside; ValueError names what is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("a Thing document must be an object")
        tid, ttype, version, updated = doc.get("id"), doc.get("type", ""), doc.get("version", 0), doc.get("lastUpdated")
        if not isinstance(tid, str) or not THING_ID_RE.match(tid):
            raise ValueError(f"Thing id {str(tid)[:80]!r} is not of the form site:equipment")
        if not isinstance(ttype, str) or len(ttype) > 32:
            raise ValueError(f"Thing {tid}: type must be a string of at most 32 characters")
        if not isinstance(version, int) or isinstance(version, bool) or not 0 <= version < 2**62:
            raise ValueError(f"Thing {tid}: version must be a non-negative integer")
        when = 0.0 if updated is None else _iso_time(updated, f"Thing {tid}: lastUpdated")
        return cls(tid, ttype, version, when, doc)

    @property
    def status(self) -> Mapping[str, Any]:
        """The properties of the `status` feature the detector keeps (anomaly, severity, score, ...)."""
        return feature_properties(self.doc, "status")

    @property
    def offline(self) -> bool:
        return feature_properties(self.doc, "connectivity").get("state") == "offline"


def _members(doc: Any, what: str, *keys: str) -> list[Any]:
    """The values of `keys` in the upstream document `doc` (None where absent), or ValueError unless it is an
    object."""
    if not isinstance(doc, dict):
        raise ValueError(f"{what} must be an object")
    return [doc.get(k) for k in keys]


def _document_id(value: Any, what: str) -> str:
    """The id of an upstream document: a string of 1 to MAX_ID characters."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise ValueError(f"{what} id must be a string of 1-{MAX_ID} characters")
    return value


def _thing_ref(value: Any, what: str) -> str:
    """The `thingId` a document of `what` names: a Thing id (site:equipment)."""
    if not isinstance(value, str) or not THING_ID_RE.match(value):
        raise ValueError(f"{what}: thingId {str(value)[:80]!r} is not a Thing id")
    return value


JOURNAL_ACTIONS = frozenset({"acknowledged", "resolved", "shelved", "unshelved"})
MAX_JOURNAL = 200  # operators' actions one anomaly carries upstream (the newest)
MAX_PERSON = 200
MAX_COMMENT = 2100  # a comment of 2000 characters, or a shelf's hours and reason


def _short_text(value: Any, limit: int, what: str) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise ValueError(f"{what} must be a string of at most {limit} characters")
    return value


def fit_anomaly(doc: dict[str, Any]) -> dict[str, Any]:
    """An anomaly document cut to what the wire takes (the newest MAX_JOURNAL entries, names and comments
    at their limits), so a long API key name or comment never holds the anomaly back."""
    out = dict(doc)
    if isinstance(out.get("acknowledgedBy"), str):
        out["acknowledgedBy"] = out["acknowledgedBy"][:MAX_PERSON]
    if isinstance(out.get("journal"), list):
        out["journal"] = [{**e, "by": str(e.get("by", ""))[:MAX_PERSON],
                           "comment": str(e.get("comment", ""))[:MAX_COMMENT]} for e in out["journal"][-MAX_JOURNAL:]]
    if isinstance(out.get("shelved"), dict):
        shelf = out["shelved"]
        out["shelved"] = {**shelf, "by": str(shelf.get("by", ""))[:MAX_PERSON],
                          "reason": str(shelf.get("reason", ""))[:MAX_COMMENT]}
    return out


@dataclass(frozen=True)
class JournalEntry:
    """One operator action on an anomaly, as its gateway recorded it: who, when, and their comment."""

    at: float
    action: str
    by: str
    comment: str

    @classmethod
    def parse(cls, doc: Any, what: str) -> JournalEntry:
        at, action, by, comment = _members(doc, f"{what}: a journal entry", "at", "action", "by", "comment")
        if action not in JOURNAL_ACTIONS:
            raise ValueError(f"{what}: a journal action must be one of {', '.join(sorted(JOURNAL_ACTIONS))}")
        return cls(_iso_time(at, f"{what}: a journal entry's at"), action,
                   _short_text(by, MAX_PERSON, f"{what}: a journal entry's by"),
                   _short_text(comment or "", MAX_COMMENT, f"{what}: a journal entry's comment"))


@dataclass(frozen=True)
class ShelfDoc:
    """The shelf silencing an anomaly's condition (its Thing and type) when the gateway sent it."""

    id: str
    since: float
    until: float
    by: str
    reason: str

    @classmethod
    def parse(cls, doc: Any, what: str) -> ShelfDoc:
        sid, since, until, by, reason = _members(doc, f"{what}: shelved", "id", "since", "until", "by", "reason")
        start, end = _iso_time(since, f"{what}: shelved.since"), _iso_time(until, f"{what}: shelved.until")
        if end < start:
            raise ValueError(f"{what}: shelved.until is before shelved.since")
        return cls(_document_id(sid, f"{what}: shelf"), start, end,
                   _short_text(by, MAX_PERSON, f"{what}: shelved.by"),
                   _short_text(reason, MAX_COMMENT, f"{what}: shelved.reason"))


@dataclass(frozen=True)
class AnomalyDoc:
    """An anomaly document as it travels upstream, checked once: with its journal (operators' actions,
    oldest first) and the shelf silencing its condition, if any."""

    id: str
    thing_id: str
    state: Literal["open", "acknowledged", "resolved"]
    severity: str
    opened_at: float
    score: float
    doc: Mapping[str, Any]
    anomaly_type: str = ""
    acknowledged_by: str | None = None
    resolved_at: float | None = None
    journal: tuple[JournalEntry, ...] = ()
    shelved: ShelfDoc | None = None

    @classmethod
    def parse(cls, doc: Any) -> AnomalyDoc:
        aid, tid, state, sev, opened, score = _members(doc, "an anomaly document", "id", "thingId", "state",
                                                       "severity", "openedAt", "score")
        aid = _document_id(aid, "anomaly")
        tid = _thing_ref(tid, f"anomaly {aid}")
        what = f"anomaly {aid}"
        if state not in ANOMALY_STATES:
            raise ValueError(f"{what}: state must be one of {', '.join(sorted(ANOMALY_STATES))}")
        if not isinstance(sev, str) or len(sev) > 32:
            raise ValueError(f"{what}: severity must be a short string")
        when = _iso_time(opened, f"{what}: openedAt")
        if score is None:
            score = 0.0
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise ValueError(f"{what}: score must be a finite number")
        atype, acked_by, resolved, journal, shelved = (doc.get(k) for k in (
            "anomalyType", "acknowledgedBy", "resolvedAt", "journal", "shelved"))
        atype = _short_text(atype or "", 64, f"{what}: anomalyType")
        if acked_by is not None:
            acked_by = _short_text(acked_by, MAX_PERSON, f"{what}: acknowledgedBy")
        if journal is None:
            journal = []
        if not isinstance(journal, list) or len(journal) > MAX_JOURNAL:
            raise ValueError(f"{what}: journal must be a list of at most {MAX_JOURNAL} entries")
        return cls(aid, tid, state, sev, when, float(score), doc, atype, acked_by,
                   None if resolved is None else _iso_time(resolved, f"{what}: resolvedAt"),
                   tuple(JournalEntry.parse(e, what) for e in journal),
                   None if shelved is None else ShelfDoc.parse(shelved, what))


@dataclass(frozen=True)
class Action:
    """An operator's acknowledgement or resolution made centrally, handed to the owning gateway."""

    anomaly_id: str
    action: Literal["ack", "resolve"]
    by: str = ""
    note: str = ""
    false_positive: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"anomalyId": self.anomaly_id, "action": self.action, "by": self.by, "note": self.note,
                "falsePositive": self.false_positive}

    @classmethod
    def parse(cls, doc: Any) -> Action:
        if not isinstance(doc, dict) or not isinstance(doc.get("anomalyId"), str) \
                or doc.get("action") not in ("ack", "resolve"):
            raise ValueError('an action needs "anomalyId" and "action": "ack" | "resolve"')
        by, note, fp = doc.get("by") or "", doc.get("note") or "", doc.get("falsePositive", False)
        if not isinstance(by, str) or not isinstance(note, str) or not isinstance(fp, bool):
            raise ValueError("an action's by and note are strings, falsePositive a boolean")
        return cls(doc["anomalyId"], doc["action"], by[:200], note[:2000], fp)


@dataclass(frozen=True)
class OeePeriodDoc:
    """One machine's OEE period record (hour, shift, planned or not) with its whole totals so far;
    the newest `updated_at` wins, so sending it again, or late, is harmless."""

    thing_id: str
    line: str
    hour: float
    day: str
    shift: str
    planned: bool
    totals: Mapping[str, float]  # OEE_FIELDS
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {"thingId": self.thing_id, "line": self.line, "hour": self.hour, "day": self.day, "shift": self.shift,
                "planned": self.planned, "totals": dict(self.totals), "updatedAt": self.updated_at}

    @classmethod
    def parse(cls, doc: Any) -> OeePeriodDoc:
        tid, line, hour, day, shift, planned, totals, updated = _members(
            doc, "an OEE period", "thingId", "line", "hour", "day", "shift", "planned", "totals", "updatedAt")
        tid = _thing_ref(tid, "OEE period")
        for name, value in (("line", line), ("day", day), ("shift", shift)):
            if not isinstance(value, str) or len(value) > MAX_ID:
                raise ValueError(f"OEE period of {tid}: {name} must be a string of at most {MAX_ID} characters")
        if not isinstance(planned, bool):
            raise ValueError(f"OEE period of {tid}: planned must be true or false")
        for name, value in (("hour", hour), ("updatedAt", updated)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"OEE period of {tid}: {name} must be a finite number")
        if not isinstance(totals, dict) or set(totals) != set(OEE_FIELDS) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in totals.values()):
            raise ValueError(f"OEE period of {tid}: totals must hold {', '.join(OEE_FIELDS)} as numbers >= 0")
        return cls(tid, line, float(hour), day, shift, planned, {k: float(v) for k, v in totals.items()},
                   float(updated))


@dataclass(frozen=True)
class OeeEventDoc:
    """A machine state event as it travels upstream (the newest `updated_at` wins)."""

    id: str
    thing_id: str
    line: str
    state: str
    start: float
    end: float
    planned_s: float
    reason: str
    updated_at: float
    doc: Mapping[str, Any]

    @classmethod
    def parse(cls, doc: Any) -> OeeEventDoc:
        eid, tid, line, state, reason = _members(doc, "an OEE event", "id", "thingId", "line", "state", "reason")
        eid = _document_id(eid, "OEE event")
        tid = _thing_ref(tid, f"OEE event {eid}")
        if state not in OEE_STATES:
            raise ValueError(f"OEE event {eid}: state must be one of {', '.join(OEE_STATES)}")
        for name, value in (("line", line), ("reason", reason)):
            if not isinstance(value, str) or len(value) > MAX_ID:
                raise ValueError(f"OEE event {eid}: {name} must be a string of at most {MAX_ID} characters")
        nums = [doc.get(k) for k in ("start", "end", "plannedS", "updatedAt")]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in nums):
            raise ValueError(f"OEE event {eid}: start, end, plannedS and updatedAt must be finite numbers")
        start, end, planned_s, updated = (float(v) for v in nums)
        if end < start or planned_s < 0:
            raise ValueError(f"OEE event {eid}: end must not be before start, plannedS not negative")
        return cls(eid, tid, line, state, start, end, planned_s, reason, updated, doc)


OEE_FIELDS = ("running_s", "idle_s", "down_s", "changeover_s", "planned_stop_s", "offline_s", "good", "rejected",
              "rejected_startup", "ideal_good_s", "ideal_total_s", "ideal_startup_reject_s")
OEE_STATES = ("running", "idle", "down", "changeover", "planned_stop", "offline")


@dataclass
class Batch:
    """One uplink batch, decoded: a header and the points as columns."""

    gateway_id: str
    batch_seq: int
    site: str
    line: str
    first_id: int
    last_id: int
    series: list[tuple[str, str, str]]  # (thing_id, feature, path) of each series index used by the points
    points: pa.Table  # series (index into `series`), ts, recv, seq, value, text (see `points_schema`)
    things: list[ThingDoc] = field(default_factory=list)  # Thing documents (newest state)
    deleted: list[str] = field(default_factory=list)
    backlog: dict[str, float] = field(default_factory=dict)  # points, bytes, age_s
    sent_at: float = 0.0
    anomalies: list[AnomalyDoc] = field(default_factory=list)  # anomaly documents changed since the last batch
    oee_periods: list[OeePeriodDoc] = field(default_factory=list)  # OEE period records changed since the last batch
    oee_events: list[OeeEventDoc] = field(default_factory=list)  # machine state events changed since then


@functools.cache
def points_schema() -> pa.Schema:
    """The columns of a decoded batch's points."""
    import pyarrow as pa

    return pa.schema([
        ("series", pa.int32()), ("ts", pa.float64()), ("recv", pa.float64()), ("seq", pa.int64()),
        ("value", pa.float64()), ("text", pa.string()),
    ])


def _exact_scale(values: np.ndarray) -> int | None:
    """The smallest k such that every value is an integer number of 10^-k, exactly; None if none."""
    if len(values) == 0:
        return 0
    if not np.all(np.isfinite(values)) or np.max(np.abs(values)) > 1e12:
        return None
    for k in range(MAX_SCALE + 1):
        scaled = np.round(values * 10**k)
        if np.array_equal(scaled / 10**k, values):
            return k
    return None


def _deltas(a: np.ndarray) -> np.ndarray:
    """First differences (the first element stays absolute); rows are sorted by series and time, so
    they are small except at the first row of each series. Decoding is one exact integer cumsum."""
    return np.diff(a, prepend=np.zeros(1, a.dtype))


def encode(batch: Batch) -> bytes:
    """Batch → bytes (Arrow IPC stream, zstd)."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    t = batch.points
    n = t.num_rows
    series = t.column("series").to_numpy().astype(np.int32) if n else np.array([], np.int32)
    ts = np.round(t.column("ts").to_numpy() * 1000).astype(np.int64)
    order = np.lexsort((ts, series))
    series, ts = series[order], ts[order]
    take = pa.array(order)
    recv = np.round(t.column("recv").to_numpy()[order] * 1000).astype(np.int64)
    seq_col = t.column("seq").take(take)
    seq_null = np.asarray(seq_col.is_null())
    seq = np.asarray(seq_col.fill_null(0).to_numpy(), dtype=np.int64)
    value_col = t.column("value").take(take)
    is_num = ~np.asarray(value_col.is_null())
    value = np.asarray(value_col.fill_null(0.0).to_numpy(), dtype=float)
    scale = _exact_scale(value[is_num])
    if scale is not None and n and np.max(np.abs(value[is_num]), initial=0) * 10**scale > 2**52:
        scale = None  # beyond exact integers: send the doubles
    columns: dict[str, Any] = {
        "series_delta": pa.array(_deltas(series.astype(np.int64)), pa.int64()),
        "ts_ms_delta": pa.array(_deltas(ts), pa.int64()),
        "recv_lag_ms": pa.array(recv - ts, pa.int64()),
        "seq_delta": pa.array(_deltas(seq), pa.int64()),
        "seq_null": pa.array(seq_null, pa.bool_()),
        "is_num": pa.array(is_num, pa.bool_()),
        "text": t.column("text").take(take),
    }
    if scale is not None:
        columns["value_scaled_delta"] = pa.array(_deltas(np.round(value * 10**scale).astype(np.int64)), pa.int64())
    else:
        columns["value"] = pa.array(value, pa.float64())
    header = {
        "format": FORMAT, "gateway_id": batch.gateway_id, "batch_seq": batch.batch_seq, "site": batch.site,
        "line": batch.line, "first_id": batch.first_id, "last_id": batch.last_id, "scale": scale,
        "series": [list(k) for k in batch.series],
        "things": [t.doc for t in batch.things], "deleted": batch.deleted, "backlog": batch.backlog,
        "sent_at": batch.sent_at, "anomalies": [a.doc for a in batch.anomalies],
    }
    if batch.oee_periods or batch.oee_events:  # only when there is some: other batches stay as they were
        header["oee"] = {"periods": [p.to_json() for p in batch.oee_periods],
                         "events": [dict(e.doc) for e in batch.oee_events]}
    raw = json.dumps(header, allow_nan=False, separators=(",", ":")).encode()
    packed = pa.compress(raw, codec="zstd", asbytes=True)
    table = pa.table(columns).replace_schema_metadata({"egiz": packed, "egiz_size": str(len(raw))})
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=ipc.IpcWriteOptions(compression="zstd")) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def decode(data: bytes, now: float | None = None) -> Batch:
    """Bytes → Batch, validating everything; raises WireError with a reason.

    The stream is read one record batch at a time and each batch's row count and decompressed size
    are checked from its metadata *before* it is decompressed, so a small body that would inflate to
    gigabytes (a decompression bomb) is refused having cost nothing. Device times must lie between
    2000-01-01 and `now` (default: the clock) plus `MAX_AHEAD_S`.
    """
    import pyarrow as pa

    table = _read_limited(data)
    meta = table.schema.metadata or {}
    try:
        size = int(meta[b"egiz_size"])
        if not 0 < size <= MAX_HEADER:
            raise WireError("too_large", f"the batch header is {size} bytes, limit {MAX_HEADER}")
        header = loads_strict(pa.decompress(meta[b"egiz"], size, codec="zstd", asbytes=True))
    except WireError:
        raise
    except RecursionError:
        raise WireError("malformed", "the batch header is nested too deeply") from None
    except (KeyError, ValueError, pa.ArrowInvalid, OSError):
        raise WireError("malformed", "the batch header is missing or not zstd-compressed JSON") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise WireError("unsupported", f"format must be {FORMAT}")
    _check_strings(header)
    for name, tp in (("gateway_id", str), ("site", str), ("line", str), ("batch_seq", int), ("first_id", int),
                     ("last_id", int)):
        if not isinstance(header.get(name), tp) or isinstance(header.get(name), bool):
            raise WireError("bad_header", f"header field {name} must be a {tp.__name__}")
    if header["batch_seq"] < 1:
        raise WireError("bad_header", "batch_seq starts at 1")
    things, deleted, anomalies = _documents(header)
    n = table.num_rows
    if n > MAX_POINTS:
        raise WireError("too_large", f"{n} points, limit {MAX_POINTS}")
    scale = header.get("scale")
    series = header.get("series")
    if not isinstance(series, list) or not all(
            isinstance(k, list) and len(k) == 3 and all(isinstance(x, str) for x in k) for k in series):
        raise WireError("bad_header", "series must be a list of [thing_id, feature, path]")
    need = {"series_delta", "ts_ms_delta", "recv_lag_ms", "seq_delta", "seq_null", "text", "is_num"}
    need.add("value" if scale is None else "value_scaled_delta")
    if not need <= set(table.column_names):
        raise WireError("bad_columns", f"missing columns {sorted(need - set(table.column_names))}")
    if scale is not None and (not isinstance(scale, int) or isinstance(scale, bool) or not 0 <= scale <= MAX_SCALE):
        raise WireError("bad_header", "scale must be 0..6")
    try:
        sid = np.cumsum(_int_column(table, "series_delta"))
        if n and (sid.min() < 0 or sid.max() >= len(series)):
            raise WireError("bad_values", "a point refers to a series the header does not name")
        ts_ms = np.cumsum(_int_column(table, "ts_ms_delta"))
        recv_ms = ts_ms + _int_column(table, "recv_lag_ms")
        seq = np.cumsum(_int_column(table, "seq_delta"))
        is_num = np.asarray(table.column("is_num").to_numpy(zero_copy_only=False), dtype=bool)
        seq_null = np.asarray(table.column("seq_null").to_numpy(zero_copy_only=False), dtype=bool)
        if scale is None:
            value = np.asarray(table.column("value").to_numpy(), dtype=float)
        else:
            value = np.cumsum(_int_column(table, "value_scaled_delta")) / 10**scale
        text = table.column("text").cast(pa.string())
    except WireError:
        raise
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise WireError("bad_columns", f"a column has the wrong type: {str(exc)[:160]}") from None
    if n and not np.all(np.isfinite(value[is_num])):
        raise WireError("bad_values", "values must be finite")
    if n and np.any(~is_num & np.asarray(text.is_null())):
        raise WireError("bad_values", "a point has neither a number nor a text")
    _check_texts(text, sid, series)
    _check_times(ts_ms, recv_ms, sid, series, time.time() if now is None else now)
    points = pa.table({
        "series": pa.array(sid.astype(np.int32), pa.int32()),
        "ts": pa.array(ts_ms / 1000.0, pa.float64()), "recv": pa.array(recv_ms / 1000.0, pa.float64()),
        "seq": pa.array(seq, pa.int64(), mask=seq_null), "value": pa.array(value, pa.float64(), mask=~is_num),
        "text": text,
    }, schema=points_schema())
    keys = [(k[0], k[1], k[2]) for k in series]
    periods, events = _oee(header.get("oee"))
    return Batch(header["gateway_id"], header["batch_seq"], header["site"], header["line"], header["first_id"],
                 header["last_id"], keys, points, things, deleted, _backlog(header.get("backlog")),
                 float(header.get("sent_at") or 0.0), anomalies, periods, events)


def _oee(raw: Any) -> tuple[list[OeePeriodDoc], list[OeeEventDoc]]:
    """The OEE section of a header (absent in batches without OEE), each record checked."""
    if raw is None:
        return [], []
    if not isinstance(raw, dict) or not isinstance(raw.get("periods", []), list) \
            or not isinstance(raw.get("events", []), list):
        raise WireError("bad_header", "oee must be {periods: [...], events: [...]}")
    periods, events = raw.get("periods", []), raw.get("events", [])
    if len(periods) > MAX_THINGS * 10 or len(events) > MAX_THINGS * 10:
        raise WireError("too_large", f"more than {MAX_THINGS * 10} OEE records")
    try:
        return [OeePeriodDoc.parse(p) for p in periods], [OeeEventDoc.parse(e) for e in events]
    except ValueError as exc:
        raise WireError("bad_document", str(exc)) from None


def _documents(header: dict[str, Any]) -> tuple[list[ThingDoc], list[str], list[AnomalyDoc]]:
    """The Thing, deletion and anomaly lists of a header, each document checked."""
    things, deleted, anomalies = header.get("things", []), header.get("deleted", []), header.get("anomalies", [])
    if not isinstance(things, list) or not isinstance(anomalies, list):
        raise WireError("bad_header", "things and anomalies must be lists of documents")
    if not isinstance(deleted, list) or not all(isinstance(d, str) and THING_ID_RE.match(d) for d in deleted):
        raise WireError("bad_header", "deleted must be a list of Thing ids")
    if len(things) + len(deleted) > MAX_THINGS or len(anomalies) > MAX_THINGS:
        raise WireError("too_large", f"more than {MAX_THINGS} Thing or anomaly changes")
    return _each(things, ThingDoc.parse, "id"), deleted, _each(anomalies, AnomalyDoc.parse, "thingId")


def _each(docs: list[Any], parse: Callable[[Any], D], key: str) -> list[D]:
    """Every document parsed, or a WireError naming the Thing (its `key`) of the first bad one."""
    out = []
    for d in docs:
        try:
            out.append(parse(d))
        except (ValueError, TypeError) as exc:
            tid = d.get(key) if isinstance(d, dict) else None
            named = (tid,) if isinstance(tid, str) and THING_ID_RE.match(tid) else ()
            raise WireError("bad_document", str(exc)[:300], thing_ids=named) from None
    return out


def _int_column(table: pa.Table, name: str) -> np.ndarray:
    import pyarrow as pa

    col = table.column(name)
    if not pa.types.is_integer(col.type) or col.null_count:
        raise WireError("bad_columns", f"{name} must be integers without nulls")
    return np.asarray(col.to_numpy(), dtype=np.int64)


def _backlog(raw: Any) -> dict[str, float]:
    if not isinstance(raw, dict):
        return {}
    return {k: float(v) for k, v in raw.items() if k in ("points", "bytes", "age_s")
            and isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v)}



def _check_strings(header: dict[str, Any]) -> None:
    """Every string of the header (keys too) is valid Unicode without NUL: what every store can hold.
    A document with a bad string is refused naming its Thing."""
    for key in ("things", "anomalies", "deleted", "series"):
        docs = header.get(key)
        for doc in docs if isinstance(docs, list) else []:
            bad = _bad_string(doc)
            if bad is not None:
                tid = doc.get("id" if key == "things" else "thingId") if isinstance(doc, dict) else \
                    doc[0] if isinstance(doc, list) and doc else doc
                named = (tid,) if isinstance(tid, str) and THING_ID_RE.match(tid) else ()
                raise WireError("bad_document", f"a string in {key} {bad}", thing_ids=named)
    rest = {k: v for k, v in header.items() if k not in ("things", "anomalies", "deleted", "series")}
    bad = _bad_string(rest)
    if bad is not None:
        raise WireError("bad_header", f"a string of the header {bad}")


def _bad_string(value: Any) -> str | None:
    """Why some string inside `value` cannot be stored (NUL, a lone surrogate), or None."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str):
            if "\x00" in v:
                return "holds a NUL character"
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "is not valid Unicode (a lone surrogate)"
    return None


def _check_texts(text: pa.ChunkedArray, sid: np.ndarray, series: list[Any]) -> None:
    """Text values are valid UTF-8 without NUL, or a WireError naming the Thing of the first bad one."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        text.validate(full=True)
    except pa.ArrowInvalid:
        raise WireError("bad_values", "a text value is not valid UTF-8") from None
    if not len(text) or not text.null_count < len(text):
        return
    nul = np.asarray(pc.fill_null(pc.match_substring(text, "\x00"), False), dtype=bool)
    if nul.any():
        thing = str(series[int(sid[int(np.argmax(nul))])][0])
        raise WireError("bad_values", f"Thing {thing[:80]!r}: a text value holds a NUL character", thing_ids=(thing,))


def _check_times(ts_ms: np.ndarray, recv_ms: np.ndarray, sid: np.ndarray, series: list[Any], now: float) -> None:
    """Device and receive times within 2000-01-01 .. now + MAX_AHEAD_S, or a WireError naming a Thing."""
    if not len(ts_ms):
        return
    lo, hi = MIN_TS * 1000, (now + MAX_AHEAD_S) * 1000
    bad = (ts_ms < lo) | (ts_ms > hi) | (recv_ms < lo) | (recv_ms > hi)
    if not bad.any():
        return
    i = int(np.argmax(bad))
    thing = str(series[int(sid[i])][0])
    raise WireError("bad_time", f"Thing {thing[:80]!r}: point time {ts_ms[i] / 1000!r} (received "
                                f"{recv_ms[i] / 1000!r}) is outside 2000-01-01 .. now + {MAX_AHEAD_S / 86400:g} days",
                    thing_ids=(thing,))


def _read_limited(data: bytes) -> pa.Table:
    """The stream's record batches, each checked against MAX_POINTS and MAX_COLUMN_BYTES (rows and
    decompressed sizes as its metadata declares them) before it is decompressed."""
    import pyarrow as pa
    import pyarrow.ipc as ipc

    try:
        messages = ipc.MessageReader.open_stream(pa.BufferReader(data))
        try:
            first = messages.read_next_message()
        except StopIteration:  # never let it out: raised into a Future it would hang the caller
            raise WireError("malformed", "an empty body: an Arrow IPC stream starts with its schema") from None
        if first.type != "schema":
            raise WireError("malformed", "an Arrow IPC stream starts with its schema")
        schema = ipc.read_schema(first)
        batches, rows, size = [], 0, 0
        while True:
            try:
                message = messages.read_next_message()
            except StopIteration:
                break
            if message.type != "record batch":
                raise WireError("malformed", f"unexpected {message.type} message in a batch")
            n, declared = _declared_size(message)
            rows, size = rows + n, size + declared
            if rows > MAX_POINTS:
                raise WireError("too_large", f"more than {MAX_POINTS} points")
            if size > MAX_COLUMN_BYTES:
                raise WireError("too_large", f"the points would take more than {MAX_COLUMN_BYTES} bytes decoded")
            batches.append(ipc.read_record_batch(message, schema))
        return pa.Table.from_batches(batches, schema)
    except WireError:
        raise
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError, struct.error, IndexError, ValueError) as exc:
        raise WireError("malformed", f"not an Arrow IPC stream: {str(exc)[:160]}") from None


def _declared_size(message: ipc.Message) -> tuple[int, int]:
    """(rows, bytes its buffers take decompressed) of a record batch message, from its flatbuffer
    metadata (Arrow's Message.fbs) and the 8-byte length in front of each compressed buffer."""
    meta = memoryview(message.metadata)
    body = memoryview(message.body) if message.body is not None else memoryview(b"")
    root = _fb_table(meta, struct.unpack_from("<I", meta, 0)[0])
    batch = root.child(2)  # Message.header: the RecordBatch
    if batch is None:
        raise WireError("malformed", "a record batch without its header")
    rows = batch.scalar(0, "<q")  # RecordBatch.length
    compressed = batch.child(3) is not None  # RecordBatch.compression
    total = 0
    for offset, length in batch.structs(2, "<qq"):  # RecordBatch.buffers: (offset, length) in the body
        if offset < 0 or length < 0 or offset + length > len(body):
            raise WireError("malformed", "a buffer lies outside the message body")
        if compressed and length >= 8:
            declared = struct.unpack_from("<q", body, offset)[0]
            total += length if declared == -1 else max(declared, 0)  # -1: stored uncompressed
        else:
            total += length
    if rows < 0:
        raise WireError("malformed", "a record batch with a negative length")
    return rows, total


@dataclass(frozen=True)
class _FbTable:
    """A flatbuffer table: enough to read scalars, child tables and vectors of structs."""

    buf: memoryview
    pos: int

    def _field(self, index: int) -> int:
        vtable = self.pos - struct.unpack_from("<i", self.buf, self.pos)[0]
        vsize = struct.unpack_from("<H", self.buf, vtable)[0]
        at = 4 + 2 * index
        return 0 if at >= vsize else struct.unpack_from("<H", self.buf, vtable + at)[0]

    def scalar(self, index: int, fmt: str) -> int:
        off = self._field(index)
        return int(struct.unpack_from(fmt, self.buf, self.pos + off)[0]) if off else 0

    def _target(self, index: int) -> int | None:
        off = self._field(index)
        if not off:
            return None
        return self.pos + off + struct.unpack_from("<I", self.buf, self.pos + off)[0]

    def child(self, index: int) -> _FbTable | None:
        target = self._target(index)
        return None if target is None else _fb_table(self.buf, target)

    def structs(self, index: int, fmt: str) -> list[tuple[int, ...]]:
        target = self._target(index)
        if target is None:
            return []
        count, width = struct.unpack_from("<I", self.buf, target)[0], struct.calcsize(fmt)
        if count * width > len(self.buf):
            raise WireError("malformed", "a vector longer than its message")
        return [struct.unpack_from(fmt, self.buf, target + 4 + i * width) for i in range(count)]


def _fb_table(buf: memoryview, pos: int) -> _FbTable:
    if not 0 <= pos < len(buf):
        raise WireError("malformed", "a metadata offset outside the message")
    return _FbTable(buf, pos)
