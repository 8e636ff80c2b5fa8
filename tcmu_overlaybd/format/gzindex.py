"""Gzip index (``gzip.meta``, magic ``ddgzidx``): random access into a gzip layer (spec §4.4).

A TurboOCI layer maps file data onto the *uncompressed* tar stream of the
original, unmodified OCI layer.  When that layer is gzip, the index lists
checkpoints: a deflate block boundary (``en_pos`` compressed, ``de_pos``
uncompressed, ``bits`` unused bits of the byte before ``en_pos``) plus the
32 KiB of output preceding it.  A read restarts a raw inflater at the last
checkpoint at or before the wanted offset.

Layout (all little-endian, packed)::

    header   333 bytes at 0     (``HEADER``; CRC = crc32c_raw(header[0:329]))
    windows  one per checkpoint, consecutive from 333 (raw 32 KiB or one zlib stream)
    entries  ``index_num`` x 29 bytes at ``index_start`` (raw or one zlib stream)

Integrity: deflate data carries no checksum until the gzip trailer, which random
access never reaches, so damage that still decodes (common: most bit patterns are
valid Huffman codes) cannot be detected here; only data zlib rejects raises
``CorruptDataError``.  Whole blobs are checked against their digest where they are
downloaded (``image.store.verify_digest``).

The writer finds block boundaries with libz's ``inflate(Z_BLOCK)``; the reader resumes
mid-byte at a checkpoint; both through ``ctypes`` (``format.inflate``: libz, and ISA-L's
faster decoder for reads where it is installed).
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import struct
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

from ..block.source import ByteSource, BytesSource, clamp_read, read_exact
from ..cache.gzipcache import digest_in
from ..crc32c import crc32c_raw
from ..errors import CorruptDataError, StateError, UsageError
from .inflate import (LIBZ, LIBZ_VERSION, Z_BLOCK, Z_BUF_ERROR, Z_FINISH, Z_OK, Z_STREAM_END, ZSTREAM_SIZE,
                      ZStream, input_slack, raw_decoder)

log = logging.getLogger(__name__)

# --- layout (spec §4.4) ---------------------------------------------------------------

MAGIC = b"ddgzidx\0"
WINSIZE = 32768
#: upstream refuses spans smaller than the largest uncompressed deflate block it assumes
MIN_SPAN = 65536
DICT_RAW = 0
DICT_ZLIB = 1

#: magic, major, minor, dict_algo, dict_level, flag, span, window, index_size, index_num,
#: gzip_file_size, index_file_size, uncompress_file_size, reserve[256], index_start,
#: index_area_len, crc
HEADER = struct.Struct("<8sBBBbBiiiqqqq256sqqI")
HEADER_CRC_OFFSET = 329
#: de_pos, en_pos, win_pos, bits, win_len
ENTRY = struct.Struct("<qqqBI")
assert HEADER.size == 333 and ENTRY.size == 29


@dataclass(frozen=True)
class GzipIndexHeader:
    """The 333-byte ``ddgzidx`` header."""

    span: int
    index_num: int
    gzip_file_size: int
    index_file_size: int
    uncompress_file_size: int
    index_start: int
    index_area_len: int
    dict_compress_algo: int = DICT_ZLIB
    dict_compress_level: int = 6
    major_version: int = 1
    minor_version: int = 0
    flag: int = 0
    window: int = WINSIZE
    index_size: int = ENTRY.size
    crc: int = 0

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "gzip.meta") -> "GzipIndexHeader":
        """Parse and check magic, CRC, version and entry size."""
        if len(data) < HEADER.size:
            raise CorruptDataError(
                f"gzip index header needs {HEADER.size} bytes, file has {len(data)}", blob=name, offset=0
            )
        (magic, major, minor, algo, level, flag, span, window, index_size, index_num, gz_size,
         idx_size, unc_size, _reserve, index_start, area_len, crc) = HEADER.unpack_from(data)
        if magic[:7] != MAGIC[:7]:
            raise CorruptDataError(f"bad gzip index magic {magic[:7]!r}", blob=name, offset=0)
        actual = crc32c_raw(data[:HEADER_CRC_OFFSET])
        if actual != crc:
            raise CorruptDataError(
                f"gzip index header CRC 0x{crc:08x} != computed 0x{actual:08x}", blob=name, offset=HEADER_CRC_OFFSET
            )
        if major != 1:
            raise CorruptDataError(f"gzip index major version {major}, only 1 is known", blob=name, offset=8)
        if index_size != ENTRY.size:
            raise CorruptDataError(f"gzip index entry size {index_size} != {ENTRY.size}", blob=name, offset=21)
        if algo not in (DICT_RAW, DICT_ZLIB):
            raise CorruptDataError(f"unknown window compression {algo}", blob=name, offset=10)
        if window != WINSIZE:
            raise CorruptDataError(f"window size {window} != {WINSIZE}", blob=name, offset=17)
        return cls(
            span=span, index_num=index_num, gzip_file_size=gz_size, index_file_size=idx_size,
            uncompress_file_size=unc_size, index_start=index_start, index_area_len=area_len,
            dict_compress_algo=algo, dict_compress_level=level, major_version=major,
            minor_version=minor, flag=flag, window=window, index_size=index_size, crc=crc,
        )

    def to_bytes(self) -> bytes:
        """Pack, computing the CRC (the ``crc`` field is ignored)."""
        body = HEADER.pack(
            MAGIC, self.major_version, self.minor_version, self.dict_compress_algo,
            self.dict_compress_level, self.flag, self.span, self.window, self.index_size,
            self.index_num, self.gzip_file_size, self.index_file_size, self.uncompress_file_size,
            bytes(256), self.index_start, self.index_area_len, 0,
        )[:HEADER_CRC_OFFSET]
        return body + struct.pack("<I", crc32c_raw(body))


@dataclass(frozen=True)
class Checkpoint:
    """One 29-byte entry: where a raw inflater can start."""

    de_pos: int  # uncompressed offset
    en_pos: int  # compressed offset (bytes consumed, gzip header included)
    win_pos: int  # offset of the window in the index file
    bits: int  # unused bits of the byte at en_pos - 1 (0..7)
    win_len: int  # stored window length

    def to_bytes(self) -> bytes:
        return ENTRY.pack(self.de_pos, self.en_pos, self.win_pos, self.bits, self.win_len)


# --- libz through ctypes (format.inflate) -----------------------------------------------

#: inflate(Z_BLOCK) sets these in data_type: stopped at a block boundary / end of header,
#: and "currently in the last block"
_DT_BOUNDARY, _DT_LAST_BLOCK = 128, 64


def _zlib_deflate_once(data: bytes, level: int) -> bytes:
    """``deflateInit(level)`` + one ``deflate(Z_FINISH)``, exactly as upstream compresses windows."""
    strm = ZStream()
    if LIBZ.deflateInit_(ctypes.byref(strm), level, LIBZ_VERSION, ZSTREAM_SIZE) != Z_OK:
        raise UsageError(f"invalid zlib compression level {level}")
    try:
        inbuf = ctypes.create_string_buffer(data, len(data))
        cap = len(data) * 2 + 4096
        out = ctypes.create_string_buffer(cap)
        strm.next_in = ctypes.addressof(inbuf)
        strm.avail_in = len(data)
        strm.next_out = ctypes.addressof(out)
        strm.avail_out = cap
        if LIBZ.deflate(ctypes.byref(strm), Z_FINISH) != Z_STREAM_END:
            raise AssertionError("deflate(Z_FINISH) with a 2x buffer must finish")
        return out.raw[: cap - strm.avail_out]
    finally:
        LIBZ.deflateEnd(ctypes.byref(strm))


# --- reader ----------------------------------------------------------------------------


class GzipIndex:
    """A parsed, validated gzip index; windows are read lazily from ``source``."""

    #: decompressed windows kept in memory (32 KiB each)
    WINDOW_CACHE = 32
    #: ``input_end`` of a read's last span: the span's ratio times this, plus this many bytes
    TAIL_MARGIN = 1.5
    TAIL_SLACK = 16384

    def __init__(self, header: GzipIndexHeader, checkpoints: list[Checkpoint], source: ByteSource):
        self.header = header
        self.checkpoints = checkpoints
        self.source = source
        self.name = source.name
        self._de_positions = [c.de_pos for c in checkpoints]
        self._windows: OrderedDict[int, bytes] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def uncompressed_size(self) -> int:
        return self.header.uncompress_file_size

    @property
    def gzip_size(self) -> int:
        return self.header.gzip_file_size

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "gzip.meta") -> "GzipIndex":
        return cls.from_source(BytesSource(data, name))

    @classmethod
    def from_source(cls, source: ByteSource) -> "GzipIndex":
        """Parse the header and entry table of ``source`` and check them against each other."""
        name = source.name
        h = GzipIndexHeader.from_bytes(read_exact(source, 0, min(HEADER.size, source.size), "gzip index header"), name)
        if h.index_file_size != source.size:
            raise CorruptDataError(
                f"gzip index says its size is {h.index_file_size}, file has {source.size}", blob=name, offset=41
            )
        if h.index_start < HEADER.size or h.index_area_len < 0 or h.index_start + h.index_area_len != source.size:
            raise CorruptDataError(
                f"entry table [{h.index_start}, +{h.index_area_len}) does not end the {source.size}-byte file",
                blob=name, offset=313,
            )
        if h.gzip_file_size <= 0 or h.uncompress_file_size < 0:
            raise CorruptDataError("gzip index has no gzip or uncompressed size", blob=name, offset=33)
        # the writer adds at most one checkpoint per span (>= MIN_SPAN) plus the first two
        if not 1 <= h.index_num <= h.uncompress_file_size // MIN_SPAN + 2:
            raise CorruptDataError(
                f"implausible checkpoint count {h.index_num} for {h.uncompress_file_size} bytes", blob=name, offset=25
            )
        area = read_exact(source, h.index_start, h.index_area_len, "gzip index entry table")
        want = h.index_num * ENTRY.size
        if h.dict_compress_algo == DICT_ZLIB:
            table = _inflate_exact(area, want, name, h.index_start, "entry table")
        else:
            table = area
        if len(table) != want:
            raise CorruptDataError(
                f"entry table holds {len(table)} bytes, {h.index_num} entries need {want}",
                blob=name, offset=h.index_start,
            )
        checkpoints = [Checkpoint(*e) for e in ENTRY.iter_unpack(table)]
        _check_checkpoints(checkpoints, h, name)
        return cls(h, checkpoints, source)

    def checkpoint_for(self, offset: int) -> Checkpoint:
        """The last checkpoint with ``de_pos <= offset`` (upstream: upper_bound - 1)."""
        i = bisect.bisect_right(self._de_positions, offset)
        return self.checkpoints[max(i - 1, 0)]

    def input_end(self, pos: int, out_end: int) -> int:
        """Compressed offset up to which input suffices for an inflater at uncompressed
        ``pos`` to produce output through ``out_end`` (one read of the blob, see ``_RawInflater``).

        Output up to a checkpoint's ``de_pos`` needs input only up to its ``en_pos``
        (checkpoints are deflate block boundaries).  So a read ending in the span its
        inflater is in gets the rest of that span's compressed bytes.  A read that runs
        into a later span gets the spans it crosses whole, and of its last span an
        estimate: the span's own compression ratio times ``TAIL_MARGIN``, plus
        ``TAIL_SLACK``, capped at the span's end (an inflater that still runs dry
        reads the remainder then: a second round trip, never wrong bytes).
        """
        cps = self.checkpoints
        j = bisect.bisect_left(self._de_positions, out_end)
        if j < len(cps):
            end_de, end_en = cps[j].de_pos, cps[j].en_pos
        else:
            end_de, end_en = self.header.uncompress_file_size, self.header.gzip_file_size
        last = cps[j - 1] if j else cps[0]
        if last.de_pos <= pos or end_de <= last.de_pos:
            return end_en
        ratio = (end_en - last.en_pos) / (end_de - last.de_pos)
        estimate = last.en_pos + int((out_end - last.de_pos) * ratio * self.TAIL_MARGIN) + self.TAIL_SLACK
        return min(end_en, estimate)

    def window(self, cp: Checkpoint) -> bytes:
        """The 32 KiB preceding ``cp.de_pos``, decompressed and cached."""
        with self._lock:
            win = self._windows.get(cp.win_pos)
            if win is not None:
                self._windows.move_to_end(cp.win_pos)
                return win
        stored = read_exact(self.source, cp.win_pos, cp.win_len, "gzip index window")
        if self.header.dict_compress_algo == DICT_ZLIB:
            win = _inflate_exact(stored, WINSIZE, self.name, cp.win_pos, "window")
        else:
            win = stored
        if len(win) != WINSIZE:
            raise CorruptDataError(f"window is {len(win)} bytes, not {WINSIZE}", blob=self.name, offset=cp.win_pos)
        with self._lock:
            self._windows[cp.win_pos] = win
            while len(self._windows) > self.WINDOW_CACHE:
                self._windows.popitem(last=False)
        return win

    def close(self) -> None:
        self.source.close()


def _inflate_exact(data: bytes, want: int, name: str, offset: int, what: str) -> bytes:
    """Inflate one complete zlib stream that must produce exactly ``want`` bytes."""
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, want + 1)
    except zlib.error as e:
        raise CorruptDataError(f"{what} does not inflate: {e}", blob=name, offset=offset) from None
    if not d.eof:
        raise CorruptDataError(f"{what} zlib stream is incomplete or too long", blob=name, offset=offset)
    if len(out) != want:
        raise CorruptDataError(f"{what} inflates to {len(out)} bytes, expected {want}", blob=name, offset=offset)
    return out


def _check_checkpoints(cps: list[Checkpoint], h: GzipIndexHeader, name: str) -> None:
    prev = None
    for i, c in enumerate(cps):
        at = h.index_start if h.dict_compress_algo == DICT_ZLIB else h.index_start + i * ENTRY.size
        problem = None
        if not 0 <= c.bits <= 7:
            problem = f"bits {c.bits} not in 0..7"
        elif not 0 <= c.de_pos <= h.uncompress_file_size:
            problem = f"uncompressed offset {c.de_pos} beyond size {h.uncompress_file_size}"
        elif not 0 < c.en_pos <= h.gzip_file_size:
            problem = f"compressed offset {c.en_pos} beyond gzip size {h.gzip_file_size}"
        elif c.win_pos < HEADER.size or c.win_len <= 0 or c.win_pos + c.win_len > h.index_start:
            problem = f"window [{c.win_pos}, +{c.win_len}) outside the window area"
        elif prev is not None and (c.de_pos < prev.de_pos or c.en_pos < prev.en_pos):
            problem = "checkpoints are not in stream order"
        if problem:
            raise CorruptDataError(f"checkpoint {i}: {problem}", blob=name, offset=at)
        prev = c


class _RawInflater:
    """A raw deflate decoder (``inflate.raw_decoder``) positioned at uncompressed offset ``pos``.

    Input comes from ``gz`` in as few reads as the output asked for allows: each
    time the inflater runs dry it reads up to ``GzipIndex.input_end`` in one call
    (for a block-cached registry blob: one batch of parallel Range requests, not
    one round trip per chunk), at most ``MAX_INPUT`` bytes, at least ``MIN_INPUT``.
    The decoder reads the returned bytes in place (``next_in`` points into them), so the
    input is never copied; it is held until consumed (a parked inflater keeps the
    rest of its read, at most ``MAX_INPUT``).
    """

    MIN_INPUT = 65536
    MAX_INPUT = 4 << 20

    def __init__(self, gz: ByteSource, index: GzipIndex, cp: Checkpoint):
        self.gz = gz
        self.index = index
        self.dec = raw_decoder(index.window(cp))
        #: compressed offset of the first byte not yet handed to the decoder
        self.in_pos = cp.en_pos
        #: bits of the byte before ``en_pos`` still to feed (``inflatePrime``, done with the first read)
        self._prime = cp.bits
        self._input: bytes | None = None  # the bytes next_in points into (kept alive here)
        self._scratch = None
        self._want = 0
        self.pos = cp.de_pos
        self.ended = False
        #: reads of ``gz`` and their bytes
        self.reads = 0
        self.read_bytes = 0

    @classmethod
    def input_stop(cls, index: GzipIndex, gz_size: int, start: int, in_pos: int, at: int, out_end: int,
                   slack: int) -> int:
        """Where the one read that feeds an inflater at uncompressed ``at`` (next input byte
        ``in_pos``, read from ``start``) ends, for output through ``out_end``: what ``_feed``
        reads, and so what ``GzipIndexedSource.warm_map`` fetches ahead of it."""
        return min(max(index.input_end(at, out_end) + slack, in_pos + cls.MIN_INPUT), start + cls.MAX_INPUT, gz_size)

    def _feed(self, out_end: int) -> None:
        """Read the input for output through ``out_end`` (the current output position is
        ``pos`` plus what this call of ``inflate_into`` produced so far)."""
        at = self.pos + (self._want - self.dec.avail_out)
        start = self.in_pos - 1 if self._prime else self.in_pos
        end = self.input_stop(self.index, self.gz.size, start, self.in_pos, at, out_end, self.dec.INPUT_SLACK)
        data = self.gz.read(start, end - start) if end > start else b""
        self.reads += 1
        self.read_bytes += len(data)
        skip = 0
        if self._prime:
            if not data:
                raise CorruptDataError("truncated: no byte before a gzip checkpoint", blob=self.gz.name, offset=start)
            self.dec.prime(self._prime, data[0] >> (8 - self._prime))
            self._prime = 0
            skip = 1
        if len(data) <= skip:
            raise CorruptDataError(
                f"gzip stream truncated: no input left at uncompressed offset {at}",
                blob=self.gz.name, offset=self.in_pos,
            )
        self._point_at(data if isinstance(data, bytes) else bytes(data), skip)
        self.in_pos = start + len(data)

    def _point_at(self, data: bytes, skip: int) -> None:
        """Hand ``data[skip:]`` to the decoder in place (a bytes object's buffer never moves)."""
        self._input = data
        self.dec.set_input(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value + skip, len(data) - skip)

    def trim(self) -> None:
        """Keep only the input the decoder has not consumed (before parking: a parked inflater
        holds at most what its next read will use, not its whole last read)."""
        left = self.dec.avail_in
        if self._input is None or left >= len(self._input) // 2:
            return  # copying would cost more than the memory it frees
        if left:
            self._point_at(self._input[len(self._input) - left :], 0)
        else:
            self._input = None

    def inflate_into(self, buf, start: int, length: int, out_end: int) -> int:
        """Inflate up to ``length`` bytes into ``buf[start:]``; returns bytes produced (short only
        at the end of the stream).  ``out_end``: where the caller's whole read ends (input planning)."""
        dec = self.dec
        dec.set_output(ctypes.addressof(buf) + start, length)
        self._want = length
        while dec.avail_out and not self.ended:
            if dec.avail_in == 0:
                self._feed(out_end)
            try:
                self.ended = dec.run()
            except ValueError as e:
                raise CorruptDataError(
                    f"gzip data does not inflate: {e}", blob=self.gz.name, offset=self.in_pos - dec.avail_in
                ) from None
        produced = length - dec.avail_out
        self.pos += produced
        if dec.avail_in == 0:
            self._input = None
        return produced

    def skip_to(self, offset: int, out_end: int) -> None:
        """Inflate and drop output up to ``offset`` (stops early only at the end of the stream);
        ``out_end``: where the read that follows ends, so input is read for both at once."""
        while self.pos < offset and not self.ended:
            if self._scratch is None:
                self._scratch = ctypes.create_string_buffer(GzipIndexedSource.SKIP_CHUNK)
            n = min(offset - self.pos, GzipIndexedSource.SKIP_CHUNK)
            self.inflate_into(self._scratch, 0, n, out_end)

    def close(self) -> None:
        if getattr(self, "dec", None) is not None:  # (also from __del__ of a failed __init__)
            self.dec.close()
        self._input = None

    def __del__(self):
        self.close()


class GzipIndexedSource:
    """The uncompressed stream of a gzip blob as a ByteSource, through its index.

    Reads start from the nearest checkpoint, or continue an inflater parked by an
    earlier read when that is closer (sequential reads then cost only their own
    length).  A cold read fetches the compressed bytes it needs in one read of
    ``gz_source`` (``GzipIndex.input_end``): through the block cache, one batch of
    parallel Range requests.  ``inflate_stats()`` counts the work.  With ``cache``
    (a ``cache.gzipcache.GzipCache``) reads go through the decompressed-data cache
    keyed by ``cache_key`` (default: the digest carried by ``gz_source.name``; a
    source known only by path is not cached).
    """

    #: inflaters kept for continuation (each holds ~40 KiB of zlib state and the unread
    #: rest of its last input read)
    PARKED = 4
    #: output inflated and dropped per call when a read starts past its inflater
    SKIP_CHUNK = 1 << 16

    def __init__(self, gz_source: ByteSource, index: GzipIndex, *, cache=None, cache_key: str | None = None):
        if index.gzip_size != gz_source.size:
            raise CorruptDataError(
                f"gzip blob is {gz_source.size} bytes but its index {index.name} expects {index.gzip_size}",
                blob=gz_source.name, offset=min(gz_source.size, index.gzip_size),
            )
        self.gz = gz_source
        self.index = index
        self.name = gz_source.name
        self.size = index.uncompressed_size
        self._parked: list[_RawInflater] = []
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("spans_inflated", "continued", "bytes_inflated", "compressed_reads", "compressed_bytes"), 0)
        #: the ``cache.gzipcache.CachedView`` reads go through (its counters show hits and refills)
        self.cached_view = None
        key = cache_key or digest_in(gz_source.name)
        if cache is not None and key:
            # like upstream, only a layer known by digest is cached: a path may later hold
            # other bytes, and cached pages are checked against their checksum, not the source
            try:
                self.cached_view = cache.open(key, _UncachedView(self))
            except StateError as e:
                log.warning("reading %s without the gzip cache: %s", self.name, e)
        #: ``read(offset, length)`` of the ByteSource interface: the cache view's, else
        #: ``read_uncached`` (bound here, it costs the handler no extra call per read)
        self.read = self.cached_view.read if self.cached_view is not None else self.read_uncached

    def read_uncached(self, offset: int, length: int) -> bytes:
        """Inflate ``[offset, offset+length)`` (clamped to the stream) without the cache."""
        return bytes(self.inflate_range(offset, length))

    def inflate_range(self, offset: int, length: int) -> bytearray:
        """``read_uncached`` into a new bytearray, which it returns (the gzip cache stores and
        serves the buffer the inflater wrote, never a copy of it)."""
        length = clamp_read(self.size, offset, length)
        if length == 0:
            return bytearray()
        end = offset + length
        inf, fresh = self._take_inflater(offset)
        reads, read_bytes, pos = inf.reads, inf.read_bytes, inf.pos
        out = bytearray(length)
        try:
            inf.skip_to(offset, end)
            got = 0
            if inf.pos == offset:
                got = inf.inflate_into((ctypes.c_char * length).from_buffer(out), 0, length, end)
            if got != length:
                raise CorruptDataError(
                    f"gzip stream ends at uncompressed offset {inf.pos}, its index says {self.size}",
                    blob=self.name, offset=inf.in_pos - inf.dec.avail_in,
                )
        except BaseException:
            inf.close()
            raise
        finally:
            with self._lock:
                c = self._counts
                c["spans_inflated" if fresh else "continued"] += 1
                c["bytes_inflated"] += inf.pos - pos
                c["compressed_reads"] += inf.reads - reads
                c["compressed_bytes"] += inf.read_bytes - read_bytes
        self._park(inf)
        return out

    def warm_map(self, offset: int, length: int):
        """The compressed bytes an inflater started at the checkpoint before ``offset`` reads first
        to produce ``[offset, offset+length)`` (see ``_RawInflater._feed``): warming them lets the
        read that follows inflate without a round trip."""
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return self.gz, 0, 0
        cp = self.index.checkpoint_for(offset)
        start = cp.en_pos - 1 if cp.bits else cp.en_pos
        end = _RawInflater.input_stop(self.index, self.gz.size, start, cp.en_pos, cp.de_pos, offset + n, input_slack())
        return self.gz, start, max(0, end - start)

    def inflate_stats(self) -> dict[str, int]:
        """Counters of the inflating path: ``spans_inflated`` (reads that started an inflater at
        a checkpoint), ``continued`` (reads that continued a parked one), ``bytes_inflated``
        (output including skipped bytes), ``compressed_reads``/``compressed_bytes`` (of the blob)."""
        with self._lock:
            return dict(self._counts)

    def _take_inflater(self, offset: int) -> tuple[_RawInflater, bool]:
        """A parked inflater between the checkpoint and ``offset`` (the closest), else a fresh
        one started at the checkpoint; and whether it is fresh."""
        cp = self.index.checkpoint_for(offset)
        with self._lock:
            usable = [inf for inf in self._parked if cp.de_pos <= inf.pos <= offset]
            if usable:
                best = max(usable, key=lambda inf: inf.pos)
                self._parked.remove(best)
                return best, False
        return _RawInflater(self.gz, self.index, cp), True

    def _park(self, inf: _RawInflater) -> None:
        if inf.ended:
            inf.close()
            return
        inf.trim()
        with self._lock:
            self._parked.append(inf)
            if len(self._parked) > self.PARKED:
                self._parked.pop(0).close()

    def close(self) -> None:
        if self.cached_view is not None:
            self.cached_view.close()
        with self._lock:
            for inf in self._parked:
                inf.close()
            self._parked.clear()
        self.gz.close()
        self.index.close()


