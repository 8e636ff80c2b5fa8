"""The merged layer stack (spec §1.6): several LSMT layers seen as one virtual disk.

All layer indexes are merged once, at open, into one sorted, non-overlapping
index whose ``tag`` column is the level (0 = bottom layer here) the data lives
in: the topmost layer that maps a sector wins, zeroed segments mask lower
data, sectors unmapped everywhere read as zeros.  A read is then one bisect
plus one coalesced file read per contiguous piece, whatever the depth.

A TurboOCI (warp) layer takes part as one opaque file (§4.3): its segments are
entered with ``moffset = offset`` and read through the layer's own ``read``.
"""

from __future__ import annotations

from array import array
from bisect import bisect_right
from typing import Callable, Iterator, Sequence

from ..errors import CorruptDataError, UsageError
from ..format.lsmt import MAX_RW_INDEX_SIZE, SECTOR, LsmtFile, SegmentIndex
from .source import clamp_read

MAX_LAYERS = 256


def _layer_index(layer) -> SegmentIndex:
    """The layer's segments as columns (reusing its own arrays when it has them)."""
    idx = getattr(layer, "index", None)
    if not isinstance(idx, SegmentIndex):
        segs = list(layer.segments())
        idx = SegmentIndex(array("Q", [s[0] for s in segs]), array("I", [s[1] for s in segs]),
                           array("Q", [s[2] for s in segs]), array("B", [int(s[3]) for s in segs]),
                           array("H", [s[4] for s in segs]))
    return idx


def _relabel(idx: SegmentIndex, level: int, identity: bool) -> SegmentIndex:
    """A single layer's index as merged entries: tag := level (and moffset := offset if opaque)."""
    return SegmentIndex(array("Q", idx.offsets), array("I", idx.lengths),
                        array("Q", idx.offsets if identity else idx.moffsets), array("B", idx.zeroed),
                        array("H", bytes(2 * len(idx.offsets))) if level == 0 else
                        array("H", [level]) * len(idx.offsets))


def _overlay(upper: SegmentIndex, lower: SegmentIndex, lower_level: int, identity: bool) -> SegmentIndex:
    """Merge ``lower`` (one layer) under ``upper`` (already merged): fill only upper's gaps.

    One pass over the lower index; lower segments are trimmed to upper's gaps (a
    trimmed data segment advances its moffset, a zeroed one keeps it), and the
    upper segments between two pieces are copied as array slices (an image's
    merged index can hold 10^5 segments: opening it must not cost a Python step each).
    """
    if not len(upper):
        return _relabel(lower, lower_level, identity)
    uo, ul, um, uz, ut = upper.offsets, upper.lengths, upper.moffsets, upper.zeroed, upper.tags
    lo_, ll, lm, lz = lower.offsets, lower.lengths, lower.moffsets, lower.zeroed
    oo, ol, om, oz, ot = array("Q"), array("I"), array("Q"), array("B"), array("H")
    o_app, l_app, m_app, z_app, t_app = oo.append, ol.append, om.append, oz.append, ot.append
    n_up = len(uo)
    i = 0  # upper segments [0, i) are copied
    k = 0  # upper segments [0, k) start at or before p (p only grows: k moves forward)
    for j in range(len(lo_)):
        s = lo_[j]
        e = s + ll[j]
        p = s
        while p < e:
            if k < n_up and uo[k] <= p:
                k = bisect_right(uo, p, k)
            if k and uo[k - 1] + ul[k - 1] > p:  # p lies under upper segment k-1
                p = uo[k - 1] + ul[k - 1]
                continue
            b = uo[k] if k < n_up and uo[k] < e else e  # the gap [p, b) is lower's
            if k > i:
                oo.extend(uo[i:k])
                ol.extend(ul[i:k])
                om.extend(um[i:k])
                oz.extend(uz[i:k])
                ot.extend(ut[i:k])
                i = k
            z = lz[j]
            o_app(p)
            l_app(b - p)
            m_app(p if identity else (lm[j] if z else lm[j] + (p - s)))
            z_app(z)
            t_app(lower_level)
            p = b
    if i < n_up:
        oo.extend(uo[i:])
        ol.extend(ul[i:])
        om.extend(um[i:])
        oz.extend(uz[i:])
        ot.extend(ut[i:])
    if len(oo) > MAX_RW_INDEX_SIZE:
        raise UsageError(f"merged index has {len(oo)} segments, more than {MAX_RW_INDEX_SIZE}")
    return SegmentIndex(oo, ol, om, oz, ot)


def _data_reader(layer) -> Callable[[int, int], bytes]:
    """``read(pos, n)`` of the file a level's merged segments point into.

    A warp layer is read through its own index (its segments have ``moffset ==
    offset``); a sealed layer's data file is its ``targets[0]`` (the ZFile or
    raw LSMT bytes), called directly; anything else (a writable layer, a
    recording wrapper) through ``read_mapped(0, ...)``.
    """
    if getattr(layer, "warp", False):
        return layer.read
    if type(layer) is LsmtFile:
        return layer.targets[0].read
    return lambda pos, n: layer.read_mapped(0, pos, n)


