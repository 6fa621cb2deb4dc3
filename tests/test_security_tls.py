"""TLS from a site CA, end to end against running services: the uplink accepts the right CA and
refuses a wrong one, refuses a pinned certificate once it changes, client certificates are required
where configured, the gateway's MQTT client speaks TLS to a real Mosquitto, `egiz pki` makes the
certificates, and a model swapped on the way to a running gateway is refused while the previous one
stays active."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import ssl
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import pytest
from aiohttp import web
from typer.testing import CliRunner, Result

from cloud_sync.aggregator import Aggregator
from cloud_sync.config import AggregatorConfig
from gateway.broker import find_free_port
from gateway.cli import app
from gateway.common import signing
from gateway.common.errors import ConfigError
from gateway.common.pki import describe
from gateway.common.tls import fingerprints
from gateway.config import GatewayConfig, load_config
from gateway.detect.models import ModelRegistry
from tests.helpers import (
    EGIZ,
    OTHER_TOKEN,
    TOKEN,
    AggregatorFactory,
    GatewayFactory,
    RunningGateway,
    SitePki,
    aggregator_config,
    auth,
    exact,
    gateway_toml,
    private_mosquitto,
    publish_ovens,
    serve,
    telemetry,
    topic,
    unique_site,
    uplink,
    uplink_token,
    version_in_use,
    wait_for,
)


def https_uplink(site: str, port: int | None, *, token: str = TOKEN, **more: Any) -> dict[str, Any]:
    assert port is not None
    return {**uplink(site, port, **more), "uplink.url": f"https://localhost:{port}", "uplink.token": token}


def tls_server(pair: tuple[Path, Path], client_ca: Path | None = None) -> dict[str, Any]:
    return {"http.tls_cert_file": str(pair[0]), "http.tls_key_file": str(pair[1]),
            "http.tls_client_ca_file": str(client_ca or "")}


def spki_pin(cert: Path) -> str:
    return fingerprints(ssl.PEM_cert_to_DER_cert(cert.read_text()))[1]


async def https_aggregator_of_two_sites(tmp_path: Path, site_pki: SitePki,
                                       start_aggregator: AggregatorFactory) -> tuple[Aggregator, str, str]:
    """An aggregator serving HTTPS with the site CA's server certificate, and two new sites whose gateways it
    takes (`TOKEN` for the first, `OTHER_TOKEN` for the second)."""
    site, other = unique_site(), unique_site()
    agg = await start_aggregator(aggregator_config(
        tmp_path, uplink_token(site), (f"gw-{other}", OTHER_TOKEN, other, "line-a"),
        **tls_server(site_pki.server)))
    return agg, site, other


async def one_through_one_refused(mosquitto: tuple[str, int], agg: Aggregator, through: tuple[RunningGateway, str],
                                  refused: tuple[RunningGateway, str], per_thing: int, error: str) -> None:
    """Both gateways (with their sites) publish `per_thing` points of one oven: the first's reach the aggregator
    exactly, the second's forwarder fails with `error` and nothing of its site is stored."""
    await publish_ovens(mosquitto, through[0], things=1, per_thing=per_thing)
    await publish_ovens(mosquitto, refused[0], things=1, per_thing=per_thing)
    await wait_for(lambda: exact(agg, through[1], 1, per_thing), timeout=20)
    forwarder = refused[0].service.forwarder
    assert forwarder is not None
    await wait_for(lambda: error in forwarder.last_error, timeout=10)
    assert agg.store.stored_seqs(f"{refused[1]}:oven-00", "temperature") == []


async def test_uplink_accepts_the_site_ca_and_refuses_another(
        tmp_path: Path, mosquitto: tuple[str, int], site_pki: SitePki, start_gateway: GatewayFactory,
        start_aggregator: AggregatorFactory) -> None:
    agg, good, bad = await https_aggregator_of_two_sites(tmp_path, site_pki, start_aggregator)
    gw = await start_gateway(mosquitto, **https_uplink(good, agg.http_port, **{"uplink.ca_file": str(site_pki.ca)}))
    fooled = await start_gateway(mosquitto, **https_uplink(bad, agg.http_port, token=OTHER_TOKEN,
                                                           **{"uplink.ca_file": str(site_pki.foreign_ca)}))
    await one_through_one_refused(mosquitto, agg, (gw, good), (fooled, bad), 5, "certificate verify failed")
    # plain HTTP to the TLS port is no way around it
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientError):
            await http.get(f"http://127.0.0.1:{agg.http_port}/health")


