"""Siemens S7 devices (python-snap7, S7-300/400/1200/1500 over ISO-on-TCP): DB, M, I and Q areas,
the S7 types BOOL, BYTE, WORD, DWORD, INT, DINT, REAL, LREAL and STRING, and every poll packed
into as few multi-variable reads as the negotiated PDU allows.

A poll plan is made once per connection, when the PDU size is known: the tags' byte ranges are
sorted, neighbours in the same area and data block (at most `max_gap` bytes apart) merged into
one block, and the blocks packed into requests that fit the PDU both ways (request: 12 bytes of
address per block; reply: 4 bytes of header plus the data, padded to even) with at most 20 items
each, the S7 limit. snap7's own optimizer does the merging and packing; this module decodes the
reply per item, so an item the PLC refuses (a missing DB, an address past its end) makes only its
tags Bad, not the whole device.

S7 has no timestamps and no per-value status: values are stamped when the reply arrives. A BOOL
write reads its byte, sets the bit and writes the byte back (S7 has no bit write on every CPU).
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from snap7 import AsyncClient
from snap7 import optimizer as s7opt
from snap7.error import S7ConnectionError, S7Error, S7TimeoutError
from snap7.type import Area
from snap7.util import getters, setters

from gateway.connectors.base import (
    Connector,
    DeviceError,
    ProtocolSpec,
    RawValue,
    ReadResult,
    TagValue,
    WriteRefused,
    device_error_from,
    integer_to_write,
)
from gateway.connectors.config import S7Device, S7Tag

if TYPE_CHECKING:
    from gateway.connectors.base import SharedLinks

log = logging.getLogger(__name__)

AREAS: dict[str, Area] = {"DB": Area.DB, "M": Area.MK, "I": Area.PE, "Q": Area.PA}
SIZES: dict[str, int] = {"BOOL": 1, "BYTE": 1, "WORD": 2, "DWORD": 4, "INT": 2, "DINT": 4, "REAL": 4, "LREAL": 8}
MAX_ITEMS = 20  # items per multi-variable read: the S7 protocol's limit
MAX_GAP = 8  # bytes between two tags still read as one block


def size_of(tag: S7Tag) -> int:
    """Bytes the tag spans in the PLC (a STRING: its two header bytes and the declared length)."""
    return tag.length + 2 if tag.datatype == "STRING" else SIZES[tag.datatype]


def decode(tag: S7Tag, buf: bytearray, at: int) -> TagValue:
    """The tag's value from `buf` at byte `at` (S7 is big-endian)."""
    t = tag.datatype
    if t == "BOOL":
        return getters.get_bool(buf, at, tag.bit)
    if t == "BYTE":
        return getters.get_byte(buf, at)
    if t == "WORD":
        return getters.get_word(buf, at)
    if t == "DWORD":
        return getters.get_dword(buf, at)
    if t == "INT":
        return getters.get_int(buf, at)
    if t == "DINT":
        return getters.get_dint(buf, at)
    if t == "REAL":
        return float(getters.get_real(buf, at))
    if t == "LREAL":
        return float(getters.get_lreal(buf, at))
    return getters.get_string(buf, at)


_INT_RANGES = {"BYTE": (0, 255), "WORD": (0, 65535), "DWORD": (0, 2**32 - 1), "INT": (-32768, 32767),
               "DINT": (-2**31, 2**31 - 1)}


def encode(tag: S7Tag, value: TagValue, into: bytearray) -> None:
    """Put `value` into `into` (the tag's bytes; for a BOOL its byte as read); WriteRefused when it does not fit."""
    t = tag.datatype
    if t == "BOOL":
        setters.set_bool(into, 0, tag.bit, bool(value))
    elif t in _INT_RANGES:
        n = integer_to_write(value, t, *_INT_RANGES[t])
        {"BYTE": setters.set_byte, "WORD": setters.set_word, "DWORD": setters.set_dword,
         "INT": setters.set_int, "DINT": setters.set_dint}[t](into, 0, n)
    elif t == "REAL":
        setters.set_real(into, 0, float(value))
    elif t == "LREAL":
        setters.set_lreal(into, 0, float(value))
    else:
        text = str(value)
        if len(text) > tag.length:
            raise WriteRefused(f"the string is longer than the tag's {tag.length} characters")
        setters.set_string(into, 0, text, tag.length)


@dataclass(frozen=True, slots=True)
class Block:
    """One item of a multi-variable read: a byte range of one area (and DB), and the tags in it."""

    area: Area
    db: int
    start: int
    length: int
    tags: tuple[S7Tag, ...]


def plan(tags: list[S7Tag], pdu: int, max_gap: int = MAX_GAP) -> list[list[Block]]:
    """The requests of one poll: blocks merged and packed to fit the PDU (snap7's optimizer), ≤ 20 items each."""
    items = [s7opt.ReadItem(area=int(AREAS[t.area]), db_number=t.db if t.area == "DB" else 0, byte_offset=t.byte,
                            bit_offset=0, byte_length=size_of(t), index=i) for i, t in enumerate(tags)]
    blocks = s7opt.merge_items(s7opt.sort_items(items), max_gap=max_gap, max_block_size=pdu - 18)
    requests: list[list[Block]] = []
    for packet in s7opt.packetize(blocks, pdu):
        ours = [Block(Area(b.area), b.db_number, b.start_offset, b.byte_length,
                      tuple(tags[it.index] for it in b.items)) for b in packet.blocks]
        requests.extend(ours[i:i + MAX_ITEMS] for i in range(0, len(ours), MAX_ITEMS))
    return requests


