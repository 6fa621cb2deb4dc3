"""The gateway's SD-card image, built and booted for real.

One amd64 image is built per test module with `egiz image build` (mmdebstrap, the fleet's Ansible
roles through the chroot connection, the first-boot service, a raw disk assembled without loop
devices). The tests check the roles' results in its root filesystem and that a second run of the
roles changes nothing; then the image boots under qemu-system-x86_64 (KVM when it works here,
software emulation otherwise) with a test egiz.toml written onto its boot partition, and from the
host the gateway answers /ready and the broker takes the provisioned credentials and refuses
anonymous clients. It boots through its own UEFI boot loader when OVMF is installed, and from the
kernel and initrd on its boot partition otherwise. Logs go to test-artifacts/image/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import stat
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway import __version__
from gateway.broker import find_free_port
from tests.helpers import EGIZ

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "image"
TOOLS = ("mmdebstrap", "mkfs.ext4", "mformat", "mcopy", "mtype", "sfdisk", "zstd", "qemu-system-x86_64")
OVMF = (Path("/usr/share/OVMF/OVMF_CODE_4M.fd"), Path("/usr/share/OVMF/OVMF_VARS_4M.fd"))
BOOT_PARTITION = 2048 * 512  # byte offset of the FAT boot partition (images.build.BOOT_START)
MQTT_PASSWORD = 'image-test "mqtt" password 0123'
ADMIN_KEY = "image-test-admin-key-0123456789"


@dataclass(frozen=True)
class Image:
    out: Path
    raw: Path
    rootfs: Path
    wheelhouse: Path


def needs(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        needs(f"needs root and {', '.join(missing) or 'nothing else'}: "
              "apt-get install mmdebstrap mtools dosfstools fdisk zstd qemu-system-x86 ovmf")
    out = tmp_path_factory.mktemp("image")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    r = subprocess.run([EGIZ, "image", "build", "--arch", "amd64", "--out", str(out), "--keep-raw"],
                       capture_output=True, text=True, timeout=1500)
    (ARTIFACTS / "build.log").write_text(r.stdout + r.stderr)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    print(json.dumps({"figure": "image_build_amd64", "value": round(time.monotonic() - t0, 1), "unit": "s"}))
    work = out / "work-amd64"
    yield Image(out, out / "egiz-gateway-amd64.img", work / "rootfs", work / "wheelhouse")
    shutil.rmtree(out, ignore_errors=True)  # a few GB


def owner(root: Path, path: str) -> tuple[int, str, str]:
    """(mode, user, group) of `path` in the root filesystem, names from its own passwd and group."""
    st = (root / path.lstrip("/")).lstat()
    users = {int(f[2]): f[0] for f in (ln.split(":") for ln in (root / "etc/passwd").read_text().splitlines())}
    groups = {int(f[2]): f[0] for f in (ln.split(":") for ln in (root / "etc/group").read_text().splitlines())}
    return stat.S_IMODE(st.st_mode), users[st.st_uid], groups[st.st_gid]


@pytest.mark.timeout(1800)  # the first test to use the image also waits for its build
def test_the_image_its_checksum_manifest_and_partitions(image: Image) -> None:
    compressed = image.out / "egiz-gateway-amd64.img.zst"
    digest, name = (image.out / f"{compressed.name}.sha256").read_text().split()
    assert name == compressed.name
    assert subprocess.run(["sha256sum", str(compressed)], capture_output=True, text=True).stdout.split()[0] == digest
    manifest = (image.out / "egiz-gateway-amd64.manifest.txt").read_text()
    for package in ("mosquitto\t2.", "avahi-daemon\t", "linux-image-amd64\t", "systemd-sysv\t", "python3\t3.11"):
        assert re.search(rf"^{re.escape(package)}", manifest, re.M), package
    assert re.search(rf"^openegiz=={re.escape(__version__)}$", manifest, re.M)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(image.raw)], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == "dos"
    assert [(p["start"], p["type"], p.get("bootable", False)) for p in table["partitions"]] == [
        (2048, "ef", True), (2048 + 256 * 2048, "83", False)]
    listing = subprocess.run(["mdir", "-i", f"{image.raw}@@{BOOT_PARTITION}", "-/", "-b", "::"],
                             capture_output=True, text=True, check=True).stdout.split()
    for f in ("::/EFI/BOOT/BOOTX64.EFI", "::/loader/entries/egiz.conf", "::/vmlinuz", "::/initrd.img", "::/egiz.toml"):
        assert f in listing, listing


@pytest.mark.timeout(1800)  # the first test to use the image also waits for its build
def test_the_roles_left_a_gateway_in_the_root_filesystem(image: Image) -> None:
    root = image.rootfs
    passwd = (root / "etc/passwd").read_text()
    assert re.search(r"^egiz:x:\d+:\d+::/var/lib/egiz:/usr/sbin/nologin$", passwd, re.M), passwd
    mosquitto_group = next(ln for ln in (root / "etc/group").read_text().splitlines() if ln.startswith("mosquitto:"))
    assert "egiz" in mosquitto_group.split(":")[3].split(",")
    assert owner(root, "/etc/egiz") == (0o750, "root", "egiz")
    assert owner(root, "/var/lib/egiz") == (0o751, "egiz", "egiz")
    assert owner(root, "/var/lib/egiz/mosquitto") == (0o2750, "egiz", "mosquitto")
    for name in ("passwords", "acl"):  # empty until first boot: Mosquitto starts and refuses everyone
        assert owner(root, f"/var/lib/egiz/mosquitto/{name}") == (0o640, "egiz", "mosquitto")
        assert (root / "var/lib/egiz/mosquitto" / name).stat().st_size == 0
    # no secret is baked into the image: the configuration is a template until first boot
    assert not (root / "etc/egiz/gateway.toml").exists()
    assert owner(root, "/etc/egiz/gateway.toml.in") == (0o640, "root", "egiz")
    template = (root / "etc/egiz/gateway.toml.in").read_text()
    assert 'password = "@@mqtt_password@@"' in template and 'reload = ""' in template
    for line in ('tls_cert_file = "/etc/egiz/tls/gateway.crt"', 'ca_file = "@@uplink_ca_file@@"',
                 'model_signing_key = "@@model_signing_key@@"'):
        assert line in template
    assert owner(root, "/etc/egiz/tls") == (0o750, "root", "egiz")
    assert os.readlink(root / "opt/egiz/current") == f"/opt/egiz/releases/{__version__}"
    assert not (root / "opt/egiz/wheelhouse").exists()
    assert not (root / "root/.ansible").exists()

    wanted = {"multi-user": ["/etc/systemd/system/egiz-gateway.service", "/etc/systemd/system/egiz-firstboot.service",
                             "/lib/systemd/system/mosquitto.service", "/lib/systemd/system/avahi-daemon.service",
                             "/lib/systemd/system/systemd-networkd.service"],
              "paths": ["/etc/systemd/system/egiz-mosquitto-reload.path"],
              "getty": ["/lib/systemd/system/serial-getty@.service"]}
    for target, units in wanted.items():
        for unit in units:
            name = "serial-getty@ttyS0.service" if "@" in unit else Path(unit).name
            assert os.readlink(root / f"etc/systemd/system/{target}.target.wants/{name}") == unit
    unit = (root / "etc/systemd/system/egiz-gateway.service").read_text().splitlines()
    for line in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "User=egiz", "NoNewPrivileges=true",
                 "ProtectSystem=strict", "ReadWritePaths=/var/lib/egiz", "PrivateTmp=true",
                 "ExecStart=/opt/egiz/current/bin/egiz gateway run --config /etc/egiz/gateway.toml"):
        assert line in unit
    reload_unit = (root / "etc/systemd/system/egiz-mosquitto-reload.service").read_text()
    assert "systemctl try-reload-or-restart mosquitto.service" in reload_unit
    broker = (root / "etc/mosquitto/conf.d/egiz.conf").read_text().splitlines()
    for line in ("listener 1883 127.0.0.1", "listener 8883 0.0.0.0", "certfile /etc/mosquitto/certs/gateway.crt",
                 "allow_anonymous false", "password_file /var/lib/egiz/mosquitto/passwords",
                 "acl_file /var/lib/egiz/mosquitto/acl", "persistence true", "max_inflight_messages 2000",
                 "max_queued_messages 0"):
        assert line in broker
    assert "SystemMaxUse=200M" in (root / "etc/systemd/journald.conf.d/egiz.conf").read_text()
    assert (root / "etc/machine-id").read_text() == ""  # every gateway makes its own on first boot
    r = subprocess.run(["chroot", str(root), "/opt/egiz/current/bin/python", "-c",
                        "import gateway, cloud_sync, duckdb, onnxruntime, pyarrow; print(gateway.__version__)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == __version__, r.stderr


@pytest.mark.timeout(1800)  # the first test to use the image also waits for its build
def test_a_second_run_of_the_roles_changes_nothing(image: Image) -> None:
    from images.build import apply_roles

    output = apply_roles(image.rootfs, image.wheelhouse, __version__)
    (ARTIFACTS / "second-run.log").write_text(output)
    recap = re.search(r"ok=(\d+)\s+changed=(\d+)\s+unreachable=0\s+failed=0", output)
    assert recap and int(recap.group(1)) > 10 and int(recap.group(2)) == 0, output[-3000:]


def mqtt_connect(port: int, user: str | None, password: str | None, tls: ssl.SSLContext) -> int | None:
    """The broker's CONNACK code for these credentials over TLS (0: accepted), None when it never answered."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"image-test-{user}-{time.monotonic_ns()}")
    client.tls_set_context(tls)
    if user is not None:
        client.username_pw_set(user, password)
    result: dict[str, int] = {}
    client.on_connect = lambda c, u, flags, rc, props=None: result.setdefault("rc", int(rc.value))
    client.connect("127.0.0.1", port, 10)
    deadline = time.monotonic() + 15
    while "rc" not in result and time.monotonic() < deadline:
        client.loop(0.2)
    client.disconnect()
    return result.get("rc")


def kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def start_vm(disk: Path, tmp: Path, http: int, mqtt: int, console: Path, accel: str) -> subprocess.Popen[bytes]:
    boot = f"{disk}@@{BOOT_PARTITION}"
    if all(f.exists() for f in OVMF):  # the PC's way: UEFI firmware, then the image's systemd-boot
        shutil.copy(OVMF[1], tmp / "vars.fd")
        firmware = ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF[0]}",
                    "-drive", f"if=pflash,format=raw,file={tmp / 'vars.fd'}"]
    else:  # the kernel, initrd and command line from the boot partition
        for name in ("vmlinuz", "initrd.img", "cmdline.txt"):
            subprocess.run(["mcopy", "-o", "-i", boot, f"::{name}", str(tmp / name)], check=True)
        firmware = ["-kernel", str(tmp / "vmlinuz"), "-initrd", str(tmp / "initrd.img"),
                    "-append", (tmp / "cmdline.txt").read_text().strip()]
    return subprocess.Popen([
        "qemu-system-x86_64", "-accel", accel, "-cpu", "host" if accel == "kvm" else "max", "-m", "1536", "-smp", "2",
        *firmware, "-drive", f"file={disk},format=raw,if=virtio", "-no-reboot",
        "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{http}-:8080,hostfwd=tcp:127.0.0.1:{mqtt}-:8883",
        "-device", "virtio-net-pci,netdev=n0", "-serial", f"file:{console}", "-monitor", "none", "-display", "none",
    ], stdout=subprocess.DEVNULL, stderr=(tmp / f"qemu-{accel}.err").open("wb"))


