"""The one small interface every PLC protocol implements, and the types that cross it.

How a protocol plugs in
-----------------------
A protocol is one module beside this one (`modbus.py`, `opcua.py`, `s7.py`). It holds:

* its typed configuration: a frozen `DeviceConfig` subclass and a `TagConfig` subclass, declared in
  `gateway/connectors/config.py` (light, so loading the config never imports a protocol library),
  each with a `problems()` method for the checks types cannot express;
* a `Connector` subclass: `connect()`, `read()` (one poll of every tag that has an address),
  optionally `subscribe()` (pushes values as the device reports them), `write()` and `close()`.
  A connector speaks only its protocol: it returns *raw* values (`RawValue`: the tag, the value in
  the device's own unit and scale, the device's timestamp when it gives one, a `Quality`), and
  raises `DeviceError` (or anything else: the runner counts every exception) when the device fails;
* `PROTOCOL = ProtocolSpec(name, device_type, connector_type)`, listed in `manager.PROTOCOL_MODULES`.
  Connections several devices share (one serial line, one TCP gateway) are kept in `SharedLinks`.

Everything else is done once, for every protocol, by the runner (`runner.py`): connection, poll
timing with a start offset, capped jittered backoff, the circuit breaker, health; and by the
normaliser (`normalise.py`): scale/offset, unit conversion, clamping, deadband, calculated tags.
The normalised `Reading`s go to a `ReadingSink`; the gateway's sink (`pipeline.py`) applies them
to the Thing's twin and the buffer exactly as MQTT telemetry is applied.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, Protocol, TypeVar

from gateway.common.errors import EgizError

Quality = Literal["good", "uncertain", "bad"]
TagValue = float | int | bool | str
"""A value as a tag holds it: numbers, a bit, a string."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True, slots=True, kw_only=True)
class TagConfig:
    """What every protocol's tag has: where the value goes in the Thing and how it is normalised.

    The value stored is `clamp(convert(raw * scale + offset, unit -> to_unit))`; a write applies the
    inverse. A tag with `expression` is calculated from the other tags of its device (no address).
    """

    feature: str
    property: str
    unit: str = ""  # the unit the device reports in, after scale/offset (a pint unit: degC, bar, ...)
    to_unit: str = ""  # store in this unit instead ("" keeps `unit`)
    scale: float = 1.0
    offset: float = 0.0
    min: float = float("-inf")  # clamp below (the value is stored as `uncertain`); also a write's range
    max: float = float("inf")
    deadband: float = 0.0  # store only when the value moved by more than this (stored unit)
    writable: bool = False
    expression: str = ""  # a calculated tag: an expression over the device's other properties

    @builtins.property  # `property` is a field here
    def key(self) -> tuple[str, str]:
        return (self.feature, self.property)

    @builtins.property
    def calculated(self) -> bool:
        return bool(self.expression)


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceConfig:
    """What every protocol's device has: its name, address, Thing and poll timing."""

    PROTOCOL: ClassVar[str] = ""

    name: str  # unique across every protocol of this gateway
    url: str
    thing: str  # equipment id: the Thing is {gateway.site}:{thing}
    type: str = "device"
    poll_s: float = 1.0
    timeout_s: float = 2.0  # one request (or connection attempt)
    offset_s: float = -1.0  # the first poll's delay after start; < 0: spread across devices automatically
    retry_min_s: float = 0.1
    retry_max_s: float = 0.0  # cap of the jittered backoff; 0: poll_s, so a device that returns is read
    #                            again within two poll intervals
    breaker_failures: int = 5  # failed cycles in a row that open the circuit breaker
    breaker_probe_s: float = 0.0  # while open, one probe this often; 0: the backoff cap
    enabled: bool = True
    tags: tuple[TagConfig, ...] = ()

    @property
    def protocol(self) -> str:
        return self.PROTOCOL


# --------------------------------------------------------------------------- values
@dataclass(frozen=True, slots=True)
class RawValue:
    """One tag's value as the device gave it (its unit, before scaling); `ts` None: not stamped by the device."""

    tag: TagConfig
    value: TagValue | None
    ts: float | None = None
    quality: Quality = "good"


@dataclass(frozen=True, slots=True)
class ReadResult:
    """One poll of a device: its raw values and how many protocol requests it took."""

    values: tuple[RawValue, ...]
    requests: int


@dataclass(frozen=True, slots=True)
class Reading:
    """One normalised value of one property of the device's Thing: what the pipeline receives.

    `ts` is the device's time when it gave one, else when the gateway received the value. A `bad`
    reading carries no value; an `uncertain` one carries the value the device gave (or a clamped one).
    """

    feature: str
    property: str
    value: TagValue | None
    ts: float
    quality: Quality = "good"


