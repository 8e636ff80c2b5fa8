"""LSMT layers (spec §1): the block map of one overlaybd layer.

An LSMT file maps the sectors of a virtual disk onto byte ranges of a data file
through a sorted index of 16-byte segments.  This module reads sealed layers
(§1.3, also TurboOCI "warp" layers §4.3), reads and writes the writable
data+index pair (§1.4), and writes sealed layers byte-for-byte like
``overlaybd-commit`` (§1.3 writer rules), either from a writable layer
(:func:`commit`) or directly from content (:class:`SealedLayerBuilder`).

Indexes are held as compact columns (``array``) and searched with ``bisect``,
so a layer with a million segments costs a few tens of MB and a lookup is
O(log n).  A layer is itself a byte source over its virtual disk.
"""

from __future__ import annotations

import bisect
import heapq
import os
import struct
import sys
import threading
import uuid as _uuid
from array import array
from dataclasses import dataclass, replace
from itertools import islice, repeat
from operator import add, and_, le, mul, rshift
from typing import BinaryIO, Callable, Iterator, Mapping

from ..block.source import ByteSource, FileSource, clamp_read, read_exact
from ..errors import CorruptDataError, UsageError

# --- constants (spec §1.1, §1.2, §1.3, §1.4) ------------------------------------------

SECTOR = 512
ALIGNMENT = SECTOR
HEADER_SIZE = 4096
#: the data area of a sealed layer starts right after the header, at sector 8
DATA_START_SECTOR = HEADER_SIZE // SECTOR
MAX_OFFSET = (1 << 50) - 1
INVALID_OFFSET = MAX_OFFSET
MAX_LENGTH = (1 << 14) - 1  # 16383 sectors
MAX_MOFFSET = (1 << 55) - 1
MAX_TAG = 255
ENTRY_SIZE = 16
#: readers refuse sealed layers with more index entries than this (MAX_LSMT_RO_INDEX_SIZE)
MAX_RO_INDEX_SIZE = 1_000_000
#: limit on the entries of a writable index file and of a merged stack index
MAX_RW_INDEX_SIZE = 128_000_000
#: commit copies data in chunks of this many bytes, one index entry per chunk
COMMIT_CHUNK = 32 * 1024
#: a writable layer splits each pwrite into pieces of at most this many bytes
MAX_IO_SIZE = 4 * 1024 * 1024
#: sealed (non-warp) indexes are padded with invalid entries to a multiple of this
INDEX_PAD_ENTRIES = HEADER_SIZE // ENTRY_SIZE

MAGIC0 = b"LSMT\x00\x01\x02\x00"
MAGIC1 = bytes.fromhex("657E63D29444084CA2D2C8EC4FCFAE8A")
HEADER_STRUCT_SIZE = 390
LEGACY_HEADER_STRUCT_SIZE = 1158

FLAG_HEADER = 0x01  # header (1) / trailer (0)
FLAG_DATA = 0x02  # data file (1) / index file (0)
FLAG_SEALED = 0x04
FLAG_SPARSE = 0x10

NULL_UUID = "00000000-0000-0000-0000-000000000000"

# magic0, magic1, size, flags, index_offset, index_size, virtual_size, uuid, parent_uuid,
# reserved, version, sub_version, user_tag  (spec §1.1, packed)
_HEADER = struct.Struct("<8s16sIIQQQ37s37sHBB256s")
assert _HEADER.size == HEADER_STRUCT_SIZE
_USER_TAG_OFFSET = 134
_ENTRY = struct.Struct("<QQ")

_OFFSET_MASK = (1 << 50) - 1
_MOFFSET_MASK = (1 << 55) - 1
_ZEROED_BIT = 1 << 55

# An invalid/padding entry: offset 2^50-1, everything else 0.
INVALID_ENTRY = _ENTRY.pack(INVALID_OFFSET, 0)


def normalize_uuid(value: str | None) -> str:
    """Return ``value`` as upper-case ``8-4-4-4-12`` text (spec §0.2); None/"" -> null UUID."""
    if not value:
        return NULL_UUID
    try:
        return str(_uuid.UUID(value.strip())).upper()
    except ValueError:
        raise UsageError(f"invalid UUID {value!r} (expected 8-4-4-4-12 hex digits)") from None


def _uuid_from_field(raw: bytes) -> str:
    text = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    try:
        return str(_uuid.UUID(text)).upper() if len(text) == 36 else text
    except ValueError:
        return text


