"""Gateway configuration: precedence, typed validation with every problem at once, and the CLI edge."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from gateway.common.errors import ConfigError
from gateway.common.pki import init_ca
from gateway.config import ApiKey, DeviceMapping, GatewayConfig, load_config

ADMIN_KEY = "cfg-test-admin-key-0001"
MINIMAL = f"""
[gateway]
site = "izmir-bakery"
line = "line-a"
id = "gw-izmir-line-a"

[auth]
api_keys = [{{ key = "{ADMIN_KEY}", role = "admin" }}]
"""
EGIZ = Path(sys.executable).with_name("egiz")


def write(tmp_path: Path, text: str, name: str = "gateway.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load(tmp_path: Path, text: str = MINIMAL, *, env: dict[str, str] | None = None,
         overrides: dict[str, Any] | None = None) -> GatewayConfig:
    return load_config(GatewayConfig, write(tmp_path, text), environ=env or {}, overrides=overrides)


def problems(tmp_path: Path, text: str = MINIMAL, *, env: dict[str, str] | None = None,
             overrides: dict[str, Any] | None = None) -> dict[str, str]:
    """The reported problems as {dotted key: message}."""
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text, env=env, overrides=overrides)
    assert exc.value.problems
    out = dict(exc.value.problems)
    for key, message in exc.value.problems:
        assert f"{key}: {message}" in str(exc.value)  # the one-line form lists every problem
    return out


# ------------------------------------------------------------------ defaults and precedence


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.gateway.site == "izmir-bakery"
    assert cfg.gateway.data_dir == Path("/var/lib/egiz")
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.tls, cfg.mqtt.keepalive_s) == ("127.0.0.1", 1883, False, 30)
    assert (cfg.mqtt.reconnect_min_s, cfg.mqtt.reconnect_max_s) == (0.5, 30.0)
    assert (cfg.http.host, cfg.http.port) == ("0.0.0.0", 8080)
    assert cfg.auth.api_keys == (ApiKey(ADMIN_KEY, "admin"),)
    assert cfg.auth.open is False
    assert cfg.ingest.telemetry_topic == "openegiz/{site}/{type}/{equipment_id}/{feature}/telemetry"
    assert cfg.ingest.payload_format == "contract"
    assert cfg.ingest.auto_register is False
    assert (cfg.ingest.max_payload_bytes, cfg.ingest.max_samples) == (65536, 1000)
    assert dict(cfg.ingest.devices) == {}
    assert cfg.twin.flush_interval_s == 1.0
    assert (cfg.ws.heartbeat_s, cfg.ws.queue_size, cfg.ws.max_clients) == (30.0, 1024, 2000)
    assert (cfg.log.level, cfg.log.format) == ("info", "auto")
    assert cfg.mqtt_client_id == "egiz-gw-izmir-line-a"
    assert cfg.thing_id("oven-001") == "izmir-bakery:oven-001"


@pytest.mark.parametrize(
    ("in_toml", "in_env", "in_overrides", "expected"),
    [
        (False, False, False, 1883),
        (True, False, False, 1884),
        (True, True, False, 1885),
        (False, True, False, 1885),
        (True, True, True, 1886),
        (False, False, True, 1886),
    ],
)
def test_precedence_defaults_toml_env_overrides(tmp_path: Path, in_toml: bool, in_env: bool, in_overrides: bool,
                                                expected: int) -> None:
    text = MINIMAL + ("\n[mqtt]\nport = 1884\n" if in_toml else "")
    env = {"EGIZ_MQTT__PORT": "1885"} if in_env else {}
    overrides = {"mqtt.port": 1886} if in_overrides else {}
    assert load(tmp_path, text, env=env, overrides=overrides).mqtt.port == expected


def test_env_overrides_one_key_and_keeps_the_rest_of_the_section(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL + '\n[mqtt]\nhost = "broker.local"\nport = 1884\n', env={"EGIZ_MQTT__PORT": "1999"})
    assert (cfg.mqtt.host, cfg.mqtt.port) == ("broker.local", 1999)


def test_an_override_of_none_means_not_given(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL + "\n[http]\nport = 9000\n", overrides={"http.port": None})
    assert cfg.http.port == 9000


def test_environ_defaults_to_the_process_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGIZ_HTTP__PORT", "8181")
    path = write(tmp_path, MINIMAL)
    assert load_config(GatewayConfig, path).http.port == 8181
    assert load_config(GatewayConfig, path, environ={}).http.port == 8080  # an explicit environ wins


def test_unrelated_environment_variables_are_ignored(tmp_path: Path) -> None:
    env = {"EGIZ_TEST_BROKER_PORT": "x", "MQTT__PORT": "x", "egiz_mqtt__port": "x", "EGIZ_DEBUG": "1"}
    assert load(tmp_path, env=env).mqtt.port == 1883


def test_file_is_optional_when_everything_comes_from_env_and_overrides() -> None:
    env = {"EGIZ_GATEWAY__SITE": "s1", "EGIZ_GATEWAY__LINE": "l1", "EGIZ_GATEWAY__ID": "gw1",
           "EGIZ_AUTH__OPEN": "true"}
    cfg = load_config(GatewayConfig, None, environ=env, overrides={"gateway.data_dir": "/tmp/egiz-x"})
    assert (cfg.gateway.site, cfg.gateway.line, cfg.gateway.id) == ("s1", "l1", "gw1")
    assert cfg.auth.open is True
    assert cfg.gateway.data_dir == Path("/tmp/egiz-x")


@pytest.mark.parametrize(
    ("name", "raw", "section", "key", "value"),
    [
        ("EGIZ_MQTT__TLS", "1", "mqtt", "tls", True),
        ("EGIZ_MQTT__TLS", "Yes", "mqtt", "tls", True),
        ("EGIZ_MQTT__TLS", "on", "mqtt", "tls", True),
        ("EGIZ_MQTT__TLS", "TRUE", "mqtt", "tls", True),
        ("EGIZ_MQTT__TLS", "0", "mqtt", "tls", False),
        ("EGIZ_MQTT__TLS", "no", "mqtt", "tls", False),
        ("EGIZ_MQTT__TLS", "off", "mqtt", "tls", False),
        ("EGIZ_MQTT__TLS", "false", "mqtt", "tls", False),
        ("EGIZ_MQTT__KEEPALIVE_S", "45", "mqtt", "keepalive_s", 45),
        ("EGIZ_MQTT__RECONNECT_MIN_S", "0.25", "mqtt", "reconnect_min_s", 0.25),
        ("EGIZ_MQTT__CLIENT_ID", "line-a-gw", "mqtt", "client_id", "line-a-gw"),
        ("EGIZ_MQTT__HOST", "123", "mqtt", "host", "123"),  # a string key takes the text as is
        ("EGIZ_GATEWAY__DATA_DIR", "/srv/egiz", "gateway", "data_dir", Path("/srv/egiz")),
        ("EGIZ_INGEST__PAYLOAD_FORMAT", "legacy", "ingest", "payload_format", "legacy"),
        ("EGIZ_LOG__LEVEL", "debug", "log", "level", "debug"),
        ("EGIZ_TWIN__FLUSH_INTERVAL_S", "2", "twin", "flush_interval_s", 2.0),
    ],
)
def test_env_values_are_parsed_by_the_type_of_their_key(tmp_path: Path, name: str, raw: str, section: str,
                                                       key: str, value: Any) -> None:
    got = getattr(getattr(load(tmp_path, env={name: raw}), section), key)
    assert got == value
    assert type(got) is type(value)


def test_env_json_for_list_and_table_keys(tmp_path: Path) -> None:
    keys = [{"key": "env-operator-key-0001", "role": "operator", "name": "hmi"},
            {"key": "env-viewer-key-000002"}]
    devices = {"ESP32-A1": {"thing": "oven-001", "type": "oven"}, "esp32-b2": {"thing": "mixer-002"}}
    cfg = load(tmp_path, env={"EGIZ_AUTH__API_KEYS": json.dumps(keys), "EGIZ_INGEST__DEVICES": json.dumps(devices)})
    # the environment replaces the file's list as a whole
    assert cfg.auth.api_keys == (ApiKey("env-operator-key-0001", "operator", "hmi"),
                                 ApiKey("env-viewer-key-000002", "viewer"))
    assert dict(cfg.ingest.devices) == {"ESP32-A1": DeviceMapping("oven-001", "oven"),
                                        "esp32-b2": DeviceMapping("mixer-002", "")}


def test_env_can_add_one_device_next_to_the_files_devices(tmp_path: Path) -> None:
    text = MINIMAL + '\n[ingest.devices]\nesp1 = { thing = "oven-001" }\n'
    cfg = load(tmp_path, text, env={"EGIZ_INGEST__DEVICES__ESP2": '{"thing": "oven-002", "type": "oven"}'})
    assert dict(cfg.ingest.devices) == {"esp1": DeviceMapping("oven-001"), "esp2": DeviceMapping("oven-002", "oven")}


# ------------------------------------------------------------------ every problem, with its key


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = """
    [gateway]
    line = "line-a"
    id = 7
    colour = "blue"
    [mqtt]
    port = "1883"
    tls = "yes"
    [http]
    port = 8080.5
    [ingest]
    payload_format = "xml"
    [mqtt2]
    host = "x"
    """
    found = problems(tmp_path, text, env={"EGIZ_WS__QUEUE_SIZE": "big", "EGIZ_LOG__COLOUR": "red"})
    assert set(found) == {"gateway.site", "gateway.id", "gateway.colour", "mqtt.port", "mqtt.tls", "http.port",
                          "ingest.payload_format", "mqtt2", "ws.queue_size", "log.colour", "auth.api_keys"}
    assert found["gateway.site"] == "is required"
    assert "unknown key" in found["mqtt2"]
    assert "EGIZ_WS__QUEUE_SIZE" in found["ws.queue_size"]


def test_every_semantic_problem_is_reported_at_once(tmp_path: Path) -> None:
    text = f"""
    [gateway]
    site = "Izmir Bakery"
    line = "line_a/1"
    id = ""
    [mqtt]
    port = 70000
    username = "egiz"
    reconnect_min_s = 5.0
    reconnect_max_s = 1.0
    [http]
    port = -1
    [auth]
    api_keys = [{{ key = "short", role = "admin" }}, {{ key = "{ADMIN_KEY}" }}, {{ key = "{ADMIN_KEY}" }}]
    [ingest]
    telemetry_topic = "openegiz/{{site}}/{{feature}}/telemetry"
    status_topic = "openegiz/{{site}}/{{node}}/status"
    command_topic = "openegiz/+/{{equipment_id}}/cmd"
    max_payload_bytes = 100
    [twin]
    flush_interval_s = 0
    [ws]
    queue_size = 0
    """
    found = problems(tmp_path, text)
    assert set(found) == {
        "gateway.site", "gateway.line", "gateway.id", "mqtt.port", "mqtt.password", "mqtt.reconnect_max_s",
        "http.port", "auth.api_keys[0].key", "auth.api_keys[2].key", "ingest.telemetry_topic",
        "ingest.status_topic", "ingest.command_topic", "ingest.max_payload_bytes", "twin.flush_interval_s",
        "ws.queue_size",
    }
    assert "lowercase" in found["gateway.site"]
    assert "1..65535" in found["mqtt.port"]
    assert "together" in found["mqtt.password"]
    assert found["auth.api_keys[0].key"] == "must be at least 16 characters"
    assert found["auth.api_keys[2].key"] == "is given twice"
    assert "needs {equipment_id}" in found["ingest.telemetry_topic"]
    assert "unknown placeholder {node}" in found["ingest.status_topic"]
    assert "must be a literal or one placeholder" in found["ingest.command_topic"]


def test_type_and_semantic_problems_are_reported_together(tmp_path: Path) -> None:
    text = MINIMAL.replace('site = "izmir-bakery"', 'site = "Izmir Bakery"') + '\n[mqtt]\nport = "1883"\n'
    assert set(problems(tmp_path, text)) == {"gateway.site", "mqtt.port"}


# ------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    ("text", "env", "key"),
    [
        (MINIMAL + "\n[uplnk]\nurl = 'x'\n", {}, "uplnk"),
        (MINIMAL + "\nverbose = true\n", {}, "auth.verbose"),  # after [auth], a key of auth
        ("verbose = true\n" + MINIMAL, {}, "verbose"),
        (MINIMAL + "\n[mqtt]\nprot = 1884\n", {}, "mqtt.prot"),
        (MINIMAL.replace('role = "admin"', 'rol = "admin"'), {}, "auth.api_keys[0].rol"),
        (MINIMAL + '\n[ingest.devices]\nesp1 = { thing = "oven-001", kind = "oven" }\n', {},
         "ingest.devices.esp1.kind"),
        (MINIMAL, {"EGIZ_MQTT__PROT": "1884"}, "mqtt.prot"),
        (MINIMAL, {"EGIZ_UPLNK__URL": "http://x"}, "uplnk"),
    ],
)
def test_unknown_keys_are_errors(tmp_path: Path, text: str, env: dict[str, str], key: str) -> None:
    found = problems(tmp_path, text, env=env)
    assert key in found
    assert found[key].startswith("unknown key (known: ")


def test_unknown_key_message_lists_the_known_keys(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "\n[http]\nprot = 1\n")
    assert found["http.prot"] == ("unknown key (known: host, port, tls_cert_file, tls_client_ca_file, "
                                  "tls_key_file)")


# ------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(
    ("toml", "key", "message"),
    [
        ('[mqtt]\nport = "1883"', "mqtt.port", "must be an integer, got '1883'"),
        ("[mqtt]\nport = true", "mqtt.port", "must be an integer, got True"),
        ("[mqtt]\nkeepalive_s = 30.5", "mqtt.keepalive_s", "must be an integer"),
        ('[mqtt]\ntls = "yes"', "mqtt.tls", "must be true or false"),
        ("[mqtt]\ntls = 1", "mqtt.tls", "must be true or false"),
        ('[mqtt]\nreconnect_min_s = "1"', "mqtt.reconnect_min_s", "must be a finite number"),
        ("[mqtt]\nreconnect_min_s = false", "mqtt.reconnect_min_s", "must be a finite number"),
        ("[mqtt]\nhost = 127", "mqtt.host", "must be a string"),
        ("[mqtt]\nhost = [1]", "mqtt.host", "must be a string"),
        ("mqtt = 5", "mqtt", "must be a table, got int"),
        ('[log]\nlevel = "loud"', "log.level", "must be one of debug, info, warning, error, got 'loud'"),
        ('[ingest]\npayload_format = "json"', "ingest.payload_format", "must be one of contract, legacy"),
        ("[ingest]\ndevices = 5", "ingest.devices", "must be a table, got int"),
        ('[ingest.devices]\nesp1 = "oven-001"', "ingest.devices.esp1", "must be a table, got str"),
        ("[ingest.devices]\nesp1 = { type = 'oven' }", "ingest.devices.esp1.thing", "is required"),
    ],
)
def test_wrong_types_from_toml(tmp_path: Path, toml: str, key: str, message: str) -> None:
    assert message in problems(tmp_path, toml + "\n" + MINIMAL)[key]


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        (MINIMAL.replace('id = "gw-izmir-line-a"', "id = 5"), "gateway.id", "must be a string"),
        (MINIMAL.replace('line = "line-a"', 'line = "line-a"\ndata_dir = 5'), "gateway.data_dir",
         "must be a path string"),
        (MINIMAL.replace('line = "line-a"', 'line = "line-a"\ndata_dir = ""'), "gateway.data_dir",
         "must be a path string"),
        (MINIMAL.replace("api_keys = [", "api_keys = 5 #"), "auth.api_keys", "must be a list, got int"),
        (MINIMAL.replace(f'api_keys = [{{ key = "{ADMIN_KEY}", role = "admin" }}]', 'api_keys = ["abc"]'),
         "auth.api_keys[0]", "must be a table, got str"),
        (MINIMAL.replace(f'key = "{ADMIN_KEY}"', "key = 1234567890123456789"), "auth.api_keys[0].key",
         "must be a string"),
    ],
)
def test_wrong_types_in_nested_values(tmp_path: Path, text: str, key: str, message: str) -> None:
    assert message in problems(tmp_path, text)[key]


@pytest.mark.parametrize(
    ("name", "raw", "key", "message"),
    [
        ("EGIZ_MQTT__PORT", "abc", "mqtt.port", "EGIZ_MQTT__PORT must be an integer, got 'abc'"),
        ("EGIZ_MQTT__PORT", "1883.0", "mqtt.port", "must be an integer"),
        ("EGIZ_MQTT__TLS", "maybe", "mqtt.tls", "EGIZ_MQTT__TLS must be true or false, got 'maybe'"),
        ("EGIZ_MQTT__RECONNECT_MAX_S", "soon", "mqtt.reconnect_max_s", "EGIZ_MQTT__RECONNECT_MAX_S must be a number"),
        ("EGIZ_LOG__LEVEL", "loud", "log.level", "must be one of debug, info, warning, error"),
        ("EGIZ_AUTH__API_KEYS", "[{", "auth.api_keys", "EGIZ_AUTH__API_KEYS must be JSON for this key"),
        ("EGIZ_AUTH__API_KEYS", '{"key": "x"}', "auth.api_keys", "must be a list, got dict"),
        ("EGIZ_INGEST__DEVICES", "esp1=oven-001", "ingest.devices", "EGIZ_INGEST__DEVICES must be JSON"),
        ("EGIZ_INGEST__DEVICES", "[]", "ingest.devices", "must be a table, got list"),
        ("EGIZ_INGEST__DEVICES__ESP1", "oven-001", "ingest.devices.esp1", "EGIZ_INGEST__DEVICES__ESP1 must be JSON"),
        ("EGIZ_INGEST__DEVICES__ESP1", '"oven-001"', "ingest.devices.esp1", "must be a table, got str"),
        ("EGIZ_AUTH__API_KEYS", '[{"key": "env-admin-key-00001", "role": "root"}]', "auth.api_keys[0].role",
         "must be one of viewer, operator, admin"),
    ],
)
def test_wrong_types_from_env_name_the_key_and_the_variable(tmp_path: Path, name: str, raw: str, key: str,
                                                            message: str) -> None:
    assert message in problems(tmp_path, env={name: raw})[key]


def test_integers_are_accepted_for_float_keys_and_become_floats(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL + "\n[mqtt]\nreconnect_min_s = 1\nreconnect_max_s = 60\n")
    assert cfg.mqtt.reconnect_min_s == 1.0 and type(cfg.mqtt.reconnect_min_s) is float
    assert type(cfg.mqtt.reconnect_max_s) is float


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", "+inf"])
@pytest.mark.parametrize("key", ["twin.flush_interval_s", "mqtt.reconnect_max_s", "ws.heartbeat_s"])
def test_non_finite_numbers_in_the_file_are_rejected(tmp_path: Path, key: str, raw: str) -> None:
    section, name = key.split(".")
    found = problems(tmp_path, MINIMAL + f"\n[{section}]\n{name} = {raw}\n")
    assert found[key].startswith("must be a finite number, got ")
    assert set(found) == {key}  # no range check piles on after the type problem


@pytest.mark.parametrize("raw", ["nan", "NaN", "inf", "-Infinity"])
def test_non_finite_numbers_from_env_are_rejected(tmp_path: Path, raw: str) -> None:
    found = problems(tmp_path, env={"EGIZ_TWIN__FLUSH_INTERVAL_S": raw})
    assert found == {"twin.flush_interval_s": f"must be a finite number, got {float(raw)!r}"}


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ("[mqtt]\nreconnect_min_s = nan", "mqtt.reconnect_min_s"),  # also reports mqtt.reconnect_max_s
        ("[mqtt]\nreconnect_min_s = inf", "mqtt.reconnect_min_s"),
        ("[mqtt]\nusername = 5", "mqtt.username"),  # also reports mqtt.password
    ],
    ids=["min-nan", "min-inf", "username-int"],
)
def test_a_type_problem_is_not_repeated_by_a_cross_key_check(tmp_path: Path, toml: str, key: str) -> None:
    assert set(problems(tmp_path, MINIMAL + "\n" + toml + "\n")) == {key}


def test_a_wrongly_typed_auth_open_does_not_also_ask_for_keys(tmp_path: Path) -> None:
    text = MINIMAL.replace(f'api_keys = [{{ key = "{ADMIN_KEY}", role = "admin" }}]', "open = 0")
    assert set(problems(tmp_path, text)) == {"auth.open"}


def test_range_problems_name_their_own_key(tmp_path: Path) -> None:
    text = MINIMAL + """
