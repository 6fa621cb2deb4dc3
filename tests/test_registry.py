"""The twin registry on its own: a real SQLite file, a real bus, no broker.

Events wait in subscriber queues until a WebSocket client reads them, so each one must keep the
state it was made with whatever the registry does afterwards.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.bus import EventBus, Subscription
from gateway.common.errors import Invalid
from gateway.common.readings import Sample
from gateway.twin.model import check_name, thing_from_document, validate_thing_id
from gateway.twin.registry import TwinRegistry

OVEN = "izmir-bakery:oven-001"
MIXER = "izmir-bakery:mixer-002"


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
async def registry(tmp_path: Path, bus: EventBus) -> AsyncIterator[TwinRegistry]:
    reg = TwinRegistry(tmp_path / "registry.sqlite", bus, flush_interval_s=60)
    await reg.start()
    yield reg
    await reg.stop()


def watch_all(bus: EventBus) -> Subscription:
    sub = bus.subscribe("test", maxsize=1000)
    sub.watch(everything=True)
    return sub


def queued(sub: Subscription) -> list[dict[str, Any]]:
    """What a slow subscriber finally sends: each event serialized only now."""
    return [json.loads(e.to_json()) for e in sub.drain()]


async def create(reg: TwinRegistry, thing_id: str, ttype: str, features: dict[str, Any]) -> None:
    await reg.create({"id": thing_id, "type": ttype, "features": features})


# ------------------------------------------------------------------ names


def test_a_thing_id_with_a_trailing_newline_is_rejected() -> None:
    assert validate_thing_id(OVEN) == OVEN
    with pytest.raises(Invalid):
        validate_thing_id(OVEN + "\n")


def test_a_feature_name_or_type_with_a_trailing_newline_is_rejected() -> None:
    with pytest.raises(Invalid):
        check_name("thermal\n", "feature")
    with pytest.raises(Invalid, match="type"):
        thing_from_document({"id": OVEN, "type": "oven\n"}, now=time.time())


# ------------------------------------------------------------------ command acks


async def test_an_ack_on_another_things_topic_leaves_the_command_pending(registry: TwinRegistry) -> None:
    await create(registry, OVEN, "oven", {"thermal": {"properties": {"setpoint": 180.0}}})
    await create(registry, MIXER, "mixer", {})
    oven = registry.require(OVEN)
    registry.merge_feature(OVEN, "thermal", properties=None, desired={"setpoint": 200.0}, expected_version=None)
    cmd = registry.register_command(oven, "thermal", {"setpoint": 200.0})
    version = oven.version

    assert registry.apply_command_ack(cmd.cmd_id, "ok", None, None, time.time(), thing_id=MIXER) is False
    assert oven.version == version
    assert oven.features["thermal"].properties["setpoint"] == 180.0
    assert "commands" not in registry.require(MIXER).features

    assert registry.apply_command_ack(cmd.cmd_id, "ok", None, None, time.time(), thing_id=OVEN) is True
    assert oven.features["thermal"].properties["setpoint"] == 200.0
    assert oven.features["thermal"].desired == {}
    assert registry.apply_command_ack(cmd.cmd_id, "ok", None, None, time.time(), thing_id=OVEN) is False


# ------------------------------------------------------------------ events keep their state


async def test_a_telemetry_event_keeps_its_nested_values_after_a_merge(registry: TwinRegistry, bus: EventBus) -> None:
    await create(registry, OVEN, "oven", {})
    sub = watch_all(bus)
    thing = registry.require(OVEN)
    registry.apply_samples(thing, [Sample("power", time.time(), 1, {"voltage": {"a": 230.0, "b": 231.0}})],
                           time.time())
    registry.merge_feature(OVEN, "power", properties={"voltage": {"a": 1.0, "b": None}}, desired=None,
                           expected_version=None)

    first, second = queued(sub)
    assert first["properties"] == {"voltage": {"a": 230.0, "b": 231.0}}
    assert second["properties"] == {"voltage": {"a": 1.0, "b": None}}
    assert thing.features["power"].properties == {"voltage": {"a": 1.0}}


async def test_a_command_ack_event_keeps_the_state_of_its_moment(registry: TwinRegistry, bus: EventBus) -> None:
    await create(registry, OVEN, "oven", {"thermal": {"properties": {"zones": {"top": 180.0}}}})
    oven = registry.require(OVEN)
    registry.merge_feature(OVEN, "thermal", properties=None, desired={"zones": {"top": 200.0}, "fan": 2},
                           expected_version=None)
    cmd = registry.register_command(oven, "thermal", {"zones": {"top": 200.0}})
    sub = watch_all(bus)
    registry.apply_command_ack(cmd.cmd_id, "ok", None, None, time.time(), thing_id=OVEN)
    # Later changes of the same feature, nested and top level, reported and desired.
    registry.merge_feature(OVEN, "thermal", properties={"zones": {"top": 1.0, "bottom": 2.0}, "extra": 3},
                           desired={"fan": None, "zones": {"top": 5.0}}, expected_version=None)
    registry.apply_samples(oven, [Sample("thermal", time.time(), 1, {"zones": {"top": 7.0}})], time.time())

    ack = next(e for e in queued(sub) if e["version"] == oven.version - 2)
    assert ack["properties"] == {"zones": {"top": 200.0}}
    assert ack["desiredProperties"] == {"fan": 2}


async def test_an_api_change_event_owns_its_patch(registry: TwinRegistry, bus: EventBus) -> None:
    await create(registry, OVEN, "oven", {})
    sub = watch_all(bus)
    patch: dict[str, Any] = {"recipe": {"name": "baguette"}}
    desired: dict[str, Any] = {"setpoint": {"top": 190.0}}
    registry.merge_feature(OVEN, "thermal", properties=patch, desired=desired, expected_version=None)
    patch["recipe"]["name"] = "changed by the caller"
    desired["setpoint"]["top"] = -1.0
    (event,) = queued(sub)
    assert event["properties"] == {"recipe": {"name": "baguette"}}
    assert event["desiredProperties"] == {"setpoint": {"top": 190.0}}


async def test_lifecycle_documents_keep_the_state_of_their_moment(registry: TwinRegistry, bus: EventBus) -> None:
    sub = watch_all(bus)
    await create(registry, OVEN, "oven", {"power": {"properties": {"voltage": {"a": 230.0}, "on": True}}})
    await registry.replace(OVEN, {"metadata": {"line": "line-a"},
                                  "features": {"power": {"properties": {"voltage": {"a": 231.0}}}}},
                           expected_version=None)
    oven = registry.require(OVEN)
    registry.apply_samples(oven, [Sample("power", time.time(), 1, {"on": False})], time.time())
    registry.merge_feature(OVEN, "power", properties={"voltage": {"a": 0.0}}, desired=None, expected_version=None)
    oven.metadata["line"] = "line-b"

    created, updated, *changes = queued(sub)
    assert created["event"] == "ThingCreated"
    assert created["thing"]["features"]["power"]["properties"] == {"voltage": {"a": 230.0}, "on": True}
    assert updated["event"] == "ThingUpdated"
    assert updated["thing"]["features"]["power"]["properties"] == {"voltage": {"a": 231.0}}
    assert updated["thing"]["metadata"] == {"line": "line-a"}
    assert [e["event"] for e in changes] == ["StateChanged", "StateChanged"]

