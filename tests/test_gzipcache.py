"""Gzip cache (spec §4.5): refill units, hits vs source bytes, cap + LRU, crash safety, privacy."""

from __future__ import annotations

import gzip
import os
import random
import stat

from tcmu_overlaybd.block.source import BytesSource, CountingSource, FileSource
from tcmu_overlaybd.cache.gzipcache import PAGE, PAGE_ENTRY, SIDECAR_SUFFIX, GzipCache, entry_offset
from tcmu_overlaybd.format.gzindex import GzipIndex, GzipIndexedSource

LAYER0 = "571e1a65fc028b27eef187aacb31f98c45aaec82a8f24b0e9bce1f658d7d94c1"
MiB = 1 << 20
DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64
DIGEST_C = "sha256:" + "c" * 64


def _data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def test_refill_unit_then_hits(tmp_path):
    data = _data(5 * MiB + 1234, 1)
    src = CountingSource(BytesSource(data, DIGEST_A))
    view = GzipCache(tmp_path / "gz").open(DIGEST_A, src)
    assert view.read(100, 4096) == data[100:4196]
    assert src.bytes_read == MiB  # one aligned refill unit
    for off in range(0, MiB - 5000, 70001):  # the rest of that MiB is served from disk
        assert view.read(off, 5000) == data[off : off + 5000]
    assert src.bytes_read == MiB
    assert view.bytes_from_source == MiB and view.bytes_from_cache == 15 * 5000  # the first read was a miss
    # a read across a unit boundary fetches just the missing unit; the tail unit is short
    assert view.read(MiB - 10, 20) == data[MiB - 10 : MiB + 10]
    assert view.read(len(data) - 100, 1000) == data[-100:]
    assert src.bytes_read == 2 * MiB + 1234
    # the cache file sits at tar offsets, named by the digest
    with open(tmp_path / "gz" / DIGEST_A, "rb") as f:
        f.seek(5 * MiB)
        assert f.read() == data[5 * MiB :]


def test_survives_reopen_and_serves_from_disk(tmp_path):
    data = _data(3 * MiB, 2)
    first = GzipCache(tmp_path / "gz").open(DIGEST_A, BytesSource(data, DIGEST_A))
    first.read(0, 3 * MiB)
    first.close()
    src = CountingSource(BytesSource(data, DIGEST_A))
    again = GzipCache(tmp_path / "gz").open(DIGEST_A, src)
    assert again.read(12345, 2 * MiB) == data[12345 : 12345 + 2 * MiB]
    assert src.bytes_read == 0 and again.bytes_from_cache == 2 * MiB


def _damage(path, offset, new: bytes):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, new, offset)
    finally:
        os.close(fd)


def test_a_damaged_or_unwritten_page_is_never_served(tmp_path):
    data = _data(2 * MiB, 3)
    pool = GzipCache(tmp_path / "gz")
    pool.open(DIGEST_A, BytesSource(data, DIGEST_A)).read(0, 2 * MiB)
    path = str(tmp_path / "gz" / DIGEST_A)
    # 1) torn/garbled data page (entry says present, bytes differ)
    _damage(path, 3 * PAGE + 17, b"\xff\xfe")
    # 2) a crash after the data write but before the entry: entry missing
    _damage(path + SIDECAR_SUFFIX, entry_offset(300), bytes(PAGE_ENTRY.size))
    # 3) an entry that outlived its data (data file truncated under it)
    os.truncate(path, MiB + 5 * PAGE)
    src = CountingSource(BytesSource(data, DIGEST_A))
    view = pool.open(DIGEST_A, src)
    assert view.read(3 * PAGE, 100) == data[3 * PAGE : 3 * PAGE + 100]
    assert view.read(300 * PAGE, 10) == data[300 * PAGE : 300 * PAGE + 10]
    assert view.read(MiB + 6 * PAGE, PAGE) == data[MiB + 6 * PAGE : MiB + 7 * PAGE]
    assert src.bytes_read == 2 * MiB  # each bad page refetched its unit
    assert view.read(0, 2 * MiB) == data  # and now everything is whole again
    assert src.bytes_read == 2 * MiB


