"""The typed configuration of the connectors: `[[connectors.modbus]]`, `[[connectors.opcua]]`,
`[[connectors.s7]]`, each device with its `tags`; and the checks types cannot express.

Light on purpose: loading a config never imports a protocol library. Every check returns
`(dotted key below the device, message)` so the gateway's config names the bad key exactly.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

from gateway.common.names import EQUIPMENT_RE, NAME_RE, TYPE_RE
from gateway.connectors.base import DeviceConfig, TagConfig

DEVICE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
Problems = list[tuple[str, str]]

ModbusTable = Literal["holding", "input", "coil", "discrete"]
ModbusType = Literal["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "bool",
                     "string"]
REGISTER_WORDS: dict[str, int] = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "int64": 4, "uint64": 4,
                                  "float32": 2, "float64": 4, "bool": 1}


def tag_problems(tag: TagConfig) -> Iterator[tuple[str, str]]:
    """The checks every protocol's tag shares."""
    if not NAME_RE.match(tag.feature):
        yield "feature", "must be an identifier: letters, digits, _ (starting with a letter or _)"
    if not NAME_RE.match(tag.property):
        yield "property", "must be an identifier: letters, digits, _ (starting with a letter or _)"
    if tag.scale == 0:
        yield "scale", "must not be 0"
    if tag.min > tag.max:
        yield "min", "must be <= max"
    if tag.deadband < 0:
        yield "deadband", "must be >= 0"
    if tag.calculated and tag.writable:
        yield "writable", "a calculated tag cannot be written"
    from gateway.connectors.normalise import expression_problem, unit_problem  # pint loads lazily

    for key in ("unit", "to_unit"):
        msg = unit_problem(getattr(tag, key))
        if msg:
            yield key, msg
    if tag.to_unit and not tag.unit:
        yield "to_unit", "give the device's unit too"
    elif tag.to_unit:
        msg = unit_problem(tag.unit, tag.to_unit)
        if msg:
            yield "to_unit", msg
    if tag.calculated:
        msg = expression_problem(tag.expression)
        if msg:
            yield "expression", msg


def device_problems(dev: DeviceConfig) -> list[tuple[str, str]]:
    """The checks every protocol's device shares, then its own, then its tags'.

    A check whose input had the wrong type (already reported by the loader) is skipped, never raised.
    """
    out: list[tuple[str, str]] = []
    _collect(out, "", lambda: _common_problems(dev))
    _collect(out, "", dev.device_problems)  # type: ignore[attr-defined]
    seen: set[tuple[str, str]] = set()
    names = {t.property for t in dev.tags if isinstance(t, TagConfig)}
    for i, tag in enumerate(dev.tags or ()):
        if not isinstance(tag, TagConfig):
            continue
        prefix = f"tags[{i}]."
        _collect(out, prefix, functools.partial(tag_problems, tag))
        if tag.key in seen:
            out.append((f"{prefix}property", f"{tag.feature}.{tag.property} is given twice"))
        seen.add(tag.key)
        if tag.calculated:
            _collect(out, prefix, functools.partial(_expression_names_problems, tag, names))
        else:
            _collect(out, prefix, functools.partial(dev.tag_address_problems, tag))  # type: ignore[attr-defined]
    return out


def _collect(out: list[tuple[str, str]], prefix: str, problems: Callable[[], Iterable[tuple[str, str]]]) -> None:
    try:
        for key, msg in problems():
            out.append((prefix + key, msg))
    except (TypeError, AttributeError, KeyError, ValueError, AssertionError):
        pass  # an input of the wrong type, reported by the loader


def _expression_names_problems(tag: TagConfig, names: set[str]) -> Iterator[tuple[str, str]]:
    from gateway.connectors.normalise import expression_names, expression_problem

    if not expression_problem(tag.expression):
        unknown = sorted(expression_names(tag.expression) - names)
        if unknown:
            yield "expression", f"names no tag of this device: {', '.join(unknown)}"


