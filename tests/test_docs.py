"""Documentation is part of the interface: every config key, CLI command and option, and topic
must be documented, and the README's two commands must be the ones CI runs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import typer.main

from gateway.cli import app
from gateway.config import GatewayConfig, IngestSection

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def config_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and not prefix:
            keys += config_keys(typing.cast(type, tp), f.name)
        else:
            keys.append(f"{prefix}.{f.name}" if prefix else f.name)
    return keys


def test_every_config_key_is_documented() -> None:
    text = (DOCS / "config.md").read_text()
    missing = [k for k in config_keys(GatewayConfig) if f"`{k}`" not in text]
    assert not missing, f"undocumented config keys in docs/config.md: {missing}"


def test_every_aggregator_config_key_is_documented() -> None:
    from cloud_sync.config import AggregatorConfig

    text = (DOCS / "aggregator.md").read_text()
    missing = [k for k in config_keys(AggregatorConfig) if f"`{k}`" not in text]
    assert not missing, f"undocumented aggregator keys in docs/aggregator.md: {missing}"


def commands(group: Any, prefix: str = "egiz") -> list[tuple[str, Any]]:
    """Every command path of the CLI (duck-typed: typer may bring its own click)."""
    out = []
    for name, cmd in sorted(group.commands.items()):
        path = f"{prefix} {name}"
        out.append((path, cmd))
        if hasattr(cmd, "commands"):
            out += commands(cmd, path)
    return out


def test_every_cli_command_and_option_is_documented() -> None:
    text = (DOCS / "cli.md").read_text()
    root = typer.main.get_command(app)
    found = commands(root)
    assert {"egiz demo", "egiz sim", "egiz gateway run", "egiz gateway check"} <= {p for p, _ in found}
    missing = []
    for path, cmd in found:
        if f"`{path}" not in text:
            missing.append(path)
        for param in cmd.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt != "--help" and f"`{opt}" not in text:
                    missing.append(f"{path} {opt}")
    assert not missing, f"undocumented in docs/cli.md: {missing}"


def test_topics_are_documented() -> None:
    text = (DOCS / "topics.md").read_text()
    ing = IngestSection()
    for pattern in (ing.telemetry_topic, ing.status_topic, ing.command_topic, ing.command_topic + "/ack"):
        assert pattern in text, pattern


def test_readme_gives_the_two_commands_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    first_screen = "\n".join(readme.splitlines()[:40])
    assert "make demo" in first_screen and "make test" in first_screen
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1].strip() == "make test"


def test_the_fault_grammar_is_the_same_in_the_parser_and_the_docs() -> None:
    from gateway.sim import FaultSpecError, parse_faults

    with pytest.raises(FaultSpecError) as exc:
        parse_faults("nonsense")
    grammar = exc.value.reason.split()[1]
    assert grammar.startswith("KIND:") and "=MAGNITUDE" in grammar
    for page in ("cli.md", "sim.md"):
        assert grammar in (DOCS / page).read_text(), page
