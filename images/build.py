"""Build the gateway's SD-card image (docs/image.md).

A Debian bookworm root filesystem made with mmdebstrap; the fleet's `mosquitto` and `egiz_gateway`
Ansible roles applied to it offline through a chroot connection, installing the project from a
wheelhouse built here; the first-boot service; then a raw disk image assembled without loop devices:
`mkfs.ext4 -d` fills the root filesystem from the directory, mtools builds the FAT boot partition,
sfdisk writes the partition table into the image file and `dd conv=notrunc` puts the partitions in
place. The boot partition carries what the firmware loads: on arm64 the Raspberry Pi's boot files
(from Debian's raspi-firmware), on amd64 systemd-boot for UEFI; both with the kernel and initrd.
Needs root and a source checkout.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from images.wheelhouse import WheelhouseError, build_wheelhouse

ROOT = Path(__file__).resolve().parent.parent  # the source checkout
FIRSTBOOT = Path(__file__).resolve().parent / "firstboot"
MIRROR = "http://deb.debian.org/debian"
SUITE = "bookworm"
PYTHON = "3.11"  # bookworm's python3
PACKAGES = (
    "systemd-sysv", "udev", "dbus", "systemd-timesyncd", "systemd-resolved",  # init, clock, names
    "python3", "python3-venv", "mosquitto", "avahi-daemon",  # what the roles expect in place
    "cloud-guest-utils", "e2fsprogs", "fdisk",  # growing the root partition on first boot
    "ca-certificates", "iproute2", "kmod", "zstd", "less",
)
ARCH_PACKAGES = {
    "amd64": ("linux-image-amd64", "systemd-boot-efi"),
    "arm64": ("linux-image-arm64", "raspi-firmware", "firmware-brcm80211", "wpasupplicant"),
}
COMPONENTS = {"amd64": "main", "arm64": "main,non-free-firmware"}  # the Pi's firmware is non-free
QEMU_USER = {"arm64": "aarch64", "amd64": "x86_64"}
BOOT_MB = 256
SECTOR = 512
BOOT_START = 2048  # sectors: the first partition at 1 MiB
ROOT_LABEL = "egiz-root"
BOOT_LABEL = "EGIZBOOT"
# amd64: systemd-boot on an EFI system partition; arm64: the Pi's firmware wants FAT32 (LBA)
BOOT_PARTITION_TYPE = {"amd64": "ef", "arm64": "c"}
KERNEL_ARGS = f"root=LABEL={ROOT_LABEL} rw console=tty0 console=ttyS0,115200 quiet"
TOOLS = ("mmdebstrap", "mkfs.ext4", "mformat", "mcopy", "sfdisk", "zstd", "chroot", "dd")
STEPS = (
    "root filesystem (mmdebstrap)",
    "wheels of the project and its dependencies",
    "mosquitto and egiz_gateway roles through chroot",
    "first-boot service and boot files",
    "package manifest",
    "partitions and disk image",
    "compression and checksum",
)

# amd64: the firmware loads the kernel and initrd from the boot partition, so a kernel or initramfs
# upgrade must put the new ones there (on arm64 raspi-firmware's own hooks do this).
BOOT_PARTITION_HOOK = """#!/bin/sh
# Installed by the OpenEgiz Edge image: keep the boot partition's kernel and initrd (what
# systemd-boot loads) the newest installed ones.
set -e
[ -d /boot/firmware/loader ] || exit 0
version=$(ls /boot/vmlinuz-* 2>/dev/null | sed 's|^/boot/vmlinuz-||' | sort -V | tail -n 1)
[ -n "$version" ] && [ -f "/boot/initrd.img-$version" ] || exit 0
for pair in "vmlinuz-$version:vmlinuz" "initrd.img-$version:initrd.img"; do
  cp "/boot/${pair%%:*}" "/boot/firmware/${pair#*:}.new"
  mv "/boot/firmware/${pair#*:}.new" "/boot/firmware/${pair#*:}"
done
"""


class ImageError(RuntimeError):
    """A step failed; the message says which and why."""


@dataclass(frozen=True)
class Built:
    """What a build leaves in its output directory."""

    image: Path  # the compressed raw image
    raw: Path | None  # the raw image, when kept
    sha256: str
    manifest: Path
    rootfs: Path  # kept for inspection (and for the tests)
    wheelhouse: Path


Step = Callable[[str], None]


def host_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def missing_tools(arch: str) -> list[str]:
    """What this machine lacks to build for `arch`, as the Debian packages to install."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if arch != host_arch():
        if not Path(f"/proc/sys/fs/binfmt_misc/qemu-{QEMU_USER[arch]}").exists():
            missing.append(f"qemu-user-static and binfmt-support (to run {arch} programs)")
        if shutil.which("arch-test") is None:
            missing.append("arch-test")
    return missing