KVM_SILENT_S = 30.0  # a KVM guest that prints nothing on its console this long is taken as stuck


def kvm_guest_runs(vm: subprocess.Popen[bytes], err: Path, console: Path, *, silent_s: float = KVM_SILENT_S,
                   interval: float = 0.2) -> bool:
    """Whether a VM started with KVM really runs: False as soon as qemu exits or reports a KVM internal
    error (often so in nested virtual machines), or when the guest prints nothing on its console for
    `silent_s` (seen on machines whose /dev/kvm exists but runs no guest); True once it prints."""
    deadline = time.monotonic() + silent_s
    while time.monotonic() < deadline:
        if vm.poll() is not None or (err.exists() and b"KVM internal error" in err.read_bytes()):
            return False
        if console.exists() and console.stat().st_size > 0:
            return True
        time.sleep(interval)
    return False


def boot_vm(disk: Path, tmp: Path, http: int, mqtt: int, console: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start the VM with KVM; if KVM fails or the guest stays silent, emulate (TCG) instead."""
    if kvm_usable():
        vm = start_vm(disk, tmp, http, mqtt, console, "kvm")
        if kvm_guest_runs(vm, tmp / "qemu-kvm.err", console):
            return vm, "kvm"
        vm.kill()
        vm.wait(30)
        console.unlink(missing_ok=True)
    return start_vm(disk, tmp, http, mqtt, console, "tcg"), "tcg"


def fake_qemu(tmp: Path, script: str) -> subprocess.Popen[bytes]:
    """A process standing in for qemu (a shell script: what it prints and when), stderr to qemu-kvm.err."""
    return subprocess.Popen(["sh", "-c", script], cwd=tmp, stdout=subprocess.DEVNULL,
                            stderr=(tmp / "qemu-kvm.err").open("wb"))


@pytest.mark.parametrize(("script", "runs"), [
    ("sleep 1; echo 'Linux version 6.1' > console.log; sleep 30", True),  # a guest that boots
    ("sleep 30", False),  # /dev/kvm exists, the guest prints nothing: fall back
    ("echo 'KVM internal error. Suberror: 1' >&2; sleep 30", False),
    ("exit 1", False),  # qemu refused to start
])
def test_kvm_fallback_to_emulation(tmp_path: Path, script: str, runs: bool) -> None:
    vm = fake_qemu(tmp_path, script)
    try:
        t0 = time.monotonic()
        assert kvm_guest_runs(vm, tmp_path / "qemu-kvm.err", tmp_path / "console.log", silent_s=3) is runs
        if script == "sleep 30":
            assert time.monotonic() - t0 >= 3  # it waited the silent period, not less
    finally:
        vm.kill()
        vm.wait(10)


@pytest.mark.timeout(2100)
def test_the_image_boots_provisions_itself_and_serves(image: Image, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    subprocess.run(["cp", "--sparse=always", str(image.raw), str(disk)], check=True)
    size = disk.stat().st_size
    with disk.open("r+b") as f:  # a card larger than the image: first boot grows the root partition
        f.truncate(size + 512 * 2**20)
    boot = f"{disk}@@{BOOT_PARTITION}"
    (tmp_path / "egiz.toml").write_text(f"""
[gateway]
site = "izmir-bakery"
line = "line-a"
id = "gw-image-test"
[secrets]
mqtt_password = {json.dumps(MQTT_PASSWORD)}
admin_key = "{ADMIN_KEY}"
""")
    subprocess.run(["mcopy", "-o", "-i", boot, str(tmp_path / "egiz.toml"), "::egiz.toml"], check=True)
    http, mqtt = find_free_port(), find_free_port()
    console = ARTIFACTS / "console.log"
    console.unlink(missing_ok=True)
    t0 = time.monotonic()
    vm, accel = boot_vm(disk, tmp_path, http, mqtt, console)
    try:
        status, deadline = None, t0 + (180 if accel == "kvm" else 480)
        while time.monotonic() < deadline and vm.poll() is None:
            try:  # liveness only: the card's CA certificate is read from its boot partition below
                with urllib.request.urlopen(f"https://127.0.0.1:{http}/ready", timeout=3,
                                            context=ssl._create_unverified_context()) as r:
                    status = r.status
                if status == 200:
                    break
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(1)
        booted = time.monotonic() - t0
        log = console.read_text(errors="replace") if console.exists() else ""
        assert status == 200, f"no /ready after {booted:.0f} s ({accel}); console:\n{log[-4000:]}"
        print(json.dumps({"figure": "image_boot_to_ready", "value": round(booted, 1), "unit": "s",
                          "accel": accel, "firmware": "uefi" if all(f.exists() for f in OVMF) else "direct kernel"}))

        # HTTPS and MQTTS by default, from a CA the card made itself and left on its boot partition
        ca = subprocess.run(["mtype", "-i", boot, "::egiz-gateway-ca.crt"], capture_output=True, text=True,
                            check=True).stdout
        tls = ssl.create_default_context(cadata=ca)
        tls.check_hostname = False  # reached through 127.0.0.1 here; the certificate names izmir-bakery-line-a.local
        assert mqtt_connect(mqtt, "egiz-gateway", MQTT_PASSWORD, tls) == 0
        assert mqtt_connect(mqtt, None, None, tls) in (5, 135)  # not authorised
        assert mqtt_connect(mqtt, "egiz-gateway", "a wrong password", tls) in (4, 5, 134, 135)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"https://127.0.0.1:{http}/api/v1/things", timeout=5, context=tls)
        assert refused.value.code == 401
        request = urllib.request.Request(f"https://127.0.0.1:{http}/api/v1/things",
                                         headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        with urllib.request.urlopen(request, timeout=5, context=tls) as r:
            assert r.status == 200
        log = console.read_text(errors="replace")
        assert "egiz-firstboot: provisioned izmir-bakery/line-a as gw-image-test" in log
        assert "egiz-firstboot: host name izmir-bakery-line-a" in log
        assert "egiz-firstboot: TLS certificate for izmir-bakery-line-a.local from this card's own CA" in log
        assert "egiz-firstboot: grew /dev/vda2" in log
    finally:
        vm.kill()
        vm.wait(30)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    root_end = table["partitions"][1]["start"] + table["partitions"][1]["size"]
    assert root_end > size // 512 + 2048 * 500  # grown into the extra 512 MiB (growpart keeps alignment)
    applied = subprocess.run(["mtype", "-i", boot, "::egiz.toml.applied"], capture_output=True, text=True).stdout
    assert 'id = "gw-image-test"' in applied and MQTT_PASSWORD not in applied and ADMIN_KEY not in applied
    assert subprocess.run(["mtype", "-i", boot, "::egiz.toml"], capture_output=True).returncode != 0
