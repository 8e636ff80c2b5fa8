"""Reading OCI layer blobs as tar streams: decompression by magic, the diff_id, and
what a tar entry says beyond ``tarfile``'s fields (exact PAX mtime, xattrs, the
stored pieces of plain and GNU sparse files with their offsets in the
uncompressed stream, spec §4.2)."""

from __future__ import annotations

import gzip
import hashlib
import tarfile
import zlib
from typing import BinaryIO

import zstandard

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20

#: what a broken layer stream raises while being read
STREAM_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError, UnicodeError)


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


def decompressed(stream: BinaryIO) -> BinaryIO:
    """The uncompressed tar stream of a layer blob: gzip, zstd or plain, by magic."""
    head = stream.read(4)
    raw = _Prefixed(head, stream)
    if head.startswith(GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[arg-type]
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
