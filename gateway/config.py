"""The gateway's typed configuration: its sections and the checks types cannot express.

Loading (TOML < `EGIZ_<SECTION>__<KEY>` environment < flags, every problem at once with its dotted
key, unknown keys refused) is `gateway.common.settings`, shared with the aggregator.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from gateway.common import settings
from gateway.common.names import EQUIPMENT_RE, TYPE_RE
from gateway.common.names import SITE_RE as NAME_RE
from gateway.common.settings import ROLES, ApiKey, HttpSection, LogSection, http_url, is_secret
from gateway.connectors.config import ConnectorsSection
from gateway.oee.settings import OeeSection
from gateway.oee.settings import check as check_oee

AGGREGATOR_SECTIONS = frozenset({"aggregator", "storage"})  # the aggregator's own: a gateway skips them in the env
__all__ = ["ROLES", "ApiKey", "GatewayConfig", "HttpSection", "LogSection", "is_secret", "load_config"]


@dataclass(frozen=True)
class DeviceMapping:
    """Maps a device id seen on MQTT to the equipment id and type of its Thing."""

    thing: str
    type: str = ""


@dataclass(frozen=True)
class GatewaySection:
    site: str
    line: str
    id: str
    data_dir: Path = Path("/var/lib/egiz")


@dataclass(frozen=True)
class MqttSection:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str = ""
    password: str = ""
    client_id: str = ""  # default: "egiz-<gateway.id>"; must be stable for the persistent session
    keepalive_s: int = 30
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""  # a client certificate, for a broker with require_certificate
    key_file: str = ""

    def __repr__(self) -> str:
        return f"MqttSection(host={self.host!r}, port={self.port}, username={self.username!r})"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of the gateway's MQTT clients (None: plain MQTT)."""
        if not self.tls:
            return None
        from gateway.common.tls import client_context

        return client_context(self.ca_file, (), self.cert_file, self.key_file)


@dataclass(frozen=True)
class AuthSection:
    api_keys: tuple[ApiKey, ...] = ()
    open: bool = False  # demo only: every request is treated as admin


@dataclass(frozen=True)
class IngestSection:
    telemetry_topic: str = "openegiz/{site}/{type}/{equipment_id}/{feature}/telemetry"
    status_topic: str = "openegiz/{site}/{type}/{equipment_id}/status"
    command_topic: str = "openegiz/{site}/{type}/{equipment_id}/cmd"  # acks arrive on <this>/ack
    payload_format: Literal["contract", "legacy"] = "contract"
    auto_register: bool = False
    default_type: str = "device"
    max_payload_bytes: int = 65536
    max_samples: int = 1000
    max_features_per_thing: int = 64  # a node cannot make a Thing grow without end
    max_series_per_thing: int = 2000  # flattened properties (`voltage.a`, `zones[3]`) over all features
    devices: Mapping[str, DeviceMapping] = field(default_factory=dict)
    dead_letter_keep: int = 10000


@dataclass(frozen=True)
class TwinSection:
    flush_interval_s: float = 1.0


@dataclass(frozen=True)
class DeadbandRule:
    """Store a property raw only when it moved by more than `absolute` or `percent` (or `max_interval_s` passed)."""

    property: str  # a flattened path (`voltage.a`) or its base name (`voltage`, `temperature_zones`)
    type: str = ""  # equipment type; "" matches every type
    feature: str = ""  # "" matches every feature
    absolute: float = 0.0
    percent: float = 0.0
    max_interval_s: float = 300.0  # a flat signal is still stored this often