def run(*args: str | Path, what: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, input=stdin)
    if r.returncode != 0:
        raise ImageError(f"{what} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-3000:]}")
    return r.stdout


def chroot(rootfs: Path, *args: str, what: str) -> str:
    return run("chroot", rootfs, *args, what=what, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})


def build(arch: str, out: Path, *, version: str, step: Step, keep_raw: bool = False, mirror: str = MIRROR,
          free_mb: int = 384) -> Built:
    """Build `egiz-gateway-<arch>.img.zst`, its `.sha256` and `.manifest.txt` in `out`.

    `work-<arch>/` in `out` keeps the root filesystem and the wheelhouse; `free_mb` is the free space
    left in the root filesystem (first boot grows it to the card).
    """
    if arch not in ARCH_PACKAGES:
        raise ImageError(f"unknown architecture {arch!r} (amd64 or arm64)")
    if os.geteuid() != 0:
        raise ImageError("building an image needs root (chroot, file ownership)")
    missing = missing_tools(arch)
    if missing:
        raise ImageError(f"missing: {', '.join(missing)} "
                         "(apt-get install mmdebstrap mtools dosfstools fdisk zstd e2fsprogs)")
    out.mkdir(parents=True, exist_ok=True)
    work = out / f"work-{arch}"
    if work.exists():
        unmount_below(work)  # what a killed build left mounted: removing it would remove the host's /dev
        shutil.rmtree(work)
    work.mkdir()
    try:
        return _build(arch, out, work, version=version, step=step, keep_raw=keep_raw, mirror=mirror,
                      free_mb=free_mb)
    finally:
        unmount_below(work)


def _build(arch: str, out: Path, work: Path, *, version: str, step: Step, keep_raw: bool, mirror: str,
           free_mb: int) -> Built:
    rootfs, wheels = work / "rootfs", work / "wheelhouse"
    step(STEPS[0])
    with ThreadPoolExecutor(1) as pool:  # the wheels are fetched while mmdebstrap works
        wheelhouse = pool.submit(build_wheelhouse, wheels, arch, PYTHON, extras=())
        make_rootfs(rootfs, arch, mirror)
        step(STEPS[1])
        try:
            wheelhouse.result()
        except WheelhouseError as exc:
            raise ImageError(f"wheelhouse: {exc}") from None
    step(STEPS[2])
    apply_roles(rootfs, wheels, version)
    step(STEPS[3])
    install_firstboot(rootfs)
    boot = boot_files(rootfs, work, arch)
    step(STEPS[4])
    manifest = out / f"egiz-gateway-{arch}.manifest.txt"
    manifest.write_text(package_manifest(rootfs, arch, version))
    step(STEPS[5])
    raw = out / f"egiz-gateway-{arch}.img"
    assemble(rootfs, boot, work, raw, arch, free_mb)
    step(STEPS[6])
    image = out / f"{raw.name}.zst"
    run("zstd", "-q", "-f", "-T0", "-6", "--sparse", raw, "-o", image, what="zstd")
    digest = sha256_of(image)
    (out / f"{image.name}.sha256").write_text(f"{digest}  {image.name}\n")
    if not keep_raw:
        raw.unlink()
    return Built(image, raw if keep_raw else None, digest, manifest, rootfs, wheels)


