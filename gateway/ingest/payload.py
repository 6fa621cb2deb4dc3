"""Parse and validate telemetry payloads at the boundary, into small typed values.

Accepts the contract shapes (single `{"ts","seq","boot","properties"}` and batched
`{"boot","samples":[...]}`) and, through configuration, the older `{"device_id","timestamp",<feature>:{...}}`
shape. A message is accepted whole or rejected whole with a reason (transactional, like a batch).
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from gateway.common.errors import RejectedMessage
from gateway.common.names import NAME_RE
from gateway.common.readings import Properties, Sample, Status, Telemetry, loads_strict

MIN_TS = 946_684_800.0  # 2000-01-01: anything earlier is a clock that was never set
MAX_FUTURE_S = 86_400.0
MAX_STRING = 256
MAX_ARRAY = 64
MAX_PROPERTIES = 256
LEGACY_RESERVED = frozenset({"device_id", "timestamp", "ts", "seq", "boot"})


def _reject(reason: str, detail: str) -> RejectedMessage:
    return RejectedMessage(reason, detail)


def decode_json(raw: bytes, max_bytes: int) -> Any:
    """Size-check and decode; every failure becomes a RejectedMessage with a reason code."""
    if len(raw) > max_bytes:
        raise _reject("too_large", f"payload is {len(raw)} bytes, limit {max_bytes}")
    try:
        return loads_strict(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _reject("malformed_json", f"not valid UTF-8 JSON: {str(exc)[:120]}") from None


def parse_telemetry(
    raw: bytes,
    *,
    feature: str | None,
    payload_format: Literal["contract", "legacy"] = "contract",
    max_bytes: int = 65536,
    max_samples: int = 1000,
    device_id: str | None = None,
    now: float | None = None,
) -> Telemetry:
    """Validate one telemetry payload; `feature` comes from the topic when the topic names it."""
    doc = decode_json(raw, max_bytes)
    if not isinstance(doc, dict):
        raise _reject("wrong_shape", f"payload must be a JSON object, got {type(doc).__name__}")
    now = time.time() if now is None else now
    if feature is not None and not NAME_RE.match(feature):
        raise _reject("bad_name", f"feature name {feature[:64]!r} from the topic is not allowed")
    if payload_format == "legacy":
        return _parse_legacy(doc, device_id=device_id, feature=feature, now=now)
    if feature is None:
        raise _reject("wrong_shape", "the topic pattern names no {feature} for the contract format")
    boot = _boot(doc.get("boot"))
    if "samples" in doc:
        samples = doc["samples"]
        if not isinstance(samples, list) or not samples:
            raise _reject("wrong_shape", "'samples' must be a non-empty array")
        if len(samples) > max_samples:
            raise _reject("too_large", f"{len(samples)} samples, limit {max_samples}")
        extra = set(doc) - {"boot", "samples"}
        if extra:
            raise _reject("wrong_shape", f"unexpected keys next to 'samples': {sorted(extra)}")
        out = []
        for i, s in enumerate(samples):
            if not isinstance(s, dict):
                raise _reject("wrong_shape", f"samples[{i}] must be an object")
            out.append(_sample(s, feature, now, where=f"samples[{i}]."))
        _check_seq_order(out)
        return Telemetry(boot, tuple(out))
    extra = set(doc) - {"ts", "seq", "boot", "properties"}
    if extra:
        raise _reject("wrong_shape", f"unexpected keys: {sorted(extra)}")
    return Telemetry(boot, (_sample(doc, feature, now, where=""),))


def _parse_legacy(doc: dict[str, Any], *, device_id: str | None, feature: str | None, now: float) -> Telemetry:
    if device_id is not None and "device_id" in doc and doc["device_id"] != device_id:
        raise _reject("wrong_shape", f"device_id {doc['device_id']!r} does not match the topic")
    ts = _ts(doc.get("timestamp", doc.get("ts")), "timestamp", now)
    seq = _seq(doc.get("seq"), "seq") if "seq" in doc else None
    boot = _boot(doc.get("boot"))
    features = {k: v for k, v in doc.items() if k not in LEGACY_RESERVED}
    if feature is not None and "properties" in doc:
        features = {feature: doc["properties"]}
    if not features:
        raise _reject("wrong_shape", "no feature objects in the payload")
    out = []
    for name, props in features.items():
        if not NAME_RE.match(name):
            raise _reject("bad_name", f"feature name {name[:64]!r} is not allowed")
        if not isinstance(props, dict):
            raise _reject("wrong_type", f"feature {name!r} must be an object of properties")
        out.append(Sample(name, ts, seq, _properties(props, f"{name}.")))
    return Telemetry(boot, tuple(out))


def _sample(doc: dict[str, Any], feature: str, now: float, where: str) -> Sample:
    if "ts" not in doc:
        raise _reject("missing_field", f"{where}ts is required")
    ts = _ts(doc["ts"], where + "ts", now)
    seq = _seq(doc["seq"], where + "seq") if "seq" in doc else None
    props = doc.get("properties")
    if not isinstance(props, dict):
        raise _reject("missing_field", f"{where}properties must be an object")
    extra = set(doc) - {"ts", "seq", "properties", "boot"}
    if extra:
        raise _reject("wrong_shape", f"unexpected keys in {where or 'payload'}: {sorted(extra)}")
    return Sample(feature, ts, seq, _properties(props, where + "properties."))


def _check_seq_order(samples: list[Sample]) -> None:
    last = -1
    for s in samples:
        if s.seq is None:
            continue
        if s.seq <= last:
            raise _reject("bad_seq", "samples must be in increasing seq order")
        last = s.seq


def _ts(value: Any, where: str, now: float) -> float:
    if value is None:
        raise _reject("missing_field", f"{where} is required")
    if not _number(value):
        raise _reject("wrong_type", f"{where} must be epoch seconds as a number, got {str(value)[:40]!r}")
    ts = float(value)
    if ts > 1e11:
        raise _reject("bad_timestamp", f"{where} {ts!r} looks like milliseconds; send epoch seconds")
    if ts < MIN_TS or ts > now + MAX_FUTURE_S:
        raise _reject("bad_timestamp", f"{where} {ts!r} is outside 2000-01-01 .. now + 1 day")
    return ts


def _seq(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value >= 2**63:
        raise _reject("wrong_type", f"{where} must be an unsigned integer, got {str(value)[:40]!r}")
    return value


def _boot(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise _reject("wrong_type", f"boot must be a string or integer, got {value!r:.40}")
    boot = str(value)
    if not boot or len(boot) > 64:
        raise _reject("wrong_type", "boot must be 1-64 characters")
    return boot


MAX_INT = 2**63


def _number(value: Any) -> bool:
    """A finite float, or an int that fits in 64 bits (what every store downstream can hold)."""
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, int) and not isinstance(value, bool) and -MAX_INT <= value < MAX_INT


def _properties(props: dict[str, Any], where: str) -> Properties:
    if not props:
        raise _reject("missing_field", f"{where.rstrip('.')} must not be empty")
    if len(props) > MAX_PROPERTIES:
        raise _reject("too_large", f"{len(props)} properties, limit {MAX_PROPERTIES}")
    out: Properties = {}
    for name, value in props.items():
        if not NAME_RE.match(name):
            raise _reject("bad_name", f"property name {name[:64]!r} is not allowed")
        if isinstance(value, bool | str):
            if isinstance(value, str) and len(value) > MAX_STRING:
                raise _reject("too_large", f"{where}{name} is longer than {MAX_STRING} characters")
            out[name] = value
        elif _number(value):
            out[name] = value
        elif isinstance(value, list):
            if not value or len(value) > MAX_ARRAY or not all(_number(v) for v in value):
                raise _reject(
                    "wrong_type", f"{where}{name} must be 1-{MAX_ARRAY} finite numbers"
                )
            out[name] = value
        elif isinstance(value, dict):
            if not value or len(value) > 32:
                raise _reject("wrong_type", f"{where}{name} must have 1-32 named numbers")
            for k, v in value.items():
                if not NAME_RE.match(k) or not _number(v):
                    raise _reject(
                        "wrong_type", f"{where}{name}.{k[:64]} must be a finite number with a plain name"
                    )
            out[name] = value
        else:
            raise _reject("wrong_type", f"{where}{name} has an unsupported value {value!r:.40}")
    return out


def parse_status(raw: bytes, *, max_bytes: int = 4096) -> Status:
    """Validate a node status / Last Will payload. A bare `online`/`offline` string is accepted too."""
    text = raw.strip()
    if text in (b"online", b"offline"):
        return Status(text.decode(), None, None)  # type: ignore[arg-type]
    doc = decode_json(raw, max_bytes)
    if not isinstance(doc, dict) or doc.get("state") not in ("online", "offline"):
        raise _reject("wrong_shape", "status must be {\"state\": \"online\"|\"offline\", ...}")
    fw = doc.get("fw")
    ts = doc.get("ts")
    if fw is not None and (not isinstance(fw, str) or len(fw) > 64):
        raise _reject("wrong_type", "status fw must be a string of at most 64 characters")
    if ts is not None and not _number(ts):
        raise _reject("wrong_type", "status ts must be epoch seconds")
    return Status(doc["state"], fw, float(ts) if ts is not None else None)