async def test_a_pinned_certificate_that_changes_is_refused(
        tmp_path: Path, mosquitto: tuple[str, int], site_pki: SitePki, start_gateway: GatewayFactory) -> None:
    site = unique_site()
    port = find_free_port()
    tokens = uplink_token(site)
    first = Aggregator(aggregator_config(tmp_path, tokens, port=port, **tls_server(site_pki.server)))
    await first.start()
    try:
        pin = describe(site_pki.server[0]).sha256  # the certificate's fingerprint, as `egiz pki list` shows it
        pinned: dict[str, Any] = {"uplink.ca_file": str(site_pki.ca),
                                  "uplink.pin_sha256": [pin.upper()[:2] + ":" + pin[2:]]}  # as people write it
        gw = await start_gateway(mosquitto, **https_uplink(site, port, **pinned))
        await publish_ovens(mosquitto, gw, things=1, per_thing=5)
        await wait_for(lambda: exact(first, site, 1, 5), timeout=20)
    finally:
        await first.stop()
    # the aggregator comes back with another certificate: same CA, same names, valid — but not the pinned one
    second = Aggregator(aggregator_config(tmp_path, tokens, port=port, **tls_server(site_pki.server2)))
    await second.start()
    try:
        await publish_ovens(mosquitto, gw, things=1, per_thing=5, first_seq=6)
        forwarder = gw.service.forwarder
        assert forwarder is not None
        await wait_for(lambda: "pin mismatch" in forwarder.last_error, timeout=15)
        await asyncio.sleep(1.0)
        assert second.store.stored_seqs(f"{site}:oven-00", "temperature") == [(s, 1) for s in range(1, 6)]
    finally:
        await second.stop()


async def test_a_public_key_pin_accepts_its_key_and_refuses_another(
        tmp_path: Path, mosquitto: tuple[str, int], site_pki: SitePki, start_gateway: GatewayFactory,
        start_aggregator: AggregatorFactory) -> None:
    agg, site, other = await https_aggregator_of_two_sites(tmp_path, site_pki, start_aggregator)
    right: dict[str, Any] = {"uplink.ca_file": str(site_pki.ca), "uplink.pin_sha256": [spki_pin(site_pki.server[0])]}
    pinned = await start_gateway(mosquitto, **https_uplink(site, agg.http_port, **right))
    wrong = await start_gateway(mosquitto, **https_uplink(other, agg.http_port, token=OTHER_TOKEN, **{
        "uplink.ca_file": str(site_pki.ca), "uplink.pin_sha256": [spki_pin(site_pki.server2[0])]}))
    await one_through_one_refused(mosquitto, agg, (pinned, site), (wrong, other), 3, "pin mismatch")


async def test_client_certificates_are_required_where_configured(
        tmp_path: Path, mosquitto: tuple[str, int], site_pki: SitePki, start_gateway: GatewayFactory,
        start_aggregator: AggregatorFactory) -> None:
    site = unique_site()
    agg = await start_aggregator(aggregator_config(tmp_path, uplink_token(site),
                                                   **tls_server(site_pki.server, client_ca=site_pki.ca)))
    cert, key = site_pki.client
    gw = await start_gateway(mosquitto, **https_uplink(site, agg.http_port, **{
        "uplink.ca_file": str(site_pki.ca), "uplink.cert_file": str(cert), "uplink.key_file": str(key)}),
        **tls_server(site_pki.server, client_ca=site_pki.ca))
    await publish_ovens(mosquitto, gw, things=1, per_thing=4)
    await wait_for(lambda: exact(agg, site, 1, 4), timeout=20)

    with_cert = ssl.create_default_context(cafile=str(site_pki.ca))
    with_cert.load_cert_chain(cert, key)
    no_cert = ssl.create_default_context(cafile=str(site_pki.ca))
    foreign_cert = ssl.create_default_context(cafile=str(site_pki.ca))
    foreign_cert.load_cert_chain(*site_pki.foreign_server)
    for port in (agg.http_port, gw.service.http_port):  # the aggregator and the gateway: one HTTP section
        url = f"https://localhost:{port}/health"
        async with aiohttp.ClientSession() as http:
            async with http.get(url, ssl=with_cert) as r:
                assert r.status == 200
            for refused in (no_cert, foreign_cert):
                with pytest.raises(aiohttp.ClientError):
                    async with http.get(url, ssl=refused) as r:
                        await r.read()