[mqtt]
port = 0
keepalive_s = 4
reconnect_min_s = 0
reconnect_max_s = -1
[http]
port = 65536
[ingest]
max_payload_bytes = 255
max_samples = 0
dead_letter_keep = 0
[twin]
flush_interval_s = 61
[ws]
queue_size = 0
max_clients = 0
heartbeat_s = 0
"""
    assert problems(tmp_path, text) == {
        "mqtt.port": "must be a TCP port 1..65535",
        "mqtt.keepalive_s": "must be 5..3600 seconds",
        "mqtt.reconnect_min_s": "must be > 0",
        "mqtt.reconnect_max_s": "must be >= mqtt.reconnect_min_s",
        "http.port": "must be a TCP port 0..65535 (0: any free port)",
        "ingest.max_payload_bytes": "must be 256..16777216",
        "ingest.max_samples": "must be 1..100000",
        "ingest.dead_letter_keep": "must be >= 1",
        "twin.flush_interval_s": "must be > 0 and <= 60",
        "ws.queue_size": "must be >= 1",
        "ws.max_clients": "must be >= 1",
        "ws.heartbeat_s": "must be > 0",
    }


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("mqtt.port", [1, 1883, 65535], [0, -1, 65536]),
        ("http.port", [0, 8080, 65535], [-1, 65536]),
        ("mqtt.keepalive_s", [5, 30, 3600], [0, 4, 3601, -30]),
        ("ingest.dead_letter_keep", [1, 10000], [0, -1]),
        ("ingest.max_payload_bytes", [256, 16 * 2**20], [255, 16 * 2**20 + 1]),
        ("ingest.max_samples", [1, 100_000], [0, 100_001]),
        ("twin.flush_interval_s", [0.001, 1, 60, 60.0], [0, -1, 60.001, 61, 3600]),
    ],
)
def test_ranges_at_their_edges(tmp_path: Path, key: str, good: list[float], bad: list[float]) -> None:
    section, name = key.split(".")
    for value in good:
        cfg = load(tmp_path, MINIMAL + f"\n[{section}]\n{name} = {value}\n")
        assert getattr(getattr(cfg, section), name) == value
    for value in bad:
        assert set(problems(tmp_path, MINIMAL + f"\n[{section}]\n{name} = {value}\n")) == {key}, value


def test_ranges_apply_to_environment_values_too(tmp_path: Path) -> None:
    env = {"EGIZ_MQTT__KEEPALIVE_S": "3601", "EGIZ_MQTT__PORT": "0", "EGIZ_INGEST__DEAD_LETTER_KEEP": "0",
           "EGIZ_TWIN__FLUSH_INTERVAL_S": "60.5"}
    assert set(problems(tmp_path, env=env)) == {"mqtt.keepalive_s", "mqtt.port", "ingest.dead_letter_keep",
                                                "twin.flush_interval_s"}


def test_type_problems_do_not_hide_the_value_checks_of_other_keys(tmp_path: Path) -> None:
    text = MINIMAL + """
