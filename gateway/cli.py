"""`egiz`: the command line. Each command is the Python API plus formatting; errors become one line
on stderr and an exit code (2 for invalid configuration or arguments)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from gateway.common.errors import ConfigError
from gateway.common.names import THING_ID_RE, TYPE_RE
from gateway.config import AGGREGATOR_SECTIONS, GatewayConfig, load_config
from images.cli import image_app

app = typer.Typer(help="OpenEgiz Edge: digital twins for food production lines.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)


def command_group(name: str, help: str) -> typer.Typer:
    """The commands under `egiz <name>`; `egiz <name>` alone shows their help."""
    group = typer.Typer(help=help, no_args_is_help=True)
    app.add_typer(group, name=name)
    return group


gateway_app = command_group("gateway", "Run or check a line gateway.")
app.add_typer(image_app, name="image")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="TOML config file", exists=False)]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"egiz: {message}", err=True)
    raise typer.Exit(code)


def load_gateway_config(path: Path | None, overrides: dict[str, Any]) -> GatewayConfig:
    """Load and validate, or exit 2 listing every problem with its dotted key."""
    try:
        return load_config(GatewayConfig, path, overrides=overrides, foreign_sections=AGGREGATOR_SECTIONS)
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
    from gateway.common.logs import setup_logging
    from gateway.service import GatewayService

    setup_logging(cfg.log.level, cfg.log.format)
    try:
        asyncio.run(GatewayService(cfg).run_until_signalled())
    except (OSError, sqlite3.DatabaseError) as exc:  # port in use, unreadable data dir, corrupt file
        fail(f"cannot start the gateway: {exc}", code=1)


@gateway_app.command("broker-files")
def gateway_broker_files(config: ConfigOpt) -> None:
    """Write Mosquitto's password and ACL files (the gateway's user and every approved node) before the
    broker first starts; a running gateway rewrites them itself whenever a node is approved or rejected."""
    from gateway.provision import NodeStore, ProvisionError, write_broker_files

    cfg = load_gateway_config(config, {})
    store = NodeStore(Path(cfg.gateway.data_dir) / "nodes.sqlite")
    try:
        nodes = store.all()
        write_broker_files(cfg, nodes)
    except ProvisionError as exc:
        fail(str(exc), code=1)
    finally:
        store.close()
    approved = sum(n.state == "approved" for n in nodes)
    typer.echo(f"wrote {cfg.password_file} and {cfg.acl_file}: the gateway's user and {approved} approved node(s)")


@gateway_app.command("check")
def gateway_check(config: ConfigOpt) -> None:
    """Validate a config file (with EGIZ_* overrides) and print the effective values, secrets masked."""
    cfg = load_gateway_config(config, {})
    typer.echo(json.dumps(_masked(cfg), indent=2, default=str))


aggregator_app = command_group("aggregator", "Run or check the central aggregator.")


def load_aggregator(path: Path | None, overrides: dict[str, Any]) -> Any:
    from cloud_sync.config import load_aggregator_config

    try:
        return load_aggregator_config(path, overrides=overrides)
    except ConfigError as exc:
        fail("invalid configuration:\n" + "\n".join(f"  {key}: {msg}" for key, msg in exc.problems))


@aggregator_app.command("run")
def aggregator_run(
    config: ConfigOpt,
    http_port: Annotated[int | None, typer.Option(help="override http.port")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="override aggregator.data_dir")] = None,
) -> None:
    """Run the aggregator until SIGTERM/SIGINT."""
    cfg = load_aggregator(config, {"http.port": http_port,
                                   "aggregator.data_dir": str(data_dir) if data_dir else None})
    from cloud_sync.aggregator import Aggregator
    from gateway.common.logs import setup_logging

    setup_logging(cfg.log.level, cfg.log.format)
    from gateway.common.signing import SignatureError

    try:
        asyncio.run(Aggregator(cfg).run_until_signalled())
    except (OSError, SignatureError) as exc:
        fail(f"cannot start the aggregator: {exc}", code=1)


@aggregator_app.command("check")
def aggregator_check(config: ConfigOpt) -> None:
    """Validate an aggregator config (with EGIZ_* overrides) and print it, secrets masked."""
    cfg = load_aggregator(config, {})
    typer.echo(json.dumps(_masked(cfg), indent=2, default=str))


@aggregator_app.command("signing-key")
def aggregator_signing_key(config: ConfigOpt) -> None:
    """Print the public key gateways check models with (`uplink.model_signing_key`); makes the key pair
    (aggregator.model_signing_key_file, 0600) when it does not exist yet."""
    cfg = load_aggregator(config, {})
    from gateway.common.signing import SignatureError, load_or_create_key, public_key_text

    try:
        typer.echo(public_key_text(load_or_create_key(cfg.model_signing_key_file)))
    except (SignatureError, OSError) as exc:
        fail(str(exc), code=1)


def _masked(value: Any) -> Any:
    """Plain JSON data of a config, with secrets replaced by ***."""
    from gateway.common.settings import masked

    return masked(value)


pki_app = command_group("pki", "The site's certificate authority: make it, issue certificates, list them.")
PkiDirOpt = Annotated[Path, typer.Option("--dir", help="where the CA and the certificates are kept")]


@pki_app.command("init")
def pki_init(
    directory: PkiDirOpt = Path("pki"),
    name: Annotated[str, typer.Option(help="the CA's common name, e.g. the site's")] = "OpenEgiz site CA",
    days: Annotated[int, typer.Option(min=1, max=36500, help="validity in days")] = 3650,
) -> None:
    """Make a site CA: ca.crt (give it to every client) and ca.key (0600; keep it offline)."""
    from gateway.common.pki import PkiError, init_ca

    try:
        path = init_ca(directory, name, days=days)
    except PkiError as exc:
        fail(exc.detail)
    typer.echo(f"wrote {path} and {path.with_name('ca.key')} (0600)")


@pki_app.command("issue")
def pki_issue(
    name: Annotated[str, typer.Argument(help="the certificate's name: files NAME.crt and NAME.key, its CN")],
    directory: PkiDirOpt = Path("pki"),
    kind: Annotated[str, typer.Option(help="server, client or both")] = "server",
    dns: Annotated[list[str] | None, typer.Option("--dns", help="a DNS name it serves (repeat)")] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="an IP address it serves (repeat)")] = None,
    days: Annotated[int, typer.Option(min=1, max=3650, help="validity in days")] = 825,
) -> None:
    """Issue a server or client certificate signed by the site CA (key 0600)."""
    from gateway.common.pki import PkiError, issue

    if kind not in ("server", "client", "both"):
        fail("--kind must be server, client or both")
    try:
        cert, key = issue(directory, name, kind=kind, dns=tuple(dns or ()), ips=tuple(ip or ()),  # type: ignore[arg-type]
                          days=days)
    except PkiError as exc:
        fail(exc.detail)
    typer.echo(f"wrote {cert} and {key} (0600)")


@pki_app.command("list")
def pki_list(directory: PkiDirOpt = Path("pki"),
             as_json: Annotated[bool, typer.Option("--json", help="one JSON object per certificate")] = False) -> None:
    """Every certificate in the directory: subject, kind, SANs, expiry, SHA-256 fingerprint."""
    from gateway.common.pki import PkiError, list_certificates

    try:
        certs = list_certificates(directory)
    except PkiError as exc:
        fail(exc.detail)
    for c in certs:
        sans = [*c.dns, *c.ips]
        if as_json:
            typer.echo(json.dumps({"file": c.path.name, "subject": c.subject, "issuer": c.issuer, "kind": c.kind,
                                   "dns": list(c.dns), "ips": list(c.ips), "not_after": c.not_after.isoformat(),
                                   "days_left": c.days_left, "sha256": c.sha256}))
        else:
            typer.echo(f"{c.path.name:24} {c.kind:14} {c.subject:36} SANs: {', '.join(sans) or '-':30} "
                       f"expires {c.not_after:%Y-%m-%d} ({c.days_left} days)  sha256 {c.sha256}")


model_app = command_group("model", "Train, evaluate, list, activate and roll back anomaly models.")
DataDirOpt = Annotated[Path, typer.Option(help="the gateway's data directory (stopped, or a copy)")]
ModelsDirOpt = Annotated[Path | None, typer.Option(help="model registry (default: DATA_DIR/models)")]


def _times(start: str | None, end: str | None, default_span_s: float) -> tuple[float, float]:
    import time

    from gateway.common.errors import Invalid
    from gateway.common.history import parse_time

    try:
        b = parse_time(end, "--to") if end else time.time()
        a = parse_time(start, "--from") if start else b - default_span_s
    except Invalid as exc:
        fail(exc.detail)
    if not a < b:
        fail("--from must be before --to")
    return a, b


@model_app.command("train")
def model_train(
    data_dir: Annotated[Path | None, typer.Option(help="a gateway's (or DuckDB aggregator's) data directory, "
                                                       "stopped or copied")] = None,
    source_url: Annotated[str | None, typer.Option(help="or: a running gateway or aggregator to read history "
                                                        "from over its API (across every line there)")] = None,
    api_key: Annotated[str | None, typer.Option(envvar="EGIZ_API_KEY", help="viewer key for --source-url")] = None,
    types: Annotated[list[str] | None, typer.Option("--type", help="equipment type (repeat; default: every "
                                                                   "type in the data directory)")] = None,
    start: Annotated[str | None, typer.Option("--from", help="ISO 8601 or epoch (default: 7 days before --to)")]
        = None,
    end: Annotated[str | None, typer.Option("--to", help="ISO 8601 or epoch (default: now)")] = None,
    models_dir: ModelsDirOpt = None,
    truth: Annotated[Path | None, typer.Option(help="ground truth whose faults are left out, like anomalies")]
        = None,
    activate: Annotated[bool, typer.Option(help="make the new versions active (a running gateway picks them "
                                                "up within detect.model_poll_s)")] = False,
    ignore: Annotated[list[str] | None, typer.Option(help="properties left out of the models, as the gateway's "
                                                          "detect.ignore (repeat; default *setpoint*)")] = None,
) -> None:
    """Train ONNX models (autoencoder + Isolation Forest) per equipment type on normal stored history."""
    from rich.console import Console

    from gateway.detect.evaluate import TruthError
    from gateway.detect.models import ModelError
    from gateway.detect.offline import OfflineError, read_points, train_from_history

    try:
        import skl2onnx  # noqa: F401
        import sklearn  # noqa: F401  (the `train` extra)
    except ImportError:
        fail("training needs the train extra: pip install 'openegiz[train]'", code=1)
    if (data_dir is None) == (source_url is None):
        fail("give either --data-dir or --source-url")
    if source_url is not None and not (types and api_key and models_dir):
        fail("--source-url needs --type, --api-key (or EGIZ_API_KEY) and --models-dir")
    a, b = _times(start, end, 7 * 86400)
    models = models_dir or (data_dir or Path(".")) / "models"
    source = (source_url, api_key or "") if source_url is not None else None
    console = Console(stderr=True)
    try:
        wanted = types or sorted(set(read_points(data_dir or Path("."), a, b).column("type").to_pylist()))
        if not wanted:
            fail("no stored history in that range")
        for ttype in wanted:
            with console.status(f"{ttype}: starting") as status:
                def say(message: str, ttype: str = ttype) -> None:
                    status.update(f"{ttype}: {message}")

                directory = train_from_history(data_dir, ttype, a, b, models, truth=truth, activate=activate,
                                               progress=say, ignore=tuple(ignore or ("*setpoint*",)), source=source)
            man = json.loads((directory / "model.json").read_text())
            typer.echo(json.dumps({"type": ttype, "version": directory.name, "rows": man["data"]["rows"],
                                   "features": len(man["features"]), "agreement": man["agreement"],
                                   "active": activate, "path": str(directory)}))
    except (OfflineError, ModelError, TruthError) as exc:
        fail(str(exc), code=1)
    except OSError as exc:
        fail(f"cannot write the model: {exc}", code=1)


@model_app.command("list")
def model_list(data_dir: DataDirOpt, models_dir: ModelsDirOpt = None) -> None:
    """Every model version per type; the active one is marked."""
    from gateway.detect.models import ModelRegistry

    reg = ModelRegistry(models_dir or data_dir / "models")
    for ttype in reg.types():
        for v in reg.versions(ttype):
            mark = "*" if v.active else " "
            extra = f"  ERROR {v.error}" if v.error else f"  rows {v.rows}  data {v.data_from} .. {v.data_to}"
            typer.echo(f"{mark} {ttype:10} {v.version:40} {v.created:20} {v.hash}{extra}")


@model_app.command("activate")
def model_activate(data_dir: DataDirOpt, thing_type: Annotated[str, typer.Option("--type")],
                   version: Annotated[str, typer.Option()], models_dir: ModelsDirOpt = None) -> None:
    """Check a version completely and make it active; a refused one leaves the active version in force."""
    from gateway.detect.models import ModelError, ModelRegistry

    try:
        ModelRegistry(models_dir or data_dir / "models").activate(thing_type, version)
    except ModelError as exc:
        fail(f"refused: {exc}", code=1)
    typer.echo(f"{thing_type}: {version} is active")


@model_app.command("rollback")
def model_rollback(data_dir: DataDirOpt, thing_type: Annotated[str, typer.Option("--type")],
                   models_dir: ModelsDirOpt = None) -> None:
    """Back to the previous version of a type."""
    from gateway.detect.models import ModelError, ModelRegistry

    try:
        bundle = ModelRegistry(models_dir or data_dir / "models").rollback(thing_type)
    except ModelError as exc:
        fail(str(exc), code=1)
    typer.echo(f"{thing_type}: {bundle.version} is active")


@model_app.command("eval")
def model_eval(
    data_dir: DataDirOpt,
    truth: Annotated[Path, typer.Option(help="labelled ground truth (JSON lines: thing, fault, start, end)")],
    start: Annotated[str | None, typer.Option("--from", help="default: the first fault minus an hour")] = None,
    end: Annotated[str | None, typer.Option("--to", help="default: the last fault's end plus 5 minutes")] = None,
    models_dir: ModelsDirOpt = None,
    rules: Annotated[Path | None, typer.Option(help="rules file (default: the built-in rules)")] = None,
    models: Annotated[bool, typer.Option(help="use the active models (--no-models: rules and statistics only)")]
        = True,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as one JSON object")] = False,
) -> None:
    """Replay stored history through the detector and score it: precision, recall, F1, false-positive rate
    and detection delay, overall and per fault kind."""
    from gateway.detect.evaluate import TruthError, read_truth
    from gateway.detect.offline import OfflineError, evaluate_history
    from gateway.detect.rules import RulesError

    try:
        records = read_truth(truth)
    except TruthError as exc:
        fail(str(exc))
    if not records and not (start and end):
        fail(f"{truth} holds no faults; give --from and --to to measure false positives alone")
    if start is None and records:
        start = str(min(r.start for r in records) - 3600)
    if end is None and records:
        end = str(max(r.end for r in records) + 300)
    a, b = _times(start, end, 3600)
    try:
        report, _anomalies, used = evaluate_history(data_dir, truth, a, b, models_dir or data_dir / "models",
                                                   rules_file=rules, use_models=models)
    except (OfflineError, RulesError) as exc:
        fail(str(exc), code=1)
    doc = {**report.to_json(), "models": used}
    if as_json:
        typer.echo(json.dumps(doc))
        return
    typer.echo(f"models: {', '.join(used) or 'none (rules and statistics only)'}")
    typer.echo(f"precision {doc['precision']:.3f}  recall {doc['recall']:.3f}  F1 {doc['f1']:.3f}  "
               f"false-positive rate {doc['false_positive_rate']:.4f} of {doc['normal_windows']} normal windows  "
               f"median delay {doc['median_delay_s']} s")
    typer.echo(f"{'fault':18} {'faults':>6} {'found':>6} {'recall':>7} {'median delay s':>15}")
    for kind, row in doc["per_fault"].items():
        typer.echo(f"{kind:18} {row['faults']:>6} {row['found']:>6} {row['recall']:>7.3f} "
                   f"{row['median_delay_s'] if row['median_delay_s'] is not None else '-':>15}")


connectors_app = command_group("connectors", "Find what to configure for PLC connectors.")


@connectors_app.command("browse")
def connectors_browse(
    url: Annotated[str, typer.Argument(help="the OPC UA server, opc.tcp://host:port")],
    node: Annotated[str, typer.Option(help="start here (default: the Objects folder)")] = "i=85",
    depth: Annotated[int, typer.Option(min=1, max=20, help="levels below the start node")] = 4,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="stop after this many nodes")] = 2000,
    username: Annotated[str | None, typer.Option(help="log in as this user")] = None,
    password: Annotated[str | None, typer.Option(envvar="EGIZ_OPCUA_PASSWORD", help="the user's password")] = None,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds per request")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per node")] = False,
) -> None:
    """List an OPC UA server's variables with their node ids, types and current values (the `node` of a tag)."""
    import re

    from gateway.connectors.base import DeviceError
    from gateway.connectors.opcua import BrowseOptions, browse

    if not re.fullmatch(r"opc\.tcp://[^\s/:]+(:\d{1,5})?(/\S*)?", url):
        fail(f"{url!r} is not an OPC UA address (opc.tcp://host:port)")
    if (username is None) != (password is None):
        fail("--username and --password (or EGIZ_OPCUA_PASSWORD) go together")
    opts = BrowseOptions(url, start=node, depth=depth, username=username or "", password=password or "",
                         timeout_s=timeout, limit=limit)
    try:
        found = asyncio.run(browse(opts))
    except DeviceError as exc:
        fail(f"{url}: {exc.reason}: {exc.detail}", code=1)
    if as_json:
        for n in found:
            typer.echo(json.dumps(dataclasses.asdict(n)))
        return
    width = max((len(n.node) for n in found), default=10)
    for n in found:
        if n.node_class == "Variable":
            typer.echo(f"{n.node:<{width}}  {n.path}  {n.datatype}{' rw' if n.writable else ''}  {n.value}")
        else:
            typer.echo(f"{n.node:<{width}}  {n.path}/  ({n.node_class})")
    if len(found) >= limit:
        typer.echo(f"(stopped after {limit} nodes: use --node, --depth or --limit)", err=True)


