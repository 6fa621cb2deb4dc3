"""The fleet's Ansible content: plain `ansible-lint` (production profile) and a syntax check of every playbook
pass, and the roles' configuration templates, rendered by Ansible, are accepted by the gateway's and
the aggregator's own configuration checks, secrets with quotes and backslashes included. The roles
themselves are applied for real by the image test (tests/test_image.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import SitePki

ANSIBLE = Path(__file__).resolve().parent.parent / "ansible"
BIN = Path(sys.executable).parent
# the kind of secret a vault holds: quotes, a backslash, non-ASCII
PASSWORD = 'mqtt "pass" \\ word ü 0123'
ADMIN_KEY = "admin-key-0123456789-'quoted'"
TOKEN = "uplink-token-0123456789"


def tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        message = f"needs {name}: pip install -e '.[dev]'"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return str(path)


def run(*args: str, cwd: Path = ANSIBLE) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "NO_COLOR": "1", "ANSIBLE_NOCOLOR": "1"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.timeout(300)
def test_ansible_lint_production_profile_passes() -> None:
    # as a user runs it: plain `ansible-lint` in ansible/ (its .ansible-lint asks for the production profile)
    r = run(tool("ansible-lint"), "--nocolor")
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "Profile 'production' was required, and it passed" in r.stdout + r.stderr


@pytest.mark.parametrize("playbook", ["site.yml", "image.yml"])
def test_playbook_syntax(playbook: str) -> None:
    r = run(tool("ansible-playbook"), "--syntax-check", playbook)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.timeout(180)
def test_the_roles_templates_make_configurations_the_services_accept(tmp_path: Path, site_pki: SitePki) -> None:
    roles = ANSIBLE / "roles"
    tls = {"gateway": tmp_path / "gateway-tls", "aggregator": tmp_path / "aggregator-tls"}
    for name, directory in tls.items():  # what the roles copy from the controller's site CA directory
        directory.mkdir()
        shutil.copy(site_pki.server[0], directory / f"{name}.crt")
        shutil.copy(site_pki.server[1], directory / f"{name}.key")
        shutil.copy(site_pki.ca, directory / "ca.crt")
    variables = {
        "egiz_gateway_tls_dir": str(tls["gateway"]), "egiz_aggregator_tls_dir": str(tls["aggregator"]),
        "ansible_python_interpreter": sys.executable,
        "mosquitto_port": 1884,
        "egiz_gateway_site": "izmir-bakery", "egiz_gateway_line": "line-a", "egiz_gateway_id": "gw-izmir-line-a",
        "egiz_gateway_data_dir": str(tmp_path / "data"),
        "egiz_gateway_mqtt_password": PASSWORD, "egiz_gateway_admin_key": ADMIN_KEY,
        "egiz_gateway_uplink_url": "https://aggregator.plant.example:8090", "egiz_gateway_uplink_token": TOKEN,
        "egiz_aggregator_backend": "postgres", "egiz_aggregator_postgres_local": True,
        "egiz_aggregator_admin_key": ADMIN_KEY,
        "egiz_aggregator_gateway_tokens": [{"gateway": "gw-izmir-line-a", "token": TOKEN, "site": "izmir-bakery",
                                            "line": "line-a"}],
    }
    renders = [(roles / "egiz_gateway/templates/gateway.toml.j2", tmp_path / "gateway.toml"),
               (roles / "egiz_aggregator/templates/aggregator.toml.j2", tmp_path / "aggregator.toml"),
               (roles / "mosquitto/templates/egiz.conf.j2", tmp_path / "mosquitto.conf")]
    playbook = tmp_path / "render.yml"
    playbook.write_text(json.dumps([{
        "name": "Render", "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars_files": [str(roles / "egiz_gateway/defaults/main.yml"), str(roles / "egiz_aggregator/defaults/main.yml"),
                       str(roles / "mosquitto/defaults/main.yml")],
        "tasks": [{"name": f"Render {src.name}", "ansible.builtin.template": {"src": str(src), "dest": str(dest),
                                                                                "mode": "0600"}}
                  for src, dest in renders],
    }]))
    (tmp_path / "vars.json").write_text(json.dumps(variables))
    r = run(tool("ansible-playbook"), "-i", "localhost,", str(playbook), "-e", f"@{tmp_path / 'vars.json'}",
            cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]

    gateway = tomllib.loads((tmp_path / "gateway.toml").read_text())
    assert gateway["mqtt"]["password"] == PASSWORD and gateway["mqtt"]["port"] == 1884
    assert gateway["auth"]["api_keys"] == [{"key": ADMIN_KEY, "role": "admin", "name": "fleet"}]
    assert gateway["broker"] == {"password_file": f"{tmp_path}/data/mosquitto/passwords",
                                 "acl_file": f"{tmp_path}/data/mosquitto/acl", "reload": ""}
    egiz = str(BIN / "egiz")
    check = subprocess.run([egiz, "gateway", "check", "--config", str(tmp_path / "gateway.toml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    checked = json.loads(check.stdout)
    assert checked["uplink"]["url"] == "https://aggregator.plant.example:8090"
    # TLS on by default: HTTPS for the API, the site CA for the uplink, plain HTTP only when asked
    assert checked["http"]["tls_cert_file"] == f"{tls['gateway']}/gateway.crt"
    assert checked["uplink"]["ca_file"] == f"{tls['gateway']}/ca.crt" and checked["uplink"]["allow_http"] is False

    aggregator = tomllib.loads((tmp_path / "aggregator.toml").read_text())
    assert aggregator["storage"]["dsn"] == "postgresql://egiz-aggregator@/egiz?host=/run/postgresql"
    assert aggregator["auth"]["gateway_tokens"][0]["token"] == TOKEN
    check = subprocess.run([egiz, "aggregator", "check", "--config", str(tmp_path / "aggregator.toml")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert json.loads(check.stdout)["http"]["tls_key_file"] == f"{tls['aggregator']}/aggregator.key"

    broker = (tmp_path / "mosquitto.conf").read_text().splitlines()
    # MQTTS for the network, plain MQTT on loopback for the gateway only
    for line in ("listener 1884 127.0.0.1", "listener 8883 0.0.0.0", "certfile /etc/mosquitto/certs/gateway.crt",
                 "allow_anonymous false", "persistence true",
                 "password_file /var/lib/egiz/mosquitto/passwords", "acl_file /var/lib/egiz/mosquitto/acl",
                 "max_inflight_messages 2000", "max_queued_messages 0", "max_queued_bytes 268435456",
                 "message_size_limit 262144", "max_packet_size 327688"):
        assert line in broker
