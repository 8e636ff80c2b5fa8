"""The on-disk block cache: bytes, merging, cap/LRU, crash safety, concurrency, `obd cache`."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tcmu_overlaybd.block.source import BytesSource, CountingSource
from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource, background_fetches
from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.errors import CorruptDataError

BS = 64 * 1024
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


def blob(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def cached(tmp_path, data: bytes, key=DIGEST_A, cap=64 << 20, bs=BS, parallel=1):
    cache = BlockCache(tmp_path / "cache", cap, bs)
    base = CountingSource(BytesSource(data, name=key))
    return cache, base, CachedSource(base, cache, key, parallel=parallel)


def test_reads_match_source_across_block_boundaries_and_tail(tmp_path):
    data = blob(5 * BS + 1234, 1)
    _cache, _base, src = cached(tmp_path, data)
    rng = random.Random(2)
    for _ in range(300):
        off = rng.randrange(0, len(data) + 10)
        n = rng.choice([1, 511, 4096, BS, BS + 1, 3 * BS])
        assert src.read(off, n) == data[off : off + n]
    assert src.read(len(data), 10) == b""
    assert src.read(len(data) - 5, 100) == data[-5:]


def test_second_read_is_served_from_disk(tmp_path):
    data = blob(4 * BS, 3)
    cache, base, src = cached(tmp_path, data)
    assert src.read(100, 4096) == data[100:4196]
    assert base.bytes_read == BS  # one whole block fetched for a 4 KiB read
    assert src.read(200, 4096) == data[200:4296]
    assert base.bytes_read == BS
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["bytes_fetched"]) == (1, 1, BS)
    assert stats["usage"] == BS and stats["capacity"] == 64 << 20
    # a second cache object (another process would do the same) sees the blocks too
    other = CachedSource(CountingSource(BytesSource(data)), BlockCache(tmp_path / "cache", 64 << 20, BS), DIGEST_A)
    assert other.read(0, BS) == data[:BS]
    assert other.base.bytes_read == 0


def test_adjacent_misses_become_one_request(tmp_path):
    data = blob(10 * BS, 4)
    cache, base, src = cached(tmp_path, data)
    src.read(3 * BS, 10)  # block 3 cached
    base.calls = 0
    assert src.read(BS, 6 * BS) == data[BS : 7 * BS]
    # blocks 1-2 and 4-6 are missing: two merged requests, not five
    assert base.calls == 2
    assert cache.counters.fetch_requests == 3


def test_files_are_private(tmp_path):
    _cache, _base, src = cached(tmp_path, blob(2 * BS, 5))
    src.read(0, 2 * BS)
    for root, dirs, files in os.walk(tmp_path / "cache"):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(root, d)).st_mode) == 0o700, d
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(root, f)).st_mode) == 0o600, f


def test_cap_holds_under_a_larger_workload(tmp_path):
    cap = 1 << 20  # 16 blocks
    data = blob(8 << 20, 6)  # 128 blocks
    cache, _base, src = cached(tmp_path, data, cap=cap)
    rng = random.Random(7)
    for _ in range(400):
        off = rng.randrange(0, len(data))
        assert src.read(off, 4096) == data[off : off + 4096]
        owned = sum(e.size for e in cache.scan())
        assert owned <= cap
    assert cache.usage() == sum(e.size for e in cache.scan())
    assert cache.counters.evicted_bytes > 0


def test_eviction_drops_least_recently_used_first(tmp_path):
    cap = 4 * BS
    a, b = blob(4 * BS, 8), blob(4 * BS, 9)
    cache = BlockCache(tmp_path / "cache", cap, BS)
    src_a = CachedSource(BytesSource(a), cache, DIGEST_A)
    src_b = CachedSource(BytesSource(b), cache, DIGEST_B)
    for i in range(4):
        src_a.read(i * BS, 1)
        # as if written an hour ago, block 0 first (recency has TOUCH_INTERVAL resolution)
        old = time.time() - 3600 + i
        os.utime(cache.block_path(DIGEST_A, i), (old, old))
    cache.close_fds()
    fresh = CachedSource(BytesSource(a), BlockCache(tmp_path / "cache", cap, BS), DIGEST_A)
    fresh.read(0, 1)  # block 0 of A becomes the most recently used
    src_b.read(0, 1)  # needs room: evicts down to 90 % of the cap
    kept = {(e.digest, e.index) for e in cache.scan()}
    assert (DIGEST_A, 0) in kept and (DIGEST_B, 0) in kept
    assert (DIGEST_A, 1) not in kept


def test_torn_block_is_a_miss_not_wrong_bytes(tmp_path):
    data = blob(3 * BS, 10)
    cache, base, src = cached(tmp_path, data)
    src.read(0, 3 * BS)
    path = cache.block_path(DIGEST_A, 1)
    with open(path, "r+b") as f:
        f.truncate(BS // 2)  # what a power cut between write and rename-commit could leave
    fresh = CachedSource(CountingSource(BytesSource(data)), BlockCache(tmp_path / "cache", 64 << 20, BS), DIGEST_A)
    assert fresh.read(BS, BS) == data[BS : 2 * BS]
    assert fresh.base.bytes_read == BS
    assert os.path.getsize(path) == BS


def test_short_source_is_an_error_and_caches_nothing(tmp_path):
    class Short(BytesSource):
        def read(self, offset, length):
            return super().read(offset, length)[:-1]

    cache = BlockCache(tmp_path / "cache", 64 << 20, BS)
    src = CachedSource(Short(blob(2 * BS, 11), name="sha256:short"), cache, DIGEST_A)
    with pytest.raises(CorruptDataError, match=r"sha256:short at offset 0: source returned"):
        src.read(0, 10)
    assert cache.scan() == []


def test_threads_share_one_cache(tmp_path):
    data = blob(32 * BS, 12)
    _cache, _base, src = cached(tmp_path, data, cap=8 * BS)
    errors = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(150):
            off = rng.randrange(0, len(data))
            n = rng.choice([4096, BS, 2 * BS])
            if src.read(off, n) != data[off : off + n]:
                errors.append((off, n))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


WRITER = textwrap.dedent("""
    import random, sys
    from tcmu_overlaybd.block.source import BytesSource
    from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource, background_fetches
    cache_dir, cap, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    data = random.Random(13).randbytes(64 * 65536)
    src = CachedSource(BytesSource(data), BlockCache(cache_dir, cap, 65536), "sha256:" + "c" * 64)
    rng = random.Random(seed)
    print("ready", flush=True)
    while True:
        off = rng.randrange(0, len(data))
        assert src.read(off, 65536) == data[off:off + 65536]
