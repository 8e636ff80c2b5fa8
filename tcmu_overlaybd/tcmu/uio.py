"""Finding and mapping the ``/dev/uioN`` of a TCMU backstore (spec tcmu.md §1.1, §1.2, §2.1)."""

from __future__ import annotations

import errno
import mmap
import os

from ..errors import KernelError, NotFoundError, StateError

SYS_UIO = "/sys/class/uio"
UIO_NAME_PREFIX = "tcm-user"


def find_uio(dev_name: str, sys_uio: str = SYS_UIO) -> str:
    """Return ``uioN`` whose name is ``tcm-user/<hba>/<dev_name>[/<dev_config>]``."""
    try:
        entries = sorted(os.listdir(sys_uio))
    except FileNotFoundError:
        raise KernelError(f"{sys_uio} does not exist: no UIO support in this kernel") from None
    for entry in entries:
        try:
            with open(os.path.join(sys_uio, entry, "name")) as f:
                name = f.read().strip()
        except OSError:
            continue
        parts = name.split("/", 3)
        if len(parts) >= 3 and parts[0] == UIO_NAME_PREFIX and parts[2] == dev_name:
            return entry
    raise NotFoundError(f"no TCMU uio device for backstore {dev_name}")


class UioDevice:
    """An opened and mmapped ``/dev/uioN``: ``fd`` to wait and notify on, ``buf`` the ring."""

    def __init__(self, uio: str, sys_uio: str = SYS_UIO, dev_dir: str = "/dev"):
        self.uio = uio
        with open(os.path.join(sys_uio, uio, "maps", "map0", "size")) as f:
            self.size = int(f.read().strip(), 0)
        path = os.path.join(dev_dir, uio)
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.EBUSY:
                raise StateError(f"{path} is busy: another handler serves this device") from None
            raise KernelError(f"cannot open {path}: {e.strerror}") from None
        try:
            self.buf = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            os.close(self.fd)
            raise KernelError(f"cannot mmap {path} ({self.size} bytes): {e.strerror}") from None

    def close(self) -> None:
        """Unmap and close (the kernel then keeps the ring for the next handler, §4.5)."""
        try:
            self.buf.close()
        except BufferError:  # a memoryview is still alive; the mapping goes with the process
            pass
        os.close(self.fd)
