"""A simulated Modbus PLC: pymodbus's own server over a register memory we set from outside
(the equipment models of the simulator, or a test), counting the requests it answers.

Each unit id has four tables (coils, discrete inputs, holding and input registers) of `size`
entries. Requests can be slowed (`delay_s`) to play a slow device.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from gateway.connectors.base import TagValue
from gateway.connectors.config import ModbusTag
from gateway.connectors.modbus import decode, encode

log = logging.getLogger(__name__)
_TABLE_OF_FC = {1: "coil", 5: "coil", 15: "coil", 2: "discrete", 3: "holding", 6: "holding", 16: "holding",
                23: "holding", 4: "input"}
_WRITES = {5, 6, 15, 16, 23}


class RegisterMemory:
    """One unit's tables: registers as 16-bit ints, bits packed 16 to a register (pymodbus's layout)."""

    def __init__(self, size: int = 2000) -> None:
        self.size = size
        words = (size + 15) // 16
        self.tables: dict[str, list[int]] = {"holding": [0] * size, "input": [0] * size,
                                             "coil": [0] * words, "discrete": [0] * words}

    # bits ---------------------------------------------------------------------------------
    def set_bit(self, table: str, address: int, value: bool) -> None:
        regs = self.tables[table]
        reg, bit = divmod(address, 16)
        regs[reg] = (regs[reg] | (1 << bit)) if value else (regs[reg] & ~(1 << bit))

    def bit(self, table: str, address: int) -> bool:
        reg, bit = divmod(address, 16)
        return bool((self.tables[table][reg] >> bit) & 1)

    # tags ---------------------------------------------------------------------------------
    def put(self, tag: ModbusTag, value: TagValue) -> None:
        """Store a raw value the way `tag` reads it (type, byte and word order)."""
        if tag.table in ("coil", "discrete"):
            self.set_bit(tag.table, tag.address, bool(value))
            return
        regs = self.tables[tag.table]
        if tag.datatype == "bool":
            mask = 1 << tag.bit
            regs[tag.address] = (regs[tag.address] | mask) if value else (regs[tag.address] & ~mask)
            return
        words = encode(value, tag)
        regs[tag.address : tag.address + len(words)] = words

    def get(self, tag: ModbusTag) -> TagValue:
        if tag.table in ("coil", "discrete"):
            return self.bit(tag.table, tag.address)
        return decode(self.tables[tag.table][tag.address : tag.address + tag.words], tag)


class ModbusPlcServer:
    """pymodbus's TCP server (socket or RTU framing) for a set of unit ids."""

    def __init__(self, units: Mapping[int, RegisterMemory], *, host: str = "127.0.0.1", port: int = 5020,
                 framer: str = "socket", delay_s: float = 0.0) -> None:
        self.units = dict(units)
        self.host = host
        self.port = port
        self.framer = framer
        self.delay_s = delay_s
        self.requests: Counter[int] = Counter()  # by unit id
        self.silent_units: set[int] = set()  # answer "gateway target did not respond" (a dead unit)
        self.before_answer: Callable[[], None] | None = None  # e.g. stamp the answer time into a register
        self.writes: list[tuple[int, str, int, list[Any]]] = []  # (unit, table, address, values)
        self._server: Any = None

    def _device(self, unit: int, memory: RegisterMemory) -> Any:
        from pymodbus.simulator import DataType, SimData, SimDevice

        words = len(memory.tables["coil"])

        async def action(fc: int, start: int, address: int, count: int, registers: list[int],
                         values: list[Any] | None) -> Any:
            from pymodbus.constants import ExcCodes

            self.requests[unit] += 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if unit in self.silent_units:
                return ExcCodes.GATEWAY_NO_RESPONSE
            table = _TABLE_OF_FC.get(fc)
            if table is None:
                return None
            if self.before_answer is not None:
                self.before_answer()
            mine = memory.tables[table]
            registers[: len(mine)] = mine  # the server answers from our memory
            if values is not None and fc in _WRITES:
                self.writes.append((unit, table, address, list(values)))
                if table == "coil":
                    for i, v in enumerate(values):
                        memory.set_bit("coil", address + i, bool(v))
                else:
                    mine[address - start : address - start + len(values)] = [int(v) for v in values]
            return None

        bits = [SimData(0, count=words, values=0, datatype=DataType.BITS)]
        regs = [SimData(0, count=memory.size, values=0, datatype=DataType.REGISTERS)]
        return SimDevice(unit, simdata=(bits, [SimData(0, count=words, values=0, datatype=DataType.BITS)],
                                        regs, [SimData(0, count=memory.size, values=0, datatype=DataType.REGISTERS)]),
                         action=action)

    async def start(self) -> None:
        from pymodbus.framer import FramerType
        from pymodbus.server import ModbusTcpServer

        devices = [self._device(unit, mem) for unit, mem in self.units.items()]
        framer = FramerType.SOCKET if self.framer == "socket" else FramerType.RTU
        self._server = ModbusTcpServer(devices, address=(self.host, self.port), framer=framer)
        await self._server.serve_forever(background=True)
        log.info("Modbus PLC serving", extra={"host": self.host, "port": self.port, "units": sorted(self.units)})

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            async with asyncio.timeout(5):
                await server.shutdown()
