"""The Thing filter language, evaluated on real Things."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.common.errors import Invalid
from gateway.twin.model import Feature, Thing
from gateway.twin.query import OPERATORS, ThingFilter


def oven() -> Thing:
    return Thing(
        id="izmir-bakery:oven-001",
        type="oven",
        metadata={"name": "Oven 1", "line": "line-a", "location": {"hall": "B", "floor": 2}, "tags": ["bread", "hot"]},
        features={
            "thermal": Feature(
                properties={
                    "temperature": 182.5,
                    "temperature_zones": [180.0, 185.5, 190.0],
                    "mode": "bake",
                    "door_open": False,
                    "cycles": 1,
                },
                desired={"setpoint": 200.0},
            ),
            "power": Feature(properties={"voltage": {"a": 230.1, "b": 229.8, "c": 231.0}, "running": True}),
        },
    )


def mixer() -> Thing:
    return Thing(
        id="izmir-bakery:mixer-002",
        type="mixer",
        metadata={"name": "Mixer 2", "line": "line-b"},
        features={"drive": Feature(properties={"rpm": 90, "running": False, "enabled": 1})},
    )


THINGS = [oven(), mixer()]


def matching(doc: Any) -> list[str]:
    flt = ThingFilter.parse(doc)
    return [t.id for t in THINGS if flt.matches(t)]


OVEN, MIXER = "izmir-bakery:oven-001", "izmir-bakery:mixer-002"


# ------------------------------------------------------------------ equality and paths


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({}, [OVEN, MIXER]),
        (None, [OVEN, MIXER]),
        ({"id": OVEN}, [OVEN]),
        ({"type": "mixer"}, [MIXER]),
        ({"type": "press"}, []),
        ({"metadata.line": "line-a"}, [OVEN]),
        ({"metadata.location.hall": "B"}, [OVEN]),
        ({"metadata.location.floor": 2}, [OVEN]),
        ({"metadata.tags[1]": "hot"}, [OVEN]),
        ({"features.thermal.mode": "bake"}, [OVEN]),
        ({"features.thermal.temperature": 182.5}, [OVEN]),
        ({"features.drive.rpm": 90.0}, [MIXER]),  # 90 == 90.0: numbers compare by value
        ({"features.thermal.temperature_zones[1]": 185.5}, [OVEN]),
        ({"features.thermal.temperature_zones[0]": 185.5}, []),
        ({"features.power.voltage.a": 230.1}, [OVEN]),
        ({"features.power.voltage.b": 230.1}, []),
        ({"features.power.voltage": {"a": 230.1, "b": 229.8, "c": 231.0}}, [OVEN]),  # a literal object
        ({"features.thermal.temperature_zones": [180.0, 185.5, 190.0]}, [OVEN]),
        ({"features.thermal.desired.setpoint": 200.0}, [OVEN]),
        ({"type": "oven", "metadata.line": "line-a"}, [OVEN]),  # keys are ANDed
        ({"type": "oven", "metadata.line": "line-b"}, []),
    ],
)
def test_equality_on_paths(doc: Any, expected: list[str]) -> None:
    assert matching(doc) == expected


def test_desired_and_reported_properties_are_separate() -> None:
    assert matching({"features.thermal.setpoint": 200.0}) == []  # desired is not reported
    assert matching({"features.thermal.desired.mode": "bake"}) == []  # reported is not desired
    assert matching({"features.thermal.desired.setpoint": {"$exists": True}}) == [OVEN]


# ------------------------------------------------------------------ operators


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"features.thermal.temperature": {"$eq": 182.5}}, [OVEN]),
        ({"features.thermal.temperature": {"$ne": 182.5}}, [MIXER]),  # missing counts as "not equal"
        ({"type": {"$ne": "oven"}}, [MIXER]),
        ({"features.thermal.temperature": {"$gt": 182.5}}, []),
        ({"features.thermal.temperature": {"$gt": 182.4}}, [OVEN]),
        ({"features.thermal.temperature": {"$gte": 182.5}}, [OVEN]),
        ({"features.thermal.temperature": {"$lt": 182.5}}, []),
        ({"features.thermal.temperature": {"$lt": 182.6}}, [OVEN]),
        ({"features.thermal.temperature": {"$lte": 182.5}}, [OVEN]),
        ({"features.thermal.temperature": {"$gt": 180, "$lt": 190}}, [OVEN]),  # a range
        ({"features.thermal.temperature": {"$gt": 183, "$lt": 190}}, []),
        ({"features.thermal.temperature_zones[2]": {"$gte": 190}}, [OVEN]),
        ({"features.power.voltage.c": {"$lt": 231}}, []),
        ({"metadata.name": {"$gt": "Mixer 3"}}, [OVEN]),  # strings order lexicographically
        ({"type": {"$in": ["mixer", "press"]}}, [MIXER]),
        ({"type": {"$in": []}}, []),
        ({"type": {"$nin": ["mixer", "press"]}}, [OVEN]),
        ({"features.drive.rpm": {"$exists": True}}, [MIXER]),
        ({"features.drive.rpm": {"$exists": False}}, [OVEN]),
        ({"metadata.location": {"$exists": True}}, [OVEN]),
        ({"id": {"$prefix": "izmir-bakery:mix"}}, [MIXER]),
        ({"id": {"$prefix": "ankara:"}}, []),
        ({"features.drive.rpm": {"$prefix": "9"}}, []),  # $prefix only matches strings
    ],
)
def test_every_operator(doc: Any, expected: list[str]) -> None:
    assert matching(doc) == expected


def test_every_documented_operator_is_exercised() -> None:
    assert set(OPERATORS) == {"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin", "$exists", "$prefix"}


def test_ordering_across_types_never_matches_and_never_raises() -> None:
    assert matching({"features.thermal.mode": {"$gt": 5}}) == []
    assert matching({"features.thermal.temperature": {"$lt": "z"}}) == []
    assert matching({"features.thermal.temperature_zones": {"$gt": 5}}) == []


# ------------------------------------------------------------------ $or


def test_or_matches_when_any_branch_does() -> None:
    assert matching({"$or": [{"type": "mixer"}, {"metadata.location.hall": "B"}]}) == [OVEN, MIXER]
    assert matching({"$or": [{"type": "press"}, {"metadata.line": "line-b"}]}) == [MIXER]
    assert matching({"$or": [{"type": "press"}, {"type": "kiln"}]}) == []


def test_or_is_anded_with_the_other_keys() -> None:
    assert matching({"metadata.line": "line-a", "$or": [{"type": "mixer"}, {"type": "oven"}]}) == [OVEN]
    assert matching({"metadata.line": "line-b", "$or": [{"type": "press"}, {"type": "oven"}]}) == []


def test_or_nests_up_to_four_levels() -> None:
    doc: dict[str, Any] = {"type": "oven"}
    for _ in range(4):
        doc = {"$or": [doc]}
    assert matching(doc) == [OVEN]
    with pytest.raises(Invalid, match="too deeply"):
        ThingFilter.parse({"$or": [doc]})


# ------------------------------------------------------------------ bool is not a number


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"features.power.running": True}, [OVEN]),
        ({"features.power.running": 1}, []),
        ({"features.drive.running": 0}, []),
        ({"features.drive.running": False}, [MIXER]),
        ({"features.drive.enabled": True}, []),  # the integer 1 is not true
        ({"features.drive.enabled": 1}, [MIXER]),
        ({"features.thermal.cycles": True}, []),
        ({"features.power.running": {"$in": [1]}}, []),
        ({"features.power.running": {"$in": [True]}}, [OVEN]),
        ({"features.drive.enabled": {"$in": [True]}}, []),
        ({"features.power.running": {"$ne": 1}}, [OVEN, MIXER]),
        ({"features.drive.enabled": {"$nin": [True]}}, [OVEN, MIXER]),
        ({"features.power.running": {"$gt": 0}}, []),
        ({"features.drive.enabled": {"$gte": False}}, []),
        ({"features.drive.running": {"$lt": True}}, [MIXER]),  # bools order among themselves
    ],
)
def test_true_never_equals_one(doc: Any, expected: list[str]) -> None:
    assert matching(doc) == expected


PANEL = Thing(
    id="izmir-bakery:panel-001",
    type="panel",
    metadata={"flags": [True, False, 1], "opts": {"on": True, "level": 1, "sub": {"ok": [True]}}, "count": 1},
)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"metadata.flags": [True, False, 1]}, True),
        ({"metadata.flags": [1, 0, 1]}, False),
        ({"metadata.flags": [True, False, True]}, False),  # 1 at the end is not true
        ({"metadata.flags": [1.0, 0.0, 1.0]}, False),
        ({"metadata.flags": [True, False]}, False),
        ({"metadata.flags[0]": 1}, False),
        ({"metadata.flags[2]": True}, False),
        ({"metadata.flags[2]": 1.0}, True),
        ({"metadata.opts": {"on": True, "level": 1, "sub": {"ok": [True]}}}, True),
        ({"metadata.opts": {"on": 1, "level": 1, "sub": {"ok": [True]}}}, False),
        ({"metadata.opts": {"on": True, "level": True, "sub": {"ok": [True]}}}, False),
        ({"metadata.opts": {"on": True, "level": 1, "sub": {"ok": [1]}}}, False),  # three levels down
        ({"metadata.opts.sub": {"ok": [1]}}, False),
        ({"metadata.opts.sub": {"ok": [True]}}, True),
        ({"metadata.opts.sub.ok": [1.0]}, False),
        ({"metadata.opts": {"$in": [{"on": 1, "level": 1, "sub": {"ok": [1]}}]}}, False),
        ({"metadata.opts": {"$in": [{"on": True, "level": 1, "sub": {"ok": [True]}}]}}, True),
        ({"metadata.flags": {"$ne": [1, 0, 1]}}, True),
        ({"metadata.flags": {"$nin": [[1, 0, 1], [True, True, True]]}}, True),
        ({"metadata.flags": {"$in": [[1, 0, 1], [True, False, 1]]}}, True),
        ({"metadata.count": True}, False),
        ({"metadata.count": {"$in": [[1], True]}}, False),
    ],
)
def test_true_never_equals_one_at_any_depth(doc: Any, expected: bool) -> None:
    assert ThingFilter.parse(doc).matches(PANEL) is expected


# ------------------------------------------------------------------ missing paths


@pytest.mark.parametrize(
    "path",
    [
        "metadata.owner",
        "metadata.location.room",
        "metadata.name.first",  # below a string
        "metadata.tags[5]",  # index out of range
        "metadata.location[0]",  # index into an object
        "features.nothing.temperature",  # no such feature
        "features.thermal.humidity",
        "features.thermal.temperature_zones[3]",
        "features.thermal.temperature.x",
        "features.power.voltage.d",
        "features.power.desired.voltage",  # a feature without desired properties
    ],
)
def test_missing_paths_never_match_values_but_match_exists_false(path: str) -> None:
    assert matching({path: None}) == []
    assert matching({path: {"$gte": -1e9}}) == []
    assert matching({path: {"$lte": 1e9}}) == []
    assert matching({path: {"$in": [None, 0, ""]}}) == []
    assert matching({path: {"$exists": True}}) == []
    assert matching({path: {"$exists": False}}) == [OVEN, MIXER]
    assert matching({path: {"$ne": 1}}) == [OVEN, MIXER]


# ------------------------------------------------------------------ invalid filters


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([{"type": "oven"}], "filter must be a JSON object"),
        ("type=oven", "filter must be a JSON object"),
        ({"name": "Oven 1"}, "filter key 'name' is not one of id, type, metadata.<key>"),
        ({"metadata": "x"}, "filter key 'metadata' is not one of"),
        ({"features.thermal": "x"}, "filter key 'features.thermal' is not one of"),
        ({"id.x": "x"}, "filter key 'id.x' is not one of"),
        ({"$and": [{"type": "oven"}]}, "filter key '$and' is not one of"),
        ({"metadata..line": "x"}, "filter key 'metadata..line' has an empty part"),
        ({"features.thermal.": 1}, "has an empty part"),
        ({"type": {"$regex": "ov.*"}}, "unknown operator '$regex' for 'type' (known: $eq, $ne, $gt"),
        ({"type": {"$in": "oven"}}, "$in for 'type' needs an array"),
        ({"type": {"$nin": "oven"}}, "$nin for 'type' needs an array"),
        ({"type": {"$exists": 1}}, "$exists for 'type' needs true or false"),
        ({"id": {"$prefix": 5}}, "$prefix for 'id' needs a string"),
        ({"$or": {"type": "oven"}}, "$or must be a non-empty array of filters"),
        ({"$or": []}, "$or must be a non-empty array of filters"),
        ({"$or": ["oven"]}, "filter must be a JSON object"),
        ({"$or": [{"nope": 1}]}, "filter key 'nope'"),
    ],
)
def test_invalid_filters_raise_invalid_with_a_clear_message(doc: Any, message: str) -> None:
    with pytest.raises(Invalid) as exc:
        ThingFilter.parse(doc)
    assert message in exc.value.detail


def test_an_index_with_a_trailing_newline_is_not_an_index() -> None:
    assert matching({"features.thermal.temperature_zones[1]": 185.5}) == [OVEN]
    assert matching({"features.thermal.temperature_zones[1]\n": 185.5}) == []


def test_parse_keeps_the_source_for_echoing_back() -> None:
    doc = {"type": "oven", "$or": [{"metadata.line": "line-a"}]}
    assert ThingFilter.parse(doc).source == doc


def test_filter_sees_live_changes_of_a_thing() -> None:
    thing = oven()
    flt = ThingFilter.parse({"features.thermal.temperature": {"$gt": 200}})
    assert not flt.matches(thing)
    thing.features["thermal"].properties["temperature"] = 210.0
    assert flt.matches(thing)
