"""The aggregator's typed configuration: same rules as the gateway's (TOML < `EGIZ_*` < flags)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.common.names import SITE_RE as NAME_RE
from gateway.common.names import is_loopback
from gateway.common.settings import ApiKey, HttpSection, LogSection, check_http_tls, load_config

GATEWAY_SECTIONS = frozenset({"gateway", "mqtt", "ingest", "twin", "ws", "buffer", "uplink"})


@dataclass(frozen=True)
class GatewayToken:
    """What one gateway may write: its own site and line, with its own token."""

    gateway: str
    token: str
    site: str
    line: str

    def __repr__(self) -> str:
        return f"GatewayToken(gateway={self.gateway!r}, site={self.site!r}, line={self.line!r}, token=***)"


@dataclass(frozen=True)
class AggregatorSection:
    data_dir: Path = Path("/var/lib/egiz-aggregator")
    ingest_concurrency: int = 4  # batches applied at once; more get 503 with Retry-After
    max_batch_mb: float = 64.0
    summary_interval_s: float = 2.0  # WebSocket site summaries
    offline_after_s: float = 60.0  # a gateway not heard from this long is shown offline
    ws_max_clients: int = 200  # WebSocket clients at once; more are refused with 503
    model_signing_key_file: str = ""  # Ed25519 key that signs published models; "": <data_dir>/model-signing.key


@dataclass(frozen=True)
class StorageSection:
    backend: Literal["duckdb", "postgres"] = "duckdb"
    dsn: str = ""  # postgres: e.g. "postgresql://egiz@db/egiz"
    partition_days: int = 1  # postgres: one points partition per this many days
    max_partitions_per_batch: int = 16  # postgres: partitions one batch may span; more: 400
    memory_limit_mb: int = 2048  # duckdb: DuckDB's memory limit (its cache of the points file is bounded by it)

    def __repr__(self) -> str:
        return f"StorageSection(backend={self.backend!r}, dsn=***)"


@dataclass(frozen=True)
class AggregatorAuth:
    api_keys: tuple[ApiKey, ...] = ()
    open: bool = False  # demo only: every API request is admin (gateways still need their tokens)
    open_remote: bool = False  # allow open mode on an address other than loopback (refused otherwise)
    gateway_tokens: tuple[GatewayToken, ...] = ()


@dataclass(frozen=True)
class AggregatorConfig:
    """The whole aggregator configuration, frozen after validation."""

    @property
    def model_signing_key_file(self) -> Path:
        a = self.aggregator
        return Path(a.model_signing_key_file) if a.model_signing_key_file else Path(a.data_dir) / "model-signing.key"

    aggregator: AggregatorSection = field(default_factory=AggregatorSection)
    http: HttpSection = field(default_factory=lambda: HttpSection(port=8090))
    storage: StorageSection = field(default_factory=StorageSection)
    auth: AggregatorAuth = field(default_factory=AggregatorAuth)
    log: LogSection = field(default_factory=LogSection)


def load_aggregator_config(path: Path | None = None, *, environ: Mapping[str, str] | None = None,
                           overrides: Mapping[str, Any] | None = None) -> AggregatorConfig:
    """Build the aggregator's config or raise ConfigError listing every problem."""
    return load_config(AggregatorConfig, path, environ=environ, overrides=overrides, semantics=_check,
                       foreign_sections=GATEWAY_SECTIONS)


def _check(cfg: Any, problems: list[tuple[str, str]]) -> None:
    if not isinstance(cfg, AggregatorConfig):
        return
    reported = {key for key, _ in problems}

    def check(key: str, ok: Callable[[], bool], message: str) -> None:
        if key in reported:
            return
        try:
            good = ok()
        except (TypeError, AttributeError, ValueError):
            return
        if not good:
            problems.append((key, message))
            reported.add(key)

    a, st, auth = cfg.aggregator, cfg.storage, cfg.auth
    check("aggregator.ingest_concurrency", lambda: 1 <= a.ingest_concurrency <= 64, "must be 1..64")
    check("aggregator.max_batch_mb", lambda: 1 <= a.max_batch_mb <= 1024, "must be 1..1024")
    check("aggregator.summary_interval_s", lambda: 0.1 <= a.summary_interval_s <= 3600, "must be 0.1..3600")
    check("aggregator.offline_after_s", lambda: a.offline_after_s > 0, "must be > 0")
    check("http.port", lambda: 0 <= cfg.http.port <= 65535, "must be a TCP port 0..65535 (0: any free port)")
    check_http_tls(cfg.http, problems)
    check("storage.dsn", lambda: st.backend != "postgres" or st.dsn.startswith(("postgresql://", "postgres://")),
          "give a postgresql:// DSN when storage.backend = \"postgres\"")
    check("storage.partition_days", lambda: 1 <= st.partition_days <= 31, "must be 1..31")
    check("storage.memory_limit_mb", lambda: 64 <= st.memory_limit_mb <= 1_048_576, "must be 64..1048576 (MB)")
    check("storage.max_partitions_per_batch", lambda: 1 <= st.max_partitions_per_batch <= 1000, "must be 1..1000")
    check("aggregator.ws_max_clients", lambda: 1 <= a.ws_max_clients <= 100_000, "must be 1..100000")
    check("auth.open", lambda: not auth.open or auth.open_remote or is_loopback(cfg.http.host),
          f"open mode (no API keys) listens only on a loopback address, not {cfg.http.host!r}; "
          "set auth.open_remote = true to force it")
    check("auth.api_keys", lambda: auth.open or bool(auth.api_keys),
          "give at least one key (or set auth.open = true for a demo)")
    for i, k in enumerate(auth.api_keys or ()):
        check(f"auth.api_keys[{i}].key", lambda: isinstance(k.key, str) and len(k.key) >= 16,
              "must be at least 16 characters")
    seen: set[str] = set()
    tokens: dict[str, str] = {}
    for i, g in enumerate(auth.gateway_tokens or ()):
        if not isinstance(g, GatewayToken):
            continue
        for part in ("gateway", "site", "line"):
            check(f"auth.gateway_tokens[{i}].{part}", lambda: bool(NAME_RE.fullmatch(getattr(g, part))),
                  "must be 1-63 chars of a-z, 0-9, '.', '_', '-'")
        check(f"auth.gateway_tokens[{i}].token", lambda: len(g.token) >= 16,
              "must be at least 16 characters")
        check(f"auth.gateway_tokens[{i}].gateway", lambda: g.gateway not in seen,
              "is listed twice")
        check(f"auth.gateway_tokens[{i}].token", lambda: not isinstance(g.token, str) or g.token not in tokens,
              f"is the same token as gateway {tokens.get(g.token, '')!r}'s: each gateway needs its own")
        seen.add(g.gateway)
        if isinstance(g.token, str):
            tokens.setdefault(g.token, g.gateway)