@dataclass(frozen=True)
class LsmtHeader:
    """The 4096-byte LSMT header or trailer (spec §1.1)."""

    flags: int
    index_offset: int = 0
    index_size: int = 0
    virtual_size: int = 0
    uuid: str = NULL_UUID
    parent_uuid: str = NULL_UUID
    user_tag: str = ""
    version: int = 1
    sub_version: int = 1
    size: int = HEADER_STRUCT_SIZE
    reserved: int = 0

    @property
    def is_header(self) -> bool:
        return bool(self.flags & FLAG_HEADER)

    @property
    def is_data_file(self) -> bool:
        return bool(self.flags & FLAG_DATA)

    @property
    def is_sealed(self) -> bool:
        return bool(self.flags & FLAG_SEALED)

    @property
    def is_sparse(self) -> bool:
        return bool(self.flags & FLAG_SPARSE)

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<lsmt>", offset: int = 0) -> "LsmtHeader":
        """Parse a header/trailer; bad magic raises CorruptDataError at ``offset``."""
        if len(data) < HEADER_STRUCT_SIZE:
            raise CorruptDataError("truncated LSMT header", blob=name, offset=offset)
        (m0, m1, size, flags, ioff, isize, vsize, u, pu, res, ver, sub, tag) = _HEADER.unpack_from(data)
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise CorruptDataError("bad LSMT magic", blob=name, offset=offset)
        # Legacy (size 1158) headers carry a longer user tag; only the field changed size.
        if size == LEGACY_HEADER_STRUCT_SIZE and len(data) >= size:
            tag = data[_USER_TAG_OFFSET:size]
        return cls(
            flags=flags,
            index_offset=ioff,
            index_size=isize,
            virtual_size=vsize,
            uuid=_uuid_from_field(u),
            parent_uuid=_uuid_from_field(pu),
            user_tag=tag.split(b"\0", 1)[0].decode("utf-8", "replace"),
            version=ver,
            sub_version=sub,
            size=size,
            reserved=res,
        )

    def to_bytes(self) -> bytes:
        """The 4096-byte block as the upstream writers lay it out (zero padded)."""
        tag = self.user_tag.encode()
        if len(tag) > 256:
            raise UsageError(f"LSMT user tag is {len(tag)} bytes, at most 256 allowed")
        packed = _HEADER.pack(
            MAGIC0,
            MAGIC1,
            self.size,
            self.flags,
            self.index_offset,
            self.index_size,
            self.virtual_size,
            self.uuid.encode("ascii"),
            self.parent_uuid.encode("ascii"),
            self.reserved,
            self.version,
            self.sub_version,
            tag,
        )
        return packed + bytes(HEADER_SIZE - len(packed))


def pack_entry(offset: int, length: int, moffset: int, zeroed: bool = False, tag: int = 0) -> bytes:
    """One 16-byte index entry (spec §1.2); all quantities in sectors."""
    return _ENTRY.pack(offset | (length << 50), moffset | (_ZEROED_BIT if zeroed else 0) | (tag << 56))


def unpack_entry(data: bytes, pos: int = 0) -> tuple[int, int, int, bool, int]:
    """(offset, length, moffset, zeroed, tag) of the entry at ``data[pos:pos+16]``."""
    w0, w1 = _ENTRY.unpack_from(data, pos)
    return w0 & _OFFSET_MASK, w0 >> 50, w1 & _MOFFSET_MASK, bool(w1 & _ZEROED_BIT), w1 >> 56


# --- the in-memory index -----------------------------------------------------------------

Fetch = Callable[[int, int, int], bytes]


class SegmentIndex:
    """A sorted, non-overlapping segment list held as five parallel columns.

    Quantities are in sectors.  ``tags`` selects the file a segment reads from
    (a layer's target, or a level in a merged stack).  The columns are arrays
    for sealed/merged indexes and lists for the mutable writable index.
    """

    __slots__ = ("offsets", "lengths", "moffsets", "zeroed", "tags")

    def __init__(self, offsets, lengths, moffsets, zeroed, tags):
        self.offsets = offsets
        self.lengths = lengths
        self.moffsets = moffsets
        self.zeroed = zeroed
        self.tags = tags

    @classmethod
    def empty(cls) -> "SegmentIndex":
        return cls(array("Q"), array("I"), array("Q"), array("B"), array("H"))

    def __len__(self) -> int:
        return len(self.offsets)

    def __iter__(self) -> Iterator[tuple[int, int, int, bool, int]]:
        return (
            (o, n, m, bool(z), t)
            for o, n, m, z, t in zip(self.offsets, self.lengths, self.moffsets, self.zeroed, self.tags)
        )

    def first_at_or_after(self, sector: int) -> int:
        """Index of the first segment whose end is beyond ``sector``."""
        i = bisect.bisect_right(self.offsets, sector) - 1
        if i < 0:
            return 0
        return i if self.offsets[i] + self.lengths[i] > sector else i + 1

    def lookup(self, sector: int) -> tuple[int, int, int, bool, int] | None:
        """The segment containing ``sector``, or None for a hole."""
        i = bisect.bisect_right(self.offsets, sector) - 1
        if i >= 0 and sector < self.offsets[i] + self.lengths[i]:
            return self.offsets[i], self.lengths[i], self.moffsets[i], bool(self.zeroed[i]), self.tags[i]
        return None

    def read(self, offset: int, n: int, fetch: Fetch, name: str) -> bytes:
        """Bytes ``[offset, offset+n)`` of the virtual disk; ``fetch(tag, pos, n)`` reads a file.

        Contiguous pieces of one file are coalesced into one fetch; holes and
        zeroed segments are left as zeros.
        """
        if n <= 0:
            return b""
        pieces = self.pieces(offset, n)
        if len(pieces) == 1 and pieces[0][2] == 0 and pieces[0][3] == n:
            tag, pos, _, length = pieces[0]
            return _checked(fetch(tag, pos, length), length, name, offset, pos)
        out = bytearray(n)
        for tag, pos, at, length in pieces:
            out[at : at + length] = _checked(fetch(tag, pos, length), length, name, offset + at, pos)
        return bytes(out)

    def pieces(self, offset: int, n: int) -> list[list[int]]:
        """Where bytes ``[offset, offset+n)`` come from: ``[tag, file_pos, out_pos, length]`` per
        piece, contiguous pieces of one file coalesced; holes and zeroed segments have none."""
        end = offset + n
        offs, lens, moffs, zer, tags = self.offsets, self.lengths, self.moffsets, self.zeroed, self.tags
        count = len(offs)
        i = self.first_at_or_after(offset >> 9)
        pieces = []  # [tag, file_pos, out_pos, length]
        while i < count:
            seg_start = offs[i] << 9
            if seg_start >= end:
                break
            if not zer[i]:
                a = seg_start if seg_start > offset else offset
                seg_end = seg_start + (lens[i] << 9)
                b = seg_end if seg_end < end else end
                pos = (moffs[i] << 9) + (a - seg_start)
                tag = tags[i]
                if pieces:
                    last = pieces[-1]
                    if last[0] == tag and last[1] + last[3] == pos and last[2] + last[3] == a - offset:
                        last[3] += b - a
                        i += 1
                        continue
                pieces.append([tag, pos, a - offset, b - a])
            i += 1
        return pieces