def test_cap_is_respected_with_lru_eviction(tmp_path):
    cap = 5 * MiB
    pool = GzipCache(tmp_path / "gz", capacity_gb=cap / (1 << 30))
    layers = {d: _data(3 * MiB, i) for i, d in enumerate((DIGEST_A, DIGEST_B, DIGEST_C))}
    a = pool.open(DIGEST_A, BytesSource(layers[DIGEST_A], DIGEST_A))
    a.read(0, 2 * MiB)
    os.utime(a.path, (1_000_000, 1_000_000))  # A used long ago
    b = pool.open(DIGEST_B, BytesSource(layers[DIGEST_B], DIGEST_B))
    b.read(0, 2 * MiB)
    os.utime(b.path, (2_000_000, 2_000_000))
    assert pool.usage() > 4 * MiB
    c = pool.open(DIGEST_C, BytesSource(layers[DIGEST_C], DIGEST_C))
    c.read(0, 2 * MiB)  # 6 MiB > 5 MiB cap: the least recently used file (A) goes
    usage = {name: used for name, used, _ in pool.files()}
    assert pool.usage() <= cap
    assert usage[DIGEST_A] == 0 and usage[DIGEST_B] > 2 * MiB and usage[DIGEST_C] > 2 * MiB
    # A still reads correctly: its pages are simply fetched again
    src = CountingSource(BytesSource(layers[DIGEST_A], DIGEST_A))
    a2 = pool.open(DIGEST_A, src)
    assert a2.read(MiB, 10) == layers[DIGEST_A][MiB : MiB + 10] and src.bytes_read == MiB
    assert pool.usage() <= cap


def test_a_layer_larger_than_the_cap_still_reads_correctly(tmp_path):
    data = _data(6 * MiB, 9)
    pool = GzipCache(tmp_path / "gz", capacity_gb=2 * MiB / (1 << 30))
    view = pool.open(DIGEST_A, BytesSource(data, DIGEST_A))
    for off in range(0, 6 * MiB, 512 * 1024):
        assert view.read(off, 1000) == data[off : off + 1000]
        assert pool.usage() <= 2 * MiB


def test_files_are_private(tmp_path):
    old = os.umask(0)
    try:
        pool = GzipCache(tmp_path / "gz")
        view = pool.open("/some/local/path.tar.gz", BytesSource(b"x" * 10000, "p"))
        view.read(0, 10)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "gz").st_mode) == 0o700
    for name in os.listdir(tmp_path / "gz"):
        assert stat.S_IMODE(os.stat(tmp_path / "gz" / name).st_mode) == 0o600
    assert os.path.basename(view.path).startswith("key-")  # non-digest keys are hashed


def test_clear_frees_everything(tmp_path):
    pool = GzipCache(tmp_path / "gz")
    pool.open(DIGEST_A, BytesSource(_data(MiB, 4), DIGEST_A)).read(0, 10)
    assert pool.usage() >= MiB
    assert pool.clear() >= MiB
    assert pool.usage() == 0 and os.listdir(tmp_path / "gz") == []


def test_through_the_gzip_index(tmp_path, vectors):
    root = vectors / "upstream-small"
    blob = root / "original" / "blobs" / "sha256" / LAYER0
    tar = gzip.decompress(blob.read_bytes())
    idx = GzipIndex.from_bytes((root / "turbooci" / "layer0" / "gzip.meta").read_bytes())
    gz = CountingSource(FileSource(blob, name="sha256:" + LAYER0))
    pool = GzipCache(tmp_path / "gz")
    src = GzipIndexedSource(gz, idx, cache=pool)
    rnd = random.Random(5)
    offsets = [rnd.randrange(len(tar) - 4096) for _ in range(300)]
    for off in offsets:
        assert src.read(off, 4096) == tar[off : off + 4096]
    view = src.cached_view
    # every refill unit was inflated once, then all further reads were hits
    assert view.bytes_from_source == len(tar) and gz.bytes_read < 2 * len(blob.read_bytes())
    gz_before, hits_before = gz.bytes_read, view.bytes_from_cache
    for off in offsets:
        assert src.read(off, 4096) == tar[off : off + 4096]
    assert gz.bytes_read == gz_before  # not one compressed byte more
    assert view.bytes_from_cache - hits_before == 300 * 4096
    assert os.path.exists(tmp_path / "gz" / ("sha256:" + LAYER0))
    src.close()