def split_reply(raw: bytes, count: int) -> list[bytearray | int]:
    """Each item of a multi-variable read reply: its data, or the PLC's return code when it failed."""
    out: list[bytearray | int] = []
    at = 0
    for i in range(count):
        if at + 4 > len(raw):
            raise DeviceError("protocol", f"the reply ends before item {i}")
        code, transport, length = raw[at], raw[at + 1], struct.unpack(">H", raw[at + 2:at + 4])[0]
        at += 4
        if code != 0xFF:
            out.append(code)
            continue
        size = length // 8 if transport in (0x03, 0x04, 0x05) else length  # bit lengths, except octet strings
        out.append(bytearray(raw[at:at + size]))
        at += size + (size % 2 if i < count - 1 else 0)  # items are padded to an even length
    return out


class S7Connector(Connector[S7Device, S7Tag]):
    """One ISO-on-TCP connection to one S7 CPU (rack, slot); every poll one or a few packed reads."""

    def __init__(self, device: S7Device, links: SharedLinks) -> None:
        super().__init__(device, links)
        self.cfg = device
        self.tags = [t for t in device.tags if isinstance(t, S7Tag) and not t.calculated]
        self.client: AsyncClient | None = None
        self.requests: list[list[Block]] = []
        parts = urlsplit(device.url)
        self.host = parts.hostname or ""
        self.port = parts.port or 102

    async def connect(self) -> None:
        client = AsyncClient()
        try:
            await asyncio.wait_for(client.connect(self.host, self.cfg.rack, self.cfg.slot, self.port),
                                   timeout=self.cfg.timeout_s)
        except Exception as exc:
            await _disconnect(client)
            raise device_error(exc, "connect") from exc
        self.client = client
        self.requests = plan(self.tags, client.pdu_length)
        log.info("s7 connected", extra={"device": self.cfg.name, "pdu": client.pdu_length,
                                        "requests_per_poll": len(self.requests)})

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await _disconnect(client)

    async def read(self) -> ReadResult:
        client = self._client()
        values: list[RawValue] = []
        for blocks in self.requests:
            request = client.protocol.build_multi_read_request(
                [(int(client._map_area(b.area)), b.db, b.start, b.length) for b in blocks])
            try:
                # AsyncClient.read_multi_vars sends one request per item; the packed request goes out
                # through the client's own send/receive (its lock and sequence check) instead
                reply = await asyncio.wait_for(client._send_receive(request), timeout=self.cfg.timeout_s)
            except Exception as exc:
                raise device_error(exc, "read") from exc
            parts = split_reply(reply.get("raw_data", b"") or b"", len(blocks))
            for block, data in zip(blocks, parts, strict=True):
                for tag in block.tags:
                    values.append(self._value(tag, block, data))
        return ReadResult(tuple(values), len(self.requests))

    def _value(self, tag: S7Tag, block: Block, data: bytearray | int) -> RawValue:
        if isinstance(data, int):
            return RawValue(tag, None, None, "bad")
        at = tag.byte - block.start
        if at + size_of(tag) > len(data):
            return RawValue(tag, None, None, "bad")
        try:
            return RawValue(tag, decode(tag, data, at))
        except (ValueError, IndexError, UnicodeDecodeError, struct.error):
            return RawValue(tag, None, None, "bad")

    async def write(self, tag: S7Tag, value: TagValue) -> TagValue:
        if not isinstance(tag, S7Tag) or tag not in self.tags:
            raise WriteRefused(f"{tag.feature}.{tag.property} is not a tag of this device", device=self.cfg.name)
        client = self._client()
        area, db = AREAS[tag.area], (tag.db if tag.area == "DB" else 0)
        try:
            data = bytearray(size_of(tag))
            if tag.datatype == "BOOL":
                data = await asyncio.wait_for(client.read_area(area, db, tag.byte, 1), timeout=self.cfg.timeout_s)
            encode(tag, value, data)
            await asyncio.wait_for(client.write_area(area, db, tag.byte, data), timeout=self.cfg.timeout_s)
            back = await asyncio.wait_for(client.read_area(area, db, tag.byte, size_of(tag)),
                                          timeout=self.cfg.timeout_s)
        except WriteRefused:
            raise
        except Exception as exc:
            raise device_error(exc, "write") from exc
        return decode(tag, back, 0)

    def _client(self) -> AsyncClient:
        if self.client is None:
            raise DeviceError("not_connected", "not connected")
        return self.client


def _s7_failure(exc: BaseException, during: str) -> DeviceError | None:
    """What snap7's own errors mean, or None for an error of another kind."""
    text = f"{during}: {type(exc).__name__}: {exc}"
    if isinstance(exc, S7TimeoutError):
        return DeviceError("timeout", text)
    if isinstance(exc, S7ConnectionError):
        return DeviceError("connection_lost", text)
    if isinstance(exc, S7Error):
        return DeviceError("protocol", text)
    return None


def device_error(exc: BaseException, during: str) -> DeviceError:
    """Any failure of the client as a DeviceError with a short, stable reason."""
    return device_error_from(exc, during, _s7_failure)


async def _disconnect(client: Any) -> None:
    """Close the connection whatever state it is in; never raises."""
    try:
        await asyncio.wait_for(client.disconnect(), timeout=2.0)
    except Exception as exc:  # the peer is gone: the socket is dropped either way
        log.debug("s7 disconnect", extra={"error": f"{type(exc).__name__}: {exc}"})


PROTOCOL = ProtocolSpec("s7", S7Device, S7Connector)
