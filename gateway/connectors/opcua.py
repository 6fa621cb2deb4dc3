"""OPC UA devices (asyncua): data-change subscriptions with polling as the fallback, status codes as
quality, the node's SourceTimestamp as device time, security policies None and Basic256Sha256
(Sign, SignAndEncrypt), anonymous, user/password and certificate login, the server's certificate
pinned on first use or from a file; and `browse`, which lists a server's variables for the CLI.

Subscriptions: every tag is a monitored item of one subscription (the device's `publishing_ms`),
with its own sampling interval, queue size and absolute deadband applied by the server. A tag the
server refuses to monitor is polled instead, and so is every tag when the server refuses the
subscription itself; `mode = "poll"` polls everything with one Read request per cycle. While
subscribed, each `read()` is the liveness check the runner asks for: it reads the polled tags, or
the server's state when there are none, so a dead server is noticed within one poll interval.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from asyncua import Client, Node, ua
from asyncua.common.subscription import DataChangeNotif, Subscription
from asyncua.crypto import security_policies

from gateway.connectors.base import (
    Connector,
    DeviceError,
    ProtocolSpec,
    Quality,
    RawValue,
    ReadResult,
    SharedLinks,
    TagValue,
    WriteRefused,
    device_error_from,
    integer_to_write,
)
from gateway.connectors.config import OpcUaDevice, OpcUaTag

log = logging.getLogger(__name__)

APPLICATION_URI = "urn:openegiz:gateway"
SERVER_STATE = "i=2259"  # Server.ServerStatus.State: the liveness probe when nothing is polled
_MODES = {"Sign": ua.MessageSecurityMode.Sign, "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt}


def quality_of(status: ua.StatusCode | None) -> Quality:
    """Good, Uncertain or Bad, from the two top bits of an OPC UA status code."""
    if status is None or status.is_good():
        return "good"
    return "uncertain" if status.is_uncertain() else "bad"


def device_time(dv: ua.DataValue) -> float | None:
    """The value's SourceTimestamp as epoch seconds; None when the server did not stamp it."""
    ts = dv.SourceTimestamp
    if ts is None or ts.year < 1971:  # the OPC UA "null" time is 1601-01-01
        return None
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.timestamp()


def tag_value(value: Any) -> TagValue | None:
    """A variant's value as a tag holds it; None for what a tag cannot hold (arrays, structures)."""
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, ua.LocalizedText):
        return value.Text or ""
    return None


def raw_value(tag: OpcUaTag, dv: ua.DataValue) -> RawValue:
    """One DataValue as the tag's raw value: a Bad one carries no value, an unusable type is Bad."""
    quality = quality_of(dv.StatusCode)
    value = tag_value(dv.Value.Value) if dv.Value is not None and quality != "bad" else None
    if value is None:
        quality = "bad"
    return RawValue(tag, value, device_time(dv), quality)


def fingerprint(der: bytes) -> str:
    """SHA-256 of a certificate, as `AB:CD:...` the way certificate viewers show it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i:i + 2] for i in range(0, len(digest), 2))


def _first_certificate(blob: bytes) -> bytes:
    """The leaf certificate of a DER chain (servers may send their chain concatenated)."""
    from cryptography import x509

    if len(blob) > 4 and blob[0] == 0x30 and blob[1] == 0x82:
        length = int.from_bytes(blob[2:4], "big") + 4
        return blob[:length]
    return x509.load_pem_x509_certificate(blob).public_bytes(_der_encoding())


def _der_encoding() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER


def load_certificate_der(path: Path) -> bytes:
    """A certificate file (PEM or DER) as DER bytes; raises ValueError naming the file."""
    from cryptography import x509

    data = path.read_bytes()
    try:
        cert = x509.load_pem_x509_certificate(data) if b"-----BEGIN" in data else x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM or DER certificate") from exc
    der: bytes = cert.public_bytes(_der_encoding())
    return der


# --------------------------------------------------------------------------- errors
def _ua_failure(exc: BaseException, during: str) -> DeviceError | None:
    """What asyncua's own errors mean (status codes by name), or None for an error of another kind."""
    if isinstance(exc, ua.UaStatusCodeError):
        code = ua.StatusCode(exc.code)
        name = code.name
        if name in ("BadUserAccessDenied", "BadIdentityTokenRejected", "BadIdentityTokenInvalid",
                    "BadUserSignatureInvalid"):
            return DeviceError("auth_failed", f"{during}: the server refused the login ({name})")
        if name in ("BadSecurityChecksFailed", "BadCertificateInvalid", "BadCertificateUntrusted",
                    "BadSecurityPolicyRejected", "BadSecurityModeRejected"):
            return DeviceError("security_rejected", f"{during}: the server refused the secure channel ({name})")
        return DeviceError("status", f"{during}: {name}")
    if isinstance(exc, ua.UaError) and "certificate mismatch" in str(exc).lower():
        return DeviceError("certificate_mismatch", f"{during}: the server's certificate is not the pinned one")
    return None


