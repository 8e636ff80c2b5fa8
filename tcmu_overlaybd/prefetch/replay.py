"""Replay: fetch a trace's ranges, or a prefetch list's files, so they land in the caches (spec §7.1).

A replay is a list of ``Piece``s (a reader and a range of at most ``PIECE_MAX``
bytes, the 1 MiB buffers of upstream's replay) read in order by
``prefetch.concurrency`` worker threads.  The data read is dropped: what
matters is that every blob block under it is now in the block cache (and, for
FastOCI, the inflated data in the gzip cache).

* trace records warm the layer they name: an ordinary layer's records are
  offsets in its decompressed LSMT file, mapped through the ZFile jump table to
  the compressed blocks, which are fetched into the block cache and not
  decompressed (``block.source.warm``: under TCG, decompressing twice cost the
  replay as much CPU as the workload's own reads).  Records whose compressed
  blocks lie in touching or overlapping cache blocks of the same blob, or no
  more than ``prefetch.mergeGapKb`` apart, are merged (``_WarmMerger``,
  first-read order kept) into fetches of up to ``WARM_PIECE_MAX``: the same
  bytes (plus the gaps) in a fraction of the Range GETs, each of which costs
  the registry and the handler a request.  A TurboOCI layer is read
  through its own view (see ``record``), which leaves the inflated data in the
  gzip cache, the part worth keeping; before each such read, the compressed
  input it will need (from the gzip checkpoint on, ``GzipIndexedSource.warm_map``)
  is merged and fetched the same way;
* a prefetch list's files are looked up in the ext4 file system of the merged
  disk; each file's extents are read from the merged disk (the "layer 0" of
  upstream's list mode), directories ending in ``/`` recursively.

Device reads keep priority: while one waits for the registry, only a quarter
of the workers (``PRIORITY_SHARE``, at least one) go on, the others wait (at
most ``cache.blockcache.YIELD_MAX_S`` per piece) until the device is idle.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable

from ..block.source import warm, warm_target
from ..cache.blockcache import background_fetches, yield_to_foreground
from ..errors import NotFoundError, ObdError
from ..format.trace import OP_READ, TraceRecord

log = logging.getLogger(__name__)

#: bytes per replay read (upstream replays with 1 MiB buffers)
PIECE_MAX = 1 << 20
#: bytes per replay fetch of compressed blocks that are stored, not decoded (one Range GET)
WARM_PIECE_MAX = 4 << 20
#: how many of the latest warm ranges a trace record may join (first-read order is kept)
MERGE_LOOKBACK = 64
#: share of the workers that keep fetching while device reads wait for the registry
PRIORITY_SHARE = 0.25
#: bytes of pieces being read at once, at most (a piece's fetched bytes are held in memory until
#: stored: 16 workers on merged 4 MiB pieces would otherwise hold 64 MiB, the handler's RSS);
#: 16 MiB is still 64 round trips' worth of a 100 Mbit/s link at 20 ms
IN_FLIGHT_MAX = 16 << 20
#: paths of a directory walk, at most (a list of "/" must not walk a whole distro forever)
WALK_MAX_FILES = 200_000


@dataclass(frozen=True)
class Piece:
    """``read(offset, length)`` brings the range into the caches; its result is not used."""
    read: Callable[[int, int], object]
    offset: int
    length: int


def _split(read, offset: int, length: int, out: list[Piece], most: int = PIECE_MAX) -> None:
    end = offset + length
    while offset < end:
        n = min(most, end - offset)
        out.append(Piece(read, offset, n))
        offset += n


def layer_reader(layer) -> Callable[[int, int], object]:
    """How a trace record of ``layer`` is replayed (the offsets ``record.RecordingLayer`` notes)."""
    if getattr(layer, "warp", False):
        return layer.read
    data = getattr(layer, "targets", {}).get(0)
    if data is None:
        return lambda off, n: layer.read_mapped(0, off, n)
    return lambda off, n: warm(data, off, n)


def _warm_source(layer):
    """The source a trace record of ``layer`` warms without decoding (see ``layer_reader``), or None."""
    if getattr(layer, "warp", False):
        return None
    return getattr(layer, "targets", {}).get(0)


class _WarmMerger:
    """Records of warmable layers as ranges of the source they end up fetching (a blob through
    the block cache), in first-read order.  A record whose cache blocks touch or overlap those
    of ranges of the same source among the ``MERGE_LOOKBACK`` latest, or lie at most ``gap``
    bytes from them, joins them (one request instead of several, for at most ``gap`` bytes more
    each), up to ``WARM_PIECE_MAX`` bytes: all of them into the earliest if that fits (a record
    that bridges two ranges makes them one), else the latest one it fits with."""

    def __init__(self, gap: int = 0):
        self.ranges: list[list] = []  # [source, start, end], in order of their first record
        self.gap = gap

    def add(self, data, offset: int, count: int, fetched_only: bool = False) -> None:
        """Note a record; ``fetched_only``: skip it unless it ends up fetched into a cache."""
        src, start, n = warm_target(data, offset, count)
        if n <= 0 or (fetched_only and getattr(src, "fetch_range", None) is None):
            return
        end = start + n
        bs = getattr(getattr(src, "cache", None), "block_size", 0) or 1
        first, past = start // bs * bs, -(-end // bs) * bs  # the cache blocks the range fetches
        near = [r for r in self.ranges[-MERGE_LOOKBACK:]
                if r[0] is src and first - -(-r[2] // bs) * bs <= self.gap and r[1] // bs * bs - past <= self.gap]
        if not near:
            self.ranges.append([src, start, end])
            return
        lo, hi = min(start, *(r[1] for r in near)), max(end, *(r[2] for r in near))
        if hi - lo <= WARM_PIECE_MAX:
            keep = near[0]
            gone = {id(r) for r in near[1:]}
            for r in near[1:]:  # absorbed: left empty where the replay order holds it
                r[2] = r[1]
            tail = len(self.ranges) - MERGE_LOOKBACK
            self.ranges[tail:] = [r for r in self.ranges[tail:] if id(r) not in gone]
            keep[1], keep[2] = lo, hi
            return
        for r in reversed(near):
            if max(end, r[2]) - min(start, r[1]) <= WARM_PIECE_MAX:
                r[1], r[2] = min(start, r[1]), max(end, r[2])
                return
        self.ranges.append([src, start, end])


def trace_pieces(layers: list, records: list[TraceRecord], name: str, merge_gap: int = 0) -> list[Piece]:
    """The reads that replay ``records`` against ``layers`` (bottom first), in record order;
    ``merge_gap``: bytes of a blob fetched unasked to join two of its ranges (``_WarmMerger``).

    Records naming a layer the image does not have (a trace of another image)
    are skipped with one warning.
    """
    readers = [layer_reader(layer) for layer in layers]
    warmable = [_warm_source(layer) for layer in layers]
    merger = _WarmMerger(merge_gap)
    order: list = []  # Pieces, and the merger's ranges where their first record comes
    skipped = 0
    for r in records:
        if r.op != OP_READ or r.count <= 0:
            continue
        if r.layer_index >= len(readers):
            skipped += 1
            continue
        data = warmable[r.layer_index]
        known = len(merger.ranges)
        if data is not None:
            merger.add(data, r.offset, r.count)
        else:
            # a TurboOCI layer: its compressed input first (merged as above), then the read that
            # inflates it into the gzip cache (which then waits for those fetches, not the network)
            mapped = getattr(layers[r.layer_index], "mapped_ranges", None)
            for target, pos, n in mapped(r.offset, r.count) if mapped is not None else ():
                merger.add(target, pos, n, fetched_only=True)
        order.extend(merger.ranges[known:])
        if data is None:
            _split(readers[r.layer_index], r.offset, r.count, order)
    out: list[Piece] = []
    for p in order:
        if isinstance(p, Piece):
            out.append(p)
        else:  # a merged range, its final extent
            _split(functools.partial(warm, p[0]), p[1], p[2] - p[1], out, WARM_PIECE_MAX)
    if skipped:
        log.warning("%s: %d records name a layer this image does not have (%d layers); skipped",
                    name, skipped, len(readers))
    return out


def list_pieces(disk, paths: list[str], name: str) -> list[Piece]:
    """The reads that fetch the files of a prefetch list from the merged ``disk`` (ext4), in list order.

    Missing paths are skipped (logged); a path ending in ``/`` is a directory
    whose files are all fetched, depth first.
    """
    from ..ext4.fs import Ext4

    fs = Ext4(disk)
    out: list[Piece] = []
    seen: set[int] = set()
    for path in paths:
        try:
            inode = fs.lookup(path)
        except NotFoundError:
            log.info("%s: %s: not in the image; skipped", name, path)
            continue
        except ObdError as e:
            log.warning("%s: %s: %s; skipped", name, path, e)
            continue
        if path.endswith("/") and inode.is_dir:
            _walk(fs, inode, disk.read, out, seen)
        elif inode.is_reg:
            _file(fs, inode, disk.read, out, seen)
    return out


def _file(fs, inode, read, out: list[Piece], seen: set[int]) -> None:
    if inode.ino in seen:
        return
    seen.add(inode.ino)
    for _logical, physical, length in fs.file_extents(inode):
        _split(read, physical, length, out)


def _walk(fs, top, read, out: list[Piece], seen: set[int]) -> None:
    stack = [top]
    while stack and len(seen) < WALK_MAX_FILES:
        d = stack.pop()
        for entry in fs.listdir(d):
            if entry.type not in "-d":
                continue
            child = fs.inode(entry.ino)
            if child.is_dir:
                if child.ino not in seen:
                    seen.add(child.ino)
                    stack.append(child)
            elif child.is_reg:
                _file(fs, child, read, out, seen)


class Replayer:
    """Worker threads reading ``pieces`` in order; counters for ``obd stats``.

    ``stats`` is the session's ``PrefetchStats`` (``ranges_total``, ``ranges_done``,
    ``ranges_failed``, ``bytes_prefetched`` are updated here).
    """

    def __init__(self, pieces: list[Piece], concurrency: int, stats, stop: threading.Event):
        self.pieces = pieces
        self.stats = stats
        self.stop = stop
        self._next = 0
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._work, args=(i,), name=f"obd-prefetch-{i}", daemon=True)
                         for i in range(max(1, min(concurrency, len(pieces))))]
        self._priority_lanes = max(1, int(concurrency * PRIORITY_SHARE))
        self._budget = threading.Condition(self._lock)
        self._in_flight = 0
        stats.ranges_total += len(pieces)

    def start(self) -> "Replayer":
        for t in self._threads:
            t.start()
        return self

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers; True when all are done."""
        for t in self._threads:
            t.join(timeout)
        return not any(t.is_alive() for t in self._threads)

    def _take(self) -> Piece | None:
        """The next piece, once ``IN_FLIGHT_MAX`` has room for it (a larger piece waits until
        nothing else is in flight); None when done or stopped."""
        with self._lock:
            if self._next >= len(self.pieces) or self.stop.is_set():
                return None
            self._next += 1
            piece = self.pieces[self._next - 1]
            need = min(piece.length, IN_FLIGHT_MAX)
            while self._in_flight + need > IN_FLIGHT_MAX:
                if self.stop.is_set():
                    return None
                self._budget.wait(0.5)
            self._in_flight += need
            return piece

    def _done(self, piece: Piece) -> None:
        with self._lock:
            self._in_flight -= min(piece.length, IN_FLIGHT_MAX)
            self._budget.notify_all()

    def _work(self, lane: int) -> None:
        stats = self.stats
        with background_fetches():
            while True:
                if lane >= self._priority_lanes:
                    yield_to_foreground(self.stop)
                piece = self._take()
                if piece is None:
                    return
                try:
                    piece.read(piece.offset, piece.length)
                except ObdError as e:
                    with self._lock:
                        stats.ranges_failed += 1
                        first = stats.ranges_failed == 1
                    if first:  # one line, not one per range: the device reads report their own errors
                        log.warning("prefetch: read of %d bytes at %d failed: %s", piece.length, piece.offset, e)
                    continue
                finally:
                    self._done(piece)
                with self._lock:
                    stats.ranges_done += 1
                    stats.bytes_prefetched += piece.length
