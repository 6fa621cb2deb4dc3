"""The offline wheelhouse of a release: the project's own wheel and a wheel of every runtime dependency,
for the target's CPU and Python, so a gateway (or the aggregator) installs with
`pip install --no-index --find-links` and never needs PyPI. The image builder and the fleet playbook
(`ansible/site.yml`) both use it:

    python -m images.wheelhouse --arch arm64 --python 3.11 --out dist/wheelhouse/0.1.0/arm64-py3.11

Dependencies are pinned to the versions installed where this runs when those exist for the target
(the versions the test suite ran with, and pip finds them in its cache); otherwise pip picks the
newest the project allows. `SHA256SUMS` is written last: its presence means the wheelhouse is complete.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the source checkout
MACHINES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}
GLIBC_MINORS = range(17, 37)  # manylinux_2_17 .. manylinux_2_36 (Debian bookworm has glibc 2.36)
EXTRAS = ("postgres",)  # the aggregator's PostgreSQL driver; the gateway installs without it
DONE = "SHA256SUMS"


class WheelhouseError(RuntimeError):
    """pip could not build or fetch a wheel; the message carries pip's own words."""


def platform_tags(arch: str) -> list[str]:
    """The binary wheel tags a Debian bookworm system on `arch` accepts."""
    machine = MACHINES[arch]
    return [f"manylinux_2_{m}_{machine}" for m in GLIBC_MINORS] + [f"manylinux2014_{machine}", f"linux_{machine}"]


def pins(exclude: str = "openegiz") -> list[str]:
    """`name==version` of every distribution installed here (but the project itself)."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and name.lower() != exclude:
            out[name.lower()] = f"{name}=={dist.version}"
    return sorted(out.values())


def _pip(*args: str | Path, what: str) -> None:
    r = subprocess.run([sys.executable, "-m", "pip", *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise WheelhouseError(f"{what}: {(r.stderr or r.stdout).strip()[-3000:]}")


def build_wheelhouse(out: Path, arch: str, python: str = "3.11", extras: tuple[str, ...] = EXTRAS) -> Path:
    """Fill `out` with the project's wheel and its dependencies' for `arch` and CPython `python`."""
    if arch not in MACHINES:
        raise WheelhouseError(f"unknown architecture {arch!r} (amd64, arm64)")
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE).unlink(missing_ok=True)
    for old in out.glob("openegiz-*.whl"):  # the checkout may have changed since
        old.unlink()
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", out, ROOT,
         what="building the project's wheel")
    own = next(out.glob("openegiz-*.whl"))
    requirement = f"{own}[{','.join(extras)}]" if extras else str(own)
    target = ["--only-binary=:all:", "--implementation=cp", f"--python-version={python}",
              *(f"--platform={tag}" for tag in platform_tags(arch))]
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("\n".join(pins()) + "\n")
        constraints.flush()
        try:
            _pip("download", "--quiet", "--dest", out, *target, "--constraint", constraints.name, requirement,
                 what="fetching the dependencies' wheels")
        except WheelhouseError:  # a pinned version has no wheel for the target: let pip choose
            _pip("download", "--quiet", "--dest", out, *target, requirement, what="fetching the dependencies' wheels")
    sums = [f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}" for w in sorted(out.glob("*.whl"))]
    (out / DONE).write_text("\n".join(sums) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m images.wheelhouse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, help="amd64 or arm64 (also x86_64, aarch64)")
    parser.add_argument("--python", default="3.11", help="the target's Python, major.minor (bookworm: 3.11)")
    parser.add_argument("--out", required=True, type=Path, help="the wheelhouse directory")
    parser.add_argument("--no-extras", action="store_true", help="without the aggregator's PostgreSQL driver")
    args = parser.parse_args(argv)
    try:
        build_wheelhouse(args.out, args.arch, args.python, () if args.no_extras else EXTRAS)
    except WheelhouseError as exc:
        print(f"wheelhouse: {exc}", file=sys.stderr)
        return 1
    print(f"{args.out}: {len(list(args.out.glob('*.whl')))} wheels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
