"""Models from the centre: trained on the aggregator's history over its API, published by the
aggregator, fetched by a gateway (hash-checked) and hot-swapped; a broken central version is refused
and the gateway keeps the model it had."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import aiomqtt
import numpy as np

from gateway.common import signing
from gateway.detect.models import ModelRegistry
from gateway.detect.train import FeatureRows, train_model
from tests.helpers import (
    ADMIN_KEY,
    EGIZ,
    AggregatorFactory,
    GatewayFactory,
    LinkedFactory,
    aggregator_config,
    unique_site,
    uplink,
    uplink_token,
    version_in_use,
    wait_for,
)


def rows(seed: int) -> FeatureRows:
    rng = np.random.default_rng(seed)
    n = 2000
    level = rng.uniform(80, 200, n)
    x = np.column_stack([level + rng.normal(0, 0.4, n), level + 2 + rng.normal(0, 0.4, n)])
    return FeatureRows(["thermal/a", "thermal/b"], x, np.arange(n, dtype=float), np.array(["x:p-1"] * n, dtype=object))


async def test_gateway_fetches_central_models_and_refuses_a_broken_one(
        mosquitto: tuple[str, int], start_gateway: GatewayFactory, start_aggregator: AggregatorFactory,
        tmp_path: Path) -> None:
    site = unique_site()
    cfg = aggregator_config(tmp_path, uplink_token(site))
    central = ModelRegistry(Path(cfg.aggregator.data_dir) / "models")
    v1 = train_model(rows(1), "press", central.root, seed=1).name
    v2 = train_model(rows(2), "press", central.root, seed=2).name
    central.activate("press", v1)
    public = signing.public_key_text(signing.load_or_create_key(cfg.model_signing_key_file))
    agg = await start_aggregator(cfg)
    gw = await start_gateway(mosquitto, **uplink(site, agg.http_port), **{
        "detect.enabled": True, "uplink.models_interval_s": 0.2, "uplink.model_signing_key": public})
    det, fetcher = gw.service.detector, gw.service.model_fetcher
    assert det is not None and fetcher is not None

    await wait_for(lambda: version_in_use(det, "press") == v1 or "press" in fetcher.errors, timeout=10)
    assert not fetcher.errors and version_in_use(det, "press") == v1, fetcher.errors
    assert (Path(gw.config.gateway.data_dir) / "models" / "press" / v1 / "model.json").is_file()
    central.activate("press", v2)
    await wait_for(lambda: version_in_use(det, "press") == v2 or "press" in fetcher.errors, timeout=10)
    assert not fetcher.errors and version_in_use(det, "press") == v2, fetcher.errors

    # a version whose ONNX file does not match its own manifest, published without the central check
    broken = central.root / "press" / "broken"
    shutil.copytree(central.root / "press" / v1, broken)
    blob = bytearray((broken / "autoencoder.onnx").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (broken / "autoencoder.onnx").write_bytes(bytes(blob))
    (central.root / "press" / "active.json").write_text(json.dumps({"version": "broken", "history": [v1, v2]}))
    await wait_for(lambda: "press" in fetcher.errors, timeout=10)
    assert "corrupt" in fetcher.errors["press"] and version_in_use(det, "press") == v2
    metrics = await (await gw.http.get(f"{gw.url}/metrics")).text()
    assert 'egiz_uplink_models_total{result="refused"} 1.0' in metrics


async def test_train_from_the_aggregators_history_over_its_api(
        mosquitto: tuple[str, int], start_linked: LinkedFactory, tmp_path: Path) -> None:
    site, agg, _gw = await start_linked()
    rng = np.random.default_rng(5)
    now = time.time()
    async with aiomqtt.Client(*mosquitto) as mqtt:
        for k in range(3):  # three presses, 400 readings each over the last hour
            samples = []
            for i in range(400):
                level = 80 + 120 * (i % 97) / 97
                samples.append({"ts": now - 3600 + i * 9, "seq": i + 1, "properties": {
                    "a": round(level + rng.normal(0, 0.4), 2), "b": round(level + 2 + rng.normal(0, 0.4), 2)}})
            await mqtt.publish(f"openegiz/{site}/press/press-00{k}/thermal/telemetry",
                               json.dumps({"boot": "b", "samples": samples}), qos=1)
    await wait_for(lambda: agg.store.point_count() == 3 * 400 * 2, timeout=20)
    await asyncio.sleep(0.5)  # the Thing documents (with their type) follow every things_interval_s
    models = tmp_path / "central-models"
    done = await asyncio.to_thread(subprocess.run, [
        EGIZ, "model", "train", "--source-url", f"http://127.0.0.1:{agg.http_port}", "--type", "press",
        "--from", str(now - 3700), "--to", str(now), "--models-dir", str(models), "--activate"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "EGIZ_API_KEY": ADMIN_KEY})
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["type"] == "press" and out["rows"] >= 1000 and out["active"] is True
    man = json.loads((Path(out["path"]) / "model.json").read_text())
    assert sorted(man["data"]["things"]) == [f"{site}:press-00{k}" for k in range(3)]
    assert man["features"] == ["thermal/a", "thermal/b"]