@model_app.command("backtest")
def model_backtest(
    directory: Annotated[Path | None, typer.Argument(help="every CSV under it (recursively) is one Thing: its "
                                                          "first --train-rows rows train, the rest are replayed")]
        = None,
    train_rows: Annotated[int | None, typer.Option(help="rows of each file that train (with DIRECTORY)")] = None,
    train: Annotated[Path | None, typer.Option(help="a CSV of normal operation to train on")] = None,
    test: Annotated[Path | None, typer.Option(help="a CSV to replay after TRAIN and label")] = None,
    out: Annotated[Path | None, typer.Option(help="where to write time,score,anomaly per TEST row")] = None,
    thing_type: Annotated[str, typer.Option("--type", help="equipment type of the trained version")]
        = "equipment",
    as_json: Annotated[Path | None, typer.Option("--json", help="also write the whole report as JSON here")]
        = None,
) -> None:
    """How the gateway's detector would have done on labelled history exported as CSV: train a model version
    with the project's training code, replay through the gateway's detector, score point-wise and per event."""
    from rich.console import Console
    from rich.progress import Progress

    from gateway.common.timefmt import iso_utc
    from gateway.detect.backtest import (
        BacktestError,
        BacktestReport,
        backtest_directory,
        backtest_series,
        csv_files,
        read_series,
    )
    from gateway.detect.models import ModelError

    try:
        import sklearn  # noqa: F401  (the `train` extra)
    except ImportError:
        fail("backtests train a model and need the train extra: pip install 'openegiz[train]'", code=1)
    if not TYPE_RE.match(thing_type):
        fail(f"--type {thing_type!r}: a lower-case letter, then letters, digits, - and _")
    report = BacktestReport()
    try:
        if directory is not None:
            if train is not None or test is not None or out is not None:
                fail("give either DIRECTORY with --train-rows, or --train, --test and --out")
            if train_rows is None or train_rows < 1:
                fail("DIRECTORY needs --train-rows N (N >= 1)")
            if not directory.is_dir():
                fail(f"{directory} is not a directory")
            files = csv_files(directory)
            with Progress(console=Console(stderr=True), transient=True) as bar:
                task = bar.add_task("backtest", total=len(files))

                done = [0]

                def step(name: str) -> None:
                    bar.update(task, description=name, completed=done[0])
                    done[0] += 1

                report = backtest_directory(directory, train_rows, thing_type, files=files, progress=step)
                bar.update(task, completed=len(files))
        else:
            if train is None or test is None or out is None:
                fail("give --train, --test and --out (or DIRECTORY with --train-rows)")
            series = read_series(test)
            result, scores, labels = backtest_series(read_series(train), series, thing_type)
            report.files.append(result)
            with open(out, "w", encoding="utf-8") as f:
                f.write("time,score,anomaly\n")
                for ts, sc, lab in zip(series.times.tolist(), scores.tolist(), labels.tolist(), strict=True):
                    f.write(f"{iso_utc(ts)},{sc:.4f},{lab}\n")
    except (BacktestError, ModelError) as exc:
        fail(str(exc), code=1)
    except OSError as exc:
        fail(f"cannot write: {exc}", code=1)
    doc = report.to_json()
    if as_json is not None:
        as_json.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    typer.echo(f"pooled over {doc['test_rows']} test rows of {doc['files']} files: F1 {doc['f1']:.3f}  "
               f"FAR {doc['far_pct']:.2f} %  MAR {doc['mar_pct']:.2f} %")
    delay = doc["mean_detection_delay_s"]
    typer.echo(f"events {doc['events_found']}/{doc['events']} found, mean detection delay "
               f"{'-' if delay is None else f'{delay} s'}, alarms per changepoint {doc['alarms_per_changepoint']}, "
               f"false alarms per hour of normal operation {doc['false_alarms_per_hour']}")
    typer.echo(f"training {doc['train_s_per_file']} s per file, detector {doc['readings_per_s']} readings/s")
    typer.echo(f"{'file':24} {'test rows':>9} {'F1':>6} {'FAR %':>7} {'MAR %':>7} {'found':>6} {'delay s':>8} "
               f"{'false alarms':>12}")
    for row in doc["per_file"]:
        d = row["delays_s"]
        typer.echo(f"{row['file']:24} {row['test_rows']:>9} {row['f1']:>6.3f} {row['far_pct']:>7.2f} "
                   f"{row['mar_pct']:>7.2f} {row['found']:>3}/{row['events']:<2} "
                   f"{(f'{d[0]:.0f}' if d else '-'):>8} {row['false_alarms']:>12}")
    normal = doc["unlabelled"]
    if normal is not None:
        typer.echo(f"without labels, taken as normal operation ({', '.join(normal['files'])}): "
                   f"{normal['test_rows']} rows, FAR {normal['far_pct']:.2f} %, "
                   f"false alarms per hour {normal['false_alarms_per_hour']}")