class _SlowSource(BytesSource):
    """Slow enough that concurrent readers overlap in the same refill."""

    def read(self, offset, length):
        import time

        time.sleep(0.05)
        return super().read(offset, length)


def test_concurrent_readers_of_one_unit_share_one_refill(tmp_path):
    import threading

    data = _data(2 * MiB, 11)
    src = CountingSource(_SlowSource(data, DIGEST_A))
    view = GzipCache(tmp_path / "gz").open(DIGEST_A, src)
    results = {}

    def reader(i):
        off = i * 64 * 1024 + 100
        results[i] = view.read(off, 8192) == data[off : off + 8192]

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]  # all inside unit 0
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results.values()) and len(results) == 8
    assert src.bytes_read == MiB and src.calls == 1


_CHILD = """
import random, sys
sys.path.insert(0, {root!r})
from tcmu_overlaybd.block.source import BytesSource
from tcmu_overlaybd.cache.gzipcache import GzipCache
data = random.Random(12).randbytes(8 << 20)
view = GzipCache({dir!r}, refill_size=256 * 1024).open({key!r}, BytesSource(data, "x"))
rnd = random.Random({seed})
print("ready", flush=True)
while True:
    off = rnd.randrange(len(data))
    assert view.read(off, 70000) == data[off:off + 70000]
"""


def test_sigkilled_writers_never_leave_servable_bad_pages(tmp_path):
    import pathlib
    import signal
    import subprocess
    import sys
    import time

    root = str(pathlib.Path(__file__).resolve().parent.parent)
    cache_dir = str(tmp_path / "gz")
    data = random.Random(12).randbytes(8 << 20)
    for seed in range(4):
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD.format(root=root, dir=cache_dir, key=DIGEST_A, seed=seed)],
            stdout=subprocess.PIPE,
        )
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(0.05 + 0.03 * seed)
        child.send_signal(signal.SIGKILL)
        child.wait()
    # a torn write from the last kill would be a page whose entry or data is partial
    src = CountingSource(BytesSource(data, DIGEST_A))
    view = GzipCache(cache_dir, refill_size=256 * 1024).open(DIGEST_A, src)
    assert view.read(0, len(data)) == data
    assert view.bytes_from_cache > 0 and src.bytes_read < len(data)  # the killed writers' pages were reused


def test_cache_files_are_named_by_digest():
    hexd = "ab" * 32
    assert GzipCache.file_name("sha256:" + hexd) == "sha256:" + hexd
    assert GzipCache.file_name("registry.local:5000/library/app@sha256:" + hexd) == "sha256:" + hexd
    assert GzipCache.file_name("/var/lib/images/oci/blobs/sha256/" + hexd) == "sha256:" + hexd
    other = GzipCache.file_name("/tmp/layer.tar.gz")
    assert other.startswith("key-") and "/" not in other


def test_prune_and_clear_one_digest(tmp_path):
    pool = GzipCache(tmp_path / "gz")
    for i, d in enumerate((DIGEST_A, DIGEST_B, DIGEST_C)):
        view = pool.open(d, BytesSource(_data(2 * MiB, i), d))
        view.read(0, 2 * MiB)
        os.utime(view.path, (1_000_000 * (i + 1),) * 2)  # A oldest, C newest
    assert pool.prune() == 0  # under the 4 GiB default cap: nothing to do
    freed = pool.prune(4 * MiB + 100_000)
    usage = {name: used for name, used, _ in pool.files()}
    assert freed >= 2 * MiB and usage[DIGEST_A] == 0 and usage[DIGEST_C] >= 2 * MiB
    assert pool.usage() <= 4 * MiB + 100_000
    assert pool.clear(DIGEST_B) >= 2 * MiB
    assert sorted(name for name, _, _ in pool.files()) == sorted([DIGEST_A, DIGEST_C])