def mounts_below(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> list[Path]:
    """The mount points at or below `path`, deepest first."""
    top = path.resolve()
    found = set()
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        # mountinfo writes space, tab, newline and backslash in paths as octal escapes (\040 ...)
        point = Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
        if point == top or top in point.parents:
            found.add(point)
    return sorted(found, key=lambda p: (len(p.parts), str(p)), reverse=True)


def unmount_below(path: Path) -> None:
    """Unmount whatever is mounted at or below `path`, deepest first: mmdebstrap mounts /dev, /proc and
    /sys in the root filesystem while it works, and a build killed meanwhile leaves them there. Raises
    ImageError when something stays mounted (deleting the directory would then delete the host's files)."""
    for point in mounts_below(path):
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", point], capture_output=True)  # busy: detach it now
    left = mounts_below(path)
    if left:
        raise ImageError(f"still mounted below {path}: {', '.join(map(str, left))}")


def make_rootfs(rootfs: Path, arch: str, mirror: str) -> None:
    """Debian bookworm without recommended packages, then what a bare system needs to be an appliance."""
    run("mmdebstrap", "--variant=apt", f"--architectures={arch}", f"--components={COMPONENTS[arch]}",
        '--aptopt=APT::Install-Recommends "false"', "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright", "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*", f"--include={','.join(PACKAGES + ARCH_PACKAGES[arch])}",
        *mmdebstrap_hooks(arch), SUITE, rootfs, mirror, what="mmdebstrap")
    (rootfs / "etc/hostname").write_text("egiz-gateway\n")  # first boot names it after its site and line
    (rootfs / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\tegiz-gateway\n"
                                      "::1\t\tlocalhost ip6-localhost ip6-loopback\n")
    (rootfs / "etc/fstab").write_text(
        f"LABEL={ROOT_LABEL}\t/\text4\tdefaults,noatime,commit=60\t0\t1\n"
        f"LABEL={BOOT_LABEL}\t/boot/firmware\tvfat\tdefaults,umask=0077,nofail\t0\t2\n")
    (rootfs / "etc/machine-id").write_text("")  # systemd makes one on first boot: every gateway its own
    (rootfs / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    network = rootfs / "etc/systemd/network"
    network.mkdir(parents=True, exist_ok=True)
    (network / "80-egiz-wired.network").write_text(
        "[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n# avahi-daemon answers mDNS\nMulticastDNS=no\n")
    (network / "81-egiz-wifi.network").write_text("[Match]\nName=wl*\n\n[Network]\nDHCP=yes\nMulticastDNS=no\n")
    chroot(rootfs, "systemctl", "enable", "systemd-networkd.service", "systemd-resolved.service",
           "systemd-timesyncd.service", "serial-getty@ttyS0.service", what="enabling the base services")
    chroot(rootfs, "passwd", "--lock", "root", what="locking root's password")
    if arch == "amd64":  # on arm64, raspi-firmware's hooks do this (see mmdebstrap_hooks)
        for hook in ("etc/kernel/postinst.d/zz-egiz-boot-partition",
                     "etc/initramfs/post-update.d/zz-egiz-boot-partition"):
            (rootfs / hook).parent.mkdir(parents=True, exist_ok=True)
            (rootfs / hook).write_text(BOOT_PARTITION_HOOK)
            (rootfs / hook).chmod(0o755)


def mmdebstrap_hooks(arch: str) -> list[str]:
    """Steps that need the chroot's /proc, which mmdebstrap mounts for its hooks."""
    if arch != "arm64":
        return []
    # raspi-firmware's kernel hook writes cmdline.txt and config.txt from /etc/default/raspi-firmware,
    # again at every kernel upgrade: boot by label, log to HDMI and the serial console (GPIO 14/15),
    # and no CMA pool (the hook cannot tell a Pi 4, which must not get one, inside a build chroot).
    settings = f'\\n# OpenEgiz Edge image\\nROOTPART="LABEL={ROOT_LABEL}"\\nCONSOLES="tty0 ttyS1,115200"\\nCMA=0\\n'
    return [f"--customize-hook=printf '{settings}' >> \"$1/etc/default/raspi-firmware\"",
            '--customize-hook=chroot "$1" env DEB_MAINT_PARAMS=configure /etc/kernel/postinst.d/z50-raspi-firmware']


def apply_roles(rootfs: Path, wheels: Path, version: str) -> str:
    """`ansible/image.yml` with the root filesystem as its host; returns Ansible's output."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible/ansible.cfg"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_HOST_KEY_CHECKING": "0"}
    playbook = Path(sys.executable).with_name("ansible-playbook")
    output = run(playbook if playbook.exists() else "ansible-playbook", "-i", f"{rootfs},", "-c", "chroot",
                 ROOT / "ansible/image.yml", "-e", f"egiz_gateway_wheelhouse={wheels}",
                 "-e", f"egiz_gateway_version={version}", what="ansible-playbook (ansible/image.yml)", env=env)
    shutil.rmtree(rootfs / "root/.ansible", ignore_errors=True)  # Ansible's temporary files
    return output


def install_firstboot(rootfs: Path) -> None:
    target = rootfs / "usr/local/sbin/egiz-firstboot"
    shutil.copy2(FIRSTBOOT / "egiz-firstboot", target)
    target.chmod(0o755)
    shutil.copy2(FIRSTBOOT / "egiz-firstboot.service", rootfs / "etc/systemd/system/egiz-firstboot.service")
    chroot(rootfs, "systemctl", "enable", "egiz-firstboot.service", what="enabling the first-boot service")


def boot_files(rootfs: Path, work: Path, arch: str) -> Path:
    """The boot partition's content, in a directory; the root filesystem's /boot/firmware is left empty
    (the partition is mounted over it)."""
    boot = work / "boot"
    boot.mkdir()
    shutil.copy2(FIRSTBOOT / "egiz.toml", boot / "egiz.toml")
    firmware = rootfs / "boot/firmware"
    firmware.mkdir(parents=True, exist_ok=True)
    if arch == "arm64":  # the Pi's firmware, config.txt, cmdline.txt, device trees, kernel and initrd
        for f in firmware.iterdir():
            shutil.move(f, boot / f.name)
        return boot
    kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise ImageError("no kernel in the root filesystem")
    kversion = kernels[-1].name.removeprefix("vmlinuz-")
    shutil.copy2(kernels[-1], boot / "vmlinuz")
    shutil.copy2(rootfs / f"boot/initrd.img-{kversion}", boot / "initrd.img")
    (boot / "EFI/BOOT").mkdir(parents=True)
    shutil.copy2(rootfs / "usr/lib/systemd/boot/efi/systemd-bootx64.efi", boot / "EFI/BOOT/BOOTX64.EFI")
    (boot / "loader/entries").mkdir(parents=True)
    (boot / "loader/loader.conf").write_text("default egiz.conf\ntimeout 0\n")
    (boot / "loader/entries/egiz.conf").write_text(
        f"title OpenEgiz Edge gateway\nlinux /vmlinuz\ninitrd /initrd.img\noptions {KERNEL_ARGS}\n")
    (boot / "cmdline.txt").write_text(KERNEL_ARGS + "\n")  # for hypervisors that boot the kernel directly
    return boot


def package_manifest(rootfs: Path, arch: str, version: str) -> str:
    debs = chroot(rootfs, "dpkg-query", "-W", "-f", "${Package}\t${Version}\t${Architecture}\n", what="dpkg-query")
    wheels = chroot(rootfs, "/opt/egiz/current/bin/python", "-m", "pip", "freeze", "--all", what="pip freeze")
    return (f"# OpenEgiz Edge gateway image {version}, Debian {SUITE} {arch}\n"
            f"# Debian packages (name, version, architecture)\n{debs}\n"
            f"# Python packages in /opt/egiz/current\n{wheels}")


def assemble(rootfs: Path, boot: Path, work: Path, raw: Path, arch: str, free_mb: int) -> None:
    """A DOS-labelled disk: the FAT boot partition, then the ext4 root filesystem; no loop devices."""
    boot_img, root_img = work / "boot.img", work / "root.img"
    run("mformat", "-i", boot_img, "-C", "-T", str(BOOT_MB * 2048), "-v", BOOT_LABEL, "-F", "::", what="mformat")
    run("mcopy", "-i", boot_img, "-s", "-p", "-m", *sorted(boot.iterdir()), "::", what="mcopy")
    for cache in ("var/cache/apt/archives", "var/cache/apt", "var/lib/apt/lists"):
        for f in (rootfs / cache).glob("*"):
            if f.is_file():
                f.unlink()
    used_mb = int(run("du", "-sm", rootfs, what="du").split()[0])
    root_mb = used_mb + used_mb // 10 + free_mb  # + ext4's metadata (inode tables, journal)
    run("mkfs.ext4", "-q", "-F", "-L", ROOT_LABEL, "-E", "root_owner=0:0", "-d", rootfs, root_img, f"{root_mb}M",
        what="mkfs.ext4")
    boot_sectors, root_sectors = BOOT_MB * 2048, root_mb * 2048
    with raw.open("wb") as disk:
        disk.truncate((BOOT_START + boot_sectors + root_sectors) * SECTOR)
    layout = (f"label: dos\n{BOOT_START},{boot_sectors},{BOOT_PARTITION_TYPE[arch]},*\n"
              f"{BOOT_START + boot_sectors},{root_sectors},83\n")
    run("sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", raw, what="sfdisk", stdin=layout)
    for part, start in ((boot_img, BOOT_START), (root_img, BOOT_START + boot_sectors)):
        run("dd", f"if={part}", f"of={raw}", "bs=4M", "conv=notrunc,sparse", "oflag=seek_bytes",
            f"seek={start * SECTOR}", "status=none", what="dd")
        part.unlink()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
