"""The house's layering, read from the code's own imports (every import, also those inside functions):

- nothing imports in a circle;
- the shared floor `gateway.common` imports no service part and nothing of `cloud_sync`;
- `cloud_sync` (the aggregator) imports only the shared floor and the model registry's files;
- the aggregator process starts without the MQTT client or the ONNX runtime.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "cloud_sync", "images")
FLOOR = "gateway.common"
# what the aggregator may take from the gateway package besides the floor
CLOUD_MAY_IMPORT = (FLOOR, "gateway.detect.models")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(root: Path, path: Path, known: set[str]) -> list[tuple[int, str]]:
    """(line, imported module) of every import in a file, relative imports resolved; `from pkg import
    name` counts `pkg.name` too where that is a module of the tree (`known`)."""
    me = module_name(root, path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base))
            out += [(node.lineno, f"{base}.{a.name}") for a in node.names if f"{base}.{a.name}" in known]
    return out


def graph(root: Path, packages: tuple[str, ...]) -> tuple[dict[str, set[str]], dict[str, list[tuple[int, str]]]]:
    """Module → the project modules it imports, and every import with its line, per file."""
    files = {module_name(root, p): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in files}
    lines: dict[str, list[tuple[int, str]]] = {}
    for mod, path in files.items():
        lines[mod] = imports_of(root, path, set(files))
        for _line, target in lines[mod]:
            if target in files and target != mod and not mod.startswith(target + "."):
                edges[mod].add(target)
    return edges, lines


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _is(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Every import that breaks the layering, as `file:line imports module (rule)`."""
    _edges, lines = graph(root, packages)
    out = []
    for mod, imps in sorted(lines.items()):
        path = mod.replace(".", "/")
        for line, target in imps:
            if _is(mod, FLOOR) and (_is(target, "cloud_sync") or (_is(target, "gateway") and target != "gateway"
                                                                 and not _is(target, FLOOR))):
                out.append(f"{path}.py:{line} imports {target} (the shared floor imports no service)")
            if _is(mod, "cloud_sync") and _is(target, "gateway") and target != "gateway" \
                    and not any(_is(target, ok) for ok in CLOUD_MAY_IMPORT):
                out.append(f"{path}.py:{line} imports {target} (the aggregator takes only the shared floor "
                           "and the model registry from the gateway package)")
    return out


def test_no_import_circle_anywhere() -> None:
    edges, _ = graph(ROOT, PACKAGES)
    assert cycles(edges) == []


def test_the_layering_holds() -> None:
    assert violations(ROOT) == []


@pytest.mark.parametrize(("where", "line", "rule"), [
    ("cloud_sync/store/evil.py", "from gateway.buffer.buffer import TelemetryBuffer", "the aggregator takes only"),
    ("gateway/common/evil.py", "import gateway.api.app", "the shared floor imports no service"),
    ("gateway/common/evil.py", "from cloud_sync import aggregator", "the shared floor imports no service"),
])
def test_a_forbidden_import_is_named_with_its_line(tmp_path: Path, where: str, line: str, rule: str) -> None:
    for pkg in PACKAGES:  # a copy of the tree's sources, plus one offending module
        for src in (ROOT / pkg).rglob("*.py"):
            dst = tmp_path / src.relative_to(ROOT)
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    assert violations(tmp_path) == []
    (tmp_path / where).write_text(f'"""An offending module."""\n\n{line}\n', encoding="utf-8")
    found = violations(tmp_path)
    assert len(found) >= 1 and all(f.startswith(f"{where}:3 imports ") and rule in f for f in found), found


def test_a_circle_is_found(tmp_path: Path) -> None:
    pkg = tmp_path / "gateway"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from gateway import b\n")
    (pkg / "b.py").write_text("def f() -> None:\n    from gateway.a import x\n")
    edges, _ = graph(tmp_path, ("gateway",))
    assert cycles(edges) == [["gateway.a", "gateway.b"]]


def test_the_aggregator_starts_without_mqtt_or_onnx() -> None:
    code = ("import sys, cloud_sync.aggregator, cloud_sync.store.duck\n"
            "print(sorted(m for m in ('aiomqtt', 'paho', 'onnxruntime', 'gateway.ingest', 'gateway.api',"
            " 'gateway.buffer', 'gateway.twin', 'gateway.uplink') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
