"""Boot of the gateway's SD-card image under emulation: the image is known to boot, not only to build.

Builds the image with `egiz image build --keep-raw` (or takes one built before, `--image`), provisions it
as a user would (an egiz.toml with an admin key on its boot partition, and a card larger than the image
so first boot grows the root partition), boots it under QEMU with software emulation (TCG) and the
memory of a small board, and prints one JSON line per figure:

  image_build_<arch>            seconds of `egiz image build` (when this run built it)
  image_boot_to_ready_<arch>    QEMU started → the gateway's /ready answers 200 (HTTPS), seconds
  image_idle_rss_<arch>         the gateway's resident memory after `--idle-s` more seconds, from its
                                /metrics (`process_resident_memory_bytes`), MiB

arm64 boots as a Raspberry Pi-like machine would: `-M virt -cpu cortex-a72 -m 1024`, the kernel and
initrd from the image's boot partition (what the Pi's firmware loads), the serial console on ttyAMA0.
amd64 boots the kernel on its boot partition under `-M q35 -cpu max`. Not a test: a TCG boot takes
minutes, more on a busy machine. Needs root for the build and qemu-system-aarch64 (Debian:
qemu-system-arm) or qemu-system-x86_64; the arm64 build also qemu-user-static and binfmt-support.

    sudo python bench/image_boot.py --arch arm64 [--image dist/image/egiz-gateway-arm64.img] [--memory 1024]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.broker import find_free_port
from images.build import BOOT_START, SECTOR, unmount_below
from tests.helpers import EGIZ

ADMIN_KEY = "bench-image-admin-key-0123456789"
BOOT_OFFSET = BOOT_START * SECTOR  # the FAT boot partition's first byte
QEMU = {
    "arm64": ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72"],
    "amd64": ["qemu-system-x86_64", "-M", "q35", "-cpu", "max"],
}
CONSOLE = {"arm64": "console=ttyAMA0,115200", "amd64": "console=ttyS0,115200"}


def emit(figure: str, value: float, unit: str, **extra: Any) -> None:
    print(json.dumps({"figure": figure, "value": round(value, 1), "unit": unit, **extra}), flush=True)


def build(arch: str, out: Path, timeout: float) -> Path:
    """`egiz image build`; a build that overruns is stopped with SIGTERM (the builder unmounts what it
    mounted in its root filesystem), and whatever is still mounted there is unmounted here too."""
    t0 = time.monotonic()
    log = out / f"build-{arch}.log"
    out.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as f:
        proc = subprocess.Popen([EGIZ, "image", "build", "--arch", arch, "--out", str(out), "--keep-raw"],
                                stdout=f, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        finally:
            unmount_below(out / f"work-{arch}")
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise SystemExit(f"image build failed (exit {proc.returncode}) after {time.monotonic() - t0:.0f} s:\n{tail}")
    emit(f"image_build_{arch}", time.monotonic() - t0, "s")
    return out / f"egiz-gateway-{arch}.img"


def boot_file(boot: str, pattern: str, into: Path) -> Path:
    """The newest file on the boot partition whose name matches `pattern` (e.g. vmlinuz-6.1.0-28-arm64)."""
    listing = subprocess.run(["mdir", "-b", "-i", boot, "::"], capture_output=True, text=True, check=True).stdout
    names = sorted((Path(n).name for n in listing.split()), key=lambda n: [int(x) if x.isdigit() else x
                                                                          for x in re.split(r"(\d+)", n)])
    found = [n for n in names if re.fullmatch(pattern, n)]
    if not found:
        raise SystemExit(f"no {pattern} on the image's boot partition: {' '.join(names)}")
    target = into / found[-1]
    subprocess.run(["mcopy", "-o", "-i", boot, f"::{found[-1]}", str(target)], check=True)
    return target


def prepare(raw: Path, tmp: Path, arch: str) -> tuple[Path, list[str]]:
    """A provisioned copy of the image on a larger card, and QEMU's options to load its kernel."""
    disk = tmp / "card.img"
    subprocess.run(["cp", "--sparse=always", str(raw), str(disk)], check=True)
    with disk.open("r+b") as f:  # a card larger than the image: first boot grows the root partition
        f.truncate(disk.stat().st_size + 1024 * 2**20)
    boot = f"{disk}@@{BOOT_OFFSET}"
    toml = tmp / "egiz.toml"
    toml.write_text(f'[gateway]\nsite = "bench-site"\nline = "line-a"\nid = "gw-bench-{arch}"\n'
                    f'[secrets]\nadmin_key = "{ADMIN_KEY}"\n')
    subprocess.run(["mcopy", "-o", "-i", boot, str(toml), "::egiz.toml"], check=True)
    kernel = boot_file(boot, r"vmlinuz(-.*)?", tmp)
    initrd = boot_file(boot, r"initrd\.img(-.*)?", tmp)
    cmdline = subprocess.run(["mtype", "-i", boot, "::cmdline.txt"], capture_output=True, text=True,
                             check=True).stdout.split()
    # the board's consoles (HDMI, the Pi's UART) are not QEMU's: the serial console is the machine's own
    append = [a for a in cmdline if not a.startswith("console=")] + [CONSOLE[arch]]
    return disk, ["-kernel", str(kernel), "-initrd", str(initrd), "-append", " ".join(append)]