history_app = command_group("history", "Put history into a gateway's buffer.")


@history_app.command("import")
def history_import(
    file: Annotated[Path, typer.Argument(help="a CSV: a time column and numeric columns (labels are left out)")],
    thing: Annotated[str, typer.Option("--thing", help="the Thing id the readings belong to, site:equipment")],
    data_dir: Annotated[Path, typer.Option(help="the gateway's data directory (stopped, or a copy)")],
    thing_type: Annotated[str, typer.Option("--type", help="its equipment type")] = "equipment",
) -> None:
    """Import a CSV of history into a gateway's buffer, so it trains through `egiz model train` and shows in
    the viewer's history; the `anomaly` and `changepoint` columns are labels and are not imported."""
    from gateway.detect.backtest import BacktestError
    from gateway.detect.offline import OfflineError, import_csv

    if not THING_ID_RE.match(thing):
        fail(f"--thing {thing!r}: expected site:equipment_id")
    if not TYPE_RE.match(thing_type):
        fail(f"--type {thing_type!r}: a lower-case letter, then letters, digits, - and _")
    try:
        n = import_csv(data_dir, file, thing, thing_type)
    except (BacktestError, OfflineError) as exc:
        fail(str(exc), code=1)
    typer.echo(json.dumps({"thing": thing, "type": thing_type, "readings": n}))


