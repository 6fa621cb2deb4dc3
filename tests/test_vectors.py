"""The golden payload vectors (tests/vectors/*.json), written by the node firmware's C++ tests, read by
the gateway's own code: every telemetry payload parses to exactly the points the firmware meant
(feature, flattened path, value and its type, ts, seq, boot) and is stored as those points, once, even
when the node sends it again; statuses become the Thing's connectivity; acknowledgements complete the
command they answer. Firmware and gateway cannot drift apart without one side's tests failing
(the C++ side fails when the committed files differ from what its encoder writes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from gateway.bus import iso_utc
from gateway.common.series import flatten
from gateway.config import IngestSection
from gateway.ingest.payload import parse_status, parse_telemetry
from gateway.ingest.topics import TopicPattern
from gateway.service import GatewayService
from tests.helpers import gateway_config

VECTOR_DIR = Path(__file__).parent / "vectors"
VECTORS = sorted(VECTOR_DIR.glob("*.json"))
SITE = "izmir-bakery"
INGEST = IngestSection()
TELEMETRY = TopicPattern.parse(INGEST.telemetry_topic)
STATUS = TopicPattern.parse(INGEST.status_topic)
ACK = TopicPattern.parse(INGEST.command_topic + "/ack")


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return doc


def of_kind(kind: str) -> list[Path]:
    return [p for p in VECTORS if kind in load(p)]


def same(got: Any, want: Any) -> bool:
    """Equal and of the same JSON type: 1 and 1.0 are the same number, but True is not 1."""
    if isinstance(got, bool) or isinstance(want, bool):
        return type(got) is type(want) and got == want
    if isinstance(got, int | float) and isinstance(want, int | float):
        return float(got) == float(want)
    return type(got) is type(want) and bool(got == want)


def test_the_vectors_cover_every_shape_the_node_sends() -> None:
    assert VECTORS, f"no vectors in {VECTOR_DIR}; write them with the firmware's host tests (firmware/README.md)"
    points = [pt for p in of_kind("points") for pt in load(p)["points"]]
    paths = {pt["path"] for pt in points}
    assert {"temperature_zones[1]", "voltage.a", "current.c", "power_factor", "power_kw"} <= paths
    assert {type(pt["value"]) for pt in points} >= {str, bool, float, int}
    batches = [p for p in of_kind("points") if "samples" in json.loads(load(p)["payload"])]
    assert batches and all(len(json.loads(load(p)["payload"])["samples"]) > 1 for p in batches)
    assert {load(p)["status"]["state"] for p in of_kind("status")} == {"online", "offline"}
    assert {load(p)["ack"]["status"] for p in of_kind("ack")} == {"ok", "rejected"}
    for p in VECTORS:
        assert load(p)["name"] == p.stem


@pytest.mark.parametrize("path", of_kind("points"), ids=lambda p: p.stem)
def test_the_gateway_parses_the_points_the_node_meant(path: Path) -> None:
    v = load(path)
    fields = TELEMETRY.match(v["topic"])
    assert fields is not None, f"{v['topic']} does not match {INGEST.telemetry_topic}"
    assert fields["site"] == SITE
    t = parse_telemetry(v["payload"].encode(), feature=fields["feature"], max_bytes=INGEST.max_payload_bytes,
                        max_samples=INGEST.max_samples)
    got = [{"feature": s.feature, "path": p, "value": x, "ts": s.ts, "seq": s.seq, "boot": t.boot}
           for s in t.samples for p, x in flatten(s.properties)]
    want = v["points"]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        assert all(same(g[k], w[k]) for k in g), (g, w)


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayService]:
    """The gateway's real registry, dead-letter log, DuckDB buffer and ingest, fed without a broker."""
    service = GatewayService(gateway_config(tmp_path, ("127.0.0.1", 1883), **{"gateway.site": SITE}))
    await service.registry.start()
    await service.dead_letters.start()
    await service.buffer.start()
    try:
        yield service
    finally:
        await service.buffer.stop()
        await service.dead_letters.stop()
        await service.registry.stop()


async def stored(gw: GatewayService) -> list[tuple[str, str, str, float, Any]]:
    await gw.buffer.flush()
    rows = (await gw.buffer.read_points(None, 0.0, 2.0**40)).to_pylist()
    return [(r["thing_id"], r["feature"], r["path"], r["ts"], r["value"] if r["text"] is None else r["text"])
            for r in rows]


def as_stored(value: Any) -> Any:
    """How the buffer keeps a value: text as text, numbers and booleans as floats."""
    return value if isinstance(value, str) else float(value)


