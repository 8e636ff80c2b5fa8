"""Reading OCI layer blobs as tar streams: decompression by magic, the diff_id, and
what a tar entry says beyond ``tarfile``'s fields (exact PAX mtime, xattrs, the
stored pieces of plain and GNU sparse files with their offsets in the
uncompressed stream, spec §4.2)."""

from __future__ import annotations

import hashlib
import tarfile
import zlib
from typing import BinaryIO

import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20

#: what a broken layer stream raises while being read
STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, UnicodeError)


class _Prefixed:
    """A reader that gives back the bytes already peeked from ``inner``."""

    def __init__(self, head: bytes, inner: BinaryIO):
        self._head = head
        self._inner = inner

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._inner.read(n)
        if n < 0:
            data, self._head = self._head + self._inner.read(), b""
            return data
        data, self._head = self._head[:n], self._head[n:]
        if len(data) < n:
            data += self._inner.read(n - len(data))
        return data


class GzipMembers:
    """Inflates a gzip stream of one or more members, noting where each member ends.

    A gzip index (§4.4) covers the first member only, so FastOCI may map file data
    onto the first member's output alone: ``first_member_end`` (uncompressed offset,
    None while the first member is still running) tells how far that is.
    """

    def __init__(self, raw: BinaryIO):
        self._raw = raw
        self._d = zlib.decompressobj(31)
        self._buf = b""  # inflated, not yet returned: _buf[_pos:]
        self._pos = 0
        self._produced = 0  # uncompressed bytes produced so far
        self._eof = False
        self.first_member_end: int | None = None

    def _inflate(self) -> bytes:
        """The next piece of output (b"" at the end of the stream)."""
        while not self._eof:
            if self._d.eof:
                if self.first_member_end is None:
                    self.first_member_end = self._produced
                rest = self._d.unused_data + self._raw.read(1 << 16)
                if not rest.strip(b"\0"):  # end of stream (zero padding tolerated)
                    self._eof = True
                    break
                self._d = zlib.decompressobj(31)
                chunk = rest
            else:
                chunk = self._d.unconsumed_tail or self._raw.read(1 << 16)
                if not chunk:
                    raise EOFError("compressed stream ended inside a gzip member")
            out = self._d.decompress(chunk, 1 << 20)
            if out:
                self._produced += len(out)
                return out
        return b""

    def read(self, n: int = -1) -> bytes:
        parts = []
        want = n if n >= 0 else 1 << 62
        while want > 0:
            if self._pos >= len(self._buf):
                self._buf, self._pos = self._inflate(), 0
                if not self._buf:
                    break
            piece = self._buf[self._pos : self._pos + want]
            self._pos += len(piece)
            want -= len(piece)
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)


def decompressed(stream: BinaryIO) -> BinaryIO:
    """The uncompressed tar stream of a layer blob: gzip, zstd or plain, by magic."""
    head = stream.read(4)
    raw = _Prefixed(head, stream)
    if head.startswith(GZIP_MAGIC):
        return GzipMembers(raw)  # type: ignore[arg-type, return-value]
    if head.startswith(ZSTD_MAGIC):
        return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)  # type: ignore[arg-type]
    return raw  # type: ignore[return-value]


class HashingReader:
    """Counts and hashes every byte read through it (the layer's diff_id)."""

    def __init__(self, inner: BinaryIO):
        self._inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._inner.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def pax_time(info: tarfile.TarInfo) -> tuple[int, int]:
    """(seconds, nanoseconds) of the entry's mtime, exact from the PAX record when present."""
    text = info.pax_headers.get("mtime")
    if text:
        neg = text.startswith("-")
        whole, _, frac = text.lstrip("-").partition(".")
        try:
            sec = int(whole or "0")
            nsec = int((frac + "000000000")[:9]) if frac else 0
        except ValueError:
            sec, nsec = int(info.mtime), 0
        if neg:
            sec, nsec = (-sec - 1, 1_000_000_000 - nsec) if nsec else (-sec, 0)
        return sec, nsec
    return int(info.mtime), 0


def pax_xattrs(info: tarfile.TarInfo) -> dict[str, bytes]:
    """The entry's ``SCHILY.xattr.*`` PAX records as xattr name -> raw value."""
    prefix = "SCHILY.xattr."
    return {
        k[len(prefix) :]: v.encode("utf-8", "surrogateescape")
        for k, v in info.pax_headers.items()
        if k.startswith(prefix)
    }


def file_segments(info: tarfile.TarInfo) -> list[tuple[int, int, int]]:
    """(file_offset, length, tar_offset) of each stored data piece of a regular file."""
    if info.sparse is None:
        return [(0, info.size, info.offset_data)] if info.size else []
    out = []
    tar_pos = info.offset_data
    for offset, length in info.sparse:
        if length:
            out.append((offset, length, tar_pos))
            tar_pos += length
    return out