def device_error(exc: BaseException, during: str) -> DeviceError:
    """Any failure of the client as a DeviceError with a short, stable reason."""
    return device_error_from(exc, during, _ua_failure)


# --------------------------------------------------------------------------- the connector
class _Handler:
    """asyncua's callback for data changes: each notification becomes a RawValue of its tag."""

    def __init__(self, tags: dict[str, OpcUaTag], push: Callable[[Sequence[RawValue]], None]) -> None:
        self.tags = tags
        self.push = push

    def datachange_notification(self, node: Node, val: Any, data: DataChangeNotif) -> None:
        tag = self.tags.get(node.nodeid.to_string())
        if tag is not None:
            self.push((raw_value(tag, data.monitored_item.Value),))

    def status_change_notification(self, status: ua.StatusChangeNotification) -> None:
        log.info("opcua subscription status changed", extra={"status": str(status.Status)})


class OpcUaConnector(Connector[OpcUaDevice, OpcUaTag]):
    """One session with one OPC UA server; values by subscription, by polling where that fails."""

    def __init__(self, device: OpcUaDevice, links: SharedLinks, *, state_dir: Path | None = None) -> None:
        super().__init__(device, links)
        self.cfg = device
        # where a certificate pinned on first use and a generated client certificate are kept
        if state_dir is None and links.state_dir is not None:
            state_dir = links.state_dir / "opcua"
        self.state_dir = state_dir
        self.client: Client | None = None
        self.subscription: Subscription | None = None
        self.tags: dict[str, OpcUaTag] = {}
        for tag in device.tags:
            if isinstance(tag, OpcUaTag) and not tag.calculated:
                self.tags[ua.NodeId.from_string(tag.node).to_string()] = tag
        self.polled: list[OpcUaTag] = list(self.tags.values())
        self.server_fingerprint = ""
        self._pinned: bytes | None = None  # pinned on first use, for this connector's life when there is no state_dir

    # ------------------------------------------------------------------ connection
    async def connect(self) -> None:
        cfg = self.cfg
        client = Client(cfg.url, timeout=cfg.timeout_s, watchdog_intervall=max(cfg.poll_s, 1.0))
        client.application_uri = APPLICATION_URI
        client.name = client.description = f"OpenEgiz gateway ({cfg.name})"
        try:
            # inside the runner's own guard (2x timeout_s), so a half-open session is closed here
            await asyncio.wait_for(self._open(client), timeout=cfg.timeout_s * 1.8)
        except Exception as exc:
            await _disconnect(client)
            raise device_error(exc, "connect") from exc
        self.client = client
        self.polled = list(self.tags.values())

    async def _open(self, client: Client) -> None:
        cfg = self.cfg
        if cfg.security_policy == "Basic256Sha256":
            await self._secure(client)
        if cfg.username:
            client.set_user(cfg.username)
            client.set_password(cfg.password)
        elif cfg.auth == "certificate":
            await client.load_client_certificate(cfg.certificate)
            await client.load_private_key(Path(cfg.private_key))
        await client.connect()

    async def _secure(self, client: Client) -> None:
        """Basic256Sha256: the client's certificate (generated once when none is given) and the pinned server's."""
        cfg = self.cfg
        if cfg.certificate:
            cert, key = Path(cfg.certificate), Path(cfg.private_key)
        elif self.state_dir is not None:
            cert, key = await client.setup_self_signed_certificate(
                self.state_dir / f"{cfg.name}-client.der", self.state_dir / f"{cfg.name}-client.pem")
        else:
            raise DeviceError("no_certificate",
                              "Basic256Sha256 needs a client certificate: set certificate and private_key")
        server_der = await self._server_certificate(client)
        self.server_fingerprint = fingerprint(server_der)
        await client.set_security(security_policies.SecurityPolicyBasic256Sha256, str(cert), str(key),
                                  server_certificate=server_der, mode=_MODES[cfg.security_mode])

    async def _server_certificate(self, client: Client) -> bytes:
        """The certificate to trust: from `server_certificate`, or the one pinned on first use.

        A first connection asks the server for its endpoints, stores the certificate it offers for
        the configured policy and mode, and trusts only that one from then on; asyncua then refuses
        a server that presents another (`certificate_mismatch`).
        """
        cfg = self.cfg
        if cfg.server_certificate:
            return load_certificate_der(Path(cfg.server_certificate))
        pin = self.pin_path
        if pin is not None and pin.exists():
            return pin.read_bytes()
        if self._pinned is not None:
            return self._pinned
        endpoints = await client.connect_and_get_server_endpoints()
        uri = security_policies.SecurityPolicyBasic256Sha256.URI
        offered = [e for e in endpoints if e.SecurityPolicyUri == uri and e.SecurityMode == _MODES[cfg.security_mode]]
        if not offered or not offered[0].ServerCertificate:
            raise DeviceError("security_rejected",
                              f"the server offers no Basic256Sha256 {cfg.security_mode} endpoint")
        der = _first_certificate(offered[0].ServerCertificate)
        self._pinned = der
        if pin is not None:
            pin.parent.mkdir(parents=True, exist_ok=True)
            pin.write_bytes(der)
            log.warning("opcua server certificate pinned on first use",
                        extra={"device": cfg.name, "fingerprint": fingerprint(der), "file": str(pin)})
        return der

    @property
    def pin_path(self) -> Path | None:
        """Where the server certificate pinned on first use is kept (None: pinned for this session only)."""
        return self.state_dir / f"{self.cfg.name}-server.der" if self.state_dir is not None else None

    async def close(self) -> None:
        client, self.client, self.subscription = self.client, None, None
        if client is not None:
            await _disconnect(client)

    # ------------------------------------------------------------------ values
    async def subscribe(self, push: Callable[[Sequence[RawValue]], None]) -> bool:
        cfg = self.cfg
        client = self._client()
        if cfg.mode != "subscribe" or not self.tags:
            return False
        try:
            sub = await client.create_subscription(cfg.publishing_ms, _Handler(self.tags, push))
        except ua.UaStatusCodeError as exc:
            log.warning("opcua server refused a subscription; polling instead",
                        extra={"device": cfg.name, "status": ua.StatusCode(exc.code).name})
            return False
        except Exception as exc:
            raise device_error(exc, "subscribe") from exc
        tags = list(self.tags.values())
        requests = [_monitor_request(client.get_node(t.node), t, i + 1, cfg.publishing_ms) for i, t in enumerate(tags)]
        try:
            results = await sub.create_monitored_items(requests)
        except Exception as exc:
            raise device_error(exc, "subscribe") from exc
        self.polled = [t for t, r in zip(tags, results, strict=True) if isinstance(r, ua.StatusCode)]
        for tag, result in zip(tags, results, strict=True):
            if isinstance(result, ua.StatusCode):
                log.warning("opcua server refused to monitor a node; polling it",
                            extra={"device": cfg.name, "node": tag.node, "status": result.name})
        self.subscription = sub
        return True

    async def read(self) -> ReadResult:
        client = self._client()
        try:
            if not self.polled:
                # subscribed: one cheap request proves the session is alive
                dv = await client.read_attributes([client.get_node(SERVER_STATE)])
                if dv and dv[0].StatusCode is not None and not dv[0].StatusCode.is_good():
                    raise DeviceError("status", f"server state unreadable: {dv[0].StatusCode.name}")
                return ReadResult((), 1)
            nodes = [client.get_node(t.node) for t in self.polled]
            dvs = await client.read_attributes(nodes)
        except DeviceError:
            raise
        except Exception as exc:
            raise device_error(exc, "read") from exc
        return ReadResult(tuple(raw_value(t, dv) for t, dv in zip(self.polled, dvs, strict=True)), 1)

    async def write(self, tag: OpcUaTag, value: TagValue) -> TagValue:
        if not isinstance(tag, OpcUaTag):
            raise WriteRefused(f"{tag.feature}.{tag.property} is not a tag of this device", device=self.cfg.name)
        client = self._client()
        node = client.get_node(tag.node)
        try:
            current = await node.read_data_value()
            vtype = current.Value.VariantType if current.Value is not None else ua.VariantType.Double
            await node.write_value(ua.DataValue(ua.Variant(_as_type(value, vtype), vtype)))
            back = await node.read_data_value()
        except WriteRefused:
            raise
        except ua.UaStatusCodeError as exc:
            name = ua.StatusCode(exc.code).name
            if name in ("BadNotWritable", "BadUserAccessDenied", "BadTypeMismatch", "BadOutOfRange"):
                raise WriteRefused(f"the server refused the write: {name}", device=self.cfg.name) from exc
            raise device_error(exc, "write") from exc
        except Exception as exc:
            raise device_error(exc, "write") from exc
        got = raw_value(tag, back)
        if got.value is None:
            raise DeviceError("status", f"read back of {tag.node} gave no value")
        return got.value

    def _client(self) -> Client:
        if self.client is None:
            raise DeviceError("not_connected", "not connected")
        return self.client


