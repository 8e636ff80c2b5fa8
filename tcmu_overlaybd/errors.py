"""The one exception root of obd.

Every error a user can meet is an ``ObdError`` subclass.  The CLI prints
``obd: <message>`` on one line and exits with the subclass's ``exit_code``;
anything that is not an ``ObdError`` is a bug and gets a traceback.

Format parsers raise ``CorruptDataError`` naming the blob and the byte offset
where the data went wrong, so that a user can tell which layer is broken.
"""

from __future__ import annotations


class ObdError(Exception):
    """Root of every user-facing error."""

    exit_code = 1
    reason = "error"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(ObdError):
    """The command line or a configuration value is wrong."""

    exit_code = 2
    reason = "usage"


class NotFoundError(ObdError):
    """An image, tag, blob, file or path does not exist."""

    exit_code = 3
    reason = "not found"


class AuthError(ObdError):
    """The registry refused our credentials (401/403) or none were found."""

    exit_code = 4
    reason = "auth"


class NetworkError(ObdError):
    """Connection failures, timeouts and server errors once retries are spent."""

    exit_code = 5
    reason = "network"


class CorruptDataError(ObdError):
    """Bytes that do not follow the format they claim: bad magic, CRC or index.

    ``blob`` names the file or digest and ``offset`` the byte position (in that
    blob's own address space) where the problem was found.
    """

    exit_code = 6
    reason = "corrupt data"

    def __init__(self, message: str, blob: str | None = None, offset: int | None = None):
        self.blob = blob
        self.offset = offset
        where = []
        if blob is not None:
            where.append(str(blob))
        if offset is not None:
            where.append(f"offset {offset}")
        full = f"{' at '.join(where)}: {message}" if where else message
        super().__init__(full)
        self.detail = message


class UnsupportedError(ObdError):
    """Valid input that uses a feature obd does not implement."""

    exit_code = 7
    reason = "unsupported"


class KernelError(ObdError):
    """A kernel feature (module, configfs, uio, mount) is missing or failed."""

    exit_code = 8
    reason = "kernel"


class StateError(ObdError):
    """Local state (mounts, handlers, cache) is not what the command needs."""

    exit_code = 9
    reason = "state"