@app.command("sim")
def sim(
    site: Annotated[str, typer.Option(help="site of the simulated nodes (Thing ids are site:equipment)")],
    line: Annotated[str, typer.Option(help="production line")] = "line-a",
    nodes: Annotated[int, typer.Option(min=1, max=100_000, help="number of nodes")] = 10,
    rate: Annotated[float, typer.Option(min=0.001, max=1000, help="readings per second per node")] = 1.0,
    faults: Annotated[str, typer.Option(help="fault spec, e.g. 'overtemperature:oven-001@30+60,random:2'")] = "",
    truth: Annotated[Path | None, typer.Option(help="write fault ground truth here (JSON lines)")] = None,
    duration: Annotated[float | None, typer.Option(min=0.1, help="stop after this many seconds")] = None,
    batch: Annotated[int, typer.Option(min=1, max=1000, help="samples per message (batched payloads)")] = 1,
    seed: Annotated[int | None, typer.Option(help="random seed for reproducible runs")] = None,
    shared_connection: Annotated[bool, typer.Option(help="one MQTT connection for all nodes")] = False,
    host: Annotated[str, typer.Option(help="MQTT broker host")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="MQTT broker port")] = 1883,
    username: Annotated[str | None, typer.Option(help="MQTT user name")] = None,
    password: Annotated[str | None, typer.Option(envvar="EGIZ_SIM_PASSWORD", help="MQTT password")] = None,
    time_scale: Annotated[float, typer.Option(min=0.001, help="simulated seconds per real second")] = 1.0,
    types: Annotated[str, typer.Option(help="equipment types to cycle through, comma-separated")] =
        "oven,mixer,conveyor,proofer,cooler",
    into: Annotated[Path | None, typer.Option(help="no broker: write --duration seconds of simulated history "
                                              "straight into this gateway data directory, as fast as possible")] = None,
    start: Annotated[str | None, typer.Option(help="with --into: when the history begins (ISO 8601 or epoch; "
                                              "default: --duration before now)")] = None,
    provision: Annotated[bool, typer.Option(help="like real nodes: advertise on the network, wait until the "
                                            "gateway approves each node, then publish with its own credentials "
                                            "to the broker the gateway names")] = False,
    advertise_address: Annotated[str, typer.Option(help="with --provision: the address to advertise and serve "
                                                   "on ('': this host's first address)")] = "",
    production: Annotated[bool, typer.Option(help="also publish each machine's PLC production feature: state, "
                                             "good and reject counters, recipe (for OEE)")] = False,
    plc: Annotated[str, typer.Option(help="serve the machines as PLCs instead of MQTT nodes: modbus (one unit id "
                                     "per machine; prints the gateway's [[connectors.modbus]] tables), or opcua "
                                     "or s7 (one PLC in front of one --plc-type machine)")] = "",
    plc_port: Annotated[int, typer.Option(min=0, max=65535, help="with --plc: the port to serve on (0: the "
                                          "protocol's own, Modbus 5020, OPC UA 4840, S7 102)")] = 0,
    plc_host: Annotated[str, typer.Option(help="with --plc: the address to serve on")] = "127.0.0.1",
    plc_type: Annotated[str, typer.Option(help="with --plc opcua|s7: the machine behind it, proofer or oven")]
        = "proofer",
    plc_id: Annotated[str, typer.Option(help="with --plc opcua|s7: its equipment id (default: {type}-201)")] = "",
    plc_security: Annotated[str, typer.Option(help="with --plc opcua: security modes offered, comma-separated "
                                              "(None, Sign, SignAndEncrypt; the latter two are Basic256Sha256)")]
        = "None",
    plc_user: Annotated[str | None, typer.Option(help="with --plc opcua: require this user (no anonymous login)")]
        = None,
    plc_password: Annotated[str | None, typer.Option(envvar="EGIZ_SIM_PLC_PASSWORD",
                                                     help="with --plc-user: its password")] = None,
    plc_cert_dir: Annotated[Path, typer.Option(help="with --plc opcua and security: where the server's "
                                               "self-signed certificate is kept")] = Path("opcua-sim-pki"),
) -> None:
    """Simulate a line of ESP32 nodes publishing telemetry (with optional faults) until Ctrl-C; or, with
    --plc, one PLC (OPC UA or S7 server) in front of a proofer or oven."""
    from gateway.sim import FleetOptions, parse_faults
    from gateway.sim.equipment import EQUIPMENT_TYPES

    try:
        fault_specs = parse_faults(faults)
    except ValueError as exc:
        fail(f"--faults: {exc}")
    if plc and plc not in ("modbus", "opcua", "s7"):
        fail(f"--plc: {plc!r} is not a PLC protocol this simulator serves (modbus, opcua, s7)")
    if plc in ("opcua", "s7"):
        from gateway.sim.plc_machine import MachineOptions, PlcServe

        modes = tuple(m.strip() for m in plc_security.split(",") if m.strip())
        if any(m not in ("None", "Sign", "SignAndEncrypt") for m in modes) or not modes:
            fail(f"--plc-security: {plc_security!r}: give None, Sign and/or SignAndEncrypt")
        if (plc_user is None) != (plc_password is None):
            fail("--plc-user and --plc-password (or EGIZ_SIM_PLC_PASSWORD) go together")
        users = ((plc_user, plc_password),) if plc_user is not None and plc_password is not None else ()
        try:
            popts = MachineOptions(site=site, equipment_id=plc_id or f"{plc_type}-201", type=plc_type, line=line,
                               rate_hz=rate, faults=fault_specs, truth_path=truth, duration_s=duration, seed=seed,
                               time_scale=time_scale)
        except ValueError as exc:
            fail(f"--plc: {exc}")
        serve = PlcServe(plc, host=plc_host, port=plc_port, opcua_modes=modes, opcua_users=users,  # type: ignore[arg-type]
                         cert_dir=plc_cert_dir)
        asyncio.run(_run_plc(popts, serve))
        return
    kinds = tuple(t.strip() for t in types.split(",") if t.strip())
    unknown = [t for t in kinds if t not in EQUIPMENT_TYPES]
    if unknown or not kinds:
        fail(f"--types: unknown {unknown}; known: {', '.join(EQUIPMENT_TYPES)}")
    try:
        opts = FleetOptions(site=site, line=line, nodes=nodes, rate_hz=rate, host=host, port=port,
                            username=username, password=password, faults=fault_specs, truth_path=truth,
                            duration_s=duration, batch=batch, seed=seed, shared_connection=shared_connection,
                            types=kinds, time_scale=time_scale, production=production)
    except ValueError as exc:  # SimError: every bad option at once, or a fault naming no node of the fleet
        fail(_sim_options_problem(exc))
    if into is not None:
        _sim_into(into, opts, start)
        return
    if plc:
        _sim_plc(plc, opts, plc_host, plc_port or 5020)
        return
    asyncio.run(_run_sim(opts, provision=provision, advertise_address=advertise_address))