@dataclass(frozen=True)
class BufferSection:
    """The DuckDB telemetry buffer: historian and store-and-forward outbox."""

    commit_interval_ms: float = 500.0  # group commit no later than this after the first pending point
    commit_idle_ms: float = 20.0  # ... or as soon as the inflow pauses this long (> the MQTT read pause)
    commit_max_points: int = 50_000  # ... or when this many points are pending
    commit_max_messages: int = 1000  # ... or when this many messages wait for their acknowledgement
    raw_retention_days: float = 90.0
    rollup_1m_retention_days: float = 365.0
    rollup_1h_retention_days: float = 1826.0
    maintenance_interval_s: float = 30.0  # roll-ups, retention and the disk budget are checked this often
    late_s: float = 120.0  # a roll-up bucket is computed once it is this long closed; later points are merged
    disk_budget_mb: float = 4096.0  # the data directory's byte budget; 0: none
    disk_policy: Literal["drop_oldest_synced", "drop_oldest", "reject_new"] = "drop_oldest_synced"
    checkpoint_mb: float = 16.0  # DuckDB WAL size that triggers a checkpoint
    memory_limit_mb: float = 0.0  # DuckDB's; 0: a sixteenth of the machine's memory, 64..256 MB
    context_keys: tuple[str, ...] = ("batch_id", "recipe")  # string properties history can filter by
    deadband: tuple[DeadbandRule, ...] = ()


