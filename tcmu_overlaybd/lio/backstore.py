"""The LIO ``user`` (TCMU) backstore of one mounted image, through rtslib-fb (tcmu.md §4.1-§4.5, §5)."""

from __future__ import annotations

import os

from ..errors import KernelError, NotFoundError

#: dev_config subtype: ``obd/<name>``; other TCMU daemons never claim it (§2.3)
SUBTYPE = "obd"
BLOCK_SIZE = 512
#: 1 MiB requests (tcm_loop's cap), advertised in VPD 0xB0
MAX_SECTORS = 2048
#: data area: room for 64 x 1 MiB commands in flight; pages are allocated lazily
MAX_DATA_AREA_MB = 64
#: LIO and the SCSI midlayer wait this long for a (restarting) handler before failing I/O;
#: overlaybd's value (INT32_MAX / 1000 s).  Reads that wait for a registry fail earlier,
#: after ``io.timeout``, with a MEDIUM ERROR from the handler.
WAIT_FOR_HANDLER_S = 2147483

# rtslib_fb is imported by the functions that create, find or delete a backstore, not here:
# the handler process only writes configfs actions and names (its start is on obd mount's path),
# and obd mount imports it in a thread while the handler opens the image (``preload_rtslib``).


def preload_rtslib() -> None:
    """Import rtslib-fb (~0.1 s with pyudev) in a daemon thread: called by obd mount before it
    waits for the handler, so the import overlaps the image open instead of preceding it."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("rtslib_fb",), name="obd-preload", daemon=True).start()


def name_for(mount_id: str) -> str:
    """The backstore of mount ``mount_id`` (obd-cleanup recognises this naming)."""
    return f"obd-{mount_id}"


def dev_config(name: str) -> str:
    """The dev_config of backstore ``name``: ``obd/<name>``, i.e. our subtype and a cfgstring
    naming the mount (the UIO name ends with it, tcmu.md §2.1)."""
    return f"{SUBTYPE}/{name}"


def _control(block_size: int) -> str:
    # nl_reply_supported=-1: the kernel never waits for a netlink reply for this device (§3.4)
    return f"nl_reply_supported=-1,max_data_area_mb={MAX_DATA_AREA_MB},hw_block_size={block_size}"


def create(name: str, size: int, block_size: int = BLOCK_SIZE) -> str:
    """Create and enable backstore ``name`` of ``size`` bytes; returns its configfs path.

    The kernel registers ``/dev/uioN`` during ``enable``.  Timeouts are raised
    here, before any LUN exists (``cmd_time_out`` is frozen once exported).
    """
    import rtslib_fb as rtslib

    size = -(-size // block_size) * block_size
    try:
        rtslib.RTSRoot().invalidate_caches()  # other tools may have created backstores meanwhile
        so = rtslib.UserBackedStorageObject(name, config=dev_config(name), size=size,
                                            hw_max_sectors=MAX_SECTORS, control=_control(block_size))
    except (rtslib.RTSLibError, OSError) as e:
        raise KernelError(f"cannot create TCMU backstore {name}: {e}") from None
    try:
        so.set_attribute("cmd_time_out", str(WAIT_FOR_HANDLER_S))
        so.set_attribute("qfull_time_out", str(WAIT_FOR_HANDLER_S))
    except (rtslib.RTSLibError, OSError) as e:
        so.delete()
        raise KernelError(f"backstore {name}: cannot raise cmd_time_out: {e}") from None
    return so.path


def _find(name: str):
    """Our backstore ``name``: a user backstore of that name whose dev_config is ours.  A
    namesake configured for another handler is never returned, so nothing here deletes,
    resets or exports a foreign device even when a state file names one."""
    import rtslib_fb as rtslib

    want = dev_config(name)
    for so in rtslib.RTSRoot().storage_objects:
        if so.plugin == "user" and so.name == name and so.config == want:
            return so
    return None


def find(name: str):
    """The rtslib storage object of our backstore ``name`` or raise NotFoundError."""
    so = _find(name)
    if so is None:
        raise NotFoundError(f"no obd TCMU backstore named {name}")
    return so


def path_of(name: str) -> str | None:
    """The configfs directory of our backstore ``name`` (None if there is none)."""
    so = _find(name)
    return so.path if so is not None else None


def exists(name: str) -> bool:
    return _find(name) is not None


def delete(name: str) -> None:
    """Delete the backstore (after its LUN is gone; the handler then sees EIO)."""
    import rtslib_fb as rtslib

    so = _find(name)
    if so is not None:
        try:
            so.delete()
        except (rtslib.RTSLibError, OSError) as e:
            raise KernelError(f"cannot delete backstore {name}: {e}") from None


def _action(path: str, action: str, value: str) -> None:
    try:
        with open(os.path.join(path, "action", action), "w") as f:
            f.write(value)
    except FileNotFoundError:
        if action == "block_dev":  # old kernels: no block/reset (§4.5)
            return
        raise KernelError(f"{path}: kernel has no action/{action}") from None
    except OSError as e:
        raise KernelError(f"{path}: action/{action}={value} failed: {e.strerror}") from None


def reset_for_new_handler(path: str) -> None:
    """Before a restarted handler opens the device (§4.5): block, fail in-ring commands
    with BUSY so the initiator retries them, empty the ring.  Call ``unblock`` once the
    new handler serves."""
    _action(path, "block_dev", "1")
    _action(path, "reset_ring", "1")


def fail_ring(path: str) -> None:
    """Complete every command still in the ring with an error (no handler will answer them)."""
    _action(path, "reset_ring", "2")


def unblock(path: str) -> None:
    _action(path, "block_dev", "0")