def _checked(data: bytes, want: int, name: str, voffset: int, pos: int) -> bytes:
    if len(data) != want:
        raise CorruptDataError(
            f"segment at virtual byte {voffset} maps past the end of its data file "
            f"(wanted {want} bytes at {pos}, got {len(data)})",
            blob=name,
            offset=pos,
        )
    return data


def _columns_from_entries(raw: bytes, name: str, base: int, keep_tags: bool):
    """Decode a packed entry table into columns, dropping invalid entries.

    ``map`` with ``operator`` functions keeps the per-entry work in C; a
    million entries decode in a fraction of a second.
    """
    words = array("Q")
    words.frombytes(raw)
    if sys.byteorder != "little":  # pragma: no cover - the format is little-endian
        words.byteswap()
    w0, w1 = words[0::2], words[1::2]
    offsets = array("Q", map(and_, w0, repeat(_OFFSET_MASK)))
    positions = None
    invalid = offsets.count(INVALID_OFFSET)
    if invalid and offsets.index(INVALID_OFFSET) == len(offsets) - invalid:
        # the usual case: padding only at the end
        keep_n = len(offsets) - invalid
        w0, w1, offsets = w0[:keep_n], w1[:keep_n], offsets[:keep_n]
    elif invalid:
        keep = [i for i, o in enumerate(offsets) if o != INVALID_OFFSET]
        positions = keep
        w0 = array("Q", [w0[i] for i in keep])
        w1 = array("Q", [w1[i] for i in keep])
        offsets = array("Q", [offsets[i] for i in keep])
    lengths = array("I", map(rshift, w0, repeat(50)))
    moffsets = array("Q", map(and_, w1, repeat(_MOFFSET_MASK)))
    zeroed = array("B", map(and_, map(rshift, w1, repeat(55)), repeat(1)))
    if keep_tags:
        tags = array("H", map(rshift, w1, repeat(56)))
    else:
        tags = array("H", bytes(2 * len(w1)))
    return SegmentIndex(offsets, lengths, moffsets, zeroed, tags), positions


def _entry_pos(base: int, positions, i: int) -> int:
    return base + ENTRY_SIZE * (positions[i] if positions is not None else i)


def _check_sorted(idx: SegmentIndex, name: str, base: int, positions) -> None:
    """Every entry non-empty, sorted by offset and not overlapping the next (spec §1.2)."""
    offs, lens = idx.offsets, idx.lengths
    if 0 in lens:
        i = lens.index(0)
        raise CorruptDataError("index entry has length 0", blob=name, offset=_entry_pos(base, positions, i))
    if len(offs) < 2:
        return
    ends = array("Q", map(add, offs, lens))
    if all(map(le, islice(ends, 0, len(ends) - 1), islice(offs, 1, None))):
        return
    bad = next(i for i in range(1, len(offs)) if ends[i - 1] > offs[i])
    raise CorruptDataError(
        f"index entries out of order or overlapping (sector {offs[bad - 1]}+{lens[bad - 1]} "
        f"> {offs[bad]})",
        blob=name,
        offset=_entry_pos(base, positions, bad),
    )


_NOT = bytes.maketrans(b"\x00\x01", b"\x01\x00")


def _check_ranges(idx: SegmentIndex, name: str, base: int, positions, data_end: int) -> None:
    """Sealed range check (spec §1.2): mappings must lie in [sector 8, data_end)."""
    if not len(idx.offsets):
        return
    data_len = array("I", map(mul, idx.lengths, idx.zeroed.tobytes().translate(_NOT)))
    mends = map(add, idx.moffsets, data_len)  # zeroed: moffset itself; data: moffset+length
    if min(idx.moffsets) >= DATA_START_SECTOR and max(mends) <= data_end:
        return
    for i, (n, m, z) in enumerate(zip(idx.lengths, idx.moffsets, idx.zeroed)):
        if m < DATA_START_SECTOR or (m > data_end if z else m + n > data_end):
            raise CorruptDataError(
                f"index entry maps sectors [{m}, {m + n}) outside the data area [8, {data_end})",
                blob=name,
                offset=_entry_pos(base, positions, i),
            )