""")


def test_processes_killed_mid_write_leave_no_bad_block(tmp_path):
    cap = 16 * BS
    data = blob(64 * BS, 13)
    cache_dir = str(tmp_path / "cache")
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for round_ in range(4):
        procs = [subprocess.Popen([sys.executable, "-c", WRITER, cache_dir, str(cap), str(round_ * 10 + i)],
                                  stdout=subprocess.PIPE, env=env) for i in range(2)]
        for p in procs:
            assert p.stdout.readline() == b"ready\n"
        time.sleep(0.3 + 0.1 * round_)
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
            p.stdout.close()
    cache = BlockCache(cache_dir, cap, BS)
    entries = cache.scan()
    assert entries, "the writers should have cached something"
    for e in entries:  # every complete block file holds the right bytes
        with open(e.path, "rb") as f:
            content = f.read()
        if len(content) == BS:
            assert content == data[e.index * BS : (e.index + 1) * BS]
    src = CachedSource(BytesSource(data), cache, "sha256:" + "c" * 64)
    for i in range(64):
        assert src.read(i * BS, BS) == data[i * BS : (i + 1) * BS]
    cache.prune()
    assert os.listdir(os.path.join(cache_dir, "tmp")) == []
    assert sum(e.size for e in cache.scan()) <= cap


def _obd(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_obd_cache_ls_prune_clear(tmp_path, capsys):
    cache_dir = tmp_path / "cache"
    cache = BlockCache(cache_dir, 64 << 20, BS)
    CachedSource(BytesSource(blob(3 * BS, 14)), cache, DIGEST_A).read(0, 3 * BS)
    CachedSource(BytesSource(blob(2 * BS, 15)), cache, DIGEST_B).read(0, 2 * BS)

    rc, out, _ = _obd(capsys, "cache", "ls", "--json", "--cache-dir", str(cache_dir))
    assert rc == 0
    doc = json.loads(out)
    by_digest = {b["digest"]: b for b in doc["blobs"]}
    assert by_digest[DIGEST_A]["blocks"] == 3 and by_digest[DIGEST_A]["bytes"] == 3 * BS
    assert by_digest[DIGEST_B]["bytes"] == 2 * BS
    assert doc["usage"] == 5 * BS

    rc, out, _ = _obd(capsys, "cache", "ls", "--cache-dir", str(cache_dir))
    assert rc == 0 and DIGEST_A in out and "320.0 KiB" in out

    rc, out, _ = _obd(capsys, "cache", "prune", "--max-size", "128K", "--cache-dir", str(cache_dir))
    assert rc == 0 and out.startswith("freed ")
    assert sum(e.size for e in cache.scan()) <= 128 * 1024

    rc, out, _ = _obd(capsys, "cache", "clear", DIGEST_A, "--cache-dir", str(cache_dir))
    assert rc == 0
    assert all(e.digest != DIGEST_A for e in cache.scan())

    record = cache_dir / "layout-verified.json"  # local-layout blobs already hashed (image/oci_layout.py)
    record.write_text("{}")
    rc, out, _ = _obd(capsys, "cache", "clear", "--cache-dir", str(cache_dir))
    assert rc == 0 and cache.scan() == [] and not record.exists()


def test_obd_cache_rejects_bad_arguments(tmp_path, capsys):
    rc, _, err = _obd(capsys, "cache", "prune", "--max-size", "lots", "--cache-dir", str(tmp_path))
    assert rc == 2 and err == "obd: invalid size 'lots' (examples: 500M, 2G, 1048576)\n"
    rc, _, err = _obd(capsys, "cache", "clear", "sha256:xyz", "--cache-dir", str(tmp_path))
    assert rc == 2 and err.startswith("obd: invalid digest") and err.count("\n") == 1


def test_concurrent_misses_of_one_block_fetch_it_once(tmp_path):
    data = blob(4 * BS, 16)

    class Slow(BytesSource):
        def read(self, offset, length):
            time.sleep(0.2)
            return super().read(offset, length)

    base = CountingSource(Slow(data))
    src = CachedSource(base, BlockCache(tmp_path / "cache", 64 << 20, BS), DIGEST_A)
    results = {}

    def worker(i):
        results[i] = src.read(BS + i * 100, 4096)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == data[BS + i * 100 : BS + i * 100 + 4096] for i in range(6))
    assert base.calls == 1 and base.bytes_read == BS


def test_invalidated_range_is_fetched_again(tmp_path):
    data = blob(4 * BS, 17)
    cache, base, src = cached(tmp_path, data)
    src.read(0, 4 * BS)
    with open(cache.block_path(DIGEST_A, 2), "r+b") as f:
        f.write(b"\xff" * 16)  # bytes a checksum above the cache would reject
    assert src.read(2 * BS, 16) == b"\xff" * 16
    src.invalidate(2 * BS + 10, 100)
    assert src.read(2 * BS, 16) == data[2 * BS : 2 * BS + 16]
    assert base.bytes_read == 5 * BS
    assert cache.usage() == 4 * BS


def test_sequential_reads_grow_a_readahead_window_random_reads_do_not(tmp_path):
    data = blob(64 * BS, 18)
    _cache, base, src = cached(tmp_path, data)
    for off in range(0, len(data), 16 * 1024):
        assert src.read(off, 16 * 1024) == data[off : off + 16 * 1024]
    # 64 blocks in windows of 1, 1, then 2+2, 4+4, 8+8, 16+16 ... instead of 64 requests
    assert base.calls <= 10 and base.bytes_read == len(data)

    _cache2, base2, rnd = cached(tmp_path / "r", data)
    rng = random.Random(19)
    blocks = rng.sample(range(64), 20)
    for b in blocks:
        rnd.read(b * BS + 100, 10)
    assert base2.bytes_read == 20 * BS


def test_unwritable_cache_still_reads_correctly(tmp_path, caplog):
    data = blob(3 * BS, 20)
    cache, base, src = cached(tmp_path, data)
    tmp_dir = tmp_path / "cache" / "tmp"
    tmp_dir.rmdir()
    tmp_dir.write_bytes(b"")  # a file where the temp directory should be (root ignores modes)
    assert src.read(10, 2 * BS) == data[10 : 10 + 2 * BS]
    assert src.read(10, 100) == data[10:110]
    assert base.calls == 2 and cache.scan() == []
    assert caplog.text.count("cannot store blocks") == 1


def test_obd_cache_prune_defaults_to_the_configured_cap(tmp_path, capsys, monkeypatch):
    cache_dir = tmp_path / "cache"
    cfg = tmp_path / "obd.json"
    cfg.write_text(json.dumps({"cache": {"dir": str(cache_dir), "sizeGB": 4 * BS / (1 << 30), "blockSize": BS}}))
    monkeypatch.setenv("OBD_CONFIG", str(cfg))
    big = BlockCache(cache_dir, 64 << 20, BS)  # filled by a process that had a larger cap
    CachedSource(BytesSource(blob(10 * BS, 21)), big, DIGEST_A).read(0, 10 * BS)
    rc, out, _ = _obd(capsys, "cache", "prune")
    assert rc == 0 and out.startswith("freed ")
    assert sum(e.size for e in big.scan()) <= 4 * BS
    rc, out, _ = _obd(capsys, "cache", "ls", "--json")
    doc = json.loads(out)
    assert doc["dir"] == str(cache_dir) and doc["capacity"] == 4 * BS and doc["usage"] <= 4 * BS


def test_zfile_crc_mismatch_in_a_cached_block_is_refetched(tmp_path, vectors):
    """A cached block whose bytes went bad is dropped and fetched again, not served forever."""
    import hashlib

    from tcmu_overlaybd.block.source import BytesSource, CountingSource
    from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource, background_fetches
    from tcmu_overlaybd.format.tarwrap import unwrap
    from tcmu_overlaybd.format.zfile import ZFileReader

    name = "sha256_022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
    blob = (vectors / "aci-hello-world" / name).read_bytes()
    key = "sha256:" + name[7:]
    lsmt_sha256 = "39195424aa10572fe002262190877b4306a66be9c62c8f1594141b01dc79c2ea"  # EXPECTED.json
    origin = CountingSource(BytesSource(blob, name=key))
    cache = BlockCache(str(tmp_path / "cache"), 64 << 20, 64 * 1024)

    def decompressed() -> str:
        zf = ZFileReader(unwrap(CachedSource(origin, cache, key)))
        return hashlib.sha256(zf.read(0, zf.size)).hexdigest()

    assert decompressed() == lsmt_sha256
    fetched = origin.bytes_read
    # flip bytes inside the cached blocks that hold only compressed data (block 0 has the
    # headers, the last ones the jump table and trailer): same length, so only CRCs can tell
    for idx in range(1, 8):
        with open(cache.block_path(key, idx), "r+b") as f:
            f.seek(cache.block_size // 2)
            b = f.read(64)
            f.seek(cache.block_size // 2)
            f.write(bytes(x ^ 0xFF for x in b))
    assert decompressed() == lsmt_sha256
    assert origin.bytes_read - fetched >= 7 * cache.block_size  # the bad blocks came again


# ---- parallel range requests (io.parallelFetches) ---------------------------------------------

class ShapedSource:
    """A remote blob over one TCP stream per request: ``rtt`` per request, then ``rate`` bytes/s.

    Records each request's (offset, length) and the most requests ever in flight at once."""

    def __init__(self, data: bytes, rtt: float, rate: float, name: str = "shaped"):
        self.data, self.rtt, self.rate, self.name, self.size = data, rtt, rate, name, len(data)
        self.requests: list[tuple[int, int]] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        with self._lock:
            self.requests.append((offset, length))
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.rtt + length / self.rate)
        with self._lock:
            self.in_flight -= 1
        return self.data[offset : offset + length]

    def close(self) -> None:
        pass