@dataclass(frozen=True)
class WebhookTarget:
    """An HTTP endpoint that receives every anomaly at or above `min_severity` (POST, JSON, retried)."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. an Authorization header; never logged
    min_severity: Literal["info", "warning", "critical"] = "warning"

    def __repr__(self) -> str:
        return f"WebhookTarget(url={self.url!r}, headers=***, min_severity={self.min_severity!r})"


@dataclass(frozen=True)
class DetectSection:
    """Anomaly detection on the gateway: rules, statistics, ONNX models, and where anomalies go."""

    enabled: bool = True
    rules_file: str = ""  # "": the built-in rules
    tick_ms: float = 50.0  # readings are scored in micro-batches this often
    enter_score: float = 0.5  # combined score that opens an anomaly
    exit_score: float = 0.3  # below this for clear_s seconds: resolved
    clear_s: float = 30.0
    warmup_samples: int = 120  # readings before the statistics of a property may alert
    learn_samples: int = 1800  # then, until a model calibrates them, readings that set the statistics' limits
    z_limit: float = 6.0  # default statistics limits until a trained model calibrates them
    ignore: tuple[str, ...] = ("*setpoint*",)  # properties that are commands, not measurements
    models_dir: str = ""  # "": <gateway.data_dir>/models
    model_poll_s: float = 5.0  # how often activation changes on disk are picked up
    anomaly_keep_days: float = 365.0  # resolved anomalies are kept this long
    mqtt_alerts: bool = False  # publish anomalies to openegiz/{site}/{type}/{equipment_id}/anomaly
    webhooks: tuple[WebhookTarget, ...] = ()


@dataclass(frozen=True)
class WsSection:
    heartbeat_s: float = 30.0
    queue_size: int = 1024
    max_clients: int = 2000
    compress: bool = False  # permessage-deflate when the client offers it: less bandwidth, more CPU per event


@dataclass(frozen=True)
class UplinkSection:
    """Forwarding to the central aggregator; no `url`, no forwarding."""

    url: str = ""
    token: str = ""
    order: Literal["live_first", "oldest_first"] = "live_first"
    batch_points: int = 100_000
    live_backlog_points: int = 200_000  # live_first sends the newest first once the backlog is larger
    interval_s: float = 1.0
    things_interval_s: float = 5.0
    timeout_s: float = 30.0
    retry_min_s: float = 0.5
    retry_max_s: float = 60.0
    models_interval_s: float = 60.0  # how often to ask the aggregator for model versions; 0: never
    ca_file: str = ""  # the site CA that signed the aggregator's certificate; "": the system's CAs
    pin_sha256: tuple[str, ...] = ()  # SHA-256 of the aggregator's certificate or public key (any one matches)
    cert_file: str = ""  # a client certificate, for an aggregator that requires one
    key_file: str = ""
    allow_http: bool = False  # plain http:// to a non-loopback address (the token crosses in clear)
    model_signing_key: str = ""  # the aggregator's Ed25519 public key (base64); "": central models refused

    def __repr__(self) -> str:
        return f"UplinkSection(url={self.url!r}, order={self.order!r}, token=***)"


@dataclass(frozen=True)
class DiscoverySection:
    """Zeroconf: advertise this gateway and its broker, and list the nodes that announce themselves."""

    enabled: bool = False  # advertising on a network is the site's decision; the shipped image turns it on
    address: str = ""  # the address to advertise; "": every address of this host
    broker_host: str = ""  # where nodes reach the broker; "": this host (mqtt.host if it is not loopback)
    broker_port: int = 0  # 0: mqtt.port
    provision_timeout_s: float = 10.0  # handing credentials to a node
    node_stale_s: float = 600.0  # a pending node not heard of for this long is dropped from the list


@dataclass(frozen=True)
class BrokerSection:
    """The Mosquitto files the gateway keeps: one user and one ACL entry per approved node."""

    password_file: str = ""  # "": <data_dir>/mosquitto/passwords
    acl_file: str = ""  # "": <data_dir>/mosquitto/acl
    # How Mosquitto learns of a change: "" (something else watches the files, e.g. a systemd path
    # unit), "pidfile:PATH" (SIGHUP to that process), or "command:ARGS" (run it).
    reload: str = ""


@dataclass(frozen=True)
class GatewayConfig:
    """The whole gateway configuration, frozen after validation."""

    gateway: GatewaySection
    mqtt: MqttSection = field(default_factory=MqttSection)
    http: HttpSection = field(default_factory=HttpSection)
    auth: AuthSection = field(default_factory=AuthSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    twin: TwinSection = field(default_factory=TwinSection)
    buffer: BufferSection = field(default_factory=BufferSection)
    uplink: UplinkSection = field(default_factory=UplinkSection)
    detect: DetectSection = field(default_factory=DetectSection)
    ws: WsSection = field(default_factory=WsSection)
    discovery: DiscoverySection = field(default_factory=DiscoverySection)
    broker: BrokerSection = field(default_factory=BrokerSection)
    connectors: ConnectorsSection = field(default_factory=ConnectorsSection)
    log: LogSection = field(default_factory=LogSection)
    oee: OeeSection = field(default_factory=OeeSection)

    @property
    def mqtt_client_id(self) -> str:
        return self.mqtt.client_id or f"egiz-{self.gateway.id}"

    def thing_id(self, equipment_id: str) -> str:
        return f"{self.gateway.site}:{equipment_id}"

    def under_data_dir(self, configured: str | Path | None, *default: str) -> Path:
        """`configured` when set, else `default` inside `gateway.data_dir`."""
        return Path(configured) if configured else Path(self.gateway.data_dir).joinpath(*default)

    @property
    def models_dir(self) -> Path:
        return self.under_data_dir(self.detect.models_dir, "models")

    @property
    def password_file(self) -> Path:
        return self.under_data_dir(self.broker.password_file, "mosquitto", "passwords")

    @property
    def acl_file(self) -> Path:
        return self.under_data_dir(self.broker.acl_file, "mosquitto", "acl")


T = TypeVar("T")


def load_config(cls: type[T], path: Path | None = None, *, environ: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None,
                foreign_sections: frozenset[str] = AGGREGATOR_SECTIONS) -> T:
    """The gateway's configuration from a TOML file, `EGIZ_*` variables and dotted-key overrides,
    or ConfigError naming every bad key (`gateway.common.settings.load_config`)."""
    return settings.load_config(cls, path, environ=environ, overrides=overrides, semantics=_check_semantics,
                                foreign_sections=foreign_sections)


def _check_semantics(cfg: Any, problems: list[tuple[str, str]]) -> None:
    """Checks that need more than a type: ranges, names, patterns, cross-key rules, one section each.

    Runs even when some values had the wrong type; a check whose inputs are broken is skipped
    (its key was already reported), so one run lists every problem.
    """
    if not isinstance(cfg, GatewayConfig):
        return
    check = _Checks(problems)
    for section in (_check_gateway, _check_mqtt, _check_http, _check_auth, _check_ingest, _check_discovery,
                    _check_broker, _check_twin, _check_buffer, _check_uplink, _check_detect, _check_ws,
                    _check_connectors, _check_oee):
        section(cfg, check)


class _Checks:
    """Adds a problem for a key unless that key (or a key a cross-key rule reads) was reported already."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        self.reported = {key for key, _ in problems}
        self.wrong_type = frozenset(self.reported)

    def __call__(self, key: str, ok: bool | Callable[[], bool], message: str, *,
                 reads: tuple[str, ...] = ()) -> None:
        """`reads`: the other keys a cross-key rule looks at; a type problem in any of them skips it."""
        if key in self.reported or not self.wrong_type.isdisjoint(reads):
            return
        try:
            good = ok() if callable(ok) else ok
        except (TypeError, AttributeError, ValueError, KeyError):
            return
        if not good:
            self.fail(key, message)

    def fail(self, key: str, message: str) -> None:
        self.problems.append((key, message))
        self.reported.add(key)