@pytest.mark.parametrize("path", of_kind("points"), ids=lambda p: p.stem)
async def test_the_gateway_stores_the_points_once(gateway: GatewayService, path: Path) -> None:
    v = load(path)
    fields = TELEMETRY.match(v["topic"])
    assert fields is not None
    thing_id = f"{SITE}:{fields['equipment_id']}"
    gateway.ingest.handle(v["topic"], v["payload"].encode())
    assert gateway.dead_letters.total == 0, "the gateway rejected the payload (see the warning log)"
    want = [(thing_id, p["feature"], p["path"], p["ts"], as_stored(p["value"])) for p in v["points"]]
    assert await stored(gateway) == want
    # The node's boot and last seq are what the gateway de-duplicates by.
    last = v["points"][-1]
    assert gateway.sequences.newest(thing_id) == (last["boot"], last["seq"])
    # The live twin holds each property's last value.
    doc = json.loads(v["payload"])
    latest: dict[str, Any] = {}
    for sample in doc.get("samples", [doc]):
        latest.update(sample["properties"])
    thing = gateway.registry.get(thing_id)
    assert thing is not None and thing.type == fields["type"]
    assert thing.features[fields["feature"]].properties == latest
    # After a reconnect the node sends an unconfirmed message again, byte for byte: nothing is stored twice.
    gateway.ingest.handle(v["topic"], v["payload"].encode())
    assert gateway.dead_letters.total == 0
    assert await stored(gateway) == want


@pytest.mark.parametrize("path", of_kind("status"), ids=lambda p: p.stem)
async def test_the_status_becomes_the_things_connectivity(gateway: GatewayService, path: Path) -> None:
    v = load(path)
    fields = STATUS.match(v["topic"])
    assert fields is not None, f"{v['topic']} does not match {INGEST.status_topic}"
    status = parse_status(v["payload"].encode())
    assert {"state": status.state, "fw": status.fw, "ts": status.ts} == v["status"]
    thing_id = f"{SITE}:{fields['equipment_id']}"
    gateway.registry.ensure(thing_id, fields["type"], {"name": fields["equipment_id"]})
    gateway.ingest.handle(v["topic"], v["payload"].encode(), retain=True)
    assert gateway.dead_letters.total == 0
    thing = gateway.registry.get(thing_id)
    assert thing is not None
    props = thing.features["connectivity"].properties
    assert props["state"] == v["status"]["state"] and props["fw"] == v["status"]["fw"]
    if v["status"]["ts"] is not None:
        assert props["since"] == iso_utc(v["status"]["ts"])


@pytest.mark.parametrize("path", of_kind("ack"), ids=lambda p: p.stem)
async def test_the_ack_completes_the_command_it_answers(gateway: GatewayService, path: Path) -> None:
    v = load(path)
    fields = ACK.match(v["topic"])
    assert fields is not None, f"{v['topic']} does not match {INGEST.command_topic}/ack"
    command = json.loads(v["command"])  # what the gateway published, as the node parsed it
    ack = json.loads(v["payload"])
    assert ack["cmdId"] == command["cmdId"] == v["ack"]["cmdId"]
    assert {"cmdId": ack["cmdId"], "status": ack["status"], "properties": ack.get("properties"),
            "detail": ack.get("detail")} == v["ack"]
    # The same steps as a client writing desired properties through the API.
    thing_id = f"{SITE}:{fields['equipment_id']}"
    thing = gateway.registry.ensure(thing_id, fields["type"], {"name": fields["equipment_id"]})
    feature, desired = command["feature"], command["desiredProperties"]
    gateway.registry.merge_feature(thing_id, feature, properties=None, desired=desired, expected_version=None)
    pending = gateway.registry.register_command(thing, feature, desired)
    # The gateway's cmdId is random; everything else is the node's payload byte for byte.
    payload = v["payload"].replace(command["cmdId"], pending.cmd_id)
    gateway.ingest.handle(v["topic"], payload.encode())
    assert gateway.dead_letters.total == 0, "the gateway rejected the ack (see the warning log)"
    after = gateway.registry.get(thing_id)
    assert after is not None
    last = after.features["commands"].properties["last"]
    assert last["cmdId"] == pending.cmd_id and last["status"] == ack["status"]
    f = after.features[feature]
    if ack["status"] == "ok":
        assert f.desired == {}  # done: nothing is desired any more
        assert f.properties == ack["properties"]  # the values the node reports now
    else:
        assert f.desired == desired  # still wanted, not done
        assert last["detail"] == ack["detail"]
        assert f.properties == {}
    # The same ack again (a QoS 1 redelivery) finds no pending command and changes nothing.
    version = after.version
    gateway.ingest.handle(v["topic"], payload.encode())
    assert gateway.dead_letters.total == 1
    assert gateway.registry.get(thing_id).version == version  # type: ignore[union-attr]
