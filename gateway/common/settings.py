"""Typed settings for both services: defaults < TOML file < `EGIZ_<SECTION>__<KEY>` environment < flags.

Every problem is collected and reported at once with its dotted key; unknown keys are errors so a
typo never silently falls back to a default. This is the only module that reads `os.environ`.
The sections both services share (HTTP, logging, API keys) live here too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from gateway.common.errors import ConfigError

ENV_PREFIX = "EGIZ_"
ROLES = ("viewer", "operator", "admin")
_SECRET_PART = re.compile(r"(?:^|_)(?:password|token|keys?|secret|headers)(?:$|_)")


@dataclass(frozen=True)
class ApiKey:
    """A Bearer token and the role it grants (viewer < operator < admin)."""

    key: str
    role: Literal["viewer", "operator", "admin"] = "viewer"
    name: str = ""

    def __repr__(self) -> str:  # never print secrets, even in tracebacks
        return f"ApiKey(name={self.name!r}, role={self.role!r}, key=***)"


@dataclass(frozen=True)
class HttpSection:
    host: str = "0.0.0.0"
    port: int = 8080
    tls_cert_file: str = ""  # HTTPS when given, with tls_key_file (PEM)
    tls_key_file: str = ""
    tls_client_ca_file: str = ""  # every client must present a certificate signed by this CA


@dataclass(frozen=True)
class LogSection:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "text"] = "auto"


T = TypeVar("T")


def load_config(
    cls: type[T],
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    semantics: Callable[[Any, list[tuple[str, str]]], None],
    foreign_sections: frozenset[str] = frozenset(),
) -> T:
    """Build `cls` from a TOML file, `EGIZ_*` variables and dotted-key overrides, or raise ConfigError.

    `semantics` checks what types cannot (ranges, names, cross-key rules). `EGIZ_*` variables of
    `foreign_sections` belong to the other program on the same host and are skipped.
    """
    problems: list[tuple[str, str]] = []
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError([("<file>", f"{path} does not exist")]) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([("<file>", f"{path} is not valid TOML: {exc}")]) from None
    env = os.environ if environ is None else environ
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
        if dotted.split(".", 1)[0] in foreign_sections:
            continue
        _set_dotted(data, dotted, _EnvValue(raw, name))
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(data, dotted, value)
    result = _build(cls, data, "", problems)
    if result is not None:  # also when types were wrong: report everything at once
        semantics(result, problems)
    if problems:
        raise ConfigError(problems)
    return typing.cast(T, result)


@dataclass(frozen=True)
class _EnvValue:
    """A raw string from the environment, parsed according to the target field's type."""

    raw: str
    name: str


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def _build(cls: type, data: Any, prefix: str, problems: list[tuple[str, str]]) -> Any:
    if isinstance(data, _EnvValue):
        try:
            data = json.loads(data.raw)
        except json.JSONDecodeError as exc:  # never echoed: a section can hold secrets
            problems.append((prefix or "<root>",
                             f"{data.name} must be a JSON object ({exc.msg} at character {exc.pos})"))
            return None
    if not isinstance(data, dict):
        problems.append((prefix or "<root>", f"must be a table, got {type(data).__name__}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(sorted(fields))
            problems.append((_join(prefix, key), f"unknown key (known: {known})"))
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], key, problems)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, key, problems)
            else:
                problems.append((key, "is required"))
    try:
        return cls(**kwargs)
    except TypeError:
        return None  # a missing field was already reported


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _coerce(tp: Any, value: Any, key: str, problems: list[tuple[str, str]]) -> Any:
    """Convert `value` to `tp`; environment strings are parsed, TOML values are checked strictly."""
    origin = get_origin(tp)
    if isinstance(value, _EnvValue):
        value = _parse_env(tp, value, key, problems)
        if value is _BAD:
            return None
    if dataclasses.is_dataclass(tp):
        return _build(typing.cast(type, tp), value, key, problems)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            shown = "" if is_secret(key) else f", got {value!r}"
            problems.append((key, f"must be one of {', '.join(map(str, choices))}{shown}"))
        return value
    if origin in (tuple, list):
        (item_tp, *_rest) = get_args(tp)
        if not isinstance(value, list | tuple):
            problems.append((key, f"must be a list, got {type(value).__name__}"))
            return ()
        return tuple(_coerce(item_tp, v, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if origin in (dict, Mapping):
        _k_tp, v_tp = get_args(tp)
        if not isinstance(value, dict):
            problems.append((key, f"must be a table, got {type(value).__name__}"))
            return {}
        return types.MappingProxyType(
            {str(k): _coerce(v_tp, v, f"{key}.{k}", problems) for k, v in value.items()}
        )
    if tp is bool:
        if not isinstance(value, bool):
            problems.append((key, f"must be true or false{_got(key, value)}"))
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append((key, f"must be an integer{_got(key, value)}"))
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append((key, f"must be a finite number{_got(key, value)}"))
            return value
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append((key, f"must be a string{_got(key, value)}"))
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            problems.append((key, f"must be a path string{_got(key, value)}"))
            return Path(".")
        return Path(value)
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # programming error


_BAD = object()


def is_secret(key: str) -> bool:
    """Keys whose values never appear in a message: anything under auth, passwords, tokens, keys."""
    if key == "auth" or key.startswith(("auth.", "auth[")) or ".headers" in key:
        return True
    last = re.sub(r"\[\d+\]", "", key.rsplit(".", 1)[-1])
    return bool(_SECRET_PART.search(last))


_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^/@\s:]*:)[^/@\s]+@")