# --- sealed layers ------------------------------------------------------------------------


class LsmtFile:
    """A sealed LSMT layer (spec §1.3) read from its decompressed bytes; a byte source.

    ``read(offset, length)`` returns the layer's own view of the virtual disk:
    mapped data, zeros for holes and zeroed segments.  In a stack, holes fall
    through to lower layers instead (see ``block/stack.py``).
    """

    def __init__(self, source: ByteSource, header: LsmtHeader, trailer: LsmtHeader,
                 index: SegmentIndex, *, warp: bool, targets: Mapping[int, ByteSource]):
        self.source = source
        self.name = source.name
        self.header = header
        self.trailer = trailer
        self.index = index
        self.warp = warp
        self.targets = dict(targets)
        self.vsize = trailer.virtual_size
        self.size = self.vsize
        self.uuid = trailer.uuid
        self.parent_uuid = trailer.parent_uuid
        self.user_tag = trailer.user_tag

    @classmethod
    def open(cls, source: ByteSource, *, warp: bool = False,
             targets: Mapping[int, ByteSource] | None = None) -> "LsmtFile":
        """Open a sealed layer (``open_file_ro``); ``warp`` keeps tags (TurboOCI, §4.3)."""
        name = source.name
        header = LsmtHeader.from_bytes(read_exact(source, 0, HEADER_SIZE, "LSMT header"), name, 0)
        if not header.is_header:
            raise CorruptDataError("LSMT header block does not have the header flag", blob=name, offset=0)
        size = source.size
        if size < 2 * HEADER_SIZE:
            raise CorruptDataError(f"truncated LSMT layer ({size} bytes)", blob=name, offset=size)
        tpos = size - HEADER_SIZE
        trailer = LsmtHeader.from_bytes(read_exact(source, tpos, HEADER_SIZE, "LSMT trailer"), name, tpos)
        need = FLAG_DATA | FLAG_SEALED
        if trailer.is_header or trailer.flags & need != need:
            raise CorruptDataError(
                f"LSMT trailer flags 0x{trailer.flags:x} are not those of a sealed data file",
                blob=name, offset=tpos)
        if trailer.index_size > MAX_RO_INDEX_SIZE:
            raise CorruptDataError(
                f"index has {trailer.index_size} entries, more than the limit {MAX_RO_INDEX_SIZE}",
                blob=name, offset=tpos + 40)
        ioff = trailer.index_offset
        if ioff < HEADER_SIZE or ioff > tpos or trailer.index_size * ENTRY_SIZE > tpos - ioff:
            raise CorruptDataError(
                f"index ({trailer.index_size} entries at {ioff}) does not fit before the trailer",
                blob=name, offset=tpos + 32)
        raw = read_exact(source, ioff, trailer.index_size * ENTRY_SIZE, "LSMT index")
        index, positions = _columns_from_entries(raw, name, ioff, keep_tags=warp)
        _check_sorted(index, name, ioff, positions)
        if warp:
            if len(index.tags):
                low = min(index.tags)
                if low:
                    index.tags = array("H", [t - low for t in index.tags])
        else:
            _check_ranges(index, name, ioff, positions, ioff // SECTOR)
        tmap = {0: source}
        tmap.update(targets or {})
        return cls(source, header, trailer, index, warp=warp, targets=tmap)

    def segments(self) -> Iterator[tuple[int, int, int, bool, int]]:
        """(offset, length, moffset, zeroed, tag) of every valid segment, in sectors."""
        return iter(self.index)

    def read_mapped(self, tag: int, byte_offset: int, length: int) -> bytes:
        """Bytes of the file behind ``tag`` (0 = this layer file) at ``byte_offset``."""
        target = self.targets.get(tag)
        if target is None:
            raise CorruptDataError(f"index refers to target {tag}, which was not supplied",
                                   blob=self.name)
        return target.read(byte_offset, length)

    def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.vsize, offset, length)
        return self.index.read(offset, n, self.read_mapped, self.name)

    def mapped_ranges(self, offset: int, length: int) -> list[tuple[ByteSource, int, int]]:
        """(file, offset, length) of every file range a read of ``[offset, offset+length)`` reads
        (a trace replay warms them; see ``block.source.warm_target``)."""
        n = clamp_read(self.vsize, offset, length)
        if n == 0:
            return []
        out = []
        for tag, pos, _at, length in self.index.pieces(offset, n):
            target = self.targets.get(tag)
            if target is not None:
                out.append((target, pos, length))
        return out

    def close(self) -> None:
        seen: set[int] = set()
        for target in self.targets.values():
            if id(target) not in seen:
                seen.add(id(target))
                target.close()

    def __repr__(self) -> str:
        return f"LsmtFile({self.name!r}, vsize={self.vsize}, segments={len(self.index)})"


# --- writable layers (spec §1.4) -----------------------------------------------------------


