"""Registry unreachable while mounted: reads of data not in the cache fail with EIO (not a hang,
not wrong bytes), the handler stays up, and the same reads succeed once the registry is back."""

from __future__ import annotations

import errno
import mmap
import os
import time

import pytest

from tcmu_overlaybd.block.source import BytesSource
from tcmu_overlaybd.format.layer import open_layer_blob
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.registry import RegistryClient

from ..helpers.registry import Proxy, RegistryServer, needs_registry, push_hello_world
from .conftest import obd, obd_json_list

pytestmark = pytest.mark.kernel

LAYER = "sha256_022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
UNIT = 256 * 1024  # the block cache's fetch unit (cache.blockSize default)


class _Recorder(BytesSource):
    def __init__(self, data):
        super().__init__(data, "layer")
        self.touched: list[tuple[int, int]] = []

    def read(self, offset, length):
        self.touched.append((offset, length))
        return super().read(offset, length)


def offset_in_middle_unit(blob: bytes) -> tuple[int, bytes]:
    """A virtual-disk offset whose data lives only in blob bytes [UNIT, 2*UNIT): mounting and
    reading /hello never fetch that unit (they need the first and last ones)."""
    for seg_off, seg_len, _m, zeroed, _t in open_layer_blob(BytesSource(blob, "layer")).segments():
        if zeroed:
            continue
        rec = _Recorder(blob)
        layer = open_layer_blob(rec)
        rec.touched.clear()
        want = layer.read(seg_off * 512, 4096)
        if rec.touched and all(UNIT <= o and o + n <= 2 * UNIT for o, n in rec.touched):
            return seg_off * 512, want
    pytest.fail("no disk offset maps into the middle cache unit of the hello-world layer")


def read_direct(dev: str, offset: int) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 4096)
        os.preadv(fd, [buf], offset)
        return bytes(buf)
    finally:
        os.close(fd)


@needs_registry
def test_reads_fail_with_eio_during_outage_and_recover(vectors, tmp_path, monkeypatch):
    monkeypatch.setenv("OBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OBD_REGISTRY_RETRIES", "1")
    monkeypatch.setenv("OBD_IO_TIMEOUT", "4")  # reads wait out an outage this long, then EIO
    offset, want = offset_in_middle_unit((vectors / "aci-hello-world" / LAYER).read_bytes())
    reg = RegistryServer(str(tmp_path / "registry"))
    proxy = Proxy(reg.host)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        push_hello_world(RegistryClient(reg.host, OpenOptions(plain_http=True)), vectors, "lib/hello", "c")
        assert obd("mount", "--plain-http", f"{proxy.host}/lib/hello:c", str(mnt))[0] == 0
        [m] = obd_json_list()
        outage = proxy.add_fault("status:503", "/blobs/", times=10**6)
        t0 = time.monotonic()
        with pytest.raises(OSError) as e:
            read_direct(m["device"], offset)
        waited = time.monotonic() - t0
        assert e.value.errno == errno.EIO and outage.hits > 2
        assert 3.5 <= waited < 60  # bounded by io.timeout, not failed at the first 503
        [still] = obd_json_list()
        assert still["handler_alive"] and still["handler_pid"] == m["handler_pid"] and still["restarts"] == 0
        outage.times = 0  # the registry is back
        assert read_direct(m["device"], offset) == want
        assert (mnt / "hello").stat().st_size == 13256
    finally:
        obd("umount", str(mnt))
        proxy.stop()
        reg.stop()
