"""What a simulated PLC exposes of its machine: the points of each machine type (name, the model's
feature and property, type, unit, writable) and the interface every protocol server of a simulated
PLC implements (`plc_opcua.py`, `plc_s7.py`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

PointKind = Literal["real", "int", "bool", "string"]


@dataclass(frozen=True, slots=True)
class PlcPoint:
    """One value of the PLC image: its PLC-side name, the model's (feature, flattened path) and type."""

    name: str  # e.g. "Temperature", "Zone2.Temperature": the OPC UA node name, the S7 symbol
    feature: str
    path: str
    kind: PointKind = "real"
    unit: str = ""
    writable: bool = False  # a setpoint: a client's write is a command to the model


# The image of each machine a simulated PLC can front: what a vendor's program would expose.
POINTS: dict[str, tuple[PlcPoint, ...]] = {
    "proofer": (
        PlcPoint("Temperature", "climate", "temperature", unit="degC"),
        PlcPoint("Humidity", "climate", "humidity", unit="percent"),
        PlcPoint("Setpoint", "climate", "setpoint", unit="degC", writable=True),
        PlcPoint("Running", "state", "running", kind="bool"),
        PlcPoint("BatchCount", "state", "batch_count", kind="int"),
    ),
    "oven": (
        PlcPoint("Zone1.Temperature", "thermal", "temperature_zones[0]", unit="degC"),
        PlcPoint("Zone2.Temperature", "thermal", "temperature_zones[1]", unit="degC"),
        PlcPoint("Zone3.Temperature", "thermal", "temperature_zones[2]", unit="degC"),
        PlcPoint("Setpoint", "thermal", "setpoint", unit="degC", writable=True),
        PlcPoint("Voltage.L1", "electrical", "voltage.a", unit="V"),
        PlcPoint("Voltage.L2", "electrical", "voltage.b", unit="V"),
        PlcPoint("Voltage.L3", "electrical", "voltage.c", unit="V"),
        PlcPoint("Power", "electrical", "power_kw", unit="kW"),
        PlcPoint("Running", "state", "running", kind="bool"),
        PlcPoint("BatchCount", "state", "batch_count", kind="int"),
    ),
}
PLC_TYPES = tuple(POINTS)
PlcValues = dict[str, float | int | bool | str]  # point name -> value


class PlcImage(Protocol):
    """What a protocol server offers the simulation."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, values: PlcValues, ts: float) -> None:
        """Write one sample of every point (stamped `ts`, epoch seconds)."""

    async def written(self) -> PlcValues:
        """The writable points' current values (a client may have changed them)."""