def _common_problems(dev: DeviceConfig) -> Iterator[tuple[str, str]]:
    if not DEVICE_NAME_RE.match(dev.name):
        yield "name", "must be 1-64 chars of letters, digits, '.', '_', '-'"
    if not EQUIPMENT_RE.match(dev.thing):
        yield "thing", "must be an equipment id: letters, digits, '.', '_', '-'"
    if not TYPE_RE.match(dev.type):
        yield "type", "must be lowercase letters, digits, _ or - (e.g. 'oven')"
    if not 0.01 <= dev.poll_s <= 86_400:
        yield "poll_s", "must be 0.01..86400 seconds"
    if not 0.05 <= dev.timeout_s <= 600:
        yield "timeout_s", "must be 0.05..600 seconds"
    if dev.offset_s > 86_400:
        yield "offset_s", "must be < 0 (automatic) or 0..86400 seconds"
    if not 0.001 <= dev.retry_min_s <= 3600:
        yield "retry_min_s", "must be 0.001..3600 seconds"
    if not (dev.retry_max_s == 0 or dev.retry_min_s <= dev.retry_max_s <= 3600):
        yield "retry_max_s", "must be 0 (the poll interval) or retry_min_s..3600 seconds"
    if not 1 <= dev.breaker_failures <= 1000:
        yield "breaker_failures", "must be 1..1000"
    if not 0 <= dev.breaker_probe_s <= 3600:
        yield "breaker_probe_s", "must be 0 (the backoff cap) or up to 3600 seconds"
    if not dev.tags:
        yield "tags", "give at least one tag"


# --------------------------------------------------------------------------- Modbus
@dataclass(frozen=True, slots=True)
class ModbusEndpoint:
    """Where a Modbus device is: `tcp://host:port`, `rtu+tcp://host:port` or
    `rtu:///dev/ttyUSB0?baud=19200&parity=E&stopbits=1&bytesize=8`."""

    transport: Literal["tcp", "rtu", "rtu+tcp"]
    host: str = ""
    port: int = 502
    serial_port: str = ""
    baud: int = 19200
    parity: Literal["N", "E", "O"] = "E"
    stopbits: int = 1
    bytesize: int = 8

    @classmethod
    def parse(cls, url: str) -> ModbusEndpoint:
        """Raises ValueError naming what is wrong."""
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(url)
        if parts.scheme in ("tcp", "rtu+tcp"):
            if not parts.hostname or parts.path not in ("", "/") or parts.query:
                raise ValueError(f"must be {parts.scheme}://host:port")
            try:
                port = parts.port or 502
            except ValueError:
                raise ValueError("the port must be 1..65535") from None
            return cls("tcp" if parts.scheme == "tcp" else "rtu+tcp", host=parts.hostname, port=port)
        if parts.scheme == "rtu":
            if parts.netloc or not parts.path:
                raise ValueError("must be rtu:///dev/ttyUSB0?baud=19200&parity=E")
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            unknown = sorted(set(query) - {"baud", "parity", "stopbits", "bytesize"})
            if unknown:
                raise ValueError(f"unknown serial setting {unknown[0]!r} (known: baud, bytesize, parity, stopbits)")
            try:
                baud = int(query.get("baud", "19200"))
                stopbits = int(query.get("stopbits", "1"))
                bytesize = int(query.get("bytesize", "8"))
            except ValueError:
                raise ValueError("baud, stopbits and bytesize must be integers") from None
            parity = query.get("parity", "E").upper()
            if parity not in ("N", "E", "O") or stopbits not in (1, 2) or bytesize not in (7, 8) or baud <= 0:
                raise ValueError("parity must be N, E or O; stopbits 1 or 2; bytesize 7 or 8; baud > 0")
            return cls("rtu", serial_port=parts.path, baud=baud, parity=parity,  # type: ignore[arg-type]
                       stopbits=stopbits, bytesize=bytesize)
        raise ValueError("must start with tcp://, rtu:// or rtu+tcp://")


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusTag(TagConfig):
    """A Modbus point: its table, 0-based protocol address, data type and byte/word order."""

    table: ModbusTable = "holding"
    address: int = -1
    datatype: ModbusType = "uint16"
    bit: int = -1  # a bit (0 = least significant) of a register; datatype "bool"
    length: int = 0  # registers of a string (2 characters each)
    byte_order: Literal["big", "little"] = "big"  # within each 16-bit register
    word_order: Literal["big", "little"] = "big"  # of the registers of a 32/64-bit value

    @property
    def words(self) -> int:
        """How many registers (or bits, for coils and discrete inputs) the tag spans."""
        if self.table in ("coil", "discrete"):
            return 1
        if self.datatype == "string":
            return self.length
        return REGISTER_WORDS[self.datatype]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModbusDevice(DeviceConfig):
    """A Modbus TCP, RTU (serial) or RTU-over-TCP device (`url`: tcp://, rtu://, rtu+tcp://)."""

    PROTOCOL: ClassVar[str] = "modbus"

    unit: int = 1  # the slave / unit id
    max_gap: int = 8  # registers between two tags still read in one request
    max_gap_bits: int = 64
    max_registers: int = 125  # per request (the protocol's limit)
    max_bits: int = 2000
    register_map: str = ""  # a CSV file of tags (address, name, type, scale, unit), added to `tags`
    tags: tuple[ModbusTag, ...] = ()

    def tag_address_problems(self, tag: TagConfig) -> Iterator[tuple[str, str]]:
        assert isinstance(tag, ModbusTag)
        if not 0 <= tag.address <= 65535:
            yield "address", "give the 0-based protocol address 0..65535"
        bits = tag.table in ("coil", "discrete")
        if bits and tag.datatype != "bool":
            yield "datatype", f"{tag.table} tables hold bits: datatype must be bool"
        if tag.datatype == "bool" and not bits and not 0 <= tag.bit <= 15:
            yield "bit", "a bool of a register needs bit = 0..15"
        if tag.bit != -1 and (bits or tag.datatype != "bool"):
            yield "bit", "only a bool of a register has a bit"
        if tag.datatype == "string" and not 1 <= tag.length <= 123:
            yield "length", "a string needs length = 1..123 registers"
        if tag.writable and tag.table in ("input", "discrete"):
            yield "writable", f"{tag.table} tables are read-only in Modbus"
        if tag.writable and tag.datatype == "bool" and not bits:
            yield "writable", "a bit of a register cannot be written on its own"
        if tag.address + max(tag.words, 1) - 1 > 65535:
            yield "address", "the tag runs past address 65535"

    def device_problems(self) -> Iterator[tuple[str, str]]:
        try:
            ModbusEndpoint.parse(self.url)
        except ValueError as exc:
            yield "url", str(exc)
        if not 0 <= self.unit <= 255:
            yield "unit", "must be 0..255"
        if not 0 <= self.max_gap <= 125:
            yield "max_gap", "must be 0..125 registers"
        if not 0 <= self.max_gap_bits <= 2000:
            yield "max_gap_bits", "must be 0..2000 bits"
        if not 1 <= self.max_registers <= 125:
            yield "max_registers", "must be 1..125 (the protocol's limit)"
        if not 1 <= self.max_bits <= 2000:
            yield "max_bits", "must be 1..2000 (the protocol's limit)"