def _check_gateway(cfg: GatewayConfig, check: _Checks) -> None:
    g = cfg.gateway
    if not isinstance(g, GatewaySection):
        return  # the section itself was reported
    for key in ("gateway.site", "gateway.line", "gateway.id"):
        value = getattr(g, key.split(".")[1], None)
        check(key, isinstance(value, str) and bool(NAME_RE.match(value)),
              "must be 1-63 chars of a-z, 0-9, '.', '_', '-' (lowercase, starting with a letter or digit)")


def _check_mqtt(cfg: GatewayConfig, check: _Checks) -> None:
    m = cfg.mqtt
    check("mqtt.port", lambda: 1 <= m.port <= 65535, "must be a TCP port 1..65535")
    check("mqtt.keepalive_s", lambda: 5 <= m.keepalive_s <= 3600, "must be 5..3600 seconds")
    check("mqtt.password", lambda: bool(m.username) == bool(m.password),
          "mqtt.username and mqtt.password must be given together", reads=("mqtt.username",))
    check("mqtt.reconnect_min_s", lambda: m.reconnect_min_s > 0, "must be > 0")
    check("mqtt.reconnect_max_s", lambda: m.reconnect_max_s >= m.reconnect_min_s,
          "must be >= mqtt.reconnect_min_s", reads=("mqtt.reconnect_min_s",))
    names = ("mqtt.tls", "mqtt.ca_file", "mqtt.cert_file", "mqtt.key_file")
    if isinstance(m, MqttSection) and m.tls is True and check.reported.isdisjoint(names):
        from gateway.common.tls import check_client_files

        for key, message in check_client_files("mqtt", m.ca_file, m.cert_file, m.key_file):
            check.fail(key, message)


def _check_http(cfg: GatewayConfig, check: _Checks) -> None:
    check("http.port", lambda: 0 <= cfg.http.port <= 65535, "must be a TCP port 0..65535 (0: any free port)")
    settings.check_http_tls(cfg.http, check.problems)


def _check_auth(cfg: GatewayConfig, check: _Checks) -> None:
    check("auth.api_keys", lambda: cfg.auth.open or bool(cfg.auth.api_keys),
          "give at least one key (or set auth.open = true for a demo)", reads=("auth.open",))
    seen: set[str] = set()
    for i, k in enumerate(cfg.auth.api_keys or ()):
        if not isinstance(k, ApiKey):
            continue
        check(f"auth.api_keys[{i}].key", isinstance(k.key, str) and len(k.key) >= 16,
              "must be at least 16 characters")
        check(f"auth.api_keys[{i}].key", k.key not in seen, "is given twice")
        if isinstance(k.key, str):
            seen.add(k.key)