def _as_type(value: TagValue, vtype: ua.VariantType) -> Any:
    """A value converted to the node's variant type; WriteRefused when it does not fit."""
    if vtype == ua.VariantType.Boolean:
        return bool(value)
    if vtype == ua.VariantType.String:
        return str(value)
    if vtype in (ua.VariantType.Float, ua.VariantType.Double):
        return float(value)
    limits = {ua.VariantType.SByte: (-2**7, 2**7 - 1), ua.VariantType.Byte: (0, 2**8 - 1),
              ua.VariantType.Int16: (-2**15, 2**15 - 1), ua.VariantType.UInt16: (0, 2**16 - 1),
              ua.VariantType.Int32: (-2**31, 2**31 - 1), ua.VariantType.UInt32: (0, 2**32 - 1),
              ua.VariantType.Int64: (-2**63, 2**63 - 1), ua.VariantType.UInt64: (0, 2**64 - 1)}
    if vtype in limits:
        return integer_to_write(value, vtype.name, *limits[vtype])
    raise WriteRefused(f"writing a {vtype.name} is not supported")


def _monitor_request(node: Node, tag: OpcUaTag, handle: int, publishing_ms: float) -> ua.MonitoredItemCreateRequest:
    """A monitored item for the tag's Value: its sampling interval, queue size and absolute deadband."""
    flt = ua.DataChangeFilter()
    flt.Trigger = ua.DataChangeTrigger.StatusValue  # a change of status alone is reported too
    if tag.data_change_deadband > 0:
        flt.DeadbandType = ua.DeadbandType.Absolute
        flt.DeadbandValue = tag.data_change_deadband
    params = ua.MonitoringParameters()
    params.ClientHandle = handle
    params.SamplingInterval = tag.sampling_ms if tag.sampling_ms >= 0 else publishing_ms
    params.QueueSize = tag.queue_size
    params.DiscardOldest = True
    params.Filter = flt
    item = ua.ReadValueId()
    item.NodeId = node.nodeid
    item.AttributeId = ua.AttributeIds.Value
    req = ua.MonitoredItemCreateRequest()
    req.ItemToMonitor = item
    req.MonitoringMode = ua.MonitoringMode.Reporting
    req.RequestedParameters = params
    return req


