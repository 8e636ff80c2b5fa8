"""Read counters, latency histogram and slow-read watchdog of the handler's device (stats/)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from tcmu_overlaybd.block.source import BytesSource, FileSource
from tcmu_overlaybd.errors import CorruptDataError
from tcmu_overlaybd.mount.rawdisk import RawDisk
from tcmu_overlaybd.stats.device import CountingDevice, SlowReadWatchdog
from tcmu_overlaybd.stats.latency import BOUNDS_NS, NBUCKETS, percentile

MS = 1_000_000


@pytest.fixture
def disk_file(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    return path


class GatedSource:
    """A source whose reads wait for ``gate`` (a remote read that hangs until released)."""

    name, size = "gated", 1 << 20

    def __init__(self):
        self.gate = threading.Event()
        self.entered = threading.Event()

    def read(self, offset, length):
        self.entered.set()
        self.gate.wait(10)
        return bytes(length)

    def close(self):
        pass


class FailingSource:
    name, size = "bad-blob", 1 << 20

    def read(self, offset, length):
        raise CorruptDataError("crc mismatch", blob=self.name, offset=offset)

    def close(self):
        pass


# -- latency buckets and percentiles ------------------------------------------------------------------
def test_bounds_are_log_scale_from_1us_to_100s():
    assert BOUNDS_NS[0] == 1_000 and BOUNDS_NS[-1] == 100 * 10 ** 9
    ratios = [b / a for a, b in zip(BOUNDS_NS, BOUNDS_NS[1:])]
    assert all(1.3 <= r <= 1.67 for r in ratios)
    assert NBUCKETS == len(BOUNDS_NS) + 1


def test_percentiles_of_a_known_distribution():
    counts = [0] * NBUCKETS
    i_1ms, i_10ms = BOUNDS_NS.index(MS), BOUNDS_NS.index(10 * MS)
    counts[i_1ms] = 90  # 90 reads in (0.7 ms, 1 ms]
    counts[i_10ms] = 10  # 10 reads in (7 ms, 10 ms]
    # p50 interpolates inside the 1 ms bucket; p90 is its last read; p99 lands in the 10 ms one
    assert 0.7 * MS < percentile(counts, 0.5, 9 * MS) < MS
    assert percentile(counts, 0.9, 9 * MS) == MS
    assert 7 * MS < percentile(counts, 0.99, 9 * MS) <= 9 * MS  # capped by the exact maximum
    assert percentile(counts, 1.0, 9 * MS) == 9 * MS


def test_percentile_of_nothing_is_zero_and_overflow_bucket_uses_max():
    assert percentile([0] * NBUCKETS, 0.99, 0) == 0
    counts = [0] * NBUCKETS
    counts[-1] = 1  # above 100 s
    assert percentile(counts, 0.5, 150 * 10 ** 9) == 150 * 10 ** 9


# -- the counting device ------------------------------------------------------------------------------------
def test_counts_reads_bytes_and_returns_the_same_bytes(disk_file):
    src = FileSource(disk_file)
    dev = CountingDevice(src, slow_ms=1000)
    data = disk_file.read_bytes()
    assert dev.read(4096, 8192) == data[4096:12288]
    assert dev.read((1 << 20) - 100, 4096) == data[-100:]  # short at EOF: counts what it returned
    snap = dev.snapshot()
    assert (snap.reads, snap.bytes_read, snap.errors, snap.slow, snap.inflight) == (2, 8292, 0, 0, 0)
    assert sum(snap.counts) == 2 and snap.max_ns > 0 and snap.sum_ns >= snap.max_ns
    assert (dev.name, dev.size, dev.local) == (src.name, src.size, False)
    assert not hasattr(dev, "readinto")  # FileSource has none: the handler must not see one


def test_readinto_and_local_are_forwarded(disk_file):
    raw = RawDisk(str(disk_file))
    dev = CountingDevice(raw, slow_ms=1000)
    assert dev.local is True
    a, b = bytearray(4096), bytearray(8192)
    assert dev.readinto(0, [memoryview(a), memoryview(b)]) == 12288
    assert bytes(a + b) == disk_file.read_bytes()[:12288]
    snap = dev.snapshot()
    assert (snap.reads, snap.bytes_read) == (1, 12288)
    raw.close()


def test_a_failing_read_is_counted_and_raised():
    dev = CountingDevice(FailingSource(), slow_ms=1000)
    with pytest.raises(CorruptDataError, match="bad-blob"):
        dev.read(512, 4096)
    snap = dev.snapshot()
    assert (snap.reads, snap.errors, snap.bytes_read, snap.inflight) == (1, 1, 0, 0)


def test_exact_totals_from_many_threads():
    dev = CountingDevice(BytesSource(bytes(1 << 16)), slow_ms=1000)

    def reader():
        for i in range(2000):
            dev.read(i % 16 * 4096, 512)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = dev.snapshot()
    assert (snap.reads, snap.bytes_read) == (16000, 16000 * 512)
    assert sum(snap.counts) == 16000


def test_reads_slower_than_slow_ms_are_counted():
    class Slow(BytesSource):
        def read(self, offset, length):
            time.sleep(0.03)
            return super().read(offset, length)

    dev = CountingDevice(Slow(bytes(8192)), slow_ms=10)
    dev.read(0, 4096)
    snap = dev.snapshot()
    assert snap.slow == 1 and snap.max_ns >= 30 * MS
    assert 20 * MS < snap.percentile_ns(0.5) <= snap.max_ns


# -- the watchdog -------------------------------------------------------------------------------------------
def test_a_stuck_read_gets_exactly_one_warning_naming_offset_and_length(caplog):
    src = GatedSource()
    dev = CountingDevice(src, slow_ms=200)
    t = threading.Thread(target=dev.read, args=(7 * 4096, 65536))
    caplog.set_level(logging.WARNING, logger="tcmu_overlaybd.stats.device")
    t.start()
    assert src.entered.wait(5)
    assert dev.warn_stuck() == 0  # not old enough yet
    time.sleep(0.25)
    snap = dev.snapshot()
    assert (snap.inflight, snap.stuck) == (1, 1)
    assert dev.warn_stuck() == 1
    assert dev.warn_stuck() == 0  # one warning per stuck read, not one per scan
    src.gate.set()
    t.join()
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2
    assert "65536 bytes at offset 28672 in flight" in msgs[0]
    assert "65536 bytes at offset 28672 completed after" in msgs[1]
    snap = dev.snapshot()
    assert (snap.inflight, snap.stuck, snap.slow, snap.slow_warnings) == (0, 0, 1, 1)


def test_watchdog_thread_warns_without_being_asked(caplog):
    src = GatedSource()
    dev = CountingDevice(src, slow_ms=20)
    dog = SlowReadWatchdog(dev)
    caplog.set_level(logging.WARNING, logger="tcmu_overlaybd.stats.device")
    dog.start()
    t = threading.Thread(target=dev.read, args=(0, 4096))
    t.start()
    try:
        deadline = time.monotonic() + 5
        while dev.slow_warnings == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.slow_warnings == 1
        assert "4096 bytes at offset 0 in flight" in caplog.records[0].getMessage()
    finally:
        src.gate.set()
        t.join()
        dog.stop()


# -- through the real handler ---------------------------------------------------------------------------
def test_the_handler_reads_through_the_counting_device_in_place(disk_file):
    """Handler + simulated ring: readinto reaches the raw disk, every READ is counted once."""
    import struct

    from tcmu_overlaybd.tcmu.handler import Handler
    from tcmu_overlaybd.tcmu.scsi import DiskInfo, Target

    from .tcmu_sim import SimKernel

    raw = RawDisk(str(disk_file))
    dev = CountingDevice(raw, slow_ms=1000)
    sim = SimKernel()
    h = Handler(sim.handler_fd.fileno(), sim.buf, Target(DiskInfo.for_size(dev.size, "0123abcd")), dev)
    t = threading.Thread(target=h.serve, daemon=True)
    t.start()
    data = disk_file.read_bytes()
    try:
        for batch in range(10):
            ids = {sim.submit(struct.pack(">BBIBHB", 0x28, 0, lba, 0, 8, 0), 4096): lba
                   for lba in range(batch * 80, batch * 80 + 80, 8)}
            done = sim.wait(list(ids))
            for cid, lba in ids.items():
                assert done[cid][0] == 0 and done[cid][2] == data[lba * 512:lba * 512 + 4096]
    finally:
        h.stop()
        t.join(5)
        sim.close()
        raw.close()
    snap = dev.snapshot()
    assert (snap.reads, snap.bytes_read, snap.errors, snap.inflight) == (100, 100 * 4096, 0, 0)


class HalfCached(BytesSource):
    """A remote source whose first half is in the cache: ``read_cached`` serves it, else None."""

    def read_cached(self, offset, length):
        return self.read(offset, length) if offset + length <= self.size // 2 else None


def test_ring_thread_hits_are_counted_once_and_misses_left_to_the_read_that_follows():
    dev = CountingDevice(HalfCached(bytes(range(256)) * 4096), slow_ms=1000)
    assert dev.read_cached(0, 4096) == (bytes(range(256)) * 16)
    assert dev.read_cached(dev.size - 4096, 4096) is None  # a miss: the handler's worker reads it
    dev.read(dev.size - 4096, 4096)
    snap = dev.snapshot()
    assert (snap.reads, snap.bytes_read, snap.errors) == (2, 8192, 0)
    assert not hasattr(CountingDevice(BytesSource(b"x" * 512), slow_ms=1000), "read_cached")


def test_stack_sampler_names_the_function_a_busy_thread_spends_its_time_in(tmp_path, monkeypatch):
    import json as _json
    import threading as _threading

    from tcmu_overlaybd.stats.sampler import ENV, StackSampler

    stop = _threading.Event()

    def spin_in_the_decoder():
        while not stop.is_set():
            sum(range(1000))

    worker = _threading.Thread(target=spin_in_the_decoder, name="obd-io-3")
    worker.start()
    monkeypatch.setenv(ENV, str(tmp_path / "s.json"))
    sampler = StackSampler.from_env()
    sampler.interval = 0.005
    try:
        import time as _time
        _time.sleep(0.5)
    finally:
        sampler.stop()
        stop.set()
        worker.join()
    doc = _json.loads((tmp_path / "s.json").read_text())
    assert doc["samples"] > 10
    top_key, count = doc["threads"]["obd-io"]["top"][0]
    assert top_key.startswith("spin_in_the_decoder") and count > doc["samples"] // 2