def _check_ingest(cfg: GatewayConfig, check: _Checks) -> None:
    ing = cfg.ingest
    from gateway.ingest.topics import TopicPattern  # late import: topics imports nothing of ours

    for key in ("ingest.telemetry_topic", "ingest.status_topic", "ingest.command_topic"):
        pattern = getattr(ing, key.split(".")[1])
        try:
            parsed = TopicPattern.parse(pattern, required={"equipment_id"})
        except (ValueError, TypeError, AttributeError) as exc:
            if key not in check.reported and isinstance(pattern, str):
                check.fail(key, str(exc))
            continue
        if key == "ingest.telemetry_topic":
            has_feature = any(n == "feature" for _, n in parsed.captures)
            check(key, ing.payload_format != "contract" or has_feature,
                  "the contract payload format needs a {feature} level (or set ingest.payload_format = \"legacy\")",
                  reads=("ingest.payload_format",))
    check("ingest.max_payload_bytes", lambda: 256 <= ing.max_payload_bytes <= 16 * 2**20, "must be 256..16777216")
    check("ingest.max_samples", lambda: 1 <= ing.max_samples <= 100_000, "must be 1..100000")
    check("ingest.max_features_per_thing", lambda: 1 <= ing.max_features_per_thing <= 10_000, "must be 1..10000")
    check("ingest.max_series_per_thing", lambda: 1 <= ing.max_series_per_thing <= 1_000_000, "must be 1..1000000")
    check("ingest.dead_letter_keep", lambda: ing.dead_letter_keep >= 1, "must be >= 1")
    check("ingest.default_type", lambda: bool(TYPE_RE.match(ing.default_type)),
          "must be lowercase letters, digits, _ or - (e.g. 'oven')")
    for dev, m in (ing.devices or {}).items():
        if not isinstance(m, DeviceMapping):
            continue
        check(f"ingest.devices.{dev}.thing", isinstance(m.thing, str) and bool(EQUIPMENT_RE.match(m.thing)),
              "must be an equipment id: letters, digits, '.', '_', '-'")
        check(f"ingest.devices.{dev}.type", isinstance(m.type, str) and (not m.type or bool(TYPE_RE.match(m.type))),
              "must be lowercase letters, digits, _ or -")


def _check_discovery(cfg: GatewayConfig, check: _Checks) -> None:
    d = cfg.discovery
    check("discovery.broker_port", lambda: 0 <= d.broker_port <= 65535, "must be a TCP port 1..65535 (0: mqtt.port)")
    check("discovery.provision_timeout_s", lambda: d.provision_timeout_s > 0, "must be > 0")
    check("discovery.node_stale_s", lambda: d.node_stale_s > 0, "must be > 0")


def _check_broker(cfg: GatewayConfig, check: _Checks) -> None:
    check("broker.reload", lambda: re.fullmatch(r"((pidfile|command):.+)?", cfg.broker.reload) is not None,
          'must be "", "pidfile:PATH" or "command:ARGS"')


def _check_twin(cfg: GatewayConfig, check: _Checks) -> None:
    check("twin.flush_interval_s", lambda: 0 < cfg.twin.flush_interval_s <= 60, "must be > 0 and <= 60")