async def _disconnect(client: Client) -> None:
    """Close a session whatever state it is in; never raises (the server may be gone)."""
    try:
        await asyncio.wait_for(client.disconnect(), timeout=2.0)
    except Exception as exc:  # the peer is gone or half-open: nothing left to close cleanly
        log.debug("opcua disconnect", extra={"error": f"{type(exc).__name__}: {exc}"})
        client.disconnect_socket()


# --------------------------------------------------------------------------- browse
@dataclass(frozen=True, slots=True)
class BrowsedNode:
    """One node found by `browse`: where it is, what it is and, for a variable, its type and value."""

    node: str
    path: str
    node_class: str
    datatype: str = ""
    value: str = ""
    writable: bool = False


@dataclass(frozen=True, slots=True)
class BrowseOptions:
    """How `browse` connects: the same security and login keys as a device."""

    url: str
    start: str = "i=85"  # the Objects folder
    depth: int = 4
    username: str = ""
    password: str = ""
    timeout_s: float = 5.0
    limit: int = 2000
    SKIP: ClassVar[frozenset[str]] = frozenset({"i=2253"})  # the Server object: standard, noisy


async def browse(opts: BrowseOptions) -> list[BrowsedNode]:
    """Walk the server's address space below `start`, depth first, up to `depth` levels and `limit` nodes."""
    client = Client(opts.url, timeout=opts.timeout_s)
    client.application_uri = APPLICATION_URI
    if opts.username:
        client.set_user(opts.username)
        client.set_password(opts.password)
    try:
        await asyncio.wait_for(client.connect(), timeout=opts.timeout_s * 3)
    except Exception as exc:
        await _disconnect(client)
        raise device_error(exc, "connect") from exc
    found: list[BrowsedNode] = []
    try:
        await _walk(client.get_node(opts.start), "", opts, found, 0)
    except DeviceError:
        raise
    except Exception as exc:
        raise device_error(exc, "browse") from exc
    finally:
        await _disconnect(client)
    return found


