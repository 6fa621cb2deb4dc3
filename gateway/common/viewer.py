"""Serving the web viewer (the `viewer` package's static files) and the floor layout it draws.

Both the aggregator (all sites) and each gateway (its line) serve the same files under `/viewer/`;
the page asks the server which one it talks to. The layout is `layout.json` in the data directory:
machine positions and rotations per line (docs/viewer.md); without one the viewer lays the line out
itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

import viewer as _viewer_package
from gateway.common.errors import Invalid

ROOT = Path(_viewer_package.__file__).resolve().parent
TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".json": "application/json",
         ".png": "image/png", ".svg": "image/svg+xml", "": "text/plain"}
LAYOUT_FILE = "layout.json"
MAX_LAYOUT = 4 * 2**20


async def redirect_to_viewer(request: web.Request) -> web.Response:
    raise web.HTTPFound("/viewer/")


async def static_file(request: web.Request) -> web.StreamResponse:
    """One file of the viewer; anything outside its folder, or not a page asset, is not found."""
    rel = request.match_info.get("path") or "index.html"
    path = (ROOT / rel).resolve()
    if not path.is_relative_to(ROOT) or not path.is_file() or path.suffix not in TYPES \
            or (path.suffix == "" and path.name != "LICENSE"):
        raise web.HTTPNotFound()
    return web.FileResponse(path, headers={"Content-Type": TYPES[path.suffix], "Cache-Control": "no-cache"})


def read_layout(data_dir: Path) -> dict[str, Any]:
    """`layout.json` of the data directory, checked for shape, or an empty layout."""
    path = Path(data_dir) / LAYOUT_FILE
    if not path.is_file():
        return {"lines": {}}
    if path.stat().st_size > MAX_LAYOUT:
        raise Invalid(f"{path.name} is larger than {MAX_LAYOUT} bytes")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Invalid(f"{path.name} cannot be read: {exc}") from None
    lines = doc.get("lines") if isinstance(doc, dict) else None
    if not isinstance(lines, dict):
        raise Invalid(f'{path.name} needs {{"lines": {{"SITE/LINE": {{"machines": {{...}}}}}}}}')
    for key, line in lines.items():
        machines = line.get("machines") if isinstance(line, dict) else None
        if not isinstance(machines, dict) or not all(
                isinstance(m, dict) and all(isinstance(m.get(k, 0), int | float) for k in ("x", "z", "rotation"))
                for m in machines.values()):
            raise Invalid(f"{path.name}: line {key!r} needs machines {{thing id: {{x, z, rotation}}}} in metres "
                          "and degrees")
    return doc


def add_routes(app: web.Application, layout: Any, mark: Any = None) -> None:
    """`/` and `/viewer/...` (public: the page signs in itself) and `GET /api/v1/layout` (`layout`)."""
    handlers = [redirect_to_viewer, static_file]
    if mark is not None:
        handlers = [mark(h) for h in handlers]
    app.router.add_get("/", handlers[0])
    app.router.add_get("/viewer/{path:.*}", handlers[1])
    app.router.add_get("/api/v1/layout", layout)
