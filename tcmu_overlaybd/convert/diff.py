"""Block diff of a sparse ext4 image before and after applying a layer.

The working image is one sparse file holding the merged view of all layers so
far.  Before a layer is applied it is snapshotted (:func:`snapshot`, a sparse
in-kernel copy of its data ranges); afterwards :func:`changed_extents` walks the
data ranges of both files (``SEEK_DATA``/``SEEK_HOLE``), compares them 4 KiB
block by block and returns the changed runs — the content of the layer's LSMT
(§1).  In FastOCI ``map`` mode the file-data ranges mapped onto the original
tar (§4.2) are cut out: those sectors come from the layer itself.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Iterable, Iterator

BLOCK = 4096
SECTOR = 512
CHUNK = 1 << 20
_ZERO_BLOCK = bytes(BLOCK)


@dataclass(frozen=True)
class Change:
    """``length`` bytes at ``offset`` differ from the image below; ``zero`` if they now read zeros."""

    offset: int
    length: int
    zero: bool


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """[start, end) of every data range of an open file, holes skipped."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole remains
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        pos = end


def _union(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of two range lists, widened to whole blocks."""
    ranges = sorted((s // BLOCK * BLOCK, -(-e // BLOCK) * BLOCK) for s, e in a + b)
    out: list[list[int]] = []
    for s, e in ranges:
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _subtract(changes: list[Change], cut: list[tuple[int, int]]) -> list[Change]:
    """``changes`` minus the sorted, non-overlapping ranges ``cut``."""
    out: list[Change] = []
    i = 0
    for ch in changes:
        s, e = ch.offset, ch.offset + ch.length
        while i < len(cut) and cut[i][1] <= s:
            i += 1
        j = i
        while s < e:
            if j >= len(cut) or cut[j][0] >= e:
                out.append(Change(s, e - s, ch.zero))
                break
            cs, ce = cut[j]
            if cs > s:
                out.append(Change(s, cs - s, ch.zero))
            s = max(s, ce)
            j += 1
    return out


def changed_extents(
    before: str | None, after: str, exclude: Iterable[tuple[int, int]] = ()
) -> list[Change]:
    """Runs of 4 KiB blocks of ``after`` that differ from ``before`` (None: all zeros).

    ``exclude`` are (offset, length) byte ranges, 512-aligned, left out of the
    result; what remains of a block they cut is compared again sector by sector,
    so the zero tail after a mapped file's last sector is not reported.
    """
    fa = os.open(after, os.O_RDONLY | os.O_CLOEXEC)
    fb = os.open(before, os.O_RDONLY | os.O_CLOEXEC) if before else -1
    try:
        size = os.fstat(fa).st_size
        ranges = list(data_ranges(fa, size))
        if fb >= 0:
            ranges = _union(ranges, list(data_ranges(fb, os.fstat(fb).st_size)))
        else:
            ranges = _union(ranges, [])
        changes: list[Change] = []
        for start, end in ranges:
            for pos in range(start, min(end, size), CHUNK):
                n = min(CHUNK, end - pos, size - pos)
                new = _pread(fa, n, pos)
                old = _pread(fb, n, pos)
                if new == old:
                    continue
                _collect(changes, pos, memoryview(new), memoryview(old))
        cut = sorted((o, o + n) for o, n in exclude)
        if not cut:
            return changes
        out: list[Change] = []
        for piece in _subtract(changes, cut):
            for ch in _refine(fa, fb, piece):
                last = out[-1] if out else None
                if last and last.offset + last.length == ch.offset and last.zero == ch.zero:
                    out[-1] = Change(last.offset, last.length + ch.length, ch.zero)
                else:
                    out.append(ch)
        return out
    finally:
        os.close(fa)
        if fb >= 0:
            os.close(fb)


def _pread(fd: int, n: int, pos: int) -> bytes:
    """``n`` bytes at ``pos`` (zeros past EOF or for no file)."""
    data = os.pread(fd, n, pos) if fd >= 0 else b""
    return data if len(data) == n else data + bytes(n - len(data))


def _refine(fa: int, fb: int, piece: Change) -> Iterator[Change]:
    """Re-compare the partial blocks at the ends of a cut piece sector by sector."""
    s, e = piece.offset, piece.offset + piece.length
    head_end = min(e, -(-s // BLOCK) * BLOCK)
    tail_start = max(head_end, e // BLOCK * BLOCK)
    if s < head_end:
        yield from _sectors(fa, fb, s, head_end)
    if head_end < tail_start:
        yield Change(head_end, tail_start - head_end, piece.zero)
    if tail_start < e:
        yield from _sectors(fa, fb, tail_start, e)


def _sectors(fa: int, fb: int, s: int, e: int) -> Iterator[Change]:
    new, old = _pread(fa, e - s, s), _pread(fb, e - s, s)
    run: Change | None = None
    for k in range(0, e - s, SECTOR):
        a = new[k : k + SECTOR]
        if a == old[k : k + SECTOR]:
            if run:
                yield run
            run = None
            continue
        zero = not any(a)
        if run and run.zero == zero:
            run = Change(run.offset, run.length + SECTOR, zero)
        else:
            if run:
                yield run
            run = Change(s + k, SECTOR, zero)
    if run:
        yield run


def _collect(changes: list[Change], pos: int, new: memoryview, old: memoryview) -> None:
    """Append the changed blocks of one chunk, merging runs of equal zero-ness."""
    for k in range(0, len(new), BLOCK):
        a = new[k : k + BLOCK]
        if a == old[k : k + BLOCK]:
            continue
        zero = a == _ZERO_BLOCK[: len(a)]
        off = pos + k
        last = changes[-1] if changes else None
        if last is not None and last.offset + last.length == off and last.zero == zero:
            changes[-1] = Change(last.offset, last.length + len(a), zero)
        else:
            changes.append(Change(off, len(a), zero))


#: ioctl FICLONE: share all of src's extents with dst (btrfs, xfs, bcachefs)
_FICLONE = 0x40049409


def snapshot(src: str, dst: str) -> None:
    """Copy ``src`` to ``dst`` keeping it sparse: a reflink where the filesystem has
    them, else the data ranges only, copied in the kernel."""
    fi = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fi).st_size
        fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.ioctl(fo, _FICLONE, fi)
                return
            except OSError:
                pass
            os.ftruncate(fo, size)
            for start, end in data_ranges(fi, size):
                pos = start
                while pos < end:
                    try:
                        n = os.copy_file_range(fi, fo, end - pos, pos, pos)
                    except OSError:  # no in-kernel copy here: plain read/write
                        n = 0
                    if n <= 0:
                        n = os.pwrite(fo, os.pread(fi, min(CHUNK, end - pos), pos), pos)
                    pos += n
        finally:
            os.close(fo)
    finally:
        os.close(fi)