def _sim_plc(protocol: str, opts: Any, host: str, port: int) -> None:
    """`egiz sim --plc modbus`: the same machines, models and faults behind a PLC protocol."""
    import signal

    if protocol != "modbus":
        fail(f"--plc: {protocol!r} is not a PLC protocol this simulator serves (modbus)")
    from gateway.sim.plc import PlcLine, PlcOptions, gateway_toml

    try:
        plc_opts = PlcOptions(site=opts.site, line=opts.line, nodes=opts.nodes, types=opts.types, rate_hz=opts.rate_hz,
                              host=host, port=port, faults=opts.faults, truth_path=opts.truth_path, seed=opts.seed,
                              duration_s=opts.duration_s, time_scale=opts.time_scale)
        line = PlcLine(plc_opts)
    except ValueError as exc:
        fail(_sim_options_problem(exc))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        def ready(served: PlcLine) -> None:
            typer.echo(f"# {len(served.plcs)} simulated PLCs on modbus tcp://{host}:{port}, unit ids "
                       f"1..{len(served.plcs)}; add these to gateway.toml:\n")
            typer.echo(gateway_toml(served, poll_s=1.0 / opts.rate_hz if opts.rate_hz >= 1 else 1.0))

        try:
            await line.run(stop, on_ready=ready)
        except (OSError, RuntimeError) as exc:  # pymodbus: RuntimeError when it cannot listen
            fail(f"--plc-port: cannot serve on {host}:{port} ({getattr(exc, 'strerror', None) or exc})", code=1)

    asyncio.run(run())


