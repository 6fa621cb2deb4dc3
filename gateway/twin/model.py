"""The Thing: identity, metadata, features (reported and desired properties), relationships, version.

Live state is kept in these objects in memory; `to_document()` gives the JSON of the contract and
`from_document()` validates what the API or the SQLite file hands back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.common.errors import Invalid
from gateway.common.names import NAME_RE, THING_ID_RE, TYPE_RE
from gateway.common.timefmt import iso_utc

MAX_DOC_BYTES = 256 * 1024


def message_rank(generation: int, seq: int) -> int:
    """The order of a node's message: its boot's generation first, then its seq (below 2**48)."""
    return (generation << 48) | seq


class Feature:
    """Reported `properties` (from the device) and `desiredProperties` (commands to it).

    Most features are never sent a command: their desired properties stay None until the first
    one (an empty dict per feature is 64 bytes, 2 MiB with 10,000 Things of three features)."""

    __slots__ = ("_desired", "properties", "rank")

    def __init__(self, properties: dict[str, Any] | None = None, desired: dict[str, Any] | None = None,
                 rank: int = -1) -> None:
        self.properties: dict[str, Any] = {} if properties is None else properties
        self._desired: dict[str, Any] | None = desired or None
        # order of the newest message applied (`message_rank`), so a late one cannot overwrite it
        self.rank = rank

    @property
    def desired(self) -> dict[str, Any]:
        """The desired properties, to read or change (made on first use)."""
        if self._desired is None:
            self._desired = {}
        return self._desired

    @property
    def desired_now(self) -> dict[str, Any]:
        """The desired properties to read, without making a dict for a feature that has none."""
        return {} if self._desired is None else self._desired

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Feature):
            return NotImplemented
        return self.properties == other.properties and self.desired_now == other.desired_now

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it was

    def __repr__(self) -> str:
        return f"Feature(properties={self.properties!r}, desired={self.desired_now!r}, rank={self.rank!r})"

    def to_document(self) -> dict[str, Any]:
        out: dict[str, Any] = {"properties": self.properties}
        if self._desired:
            out["desiredProperties"] = self._desired
        return out


@dataclass(slots=True)
class Relationship:
    type: str
    target_id: str

    def to_document(self) -> dict[str, str]:
        return {"type": self.type, "targetId": self.target_id}


@dataclass(slots=True)
class Thing:
    """A physical asset of the line (its node's message sequence is tracked by the ingest, not here)."""

    id: str
    type: str
    metadata: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Feature] = field(default_factory=dict)
    relationships: list[Relationship] = field(default_factory=list)
    version: int = 1
    last_updated: float = 0.0
    created: float = 0.0

    @property
    def equipment_id(self) -> str:
        return self.id.split(":", 1)[1]

    @property
    def site(self) -> str:
        return self.id.split(":", 1)[0]

    def to_document(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "metadata": self.metadata,
            "features": {name: f.to_document() for name, f in self.features.items()},
            "relationships": [r.to_document() for r in self.relationships],
            "version": self.version,
            "lastUpdated": iso_utc(self.last_updated),
        }


def validate_thing_id(thing_id: str) -> str:
    if not isinstance(thing_id, str) or not THING_ID_RE.match(thing_id):
        raise Invalid(
            "thing id must be '{site}:{equipment_id}' (site: a-z 0-9 . _ -; equipment id: "
            "letters, digits . _ -)", thing_id=str(thing_id)[:80]
        )
    return thing_id


def parse_features(doc: Any, where: str = "features") -> dict[str, Feature]:
    """Validate a `features` object of the API: `{name: {properties, desiredProperties}}`."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise Invalid(f"{where} must be an object")
    out = {}
    for name, f in doc.items():
        check_name(name, f"{where} name")
        if not isinstance(f, dict):
            raise Invalid(f"{where}.{name} must be an object with properties/desiredProperties")
        extra = set(f) - {"properties", "desiredProperties"}
        if extra:
            raise Invalid(f"{where}.{name} has unknown keys {sorted(extra)}")
        props = f.get("properties") or {}
        desired = f.get("desiredProperties") or {}
        if not isinstance(props, dict) or not isinstance(desired, dict):
            raise Invalid(f"{where}.{name}.properties and desiredProperties must be objects")
        out[name] = Feature(dict(props), dict(desired))
    return out


def parse_relationships(doc: Any) -> list[Relationship]:
    if doc is None:
        return []
    if not isinstance(doc, list):
        raise Invalid("relationships must be an array of {type, targetId}")
    out = []
    for i, r in enumerate(doc):
        if not isinstance(r, dict) or not isinstance(r.get("type"), str) or not r.get("type"):
            raise Invalid(f"relationships[{i}] must be {{\"type\": ..., \"targetId\": ...}}")
        out.append(Relationship(r["type"], validate_thing_id(r.get("targetId", ""))))
    return out


def check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise Invalid(f"{what} {str(name)[:64]!r} must be a letter or _ then letters, digits, _")
    return name


def thing_from_document(doc: Any, *, now: float) -> Thing:
    """A new Thing from an API document (id, type, metadata, features, relationships)."""
    if not isinstance(doc, dict):
        raise Invalid("a Thing must be a JSON object")
    extra = set(doc) - {"id", "type", "metadata", "features", "relationships", "version", "lastUpdated"}
    if extra:
        raise Invalid(f"unknown keys {sorted(extra)}")
    thing_id = validate_thing_id(doc.get("id", ""))
    ttype = doc.get("type")
    if not isinstance(ttype, str) or not TYPE_RE.match(ttype):
        raise Invalid("type must be lowercase letters, digits, _ or - (e.g. 'oven')")
    metadata = doc.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise Invalid("metadata must be an object")
    return Thing(
        id=thing_id,
        type=ttype,
        metadata=dict(metadata),
        features=parse_features(doc.get("features")),
        relationships=parse_relationships(doc.get("relationships")),
        version=1,
        last_updated=now,
        created=now,
    )
