"""What both brokers share: their settings, their error and their lifecycle.

`BrokerSettings` is what a broker is told (docs/broker.md says why each default is what it is);
`gateway.broker.mosquitto` renders it as a Mosquitto configuration, `gateway.broker.embedded`
honours the same limits in process.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from gateway.common.errors import EgizError

INSTALL_HINT = "apt-get install mosquitto"


class BrokerError(EgizError, OSError):
    """A broker could not be started or stopped; `log_tail` carries the broker's own last lines.

    It is also an OSError, like the other reasons a service cannot start (a port in use, an
    unreadable file), so callers that report start-up failures handle it without a special case.
    """

    code = "broker_error"

    def __init__(self, detail: str, *, log_tail: str = "") -> None:
        super().__init__(detail, log_tail=log_tail)
        self.log_tail = log_tail

    def __str__(self) -> str:
        return f"{self.detail}\n{self.log_tail}" if self.log_tail else self.detail


_EXPIRATION_RE = re.compile(r"^[1-9][0-9]*[hdwmy]\Z")
# Room for the fixed header, a topic of up to 65535 bytes and a packet id on top of the payload, so
# that every publish within `message_size_limit` passes `max_packet_size`.
_PUBLISH_OVERHEAD = 5 + 2 + 65535 + 2
MQTT_MAX_PAYLOAD = 268_435_455


@dataclass(frozen=True)
class BrokerSettings:
    """What the broker is told; docs/broker.md says why each default is what it is."""

    port: int
    data_dir: Path  # persistence database, generated mosquitto.conf, broker log
    host: str = "127.0.0.1"
    allow_anonymous: bool = False
    password_file: Path | None = None
    acl_file: Path | None = None
    # ~100 ms of traffic at 20k msg/s may wait for the gateway's after-processing PUBACKs.
    max_inflight_messages: int = 2000
    # A restarting gateway must find its backlog intact: no count limit (0), bounded by memory.
    max_queued_messages: int = 0
    max_queued_bytes: int = 256 * 2**20
    # Larger publishes are dropped (and acknowledged, so a sender does not resend them forever).
    message_size_limit: int = 256 * 2**10
    persistence: bool = True
    autosave_interval_s: int = 60
    persistent_client_expiration: str = "14d"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    require_certificate: bool = False

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.port <= 65535:
            problems.append("port: must be a TCP port 1..65535")
        if not 0 <= self.max_inflight_messages <= 65535:
            problems.append("max_inflight_messages: must be 0 (no limit) .. 65535")
        for name in ("max_queued_messages", "max_queued_bytes", "autosave_interval_s"):
            if getattr(self, name) < 0:
                problems.append(f"{name}: must be >= 0")
        if not 1 <= self.message_size_limit <= MQTT_MAX_PAYLOAD - _PUBLISH_OVERHEAD:
            problems.append(f"message_size_limit: must be 1..{MQTT_MAX_PAYLOAD - _PUBLISH_OVERHEAD}")
        if not _EXPIRATION_RE.match(self.persistent_client_expiration):
            problems.append("persistent_client_expiration: must be a number and one of h d w m y, e.g. 14d")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append("tls_cert_file: tls_cert_file and tls_key_file must be given together")
        if self.require_certificate and (self.tls_ca_file is None or self.tls_cert_file is None):
            problems.append("require_certificate: needs tls_ca_file, tls_cert_file and tls_key_file")
        for name in ("host", "data_dir", "password_file", "acl_file", "tls_cert_file", "tls_key_file",
                     "tls_ca_file"):
            value = getattr(self, name)
            if value is not None and any(c in str(value) for c in "\r\n\0"):
                problems.append(f"{name}: must not contain line breaks")
        if problems:
            raise ValueError("invalid broker settings: " + "; ".join(problems))

    @property
    def max_packet_size(self) -> int:
        """Hard limit on any MQTT packet: larger ones disconnect the client instead of being read."""
        return self.message_size_limit + _PUBLISH_OVERHEAD

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None



def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (good enough for tests and the demo)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])



class _Broker:
    """The lifecycle both brokers share; each is also an async context manager."""

    kind: str
    settings: BrokerSettings

    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        return self.settings.port

    @property
    def running(self) -> bool:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def kill(self) -> None:
        raise NotImplementedError

    async def restart(self) -> None:
        """Stop (saving what the broker keeps) and start again on the same port."""
        await self.stop()
        await self.start()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


