"""Fixtures of the tests that need a real kernel (TCMU, tcm_loop, sd, ext4, overlayfs).

They run inside the VM harness (scripts/vm-test); on a host without TCMU they
are skipped, inside the VM a missing kernel feature is a failure.
"""

from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import time
from contextlib import redirect_stdout

import pytest

from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd import config
from tcmu_overlaybd.errors import KernelError, ObdError
from tcmu_overlaybd.lio import host


@pytest.fixture(scope="session", autouse=True)
def kernel_ready():
    try:
        host.prepare()
    except KernelError as e:
        if os.environ.get("OBD_IN_VM"):
            raise
        pytest.skip(f"no TCMU here: {e}")


@pytest.fixture(autouse=True)
def no_mount_survives_a_test():
    """Tear down whatever a failed test left mounted, so one failure does not cascade."""
    yield
    from tcmu_overlaybd.mount import mounter

    sd = mounter.state_dir()
    for st in sd.all():
        mounter.teardown(st, sd, lazy=True)
    rd = mounter.record_dir()
    for mid in rd.ids():  # records left without a state file (a failed recover test)
        try:
            mounter.umount(rd.load(mid).mountpoint)
        except ObdError:
            rd.remove(mid)


def obd(*args: str) -> tuple[int, str]:
    """Run the obd CLI in this process (a new Python costs 2-3 s under TCG): (exit, stdout)."""
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(list(args))
    return rc, buf.getvalue()


def obd_json_list() -> list[dict]:
    rc, out = obd("list", "--json")
    assert rc == 0
    return json.loads(out)


def kernel_leftovers() -> dict:
    """Everything an obd mount creates in the kernel and /run (must be empty after umount)."""
    return {
        "backstores": glob.glob("/sys/kernel/config/target/core/user_*/obd-*"),
        "targets": glob.glob("/sys/kernel/config/target/loopback/naa.*"),
        "scsi_disks": glob.glob("/sys/class/scsi_disk/*"),
        "uio": glob.glob("/sys/class/uio/uio*"),
        "state": glob.glob("/run/obd/*"),
        "records": glob.glob(os.path.join(config.load()["state.persistDir"], "*")),
        "mounts": [line.split()[4] for line in open("/proc/self/mountinfo")
                   if line.split()[4].startswith(("/tmp", "/run/obd", "/mnt"))],
        "processes": supervisor_processes(),
    }


def supervisor_processes() -> list[int]:
    """Pids of live obd handler/supervisor processes (their command line names the module)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"tcmu_overlaybd.mount.supervisor" in f.read():
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def kill_every_obd_process() -> None:
    """SIGKILL every obd supervisor and handler (a crash, or what a reboot does) and wait."""
    for pid in supervisor_processes():
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while supervisor_processes():
        assert time.monotonic() < deadline, "obd processes survived SIGKILL"
        time.sleep(0.05)


@pytest.fixture
def mkext4(tmp_path):
    """Make a raw ext4 image (mke2fs -d) of a directory tree."""
    def make(tree: str, size: str = "64M") -> str:
        img = str(tmp_path / "disk.img")
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree, img, size], check=True)
        return img
    return make
