"""A simulated PLC's S7 server (python-snap7's server): the machine's values in data block 1, its
run signal on input I0.0 and the heater contactor on output Q0.0, a status word in the flag
memory (MW10: 1 running, 0 idle) — the layout `docs/connectors.md` lists for a client's tags.

The server runs in snap7's own thread; values are written into its areas under the area's lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

from snap7.server import Server
from snap7.type import SrvArea
from snap7.util import getters, setters

from gateway.sim.plc_image import PlcPoint, PlcValues

log = logging.getLogger(__name__)

DB_NUMBER = 1
DB_SIZE = 64
AREA_SIZE = 32  # bytes of each of the I, Q and M areas


@dataclass(frozen=True, slots=True)
class S7Address:
    """Where a point lives: area (DB, M, I, Q), byte offset (in DB 1 for DB), bit and S7 type."""

    area: str
    byte: int
    datatype: str
    bit: int = 0

    def __str__(self) -> str:
        if self.area == "DB":
            prefix = {"REAL": "DBD", "DINT": "DBD", "INT": "DBW", "BOOL": "DBX"}[self.datatype]
            return f"DB{DB_NUMBER}.{prefix}{self.byte}" + (f".{self.bit}" if self.datatype == "BOOL" else "")
        return f"{self.area}{self.byte}.{self.bit}" if self.datatype == "BOOL" else f"{self.area}W{self.byte}"


# The data block layout of each machine (byte offsets in DB 1) and its I/O.
LAYOUT: dict[str, dict[str, S7Address]] = {
    "proofer": {
        "Temperature": S7Address("DB", 0, "REAL"),
        "Humidity": S7Address("DB", 4, "REAL"),
        "Setpoint": S7Address("DB", 8, "REAL"),
        "BatchCount": S7Address("DB", 12, "DINT"),
        "Running": S7Address("I", 0, "BOOL", 0),
    },
    "oven": {
        "Zone1.Temperature": S7Address("DB", 0, "REAL"),
        "Zone2.Temperature": S7Address("DB", 4, "REAL"),
        "Zone3.Temperature": S7Address("DB", 8, "REAL"),
        "Setpoint": S7Address("DB", 12, "REAL"),
        "Voltage.L1": S7Address("DB", 16, "REAL"),
        "Voltage.L2": S7Address("DB", 20, "REAL"),
        "Voltage.L3": S7Address("DB", 24, "REAL"),
        "Power": S7Address("DB", 28, "REAL"),
        "BatchCount": S7Address("DB", 32, "DINT"),
        "Running": S7Address("I", 0, "BOOL", 0),
    },
}
HEATER = S7Address("Q", 0, "BOOL", 0)  # on while the machine runs below its setpoint
STATUS = S7Address("M", 10, "INT")
_SRV_AREAS = {"DB": SrvArea.DB, "M": SrvArea.MK, "I": SrvArea.PE, "Q": SrvArea.PA}


class _Server(Server):
    """snap7's server, counting the read requests it answers and dropping its clients when stopped.

    snap7's `stop()` closes the listener but a client's handler thread may go on answering until
    its receive times out; a PLC that loses power drops every connection at once.
    """

    def __init__(self) -> None:
        super().__init__(log=False)
        self.read_requests = 0
        self._sockets: set[socket.socket] = set()
        self._guard = threading.Lock()

    def _handle_client(self, client_socket: socket.socket, address: tuple[str, int]) -> None:
        with self._guard:
            self._sockets.add(client_socket)
        try:
            super()._handle_client(client_socket, address)
        finally:
            with self._guard:
                self._sockets.discard(client_socket)

    def _handle_read_area(self, request: dict[str, Any], client_address: tuple[str, int]) -> bytes:
        self.read_requests += 1  # every read request, single or multi-variable, comes in here
        return super()._handle_read_area(request, client_address)

    def stop(self) -> int:
        self.running = False
        with self._guard:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return super().stop()


class S7Plc:
    """The S7 face of a simulated PLC; `start()` again after `stop()` serves the same memory again."""

    def __init__(self, equipment_type: str, points: tuple[PlcPoint, ...], *, host: str = "127.0.0.1",
                 port: int = 102) -> None:
        self.layout = LAYOUT[equipment_type]
        self.points = points
        self.host = host
        self.port = port
        self.areas = {"DB": bytearray(DB_SIZE), "M": bytearray(AREA_SIZE), "I": bytearray(AREA_SIZE),
                      "Q": bytearray(AREA_SIZE)}
        self.server: _Server | None = None
        self.read_requests = 0  # answered by earlier runs of the server (before a stop)

    def _server(self) -> _Server:
        server = _Server()
        for name, data in self.areas.items():
            server.register_area(_SRV_AREAS[name], DB_NUMBER if name == "DB" else 0, data)
        return server

    async def start(self) -> None:
        if self.server is None:
            self.server = self._server()
            self.server.start_to(self.host, self.port)
            log.info("s7 plc listening", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            self.read_requests += server.read_requests
            await asyncio.to_thread(server.stop)  # joins snap7's threads

    def put(self, address: S7Address, value: float | int | bool | str) -> None:
        """Write one value into the PLC memory (under the area's lock when the server runs)."""
        data = self.areas[address.area]
        area_index = (_SRV_AREAS[address.area], DB_NUMBER if address.area == "DB" else 0)
        if self.server is not None:
            self.server.lock_area(*area_index)
        try:
            if address.datatype == "REAL":
                setters.set_real(data, address.byte, float(value))
            elif address.datatype == "DINT":
                setters.set_dint(data, address.byte, int(value))
            elif address.datatype == "INT":
                setters.set_int(data, address.byte, int(value))
            else:
                setters.set_bool(data, address.byte, address.bit, bool(value))
        finally:
            if self.server is not None:
                self.server.unlock_area(*area_index)

    @property
    def reads_served(self) -> int:
        """Read requests (single or multi-variable) the server has answered since it was made."""
        return self.read_requests + (self.server.read_requests if self.server is not None else 0)

    def get(self, address: S7Address) -> float | int | bool:
        data = self.areas[address.area]
        if address.datatype == "REAL":
            return float(getters.get_real(data, address.byte))
        if address.datatype == "DINT":
            return int(getters.get_dint(data, address.byte))
        if address.datatype == "INT":
            return int(getters.get_int(data, address.byte))
        return bool(getters.get_bool(data, address.byte, address.bit))

    async def publish(self, values: PlcValues, ts: float) -> None:
        for name, value in values.items():
            address = self.layout.get(name)
            if address is not None:
                self.put(address, value)
        running = bool(values.get("Running", False))
        temp = values.get("Temperature", values.get("Zone2.Temperature"))
        setpoint = values.get("Setpoint")
        heating = (running and isinstance(temp, float) and isinstance(setpoint, float) and temp < setpoint)
        self.put(HEATER, heating)
        self.put(STATUS, 1 if running else 0)

    async def written(self) -> PlcValues:
        return {p.name: self.get(self.layout[p.name]) for p in self.points if p.writable and p.name in self.layout}