def _sim_into(into: Path, opts: Any, start: str | None) -> None:
    import time

    from rich.progress import Progress

    from gateway.common.errors import Invalid
    from gateway.common.history import parse_time
    from gateway.detect.offline import simulate_into

    if opts.duration_s is None:
        fail("--into needs --duration (seconds of history to write)")
    try:
        begin = parse_time(start, "--start") if start else time.time() - opts.duration_s
    except Invalid as exc:
        fail(exc.detail)
    import duckdb

    if into.exists() and not into.is_dir():
        fail(f"--into: {into} is a file, not a data directory")
    try:
        with Progress(transient=True) as progress:
            task = progress.add_task(f"simulating {opts.duration_s / 3600:.1f} h of {opts.nodes} nodes", total=1.0)
            n = simulate_into(into, site=opts.site, line=opts.line, start=begin, duration_s=opts.duration_s,
                              nodes=opts.nodes, rate_hz=opts.rate_hz, faults=opts.faults, seed=opts.seed or 0,
                              truth_path=opts.truth_path, types=opts.types,
                              progress=lambda share: progress.update(task, completed=share))
    except duckdb.IOException as exc:
        fail(f"--into: {into} is in use ({str(exc)[:160]}); stop the gateway that holds it", code=1)
    except OSError as exc:
        fail(f"--into: {exc}", code=1)
    typer.echo(f"wrote {n} readings of {opts.nodes} nodes into {into}"
               + (f"; fault ground truth in {opts.truth_path}" if opts.truth_path else ""))