class SegmentMap(SegmentIndex):
    """The mutable index of a writable layer: later inserts override overlapped parts."""

    @classmethod
    def empty(cls) -> "SegmentMap":
        return cls([], [], [], [], [])

    def _cut(self, offset: int, end: int) -> int:
        """Trim or split the mappings overlapping ``[offset, end)``; return the index at ``offset``."""
        offs, lens, moffs, zer, tags = self.offsets, self.lengths, self.moffsets, self.zeroed, self.tags
        i = j = self.first_at_or_after(offset)
        kept = []
        while j < len(offs) and offs[j] < end:
            o, n, m, z, t = offs[j], lens[j], moffs[j], zer[j], tags[j]
            if o < offset:
                kept.append((o, offset - o, m, z, t))
            if o + n > end:
                kept.append((end, o + n - end, m if z else m + (end - o), z, t))
            j += 1
        cols = list(zip(*kept)) if kept else [()] * 5
        for col, vals in zip((offs, lens, moffs, zer, tags), cols):
            col[i:j] = vals
        return i + 1 if kept and kept[0][0] < offset else i

    def insert(self, offset: int, length: int, moffset: int, zeroed: bool, tag: int = 0) -> None:
        """Add a mapping; any overlapped part of existing mappings is trimmed or split."""
        i = self._cut(offset, offset + length)
        for col, v in zip((self.offsets, self.lengths, self.moffsets, self.zeroed, self.tags),
                          (offset, length, moffset, int(zeroed), tag)):
            col.insert(i, v)

    def remove(self, offset: int, length: int) -> None:
        """Make ``[offset, offset+length)`` a hole."""
        self._cut(offset, offset + length)


def replay_log(log: list[tuple[int, int, int, bool]]) -> SegmentMap:
    """Resolve a write log of (offset, end, moffset, zeroed) in sectors; later entries win.

    A sweep over the sorted boundaries with a heap of the live entries keyed
    by log position: O(n log n), where inserting one by one would be O(n^2).
    Each elementary range takes the newest entry covering it; consecutive
    ranges from one entry are joined again, so an entry overwritten in its
    middle leaves two trimmed pieces, as in upstream's ordered set.
    """
    order = sorted(range(len(log)), key=lambda k: log[k][0])
    points = sorted({p for o, e, _m, _z in log for p in (o, e)})
    heap: list[int] = []  # -log position
    out = SegmentMap.empty()
    offs, lens, moffs, zer, tags = out.offsets, out.lengths, out.moffsets, out.zeroed, out.tags
    k = 0
    last_entry, last_end = -1, -1
    for p, q in zip(points, points[1:]):
        while k < len(order) and log[order[k]][0] <= p:
            heapq.heappush(heap, -order[k])
            k += 1
        while heap and log[-heap[0]][1] <= p:
            heapq.heappop(heap)
        if not heap:
            continue
        top = -heap[0]
        if top == last_entry and last_end == p:
            lens[-1] += q - p
        else:
            o, _e, m, z = log[top]
            offs.append(p)
            lens.append(q - p)
            moffs.append(m if z else m + (p - o))
            zer.append(int(z))
            tags.append(0)
            last_entry = top
        last_end = q
    return out


def _split(offset: int, length: int, limit: int = MAX_LENGTH) -> Iterator[tuple[int, int]]:
    while length > 0:
        n = min(length, limit)
        yield offset, n
        offset += n
        length -= n


