"""Modbus TCP, RTU over a serial port and RTU over TCP (pymodbus, asyncio).

Tags of one table are coalesced into as few requests as the protocol allows: contiguous and
near-contiguous tags (at most `max_gap` registers or `max_gap_bits` bits apart) share one read of
at most `max_registers` registers / `max_bits` bits. Devices with the same `url` share one
connection, and a connection carries strictly one request at a time, so many devices behind one
serial line or TCP gateway never talk over each other. Values are decoded here, with the tag's
byte order (within a register) and word order (of a 32/64-bit value).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gateway.connectors.base import (
    Connector,
    DeviceError,
    ProtocolSpec,
    RawValue,
    ReadResult,
    SharedLinks,
    TagValue,
    WriteRefused,
)
from gateway.connectors.config import ModbusDevice, ModbusEndpoint, ModbusTag

# pymodbus warns on every failed connection attempt; the runner logs each device's changes of state once
logging.getLogger("pymodbus").setLevel(logging.ERROR)

_STRUCT = {"int16": ">h", "uint16": ">H", "int32": ">i", "uint32": ">I", "int64": ">q", "uint64": ">Q",
           "float32": ">f", "float64": ">d"}
_INT_RANGE = {"int16": (-(2**15), 2**15 - 1), "uint16": (0, 2**16 - 1), "int32": (-(2**31), 2**31 - 1),
              "uint32": (0, 2**32 - 1), "int64": (-(2**63), 2**63 - 1), "uint64": (0, 2**64 - 1)}


# --------------------------------------------------------------------------- decoding
def _ordered(regs: Sequence[int], tag: ModbusTag) -> bytes:
    """The tag's registers as big-endian bytes, after undoing its word and byte order."""
    words = list(regs)
    if tag.word_order == "little":
        words.reverse()
    raw = b"".join(w.to_bytes(2, "big") for w in words)
    if tag.byte_order == "little":
        raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
    return raw


def decode(regs: Sequence[int], tag: ModbusTag) -> TagValue:
    """A tag's value from its registers."""
    if tag.datatype == "bool":
        return bool((regs[0] >> tag.bit) & 1)
    if tag.datatype == "string":
        raw = b"".join(w.to_bytes(2, "big") for w in regs)
        if tag.byte_order == "little":
            raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
        return raw.split(b"\x00", 1)[0].decode("latin-1").rstrip()
    value = struct.unpack(_STRUCT[tag.datatype], _ordered(regs, tag))[0]
    return float(value) if tag.datatype.startswith("float") else int(value)


def encode(value: TagValue, tag: ModbusTag) -> list[int]:
    """A tag's registers for a raw value; WriteRefused when it does not fit the data type."""
    if tag.datatype == "string":
        data = str(value).encode("latin-1", "replace")[: tag.length * 2].ljust(tag.length * 2, b"\x00")
        if tag.byte_order == "little":
            data = b"".join(data[i + 1 : i + 2] + data[i : i + 1] for i in range(0, len(data), 2))
        return [int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2)]
    if isinstance(value, str):
        raise WriteRefused(f"{tag.feature}.{tag.property} takes a number")
    if tag.datatype.startswith("float"):
        raw = struct.pack(_STRUCT[tag.datatype], float(value))
    else:
        n = round(float(value))
        lo, hi = _INT_RANGE[tag.datatype]
        if not lo <= n <= hi:
            raise WriteRefused(f"{tag.feature}.{tag.property}: raw value {n} does not fit {tag.datatype}")
        raw = struct.pack(_STRUCT[tag.datatype], n)
    if tag.byte_order == "little":
        raw = b"".join(raw[i + 1 : i + 2] + raw[i : i + 1] for i in range(0, len(raw), 2))
    words = [int.from_bytes(raw[i : i + 2], "big") for i in range(0, len(raw), 2)]
    if tag.word_order == "little":
        words.reverse()
    return words


# --------------------------------------------------------------------------- coalescing
@dataclass(frozen=True, slots=True)
class Block:
    """One read request: a table, a start address, a count, and the tags it carries."""

    table: str
    address: int
    count: int
    tags: tuple[ModbusTag, ...]


def plan_blocks(tags: Sequence[ModbusTag], *, max_gap: int, max_gap_bits: int, max_registers: int,
                max_bits: int) -> list[Block]:
    """The fewest requests that read every tag, none longer than the limits, none spanning a gap too wide."""
    blocks: list[Block] = []
    for table in ("holding", "input", "coil", "discrete"):
        bits = table in ("coil", "discrete")
        gap, limit = (max_gap_bits, max_bits) if bits else (max_gap, max_registers)
        mine = sorted((t for t in tags if t.table == table and not t.calculated), key=lambda t: t.address)
        start = end = -1  # end: one past the last address covered
        members: list[ModbusTag] = []
        for t in mine:
            t_end = t.address + t.words
            if members and t.address - end <= gap and max(end, t_end) - start <= limit:
                end = max(end, t_end)
                members.append(t)
                continue
            if members:
                blocks.append(Block(table, start, end - start, tuple(members)))
            start, end, members = t.address, t_end, [t]
        if members:
            blocks.append(Block(table, start, end - start, tuple(members)))
    return blocks