async def _walk(node: Node, path: str, opts: BrowseOptions, found: list[BrowsedNode], level: int) -> None:
    if level >= opts.depth or len(found) >= opts.limit:
        return
    for child in await node.get_children():
        if len(found) >= opts.limit:
            return
        nid = child.nodeid.to_string()
        if nid in opts.SKIP:
            continue
        name = (await child.read_browse_name()).Name
        cls = await child.read_node_class()
        here = f"{path}/{name}"
        if cls == ua.NodeClass.Variable:
            dv = await child.read_data_value(raise_on_bad_status=False)
            try:
                dtype = (await child.read_data_type_as_variant_type()).name
            except (ua.UaError, ValueError, KeyError):  # a structure or an abstract type: no variant type
                dtype = ""
            access = await child.read_attribute(ua.AttributeIds.UserAccessLevel)
            writable = bool(access.Value and access.Value.Value & ua.AccessLevel.CurrentWrite.mask)
            value = "" if dv.Value is None else str(dv.Value.Value)
            if dv.StatusCode is not None and not dv.StatusCode.is_good():
                value = f"{value} ({dv.StatusCode.name})".strip()
            found.append(BrowsedNode(nid, here, "Variable", dtype, value[:60], writable))
        else:
            found.append(BrowsedNode(nid, here, cls.name))
            await _walk(child, here, opts, found, level + 1)


PROTOCOL = ProtocolSpec("opcua", OpcUaDevice, OpcUaConnector)
