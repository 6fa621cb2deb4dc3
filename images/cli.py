"""`egiz image build`: the gateway's SD-card image, with progress."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

image_app = typer.Typer(help="Build the gateway's SD-card image.", no_args_is_help=True)


def _terminated(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@image_app.command("build")
def image_build(
    arch: Annotated[str, typer.Option(help="arm64 (Raspberry Pi 3, 4, 400, CM4) or amd64 (PCs, VMs)")] = "arm64",
    out: Annotated[Path, typer.Option(help="where the image, its SHA-256 and its manifest go")] = Path("dist/image"),
    keep_raw: Annotated[bool, typer.Option(help="also keep the uncompressed .img")] = False,
    mirror: Annotated[str, typer.Option(help="Debian mirror")] = "http://deb.debian.org/debian",
) -> None:
    """Debian bookworm with Mosquitto and the gateway installed by the fleet's Ansible roles, and
    first-boot provisioning from egiz.toml on the boot partition; a compressed raw image. Needs root
    and a source checkout."""
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from gateway import __version__
    from images.build import STEPS, ImageError, build

    # Stopped (a CI timeout, systemd): unwind, so the builder unmounts what it mounted in the root filesystem.
    signal.signal(signal.SIGTERM, _terminated)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn()) as progress:
        task = progress.add_task("starting", total=len(STEPS))
        done = -1

        def step(what: str) -> None:
            nonlocal done
            done += 1
            progress.update(task, description=what, completed=done)

        try:
            built = build(arch, out, version=__version__, step=step, keep_raw=keep_raw, mirror=mirror)
        except ImageError as exc:
            progress.stop()
            typer.echo(f"egiz: image build: {exc}", err=True)
            raise typer.Exit(1) from None
        progress.update(task, description="done", completed=len(STEPS))
    typer.echo(f"{built.image}  sha256 {built.sha256}\nmanifest {built.manifest}")
    if built.raw is not None:
        typer.echo(f"raw image {built.raw}")
