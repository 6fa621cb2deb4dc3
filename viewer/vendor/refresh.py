#!/usr/bin/env python3
"""Refresh the vendored browser libraries from the npm registry at the versions pinned in
`versions.json`: download each package's tarball, check it against the registry's published
SHA-512 integrity, and copy out the files the viewer serves (and the licence).

    python viewer/vendor/refresh.py            # the pinned versions
    python viewer/vendor/refresh.py three=0.188.0   # move a pin, then refresh

Needs only the Python standard library and access to https://registry.npmjs.org.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import tarfile
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REGISTRY = "https://registry.npmjs.org"
# package -> {file inside the tarball: where it goes under vendor/<package>/}
FILES = {
    "three": {
        "package/build/three.module.js": "three.module.js",
        "package/build/three.core.js": "three.core.js",
        "package/examples/jsm/controls/OrbitControls.js": "addons/controls/OrbitControls.js",
        "package/examples/jsm/controls/PointerLockControls.js": "addons/controls/PointerLockControls.js",
        "package/examples/jsm/webxr/VRButton.js": "addons/webxr/VRButton.js",
        "package/LICENSE": "LICENSE",
    },
    "uplot": {
        "package/dist/uPlot.esm.js": "uPlot.esm.js",
        "package/dist/uPlot.min.css": "uPlot.min.css",
        "package/LICENSE": "LICENSE",
    },
}


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as r:  # noqa: S310 (a fixed https registry)
        return bytes(r.read())


def refresh(name: str, version: str) -> dict[str, str]:
    meta = json.loads(fetch(f"{REGISTRY}/{name}/{version}"))
    tarball = fetch(meta["dist"]["tarball"])
    algo, _, want = meta["dist"]["integrity"].partition("-")
    if algo != "sha512" or base64.b64encode(hashlib.sha512(tarball).digest()).decode() != want:
        raise SystemExit(f"{name}@{version}: the tarball does not match the registry's integrity")
    out = HERE / name
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        for inside, rel in FILES[name].items():
            member = tar.extractfile(inside)
            if member is None:
                raise SystemExit(f"{name}@{version}: no {inside} in the package")
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(member.read())
    print(f"{name}@{version}: {len(FILES[name])} files", file=sys.stderr)
    return {"version": version, "integrity": meta["dist"]["integrity"]}


def main(argv: list[str]) -> None:
    pins_file = HERE / "versions.json"
    pins = json.loads(pins_file.read_text())
    for arg in argv:
        name, _, version = arg.partition("=")
        if name not in FILES or not version:
            raise SystemExit(f"usage: refresh.py [{'|'.join(FILES)}=VERSION ...]")
        pins[name] = {"version": version}
    for name in FILES:
        pins[name] = refresh(name, pins[name]["version"])
    pins_file.write_text(json.dumps(pins, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