class _UncachedView:
    """The inflating path of a GzipIndexedSource, as the cache's backing source (its reads
    return the inflater's bytearray: the cache only stores and slices it)."""

    def __init__(self, src: GzipIndexedSource):
        self.name = src.name
        self.size = src.size
        self.read = src.inflate_range
        self.inflate_stats = src.inflate_stats

    def close(self) -> None:
        pass


# --- writer ----------------------------------------------------------------------------


class _CheckpointFilter:
    """Upstream's checkpoint selection: about one per ``span``, on a block boundary (§4.4)."""

    def __init__(self, span: int, algo: int, level: int):
        self.span = span
        self.algo = algo
        self.level = level
        self.expected = 0
        self.last: tuple[int, int, int, bytes] | None = None
        self.checkpoints: list[tuple[int, int, int, bytes]] = []  # (bits, en, de, stored window)

    def offer(self, bits: int, en_pos: int, de_pos: int, left: int, window) -> None:
        if de_pos < self.expected:
            self.last = (bits, en_pos, de_pos, _history(window, left))
            return
        if de_pos > self.expected:
            if self.last is not None:
                self._add(*self.last)
                self.last = None
            self.last = (bits, en_pos, de_pos, _history(window, left))
            while self.expected < de_pos:
                self.expected += self.span
        if de_pos == self.expected:
            self.last = None
            self._add(bits, en_pos, de_pos, _history(window, left))
            self.expected += self.span

    def _add(self, bits: int, en_pos: int, de_pos: int, history: bytes) -> None:
        stored = _zlib_deflate_once(history, self.level) if self.algo == DICT_ZLIB else history
        self.checkpoints.append((bits, en_pos, de_pos, stored))


