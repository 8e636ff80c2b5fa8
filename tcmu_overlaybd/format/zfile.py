"""ZFile (spec §2): a block-compressed file that stays randomly readable.

The input is cut into fixed-size blocks, each compressed on its own (raw LZ4
block or one zstd frame) and optionally followed by a raw CRC-32C (init
100007).  A jump table of stored block lengths and a trailer close the file;
current writers also copy the trailer over the header ("overwrite", flag 0x08).

:class:`ZFileReader` is a byte source of the decompressed bytes: it finds
block N from prefix sums of the jump table, reads the compressed bytes of all
missing blocks of a request in one source read, and keeps a small LRU of
decompressed blocks.  :class:`ZFileWriter` produces byte-exact
``overlaybd-commit -z`` output.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import struct
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, replace
from itertools import accumulate
from typing import BinaryIO

import lz4.block
import zstandard

from ..block.source import ByteSource, clamp_read, read_exact, warm
from ..crc32c import ZFILE_BLOCK_CRC_INIT, crc32c_raw, crc32c_standard
from ..errors import CorruptDataError, UnsupportedError

# --- layout (spec §2.1, §2.2) -------------------------------------------------------------

HEADER_SIZE = 512
MAGIC0 = b"ZFile\x00\x01\x00"
MAGIC1 = b"tuji.yyf@Alibaba"
STRUCT_SIZE = 96

FLAG_HEADER = 0x01
FLAG_DATA = 0x02
FLAG_SEALED = 0x04
FLAG_OVERWRITE = 0x08  # header already carries the final index fields
FLAG_DIGEST = 0x10  # header digest and index_crc are valid
FLAG_INDEX_COMPRESSED = 0x20  # defined upstream, never implemented

ALGO_LZO, ALGO_LZ4, ALGO_ZSTD = 0, 1, 2
ALGORITHMS = {"lz4": ALGO_LZ4, "zstd": ALGO_ZSTD}
ZSTD_LEVEL = 3
CRC_SIZE = 4
MAX_INDEX_SIZE = 1_000_000_000
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE = 4096, 65536

# magic0, magic1, size, digest, flags, index_offset, index_size, original_file_size,
# index_crc, reserved, block_size, algo, level, use_dict, pad, reserved, dict_size, verify, pad
_STRUCT = struct.Struct("<8s16sIIQQQQIIIBBBBIIB7s")
assert _STRUCT.size == STRUCT_SIZE
DIGEST_OFFSET = 28
FLAGS_OFFSET = 32


@dataclass(frozen=True)
class ZFileHeader:
    """The ZFile header/trailer (spec §2.2).

    ``flags`` keeps only the meaningful bits 0-5; ``raw_flags`` is the low 32-bit word as stored
    (legacy files have garbage in the other bits).
    """

    flags: int
    index_offset: int = 0
    index_size: int = 0
    original_file_size: int = 0
    index_crc: int = 0
    block_size: int = 4096
    algo: int = ALGO_LZ4
    level: int = 0
    use_dict: int = 0
    dict_size: int = 0
    verify: int = 1
    size: int = STRUCT_SIZE
    digest: int = 0
    raw_flags: int = 0

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "<zfile>", offset: int = 0) -> "ZFileHeader":
        if len(data) < HEADER_SIZE:
            raise CorruptDataError("truncated ZFile header", blob=name, offset=offset)
        (m0, m1, size, digest, flags, ioff, isize, orig, icrc, _r, bs, algo, level, use_dict,
         _p, _r2, dict_size, verify, _p2) = _STRUCT.unpack_from(data)
        if m0 != MAGIC0 or m1 != MAGIC1:
            raise CorruptDataError("bad ZFile magic", blob=name, offset=offset)
        return cls(flags=flags & 0x3F, index_offset=ioff, index_size=isize, original_file_size=orig,
                   index_crc=icrc, block_size=bs, algo=algo, level=level, use_dict=use_dict,
                   dict_size=dict_size, verify=verify, size=size, digest=digest,
                   raw_flags=flags & 0xFFFFFFFF)

    def to_bytes(self) -> bytes:
        """512 bytes with the digest computed over the block with the digest field zeroed."""
        packed = _STRUCT.pack(MAGIC0, MAGIC1, self.size, 0, self.flags, self.index_offset,
                              self.index_size, self.original_file_size, self.index_crc, 0,
                              self.block_size, self.algo, self.level, self.use_dict, 0, 0,
                              self.dict_size, self.verify, bytes(7))
        block = bytearray(packed + bytes(HEADER_SIZE - STRUCT_SIZE))
        if self.flags & FLAG_DIGEST:
            struct.pack_into("<I", block, DIGEST_OFFSET, crc32c_raw(block))
        return bytes(block)


def _digest_ok(block: bytes) -> bool:
    (stored,) = struct.unpack_from("<I", block, DIGEST_OFFSET)
    zeroed = block[:DIGEST_OFFSET] + b"\0\0\0\0" + block[DIGEST_OFFSET + 4 : HEADER_SIZE]
    return crc32c_raw(zeroed) == stored


def is_zfile(source: ByteSource) -> bool:
    """True when ``source`` starts with a ZFile header (magic, header bit, digest if flagged)."""
    block = source.read(0, HEADER_SIZE)
    if len(block) < HEADER_SIZE or block[:8] != MAGIC0 or block[8:24] != MAGIC1:
        return False
    (flags,) = struct.unpack_from("<I", block, FLAGS_OFFSET)
    if not flags & FLAG_HEADER:
        return False
    return not (flags & FLAG_DIGEST) or _digest_ok(block)


# --- reader (spec §2.4) ---------------------------------------------------------------------

#: the raw CRC-32C of a block (spec §0.1, see ``crc32c.crc32c_raw``) computed with the ``crc32c``
#: package's standard variant: ``raw(data, init) == std(data, init ^ ~0) ^ ~0``, so a block is good
#: when ``std(payload, _BLOCK_CRC_SEED) == stored ^ ~0`` (one C call per block, no wrapper)
_MASK32 = 0xFFFFFFFF
_BLOCK_CRC_SEED = ZFILE_BLOCK_CRC_INIT ^ _MASK32
_crc32c = crc32c_standard
_u32_at = struct.Struct("<I").unpack_from


class ZFileReader:
    """The decompressed bytes of a ZFile, as a thread-safe byte source."""

    def __init__(self, source: ByteSource, verify: bool = True, cache_blocks: int = 128):
        self.source = source
        self.name = source.name
        self.verify = verify
        name = source.name
        first = read_exact(source, 0, HEADER_SIZE, "ZFile header")
        header = ZFileHeader.from_bytes(first, name, 0)
        if not header.flags & FLAG_HEADER:
            raise CorruptDataError("ZFile header block does not have the header flag", blob=name, offset=0)
        if header.flags & FLAG_DIGEST and not _digest_ok(first):
            raise CorruptDataError("ZFile header digest mismatch", blob=name, offset=DIGEST_OFFSET)
        self.header = header
        if header.flags & FLAG_OVERWRITE:
            info, info_pos = header, 0
            self.trailer = None
        else:
            if not header.flags & FLAG_DATA:
                raise CorruptDataError("ZFile header is not a data file", blob=name, offset=FLAGS_OFFSET)
            if source.size < 2 * HEADER_SIZE:
                raise CorruptDataError(f"truncated ZFile ({source.size} bytes)", blob=name, offset=source.size)
            info_pos = source.size - HEADER_SIZE
            info = ZFileHeader.from_bytes(read_exact(source, info_pos, HEADER_SIZE, "ZFile trailer"),
                                          name, info_pos)
            need = FLAG_DATA | FLAG_SEALED
            if info.flags & FLAG_HEADER or info.flags & need != need:
                raise CorruptDataError(f"ZFile trailer flags 0x{info.raw_flags:x} are not a sealed trailer",
                                       blob=name, offset=info_pos + FLAGS_OFFSET)
            self.trailer = info
        self.info = info
        if info.algo not in (ALGO_LZ4, ALGO_ZSTD):
            raise UnsupportedError(f"{name}: ZFile compression algorithm {info.algo} "
                                   f"({'mini-LZO' if info.algo == 0 else 'unknown'}) is not supported")
        if info.use_dict or info.dict_size:
            raise UnsupportedError(f"{name}: ZFile dictionaries are not supported")
        bs = info.block_size
        if bs < MIN_BLOCK_SIZE or bs > MAX_BLOCK_SIZE or bs & (bs - 1):
            raise CorruptDataError(f"ZFile block size {bs} is not a power of two in 4K..64K",
                                   blob=name, offset=info_pos + 72)
        nblocks = info.index_size
        if nblocks > MAX_INDEX_SIZE or nblocks != -(-info.original_file_size // bs):
            raise CorruptDataError(
                f"ZFile jump table has {nblocks} entries for {info.original_file_size} bytes "
                f"in {bs}-byte blocks", blob=name, offset=info_pos + 48)
        ioff = info.index_offset
        table_end = source.size - HEADER_SIZE
        if ioff < HEADER_SIZE or ioff > table_end or 4 * nblocks > table_end - ioff:
            raise CorruptDataError(f"ZFile jump table ({nblocks} entries at {ioff}) does not fit "
                                   f"before the trailer", blob=name, offset=info_pos + 40)
        raw = read_exact(source, ioff, 4 * nblocks, "ZFile jump table")
        if info.flags & FLAG_DIGEST and crc32c_raw(raw) != info.index_crc:
            raise CorruptDataError("ZFile jump table CRC mismatch", blob=name, offset=ioff)
        lengths = array("I")
        lengths.frombytes(raw)
        if array("I").itemsize != 4:  # pragma: no cover
            raise RuntimeError("array('I') is not 32-bit")
        self._crc = CRC_SIZE if info.verify else 0
        if nblocks and min(lengths) <= self._crc:
            bad = next(i for i, n in enumerate(lengths) if n <= self._crc)
            raise CorruptDataError(f"ZFile block {bad} has stored length {lengths[bad]}",
                                   blob=name, offset=ioff + 4 * bad)
        start = HEADER_SIZE + info.dict_size
        self._starts = array("Q", accumulate(lengths, initial=start))
        if self._starts[-1] > ioff:
            raise CorruptDataError(f"ZFile blocks end at {self._starts[-1]}, past the jump table at {ioff}",
                                   blob=name, offset=ioff)
        self.block_size = bs
        self.size = info.original_file_size
        self.algorithm = "lz4" if info.algo == ALGO_LZ4 else "zstd"
        self._decode_block = lz4.block.decompress if info.algo == ALGO_LZ4 else self._zstd_block
        self._last_block = nblocks - 1
        self._tail_size = self.size - (nblocks - 1) * bs
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_max = cache_blocks
        self._lock = threading.Lock()
        self._local = threading.local()
        #: the non-blocking read of the compressed bytes (a tar slice of a cached blob has one)
        self._cached_fetch = getattr(source, "read_cached", None)

    def _decompress(self, n: int, stored: memoryview | bytes) -> bytes:
        """Block ``n`` from its stored bytes: CRC checked (if verifying), decompressed, length checked.

        Called once per block on every decode, so it keeps to local work: no keyword
        arguments to the decompressor, the CRC compared in its stored (inverted) form."""
        end = len(stored)
        if self._crc:
            payload = stored[: end - CRC_SIZE]
            if self.verify and _crc32c(payload, _BLOCK_CRC_SEED) != _u32_at(stored, end - CRC_SIZE)[0] ^ _MASK32:
                raise CorruptDataError(f"ZFile block {n} CRC mismatch", blob=self.name, offset=self._starts[n])
        else:
            payload = stored
        try:
            out = self._decode_block(payload, self.block_size)
        except (lz4.block.LZ4BlockError, zstandard.ZstdError) as e:
            raise CorruptDataError(f"ZFile block {n} does not decompress: {e}", blob=self.name,
                                   offset=self._starts[n]) from None
        expect = self.block_size if n != self._last_block else self._tail_size
        if len(out) != expect:
            raise CorruptDataError(f"ZFile block {n} decompresses to {len(out)} bytes, expected {expect}",
                                   blob=self.name, offset=self._starts[n])
        return out

    def _zstd_block(self, payload, bs: int) -> bytes:
        dec = getattr(self._local, "zstd", None)
        if dec is None:
            dec = self._local.zstd = zstandard.ZstdDecompressor()
        return dec.decompress(payload, max_output_size=bs)

    def read(self, offset: int, length: int) -> bytes:
        """Decompressed bytes ``[offset, offset+length)``.

        Only the first and last block of a request are looked up in the LRU (they
        are the ones a neighbouring read decoded); the blocks from the first to
        the last one missing are fetched in one source read and decoded in one
        loop, and the result is assembled with one join (the edge blocks trimmed)."""
        return self._read(offset, length, self._decoded)

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """What ``read`` returns if it needs no waiting: every block either decoded in the LRU
        or compressed in the source's cache (``read_cached`` of the source, through a tar
        slice too); else None.  Bad bytes also give None: ``read`` then refetches or fails."""
        return self._read(offset, length, self._decoded_cached)

    def _read(self, offset: int, length: int, decoded) -> bytes | None:
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        bs = self.block_size
        first, last = offset // bs, (offset + n - 1) // bs
        cache = self._cache
        with self._lock:
            head = cache.get(first)
            if head is not None:
                cache.move_to_end(first)
            tail = None
            if last != first:
                tail = cache.get(last)
                if tail is not None:
                    cache.move_to_end(last)
        skip = offset - first * bs
        if last == first:
            if head is None:
                blocks = decoded(first, first)
                if blocks is None:
                    return None
                head = blocks[0]
            return head if skip == 0 and n == len(head) else head[skip : skip + n]
        lo = first if head is None else first + 1
        hi = last if tail is None else last - 1
        parts = []
        if lo <= hi:
            parts = decoded(lo, hi)
            if parts is None:
                return None
        if head is not None:
            parts.insert(0, head)
        if tail is not None:
            parts.append(tail)
        if skip:
            parts[0] = parts[0][skip:]
        keep = offset + n - last * bs
        if keep != len(parts[-1]):
            parts[-1] = parts[-1][:keep]
        return b"".join(parts)

    def _decoded(self, lo: int, hi: int) -> list[bytes]:
        """Blocks ``lo..hi`` decoded from one source read, remembered in the LRU."""
        try:
            blocks = self._load(lo, hi, self.source.read)
        except CorruptDataError:
            # A cached copy of the compressed bytes may be what is bad (overlaybd evicts
            # and re-reads too): drop it and fetch once more; a second failure is real.
            invalidate = getattr(self.source, "invalidate", None)
            if invalidate is None:
                raise
            invalidate(self._starts[lo], self._starts[hi + 1] - self._starts[lo])
            blocks = self._load(lo, hi, self.source.read)
        self._remember(lo, blocks)
        return blocks

    def _decoded_cached(self, lo: int, hi: int) -> list[bytes] | None:
        """``_decoded`` from cached compressed bytes only; None if any is missing or bad."""
        if self._cached_fetch is None:
            return None
        try:
            blocks = self._load(lo, hi, self._cached_fetch)
        except CorruptDataError:
            return None
        if blocks is not None:
            self._remember(lo, blocks)
        return blocks

    def _remember(self, lo: int, blocks: list[bytes]) -> None:
        """Keep decoded blocks from ``lo`` on in the LRU: all of a short run, only the edges of
        a long one (those are what neighbouring reads share)."""
        cache = self._cache
        hi = lo + len(blocks) - 1
        with self._lock:
            if len(blocks) <= 4:
                for b, data in zip(range(lo, hi + 1), blocks):
                    cache[b] = data
                    cache.move_to_end(b)
            else:
                cache[lo] = blocks[0]
                cache.move_to_end(lo)
                cache[hi] = blocks[-1]
                cache.move_to_end(hi)
            while len(cache) > self._cache_max:
                cache.popitem(last=False)

    def warm_map(self, offset: int, length: int):
        """The compressed bytes in the source under ``[offset, offset+length)``: (source, offset, length)."""
        n = clamp_read(self.size, offset, length)
        if not n:
            return self.source, 0, 0
        bs = self.block_size
        lo, hi = self._starts[offset // bs], self._starts[(offset + n - 1) // bs + 1]
        return self.source, lo, hi - lo

    def fetch_range(self, offset: int, length: int) -> None:
        """Warm the compressed blocks under ``[offset, offset+length)`` in the source, without
        decompressing them (trace replay: the device read that follows decompresses once)."""
        warm(*self.warm_map(offset, length))

    def _load(self, lo: int, hi: int, fetch) -> list[bytes] | None:
        """Fetch the compressed bytes of blocks ``lo..hi`` in one ``fetch(offset, length)`` (None
        when a non-blocking fetch would have to wait: then None); decompress each."""
        starts = self._starts
        base = starts[lo]
        want = starts[hi + 1] - base
        raw = fetch(base, want)
        if raw is None:
            return None
        if len(raw) != want:
            raise CorruptDataError("ZFile truncated inside its compressed blocks", blob=self.name,
                                   offset=base + len(raw))
        view = memoryview(raw)
        decompress = self._decompress
        if lo == hi:
            return [decompress(lo, view)]
        bounds = starts[lo : hi + 2]
        return [decompress(b, view[s - base : e - base])
                for b, s, e in zip(range(lo, hi + 1), bounds, bounds[1:])]

    def close(self) -> None:
        self.source.close()

    def __repr__(self) -> str:
        return f"ZFileReader({self.name!r}, {self.algorithm}, size={self.size})"


# --- writer (spec §2.3, §2.5) ---------------------------------------------------------------


@functools.cache
def _liblz4_compress():
    """The system liblz4, whose ``LZ4_compress_default`` reproduces upstream blocks exactly.

    The ``lz4`` wheel's ``lz4.block.compress`` goes through a reused
    ``LZ4_compress_fast_extState`` state and picks different matches for a
    few blocks (26 of the 17,463 in the hello-world vector), so byte-exact
    output needs the plain C entry point.  Without liblz4 the wheel is used:
    the file is still valid, just not bit-identical.  Looked up when a writer first needs it:
    ``find_library`` runs ``ldconfig``, which readers (every handler) must not pay for.
    """
    path = ctypes.util.find_library("lz4") or "liblz4.so.1"
    try:
        lib = ctypes.CDLL(path)
        fn = lib.LZ4_compress_default
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class _Lz4BlockCompressor:
    """Raw LZ4 block compression (no size prefix), ``LZ4_compress_default``."""

    def __init__(self, block_size: int):
        self._cap = block_size + block_size // 255 + 16  # LZ4_compressBound
        self._buf = ctypes.create_string_buffer(self._cap)
        self._compress_default = _liblz4_compress()

    def compress(self, block) -> bytes:
        if self._compress_default is None:
            return lz4.block.compress(block, mode="default", store_size=False)
        data = block if isinstance(block, bytes) else bytes(block)
        n = self._compress_default(data, self._buf, len(data), self._cap)
        if n <= 0:
            raise RuntimeError(f"LZ4_compress_default failed for a {len(data)}-byte block")
        return ctypes.string_at(self._buf, n)



class ZFileWriter:
    """Write a ZFile like ``overlaybd-commit -z`` (verify on, digest on, header overwritten).

    ``fileobj`` must be positioned at 0 and seekable when ``overwrite_header``
    is set (the header is rewritten with the trailer's content at close).
    """

    def __init__(self, fileobj: BinaryIO, *, algorithm: str = "lz4", block_size: int = 4096,
                 overwrite_header: bool = True):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown ZFile algorithm {algorithm!r} (lz4 or zstd)")
        if block_size < MIN_BLOCK_SIZE or block_size > MAX_BLOCK_SIZE or block_size & (block_size - 1):
            raise ValueError(f"ZFile block size {block_size} is not a power of two in 4K..64K")
        self._f = fileobj
        self._algo = ALGORITHMS[algorithm]
        self._bs = block_size
        self._overwrite = overwrite_header
        self._pending = bytearray()
        self._lengths = array("I")
        self._stored = 0
        self._orig = 0
        if self._algo == ALGO_ZSTD:
            self._codec = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True,
                                                   write_checksum=False)
        else:
            self._codec = _Lz4BlockCompressor(block_size)
        self._header = ZFileHeader(flags=FLAG_HEADER | FLAG_DATA | FLAG_DIGEST, block_size=block_size,
                                   algo=self._algo)
        self._f.write(self._header.to_bytes())
        self.closed = False

    def _compress(self, block) -> bytes:
        payload = self._codec.compress(block)
        return payload + struct.pack("<I", crc32c_raw(payload, ZFILE_BLOCK_CRC_INIT))

    def _emit(self, block) -> None:
        stored = self._compress(block)
        self._f.write(stored)
        self._lengths.append(len(stored))
        self._stored += len(stored)
        self._orig += len(block)

    def write(self, data: bytes) -> None:
        bs = self._bs
        view = memoryview(data)
        if self._pending:
            take = min(bs - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) == bs:
                self._emit(bytes(self._pending))
                self._pending.clear()
        whole = len(view) - len(view) % bs
        for k in range(0, whole, bs):
            self._emit(view[k : k + bs])
        if whole < len(view):
            self._pending += view[whole:]

    def close(self) -> int:
        """Flush the last block, write jump table and trailer (and the overwritten header)."""
        if self.closed:
            return HEADER_SIZE + self._stored + 4 * len(self._lengths) + HEADER_SIZE
        if self._pending:
            self._emit(bytes(self._pending))
            self._pending.clear()
        table = self._lengths.tobytes()
        self._f.write(table)
        trailer = replace(self._header, flags=FLAG_DATA | FLAG_SEALED | FLAG_DIGEST,
                          index_offset=HEADER_SIZE + self._stored, index_size=len(self._lengths),
                          original_file_size=self._orig, index_crc=crc32c_raw(table))
        self._f.write(trailer.to_bytes())
        total = HEADER_SIZE + self._stored + len(table) + HEADER_SIZE
        if self._overwrite:
            end = self._f.tell()
            self._f.seek(end - total)
            self._f.write(replace(trailer, flags=FLAG_HEADER | FLAG_DATA | FLAG_OVERWRITE | FLAG_DIGEST).to_bytes())
            self._f.seek(end)
        self.closed = True
        return total

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()


def compress_source(src: ByteSource, fileobj: BinaryIO, algorithm: str = "lz4", block_size: int = 4096,
                    *, overwrite_header: bool = True) -> int:
    """Compress all of ``src`` into ``fileobj`` as a ZFile; returns the ZFile size."""
    w = ZFileWriter(fileobj, algorithm=algorithm, block_size=block_size, overwrite_header=overwrite_header)
    step = max(block_size, 1 << 22)
    for pos in range(0, src.size, step):
        data = src.read(pos, step)
        if len(data) != min(step, src.size - pos):
            raise CorruptDataError("source ended early while compressing", blob=src.name, offset=pos + len(data))
        w.write(data)
    return w.close()