[mqtt]
port = "1883"
keepalive_s = 1
[ingest]
telemetry_topic = "openegiz/{site}/{equipment_id}/telemetry"
default_type = "Sensor"
dead_letter_keep = "many"
[ingest.devices]
esp1 = { thing = "oven 1", type = "Oven" }
[twin]
flush_interval_s = nan
"""
    found = problems(tmp_path, text)
    assert set(found) == {"mqtt.port", "mqtt.keepalive_s", "ingest.telemetry_topic", "ingest.default_type",
                          "ingest.dead_letter_keep", "ingest.devices.esp1.thing", "ingest.devices.esp1.type",
                          "twin.flush_interval_s"}
    assert found["mqtt.port"] == "must be an integer, got '1883'"
    assert found["ingest.dead_letter_keep"] == "must be an integer, got 'many'"
    assert found["twin.flush_interval_s"] == "must be a finite number, got nan"
    assert found["mqtt.keepalive_s"] == "must be 5..3600 seconds"


# ------------------------------------------------------------------ api keys


def test_api_keys_with_roles_and_names(tmp_path: Path) -> None:
    text = MINIMAL.replace(
        f'api_keys = [{{ key = "{ADMIN_KEY}", role = "admin" }}]',
        'api_keys = [\n  { key = "admin-key-0000000001", role = "admin", name = "ops" },\n'
        '  { key = "operator-key-00000002", role = "operator" },\n  { key = "viewer-key-0000000003" },\n]',
    )
    cfg = load(tmp_path, text)
    assert [(k.role, k.name) for k in cfg.auth.api_keys] == [("admin", "ops"), ("operator", ""), ("viewer", "")]


def test_no_api_keys_is_an_error_unless_auth_is_open(tmp_path: Path) -> None:
    text = MINIMAL.replace(f'api_keys = [{{ key = "{ADMIN_KEY}", role = "admin" }}]', "")
    assert "auth.open" in problems(tmp_path, text)["auth.api_keys"]
    assert load(tmp_path, text + "open = true\n").auth.open is True


@pytest.mark.parametrize(
    ("keys", "key", "message"),
    [
        ('[{ key = "abcdefghijklmno", role = "admin" }]', "auth.api_keys[0].key", "must be at least 16 characters"),
        ('[{ key = "", role = "admin" }]', "auth.api_keys[0].key", "must be at least 16 characters"),
        (f'[{{ key = "{ADMIN_KEY}" }}, {{ key = "{ADMIN_KEY}", role = "admin" }}]', "auth.api_keys[1].key",
         "is given twice"),
        (f'[{{ key = "{ADMIN_KEY}", role = "root" }}]', "auth.api_keys[0].role",
         "must be one of viewer, operator, admin"),
        ('[{ role = "admin" }]', "auth.api_keys[0].key", "is required"),
    ],
)
def test_api_key_validation(tmp_path: Path, keys: str, key: str, message: str) -> None:
    text = MINIMAL.replace(f'[{{ key = "{ADMIN_KEY}", role = "admin" }}]', keys)
    assert problems(tmp_path, text)[key] == message


def test_key_of_exactly_16_characters_is_accepted(tmp_path: Path) -> None:
    assert load(tmp_path, MINIMAL.replace(ADMIN_KEY, "k" * 16)).auth.api_keys[0].key == "k" * 16


def test_secrets_never_appear_in_reprs(tmp_path: Path) -> None:
    cfg = load(tmp_path, MINIMAL + '\n[mqtt]\nusername = "egiz"\npassword = "broker-secret-pw"\n')
    assert ADMIN_KEY not in repr(cfg)
    assert "broker-secret-pw" not in repr(cfg)
    assert "egiz" in repr(cfg.mqtt)


LEAK = "leaky-secret-value-0001"


@pytest.mark.parametrize(
    ("text", "env", "key", "message"),
    [
        (MINIMAL, {"EGIZ_AUTH__API_KEYS": f'[{{"key": "{LEAK}", "role": "admin"}}'}, "auth.api_keys",
         "EGIZ_AUTH__API_KEYS must be JSON for this key"),
        (MINIMAL, {"EGIZ_INGEST__DEVICES": f'{{"esp1": "{LEAK}"'}, "ingest.devices",
         "EGIZ_INGEST__DEVICES must be JSON for this key"),
        (MINIMAL, {"EGIZ_AUTH__OPEN": LEAK}, "auth.open", "EGIZ_AUTH__OPEN must be true or false"),
        (MINIMAL + f'\n[mqtt]\nusername = "egiz"\npassword = ["{LEAK}"]\n', {}, "mqtt.password",
         "must be a string, got list"),
        (MINIMAL.replace('role = "admin"', f'role = "{LEAK}"'), {}, "auth.api_keys[0].role",
         "must be one of viewer, operator, admin"),
        (MINIMAL.replace(f'key = "{ADMIN_KEY}"', "key = 8765432109876543210"), {}, "auth.api_keys[0].key",
         "must be a string, got int"),
        (MINIMAL.replace('role = "admin"', 'role = "admin", name = 1002003004005006007'), {},
         "auth.api_keys[0].name", "must be a string, got int"),
    ],
    ids=["env-api-keys", "env-devices", "env-auth-open", "password", "role", "key", "key-name"],
)
def test_problem_messages_never_echo_secrets(tmp_path: Path, text: str, env: dict[str, str], key: str,
                                             message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text, env=env)
    found = dict(exc.value.problems)
    assert found[key].startswith(message)
    for leaked in (LEAK, "8765432109876543210", "1002003004005006007"):
        assert leaked not in str(exc.value)


def test_gateway_check_never_prints_a_secret_from_a_bad_env_value(tmp_path: Path) -> None:
    result = run_egiz("gateway", "check", "--config", str(write(tmp_path, MINIMAL)),
                      env={"EGIZ_AUTH__API_KEYS": f'[{{"key": "{LEAK}"'})
    assert result.returncode == 2, result.stderr
    assert "auth.api_keys: EGIZ_AUTH__API_KEYS must be JSON for this key" in result.stderr
    assert LEAK not in result.stderr + result.stdout


def test_a_tls_ca_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing-ca.pem"
    assert problems(tmp_path, MINIMAL + f'\n[mqtt]\ntls = true\nca_file = "{missing}"\n') == {
        "mqtt.ca_file": f"{missing} does not exist"}
    assert problems(tmp_path, MINIMAL + f'\n[mqtt]\ntls = true\nca_file = "{tmp_path}"\n') == {
        "mqtt.ca_file": f"{tmp_path} is not a file"}
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n", encoding="utf-8")
    assert problems(tmp_path, MINIMAL + f'\n[mqtt]\ntls = true\nca_file = "{ca}"\n') == {
        "mqtt.ca_file": f"{ca} is not a PEM certificate"}
    init_ca(tmp_path / "pki", "test CA")
    ca = tmp_path / "pki" / "ca.crt"
    assert load(tmp_path, MINIMAL + f'\n[mqtt]\ntls = true\nca_file = "{ca}"\n').mqtt.ca_file == str(ca)
    # Without TLS the file is not read, so a stale path is no reason to refuse to start.
    assert load(tmp_path, MINIMAL + f'\n[mqtt]\nca_file = "{missing}"\n').mqtt.tls is False


# ------------------------------------------------------------------ ingest: devices and topics

LEGACY = MINIMAL + """
[ingest]
payload_format = "legacy"
telemetry_topic = "sensors/{site}/{device_id}/telemetry"
status_topic = "sensors/{site}/{device_id}/status"
command_topic = "sensors/{site}/{device_id}/cmd"
auto_register = true
default_type = "sensor"

