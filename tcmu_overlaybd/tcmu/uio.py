"""Finding and mapping the ``/dev/uioN`` of a TCMU backstore (spec tcmu.md §1.1, §1.2, §2.1)."""

from __future__ import annotations

import errno
import mmap
import os
from dataclasses import dataclass

from ..errors import KernelError, NotFoundError, StateError

SYS_UIO = "/sys/class/uio"
UIO_NAME_PREFIX = "tcm-user"
CONFIGFS_CORE = "/sys/kernel/config/target/core"


@dataclass(frozen=True)
class TcmuName:
    """A TCMU device's UIO name (tcmu.md §2.1): ``tcm-user/<hba>/<dev_name>[/<dev_config>]``,
    where ``dev_config`` is ``<subtype>/<cfgstring>`` by convention (the cfgstring may hold ``/``)."""

    hba: int
    dev_name: str
    dev_config: str

    @property
    def subtype(self) -> str:
        return self.dev_config.partition("/")[0]

    @property
    def cfgstring(self) -> str:
        return self.dev_config.partition("/")[2]

    @property
    def configfs_path(self) -> str:
        """The backstore's configfs directory (§2.1)."""
        return f"{CONFIGFS_CORE}/user_{self.hba}/{self.dev_name}"

    @classmethod
    def parse(cls, text: str) -> "TcmuName | None":
        """The parsed name, or None if ``text`` is not a TCMU device's (other UIO drivers)."""
        parts = text.rstrip("\n").split("/", 3)
        if len(parts) < 3 or parts[0] != UIO_NAME_PREFIX or not parts[1].isdigit() or not parts[2]:
            return None
        return cls(int(parts[1]), parts[2], parts[3] if len(parts) == 4 else "")

    def __str__(self) -> str:
        tail = f"/{self.dev_config}" if self.dev_config else ""
        return f"{UIO_NAME_PREFIX}/{self.hba}/{self.dev_name}{tail}"


@dataclass(frozen=True)
class TcmuUio:
    """One ``uioN`` and the TCMU name it carries."""

    uio: str
    name: TcmuName


def tcmu_devices(sys_uio: str = SYS_UIO) -> list[TcmuUio]:
    """Every TCMU uio device of the system, in ``uioN`` order."""
    try:
        entries = sorted(os.listdir(sys_uio), key=lambda e: (len(e), e))
    except FileNotFoundError:
        raise KernelError(f"{sys_uio} does not exist: no UIO support in this kernel") from None
    found = []
    for entry in entries:
        try:
            with open(os.path.join(sys_uio, entry, "name")) as f:
                name = TcmuName.parse(f.read())
        except OSError:
            continue
        if name is not None:
            found.append(TcmuUio(entry, name))
    return found


def find_uio(dev_name: str, dev_config: str, sys_uio: str = SYS_UIO) -> TcmuUio:
    """The uio device of backstore ``dev_name``, if and only if its dev_config is exactly
    ``dev_config`` (ownership, §2.3).

    A device of that name configured otherwise (another daemon's, another mount's, or a
    state file pointing at a backstore that is not ours) raises KernelError: its ring must
    never be opened, reset or served by us.
    """
    named = [dev for dev in tcmu_devices(sys_uio) if dev.name.dev_name == dev_name]
    for dev in named:  # backstore names are unique per HBA only: another HBA may hold a namesake
        if dev.name.dev_config == dev_config:
            return dev
    if named:
        dev = named[0]
        shown = dev.name.dev_config or "no dev_config"
        raise KernelError(f"refusing /dev/{dev.uio} ({dev.name}): its config is {shown}, "
                          f"not this mount's {dev_config}")
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
