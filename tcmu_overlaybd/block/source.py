"""Random-access byte sources: the one interface every layer of the stack speaks.

A byte source has a ``name`` (used in error messages: a path or a digest), a
``size`` in bytes and ``read(offset, length) -> bytes``.  ``read`` returns
exactly ``length`` bytes unless the range runs past ``size``, in which case it
returns the bytes up to ``size`` (possibly ``b""``).  Negative offsets or
lengths are a programming error.

Format readers wrap sources and are sources again (tar payload -> ZFile ->
LSMT -> merged stack), so the TCMU handler only ever sees one ``read``.
"""

from __future__ import annotations

import os
import threading
from typing import Protocol, runtime_checkable

from ..errors import NotFoundError, ObdError


@runtime_checkable
class ByteSource(Protocol):
    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes: ...

    def close(self) -> None: ...


def clamp_read(size: int, offset: int, length: int) -> int:
    """How many bytes a read of ``length`` at ``offset`` returns from a source of ``size``.

    Every ``read`` implementation starts with this: negative arguments are a bug
    of the caller (ValueError), reads past the end are short, never an error.
    """
    if offset < 0 or length < 0:
        raise ValueError(f"negative read: offset={offset} length={length}")
    if offset >= size:
        return 0
    return min(length, size - offset)


class FileSource:
    """A local file read with ``os.pread`` (thread-safe, no shared file position)."""

    def __init__(self, path: str | os.PathLike, name: str | None = None):
        self.path = os.fspath(path)
        self.name = name or self.path
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: no such file") from None
        except OSError as e:
            raise ObdError(f"{self.path}: cannot open: {e.strerror}") from None
        self.size = os.fstat(self._fd).st_size

    def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        data = os.pread(self._fd, n, offset)
        while len(data) < n:  # pread may return short on some filesystems
            more = os.pread(self._fd, n - len(data), offset + len(data))
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"FileSource({self.path!r}, size={self.size})"


class BytesSource:
    """An in-memory buffer as a byte source (tests, small metadata blobs)."""

    def __init__(self, data: bytes, name: str = "<memory>"):
        self._data = bytes(data)
        self.name = name
        self.size = len(self._data)

    def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        return self._data[offset : offset + n]

    def close(self) -> None:
        pass


class SliceSource:
    """A window ``[start, start+size)`` of another source (e.g. a tar payload)."""

    def __init__(self, base: ByteSource, start: int, size: int, name: str | None = None):
        if start < 0 or size < 0:
            raise ValueError("negative slice")
        self.base = base
        self.start = start
        self.size = size
        self.name = name or base.name
        inner = getattr(base, "read_cached", None)
        if inner is not None:  # only offered when the base can read without waiting
            self.read_cached = lambda offset, length: inner(start + offset, clamp_read(size, offset, length))

    def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        return self.base.read(self.start + offset, n)

    def invalidate(self, offset: int, length: int) -> None:
        """Forward a cache invalidation (bad bytes found by a reader) to the base, if it caches."""
        inv = getattr(self.base, "invalidate", None)
        if inv is not None:
            inv(self.start + offset, length)

    def warm_map(self, offset: int, length: int) -> tuple[ByteSource, int, int]:
        """Where ``warm`` of ``[offset, offset+length)`` goes: the same range of the base."""
        return self.base, self.start + offset, clamp_read(self.size, offset, length)

    def fetch_range(self, offset: int, length: int) -> None:
        """Warm ``[offset, offset+length)`` of the window in the base (see ``warm``)."""
        warm(*self.warm_map(offset, length))

    def close(self) -> None:
        self.base.close()


class CountingSource:
    """Counts the bytes and calls that go through to ``base`` (tests, stats)."""

    def __init__(self, base: ByteSource):
        self.base = base
        self.name = base.name
        self.size = base.size
        self.bytes_read = 0
        self.calls = 0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        data = self.base.read(offset, length)
        with self._lock:
            self.bytes_read += len(data)
            self.calls += 1
        return data

    def invalidate(self, offset: int, length: int) -> None:
        inv = getattr(self.base, "invalidate", None)
        if inv is not None:
            inv(offset, length)

    def close(self) -> None:
        self.base.close()


def warm(src: ByteSource, offset: int, length: int) -> None:
    """Make ``[offset, offset+length)`` of ``src`` cheap to read later, without using the bytes.

    Sources that sit on a cache (``CachedSource``) or can map the range to one
    below them (``SliceSource``, ``ZFileReader``) have ``fetch_range``: the bytes
    are fetched into the cache and not decoded.  Any other source is read once
    (a local file: into the page cache)."""
    if length <= 0:
        return
    fetch = getattr(src, "fetch_range", None)
    if fetch is not None:
        fetch(offset, length)
    else:
        src.read(offset, length)


def warm_target(src: ByteSource, offset: int, length: int) -> tuple[ByteSource, int, int]:
    """The source and range that ``warm(src, offset, length)`` ends up fetching: followed down
    through the sources that map a range to one below them (``warm_map``: tar slices, ZFile's
    compressed blocks), so a replay can merge neighbouring ranges into fewer, larger fetches."""
    while (step := getattr(src, "warm_map", None)) is not None:
        src, offset, length = step(offset, length)
        if length <= 0:
            break
    return src, offset, length


def read_exact(src: ByteSource, offset: int, length: int, what: str) -> bytes:
    """Read exactly ``length`` bytes or raise CorruptDataError (truncated input)."""
    from ..errors import CorruptDataError

    data = src.read(offset, length)
    if len(data) != length:
        raise CorruptDataError(
            f"truncated: {what} needs {length} bytes, only {len(data)} available",
            blob=src.name,
            offset=offset,
        )
    return data