[ingest.devices]
esp32-a1 = { thing = "oven-001", type = "oven" }
"ESP32:B2" = { thing = "mixer-002" }
"""


def test_legacy_ingest_with_a_device_mapping(tmp_path: Path) -> None:
    cfg = load(tmp_path, LEGACY)
    ing = cfg.ingest
    assert ing.payload_format == "legacy"
    assert ing.telemetry_topic == "sensors/{site}/{device_id}/telemetry"
    assert ing.auto_register is True and ing.default_type == "sensor"
    assert dict(ing.devices) == {"esp32-a1": DeviceMapping("oven-001", "oven"), "ESP32:B2": DeviceMapping("mixer-002")}


def test_config_is_frozen_including_the_device_mapping(tmp_path: Path) -> None:
    cfg = load(tmp_path, LEGACY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.mqtt.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.ingest.devices["esp9"] = DeviceMapping("x")  # type: ignore[index]


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("openegiz/{site}/{feature}/telemetry", "needs {equipment_id}"),
        ("openegiz/{site}/{sensor}/telemetry", "unknown placeholder {sensor}"),
        ("openegiz/#", "must be a literal or one placeholder"),
        ("openegiz/{site}/{equipment_id}/{equipment_id}", "appears twice"),
        ("/openegiz/{equipment_id}", "start/end with '/'"),
        ("", "must not be empty"),
    ],
)
@pytest.mark.parametrize("key", ["telemetry_topic", "status_topic", "command_topic"])
def test_topic_patterns_are_validated(tmp_path: Path, key: str, pattern: str, message: str) -> None:
    found = problems(tmp_path, env={f"EGIZ_INGEST__{key.upper()}": pattern})
    assert message in found[f"ingest.{key}"]


@pytest.mark.parametrize("pattern", ["openegiz/{site}/{type}/{equipment_id}/telemetry",
                                     "plant/{device_id}/telemetry"])
def test_the_contract_format_needs_a_feature_level_in_the_telemetry_topic(tmp_path: Path, pattern: str) -> None:
    env = {"EGIZ_INGEST__TELEMETRY_TOPIC": pattern}
    found = problems(tmp_path, env=env)
    assert set(found) == {"ingest.telemetry_topic"}
    assert "needs a {feature} level" in found["ingest.telemetry_topic"]
    assert "ingest.payload_format" in found["ingest.telemetry_topic"]  # says how to fix it
    env["EGIZ_INGEST__PAYLOAD_FORMAT"] = "legacy"
    assert load(tmp_path, env=env).ingest.telemetry_topic == pattern


def test_only_the_telemetry_topic_needs_a_feature_level(tmp_path: Path) -> None:
    cfg = load(tmp_path)  # the default status and command topics have no {feature}
    assert "{feature}" not in cfg.ingest.status_topic and "{feature}" not in cfg.ingest.command_topic


@pytest.mark.parametrize("value", ["device", "oven", "oven_2", "heat-press", "a" * 32])
def test_valid_default_types(tmp_path: Path, value: str) -> None:
    assert load(tmp_path, MINIMAL + f'\n[ingest]\ndefault_type = "{value}"\n').ingest.default_type == value


@pytest.mark.parametrize("value", ["", "Oven", "2oven", "_oven", "oven.x", "oven 1", "a" * 33, "f\u0131r\u0131n"])
def test_invalid_default_types(tmp_path: Path, value: str) -> None:
    found = problems(tmp_path, MINIMAL + f'\n[ingest]\ndefault_type = "{value}"\n')
    assert found == {"ingest.default_type": "must be lowercase letters, digits, _ or - (e.g. 'oven')"}


def test_default_type_of_the_wrong_type_is_reported_once(tmp_path: Path) -> None:
    found = problems(tmp_path, MINIMAL + "\n[ingest]\ndefault_type = 5\n")
    assert found == {"ingest.default_type": "must be a string, got 5"}


@pytest.mark.parametrize(
    "mapping",
    [
        '{ thing = "oven-001" }',
        '{ thing = "Oven_1.a", type = "oven" }',
        '{ thing = "1", type = "" }',
        f'{{ thing = "{"x" * 64}", type = "{"t" * 32}" }}',
    ],
)
def test_valid_device_mappings(tmp_path: Path, mapping: str) -> None:
    cfg = load(tmp_path, MINIMAL + f"\n[ingest.devices]\nesp1 = {mapping}\n")
    assert set(cfg.ingest.devices) == {"esp1"}


@pytest.mark.parametrize(
    ("mapping", "key"),
    [
        ('{ thing = "" }', "thing"),
        ('{ thing = "oven 1" }', "thing"),
        ('{ thing = "-oven" }', "thing"),
        ('{ thing = ".oven" }', "thing"),
        ('{ thing = "oven/1" }', "thing"),
        ('{ thing = "izmir-bakery:oven-001" }', "thing"),  # the site is added by the gateway
        (f'{{ thing = "{"x" * 65}" }}', "thing"),
        ('{ thing = "oven-001", type = "Oven" }', "type"),
        ('{ thing = "oven-001", type = "1oven" }', "type"),
        ('{ thing = "oven-001", type = "oven.x" }', "type"),
        (f'{{ thing = "oven-001", type = "{"t" * 33}" }}', "type"),
    ],
)
def test_invalid_device_mappings_name_the_device_and_field(tmp_path: Path, mapping: str, key: str) -> None:
    found = problems(tmp_path, MINIMAL + f'\n[ingest.devices]\n"ESP32:A1" = {mapping}\n')
    assert set(found) == {f"ingest.devices.ESP32:A1.{key}"}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (MINIMAL.replace('site = "izmir-bakery"', 'site = "izmir-bakery\\n"'), "gateway.site"),
        (MINIMAL + '\n[ingest]\ndefault_type = "oven\\n"\n', "ingest.default_type"),
        (MINIMAL + '\n[ingest.devices]\nesp1 = { thing = "oven-001\\n" }\n', "ingest.devices.esp1.thing"),
        (MINIMAL + '\n[ingest.devices]\nesp1 = { thing = "oven-001", type = "oven\\n" }\n',
         "ingest.devices.esp1.type"),
    ],
    ids=["site", "default-type", "device-thing", "device-type"],
)
def test_a_name_with_a_trailing_newline_is_rejected(tmp_path: Path, text: str, key: str) -> None:
    assert key in problems(tmp_path, text)


def test_every_bad_device_mapping_is_reported_at_once(tmp_path: Path) -> None:
    env = {"EGIZ_INGEST__DEVICES": json.dumps({
        "esp1": {"thing": "oven 1", "type": "Oven"},
        "esp2": {"thing": "mixer-002", "type": "mixer"},
        "esp3": {"thing": 7},
        "esp4": {"type": "press"},
    })}
    found = problems(tmp_path, env=env)
    assert set(found) == {"ingest.devices.esp1.thing", "ingest.devices.esp1.type", "ingest.devices.esp3.thing",
                          "ingest.devices.esp4.thing"}
    assert found["ingest.devices.esp1.thing"] == "must be an equipment id: letters, digits, '.', '_', '-'"
    assert found["ingest.devices.esp3.thing"] == "must be a string, got 7"
    assert found["ingest.devices.esp4.thing"] == "is required"


def test_device_id_placeholder_is_accepted_for_every_topic(tmp_path: Path) -> None:
    env = {f"EGIZ_INGEST__{k}": f"plant/{{device_id}}/{k.lower()}" for k in ("TELEMETRY_TOPIC", "STATUS_TOPIC",
                                                                           "COMMAND_TOPIC")}
    env["EGIZ_INGEST__PAYLOAD_FORMAT"] = "legacy"  # the contract format needs a {feature} level
    assert load(tmp_path, env=env).ingest.status_topic == "plant/{device_id}/status_topic"


# ------------------------------------------------------------------ files


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(GatewayConfig, tmp_path / "nope.toml", environ={})
    ((key, message),) = exc.value.problems
    assert key == "<file>"
    assert "nope.toml does not exist" in message


@pytest.mark.parametrize("content", [b"[gateway\nsite = 1\n", b'site = "a"\nsite = "b"\n', b"\xff\xfe[gateway]\n"])
def test_invalid_toml(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as exc:
        load_config(GatewayConfig, path, environ={})
    ((key, message),) = exc.value.problems
    assert key == "<file>"
    assert "is not valid TOML" in message


# ------------------------------------------------------------------ the CLI edge


def run_egiz(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EGIZ_")}
    return subprocess.run([str(EGIZ), *args], capture_output=True, text=True, timeout=60,
                          env={**clean, **(env or {})}, check=False)


def test_gateway_run_with_an_invalid_config_exits_2_naming_every_key(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '\n[mqtt]\nport = "1883"\nprot = 1\n', name="bad.toml")
    result = run_egiz("gateway", "run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "mqtt.port: must be an integer" in result.stderr
    assert "mqtt.prot: unknown key" in result.stderr
    assert "bad.toml" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_gateway_run_with_a_semantic_problem_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace(ADMIN_KEY, "short"))
    result = run_egiz("gateway", "run", "--config", str(path))
    assert result.returncode == 2, result.stderr
    assert "auth.api_keys[0].key: must be at least 16 characters" in result.stderr


def test_gateway_check_with_a_bad_env_override_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    result = run_egiz("gateway", "check", "--config", str(path), env={"EGIZ_MQTT__PORT": "abc"})
    assert result.returncode == 2, result.stderr
    assert "mqtt.port" in result.stderr and "EGIZ_MQTT__PORT" in result.stderr


def test_gateway_check_with_a_missing_file_exits_2(tmp_path: Path) -> None:
    result = run_egiz("gateway", "check", "--config", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert "missing.toml does not exist" in result.stderr


def test_gateway_check_prints_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '\n[mqtt]\nusername = "egiz"\npassword = "broker-secret-pw"\n')
    result = run_egiz("gateway", "check", "--config", str(path), env={"EGIZ_HTTP__PORT": "9090"})
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["http"]["port"] == 9090
    assert doc["gateway"]["site"] == "izmir-bakery"
    assert doc["mqtt"]["username"] == "egiz"
    assert doc["mqtt"]["password"] == "***"
    assert doc["auth"]["api_keys"] == [{"key": "***", "role": "admin", "name": ""}]
    assert ADMIN_KEY not in result.stdout and "broker-secret-pw" not in result.stdout


def test_gateway_check_prints_the_device_mapping(tmp_path: Path) -> None:
    result = run_egiz("gateway", "check", "--config", str(write(tmp_path, LEGACY)))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ingest"]["devices"]["esp32-a1"] == {"thing": "oven-001", "type": "oven"}


# ------------------------------------------------------------------ the documentation stays true

DOCS = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def test_the_documented_example_files_are_valid(tmp_path: Path) -> None:
    examples = re.findall(r"```toml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.S)
    full, legacy = examples
    cfg = load(tmp_path, full)
    assert cfg.ingest.devices["esp32-a1b2c3"] == DeviceMapping("oven-001", "oven")
    cfg = load(tmp_path, MINIMAL + legacy)
    assert cfg.ingest.payload_format == "legacy"
    assert cfg.ingest.telemetry_topic == "sensors/{site}/{device_id}/telemetry"
