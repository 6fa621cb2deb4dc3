"""A simulated PLC's OPC UA server (asyncua): one machine's information model under
`Objects/{Type}`, node ids `ns=2;s={Type}.{Point}` (e.g. `ns=2;s=Proofer.Temperature`), values
stamped with the model's time as SourceTimestamp, setpoints writable.

Security as a plant's server would offer it: the None policy and/or Basic256Sha256 with Sign and
SignAndEncrypt (a self-signed server certificate is made when none is given), anonymous and/or
user/password login.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from asyncua import Node, Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.user_managers import UserManager

from gateway.sim.plc_image import PlcPoint, PlcValues

log = logging.getLogger(__name__)

NAMESPACE = "urn:openegiz:sim-plc"
_POLICIES = {
    "None": ua.SecurityPolicyType.NoSecurity,
    "Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
    "SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
}
_VARIANTS = {"real": ua.VariantType.Double, "int": ua.VariantType.Int32, "bool": ua.VariantType.Boolean,
             "string": ua.VariantType.String}
_INITIAL: dict[str, Any] = {"real": 0.0, "int": 0, "bool": False, "string": ""}


@dataclass(frozen=True)
class OpcUaServe:
    """Where and how the server listens; `modes` among None, Sign, SignAndEncrypt."""

    host: str = "127.0.0.1"
    port: int = 4840
    modes: tuple[str, ...] = ("None",)
    certificate: Path | None = None  # the server's certificate and key (PEM or DER); generated when absent
    private_key: Path | None = None
    cert_dir: Path | None = None  # where a generated certificate is kept
    users: Mapping[str, str] = field(default_factory=dict, repr=False)  # user name -> password
    user_certificates: tuple[Path, ...] = ()  # clients that may log in with these certificates (X.509 login)
    anonymous: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in _POLICIES]
        if unknown or not self.modes:
            raise ValueError(f"security modes are None, Sign, SignAndEncrypt (not {unknown or 'nothing'})")
        if not self.anonymous and not self.users and not self.user_certificates:
            raise ValueError("without anonymous login the server needs at least one user or user certificate")

    @property
    def url(self) -> str:
        return f"opc.tcp://{self.host}:{self.port}"


class _Users(UserManager):
    """asyncua's user manager: user/password from the table, X.509 login with a listed certificate,
    anonymous when allowed (asyncua refuses a token type the server does not offer before this)."""

    def __init__(self, users: Mapping[str, str], certificates: set[bytes], anonymous: bool) -> None:
        self.users = dict(users)
        self.certificates = certificates
        self.anonymous = anonymous

    def get_user(self, iserver: Any, username: str | None = None, password: str | None = None,
                 certificate: Any = None) -> User | None:
        if username is not None:
            return User(role=UserRole.User, name=username) if self.users.get(username) == password else None
        if certificate is not None and certificate in self.certificates:
            return User(role=UserRole.User, name="certificate")
        return User(role=UserRole.User) if self.anonymous else None


class OpcUaPlc:
    """The OPC UA face of a simulated PLC; `start()` again after `stop()` serves the same nodes again."""

    def __init__(self, serve: OpcUaServe, equipment_type: str, points: tuple[PlcPoint, ...]) -> None:
        self.serve = serve
        self.prefix = equipment_type.capitalize()
        self.points = points
        self.server: Server | None = None
        self.running = False
        self.nodes: dict[str, Node] = {}
        self.last: PlcValues = {}
        self.ns = 2

    def node_id(self, point: str) -> str:
        """The node id of a point, as a client configures it."""
        return f"ns={self.ns};s={self.prefix}.{point}"

    async def start(self) -> None:
        """Listen; the address space is built once (asyncua takes seconds for it), a restart only listens again."""
        if self.server is None:
            self.server = await self._build()
        await self.server.start()
        self.running = True
        log.info("opcua plc listening", extra={"url": self.serve.url, "modes": ",".join(self.serve.modes)})

    async def _build(self) -> Server:
        s = self.serve
        server = Server(user_manager=_Users(s.users, {_der(p) for p in s.user_certificates}, s.anonymous))
        await server.init()
        server.set_endpoint(f"opc.tcp://{s.host}:{s.port}")
        server.set_server_name(f"OpenEgiz simulated {self.prefix} PLC")
        await server.set_application_uri(f"{NAMESPACE}:{self.prefix.lower()}")
        server.set_security_policy([_POLICIES[m] for m in s.modes])
        tokens: list[type] = [ua.UserNameIdentityToken] if s.users else []
        if s.user_certificates:
            tokens.append(ua.X509IdentityToken)
        if s.anonymous:
            tokens.append(ua.AnonymousIdentityToken)
        server.set_identity_tokens(tokens)
        if any(m != "None" for m in s.modes):
            cert, key = await self._certificate(server)
            await server.load_certificate(str(cert))
            await server.load_private_key(str(key))
        self.ns = await server.register_namespace(NAMESPACE)
        folder = await server.nodes.objects.add_object(f"ns={self.ns};s={self.prefix}", f"{self.ns}:{self.prefix}")
        self.nodes = {}
        for p in self.points:
            initial = _INITIAL[p.kind]
            var = await folder.add_variable(self.node_id(p.name), f"{self.ns}:{p.name}",
                                            ua.Variant(initial, _VARIANTS[p.kind]))
            if p.writable:
                await var.set_writable()
            if p.unit:
                await var.add_property(self.ns, "EngineeringUnits", p.unit)
            self.nodes[p.name] = var
        return server

    async def _certificate(self, server: Server) -> tuple[Path, Path]:
        s = self.serve
        if s.certificate is not None and s.private_key is not None:
            return s.certificate, s.private_key
        from asyncua.crypto.cert_gen import setup_self_signed_certificate
        from cryptography.x509.oid import ExtendedKeyUsageOID

        base = s.cert_dir or Path("opcua-sim-pki")
        cert, key = base / "server-cert.der", base / "server-key.pem"
        base.mkdir(parents=True, exist_ok=True)
        await setup_self_signed_certificate(key, cert, server.get_application_uri(), s.host,
                                            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], {})
        return cert, key

    async def stop(self) -> None:
        """Stop listening and drop every session (a PLC that lost power, as its clients see it)."""
        if self.server is not None and self.running:
            self.running = False
            await self.server.stop()

    async def publish(self, values: PlcValues, ts: float) -> None:
        stamp = _ua_time(ts)
        kinds = {p.name: p.kind for p in self.points}
        for name, value in values.items():
            var = self.nodes.get(name)
            if var is None:
                continue
            if kinds[name] in ("real",):
                value = float(value)
            await var.write_value(ua.DataValue(ua.Variant(value, _VARIANTS[kinds[name]]), SourceTimestamp=stamp,
                                               ServerTimestamp=stamp))
            self.last[name] = value

    async def set_status(self, name: str, status: int, value: Any = None) -> None:
        """Give a point a status code (a failed sensor: BadSensorFailure; a doubtful one: Uncertain...)."""
        var = self.nodes[name]
        kind = next(p.kind for p in self.points if p.name == name)
        now = _ua_time(time.time())
        variant = ua.Variant(self.last.get(name, _INITIAL[kind]) if value is None else value, _VARIANTS[kind])
        await var.write_value(ua.DataValue(variant, StatusCode=ua.StatusCode(ua.UInt32(status)), SourceTimestamp=now,
                                           ServerTimestamp=now))

    async def written(self) -> PlcValues:
        out: PlcValues = {}
        for p in self.points:
            if p.writable and p.name in self.nodes:
                out[p.name] = await self.nodes[p.name].read_value()
        return out


def _ua_time(ts: float) -> ua.DateTime:
    """Epoch seconds as the DateTime asyncua's types ask for (a datetime subclass)."""
    d = datetime.fromtimestamp(ts, UTC)
    return ua.DateTime(d.year, d.month, d.day, d.hour, d.minute, d.second, d.microsecond, tzinfo=UTC)


def _der(path: Path) -> bytes:
    """A certificate file (PEM or DER) as DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    data = path.read_bytes()
    cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    return cert.public_bytes(Encoding.DER)