def test_only_layers_known_by_digest_are_cached(tmp_path):
    # a path may later hold another gzip: like upstream (targetDigest), no digest, no cache
    from tcmu_overlaybd.format.gzindex import build_gzip_index

    pool = GzipCache(tmp_path / "gz")
    path = tmp_path / "layer.tar.gz"
    for seed in (1, 2):  # same sizes, same (all-zero) first window: only the bytes differ
        plain = _data(300_000, seed)
        path.write_bytes(gzip.compress(plain, mtime=0))
        idx = GzipIndex.from_bytes(build_gzip_index(FileSource(path)))
        src = GzipIndexedSource(FileSource(path), idx, cache=pool)
        assert src.cached_view is None
        assert src.read(1000, 5000) == plain[1000:6000]
        keyed = GzipIndexedSource(FileSource(path), idx, cache=pool, cache_key=f"sha256:{seed:064x}")
        assert keyed.read(1000, 5000) == plain[1000:6000] and keyed.cached_view.bytes_from_source > 0
    assert sorted(n for n, _, _ in pool.files()) == [f"sha256:{1:064x}", f"sha256:{2:064x}"]


def test_two_handlers_sharing_a_pool_keep_it_near_the_cap(tmp_path):
    # two processes = two GzipCache objects on one directory, each seeing only its own writes
    cap = 8 * MiB
    pools = [GzipCache(tmp_path / "gz", capacity_gb=cap / (1 << 30)) for _ in range(2)]
    digests = [f"sha256:{i:064x}" for i in range(1, 9)]
    for i, d in enumerate(digests):
        view = pools[i % 2].open(d, BytesSource(_data(2 * MiB, i), d))
        view.read(0, 2 * MiB)
        os.utime(view.path, (1_000_000 + i, 1_000_000 + i))
        assert pools[0].usage() <= cap + cap // 16 + MiB  # overshoot bounded by one rescan interval
    usage = {name: used for name, used, _ in pools[0].files()}
    assert usage[digests[0]] == 0 and usage[digests[-1]] >= 2 * MiB  # LRU across both writers


