"""Prefetch traces and priority lists (spec §7.1).

A trace file records the reads a workload made during its first run so later
mounts can fetch those ranges up front.  Layout (x86-64, little-endian)::

    header  24 bytes: magic u32 @0 = 0xC2EF1820, pad u32, data_size u64 @8
                      (= 24 * records), checksum u32 @16, pad u32
    record  24 bytes: op u8 @0 ('R' or 'W'), pad[3], layer_index u32 @4,
                      count u64 @8 (bytes), offset i64 @16 (bytes)

``checksum`` is ``crc32c_raw`` chained over the raw 24-byte records, padding
included (we write zero padding).  Offsets are in the decompressed LSMT address
space of the lower layer ``layer_index``.

Any other non-empty file of at most 64 KiB is a *prefetch list*: one absolute
path per line; lines that do not fully match upstream's path pattern are
ignored; a trailing ``/`` means "the whole directory, recursively".
``load_prefetch_file`` tells the two apart exactly as upstream does.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..crc32c import crc32c_extend
from ..errors import CorruptDataError

TRACE_MAGIC = 0xC2EF1820
HEADER = struct.Struct("<I4xQI4x")  # magic, data_size, checksum
RECORD = struct.Struct("<B3xIQq")  # op, layer_index, count, offset
assert HEADER.size == 24 and RECORD.size == 24

OP_READ = ord("R")
OP_WRITE = ord("W")
PREFETCH_LIST_MAX = 64 * 1024

_PATH_LINE = re.compile(r"((\/)?((([a-zA-Z0-9_\-\.]+\/)*[a-zA-Z0-9_\-\.]+\/?)|(\.\.?))?)")


@dataclass(frozen=True)
class TraceRecord:
    op: int
    layer_index: int
    count: int
    offset: int

    def pack(self) -> bytes:
        return RECORD.pack(self.op, self.layer_index, self.count, self.offset)


def is_trace(data: bytes) -> bool:
    return len(data) >= HEADER.size and struct.unpack_from("<I", data)[0] == TRACE_MAGIC


def encode_trace(records: list[TraceRecord]) -> bytes:
    body = b"".join(r.pack() for r in records)
    return HEADER.pack(TRACE_MAGIC, len(body), crc32c_extend(body, 0)) + body


def decode_trace(data: bytes, name: str = "trace") -> list[TraceRecord]:
    """Parse and validate a trace file (magic, size, checksum)."""
    if len(data) < HEADER.size:
        raise CorruptDataError(f"trace header needs {HEADER.size} bytes, file has {len(data)}", blob=name, offset=0)
    magic, data_size, checksum = HEADER.unpack_from(data)
    if magic != TRACE_MAGIC:
        raise CorruptDataError(f"bad trace magic 0x{magic:08x}", blob=name, offset=0)
    if data_size % RECORD.size or HEADER.size + data_size != len(data):
        raise CorruptDataError(
            f"trace data_size {data_size} does not match file size {len(data)}", blob=name, offset=8
        )
    crc = crc32c_extend(data[HEADER.size:], 0)  # chaining per record == one pass over all of them
    if crc != checksum:
        raise CorruptDataError(f"trace checksum 0x{checksum:08x} != computed 0x{crc:08x}", blob=name, offset=16)
    return decode_records(data, name, HEADER.size)


def decode_records(data: bytes, name: str, start: int = 0) -> list[TraceRecord]:
    """The 24-byte records of ``data[start:]`` (a trace body, or a recorder's spool file).

    A trailing partial record (a writer killed mid-append) is ignored; an
    impossible record raises CorruptDataError with its file offset.
    """
    records = []
    end = start + (len(data) - start) // RECORD.size * RECORD.size
    for off, (op, layer, count, offset) in zip(range(start, end, RECORD.size),
                                               RECORD.iter_unpack(memoryview(data)[start:end])):
        if op not in (OP_READ, OP_WRITE) or count < 0 or offset < 0:
            raise CorruptDataError(f"invalid trace record op={op} count={count} offset={offset}",
                                   blob=name, offset=off)
        records.append(TraceRecord(op, layer, count, offset))
    return records


def parse_prefetch_list(text: str) -> list[str]:
    """Paths of a priority list, in order, with lines upstream would ignore dropped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and _PATH_LINE.fullmatch(line):
            out.append(line)
    return out


@dataclass(frozen=True)
class PrefetchFile:
    """What a ``--prefetch`` file holds: trace records, or the paths of a priority list."""

    kind: str  # "trace" or "list"
    records: tuple[TraceRecord, ...] = ()
    paths: tuple[str, ...] = ()


def load_prefetch_file(data: bytes, name: str, force_list: bool = False) -> PrefetchFile:
    """Tell a trace from a prefetch list as upstream does (spec §7.1) and parse it.

    Trace magic ⇒ a trace (which must then be valid); otherwise a non-empty file
    of at most 64 KiB is a list (``force_list`` skips the trace test).  Errors
    name the file: empty, too large, invalid trace, or a list without one path.
    """
    if not data:
        raise CorruptDataError("prefetch file is empty (an empty file only makes sense for recording)",
                               blob=name, offset=0)
    if not force_list and is_trace(data):
        return PrefetchFile("trace", records=tuple(decode_trace(data, name)))
    if len(data) > PREFETCH_LIST_MAX:
        raise CorruptDataError(f"not a trace, and {len(data)} bytes is too large for a prefetch list "
                               f"(at most {PREFETCH_LIST_MAX})", blob=name, offset=0)
    paths = parse_prefetch_list(data.decode("utf-8", errors="replace"))
    if not paths:
        raise CorruptDataError("prefetch list holds no path (one absolute path per line)", blob=name, offset=0)
    return PrefetchFile("list", paths=tuple(paths))
