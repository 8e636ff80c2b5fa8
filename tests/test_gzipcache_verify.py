"""Gzip cache: a page's checksum is checked once per process, and what voids that check.

Policy (``cache/gzipcache.py`` module doc): a view checks each page's checksum the first
time it reads it and trusts the pages it wrote; eviction (which truncates the sidecar,
and with it the generation header, first) makes it check again.  Other damage to a
page this process already checked is caught by the next process, not this one.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from tcmu_overlaybd.block.source import BytesSource, CountingSource
from tcmu_overlaybd.cache import gzipcache
from tcmu_overlaybd.cache.gzipcache import PAGE, SIDECAR_SUFFIX, GzipCache
from tcmu_overlaybd.crc32c import crc32c_raw

MiB = 1 << 20
DIGEST = "sha256:" + "d" * 64


def _data(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def _damage(path, offset: int, new: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, new, offset)
    finally:
        os.close(fd)


@pytest.fixture
def checked_pages(monkeypatch) -> list[int]:
    """Lengths of the page checksums the cache computes, in order."""
    calls: list[int] = []
    real = gzipcache.page_checksum

    def counting(data):
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(gzipcache, "page_checksum", counting)
    return calls


def test_each_page_is_checked_once_per_process(tmp_path, checked_pages):
    data = _data(3 * MiB)
    view = GzipCache(tmp_path).open(DIGEST, BytesSource(data, DIGEST))
    assert view.read(5000, 300_000) == data[5000:305_000]
    assert len(checked_pages) == MiB // PAGE  # the refilled unit's entries; its pages are trusted as written
    for off in range(0, MiB - 200_000, 70_001):
        assert view.read(off, 200_000) == data[off : off + 200_000]
    assert len(checked_pages) == MiB // PAGE
    view.close()

    checked_pages.clear()  # the next process checks what it reads, once
    src = CountingSource(BytesSource(data, DIGEST))
    again = GzipCache(tmp_path).open(DIGEST, src)
    assert again.read(0, MiB) == data[:MiB] and len(checked_pages) == MiB // PAGE
    for off in (100, 4096 * 9 + 512, MiB - 4096):
        assert again.read(off, 4096) == data[off : off + 4096]
    assert len(checked_pages) == MiB // PAGE and src.bytes_read == 0 and again.hits == 4


def test_a_page_damaged_after_this_process_checked_it_is_caught_by_the_next_process(tmp_path):
    data = _data(2 * MiB, 2)
    view = GzipCache(tmp_path).open(DIGEST, BytesSource(data, DIGEST))
    assert view.read(0, 100) == data[:100]  # unit 0 written, so verified, by this view
    _damage(view.path, 7 * PAGE + 3, b"\x00\xff")
    # the policy: obd never rewrites a page with other bytes, so this view does not check
    # the page again and reads what the disk holds now
    assert view.read(7 * PAGE, 8) == data[7 * PAGE : 7 * PAGE + 3] + b"\x00\xff" + data[7 * PAGE + 5 : 7 * PAGE + 8]
    # the next process (every obd mount starts one) checks the page, refetches and repairs it
    src = CountingSource(BytesSource(data, DIGEST))
    fresh = GzipCache(tmp_path).open(DIGEST, src)
    assert fresh.read(7 * PAGE, PAGE) == data[7 * PAGE : 8 * PAGE] and src.bytes_read == MiB
    assert view.read(7 * PAGE, PAGE) == data[7 * PAGE : 8 * PAGE]  # the old view now reads the repair


def test_an_eviction_and_refill_by_another_process_voids_this_process_checks(tmp_path):
    data = _data(3 * MiB, 3)
    src = CountingSource(BytesSource(data, DIGEST))
    mine = GzipCache(tmp_path).open(DIGEST, src)
    assert mine.read(0, 3 * MiB) == data  # every page written, so verified, here
    other = GzipCache(tmp_path)  # another handler process's pool on the same directory
    assert other.prune(0) > 0
    # it refills the last unit under a new generation: the file is 3 MiB again, units 0-1 holes
    assert other.open(DIGEST, BytesSource(data, DIGEST)).read(2 * MiB + 7, 10) == data[2 * MiB + 7 : 2 * MiB + 17]
    assert os.path.getsize(mine.path) == 3 * MiB
    assert mine.read(MiB + 5, 200_000) == data[MiB + 5 : MiB + 200_005]  # refetched, not zeros
    assert src.bytes_read == 4 * MiB
    assert mine.read(2 * MiB, MiB) == data[2 * MiB :] and src.bytes_read == 4 * MiB  # the other's unit, checked


def test_a_truncation_just_before_a_verified_read_is_caught(tmp_path, monkeypatch):
    """The eviction lands between the view's look at its marks and its pread of the data:
    the pread returns holes of full length; the header read after it is not the view's."""
    data = _data(2 * MiB, 4)
    src = CountingSource(BytesSource(data, DIGEST))
    view = GzipCache(tmp_path).open(DIGEST, src)
    assert view.read(0, 2 * MiB) == data
    other = GzipCache(tmp_path)
    real_pread = os.pread
    armed = [True]

    def evict_then_pread(fd, n, offset):
        if fd == view._data and armed[0]:
            armed[0] = False
            other.prune(0)
            other.open(DIGEST, BytesSource(data, DIGEST)).read(MiB + 1, 10)  # the file is 2 MiB again
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", evict_then_pread)
    assert view.read(4096 * 3 + 100, 50_000) == data[4096 * 3 + 100 : 4096 * 3 + 50_100]
    assert not armed[0] and src.bytes_read == 3 * MiB