def shows_secret(key: str) -> bool:
    """Leaves of a config whose values `masked` hides: passwords, tokens, keys, secrets, DSNs and
    every header value (a webhook's `Authorization`); paths to key files are not secrets."""
    last = re.sub(r"\[\d+\]", "", key.rsplit(".", 1)[-1])
    if ".headers." in key:
        return True
    if last.endswith(("_file", "_dir")):
        return False
    return last == "dsn" or bool(_SECRET_PART.search(last))


def masked(value: Any, key: str = "") -> Any:
    """Plain JSON data of a config with every secret replaced by `***`, also a password written
    into a URL (`mqtt://user:***@host`); what `egiz gateway check` and `egiz aggregator check` print."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: masked(getattr(value, f.name), f"{key}.{f.name}" if key else f.name)
                for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: masked(v, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [masked(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if value not in (None, "") and not isinstance(value, bool) and shows_secret(key):
        return "***"
    if isinstance(value, str):
        return _URL_PASSWORD.sub(r"\g<head>***@", value)
    return value


def _got(key: str, value: Any) -> str:
    """`, got <value>` for a message; only the value's type when the key holds a secret."""
    return f", got {type(value).__name__}" if is_secret(key) else f", got {value!r}"


def _parse_env(tp: Any, value: _EnvValue, key: str, problems: list[tuple[str, str]]) -> Any:
    raw = value.raw
    if tp is str or tp is Path or get_origin(tp) is Literal:
        return raw
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        problems.append((key, f"{value.name} must be true or false{_echo(key, raw)}"))
        return _BAD
    if tp is int or tp is float:
        try:
            return tp(raw)
        except ValueError:
            kind = "an integer" if tp is int else "a number"
            problems.append((key, f"{value.name} must be {kind}{_echo(key, raw)}"))
            return _BAD
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:  # the text is never echoed: it may hold keys or passwords
        problems.append((key, f"{value.name} must be JSON for this key ({exc.msg} at character {exc.pos})"))
        return _BAD


def _echo(key: str, raw: str) -> str:
    """`, got '<raw>'` for a message about an environment string, nothing when the key holds a secret."""
    return "" if is_secret(key) else f", got {raw!r}"


def check_http_tls(http: Any, problems: list[tuple[str, str]]) -> None:
    """The HTTP server's TLS files: readable, PEM, the key matching the certificate (each under its key)."""
    if not isinstance(http, HttpSection):
        return
    reported = {key for key, _ in problems}
    names = ("http.tls_cert_file", "http.tls_key_file", "http.tls_client_ca_file")
    if not reported.isdisjoint(names):
        return
    from gateway.common.tls import check_server_files  # late: the floor's TLS module is only for the sections

    problems += check_server_files("http", http.tls_cert_file, http.tls_key_file, http.tls_client_ca_file)


def http_url(value: Any) -> bool:
    from yarl import URL

    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/[^\s]*)?", value):
        return False
    try:
        u = URL(value)
        return bool(u.host) and u.port is not None and 0 < u.port < 65536
    except ValueError:
        return False
