"""Export a virtual disk (a layer stack) as a sparse raw image file."""

from __future__ import annotations

import os
from typing import Callable

from ..errors import ObdError

#: bytes read from the stack per step
CHUNK = 4 * 1024 * 1024


def export_raw(disk, path: str | os.PathLike, *, progress: Callable[[int], None] | None = None) -> int:
    """Write ``disk`` to ``path`` as a sparse file of ``disk.size`` bytes; returns bytes written.

    Only mapped, non-zeroed extents (``disk.extents()``) are read, and chunks
    that turn out to be all zeros are skipped too, so holes stay holes.
    ``progress(bytes_done)`` is called with the running total of extent bytes
    processed.
    """
    path = os.fspath(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise ObdError(f"{path}: cannot create: {e.strerror}") from None
    written = done = 0
    zeros = bytes(CHUNK)
    try:
        os.ftruncate(fd, disk.size)
        for offset, length, zeroed, _level in disk.extents():
            if zeroed:
                continue
            end = offset + length
            pos = offset
            while pos < end:
                n = min(CHUNK, end - pos)
                data = disk.read(pos, n)
                if data != zeros[: len(data)]:
                    os.pwrite(fd, data, pos)
                    written += len(data)
                pos += n
                done += n
                if progress is not None:
                    progress(done)
    except OSError as e:
        raise ObdError(f"{path}: write failed: {e.strerror}") from None
    finally:
        os.close(fd)
    return written