def _check_buffer(cfg: GatewayConfig, check: _Checks) -> None:
    b = cfg.buffer
    check("buffer.commit_interval_ms", lambda: 1 <= b.commit_interval_ms <= 10_000, "must be 1..10000")
    check("buffer.commit_idle_ms", lambda: 0 <= b.commit_idle_ms <= b.commit_interval_ms,
          "must be 0..buffer.commit_interval_ms", reads=("buffer.commit_interval_ms",))
    check("buffer.commit_max_points", lambda: 100 <= b.commit_max_points <= 10_000_000, "must be 100..10000000")
    check("buffer.commit_max_messages", lambda: 1 <= b.commit_max_messages <= 65_535, "must be 1..65535")
    for key in ("raw_retention_days", "rollup_1m_retention_days", "rollup_1h_retention_days"):
        check(f"buffer.{key}", lambda: getattr(b, key) > 0, "must be > 0 days")
    check("buffer.maintenance_interval_s", lambda: 0.05 <= b.maintenance_interval_s <= 3600, "must be 0.05..3600")
    check("buffer.late_s", lambda: 0 <= b.late_s <= 86_400, "must be 0..86400")
    check("buffer.disk_budget_mb", lambda: b.disk_budget_mb == 0 or b.disk_budget_mb >= 1,
          "must be 0 (no budget) or >= 1")
    check("buffer.checkpoint_mb", lambda: 1 <= b.checkpoint_mb <= 4096, "must be 1..4096")
    check("buffer.memory_limit_mb", lambda: b.memory_limit_mb == 0 or 64 <= b.memory_limit_mb <= 65536,
          "must be 0 (automatic) or 64..65536")
    for i, name in enumerate(b.context_keys or ()):
        check(f"buffer.context_keys[{i}]", lambda: bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name)),
              "must be a property name")
    for i, rule in enumerate(b.deadband or ()):
        if not isinstance(rule, DeadbandRule):
            continue
        check(f"buffer.deadband[{i}].property",
              lambda: bool(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\[\]]{0,200}", rule.property)),
              "must be a property path such as temperature or voltage.a")
        check(f"buffer.deadband[{i}].absolute", lambda: rule.absolute >= 0, "must be >= 0")
        check(f"buffer.deadband[{i}].percent", lambda: 0 <= rule.percent <= 100, "must be 0..100")
        check(f"buffer.deadband[{i}].max_interval_s", lambda: rule.max_interval_s >= 0, "must be >= 0")
        check(f"buffer.deadband[{i}]", lambda: rule.absolute > 0 or rule.percent > 0,
              "give absolute or percent (> 0)",
              reads=(f"buffer.deadband[{i}].absolute", f"buffer.deadband[{i}].percent"))