def test_an_unusable_cache_directory_means_uncached_reads(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    assert GzipCache.try_open(blocker / "gz") is None
    assert "gzip cache disabled" in caplog.text
    pool = GzipCache(tmp_path / "gz")
    os.mkdir(tmp_path / "gz" / DIGEST_A)  # a directory squats the layer's cache file name
    blob = gzip.compress(_data(100_000, 3), mtime=0)
    from tcmu_overlaybd.format.gzindex import build_gzip_index

    idx = GzipIndex.from_bytes(build_gzip_index(BytesSource(blob)))
    src = GzipIndexedSource(BytesSource(blob, DIGEST_A), idx, cache=pool)
    assert src.cached_view is None and "without the gzip cache" in caplog.text
    assert src.read(10, 100) == gzip.decompress(blob)[10:110]


def test_obd_cache_commands_cover_the_gzip_cache(tmp_path, capsys):
    """`obd cache ls/prune/clear` list and free decompressed gzip layers too."""
    import json

    from tcmu_overlaybd.block.source import BytesSource
    from tcmu_overlaybd.cache.gzipcache import GzipCache
    from tcmu_overlaybd.cli.main import main

    gz_dir, blocks_dir = tmp_path / "gz", tmp_path / "blocks"
    pool = GzipCache(gz_dir, capacity_gb=1, refill_size=64 * 1024)
    digests = ["sha256:" + c * 64 for c in "de"]
    for i, d in enumerate(digests):
        view = pool.open(d, BytesSource(bytes([i + 1]) * (256 * 1024), name=d))
        assert view.read(0, 200 * 1024) == bytes([i + 1]) * (200 * 1024)
    args = ["--cache-dir", str(blocks_dir), "--gzip-cache-dir", str(gz_dir)]

    assert main(["cache", "ls", "--json", *args]) == 0
    doc = json.loads(capsys.readouterr().out)
    layers = {r["digest"]: r for r in doc["gzip"]["layers"]}
    assert set(layers) == set(digests) and all(r["bytes"] >= 200 * 1024 for r in layers.values())

    assert main(["cache", "clear", digests[0], *args]) == 0
    capsys.readouterr()
    assert [name for name, _, _ in pool.files()] == [digests[1]]

    assert main(["cache", "prune", "--max-size", "0", *args]) == 0
    assert "gz" in capsys.readouterr().out
    assert pool.usage() == 0


def test_a_read_across_units_fetches_them_in_one_source_read(tmp_path):
    data = _data(4 * MiB, 21)
    src = CountingSource(BytesSource(data, DIGEST_A))
    view = GzipCache(tmp_path / "gz").open(DIGEST_A, src)
    assert view.read(MiB - 100, 2 * MiB) == data[MiB - 100 : 3 * MiB - 100]
    assert (src.calls, src.bytes_read, view.refills) == (1, 3 * MiB, 3)
    # a read over cached, missing and cached units: one read for the missing one only
    view.read(3 * MiB + 5, 10)
    src.calls = src.bytes_read = 0
    assert view.read(0, 4 * MiB) == data
    assert (src.calls, src.bytes_read) == (0, 0)


def test_pool_stats_sum_its_views_and_keep_closed_ones(tmp_path, vectors):
    root = vectors / "upstream-small"
    blob = root / "original" / "blobs" / "sha256" / LAYER0
    tar = gzip.decompress(blob.read_bytes())
    idx = GzipIndex.from_bytes((root / "turbooci" / "layer0" / "gzip.meta").read_bytes())
    pool = GzipCache(tmp_path / "gz")
    gz = CountingSource(FileSource(blob, name="sha256:" + LAYER0))
    src = GzipIndexedSource(gz, idx, cache=pool)
    other = pool.open(DIGEST_A, BytesSource(_data(MiB, 3), DIGEST_A))
    assert src.read(2 * MiB + 10, 4096) == tar[2 * MiB + 10 : 2 * MiB + 4106]  # miss: unit 2 refilled
    assert src.read(2 * MiB + 9000, 4096) == tar[2 * MiB + 9000 : 2 * MiB + 13096]  # hit
    other.read(0, 100)  # a miss of the other layer
    stats = pool.stats()
    assert {k: stats[k] for k in ("hits", "misses", "refills", "bytes_from_cache", "bytes_from_source",
                                  "layers", "spans_inflated", "continued", "compressed_reads")} == {
        "hits": 1, "misses": 2, "refills": 2, "bytes_from_cache": 4096, "bytes_from_source": 2 * MiB,
        "layers": 2, "spans_inflated": 1, "continued": 0, "compressed_reads": 1}
    # inflated from checkpoint 2 (below 2 MiB) through 3 MiB; the compressed bytes it read
    assert stats["bytes_inflated"] == 3 * MiB - 2059384 and stats["compressed_bytes"] == gz.bytes_read
    assert stats["capacity_bytes"] == 4 << 30 and stats["usage_bytes"] >= 2 * MiB
    src.close()
    other.close()
    after = pool.stats()
    assert after["layers"] == 0 and {k: after[k] for k in ("hits", "misses", "refills")} == {
        "hits": 1, "misses": 2, "refills": 2}


def test_pages_evicted_under_a_live_view_are_fetched_again(tmp_path):
    """Another handler's eviction truncates the files this view has open (and has checked):
    their pages read as misses and come back from the source, never as zeros."""
    data = _data(3 * MiB, 31)
    pool = GzipCache(tmp_path / "gz")
    src = CountingSource(BytesSource(data, DIGEST_A))
    view = pool.open(DIGEST_A, src)
    assert view.read(0, 3 * MiB) == data and view.read(5, 100) == data[5:105]
    assert pool.prune(0) > 0  # what a handler over the cap does: truncate least recently used files
    assert os.path.getsize(view.path) == 0
    assert view.read(MiB + 5, 200_000) == data[MiB + 5 : MiB + 200_005]
    assert src.bytes_read == 4 * MiB
    # only the refilled unit is back; the others still miss, then hit
    assert view.read(0, 3 * MiB) == data and src.bytes_read == 6 * MiB
    hits = view.hits
    assert view.read(2 * MiB, MiB) == data[2 * MiB :] and (view.hits, src.bytes_read) == (hits + 1, 6 * MiB)