# FleetOptions names its fields; the user typed these flags.
_SIM_FLAGS = {"site": "--site", "nodes": "--nodes", "rate_hz": "--rate", "port": "--port", "batch": "--batch",
              "duration_s": "--duration", "types": "--types", "time_scale": "--time-scale"}


def _sim_options_problem(exc: ValueError) -> str:
    """One line that names the flags that are wrong."""
    from gateway.sim import FaultSpecError, SimError

    if isinstance(exc, FaultSpecError):
        return f"--faults: {exc}"
    problems = exc.fields.get("problems") if isinstance(exc, SimError) else None
    if not isinstance(problems, list) or not problems:
        return str(exc)
    named = []
    for problem in problems:
        name, _, text = str(problem).partition(": ")
        named.append(f"{_SIM_FLAGS.get(name, name)}: {text}")
    return "invalid options: " + "; ".join(named)


async def _run_plc(opts: Any, serve: Any) -> None:
    import signal

    from gateway.sim.plc_machine import PlcSimulation, describe, make_image

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    where = (f"opc.tcp://{serve.host}:{serve.listen_port}" if serve.protocol == "opcua"
             else f"s7://{serve.host}:{serve.listen_port} (rack 0, slot 1)")
    typer.echo(f"simulated {opts.type} PLC {opts.site}:{opts.equipment_id} on {where}")
    for line in describe(serve, opts.type):
        typer.echo(f"  {line}")
    try:
        stats = await PlcSimulation(opts, make_image(serve, opts.type)).run(stop)
    except OSError as exc:
        fail(f"--plc-port: cannot listen on {serve.host}:{serve.listen_port}: {exc}", code=1)
    except Exception as exc:  # the protocol library's own start-up errors (a port in use, a bad certificate)
        fail(f"--plc: {type(exc).__name__}: {exc}", code=1)
    typer.echo(f"served {stats.samples} samples; {stats.commands} setpoint writes, {stats.faults} faults, "
               f"{stats.outages} outages")


async def _run_sim(opts: Any, *, provision: bool = False, advertise_address: str = "") -> None:
    import signal

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from gateway.sim import run_fleet

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nodes = None
    if provision:
        from gateway.sim import fleet_things
        from gateway.sim.provisioning import SimulatedNodes

        nodes = SimulatedNodes(fleet_things(opts), address=advertise_address)
        try:
            opts = await _provision_fleet(nodes, opts, stop)
        except BaseException:
            await nodes.stop()
            raise
        if opts is None:
            await nodes.stop()
            return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  transient=False) as progress:
        task = progress.add_task("starting", total=None)

        def report(stats: Any) -> None:
            progress.update(task, description=f"{opts.nodes} nodes → {opts.host}:{opts.port}  "
                            f"confirmed {stats.confirmed} msgs, {stats.points} points, "
                            f"dropped {stats.dropped}, reconnects {stats.reconnects}")

        try:
            stats = await run_fleet(opts, stop=stop, on_progress=report)
        except ValueError as exc:
            fail(str(exc))
        finally:
            if nodes is not None:  # provisioned nodes stay on the network while they run, like real ones
                await nodes.stop()
        report(stats)