def https(url: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=ssl._create_unverified_context()) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""


def boot(arch: str, raw: Path, memory: int, smp: int, timeout: float, idle_s: float, logs: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="egiz-image-boot-", dir=raw.parent) as d:
        tmp = Path(d)
        disk, kernel = prepare(raw, tmp, arch)
        http = find_free_port()
        console = logs / f"console-{arch}.log"
        console.unlink(missing_ok=True)
        t0 = time.monotonic()
        vm = subprocess.Popen([
            *QEMU[arch], "-accel", "tcg", "-m", str(memory), "-smp", str(smp), *kernel,
            "-drive", f"file={disk},format=raw,if=virtio", "-no-reboot",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{http}-:8080", "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci", "-serial", f"file:{console}", "-monitor", "none", "-display", "none",
        ], stdout=subprocess.DEVNULL, stderr=(logs / f"qemu-{arch}.err").open("wb"))
        try:
            url = f"https://127.0.0.1:{http}"
            status = 0
            while time.monotonic() - t0 < timeout and vm.poll() is None:
                try:
                    status, _ = https(url + "/ready")
                except OSError:
                    status = 0
                if status == 200:
                    break
                time.sleep(2)
            booted = time.monotonic() - t0
            if status != 200:
                text = console.read_text(errors="replace") if console.exists() else ""
                raise SystemExit(f"no /ready after {booted:.0f} s (qemu exit {vm.poll()}); console:\n{text[-4000:]}")
            figures = {"accel": "tcg", "machine": " ".join(QEMU[arch][1:]), "memory_mb": memory, "smp": smp}
            emit(f"image_boot_to_ready_{arch}", booted, "s", **figures)
            time.sleep(idle_s)
            _, metrics = https(url + "/metrics", timeout=30)
            rss = re.search(r"^process_resident_memory_bytes (\S+)$", metrics, re.M)
            cpu = re.search(r"^process_cpu_seconds_total (\S+)$", metrics, re.M)
            if rss is None:
                raise SystemExit("the gateway's /metrics has no process_resident_memory_bytes")
            emit(f"image_idle_rss_{arch}", float(rss.group(1)) / 2**20, "MiB", idle_s=idle_s,
                 gateway_cpu_s=float(cpu.group(1)) if cpu else None, **figures)
        finally:
            vm.terminate()
            try:
                vm.wait(30)
            except subprocess.TimeoutExpired:
                vm.kill()
                vm.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=sorted(QEMU), default="arm64")
    ap.add_argument("--image", type=Path, help="a raw image built before (egiz image build --keep-raw); "
                    "default: build one into --out")
    ap.add_argument("--out", type=Path, default=Path("dist/image"), help="where the build goes")
    ap.add_argument("--build-timeout", type=float, default=7200.0, help="seconds")
    ap.add_argument("--memory", type=int, default=1024, help="MiB of the emulated machine (a 1 GB Pi: 1024)")
    ap.add_argument("--smp", type=int, default=2, help="emulated CPUs")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for /ready")
    ap.add_argument("--idle-s", type=float, default=60.0, help="seconds after /ready before the RSS is read")
    args = ap.parse_args()
    missing = [t for t in (QEMU[args.arch][0], "mcopy", "mdir", "mtype") if shutil.which(t) is None]
    if missing:
        raise SystemExit(f"missing: {', '.join(missing)} (apt-get install qemu-system-arm qemu-system-x86 mtools)")
    raw = args.image or build(args.arch, args.out, args.build_timeout)
    boot(args.arch, raw.resolve(), args.memory, args.smp, args.timeout, args.idle_s, raw.resolve().parent)


if __name__ == "__main__":
    main()
