"""The handler serves block-cache hits of a remote image on its ring thread (``read_cached``).

A real overlaybd layer (the hello-world vector: tar -> ZFile -> LSMT) is read
through a real block cache from a counting stand-in for the registry blob and
served to a simulated kernel ring: cold READs go to the worker threads and fetch,
warm ones are completed by the ring thread without a hop or a fetch.
"""

from __future__ import annotations

import struct
import threading

import pytest

from tcmu_overlaybd.block.source import CountingSource, FileSource
from tcmu_overlaybd.block.stack import StackedDisk
from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource
from tcmu_overlaybd.format.layer import open_layer_blob
from tcmu_overlaybd.tcmu.scsi import GOOD

from .tcmu_sim import Served

HELLO_BLOB = "aci-hello-world/sha256_022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
HELLO_LBA, HELLO_SECTORS = 6356992 // 512, 26  # the ``hello`` file (13,256 bytes) on the disk


def read10(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBIBHB", 0x28, 0, lba, 0, blocks, 0)


class ThreadLog:
    """Wraps the stack: notes which thread called ``read`` / ``read_cached`` and what they returned."""

    def __init__(self, disk):
        self.disk, self.name, self.size = disk, disk.name, disk.size
        self.calls: list[tuple[str, str, bool]] = []  # (method, thread name, served)

    def read(self, offset: int, length: int) -> bytes:
        self.calls.append(("read", threading.current_thread().name, True))
        return self.disk.read(offset, length)

    def read_cached(self, offset: int, length: int) -> bytes | None:
        data = self.disk.read_cached(offset, length)
        self.calls.append(("read_cached", threading.current_thread().name, data is not None))
        return data

    def close(self) -> None:
        self.disk.close()


@pytest.fixture
def hello_served(vectors, tmp_path):
    """Starts handlers serving the hello-world layer read through one block cache (cold at first);
    each call opens the stack afresh (a new handler process, say): (sim, handler, source log, origin)."""
    key = "sha256:" + HELLO_BLOB.rsplit("_", 1)[1]
    origin = CountingSource(FileSource(vectors / HELLO_BLOB, name=key))
    cache = BlockCache(tmp_path / "cache", 64 << 20, 4096)
    served = Served()

    def start():
        src = ThreadLog(StackedDisk([open_layer_blob(CachedSource(origin, cache, key))]))
        sim, h, t = served.handler(src, thread_name="ring")
        t.start()
        return sim, h, src, origin

    yield start
    served.stop_all()


def test_cold_read_goes_to_a_worker_the_same_read_again_is_served_on_the_ring_thread(hello_served):
    sim, h, src, origin = hello_served()
    fetched = origin.calls
    cid = sim.submit(read10(HELLO_LBA, HELLO_SECTORS), HELLO_SECTORS * 512)
    status, _sense, data = sim.wait([cid])[cid]
    assert status == GOOD and data[:4] == b"\x7fELF" and origin.calls > fetched
    [(m1, t1, hit1), (m2, t2, _)] = src.calls
    assert (m1, t1, hit1) == ("read_cached", "ring", False) and m2 == "read" and t2.startswith("tcmu-io-")
    assert h.cached_reads == 0
    sim, h, src, origin = hello_served()  # a new handler: an empty ZFile LRU, the cache warm
    fetched = origin.calls
    cid = sim.submit(read10(HELLO_LBA, HELLO_SECTORS), HELLO_SECTORS * 512)
    status, _sense, again = sim.wait([cid])[cid]
    assert (status, again) == (GOOD, data)
    assert src.calls == [("read_cached", "ring", True)] and h.cached_reads == 1
    assert origin.calls == fetched


def test_a_bad_cached_block_is_left_to_a_worker_which_fetches_it_again(hello_served):
    sim, h, src, origin = hello_served()
    cache = src.disk.layers[0].source.source.base.cache  # ZFile -> tar slice -> CachedSource
    opened = {e.index for e in cache.scan()}  # headers, jump table, LSMT index
    cid = sim.submit(read10(HELLO_LBA, HELLO_SECTORS), HELLO_SECTORS * 512)
    status, _sense, want = sim.wait([cid])[cid]
    assert status == GOOD
    for e in cache.scan():  # flip a byte in each block the READ fetched: compressed data only
        if e.index not in opened:
            with open(e.path, "r+b") as f:
                f.seek(e.size // 2)
                f.write(bytes([f.read(1)[0] ^ 0xFF]))  # same length: only the ZFile CRC can tell
    sim, h, src, origin = hello_served()
    fetched = origin.bytes_read
    cid = sim.submit(read10(HELLO_LBA, HELLO_SECTORS), HELLO_SECTORS * 512)
    status, _sense, data = sim.wait([cid])[cid]
    assert (status, data) == (GOOD, want)
    assert src.calls[0] == ("read_cached", "ring", False) and src.calls[1][0] == "read"
    assert h.cached_reads == 0 and origin.bytes_read > fetched