async def test_the_gateway_serves_https_its_api_keys_still_apply(
        tmp_path: Path, mosquitto: tuple[str, int], site_pki: SitePki, start_gateway: GatewayFactory) -> None:
    port = find_free_port()
    gw = await start_gateway(mosquitto, **tls_server(site_pki.server), **{"http.port": port})
    url = f"https://127.0.0.1:{gw.service.http_port}/api/v1/things"
    async with aiohttp.ClientSession() as http:
        async with http.get(url, ssl=ssl.create_default_context(cafile=str(site_pki.ca)), headers=auth()) as r:
            assert r.status == 200
        async with http.get(url, ssl=ssl.create_default_context(cafile=str(site_pki.ca))) as r:
            assert r.status == 401
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(url, ssl=ssl.create_default_context(cafile=str(site_pki.foreign_ca)), headers=auth())
    # the CLI's calls to the gateway of a config file go over HTTPS, trusting the certificate it serves
    config = gateway_toml(tmp_path / "gateway.toml", gw.site, http={
        "host": "127.0.0.1", "port": port, "tls_cert_file": str(site_pki.server[0]),
        "tls_key_file": str(site_pki.server[1])})
    done = await asyncio.to_thread(subprocess.run, [EGIZ, "nodes", "list", "--config", str(config)],
                                   capture_output=True, text=True, timeout=60)
    assert "404 node discovery is switched off" in done.stderr, done.stderr


