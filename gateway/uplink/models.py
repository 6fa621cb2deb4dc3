"""Models from the centre: the gateway side of model distribution.

The aggregator publishes the active version of each equipment type in its own model registry
(`GET /api/v1/models/active`, with each file's SHA-256). A gateway with an uplink asks every
`uplink.models_interval_s`; a version it does not have is downloaded into a temporary directory,
each file checked against its hash, moved into the gateway's registry in one rename, and activated
through the detector — which checks it completely again and keeps the previous model if it fails.
Every published entry carries the aggregator's Ed25519 signature over type, version and the files'
hashes; it is checked against `uplink.model_signing_key` before anything is downloaded, so a model
swapped on the way (even over a misconfigured TLS) is refused, counted and logged with the reason,
and the model in use stays. Without a configured key no central model is accepted.
A central version is applied once, when it changes; a local choice made after that (activate,
rollback) stands until the centre publishes another version.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any

import aiohttp

from gateway.common import signing
from gateway.config import GatewayConfig
from gateway.detect.detector import AnomalyDetector
from gateway.detect.models import MANIFEST, ModelError
from gateway.metrics import GatewayMetrics
from gateway.uplink.client import UplinkClient

log = logging.getLogger(__name__)

ACTIVE_PATH = "/api/v1/models/active"
FILES = ("model.json", "autoencoder.onnx", "isolation_forest.onnx")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
MAX_FILE = 64 * 2**20


class ModelFetcher(UplinkClient):
    """Keeps the gateway's models in step with the versions the aggregator publishes."""

    def __init__(self, config: GatewayConfig, detector: AnomalyDetector, metrics: GatewayMetrics) -> None:
        super().__init__(config.uplink)
        self._root = config.models_dir
        self._detector = detector
        self._m = metrics
        key = config.uplink.model_signing_key
        self._public = signing.parse_public_key(key) if key else None
        self.applied: dict[str, str] = {}  # type -> the central version last applied (or refused)
        self.errors: dict[str, str] = {}
        self._refused: dict[str, tuple[str, str, str]] = {}  # type -> the entry last refused for its signature

    async def start(self) -> None:
        self._launch(self._run(), "model-fetcher")

    async def _run(self) -> None:
        while True:
            try:
                await self.sync()
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                log.info("could not ask the aggregator for models", extra={"error": str(exc)[:200]})
            except Exception:  # never let the fetcher die: the next interval tries again
                log.exception("model fetch failed")
            await asyncio.sleep(self._up.models_interval_s)

    async def sync(self) -> None:
        """One round: every central version that changed is fetched, checked and activated."""
        assert self._http is not None
        base = self._up.url.rstrip("/")
        async with self._http.get(base + ACTIVE_PATH) as r:
            if r.status != 200:
                raise ValueError(f"HTTP {r.status} from {ACTIVE_PATH}")
            doc = await r.json()
        published = doc.get("models", {}) if isinstance(doc, dict) else {}
        for ttype, entry in sorted(published.items()):
            version = entry.get("version") if isinstance(entry, dict) else None
            files = entry.get("files") if isinstance(entry, dict) else None
            if not (isinstance(version, str) and _NAME.fullmatch(ttype) and _NAME.fullmatch(version)
                    and isinstance(files, dict) and set(files) == set(FILES)):
                log.warning("aggregator published an unusable model entry", extra={"type": str(ttype)[:64]})
                continue
            if self.applied.get(ttype) == version:
                continue
            signature = entry.get("signature")
            offered = (version, json.dumps(files, sort_keys=True), str(signature))
            if self._refused.get(ttype) == offered:
                continue  # the same bad entry again: refused and counted once
            try:
                self._check_signature(ttype, version, files, signature)
            except signing.SignatureError as exc:
                # Not marked applied: the genuine entry of this version is still taken once it comes.
                self._refused[ttype] = offered
                self.errors[ttype] = str(exc)
                self._m.uplink_models.labels("bad_signature").inc()
                log.error("central model refused: its signature does not hold; the previous one stays active",
                          extra={"type": ttype, "version": version, "reason": str(exc)})
                continue
            self._refused.pop(ttype, None)
            self.applied[ttype] = version  # once per central version, applied or refused
            try:
                await self._install(base, ttype, version, files)
                await self._detector.activate(ttype, version)
            except ModelError as exc:
                self.errors[ttype] = str(exc)
                self._m.uplink_models.labels("refused").inc()
                log.error("central model refused; the previous one stays active",
                          extra={"type": ttype, "version": version, "reason": str(exc)})
                continue
            self.errors.pop(ttype, None)
            self._m.uplink_models.labels("activated").inc()
            log.info("central model activated", extra={"type": ttype, "version": version})

    def _check_signature(self, ttype: str, version: str, files: dict[str, Any], signature: object) -> None:
        if self._public is None:
            raise signing.SignatureError("uplink.model_signing_key is not set: central models cannot be verified")
        if not all(isinstance(v, str) for v in files.values()):
            raise signing.SignatureError("the published file hashes are not strings")
        signing.verify(self._public, ttype, version, files, signature)

    async def _install(self, base: str, ttype: str, version: str, files: dict[str, Any]) -> None:
        final = self._root / ttype / version
        if final.is_dir():
            return  # already here (fetched before, or trained locally): activation checks it again
        incoming = self._root / ttype / f".incoming-{version}"
        await asyncio.to_thread(shutil.rmtree, incoming, True)
        incoming.mkdir(parents=True)
        assert self._http is not None
        try:
            for name in FILES:
                async with self._http.get(f"{base}/api/v1/models/{ttype}/{version}/{name}") as r:
                    if r.status != 200:
                        raise ModelError(f"{name}: HTTP {r.status} from the aggregator", type=ttype)
                    body = await _read_limited(r, MAX_FILE)
                if body is None:
                    raise ModelError(f"{name} is larger than {MAX_FILE} bytes", type=ttype)
                if hashlib.sha256(body).hexdigest() != files[name]:
                    raise ModelError(f"{name} does not match the SHA-256 the aggregator published", type=ttype)
                await asyncio.to_thread((incoming / name).write_bytes, body)
            if not (incoming / MANIFEST).is_file():
                raise ModelError("no manifest", type=ttype)
            await asyncio.to_thread(os.replace, incoming, final)
        finally:
            await asyncio.to_thread(shutil.rmtree, incoming, True)


async def _read_limited(r: aiohttp.ClientResponse, limit: int) -> bytes | None:
    """The whole body, or None once it grows past `limit` (a stream read returns what has arrived)."""
    if r.content_length is not None and r.content_length > limit:
        return None
    parts: list[bytes] = []
    size = 0
    async for chunk in r.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