def test_split_runs_halves_the_longest_run_up_to_the_limit():
    from tcmu_overlaybd.cache.blockcache import split_runs

    assert split_runs([list(range(8))], 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert split_runs([[0], [2, 3, 4, 5, 6, 7]], 3) == [[0], [2, 3, 4], [5, 6, 7]]
    assert split_runs([[0], [2], [4], [6], [8]], 2) == [[0], [2], [4], [6], [8]]  # never merged
    assert split_runs([[5, 6, 7]], 1) == [[5, 6, 7]]
    assert split_runs([], 4) == []


@pytest.mark.parametrize("mib", [1, 8])
def test_cold_read_is_parallel_whole_block_requests_about_one_round_trip(tmp_path, mib):
    bs = 256 * 1024
    data = blob(mib << 20, 30 + mib)
    rtt, rate = 0.2, 8 << 20  # 200 ms per request, 8 MiB/s per stream
    base = ShapedSource(data, rtt, rate)
    src = CachedSource(base, BlockCache(tmp_path / "c", 64 << 20, bs), DIGEST_A, parallel=4)
    assert src.read(0, mib << 20) == data
    # whole-block pieces all in flight together: one round trip of wall time, not 4-32 serial
    # ones (the wall-time figures are in benchmarks/bench_cache.py)
    assert len(base.requests) == min(4, mib * 4) and base.max_in_flight == min(4, mib * 4)
    assert all(off % bs == 0 and n % bs == 0 for off, n in base.requests)
    assert sorted(base.requests) == [(i * len(data) // 4, len(data) // 4) for i in range(4)]
    base.requests.clear()
    assert src.read(0, mib << 20) == data and base.requests == []  # warm: no request


def test_fragmented_misses_go_out_concurrently_and_stay_merged(tmp_path):
    bs = 64 * 1024
    data = blob(16 * bs, 40)
    base = ShapedSource(data, 0.05, 1 << 30)
    src = CachedSource(base, BlockCache(tmp_path / "c", 64 << 20, bs), DIGEST_A, parallel=4)
    for i in (2, 5, 11):  # cached islands split blocks 0-15 into 4 runs
        src.read(i * bs, 1)
    base.requests.clear()
    base.max_in_flight = 0
    assert src.read(0, 16 * bs) == data
    assert sorted(base.requests) == [(0, 2 * bs), (3 * bs, 2 * bs), (6 * bs, 5 * bs), (12 * bs, 4 * bs)]
    assert base.max_in_flight == 4  # the 4 runs were in flight together, not 4 serial round trips


def test_concurrent_readers_share_blocks_in_flight_with_parallel_pieces(tmp_path):
    bs = 64 * 1024
    data = blob(32 * bs, 41)
    base = ShapedSource(data, 0.05, 1 << 30)
    src = CachedSource(base, BlockCache(tmp_path / "c", 64 << 20, bs), DIGEST_A, parallel=4)
    out: list[bytes] = []
    threads = [threading.Thread(target=lambda: out.append(src.read(0, 32 * bs))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [data] * 6
    assert sum(n for _o, n in base.requests) == len(data)  # every block fetched exactly once


def test_a_failing_piece_fails_the_read_and_stores_the_other_pieces(tmp_path):
    bs = 64 * 1024
    data = blob(8 * bs, 42)

    class Flaky(ShapedSource):
        def read(self, offset, length):
            if offset == 4 * bs:
                raise CorruptDataError("boom", blob=self.name, offset=offset)
            return super().read(offset, length)

    base = Flaky(data, 0.01, 1 << 30)
    cache = BlockCache(tmp_path / "c", 64 << 20, bs)
    src = CachedSource(base, cache, DIGEST_A, parallel=4)
    with pytest.raises(CorruptDataError, match="boom"):
        src.read(0, 8 * bs)
    assert sorted(e.index for e in cache.scan()) == [0, 1, 2, 3, 6, 7]
    assert not cache._inflight  # nothing left claimed: a retry fetches the failed blocks


def _zfile_layer_blob(vsize: int, content: bytes) -> bytes:
    """A native overlaybd layer blob (tar → ZFile lz4 → sealed LSMT) holding ``content`` at 0."""
    import io

    from tcmu_overlaybd.block.source import BytesSource as _B
    from tcmu_overlaybd.format import lsmt, tarwrap, zfile

    b = lsmt.SealedLayerBuilder(vsize)
    b.add_data(0, content)
    raw = io.BytesIO()
    b.finish(raw)
    z = io.BytesIO()
    size = zfile.compress_source(_B(raw.getvalue()), z, "lz4", 4096)
    z.seek(0)
    out = io.BytesIO()
    tarwrap.wrap(z, out, size)
    return out.getvalue()


def test_cold_1mib_read_of_a_zfile_layer_is_one_parallel_round_trip(tmp_path):
    """LSMT → ZFile → tar → cache: a cold 1 MiB device read becomes a few concurrent whole-block
    Range requests (ZFile asks for all its missing compressed blocks at once), not 256 serial ones."""
    from tcmu_overlaybd.block.stack import StackedDisk
    from tcmu_overlaybd.format.layer import open_layer_blob

    rng = random.Random(43)
    content = b"".join(rng.randbytes(2048) + bytes(2048) for _ in range(8 << 8))  # 8 MiB, ~50% lz4
    layer_blob = _zfile_layer_blob(64 << 20, content)
    rtt = 0.1
    base = ShapedSource(layer_blob, rtt, 64 << 20, name="sha256:layer")
    disk = StackedDisk([open_layer_blob(CachedSource(base, BlockCache(tmp_path / "c", 64 << 20, 64 * 1024),
                                                     DIGEST_A, parallel=4))])
    base.requests.clear()
    base.max_in_flight = 0
    assert disk.read(3 << 20, 1 << 20) == content[3 << 20 : 4 << 20]
    assert 2 <= len(base.requests) <= 5 and base.max_in_flight >= 2  # concurrent, not serial


@pytest.mark.registry
def test_parallel_pieces_from_many_threads_through_one_registry_client(tmp_path):
    """The registry client (one requests.Session, its auth and counters) serves concurrent Range
    GETs: 8 readers of cold 1 MiB ranges, 4 pieces each, get exactly the blob's bytes."""
    import hashlib

    from tcmu_overlaybd.image.options import OpenOptions
    from tcmu_overlaybd.image.push import push_blob
    from tcmu_overlaybd.image.registry import RegistryClient, RemoteBlob

    from .helpers.registry import RegistryServer, registry_available

    if not registry_available():
        pytest.skip("needs Debian's docker-registry")
    data = blob(24 << 20, 50)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    reg = RegistryServer(str(tmp_path / "registry"))
    try:
        client = RegistryClient(reg.host, OpenOptions(plain_http=True, quiet=True))
        push_blob(client, "par", data, digest, len(data))
        sent = client.requests_sent
        src = CachedSource(RemoteBlob(client, "par", digest, len(data)),
                           BlockCache(tmp_path / "c", 1 << 30, 256 * 1024), digest, parallel=4)
        rng = random.Random(51)
        offsets = [rng.randrange(0, len(data) - (1 << 20)) for _ in range(24)]
        errors: list = []

        def reader(mine):
            try:
                for off in mine:
                    assert src.read(off, 1 << 20) == data[off : off + (1 << 20)]
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=reader, args=(offsets[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert src.read(0, len(data)) == data
        assert client.bytes_received == len(data)  # every block fetched once, whatever the races
        assert client.requests_sent - sent == src.cache.counters.fetch_requests
    finally:
        reg.stop()


# ---- non-blocking reads (the handler's ring thread) and stored runs -------------------------

def test_read_cached_serves_cached_blocks_only_and_never_fetches(tmp_path):
    data = blob(3 * BS + 100, 11)
    cache, base, src = cached(tmp_path, data)
    assert src.read_cached(100, 4096) is None  # cold: nothing fetched for it
    assert base.calls == 0
    assert src.read(0, BS + 10) == data[: BS + 10]  # blocks 0 and 1 now cached
    calls = base.calls
    assert src.read_cached(100, 4096) == data[100:4196]
    assert src.read_cached(BS - 10, 30) == data[BS - 10 : BS + 20]  # across two cached blocks
    assert src.read_cached(2 * BS - 10, 30) is None  # block 2 is not cached
    assert src.read_cached(len(data), 10) == b""
    assert base.calls == calls
    assert cache.stats()["misses"] == 2


def test_a_fetched_run_is_stored_whole_and_charged_once(tmp_path):
    data = blob(6 * BS, 12)
    cache, base, src = cached(tmp_path, data)
    assert src.read(0, 6 * BS) == data  # one request of six blocks
    assert base.calls == 1 and cache.usage() == 6 * BS
    assert all(os.path.getsize(cache.block_path(DIGEST_A, i)) == BS for i in range(6))
    assert not os.listdir(tmp_path / "cache" / "tmp")


def test_a_run_larger_than_the_cap_keeps_usage_under_it(tmp_path):
    data = blob(8 * BS, 13)
    cache, base, src = cached(tmp_path, data, cap=3 * BS)
    assert src.read(0, 8 * BS) == data
    assert base.calls == 1 and cache.usage() <= 3 * BS
    assert sum(e.size for e in cache.scan()) == cache.usage()
    assert os.path.exists(cache.block_path(DIGEST_A, 7))  # the newest block is kept


def test_a_blob_evicted_to_its_directory_is_stored_again(tmp_path):
    data_a, data_b = blob(2 * BS, 14), blob(2 * BS, 15)
    cache, base_a, src_a = cached(tmp_path, data_a, cap=2 * BS)
    src_b = CachedSource(BytesSource(data_b, name=DIGEST_B), cache, DIGEST_B)
    assert src_a.read(0, 2 * BS) == data_a
    assert src_b.read(0, 2 * BS) == data_b  # evicts every block of A, and A's directory
    assert not os.path.exists(os.path.dirname(cache.block_path(DIGEST_A, 0)))
    assert src_a.read(0, BS) == data_a[:BS]
    assert os.path.getsize(cache.block_path(DIGEST_A, 0)) == BS
    assert cache.usage() <= 2 * BS


def test_background_fetches_send_one_request_per_run_foreground_reads_split_it(tmp_path):
    """A replay or whole-image download runs many fetches at once already: cutting each run of
    missing blocks into ``parallel`` requests would only cost the registry more requests."""
    data = blob(16 * BS, 7)
    cache, base, back = cached(tmp_path / "a", data, parallel=4)
    with background_fetches():
        back.fetch_range(0, 8 * BS)
        assert back.read(8 * BS, 8 * BS) == data[8 * BS:]
    assert (base.calls, cache.counters.fetch_requests) == (2, 2)
    cache, base, fore = cached(tmp_path / "b", data, parallel=4)
    assert fore.read(0, 8 * BS) == data[: 8 * BS]
    assert base.calls == 4  # a device read waits: four concurrent requests