def test_tls_files_are_checked_at_start_naming_the_key(tmp_path: Path, site_pki: SitePki) -> None:
    base = {"gateway.site": "s1", "gateway.line": "l1", "gateway.id": "gw-1", "auth.open": True}

    def problems(**more: Any) -> dict[str, str]:
        try:
            load_config(GatewayConfig, None, environ={}, overrides={**base, **more})
        except ConfigError as exc:
            return dict(exc.problems)
        return {}

    assert problems(**tls_server(site_pki.server)) == {}
    mixed = {"http.tls_cert_file": str(site_pki.server[0]), "http.tls_key_file": str(site_pki.server2[1])}
    assert problems(**mixed) == {
        "http.tls_key_file": f"{site_pki.server2[1]} does not match the certificate it is paired with"}
    assert problems(**{"http.tls_cert_file": str(site_pki.server[0])}) == {
        "http.tls_key_file": "http.tls_cert_file and http.tls_key_file must be given together"}
    assert problems(**{**tls_server(site_pki.server), "http.tls_key_file": str(tmp_path / "gone.key")}) == {
        "http.tls_key_file": f"{tmp_path / 'gone.key'} does not exist"}
    assert problems(**{**tls_server(site_pki.server), "http.tls_cert_file": str(site_pki.server[1])}) == {
        "http.tls_cert_file": f"{site_pki.server[1]} is not a PEM certificate"}
    # the uplink: a token in clear to another host needs saying so; pins are fingerprints
    assert problems(**{"uplink.url": "http://aggregator.example:8090", "uplink.token": TOKEN}) == {
        "uplink.url": "plain http:// to another host sends the gateway's token and data in clear: use https:// "
                      "(or set uplink.allow_http = true)"}
    assert problems(**{"uplink.url": "http://aggregator.example:8090", "uplink.token": TOKEN,
                       "uplink.allow_http": True}) == {}
    assert problems(**{"uplink.url": "https://aggregator.example:8090", "uplink.token": TOKEN,
                       "uplink.pin_sha256": ["abc"], "uplink.model_signing_key": "bm90IGEga2V5",
                       "uplink.cert_file": str(site_pki.client[0])}) == {
        "uplink.pin_sha256[0]": "must be a SHA-256 fingerprint: 64 hex digits (colons allowed)",
        "uplink.model_signing_key": "must be the aggregator's Ed25519 public key in base64 "
                                    "(`egiz aggregator signing-key` prints it)",
        "uplink.key_file": "uplink.cert_file and uplink.key_file must be given together"}

    # the same check on the aggregator, through the CLI: exit 2, the key named, nothing started
    conf = tmp_path / "aggregator.toml"
    conf.write_text(f'[aggregator]\ndata_dir = "{tmp_path / "agg"}"\n[auth]\nopen = true\n[http]\n'
                    f'tls_cert_file = "{site_pki.server[0]}"\ntls_key_file = "{site_pki.client[1]}"\n')
    done = subprocess.run([EGIZ, "aggregator", "check", "--config", str(conf)], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2, done.stdout
    assert f"http.tls_key_file: {site_pki.client[1]} does not match the certificate" in done.stderr


async def test_the_gateways_mqtt_client_over_tls_with_a_client_certificate(
        tmp_path: Path, site_pki: SitePki, start_gateway: GatewayFactory) -> None:
    cert, key = site_pki.server
    broker = private_mosquitto(tmp_path, tls_cert_file=cert, tls_key_file=key, tls_ca_file=site_pki.ca,
                               require_certificate=True)
    async with broker:
        endpoint = (broker.settings.host, broker.settings.port)
        client_cert = {"mqtt.tls": True, "mqtt.ca_file": str(site_pki.ca), "mqtt.cert_file": str(site_pki.client[0]),
                       "mqtt.key_file": str(site_pki.client[1])}
        gw = await start_gateway(endpoint, **client_cert)
        no_cert = await start_gateway(endpoint, wait_connected=False, **{"mqtt.tls": True,
                                                                          "mqtt.ca_file": str(site_pki.ca)})
        wrong_ca = await start_gateway(endpoint, wait_connected=False, **{**client_cert,
                                                                           "mqtt.ca_file": str(site_pki.foreign_ca)})
        plain = await start_gateway(endpoint, wait_connected=False)
        tls = ssl.create_default_context(cafile=str(site_pki.ca))
        tls.load_cert_chain(*site_pki.client)
        async with aiomqtt.Client(*endpoint, tls_context=tls) as pub:
            await pub.publish(topic(gw.site, "oven-01"), telemetry(1, {"temperature": 181.5}, boot="b"), qos=1)
        await wait_for(lambda: gw.service.registry.get(gw.thing_id("oven-01")) is not None, timeout=10)
        await asyncio.sleep(2.0)  # time enough for the others to have connected, were they able to
        for refused in (no_cert, wrong_ca, plain):
            assert not refused.service.ingest.connected.is_set()


def test_pki_cli_makes_a_ca_and_certificates_and_lists_them(tmp_path: Path) -> None:
    pki = tmp_path / "pki"

    def egiz(*args: str) -> Result:  # the CLI in this process; the console script itself is run once below
        return CliRunner().invoke(app, ["pki", *args, "--dir", str(pki)])

    done = subprocess.run([EGIZ, "pki", "init", "--name", "Izmir bakery CA", "--dir", str(pki)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert egiz("issue", "aggregator", "--dns", "aggregator.izmir.example", "--ip", "10.0.0.5").exit_code == 0
    assert egiz("issue", "gw-line-a", "--kind", "client").exit_code == 0
    for name in ("ca.key", "aggregator.key", "gw-line-a.key"):
        assert stat.S_IMODE((pki / name).stat().st_mode) == 0o600
    again = egiz("init")
    assert again.exit_code == 2 and "already holds a CA" in again.output
    assert egiz("issue", "bad", "--ip", "not-an-ip").exit_code == 2
    listed = [json.loads(line) for line in egiz("list", "--json").output.splitlines()]
    assert [(c["file"], c["kind"]) for c in listed] == [("ca.crt", "ca"), ("aggregator.crt", "server"),
                                                        ("gw-line-a.crt", "client")]
    assert listed[1]["dns"] == ["aggregator.izmir.example"] and listed[1]["ips"] == ["10.0.0.5"]
    assert listed[1]["subject"] == "CN=aggregator" and "Izmir bakery CA" in listed[1]["issuer"]
    assert 820 <= listed[1]["days_left"] <= 825 and listed[0]["days_left"] >= 3640
    text = egiz("list").output
    assert "aggregator.izmir.example, 10.0.0.5" in text and "expires" in text
    # what it issued verifies against its CA the way every client here checks it
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(pki / "gw-line-a.crt", pki / "gw-line-a.key")


# ----------------------------------------------------------------------------- signed models

class Tamperer:
    """Someone on the uplink's path (plain HTTP: TLS left off): passes everything through to the
    aggregator, or, when told, publishes a model of their own with correct hashes."""

    def __init__(self, upstream: str, evil_root: Path) -> None:
        self.upstream = upstream
        self.evil_root = evil_root
        self.mode = "pass"  # "pass", "forged" (a signature of another entry), "unsigned"
        self.app = web.Application(client_max_size=256 * 2**20)
        self.app.router.add_route("*", "/{tail:.*}", self.handle)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type",
                                                                             "content-encoding", "if-match")}
        if request.path.startswith("/api/v1/models/press/evil"):
            return web.Response(body=(self.evil_root / request.path.rsplit("/", 1)[1]).read_bytes())
        async with aiohttp.ClientSession() as http, http.request(
                request.method, self.upstream + request.path_qs, data=body, headers=headers) as r:
            data, status, ctype = await r.read(), r.status, r.content_type
        if request.path == "/api/v1/models/active" and self.mode != "pass":
            doc = json.loads(data)
            genuine = doc["models"]["press"]
            files = {name: sha256_of(self.evil_root / name) for name in genuine["files"]}
            doc["models"]["press"] = {"version": "evil", "files": files}
            if self.mode == "forged":
                doc["models"]["press"]["signature"] = genuine["signature"]
            data = json.dumps(doc).encode()
        return web.Response(body=data, status=status, content_type=ctype)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def central_registry(cfg: AggregatorConfig, press_versions: tuple[Path, str, str]) -> ModelRegistry:
    """The aggregator's model registry, holding the two trained press versions."""
    central = ModelRegistry(Path(cfg.aggregator.data_dir) / "models")
    shutil.copytree(press_versions[0] / "press", central.root / "press")
    return central


async def test_a_swapped_model_is_refused_by_a_running_gateway_and_the_previous_one_stays(
        tmp_path: Path, mosquitto: tuple[str, int], start_gateway: GatewayFactory,
        start_aggregator: AggregatorFactory, press_versions: tuple[Path, str, str]) -> None:
    site = unique_site()
    cfg = aggregator_config(tmp_path, uplink_token(site))
    central = central_registry(cfg, press_versions)
    _, v1, v2 = press_versions
    central.activate("press", v1)
    evil = shutil.copytree(central.root / "press" / v1, tmp_path / "attacker")  # the attacker's model files
    blob = bytearray((evil / "autoencoder.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (evil / "autoencoder.onnx").write_bytes(bytes(blob))
    public = signing.public_key_text(signing.load_or_create_key(cfg.model_signing_key_file))
    agg = await start_aggregator(cfg)
    mitm = Tamperer(f"http://127.0.0.1:{agg.http_port}", evil)
    runner, port = await serve(mitm.app)
    try:
        gw = await start_gateway(mosquitto, **uplink(site, port), **{
            "detect.enabled": True, "uplink.models_interval_s": 0.2, "uplink.model_signing_key": public})
        det, fetcher = gw.service.detector, gw.service.model_fetcher
        assert det is not None and fetcher is not None

        await wait_for(lambda: version_in_use(det, "press") == v1 or "press" in fetcher.errors, timeout=15)
        assert version_in_use(det, "press") == v1 and not fetcher.errors

        for mode, reason, count in (("forged", "does not match the aggregator's key", 1),
                                    ("unsigned", "the model is not signed", 2)):
            mitm.mode = mode
            await wait_for(lambda: reason in fetcher.errors.get("press", ""), timeout=10)  # noqa: B023
            await asyncio.sleep(0.6)  # a few more rounds: refused once, not again and again
            metrics = await (await gw.http.get(f"{gw.url}/metrics")).text()
            assert f'egiz_uplink_models_total{{result="bad_signature"}} {count}.0' in metrics
            assert version_in_use(det, "press") == v1
            assert not (Path(gw.config.models_dir) / "press" / "evil").exists()  # not even downloaded

        # the genuine path again: the aggregator's own next version is taken
        mitm.mode = "pass"
        central.activate("press", v2)
        await wait_for(lambda: version_in_use(det, "press") == v2, timeout=15)
        assert "press" not in fetcher.errors
    finally:
        await runner.cleanup()


async def test_a_gateway_without_the_aggregators_key_takes_no_central_model(
        tmp_path: Path, mosquitto: tuple[str, int], start_gateway: GatewayFactory,
        start_aggregator: AggregatorFactory, press_versions: tuple[Path, str, str]) -> None:
    site = unique_site()
    cfg = aggregator_config(tmp_path, uplink_token(site))
    central_registry(cfg, press_versions).activate("press", press_versions[1])
    agg = await start_aggregator(cfg)
    someone_else = signing.public_key_text(signing.load_or_create_key(tmp_path / "other.key"))
    for key, reason in (("", "uplink.model_signing_key is not set"),
                        (someone_else, "does not match the aggregator's key")):
        assert agg.http_port is not None
        gw = await start_gateway(mosquitto, **uplink(unique_site(), agg.http_port), **{
            "detect.enabled": True, "uplink.models_interval_s": 0.2, "uplink.model_signing_key": key})
        fetcher = gw.service.model_fetcher
        assert fetcher is not None and gw.service.detector is not None
        await wait_for(lambda: "press" in fetcher.errors, timeout=15)  # noqa: B023
        assert reason in fetcher.errors["press"]
        assert "press" not in gw.service.detector.in_use
