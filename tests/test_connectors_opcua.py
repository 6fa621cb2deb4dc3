"""The OPC UA connector against asyncua's own server: values and their types, status codes as
quality, SourceTimestamp as device time, subscriptions and the polling fallback, writes, security
(Basic256Sha256 SignAndEncrypt with a user, certificates made here with `cryptography`), the
server certificate pinned on first use, and `egiz connectors browse`."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio
from asyncua import ua

from gateway.connectors.base import DeviceError, RawValue, SharedLinks, WriteRefused
from gateway.connectors.config import OpcUaDevice, OpcUaTag
from gateway.connectors.opcua import APPLICATION_URI, OpcUaConnector
from gateway.sim.plc_image import POINTS
from gateway.sim.plc_opcua import OpcUaPlc, OpcUaServe
from tests.helpers.pki import application_certificate
from tests.helpers.processes import EGIZ
from tests.helpers.waiting import wait_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tag(prop: str, node: str, **kw: object) -> OpcUaTag:
    return OpcUaTag(feature="climate", property=prop, node=node, **kw)  # type: ignore[arg-type]


def device(url: str, tags: Sequence[OpcUaTag], **kw: object) -> OpcUaDevice:
    return OpcUaDevice(name="proofer-plc", url=url, thing="proofer-201", type="proofer", poll_s=0.2,
                       timeout_s=3.0, tags=tuple(tags), **kw)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def plc() -> AsyncIterator[OpcUaPlc]:
    """One proofer PLC (anonymous, no security) with extra variables of every type a tag holds."""
    server = OpcUaPlc(OpcUaServe(port=free_port()), "proofer", POINTS["proofer"])
    await server.start()
    assert server.server is not None
    objects = server.server.nodes.objects
    for name, value, vtype in (("Int16", -1234, ua.VariantType.Int16), ("UInt32", 4_000_000_000, ua.VariantType.UInt32),
                               ("Float", 1.5, ua.VariantType.Float), ("Text", "rye", ua.VariantType.String),
                               ("Flag", True, ua.VariantType.Boolean)):
        var = await objects.add_variable(f"ns={server.ns};s=Types.{name}", name, ua.Variant(value, vtype))
        await var.set_writable()
    yield server
    await server.stop()


pytestmark = pytest.mark.asyncio(loop_scope="module")


async def test_polled_values_carry_their_types_and_the_source_timestamp(plc: OpcUaPlc) -> None:
    stamp = time.time() - 30.0
    await plc.publish({"Temperature": 35.25, "Running": True, "BatchCount": 7}, stamp)
    ns = plc.ns
    tags = [tag("temperature", f"ns={ns};s=Proofer.Temperature"), tag("running", f"ns={ns};s=Proofer.Running"),
            tag("batches", f"ns={ns};s=Proofer.BatchCount"), tag("i16", f"ns={ns};s=Types.Int16"),
            tag("u32", f"ns={ns};s=Types.UInt32"), tag("f32", f"ns={ns};s=Types.Float"),
            tag("text", f"ns={ns};s=Types.Text"), tag("flag", f"ns={ns};s=Types.Flag")]
    conn = OpcUaConnector(device(plc.serve.url, tags, mode="poll"), SharedLinks())
    await conn.connect()
    try:
        assert await conn.subscribe(lambda values: None) is False  # mode = "poll"
        result = await conn.read()
    finally:
        await conn.close()
    assert result.requests == 1  # every tag in one Read
    got = {v.tag.property: v for v in result.values}
    assert got["temperature"].value == 35.25 and isinstance(got["temperature"].value, float)
    assert got["running"].value is True
    assert got["batches"].value == 7 and isinstance(got["batches"].value, int)
    assert got["i16"].value == -1234 and got["u32"].value == 4_000_000_000
    assert got["f32"].value == 1.5 and got["text"].value == "rye" and got["flag"].value is True
    assert all(v.quality == "good" for v in result.values)
    # the device's time, not the time of the read
    assert got["temperature"].ts == pytest.approx(stamp, abs=0.01)


async def test_bad_and_uncertain_status_codes_become_quality(plc: OpcUaPlc) -> None:
    ns = plc.ns
    conn = OpcUaConnector(device(plc.serve.url, [tag("temperature", f"ns={ns};s=Proofer.Temperature"),
                                                 tag("humidity", f"ns={ns};s=Proofer.Humidity")], mode="poll"),
                          SharedLinks())
    await conn.connect()
    try:
        await plc.set_status("Temperature", ua.StatusCodes.BadSensorFailure, 999.0)
        await plc.set_status("Humidity", ua.StatusCodes.UncertainLastUsableValue, 71.5)
        got = {v.tag.property: v for v in (await conn.read()).values}
        assert got["temperature"].quality == "bad" and got["temperature"].value is None  # never stored as good
        assert got["humidity"].quality == "uncertain" and got["humidity"].value == 71.5
        await plc.publish({"Temperature": 30.5, "Humidity": 70.0}, time.time())
        got = {v.tag.property: v for v in (await conn.read()).values}
        assert got["temperature"].quality == "good" and got["temperature"].value == 30.5
    finally:
        await conn.close()


async def test_subscription_pushes_changes_with_status_and_falls_back_to_polling_a_refused_node(plc: OpcUaPlc) -> None:
    ns = plc.ns
    tags = [tag("temperature", f"ns={ns};s=Proofer.Temperature", sampling_ms=50.0, queue_size=4),
            tag("humidity", f"ns={ns};s=Proofer.Humidity", data_change_deadband=5.0),
            tag("ghost", f"ns={ns};s=Proofer.NoSuchNode")]
    conn = OpcUaConnector(device(plc.serve.url, tags, publishing_ms=50.0), SharedLinks())
    pushed: list[RawValue] = []
    await conn.connect()
    try:
        await plc.publish({"Temperature": 31.0, "Humidity": 60.0}, time.time())
        assert await conn.subscribe(pushed.extend) is True
        assert [t.property for t in conn.polled] == ["ghost"]  # the server refused to monitor it: polled
        await wait_for(lambda: any(v.tag.property == "temperature" and v.value == 31.0 for v in pushed), 10)
        for value in (32.0, 33.0):
            await plc.publish({"Temperature": value, "Humidity": 61.0}, time.time())  # humidity within deadband
            await wait_for(lambda v=value: any(p.value == v for p in pushed), 10)  # type: ignore[misc]
        await plc.publish({"Humidity": 70.0}, time.time())  # past the 5.0 deadband
        await wait_for(lambda: any(v.tag.property == "humidity" and v.value == 70.0 for v in pushed), 10)
        assert not any(v.tag.property == "humidity" and v.value == 61.0 for v in pushed)  # the server held it back
        await plc.set_status("Temperature", ua.StatusCodes.BadSensorFailure)
        await wait_for(lambda: pushed[-1].tag.property == "temperature" and pushed[-1].quality == "bad", 10)
        polled = await conn.read()
        assert [(v.tag.property, v.quality) for v in polled.values] == [("ghost", "bad")]
    finally:
        await conn.close()


async def test_write_converts_to_the_node_type_and_reads_back(plc: OpcUaPlc) -> None:
    ns = plc.ns
    setpoint = tag("setpoint", f"ns={ns};s=Proofer.Setpoint", writable=True)
    small = tag("i16", f"ns={ns};s=Types.Int16", writable=True)
    conn = OpcUaConnector(device(plc.serve.url, [setpoint, small], mode="poll"), SharedLinks())
    await conn.connect()
    try:
        assert await conn.write(setpoint, 38) == 38.0
        assert (await plc.written())["Setpoint"] == 38.0
        assert await conn.write(small, 1200.0) == 1200
        with pytest.raises(WriteRefused, match="out of the range of Int16"):
            await conn.write(small, 70000)
    finally:
        await conn.close()


async def test_browse_from_the_command_line_lists_the_information_model(plc: OpcUaPlc) -> None:
    proc = await asyncio.create_subprocess_exec(EGIZ, "connectors", "browse", plc.serve.url, "--json",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    nodes = {n["node"]: n for n in map(json.loads, out.decode().splitlines())}
    temp = nodes[f"ns={plc.ns};s=Proofer.Temperature"]
    assert temp["path"] == "/Proofer/Temperature" and temp["datatype"] == "Double" and not temp["writable"]
    assert nodes[f"ns={plc.ns};s=Proofer.Setpoint"]["writable"]
    assert nodes[f"ns={plc.ns};s=Types.UInt32"]["datatype"] == "UInt32"
    bad = await asyncio.create_subprocess_exec(EGIZ, "connectors", "browse", "http://example.org",
                                               stderr=asyncio.subprocess.PIPE)
    _, berr = await bad.communicate()
    assert bad.returncode == 2 and b"not an OPC UA address" in berr
    gone = await asyncio.create_subprocess_exec(EGIZ, "connectors", "browse", f"opc.tcp://127.0.0.1:{free_port()}",
                                                "--timeout", "1", stderr=asyncio.subprocess.PIPE)
    _, gerr = await gone.communicate()
    assert gone.returncode == 1 and b"refused" in gerr


async def test_sign_and_encrypt_with_a_user_and_a_pinned_server_certificate(tmp_path: Path) -> None:
    server_cert, server_key = application_certificate(tmp_path / "server", "plc", "urn:openegiz:sim-plc:proofer")
    client_cert, client_key = application_certificate(tmp_path / "client", "gateway", APPLICATION_URI)
    port = free_port()
    login_cert, login_key = application_certificate(tmp_path / "login", "operator", APPLICATION_URI)
    serve = OpcUaServe(port=port, modes=("SignAndEncrypt",), certificate=server_cert, private_key=server_key,
                       users={"operator": "s3cret-pw"}, user_certificates=(login_cert,), anonymous=False)
    secure = OpcUaPlc(serve, "proofer", POINTS["proofer"])
    await secure.start()
    try:
        await secure.publish({"Temperature": 36.5}, time.time())
        node = f"ns={secure.ns};s=Proofer.Temperature"
        common = dict(security_policy="Basic256Sha256", security_mode="SignAndEncrypt",
                      certificate=str(client_cert), private_key=str(client_key), mode="poll")
        state = tmp_path / "state"

        good = OpcUaConnector(device(serve.url, [tag("temperature", node)], username="operator",
                                     password="s3cret-pw", **common), SharedLinks(), state_dir=state)
        await good.connect()
        try:
            assert (await good.read()).values[0].value == 36.5
        finally:
            await good.close()
        pinned = state / "proofer-plc-server.der"
        assert pinned.read_bytes() == server_cert.read_bytes()  # pinned on first use

        wrong = OpcUaConnector(device(serve.url, [tag("temperature", node)], username="operator",
                                      password="wrong-pw", **common), SharedLinks(), state_dir=state)
        with pytest.raises(DeviceError) as refused:
            await wrong.connect()
        assert refused.value.reason == "auth_failed"

        anonymous = OpcUaConnector(device(serve.url, [tag("temperature", node)], **common), SharedLinks(),
                                   state_dir=state)
        with pytest.raises(DeviceError) as no_user:
            await anonymous.connect()
        assert no_user.value.reason in ("auth_failed", "status")

        # X.509 login: a certificate the server lists is a user, another one is not
        as_cert = {**common, "certificate": str(login_cert), "private_key": str(login_key)}
        by_cert = OpcUaConnector(device(serve.url, [tag("temperature", node)], auth="certificate", **as_cert),
                                 SharedLinks(), state_dir=state)
        await by_cert.connect()
        try:
            assert (await by_cert.read()).values[0].value == 36.5
        finally:
            await by_cert.close()
        stranger = OpcUaConnector(device(serve.url, [tag("temperature", node)], auth="certificate", **common),
                                  SharedLinks(), state_dir=state)
        with pytest.raises(DeviceError) as unknown:
            await stranger.connect()
        assert unknown.value.reason == "auth_failed"
    finally:
        await secure.stop()

    # another server on the same address, with another certificate: refused, the pin holds
    other_cert, other_key = application_certificate(tmp_path / "other", "plc", "urn:openegiz:sim-plc:proofer")
    impostor = OpcUaPlc(OpcUaServe(port=port, modes=("SignAndEncrypt",), certificate=other_cert,
                                   private_key=other_key, users={"operator": "s3cret-pw"}, anonymous=False),
                        "proofer", POINTS["proofer"])
    await impostor.start()
    try:
        again = OpcUaConnector(device(serve.url, [tag("temperature", f"ns={impostor.ns};s=Proofer.Temperature")],
                                      username="operator", password="s3cret-pw", **common), SharedLinks(),
                               state_dir=state)
        with pytest.raises(DeviceError) as mismatch:
            await again.connect()
        assert mismatch.value.reason in ("certificate_mismatch", "security_rejected", "connection_lost", "timeout")
        assert again.client is None
    finally:
        await impostor.stop()
    await asyncio.sleep(0)
