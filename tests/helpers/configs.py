"""Keys, sites and configurations of the services under test: in-process configs and TOML files for
processes, with only what a test needs and the rest left at the services' defaults."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from cloud_sync.config import AggregatorConfig, load_aggregator_config
from gateway.config import GatewayConfig, load_config

ADMIN_KEY = "test-admin-key-000000000001"
OPERATOR_KEY = "test-operator-key-00000000002"
VIEWER_KEY = "test-viewer-key-0000000000003"
TOKEN = "gateway-token-0000000000001"  # a gateway's uplink token
OTHER_TOKEN = "gateway-token-0000000000002"

Sections = dict[str, dict[str, Any]]


def unique_site() -> str:
    """A site of the test's own, so topics on the shared broker never collide."""
    return f"t-{uuid.uuid4().hex[:10]}"


def auth(key: str = ADMIN_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --------------------------------------------------------------------------------- in process

def gateway_config(tmp_path: Path, broker: tuple[str, int], **overrides: Any) -> GatewayConfig:
    """A gateway on free ports with its files in tmp_path; `overrides` are dotted keys."""
    site = overrides.pop("gateway.site", unique_site())
    base: dict[str, Any] = {
        "gateway.site": site,
        "gateway.line": "line-a",
        "gateway.id": f"gw-{site}",
        "gateway.data_dir": str(tmp_path / f"data-{site}"),
        "mqtt.host": broker[0],
        "mqtt.port": broker[1],
        "mqtt.reconnect_min_s": 0.1,
        "mqtt.reconnect_max_s": 1.0,
        "http.host": "127.0.0.1",
        "http.port": 0,
        "auth.api_keys": [
            {"key": ADMIN_KEY, "role": "admin"},
            {"key": OPERATOR_KEY, "role": "operator"},
            {"key": VIEWER_KEY, "role": "viewer"},
        ],
        "ingest.auto_register": True,
        "twin.flush_interval_s": 0.2,
        # Detection writes each Thing's `status` feature (a version step); tests of other parts keep
        # exact versions by leaving it off, detection tests switch it on.
        "detect.enabled": False,
    }
    base.update(overrides)
    return load_config(GatewayConfig, None, environ={}, overrides=base)


def aggregator_config(tmp_path: Path, *tokens: tuple[str, str, str, str], port: int = 0,
                      **overrides: Any) -> AggregatorConfig:
    """An aggregator with its files in tmp_path; `tokens` are (gateway, token, site, line)."""
    return load_aggregator_config(None, environ={}, overrides={
        "aggregator.data_dir": str(tmp_path / "aggregator"), "http.host": "127.0.0.1", "http.port": port,
        "auth.api_keys": [{"key": ADMIN_KEY, "role": "admin"}],
        "auth.gateway_tokens": [{"gateway": g, "token": t, "site": s, "line": li} for g, t, s, li in tokens],
        **overrides,
    })


def uplink_token(gw_site: str, line: str = "line-a") -> tuple[str, str, str, str]:
    """The aggregator's token entry (gateway, token, site, line) for the gateway `uplink(gw_site, ...)` makes."""
    return f"gw-{gw_site}", TOKEN, gw_site, line


def uplink(gw_site: str, port: int, **more: Any) -> dict[str, Any]:
    """Overrides for a gateway of `gw_site` that forwards to an aggregator on `port`, quickly."""
    return {"gateway.site": gw_site, "gateway.id": f"gw-{gw_site}", "uplink.url": f"http://127.0.0.1:{port}",
            "uplink.token": TOKEN, "uplink.interval_s": 0.05, "uplink.things_interval_s": 0.2,
            "uplink.retry_min_s": 0.05, "uplink.retry_max_s": 0.5, **more}


# --------------------------------------------------------------------------------- files

def write_toml(path: Path, sections: Sections) -> Path:
    """`sections` as a TOML file of one table per section."""
    lines = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def merged(base: Sections, *more: Sections) -> Sections:
    """`base` with the keys of each of `more` in turn added or replaced, section by section."""
    out = {name: dict(table) for name, table in base.items()}
    for layer in more:
        for name, table in layer.items():
            out.setdefault(name, {}).update(table)
    return out


def gateway_sections(path: Path, site: str, key: str = ADMIN_KEY) -> Sections:
    """What every gateway TOML at `path` holds: its site on line-a, data beside it in `data/`, one admin key."""
    return {
        "gateway": {"site": site, "line": "line-a", "id": f"gw-{site}", "data_dir": path.parent / "data"},
        "http": {"host": "127.0.0.1"},
        "auth": {"api_keys": [{"key": key, "role": "admin"}]},
    }


def gateway_toml(path: Path, site: str, *, key: str = ADMIN_KEY, **sections: dict[str, Any]) -> Path:
    """A gateway's TOML at `path` (`gateway_sections`); `sections` add to it."""
    return write_toml(path, merged(gateway_sections(path, site, key), sections))


def aggregator_toml(tmp: Path, port: int, site: str, token: str = TOKEN, **sections: dict[str, Any]) -> Path:
    """`tmp/aggregator.toml`: an aggregator on `port` that takes the uplink of `gw-<site>` with `token`."""
    base: Sections = {
        "aggregator": {"data_dir": tmp / "aggregator"},
        "http": {"host": "127.0.0.1", "port": port},
        "auth": {"api_keys": [{"key": ADMIN_KEY, "role": "admin"}],
                 "gateway_tokens": [{"gateway": f"gw-{site}", "token": token, "site": site, "line": "line-a"}]},
        "log": {"format": "json", "level": "warning"},
    }
    return write_toml(tmp / "aggregator.toml", merged(base, sections))


def open_gateway_toml(tmp_path: Path) -> str:
    """The head of a gateway TOML that needs nothing more: site s1, line l1, gateway gw1, its data under
    `tmp_path`, an open API; a test adds the sections it is about."""
    return f"""
[gateway]
site = "s1"
line = "l1"
id = "gw1"
data_dir = "{tmp_path / 'data'}"
[auth]
open = true"""