# --------------------------------------------------------------------------- the connection
class _Link:
    """One pymodbus client, shared by the devices with the same url, one request at a time."""

    def __init__(self, endpoint: ModbusEndpoint, timeout_s: float) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.lock = asyncio.Lock()
        self.client: Any = None

    async def ensure(self) -> Any:
        if self.client is not None and self.client.connected:
            return self.client
        self.close()
        from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
        from pymodbus.framer import FramerType

        ep = self.endpoint
        # reconnect_delay=0: pymodbus must not reconnect on its own; the runner decides when (backoff, breaker)
        if ep.transport == "rtu":
            client: Any = AsyncModbusSerialClient(ep.serial_port, framer=FramerType.RTU, baudrate=ep.baud,
                                                  bytesize=ep.bytesize, parity=ep.parity, stopbits=ep.stopbits,
                                                  timeout=self.timeout_s, retries=0, reconnect_delay=0)
        else:
            framer = FramerType.SOCKET if ep.transport == "tcp" else FramerType.RTU
            client = AsyncModbusTcpClient(ep.host, port=ep.port, framer=framer, timeout=self.timeout_s, retries=0,
                                          reconnect_delay=0)
        ok = await client.connect()
        if not ok or not client.connected:
            client.close()
            where = ep.serial_port if ep.transport == "rtu" else f"{ep.host}:{ep.port}"
            raise DeviceError("connect_failed", f"cannot connect to {where}")
        self.client = client
        return client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


_READ = {"holding": "read_holding_registers", "input": "read_input_registers", "coil": "read_coils",
         "discrete": "read_discrete_inputs"}
_EXCEPTIONS = {1: "illegal function", 2: "illegal data address", 3: "illegal data value", 4: "device failure",
               5: "acknowledge", 6: "device busy", 10: "gateway path unavailable",
               11: "gateway target did not respond"}


class ModbusConnector(Connector[ModbusDevice, ModbusTag]):
    """Polls one Modbus device (a unit id behind a url) in coalesced blocks, and writes its tags."""

    def __init__(self, device: ModbusDevice, links: SharedLinks) -> None:
        super().__init__(device, links)
        self.dev = device
        self.endpoint = ModbusEndpoint.parse(device.url)
        self.blocks = plan_blocks(device.tags, max_gap=device.max_gap, max_gap_bits=device.max_gap_bits,
                                  max_registers=device.max_registers, max_bits=device.max_bits)
        self._key = f"modbus:{device.url}"
        self._link: _Link | None = None

    async def connect(self) -> None:
        if self._link is None:
            self._link = self.links.acquire(self._key, lambda: _Link(self.endpoint, self.dev.timeout_s))
        link = self._link
        async with link.lock:
            await link.ensure()

    async def _request(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """One request on the shared connection; DeviceError for a timeout, a lost link or an exception code."""
        from pymodbus.exceptions import ModbusException

        link = self._link
        if link is None:
            raise DeviceError("not_connected", "not connected")
        async with link.lock:
            client = await link.ensure()
            try:
                async with asyncio.timeout(self.dev.timeout_s + 0.5):
                    response = await getattr(client, method)(*args, device_id=self.dev.unit, **kwargs)
            except (TimeoutError, ModbusException, OSError) as exc:
                if self.endpoint.transport != "rtu":  # a late answer would confuse the next request on TCP
                    link.close()
                text = str(exc) or type(exc).__name__
                reason = "timeout" if isinstance(exc, TimeoutError) or "No response" in text else "connection"
                raise DeviceError(reason, f"{method} at {args[0]}: {text[:200]}") from exc
        if response.isError():
            code = getattr(response, "exception_code", 0)
            raise DeviceError("exception", f"{method} at {args[0]}: exception {code} "
                                           f"({_EXCEPTIONS.get(code, 'unknown')})")
        return response

    async def read(self) -> ReadResult:
        values: list[RawValue] = []
        for block in self.blocks:
            response = await self._request(_READ[block.table], block.address, count=block.count)
            values.extend(self._decode_block(block, response))
        return ReadResult(tuple(values), len(self.blocks))

    def _decode_block(self, block: Block, response: Any) -> list[RawValue]:
        out: list[RawValue] = []
        if block.table in ("coil", "discrete"):
            bits = response.bits
            for t in block.tags:
                out.append(RawValue(t, bool(bits[t.address - block.address])))
            return out
        regs = response.registers
        if len(regs) < block.count:
            raise DeviceError("short_response", f"asked {block.count} registers at {block.address}, got {len(regs)}")
        for t in block.tags:
            i = t.address - block.address
            out.append(RawValue(t, decode(regs[i : i + t.words], t)))
        return out

    async def write(self, tag: ModbusTag, value: TagValue) -> TagValue:
        assert isinstance(tag, ModbusTag)
        if not tag.writable:
            raise WriteRefused(f"{tag.feature}.{tag.property} is read-only")
        if tag.table == "coil":
            await self._request("write_coil", tag.address, bool(value))
            back = await self._request("read_coils", tag.address, count=1)
            return bool(back.bits[0])
        words = encode(value, tag)
        if len(words) == 1:
            await self._request("write_register", tag.address, words[0])
        else:
            await self._request("write_registers", tag.address, words)
        back = await self._request("read_holding_registers", tag.address, count=tag.words)
        return decode(back.registers[: tag.words], tag)

    async def close(self) -> None:
        if self._link is not None:
            last = self.links.release(self._key)
            if last is not None:
                last.close()
            self._link = None


PROTOCOL = ProtocolSpec("modbus", ModbusDevice, ModbusConnector)