def _cached_data_reader(layer) -> Callable[[int, int], bytes | None] | None:
    """The non-blocking ``read_cached`` of a sealed layer's data file, or None."""
    if type(layer) is LsmtFile and not layer.warp:
        return getattr(layer.targets[0], "read_cached", None)
    return None


class StackedDisk:
    """A stack of layers (bottom first) as one byte source; reads are thread-safe.

    The indexes are merged once, here: a writable layer written to afterwards
    needs a new ``StackedDisk`` for the stack to see the new mappings.
    """

    def __init__(self, layers: Sequence):
        if not layers:
            raise UsageError("a layer stack needs at least one layer")
        if len(layers) > MAX_LAYERS:
            raise UsageError(f"{len(layers)} layers in a stack, at most {MAX_LAYERS} allowed")
        self.layers = list(layers)
        top = getattr(self.layers[-1], "name", "?")
        self.name = top if len(self.layers) == 1 else f"{top} (+{len(self.layers) - 1} lower layers)"
        self.vsize = next((layer.vsize for layer in reversed(self.layers) if layer.vsize), 0)
        self.size = self.vsize
        self._readers: list[Callable[[int, int], bytes]] = [_data_reader(layer) for layer in self.layers]
        self._cached_readers = [_cached_data_reader(layer) for layer in self.layers]
        merged = None
        for level in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[level]
            idx = _layer_index(layer)
            warp = bool(getattr(layer, "warp", False))
            if not warp and any(idx.tags):
                raise UsageError(f"{layer.name}: an ordinary layer's segments must all have tag 0")
            if merged is None:
                merged = _overlay(SegmentIndex.empty(), idx, level, warp)
            else:
                merged = _overlay(merged, idx, level, warp)
        self.index = merged

    def _fetch(self, level: int, pos: int, n: int) -> bytes:
        return self._readers[level](pos, n)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the virtual disk; a read inside one data segment (most device reads: a
        segment is up to 8 MiB) is one bisect and one call of its level's reader."""
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        inside = self._one_segment(offset, n)
        if inside is None:
            return self.index.read(offset, n, self._fetch, self.name)
        level, pos = inside
        data = self._readers[level](pos, n)
        if len(data) != n:
            raise CorruptDataError(
                f"segment at virtual byte {offset} maps past the end of its data file "
                f"(wanted {n} bytes at {pos}, got {len(data)})", blob=self.name, offset=pos)
        return data

    def _one_segment(self, offset: int, n: int) -> tuple[int, int] | None:
        """(level, byte position in its data file) when ``[offset, offset+n)`` lies inside one
        data segment; None for anything else (holes, zeroed, several segments)."""
        idx = self.index
        i = bisect_right(idx.offsets, offset >> 9) - 1
        if i < 0 or idx.zeroed[i]:
            return None
        start = idx.offsets[i] << 9
        if offset + n > start + (idx.lengths[i] << 9):
            return None
        return idx.tags[i], (idx.moffsets[i] << 9) + (offset - start)

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """What ``read`` returns if it needs no waiting, else None (never blocks on a fetch).

        Served: a read inside one data segment whose level can read without waiting
        (its data file has ``read_cached``: a ZFile over the block cache) and finds
        every block there.  Anything else (holes, zeroed or several segments, a
        miss, a short data file) is None: ``read`` serves it, or raises.
        """
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        inside = self._one_segment(offset, n)
        if inside is None:
            return None
        level, pos = inside
        reader = self._cached_readers[level]
        if reader is None:
            return None
        data = reader(pos, n)
        return data if data is not None and len(data) == n else None

    def extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bool, int]]:
        """Merged (offset_bytes, length_bytes, zeroed, level) runs in ``[start, end)``, in order.

        Adjacent segments of the same level and kind are coalesced; holes are
        not reported.
        """
        end = self.size if end is None else min(end, self.size)
        idx = self.index
        offs, lens, zer, tags = idx.offsets, idx.lengths, idx.zeroed, idx.tags
        i = idx.first_at_or_after(start // SECTOR)
        run = None
        while i < len(offs):
            a, b = offs[i] * SECTOR, (offs[i] + lens[i]) * SECTOR
            if a >= end:
                break
            a, b = max(a, start), min(b, end)
            z, t = bool(zer[i]), tags[i]
            if run and run[0] + run[1] == a and run[2] == z and run[3] == t:
                run[1] += b - a
            else:
                if run:
                    yield tuple(run)
                run = [a, b - a, z, t]
            i += 1
        if run:
            yield tuple(run)

    def level_of(self, offset: int) -> int | None:
        """The level whose data backs byte ``offset`` (None for holes)."""
        hit = self.index.lookup(offset // SECTOR)
        return None if hit is None else hit[4]

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __repr__(self) -> str:
        return f"StackedDisk({len(self.layers)} layers, vsize={self.vsize}, segments={len(self.index)})"