async def _provision_fleet(nodes: Any, opts: Any, stop: asyncio.Event) -> Any:
    """Advertise the fleet's nodes and wait for the gateway to provision all of them (None: stopped first)."""
    await nodes.start()
    typer.echo(f"{len(nodes.things)} nodes advertised on {nodes.address}; approve them on the gateway "
               f"(egiz nodes approve ID): {', '.join(nodes.pending)}", err=True)
    waiting = asyncio.ensure_future(nodes.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({waiting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not waiting.done():
        waiting.cancel()
        return None
    got = waiting.result()
    first = next(iter(got.values()))
    typer.echo(f"all nodes provisioned: broker {first.host}:{first.port}, site {first.site}", err=True)
    return dataclasses.replace(opts, site=first.site, host=first.host, port=first.port,
                               credentials={eid: (p.username, p.password) for eid, p in got.items()})


@app.command("demo")
def demo(
    data_dir: Annotated[Path, typer.Option(help="where the demo keeps its files")] = Path(".egiz-demo"),
    http_port: Annotated[int, typer.Option(help="gateway HTTP port (0: any free port)")] = 8080,
    mqtt_port: Annotated[int, typer.Option(help="broker port (0: any free port)")] = 0,
    aggregator_port: Annotated[int, typer.Option(help="aggregator HTTP port (0: any free port)")] = 8090,
    sites: Annotated[int, typer.Option(min=1, max=4, help="sites")] = 2,
    lines: Annotated[int, typer.Option(min=1, max=4, help="lines per site")] = 2,
    nodes: Annotated[int, typer.Option(min=1, max=10_000, help="simulated nodes per line")] = 10,
    rate: Annotated[float, typer.Option(min=0.01, max=100, help="readings per second per node")] = 1.0,
    faults: Annotated[str | None, typer.Option(help="fault spec for the simulator ('' for none)")] = None,
    duration: Annotated[float | None, typer.Option(min=1, help="stop after this many seconds")] = None,
) -> None:
    """Run two sites x two lines (broker, gateway, simulated fleet each) and an aggregator; print the URLs."""
    from gateway.common.logs import setup_logging
    from gateway.demo import DemoOptions, run_demo

    setup_logging("warning", "text")
    base = DemoOptions()
    opts = DemoOptions(data_dir=data_dir, http_port=http_port, mqtt_port=mqtt_port, aggregator_port=aggregator_port,
                       sites=sites, lines=lines, nodes=nodes, rate_hz=rate,
                       faults=base.faults if faults is None else faults, duration_s=duration)
    from gateway.sim import SimError

    try:
        asyncio.run(run_demo(opts))
    except ConfigError as exc:  # e.g. --http-port 70000; checked before the broker starts
        fail("invalid options:\n" + "\n".join(f"  {key}: {msg}" for key, msg in exc.problems))
    except SimError as exc:  # --faults, --nodes, --rate, --duration as the simulator sees them
        fail(_sim_options_problem(exc))
    except OSError as exc:
        fail(f"cannot start the demo: {exc}", code=1)


nodes_app = command_group("nodes", "List, approve and reject the nodes a gateway has discovered.")
UrlOpt = Annotated[str, typer.Option(help="the gateway's URL (default: from --config, else http://127.0.0.1:8080)")]
KeyOpt = Annotated[str, typer.Option(envvar="EGIZ_API_KEY", help="an admin API key (default: from --config)")]
NodeConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="the gateway's TOML config")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _gateway_call(method: str, path: str, url: str, api_key: str, config: Path | None) -> Any:
    """One request to a running gateway's REST API, as an admin; errors become one line and exit 1."""
    import urllib.error
    import urllib.request

    context = None
    if config is not None:
        cfg = load_gateway_config(config, {})
        host = "127.0.0.1" if cfg.http.host in ("0.0.0.0", "::", "") else cfg.http.host
        if cfg.http.tls_cert_file and not url:
            import ssl

            # The gateway of this very config: trust exactly the certificate it serves, by whatever
            # address it is reached here (a client certificate, when it requires one, is not ours to give).
            context = ssl.create_default_context(cafile=cfg.http.tls_cert_file)
            context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
            context.check_hostname = False
        url = url or f"{'https' if context else 'http'}://{host}:{cfg.http.port}"
        api_key = api_key or next((k.key for k in cfg.auth.api_keys if k.role == "admin"), "")
    req = urllib.request.Request((url or "http://127.0.0.1:8080").rstrip("/") + path, method=method,
                                 data=b"{}" if method == "POST" else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
    try:
        with urllib.request.urlopen(req, timeout=30, context=context) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except ValueError:
            detail = exc.reason
        fail(f"{method} {path}: {exc.code} {detail}", code=1)
    except OSError as exc:
        fail(f"cannot reach the gateway: {exc}", code=1)


def _print_nodes(items: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "type", "state", "address", "firmware", "mac", "last seen", "credentials")
    for n in items:
        creds = "delivered" if n["credentialsDelivered"] else (n["deliveryError"] or "-")
        table.add_row(n["id"], n["type"], n["state"], f"{n['address']}:{n['port']}", n["fw"], n["mac"],
                      n["lastSeen"] or "-", creds if n["state"] == "approved" else "-")
    Console().print(table)


@nodes_app.command("list")
def nodes_list(url: UrlOpt = "", api_key: KeyOpt = "", config: NodeConfigOpt = None,
               state: Annotated[str, typer.Option(help="pending, approved or rejected")] = "",
               as_json: JsonOpt = False) -> None:
    """The nodes the gateway has seen on the network, pending ones first."""
    doc = _gateway_call("GET", "/api/v1/nodes" + (f"?state={state}" if state else ""), url, api_key, config)
    items = sorted(doc["items"], key=lambda n: (n["state"] != "pending", n["id"]))
    if as_json:
        typer.echo(json.dumps(items, indent=2))
    else:
        _print_nodes(items)


@nodes_app.command("approve")
def nodes_approve(node_id: Annotated[str, typer.Argument(help="the node's id, e.g. oven-001")],
                  url: UrlOpt = "", api_key: KeyOpt = "", config: NodeConfigOpt = None) -> None:
    """Create the node's Thing and MQTT user and hand it its credentials."""
    n = _gateway_call("POST", f"/api/v1/nodes/{node_id}/approve", url, api_key, config)
    delivered = "credentials delivered" if n["credentialsDelivered"] else \
        f"credentials not delivered yet ({n['deliveryError']}); retried when the node announces itself"
    typer.echo(f"{n['id']} approved as {n['thingId']}, MQTT user {n['username']}; {delivered}")


@nodes_app.command("reject")
def nodes_reject(node_id: Annotated[str, typer.Argument(help="the node's id")],
                 url: UrlOpt = "", api_key: KeyOpt = "", config: NodeConfigOpt = None) -> None:
    """Refuse the node; any MQTT user it had is removed from the broker."""
    n = _gateway_call("POST", f"/api/v1/nodes/{node_id}/reject", url, api_key, config)
    typer.echo(f"{n['id']} rejected")


@app.command("discover")
def discover(seconds: Annotated[float, typer.Option(min=0.5, max=600, help="how long to listen")] = 3.0,
             as_json: JsonOpt = False) -> None:
    """List the gateways, their brokers and the nodes announcing themselves on this network (mDNS)."""
    from gateway.discovery import discover as run_discovery

    found = asyncio.run(run_discovery(seconds))
    if as_json:
        typer.echo(json.dumps({k: [a.to_json() for a in v] for k, v in found.items()}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    gateways = Table("gateway", "site", "line", "version", "address", title="Gateways")
    for a in found["gateways"]:
        gateways.add_row(a.txt.get("gateway", a.name), a.txt.get("site", ""), a.txt.get("line", ""),
                         a.txt.get("version", ""), f"{a.address}:{a.port}")
    brokers = Table("broker", "address", title="MQTT brokers")
    for a in found["brokers"]:
        brokers.add_row(a.name.split(".")[0], f"{a.address}:{a.port}")
    nodes = Table("node", "type", "firmware", "mac", "address", title="Nodes")
    for a in found["nodes"]:
        nodes.add_row(a.txt.get("id", a.name), a.txt.get("type", ""), a.txt.get("fw", ""), a.txt.get("mac", ""),
                      f"{a.address}:{a.port}")
    for t in (gateways, brokers, nodes):
        console.print(t)


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