# --------------------------------------------------------------------------- OPC UA
@dataclass(frozen=True, slots=True, kw_only=True)
class OpcUaTag(TagConfig):
    """An OPC UA variable by node id; subscribed to unless the device polls."""

    node: str = ""
    sampling_ms: float = -1.0  # < 0: the device's publishing interval
    queue_size: int = 1
    data_change_deadband: float = 0.0  # absolute deadband the server applies (0: every change)


@dataclass(frozen=True, slots=True, kw_only=True)
class OpcUaDevice(DeviceConfig):
    """An OPC UA server (`url`: opc.tcp://host:port[/path])."""

    PROTOCOL: ClassVar[str] = "opcua"

    mode: Literal["subscribe", "poll"] = "subscribe"
    publishing_ms: float = 500.0
    security_policy: Literal["None", "Basic256Sha256"] = "None"
    security_mode: Literal["None", "Sign", "SignAndEncrypt"] = "None"
    username: str = ""
    password: str = ""
    certificate: str = ""  # the client's certificate (PEM/DER) for Sign/SignAndEncrypt or certificate login
    private_key: str = ""
    server_certificate: str = ""  # pin this certificate; "": pinned on first use
    auth: Literal["", "anonymous", "password", "certificate"] = ""  # "": password with a username, else anonymous
    tags: tuple[OpcUaTag, ...] = ()

    def __repr__(self) -> str:
        return f"OpcUaDevice(name={self.name!r}, url={self.url!r}, password=***)"

    def tag_address_problems(self, tag: TagConfig) -> Iterator[tuple[str, str]]:
        assert isinstance(tag, OpcUaTag)
        if not tag.node:
            yield "node", "give the node id, e.g. ns=2;s=Proofer.Temperature"
        if tag.queue_size < 1:
            yield "queue_size", "must be >= 1"
        if tag.data_change_deadband < 0:
            yield "data_change_deadband", "must be >= 0"

    def device_problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"opc\.tcp://[^\s/:]+(:\d{1,5})?(/\S*)?", self.url):
            yield "url", "must be opc.tcp://host:port[/path]"
        if not 10 <= self.publishing_ms <= 3_600_000:
            yield "publishing_ms", "must be 10..3600000"
        if (self.security_policy == "None") != (self.security_mode == "None"):
            yield "security_mode", "use None with the None policy, Sign or SignAndEncrypt with Basic256Sha256"
        if bool(self.username) != bool(self.password):
            yield "password", "username and password must be given together"
        if self.auth == "password" and not self.username:
            yield "username", "password login needs username and password"
        if self.auth in ("anonymous", "certificate") and self.username:
            yield "username", f"{self.auth} login takes no username"
        needs_cert = self.auth == "certificate" or self.security_policy != "None"
        if bool(self.certificate) != bool(self.private_key):
            yield "private_key", "certificate and private_key must be given together"
        elif self.auth == "certificate" and not self.certificate:
            yield "certificate", "certificate login needs certificate and private_key"
        for key in ("certificate", "private_key", "server_certificate"):
            path = getattr(self, key)
            if path and not os.path.isfile(path):
                yield key, f"no such file: {path}"
        if self.certificate and not needs_cert:
            yield "certificate", "used only with Basic256Sha256 or auth = \"certificate\""