class ReadingSink(Protocol):
    """Where a device's readings go; called on the event loop, must not block."""

    def deliver(self, device: DeviceConfig, readings: Sequence[Reading]) -> None: ...


# --------------------------------------------------------------------------- errors
class ConnectorError(EgizError):
    """Base of the connectors' errors."""

    code = "connector_error"


class DeviceError(ConnectorError):
    """The device failed: refused, timed out, answered with an exception; `reason` is short and stable."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail, reason=reason)
        self.reason = reason


def device_error_from(exc: BaseException, during: str,
                      specific: Callable[[BaseException, str], DeviceError | None]) -> DeviceError:
    """Any failure of a protocol client as a DeviceError with a short, stable reason: a DeviceError as it
    is; a refused connection; a timeout; what `specific` recognises of the protocol library's own errors
    (None: not one of them); a lost connection; anything else is `error`."""
    if isinstance(exc, DeviceError):
        return exc
    if isinstance(exc, ConnectionRefusedError) or isinstance(exc.__context__, ConnectionRefusedError):
        return DeviceError("refused", f"{during}: connection refused")
    if isinstance(exc, TimeoutError):
        return DeviceError("timeout", f"{during}: no answer in time")
    known = specific(exc, during)
    if known is not None:
        return known
    text = f"{during}: {type(exc).__name__}: {exc}"
    if isinstance(exc, ConnectionError | OSError | EOFError):  # EOFError: asyncio.IncompleteReadError too
        return DeviceError("connection_lost", text)
    return DeviceError("error", text)


class WriteRefused(ConnectorError):
    """A write the gateway will not send: unknown or read-only tag, value out of range or of the wrong type."""

    code = "write_refused"


def integer_to_write(value: TagValue, type_name: str, lo: int, hi: int) -> int:
    """`value` as an integer of the device type `type_name` (lo..hi), or WriteRefused saying why it is not one."""
    if isinstance(value, str) or (isinstance(value, float) and not value.is_integer()):
        raise WriteRefused(f"{value!r} is not an integer ({type_name})")
    if not lo <= int(value) <= hi:
        raise WriteRefused(f"{value!r} is out of the range of {type_name} ({lo}..{hi})")
    return int(value)


# --------------------------------------------------------------------------- the interface
DeviceT = TypeVar("DeviceT", bound=DeviceConfig)
TagT = TypeVar("TagT", bound=TagConfig)


class Connector(abc.ABC, Generic[DeviceT, TagT]):
    """One connection to one device, owned by its runner, which calls one method at a time.

    `connect()` opens the connection (raise when it cannot); `read()` polls every tag with an address
    once; `subscribe()` may arrange for values to be pushed and return True, after which `read()` is
    still called every `poll_s` as a liveness check and should return what did not arrive by push
    (usually nothing) or raise when the connection is broken; `write()` sends a raw value and returns
    the value read back; `close()` never raises. A protocol's connector is typed with its own device
    and tag configuration (`Connector[S7Device, S7Tag]`).
    """

    def __init__(self, device: DeviceT, links: SharedLinks) -> None:
        self.device = device
        self.links = links

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def read(self) -> ReadResult: ...

    async def subscribe(self, push: Callable[[Sequence[RawValue]], None]) -> bool:
        """Push values as the device reports them; False (the default): this connector is polled."""
        return False

    async def write(self, tag: TagT, value: TagValue) -> TagValue:
        """Write one tag's raw value, read it back and return what the device holds now."""
        raise WriteRefused(f"{self.device.protocol} devices take no writes", device=self.device.name)

    @abc.abstractmethod
    async def close(self) -> None: ...


class SharedLinks:
    """Connections several devices share (one RS-485 line or Modbus gateway behind many unit ids),
    by a key the protocol chooses; counted, so the last device to let go closes it. `state_dir` is
    where a protocol keeps files of its own (OPC UA: pinned server certificates, a generated client
    certificate); None keeps them in memory only."""

    def __init__(self, state_dir: Path | None = None) -> None:
        self._links: dict[str, tuple[Any, int]] = {}
        self.state_dir = state_dir

    def acquire(self, key: str, make: Callable[[], Any]) -> Any:
        link, users = self._links.get(key, (None, 0))
        if link is None:
            link = make()
        self._links[key] = (link, users + 1)
        return link

    def release(self, key: str) -> Any | None:
        """The link when this was its last user (the caller closes it), else None."""
        link, users = self._links.get(key, (None, 0))
        if users <= 1:
            self._links.pop(key, None)
            return link
        self._links[key] = (link, users - 1)
        return None


@dataclass(frozen=True, slots=True)
class ProtocolSpec:
    """How the runner finds a protocol: its name, its device config type and its connector."""

    name: str
    device_type: type[DeviceConfig]
    connector_type: Callable[[Any, SharedLinks], Connector[Any, Any]]