def _history(window, left: int) -> bytes:
    """The 32 KiB before the current output position out of the circular ``window``."""
    raw = window.raw
    cut = WINSIZE - left
    return raw[cut:] + raw[:cut]


def build_gzip_index(
    gz: ByteSource | BinaryIO, span: int = 1 << 20, dict_algo: int = DICT_ZLIB, dict_level: int = 6
) -> bytes:
    """Build ``gzip.meta`` for a gzip blob, byte-identical to upstream ``create_gz_index``.

    ``gz`` is a ByteSource or a binary file object read sequentially.  Only the first
    gzip member is indexed (as upstream).
    """
    if dict_algo not in (DICT_RAW, DICT_ZLIB):
        raise UsageError(f"gzip index window compression must be 0 (raw) or 1 (zlib), not {dict_algo}")
    if dict_algo == DICT_ZLIB and not -1 <= dict_level <= 9:
        raise UsageError(f"gzip index compression level must be in -1..9, not {dict_level}")
    if span < MIN_SPAN or span >= 1 << 31:
        raise UsageError(f"gzip index span must be at least {MIN_SPAN} bytes (and fit 31 bits), not {span}")
    reader = _SequentialInput(gz)
    filt = _CheckpointFilter(span, dict_algo, dict_level)

    strm = ZStream()
    ref = ctypes.byref(strm)
    if LIBZ.inflateInit2_(ref, 47, LIBZ_VERSION, ZSTREAM_SIZE) != Z_OK:
        raise MemoryError("inflateInit2 failed")
    inbuf = ctypes.create_string_buffer(WINSIZE)
    window = ctypes.create_string_buffer(WINSIZE)
    try:
        strm.avail_out = 0
        ret = Z_OK
        while ret != Z_STREAM_END:
            n = reader.readinto(inbuf)
            if n == 0:
                raise CorruptDataError(
                    f"gzip stream truncated after {strm.total_out} uncompressed bytes",
                    blob=reader.name, offset=strm.total_in,
                )
            strm.next_in = ctypes.addressof(inbuf)
            strm.avail_in = n
            while True:
                if strm.avail_out == 0:
                    strm.avail_out = WINSIZE
                    strm.next_out = ctypes.addressof(window)
                ret = LIBZ.inflate(ref, Z_BLOCK)
                if ret == Z_STREAM_END:
                    break
                if ret not in (Z_OK, Z_BUF_ERROR):
                    msg = strm.msg.decode(errors="replace") if strm.msg else f"zlib error {ret}"
                    raise CorruptDataError(f"not a valid gzip stream: {msg}", blob=reader.name, offset=strm.total_in)
                dt = strm.data_type
                if dt & _DT_BOUNDARY and not dt & _DT_LAST_BLOCK:
                    filt.offer(dt & 7, strm.total_in, strm.total_out, strm.avail_out, window)
                if strm.avail_in == 0:
                    break
        uncompressed = strm.total_out
    finally:
        LIBZ.inflateEnd(ref)
    gzip_size = reader.total_size()

    windows = bytearray()
    entries = []
    pos = HEADER.size
    for bits, en_pos, de_pos, stored in filt.checkpoints:
        entries.append(Checkpoint(de_pos, en_pos, pos, bits, len(stored)).to_bytes())
        windows += stored
        pos += len(stored)
    table = b"".join(entries)
    area = _zlib_deflate_once(table, dict_level) if dict_algo == DICT_ZLIB else table
    header = GzipIndexHeader(
        span=span, index_num=len(entries), gzip_file_size=gzip_size,
        index_file_size=pos + len(area), uncompress_file_size=uncompressed, index_start=pos,
        index_area_len=len(area), dict_compress_algo=dict_algo, dict_compress_level=dict_level,
    )
    return header.to_bytes() + bytes(windows) + area


class _SequentialInput:
    """Reads a ByteSource or a binary file object front to back."""

    def __init__(self, gz):
        self.gz = gz
        self.is_source = isinstance(gz, ByteSource)
        self.pos = 0
        name = getattr(gz, "name", None)
        self.name = name if isinstance(name, str) else "<gzip stream>"

    def readinto(self, buf) -> int:
        data = self.gz.read(self.pos, len(buf)) if self.is_source else self.gz.read(len(buf))
        ctypes.memmove(buf, data, len(data))
        self.pos += len(data)
        return len(data)

    def total_size(self) -> int:
        """Size of the whole blob (upstream stats the file, so trailing members count)."""
        if self.is_source:
            return self.gz.size
        while chunk := self.gz.read(1 << 20):
            self.pos += len(chunk)
        return self.pos