# --------------------------------------------------------------------------- Siemens S7
@dataclass(frozen=True, slots=True, kw_only=True)
class S7Tag(TagConfig):
    """A Siemens S7 variable: area, data block, byte offset (and bit), S7 type."""

    area: Literal["DB", "M", "I", "Q"] = "DB"
    db: int = 0
    byte: int = -1
    bit: int = 0
    datatype: Literal["BOOL", "BYTE", "WORD", "DWORD", "INT", "DINT", "REAL", "LREAL", "STRING"] = "INT"
    length: int = 0  # STRING: the declared maximum length


@dataclass(frozen=True, slots=True, kw_only=True)
class S7Device(DeviceConfig):
    """A Siemens S7-300/400/1200/1500 (`url`: s7://host[:port]), with its rack and slot."""

    PROTOCOL: ClassVar[str] = "s7"

    rack: int = 0
    slot: int = 1
    tags: tuple[S7Tag, ...] = ()

    def tag_address_problems(self, tag: TagConfig) -> Iterator[tuple[str, str]]:
        assert isinstance(tag, S7Tag)
        if tag.byte < 0:
            yield "byte", "give the byte offset (>= 0)"
        if not 0 <= tag.bit <= 7:
            yield "bit", "must be 0..7"
        if tag.area == "DB" and tag.db < 1:
            yield "db", "give the data block number (>= 1)"
        if tag.datatype == "STRING" and not 1 <= tag.length <= 254:
            yield "length", "a STRING needs length = 1..254"

    def device_problems(self) -> Iterator[tuple[str, str]]:
        if not re.fullmatch(r"s7://[^\s/:]+(:\d{1,5})?/?", self.url):
            yield "url", "must be s7://host[:port]"
        if not 0 <= self.rack <= 7:
            yield "rack", "must be 0..7"
        if not 0 <= self.slot <= 31:
            yield "slot", "must be 0..31"


# --------------------------------------------------------------------------- the section
@dataclass(frozen=True)
class ConnectorsSection:
    """Every PLC device of this gateway, by protocol (devices added over REST live in the registry)."""

    modbus: tuple[ModbusDevice, ...] = ()
    opcua: tuple[OpcUaDevice, ...] = ()
    s7: tuple[S7Device, ...] = ()
    stagger: bool = True  # spread the devices' first polls over their poll interval

    def all_devices(self) -> Iterator[tuple[str, int, DeviceConfig]]:
        """(protocol, index in its list, device) for every configured device."""
        for proto in ("modbus", "opcua", "s7"):
            for i, dev in enumerate(getattr(self, proto) or ()):
                if isinstance(dev, DeviceConfig):
                    yield proto, i, dev


def section_problems(section: ConnectorsSection) -> Problems:
    """Every problem of the connectors section, each with its dotted key (`connectors.modbus[0].unit`)."""
    problems: Problems = []
    names: dict[str, str] = {}
    things: dict[str, str] = {}
    for proto, i, dev in section.all_devices():
        prefix = f"connectors.{proto}[{i}]"
        for key, msg in device_problems(dev):
            problems.append((f"{prefix}.{key}", msg))
        if dev.name in names:
            problems.append((f"{prefix}.name", f"{dev.name!r} is also {names[dev.name]}"))
        names.setdefault(dev.name, prefix)
        if dev.thing in things:
            problems.append((f"{prefix}.thing", f"{dev.thing!r} is also the Thing of {things[dev.thing]}"))
        things.setdefault(dev.thing, prefix)
    return problems
