"""A tcm_loop LUN exporting a backstore as a local SCSI disk, and its ``/dev/sdX`` (tcmu.md §4.6-§4.8)."""

from __future__ import annotations

import glob
import hashlib
import os
import time

from ..errors import KernelError
from . import backstore

LOOPBACK_ROOT = "/sys/kernel/config/target/loopback"


def wwn_for(name: str) -> str:
    """A stable ``naa.5…`` WWN (16 hex digits) derived from the mount name."""
    return "naa.5" + hashlib.sha256(name.encode()).hexdigest()[:15]


def export(name: str, wwn: str, timeout: float = 30.0) -> str:
    """Create target ``wwn`` with LUN 0 over backstore ``name``; return ``/dev/sdX``.

    The SCSI scan runs inside the LUN symlink call: the handler must already serve.
    """
    import rtslib_fb as rtslib  # imported where used: see backstore

    so = backstore.find(name)
    try:
        target = rtslib.Target(rtslib.FabricModule("loopback"), wwn, mode="create")
        tpg = rtslib.TPG(target, 1, mode="create")  # loopback writes a random nexus itself
        rtslib.LUN(tpg, 0, storage_object=so, alias="obd")
    except (rtslib.RTSLibError, OSError) as e:
        unexport(wwn, name)
        raise KernelError(f"cannot export {name} through tcm_loop: {e}") from None
    dev = wait_block_device(tpg.path, 0, timeout)
    set_disk_timeout(dev, backstore.WAIT_FOR_HANDLER_S)
    return dev


def _scsi_address(tpg_path: str) -> str:
    try:
        with open(os.path.join(tpg_path, "address")) as f:
            return f.read().strip()  # "<host>:0:<tpgt>"
    except OSError as e:
        raise KernelError(f"{tpg_path}/address: {e.strerror}") from None


def wait_block_device(tpg_path: str, lun: int, timeout: float) -> str:
    """Poll sysfs until sd has attached the LUN (it may finish after symlink() returns):
    the block device, its node, and its ``/sys/block/<sdX>/device`` link (the disk
    attributes set next), which a loaded machine was seen to add last."""
    addr = f"{_scsi_address(tpg_path)}:{lun}"
    deadline = time.monotonic() + timeout
    while True:
        found = glob.glob(f"/sys/class/scsi_device/{addr}/device/block/*")
        name = os.path.basename(found[0]) if found else ""
        if name and os.path.exists(f"/dev/{name}") and os.path.exists(f"/sys/block/{name}/device/timeout"):
            return f"/dev/{name}"
        if time.monotonic() > deadline:
            raise KernelError(f"SCSI device {addr} got no block device within {timeout:.0f}s")
        time.sleep(0.02)


def set_disk_timeout(dev: str, seconds: int) -> None:
    """Raise the sd command timeout so I/O waits for a restarting handler (§4.7)."""
    path = f"/sys/block/{os.path.basename(dev)}/device/timeout"
    try:
        with open(path, "w") as f:
            f.write(str(seconds))
    except OSError as e:
        raise KernelError(f"cannot set {path}: {e.strerror}") from None


def set_offline(dev: str) -> None:
    """Take ``dev`` offline so the SCSI layer fails its queued I/O instead of waiting for a
    handler that is gone (the trailing newline is required by sysfs)."""
    path = f"/sys/block/{os.path.basename(dev)}/device/state"
    try:
        with open(path, "w") as f:
            f.write("offline\n")
    except OSError as e:
        raise KernelError(f"cannot set {path}: {e.strerror}") from None


def _foreign_luns(wwn: str, name: str) -> list[str]:
    """What the LUNs of target ``wwn`` serve other than our backstore ``name`` (configfs
    paths of backstores): a target that serves anything else is not ours."""
    ours = backstore.path_of(name)
    ours = os.path.realpath(ours) if ours else None
    served = {os.path.realpath(link) for link in glob.glob(f"{LOOPBACK_ROOT}/{wwn}/tpgt_*/lun/lun_*/*")
              if os.path.islink(link)}
    return sorted(p for p in served if p != ours)


def unexport(wwn: str, name: str | None = None) -> None:
    """Remove the LUN, TPG and target ``wwn`` (the handler must still serve: sd flushes on
    removal).  With ``name``, the target must serve only our backstore ``name``: one that
    serves anything else (a state file naming another target) is refused, untouched.
    ``name=None`` is for a caller that made the target itself."""
    if not os.path.isdir(os.path.join(LOOPBACK_ROOT, wwn)):
        return
    foreign = _foreign_luns(wwn, name) if name is not None else []
    if foreign:
        raise KernelError(f"refusing to remove loopback target {wwn}: it serves {', '.join(foreign)}, "
                          f"not obd backstore {name}")
    import rtslib_fb as rtslib

    try:
        rtslib.Target(rtslib.FabricModule("loopback"), wwn, mode="lookup").delete()
    except (rtslib.RTSLibError, OSError) as e:
        raise KernelError(f"cannot remove loopback target {wwn}: {e}") from None


def device_of(wwn: str, name: str | None = None) -> str | None:
    """The ``/dev/sdX`` currently attached under target ``wwn`` (None if none, or if ``name``
    is given and the target serves anything but our backstore ``name``)."""
    tpg = os.path.join(LOOPBACK_ROOT, wwn, "tpgt_1")
    if not os.path.isdir(tpg) or (name is not None and _foreign_luns(wwn, name)):
        return None
    try:
        addr = _scsi_address(tpg)
    except KernelError:
        return None
    found = glob.glob(f"/sys/class/scsi_device/{addr}:0/device/block/*")
    return f"/dev/{os.path.basename(found[0])}" if found else None