def test_a_version_1_sidecar_is_refilled_not_trusted(tmp_path):
    """Version 1 wrote entries (marker, CRC-32C) from offset 0, without a header: under the
    current layout they would describe the wrong pages, so none of them counts."""
    data = _data(MiB + 100, 5)
    stale = bytes(len(data))  # what a v1 entry would vouch for if misread: zeros
    (tmp_path / DIGEST).write_bytes(stale)
    entries = b"".join(struct.pack("<II", 0x50444247, crc32c_raw(stale[i : i + PAGE]))
                       for i in range(0, len(stale), PAGE))
    (tmp_path / (DIGEST + SIDECAR_SUFFIX)).write_bytes(entries)
    src = CountingSource(BytesSource(data, DIGEST))
    view = GzipCache(tmp_path).open(DIGEST, src)
    assert view.read(3 * PAGE + 5, 5000) == data[3 * PAGE + 5 : 3 * PAGE + 5005] and src.bytes_read == MiB
    assert view.read(MiB, 100) == data[MiB:] and src.bytes_read == MiB + 100


def test_no_refill_lands_between_the_two_truncations_of_an_eviction(tmp_path, monkeypatch):
    """A refill racing an eviction waits for the data truncation (the sidecar's flock): had it
    written its header and pages in between, the data truncation would empty pages it then
    trusts under a header that still stands."""
    import threading

    data = _data(2 * MiB, 6)
    src = CountingSource(BytesSource(data, DIGEST))
    view = GzipCache(tmp_path).open(DIGEST, src)
    assert view.read(0, 2 * MiB) == data
    evictor = GzipCache(tmp_path)
    real_truncate = os.truncate
    racing: list[threading.Thread] = []
    got: dict[str, bytes] = {}

    def truncate_data_while_a_reader_refills(path, length):
        if not racing and os.fspath(path) == view.path:  # the sidecar is empty already
            reader = threading.Thread(target=lambda: got.setdefault("racing", view.read(100, 5000)))
            racing.append(reader)
            reader.start()
            reader.join(0.5)  # it blocks on the lock until this truncation is done
        return real_truncate(path, length)

    monkeypatch.setattr(os, "truncate", truncate_data_while_a_reader_refills)
    assert evictor.prune(0) > 0
    racing[0].join()
    assert got["racing"] == data[100:5100]
    evictor.open(DIGEST, BytesSource(data, DIGEST)).read(MiB + 1, 10)  # unit 1 back: the file is 2 MiB
    assert view.read(200, 8000) == data[200:8200]  # unit 0, refilled after the truncation: not zeros


def test_without_flock_every_read_checks_its_pages(tmp_path, monkeypatch, checked_pages):
    """A file system without locks (e.g. NFS without lockd) cannot keep refills out of an
    eviction: the cache still works, checking each page on every read as version 1 did."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    data = _data(2 * MiB, 7)
    src = CountingSource(BytesSource(data, DIGEST))
    pool = GzipCache(tmp_path)
    view = pool.open(DIGEST, src)
    assert view.read(0, 2 * MiB) == data and len(checked_pages) == 2 * MiB // PAGE
    assert view.read(5000, 10_000) == data[5000:15_000] and len(checked_pages) == 2 * MiB // PAGE + 3
    assert pool.prune(0) > 0  # eviction still works, unlocked
    assert view.read(5000, 10_000) == data[5000:15_000] and src.bytes_read == 3 * MiB
