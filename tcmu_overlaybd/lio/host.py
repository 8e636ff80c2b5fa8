"""Host preconditions of the kernel path: modules, configfs, rtslib's dbroot (tcmu.md §8.1).

``prepare()`` makes the host ready (root only); ``checks()`` reports what is
missing without changing anything, for ``obd doctor``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

from ..errors import KernelError

CONFIGFS = "/sys/kernel/config"
TARGET_ROOT = CONFIGFS + "/target"
RTSLIB_DBROOT = "/etc/target"
#: sd_mod: udev would load it on a normal host; minimal systems (the VM harness) have no udev
MODULES = ("target_core_user", "tcm_loop", "sd_mod")


def _module_loaded(name: str) -> bool:
    return os.path.isdir(f"/sys/module/{name}")


def _configfs_mounted() -> bool:
    try:
        with open("/proc/mounts") as f:
            return any(line.split()[1] == CONFIGFS for line in f)
    except OSError:
        return False


def prepare() -> None:
    """Load target_core_user + tcm_loop, mount configfs, create /etc/target (rtslib needs it)."""
    if os.geteuid() != 0:
        raise KernelError("the kernel path needs root (configfs, /dev/uio*, mount)")
    os.makedirs(RTSLIB_DBROOT, exist_ok=True)  # before target_core_mod loads: it opens it
    missing = [m for m in MODULES if not _module_loaded(m)]
    if missing:
        # one modprobe -a: plain `modprobe a b` would pass b as a parameter of a
        r = subprocess.run(["modprobe", "-a", *missing], capture_output=True, text=True)
        if r.returncode != 0 or not all(_module_loaded(m) for m in missing):
            detail = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "not available"
            raise KernelError(f"cannot load {' '.join(missing)}: {detail} "
                              f"(this kernel has no TCMU; use scripts/vm-run)")
    if not _configfs_mounted():
        r = subprocess.run(["mount", "-t", "configfs", "configfs", CONFIGFS], capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelError(f"cannot mount configfs on {CONFIGFS}: {r.stderr.strip()}")
    if not os.path.isdir(TARGET_ROOT):
        raise KernelError(f"{TARGET_ROOT} missing after loading target_core_user")


@dataclass
class Check:
    """One line of ``obd doctor``: what was checked, whether it passed, what to do if not."""

    what: str
    ok: bool
    fix: str = ""


def _module_available(name: str) -> bool:
    if _module_loaded(name):
        return True
    return subprocess.run(["modinfo", name], capture_output=True).returncode == 0 if shutil.which(
        "modinfo") else False


def checks() -> list[Check]:
    """Everything ``obd mount`` needs from the host, checked without side effects."""
    out = [Check("running as root", os.geteuid() == 0, "run obd mount/umount/recover as root")]
    for m in MODULES + ("overlay", "ext4"):
        loaded = _module_loaded(m) or _in_proc_filesystems(m)
        out.append(Check(f"kernel module {m}", loaded or _module_available(m),
                         f"this kernel lacks {m}; use a distribution kernel or scripts/vm-run"))
    out.append(Check(f"configfs mounted on {CONFIGFS}", _configfs_mounted(),
                     f"mount -t configfs configfs {CONFIGFS} (obd mount does it when root)"))
    out.append(Check("/dev/uio* access (UIO)", os.path.isdir("/sys/class/uio") or _module_available("uio"),
                     "the kernel needs CONFIG_UIO (loaded with target_core_user)"))
    out.append(Check(f"{RTSLIB_DBROOT} exists (rtslib-fb dbroot)", os.path.isdir(RTSLIB_DBROOT),
                     f"mkdir {RTSLIB_DBROOT} (obd mount does it when root)"))
    for tool in ("mount", "umount", "modprobe"):
        out.append(Check(f"{tool} on PATH", shutil.which(tool) is not None, f"install {tool}"))
    foreign = _foreign_tcmu_daemons()
    out.append(Check("no other TCMU daemon", not foreign,
                     f"{', '.join(foreign)} running: obd's backstores opt out of netlink replies, "
                     f"but do not let it claim obd devices"))
    return out


def _in_proc_filesystems(name: str) -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == name for line in f if line.strip())
    except OSError:
        return False


def _foreign_tcmu_daemons() -> list[str]:
    names = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
        except OSError:
            continue
        if comm in ("tcmu-runner", "overlaybd-tcmu"):
            names.append(comm)
    return sorted(set(names))
