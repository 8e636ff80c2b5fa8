"""Writing a small private file atomically: readers see the old content or the new, never a part.

Used for obd's own state (mount records, pids, the handler's metrics address,
recorded traces, the local-layout hash record).  The data goes to a temporary
file of this process and thread beside ``path`` (created exclusively, never
through a symlink, 0600 whatever the umask), optionally fsync'ed, then renamed
over ``path``; on any failure the temporary file is removed and ``path`` is
unchanged.
"""

from __future__ import annotations

import os
import threading


def write_private_file(path: str, data: bytes, *, fsync: bool = False) -> None:
    """Replace ``path`` by a 0600 file holding ``data`` (OSError on failure, ``path`` then unchanged)."""
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a dead process that had our pid, or planted: never reused
        os.unlink(tmp)
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
