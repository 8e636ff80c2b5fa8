"""A handler killed with SIGKILL while reads are in flight: readers see slow reads, not EIO."""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import threading
import time

import pytest

from .conftest import obd, obd_json_list

pytestmark = pytest.mark.kernel

CHUNK = 1 << 20


class DeviceReader(threading.Thread):
    """Reads the whole device with O_DIRECT (no page cache) ``passes`` times, hashing each pass."""

    def __init__(self, dev: str, passes: int):
        super().__init__(daemon=True)
        self.dev, self.passes = dev, passes
        self.sums: list[str] = []
        self.error: BaseException | None = None
        self.chunks = 0

    def run(self):
        try:
            fd = os.open(self.dev, os.O_RDONLY | os.O_DIRECT)
            size = os.lseek(fd, 0, os.SEEK_END)
            buf = mmap.mmap(-1, CHUNK)
            for _ in range(self.passes):
                h = hashlib.sha256()
                for off in range(0, size, CHUNK):
                    n = os.preadv(fd, [buf], off)
                    h.update(buf[:n])
                    self.chunks += 1
                self.sums.append(h.hexdigest())
            os.close(fd)
        except BaseException as e:  # EIO would land here
            self.error = e


@pytest.fixture
def mounted(mkext4, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(24 << 20))
    img = mkext4(str(tree), "32M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert obd("mount", "--raw", img, str(mnt))[0] == 0
    want = hashlib.sha256(open(img, "rb").read()).hexdigest()
    yield mnt, img, want
    assert obd("umount", str(mnt))[0] == 0


def wait_for(pred, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_sigkill_of_handler_is_survived_automatically(mounted):
    mnt, img, want = mounted
    [m] = obd_json_list()
    reader = DeviceReader(m["device"], passes=3)
    reader.start()
    wait_for(lambda: reader.chunks >= 8)
    os.kill(m["handler_pid"], signal.SIGKILL)
    wait_for(lambda: obd_json_list()[0]["restarts"] == 1 and obd_json_list()[0]["handler_alive"])
    reader.join(600)
    assert reader.error is None and not reader.is_alive()
    assert reader.sums == [want] * 3
    [after] = obd_json_list()
    assert after["handler_pid"] != m["handler_pid"] and after["supervisor_pid"] == m["supervisor_pid"]


def test_obd_recover_restarts_a_dead_handler_process_group(mounted):
    mnt, img, want = mounted
    [m] = obd_json_list()
    reader = DeviceReader(m["device"], passes=2)
    reader.start()
    wait_for(lambda: reader.chunks >= 8)
    os.kill(m["supervisor_pid"], signal.SIGKILL)
    os.kill(m["handler_pid"], signal.SIGKILL)
    progress = reader.chunks
    time.sleep(2)
    assert reader.is_alive() and reader.chunks <= progress + 1  # blocked, not failed
    rc, out = obd("recover")
    assert rc == 0 and out.strip() == f"{mnt}: handler restarted"
    reader.join(600)
    assert reader.error is None and reader.sums == [want] * 2
    [after] = obd_json_list()
    assert after["handler_alive"] and after["supervisor_pid"] != m["supervisor_pid"]
    assert (mnt / "data").stat().st_size == 24 << 20


def test_obd_recover_replaces_a_handler_that_outlived_its_supervisor(mounted):
    """Only the supervisor killed: its handler still serves, unsupervised.  obd recover stops it
    and starts a supervised one; reads go on throughout, and a later handler crash is survived."""
    mnt, img, want = mounted
    [m] = obd_json_list()
    os.kill(m["supervisor_pid"], signal.SIGKILL)
    wait_for(lambda: not obd_json_list()[0]["supervisor_alive"])
    assert obd_json_list()[0]["handler_alive"]
    reader = DeviceReader(m["device"], passes=2)
    reader.start()
    wait_for(lambda: reader.chunks >= 4)
    rc, out = obd("recover")
    assert rc == 0 and out.strip() == f"{mnt}: handler restarted"
    [after] = obd_json_list()
    assert after["handler_alive"] and after["handler_pid"] != m["handler_pid"]
    os.kill(after["handler_pid"], signal.SIGKILL)  # supervised again: restarted automatically
    wait_for(lambda: obd_json_list()[0]["restarts"] == 1 and obd_json_list()[0]["handler_alive"])
    reader.join(600)
    assert reader.error is None and reader.sums == [want] * 2
    assert obd("recover") == (0, "")  # nothing left to do


def test_umount_after_every_obd_process_was_killed(mkext4, tmp_path):
    """No handler left at all: obd umount still finishes promptly and leaves nothing behind,
    even with a reader blocked on the device."""
    from .conftest import kernel_leftovers

    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(8 << 20))
    img = mkext4(str(tree), "16M")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = kernel_leftovers()
    assert obd("mount", "--raw", img, str(mnt))[0] == 0
    [m] = obd_json_list()
    for pid in (m["supervisor_pid"], m["handler_pid"]):
        os.kill(pid, signal.SIGKILL)
    reader = DeviceReader(m["device"], passes=1)  # blocks in the ring: nobody answers
    reader.start()
    time.sleep(1)
    t0 = time.monotonic()
    rc, out = obd("umount", str(mnt))
    assert rc == 0, out
    assert time.monotonic() - t0 < 120
    reader.join(60)
    assert not reader.is_alive() and isinstance(reader.error, OSError)
    assert kernel_leftovers() == before
