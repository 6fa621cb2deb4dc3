"""`egiz`: the command line. Each command is the Python API plus formatting; errors become one line
on stderr and an exit code (2 for invalid configuration or arguments)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from gateway.config import GatewayConfig, load_config
from gateway.errors import ConfigError

app = typer.Typer(help="OpenEgiz Edge: digital twins for food production lines.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
gateway_app = typer.Typer(help="Run or check a line gateway.", no_args_is_help=True)
app.add_typer(gateway_app, name="gateway")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="gateway TOML file", exists=False)]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"egiz: {message}", err=True)
    raise typer.Exit(code)


def load_gateway_config(path: Path | None, overrides: dict[str, Any]) -> GatewayConfig:
    """Load and validate, or exit 2 listing every problem with its dotted key."""
    try:
        return load_config(GatewayConfig, path, overrides=overrides)
    except ConfigError as exc:
        lines = "\n".join(f"  {key}: {msg}" for key, msg in exc.problems)
        fail(f"invalid configuration{f' in {path}' if path else ''}:\n{lines}")


@gateway_app.command("run")
def gateway_run(
    config: ConfigOpt,
    http_port: Annotated[int | None, typer.Option(help="override http.port")] = None,
    mqtt_host: Annotated[str | None, typer.Option(help="override mqtt.host")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="override mqtt.port")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="override gateway.data_dir")] = None,
) -> None:
    """Run the gateway until SIGTERM/SIGINT."""
    cfg = load_gateway_config(config, {
        "http.port": http_port, "mqtt.host": mqtt_host, "mqtt.port": mqtt_port,
        "gateway.data_dir": str(data_dir) if data_dir else None,
    })
    from gateway.logs import setup_logging
    from gateway.service import GatewayService

    setup_logging(cfg.log.level, cfg.log.format)
    asyncio.run(GatewayService(cfg).run_until_signalled())


@gateway_app.command("check")
def gateway_check(config: ConfigOpt) -> None:
    """Validate a config file (with EGIZ_* overrides) and print the effective values, secrets masked."""
    cfg = load_gateway_config(config, {})
    typer.echo(json.dumps(_masked(dataclasses.asdict(cfg)), indent=2, default=str))


def _masked(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _masked(v, k) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_masked(v, key) for v in value]
    if key in ("password", "key", "token") and value:
        return "***"
    return value


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