def _check_uplink(cfg: GatewayConfig, check: _Checks) -> None:
    up = cfg.uplink
    check("uplink.url", lambda: not up.url or bool(re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", up.url)),
          "must be an http:// or https:// URL (or empty: no forwarding)")
    check("uplink.token", lambda: not up.url or len(up.token) >= 16,
          "give the gateway's token (at least 16 characters) when uplink.url is set", reads=("uplink.url",))
    check("uplink.batch_points", lambda: 100 <= up.batch_points <= 1_000_000, "must be 100..1000000")
    check("uplink.live_backlog_points", lambda: up.live_backlog_points >= up.batch_points,
          "must be >= uplink.batch_points", reads=("uplink.batch_points",))
    for key in ("interval_s", "things_interval_s", "timeout_s", "retry_min_s"):
        check(f"uplink.{key}", lambda: 0 < getattr(up, key) <= 3600, "must be > 0 and <= 3600")
    check("uplink.models_interval_s", lambda: up.models_interval_s == 0 or 0.1 <= up.models_interval_s <= 86400,
          "must be 0 (never) or 0.1..86400 seconds")
    check("uplink.retry_max_s", lambda: up.retry_min_s <= up.retry_max_s <= 3600,
          "must be uplink.retry_min_s..3600", reads=("uplink.retry_min_s",))
    _check_uplink_tls(up, check)


def _check_uplink_tls(up: UplinkSection, check: _Checks) -> None:
    if not isinstance(up, UplinkSection):
        return  # the section itself was reported
    from yarl import URL

    from gateway.common.names import is_loopback
    from gateway.common.tls import check_client_files, normalise_pin

    plain = isinstance(up.url, str) and up.url.startswith("http://")
    check("uplink.url", lambda: not plain or up.allow_http is True or is_loopback(URL(up.url).host or ""),
          "plain http:// to another host sends the gateway's token and data in clear: use https:// "
          "(or set uplink.allow_http = true)", reads=("uplink.allow_http",))
    for i, pin in enumerate(up.pin_sha256 or ()):
        check(f"uplink.pin_sha256[{i}]", lambda: normalise_pin(pin) is not None,
              "must be a SHA-256 fingerprint: 64 hex digits (colons allowed)")
    check("uplink.pin_sha256", lambda: not (plain and up.pin_sha256), "pins need an https:// uplink.url",
          reads=("uplink.url",))
    check("uplink.model_signing_key", lambda: not up.model_signing_key or _public_key_ok(up.model_signing_key),
          "must be the aggregator's Ed25519 public key in base64 "
          "(`egiz aggregator signing-key` prints it)")
    names = ("uplink.ca_file", "uplink.cert_file", "uplink.key_file")
    if check.reported.isdisjoint(names) and all(isinstance(getattr(up, n.split(".")[1]), str) for n in names):
        for key, message in check_client_files("uplink", up.ca_file, up.cert_file, up.key_file):
            check.fail(key, message)


def _public_key_ok(text: str) -> bool:
    from gateway.common.signing import parse_public_key  # cryptography only when a key is configured

    try:
        parse_public_key(text)
    except ValueError:
        return False
    return True


def _check_detect(cfg: GatewayConfig, check: _Checks) -> None:
    det = cfg.detect
    check("detect.tick_ms", lambda: 5 <= det.tick_ms <= 1000, "must be 5..1000 milliseconds")
    check("detect.enter_score", lambda: 0 < det.enter_score <= 1, "must be > 0 and <= 1")
    check("detect.exit_score", lambda: 0 <= det.exit_score < det.enter_score,
          "must be >= 0 and below detect.enter_score", reads=("detect.enter_score",))
    check("detect.clear_s", lambda: 0 <= det.clear_s <= 86400, "must be 0..86400 seconds")
    check("detect.warmup_samples", lambda: 2 <= det.warmup_samples <= 100_000, "must be 2..100000")
    check("detect.learn_samples", lambda: 0 <= det.learn_samples <= 10_000_000, "must be 0..10000000")
    check("detect.z_limit", lambda: 1 <= det.z_limit <= 100, "must be 1..100")
    check("detect.model_poll_s", lambda: 0.1 <= det.model_poll_s <= 3600, "must be 0.1..3600 seconds")
    check("detect.anomaly_keep_days", lambda: det.anomaly_keep_days > 0, "must be > 0")
    if isinstance(det.rules_file, str) and det.rules_file and "detect.rules_file" not in check.reported:
        from gateway.detect.rules import RulesError, load_rules

        try:
            load_rules(Path(det.rules_file))
        except RulesError as exc:
            check.fail("detect.rules_file", str(exc))
    for i, hook in enumerate(det.webhooks or ()):
        if isinstance(hook, WebhookTarget):
            check(f"detect.webhooks[{i}].url", http_url(hook.url), "must be an http:// or https:// URL "
                  "with a host and a valid port")


def _check_ws(cfg: GatewayConfig, check: _Checks) -> None:
    check("ws.queue_size", lambda: cfg.ws.queue_size >= 1, "must be >= 1")
    check("ws.max_clients", lambda: cfg.ws.max_clients >= 1, "must be >= 1")
    check("ws.heartbeat_s", lambda: cfg.ws.heartbeat_s > 0, "must be > 0")


def _check_connectors(cfg: GatewayConfig, check: _Checks) -> None:
    from gateway.connectors.config import section_problems
    from gateway.connectors.register_map import RegisterMapError, with_register_map

    if isinstance(cfg.connectors, ConnectorsSection):
        for key, message in section_problems(cfg.connectors):
            check(key, False, message)  # a key whose type was wrong is reported once, by its type
        for proto, i, dev in cfg.connectors.all_devices():
            try:
                with_register_map(dev)
            except RegisterMapError as exc:
                for where, message in exc.problems:
                    check(f"connectors.{proto}[{i}].register_map", False, f"{where}: {message}")
            except (TypeError, AttributeError):
                pass  # a key of the wrong type, reported already


def _check_oee(cfg: GatewayConfig, check: _Checks) -> None:
    if not isinstance(cfg.oee, OeeSection):
        return
    found: list[tuple[str, str]] = []
    try:
        check_oee(cfg.oee, found)
    except (TypeError, AttributeError, ValueError):
        return  # a value of the wrong type, already reported
    for key, message in found:
        check(key, False, message)