def _data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data runs of a sparse file in ``[start, end)`` (SEEK_DATA/HOLE)."""
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no more data
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


def _sparse_index(fd: int, file_size: int) -> SegmentMap:
    """Index of a sparse RW data file: logical x lives at file offset 4096+x (spec §1.4)."""
    idx = SegmentMap.empty()
    for b, n in _data_extents(fd, HEADER_SIZE, file_size):
        b0 = b - b % SECTOR
        n = -(-(b + n - b0) // SECTOR) * SECTOR
        for s, ln in _split(b0 // SECTOR, n // SECTOR):
            idx.offsets.append(s - DATA_START_SECTOR)
            idx.lengths.append(ln)
            idx.moffsets.append(s)
            idx.zeroed.append(0)
            idx.tags.append(0)
    return idx


class RwLayer:
    """A writable layer: data file + index file (spec §1.4); a byte source over its disk.

    Created by :func:`create_rw` (writable) or :func:`open_rw` (read-only
    replay).  ``pwrite``/``discard`` append to both files and update the
    in-memory index, so reads always see the last write.
    """

    def __init__(self, data_path: str | None, data: ByteSource, index_header: LsmtHeader,
                 data_header: LsmtHeader, index: SegmentMap, *, writable: bool,
                 index_path: str | None = None):
        self.name = data.name
        self.data_path = data_path
        self.index_path = index_path
        self._data = data
        self.header = index_header
        self.data_header = data_header
        self.vsize = index_header.virtual_size
        self.size = self.vsize
        self.uuid = index_header.uuid
        self.parent_uuid = index_header.parent_uuid
        self.user_tag = index_header.user_tag
        self.sparse = data_header.is_sparse
        self.warp = False
        self.index = index
        self._lock = threading.RLock()
        self._writable = writable
        self._data_fd = -1
        self._index_fd = -1
        self._data_end = 0

    # reading -------------------------------------------------------------------------------

    def segments(self) -> Iterator[tuple[int, int, int, bool, int]]:
        with self._lock:
            return iter(list(self.index))

    def read_mapped(self, tag: int, byte_offset: int, length: int) -> bytes:
        if self._data_fd >= 0:
            return os.pread(self._data_fd, length, byte_offset)
        return self._data.read(byte_offset, length)

    def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.vsize, offset, length)
        with self._lock:
            return self.index.read(offset, n, self.read_mapped, self.name)

    def sealed_index(self) -> SegmentIndex:
        """The merged index commit walks (for sparse layers: the file's data extents)."""
        with self._lock:
            if self.sparse and self.data_path:
                fd = os.open(self.data_path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    return _sparse_index(fd, os.fstat(fd).st_size)
                finally:
                    os.close(fd)
            idx = self.index
            return SegmentMap(list(idx.offsets), list(idx.lengths), list(idx.moffsets),
                              list(idx.zeroed), list(idx.tags))

    # writing -------------------------------------------------------------------------------

    def _check_io(self, offset: int, length: int) -> None:
        if not self._writable:
            raise UsageError(f"{self.name}: layer is open read-only")
        if offset % SECTOR or length % SECTOR:
            raise UsageError(f"{self.name}: I/O at {offset}+{length} is not 512-byte aligned")
        if offset + length > self.vsize:
            raise UsageError(f"{self.name}: I/O at {offset}+{length} is beyond the virtual size {self.vsize}")

    def pwrite(self, data: bytes, offset: int) -> None:
        """Write ``data`` at virtual ``offset`` (both 512-aligned), in pieces of at most 4 MiB."""
        self._check_io(offset, len(data))
        view = memoryview(data)
        with self._lock:
            for k in range(0, len(view), MAX_IO_SIZE):
                piece = view[k : k + MAX_IO_SIZE]
                voff = offset + k
                if self.sparse:
                    os.pwrite(self._data_fd, piece, HEADER_SIZE + voff)
                    pos = HEADER_SIZE + voff
                else:
                    pos = self._data_end
                    os.pwrite(self._data_fd, piece, pos)
                    self._data_end += len(piece)
                    os.write(self._index_fd, pack_entry(voff // SECTOR, len(piece) // SECTOR, pos // SECTOR))
                self.index.insert(voff // SECTOR, len(piece) // SECTOR, pos // SECTOR, False)

    def discard(self, offset: int, length: int) -> None:
        """TRIM ``[offset, offset+length)``: reads return zeros afterwards."""
        self._check_io(offset, length)
        with self._lock:
            if self.sparse:
                _punch_hole(self._data_fd, HEADER_SIZE + offset, length)
                self.index.remove(offset // SECTOR, length // SECTOR)
                return
            m = self._data_end // SECTOR
            for s, n in _split(offset // SECTOR, length // SECTOR):
                os.write(self._index_fd, pack_entry(s, n, m, True))
                self.index.insert(s, n, m, True)

    def close(self) -> None:
        with self._lock:
            for fd in (self._data_fd, self._index_fd):
                if fd >= 0:
                    os.close(fd)
            self._data_fd = self._index_fd = -1
            self._data.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _punch_hole(fd: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
    if libc.fallocate(fd, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def create_rw(data_path: str | os.PathLike, index_path: str | os.PathLike, vsize: int, *,
              uuid: str | None = None, parent_uuid: str | None = None,
              sparse: bool = False) -> RwLayer:
    """Create a writable layer like ``overlaybd-create`` (spec §1.4) and open it for writing."""
    if vsize % SECTOR:
        raise UsageError(f"virtual size {vsize} is not a multiple of 512")
    u, pu = normalize_uuid(uuid), normalize_uuid(parent_uuid)
    dflags = FLAG_HEADER | FLAG_DATA | (FLAG_SPARSE if sparse else 0)
    dh = LsmtHeader(flags=dflags, virtual_size=vsize, uuid=u, parent_uuid=pu)
    ih = LsmtHeader(flags=FLAG_HEADER, index_offset=HEADER_SIZE, virtual_size=vsize, uuid=u, parent_uuid=pu)
    data_path, index_path = os.fspath(data_path), os.fspath(index_path)
    with open(data_path, "wb") as f:
        f.write(dh.to_bytes())
        if sparse:
            f.truncate(HEADER_SIZE + vsize)
    with open(index_path, "wb") as f:
        f.write(ih.to_bytes())
    layer = RwLayer(data_path, FileSource(data_path), ih, dh, SegmentMap.empty(), writable=True,
                    index_path=index_path)
    layer._data_fd = os.open(data_path, os.O_RDWR | os.O_CLOEXEC)
    layer._index_fd = os.open(index_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    layer._data_end = os.fstat(layer._data_fd).st_size
    return layer


def open_rw(data_source: ByteSource | str | os.PathLike,
            index_source: ByteSource | str | os.PathLike) -> RwLayer:
    """Open a writable layer pair read-only by replaying its index log (spec §1.4)."""
    data = data_source if hasattr(data_source, "read") else FileSource(data_source)
    index = index_source if hasattr(index_source, "read") else FileSource(index_source)
    dh = LsmtHeader.from_bytes(read_exact(data, 0, HEADER_SIZE, "LSMT data header"), data.name, 0)
    ih = LsmtHeader.from_bytes(read_exact(index, 0, HEADER_SIZE, "LSMT index header"), index.name, 0)
    if not dh.is_data_file:
        raise CorruptDataError("data file header does not have the data flag", blob=data.name, offset=0)
    data_path = getattr(data, "path", None)
    if dh.is_sparse:
        if data_path is None:
            raise UsageError(f"{data.name}: a sparse writable layer must be a local file")
        fd = os.open(data_path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            idx = _sparse_index(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)
        index.close()
        return RwLayer(data_path, data, ih, dh, idx, writable=False)
    if ih.is_data_file:
        raise CorruptDataError("index file header has the data flag set", blob=index.name, offset=0)
    count = (index.size - HEADER_SIZE) // ENTRY_SIZE
    if count > MAX_RW_INDEX_SIZE:
        raise CorruptDataError(f"index log has {count} entries, more than {MAX_RW_INDEX_SIZE}",
                               blob=index.name, offset=HEADER_SIZE)
    raw = read_exact(index, HEADER_SIZE, count * ENTRY_SIZE, "LSMT index log")
    data_end = data.size // SECTOR
    log = []
    for k in range(count):
        o, n, m, z, _t = unpack_entry(raw, k * ENTRY_SIZE)
        if o == INVALID_OFFSET or n == 0:
            continue
        if m < DATA_START_SECTOR or (m if z else m + n) > data_end:
            raise CorruptDataError(
                f"index log entry maps sectors [{m}, {m + n}) outside the data file (8..{data_end})",
                blob=index.name, offset=HEADER_SIZE + k * ENTRY_SIZE)
        log.append((o, o + n, m, z))
    idx = replay_log(log)
    index.close()
    return RwLayer(data_path, data, ih, dh, idx, writable=False, index_path=getattr(index, "path", None))


# --- sealed layer writer (spec §1.3 writer rules, §4.3 for warp) ---------------------------


class SealedLayerBuilder:
    """Write a sealed layer directly from content, as ``overlaybd-commit`` would.

    Calls must come in ascending, non-overlapping order.  Contiguous
    :meth:`add_data` calls form one extent which, like a sparse writable
    layer's ``SEEK_DATA`` extent, is split every 16383 sectors from its start;
    each piece is copied in 32 KiB chunks (one entry each) and entries are
    merged by the ``compress_raw_index`` rule.  The output therefore equals
    :func:`commit` of a sparse writable layer holding the same content.
    Warp layers (TurboOCI) also take :meth:`add_remote` and are not padded.
    """

    def __init__(self, vsize: int, *, uuid: str | None = None, parent_uuid: str | None = None,
                 user_tag: str = "", warp: bool = False):
        self.vsize = vsize
        self.warp = warp
        self._header = LsmtHeader(flags=FLAG_HEADER | FLAG_DATA | FLAG_SEALED, virtual_size=vsize,
                                  uuid=normalize_uuid(uuid), parent_uuid=normalize_uuid(parent_uuid),
                                  user_tag=user_tag)
        self._header.to_bytes()  # validate the user tag now
        self._chunks: list[bytes] = []  # data waiting to be written by finish()
        self._data_sectors = 0
        self._out: BinaryIO | None = None
        self._entries = _EntryWriter()
        self._cursor = 0  # sectors already described
        self._extent_start = -1  # start of the current contiguous data extent
        self._extent_end = -1

    def _claim(self, offset: int, length: int) -> None:
        if offset % SECTOR or length % SECTOR or length <= 0:
            raise ValueError(f"range {offset}+{length} is not 512-aligned or empty")
        if offset // SECTOR < self._cursor:
            raise ValueError(f"range at {offset} is not after the previous one")
        if offset + length > self.vsize:
            raise ValueError(f"range {offset}+{length} is beyond the virtual size {self.vsize}")

    def bind(self, fileobj: BinaryIO) -> None:
        """Stream data straight to ``fileobj`` (positioned at 0) instead of buffering it."""
        if self._data_sectors:
            raise ValueError("bind() must come before the first add_data()")
        self._out = fileobj
        fileobj.write(self._header.to_bytes())

    def add_data(self, offset: int, data: bytes) -> None:
        """Store ``data`` at virtual ``offset``."""
        self._claim(offset, len(data))
        s, n = offset // SECTOR, len(data) // SECTOR
        if s != self._extent_end:
            self._extent_start = s
        view = memoryview(data)
        # one source mapping per MAX_LENGTH sectors of the extent, as SEEK_DATA would give
        pos = s
        while pos < s + n:
            step = MAX_LENGTH - (pos - self._extent_start) % MAX_LENGTH
            piece = min(step, s + n - pos)
            self._copy_mapping(pos, piece, view[(pos - s) * SECTOR : (pos - s + piece) * SECTOR])
            pos += piece
        self._cursor = self._extent_end = s + n

    def _copy_mapping(self, offset: int, length: int, data, tag: int = 0) -> None:
        """Append one source mapping's data in 32 KiB chunks, one entry per chunk (§1.3 step 2)."""
        for c, cn in _split(offset, length, COMMIT_CHUNK // SECTOR):
            self._entries.add(c, cn, DATA_START_SECTOR + self._data_sectors, False, tag)
            k = (c - offset) * SECTOR
            self._write(data[k : k + cn * SECTOR])
            self._data_sectors += cn

    def _zeroed_mapping(self, offset: int, length: int, tag: int = 0) -> None:
        """A zeroed entry, moffset = the current data position (§1.3 step 2)."""
        self._entries.add(offset, length, DATA_START_SECTOR + self._data_sectors, True, tag)

    def _write(self, chunk) -> None:
        if self._out is not None:
            self._out.write(chunk)
        else:
            self._chunks.append(bytes(chunk))

    def add_zeroed(self, offset: int, length: int) -> None:
        """Mark ``[offset, offset+length)`` as zeros that mask lower layers."""
        self._claim(offset, length)
        for s, n in _split(offset // SECTOR, length // SECTOR):
            self._zeroed_mapping(s, n)
        self._cursor = offset // SECTOR + length // SECTOR
        self._extent_end = -1

    def add_remote(self, offset: int, length: int, target_offset: int, tag: int = 1) -> None:
        """Warp only: map ``[offset, +length)`` to ``target_offset`` of target ``tag`` (§4.2)."""
        if not self.warp:
            raise ValueError("add_remote() needs a warp builder")
        if target_offset % SECTOR:
            raise ValueError(f"target offset {target_offset} is not 512-aligned")
        self._claim(offset, length)
        s, m = offset // SECTOR, target_offset // SECTOR
        for o, n in _split(s, length // SECTOR):
            self._entries.add(o, n, m + (o - s), False, tag)
        self._cursor = s + length // SECTOR
        self._extent_end = -1

    def finish(self, fileobj: BinaryIO | None = None) -> int:
        """Write header (unless bound), data, index and trailer; return the file size."""
        out = self._out
        if out is None:
            if fileobj is None:
                raise ValueError("finish() needs a file object")
            out = fileobj
            out.write(self._header.to_bytes())
            for c in self._chunks:
                out.write(c)
            self._chunks = []
        index = self._entries.finish(pad=not self.warp)
        index_offset = HEADER_SIZE + self._data_sectors * SECTOR
        out.write(index)
        trailer = replace(self._header, flags=FLAG_DATA | FLAG_SEALED, index_offset=index_offset,
                          index_size=len(index) // ENTRY_SIZE)
        out.write(trailer.to_bytes())
        return index_offset + len(index) + HEADER_SIZE


class _EntryWriter:
    """Collect entries, merging by the ``compress_raw_index`` rule (spec §1.3 step 3)."""

    def __init__(self):
        self._buf = bytearray()
        self._cur: list | None = None  # [offset, length, moffset, zeroed, tag]

    def add(self, o: int, n: int, m: int, z: bool, t: int) -> None:
        c = self._cur
        if c is not None:
            mend = c[2] if c[3] else c[2] + c[1]
            if c[0] + c[1] == o and mend == m and c[3] == z and c[4] == t and c[1] + n < MAX_LENGTH:
                c[1] += n
                return
            self._buf += pack_entry(*c)
        self._cur = [o, n, m, z, t]

    def finish(self, pad: bool) -> bytes:
        if self._cur is not None:
            self._buf += pack_entry(*self._cur)
            self._cur = None
        if pad:
            count = len(self._buf) // ENTRY_SIZE
            self._buf += INVALID_ENTRY * (-count % INDEX_PAD_ENTRIES)
        return bytes(self._buf)


def commit(layer: "RwLayer | LsmtFile | tuple[str, str]", out: "str | os.PathLike | BinaryIO", *,
           uuid: str | None = None, parent_uuid: str | None = None, user_tag: str = "") -> int:
    """Compact a writable (or sealed) layer into a §1.3 sealed file; returns its size.

    ``layer`` is an open :class:`RwLayer`, an :class:`LsmtFile`, or a
    ``(data_path, index_path)`` pair.  ``parent_uuid`` defaults to the
    source's parent.
    """
    own = False
    if isinstance(layer, tuple):
        layer = open_rw(*layer)
        own = True
    try:
        index = layer.sealed_index() if isinstance(layer, RwLayer) else layer.index
        if parent_uuid is None:
            parent_uuid = layer.parent_uuid if _is_uuid(layer.parent_uuid) else None
        b = SealedLayerBuilder(layer.vsize, uuid=uuid, parent_uuid=parent_uuid, user_tag=user_tag)
        if isinstance(out, (str, os.PathLike)):
            with open(out, "wb") as f:
                return _commit_into(b, layer, index, f)
        return _commit_into(b, layer, index, out)
    finally:
        if own:
            layer.close()


def _is_uuid(text: str) -> bool:
    try:
        _uuid.UUID(text)
        return True
    except ValueError:
        return False


def _commit_into(b: SealedLayerBuilder, layer, index: SegmentIndex, f: BinaryIO) -> int:
    b.bind(f)
    for o, n, m, z, t in index:
        if z:
            b._zeroed_mapping(o, n, t)
        else:
            b._copy_mapping(o, n, layer.read_mapped(t, m * SECTOR, n * SECTOR), t)
    return b.finish()
