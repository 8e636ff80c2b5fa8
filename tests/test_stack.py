"""The merged layer stack (spec §1.6) and raw export: upstream vectors and a per-sector model."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import subprocess
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_overlaybd.block.export import export_raw
from tcmu_overlaybd.block.source import BytesSource, FileSource
from tcmu_overlaybd.block.stack import StackedDisk
from tcmu_overlaybd.errors import UsageError
from tcmu_overlaybd.format import lsmt
from tcmu_overlaybd.format.layer import open_layer_blob

S = lsmt.SECTOR


@pytest.fixture(scope="module")
def small_stack(vectors):
    layers = [open_layer_blob(FileSource(vectors / f"upstream-small/overlaybd/layer{i}.commit"))
              for i in (0, 1)]
    return StackedDisk(layers)


@pytest.fixture(scope="module")
def small_raw(small_stack, tmp_path_factory):
    path = tmp_path_factory.mktemp("raw") / "disk.raw"
    seen = []
    written = export_raw(small_stack, path, progress=seen.append)
    assert seen and seen == sorted(seen)
    return path, written


def _tree(vectors) -> dict[str, tuple[int, str]]:
    files = {}
    for line in (vectors / "upstream-small/tree.txt").read_text().splitlines():
        parts = line.split()
        if parts and parts[0] == "file":
            files[parts[1][1:]] = (int(parts[2]), parts[3])
    return files


def test_upstream_stack_holds_the_upstream_tree(vectors, small_raw):
    path, _ = small_raw
    tree = _tree(vectors)
    for name in ("/data/a/f000.txt", "/data/b/new.txt", "/data/big.txt", "/etc/motd"):
        size, digest = tree[name]
        data = subprocess.run(["debugfs", "-R", f"cat {name}", str(path)], capture_output=True,
                              check=True).stdout
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), name
    listing = subprocess.run(["debugfs", "-R", "ls -l /data/a", str(path)], capture_output=True,
                             text=True, check=True).stdout
    assert "f002.txt" not in listing  # whiteout applied by layer 1


ORIGINAL_LAYERS = ["571e1a65fc028b27eef187aacb31f98c45aaec82a8f24b0e9bce1f658d7d94c1",
                   "ed5169527c7317edecd662ed75cada0b65adc02a4431825bccc713dcb0dd6c07"]


def _dump_and_compare(vectors, raw, tmp_path) -> int:
    """rdump the image's tree with debugfs and compare every file of tree.txt."""
    dest = tmp_path / "tree"
    dest.mkdir()
    for top in ("data", "etc"):
        subprocess.run(["debugfs", "-R", f"rdump /{top} {dest}", str(raw)], capture_output=True, check=True)
    tree = _tree(vectors)
    for name, (size, digest) in tree.items():
        data = (dest / name.lstrip("/")).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (size, digest), name
    return len(tree)


def test_native_stack_holds_every_file_of_the_tree(vectors, small_raw, tmp_path):
    assert _dump_and_compare(vectors, small_raw[0], tmp_path) == 83  # every regular file of tree.txt


def test_turbooci_warp_stack_holds_the_same_tree(vectors, tmp_path):
    layers = []
    for i, digest in enumerate(ORIGINAL_LAYERS):
        tar = gzip.decompress((vectors / "upstream-small/original/blobs/sha256" / digest).read_bytes())
        layers.append(open_layer_blob(FileSource(vectors / f"upstream-small/turbooci/layer{i}/ext4.fs.meta"),
                                      warp=True, targets={1: BytesSource(tar, name=f"layer{i}.tar")}))
    disk = StackedDisk(layers)
    raw = tmp_path / "turbo.raw"
    export_raw(disk, raw)
    assert _dump_and_compare(vectors, raw, tmp_path) == 83  # every regular file of tree.txt


def test_export_is_sparse_and_equals_stack_reads(small_stack, small_raw):
    path, written = small_raw
    st_ = os.stat(path)
    assert st_.st_size == small_stack.size == 64 << 30
    assert st_.st_blocks * 512 < 200 << 20  # a 64 GiB disk, ~77 MB of data
    with open(path, "rb") as f:
        for off, length, zeroed, _level in list(small_stack.extents())[:40]:
            f.seek(off)
            assert f.read(min(length, 1 << 20)) == small_stack.read(off, min(length, 1 << 20))
    assert written > 0


def test_upper_layer_wins_where_it_maps(small_stack):
    lower, upper = small_stack.layers
    for off, length, zeroed, level in small_stack.extents():
        assert level in (0, 1)
        probe = off + length // 2 // S * S
        want = (upper if level == 1 else lower).read(probe, 512)
        assert small_stack.read(probe, 512) == want
        assert small_stack.level_of(probe) == level


def _build(vsize: int, plan: list[tuple[str, int, int, int]]) -> bytes:
    b = lsmt.SealedLayerBuilder(vsize)
    for kind, sector, count, fill in sorted(plan, key=lambda p: p[1]):
        if kind == "d":
            b.add_data(sector * S, bytes([fill]) * (count * S))
        else:
            b.add_zeroed(sector * S, count * S)
    out = io.BytesIO()
    b.finish(out)
    return out.getvalue()


def _plans(draw_sectors: int):
    @st.composite
    def plan(draw):
        cuts = sorted(set(draw(st.lists(st.integers(0, draw_sectors), max_size=12))) | {0, draw_sectors})
        result = []
        for a, b in zip(cuts, cuts[1:]):
            kind = draw(st.sampled_from(["d", "d", "z", "hole"]))
            if kind != "hole":
                result.append((kind, a, b - a, draw(st.integers(1, 255))))
        return result
    return plan()


SECTORS = 200


@settings(max_examples=40, deadline=None)
@given(plans=st.lists(_plans(SECTORS), min_size=1, max_size=4),
       reads=st.lists(st.tuples(st.integers(0, SECTORS * S), st.integers(0, SECTORS * S)), max_size=6))
def test_stack_matches_a_per_sector_model(plans, reads):
    vsize = SECTORS * S
    model = bytearray(vsize)
    decided = [False] * SECTORS
    for plan in reversed(plans):  # top layer first
        for kind, sector, count, fill in plan:
            for s in range(sector, sector + count):
                if not decided[s]:
                    decided[s] = True
                    model[s * S : (s + 1) * S] = bytes([fill]) * S if kind == "d" else bytes(S)
    layers = [lsmt.LsmtFile.open(BytesSource(_build(vsize, p), name=f"l{i}")) for i, p in enumerate(plans)]
    disk = StackedDisk(layers)
    assert disk.read(0, vsize) == bytes(model)
    for off, n in reads:
        assert disk.read(off, n) == bytes(model[off : off + n])
    covered = sum(length for _o, length, _z, _l in disk.extents())
    assert covered == sum(decided) * S


def test_warp_layer_in_a_stack_is_read_through_its_own_index():
    target = BytesSource(bytes([7]) * 8192, name="layer.tar")
    w = lsmt.SealedLayerBuilder(1 << 20, warp=True)
    w.add_data(0, b"M" * 512)
    w.add_remote(4096, 4096, 1024)
    out = io.BytesIO()
    w.finish(out)
    warp = lsmt.LsmtFile.open(BytesSource(out.getvalue()), warp=True, targets={1: target})
    base = lsmt.LsmtFile.open(BytesSource(_build(1 << 20, [("d", 0, 40, 1)])))
    disk = StackedDisk([base, warp])
    got = disk.read(0, 40 * S)
    assert got[:512] == b"M" * 512
    assert got[512:4096] == bytes([1]) * 3584
    assert got[4096:8192] == bytes([7]) * 4096
    assert got[8192:] == bytes([1]) * (40 * S - 8192)


def test_vsize_comes_from_the_topmost_layer_with_one():
    a = lsmt.LsmtFile.open(BytesSource(_build(1 << 20, [("d", 0, 8, 1)])))
    b = lsmt.LsmtFile.open(BytesSource(_build(2 << 20, [("d", 8, 8, 2)])))
    c = lsmt.LsmtFile.open(BytesSource(_build(0, [])))
    assert StackedDisk([a, b, c]).size == 2 << 20
    assert StackedDisk([b, a]).size == 1 << 20
    with pytest.raises(UsageError):
        StackedDisk([])


def test_extents_coalesce_adjacent_segments_of_one_level():
    a = lsmt.LsmtFile.open(BytesSource(_build(1 << 20, [("d", 0, 100, 1), ("d", 100, 100, 2),
                                                          ("z", 300, 10, 0)])))
    b = lsmt.LsmtFile.open(BytesSource(_build(1 << 20, [("d", 50, 10, 3)])))
    assert list(StackedDisk([a, b]).extents()) == [
        (0, 50 * S, False, 0), (50 * S, 10 * S, False, 1), (60 * S, 140 * S, False, 0),
        (300 * S, 10 * S, True, 0)]


def test_concurrent_reads(small_stack):
    want = small_stack.read(0, 8 << 20)
    errors = []

    def worker(seed):
        for k in range(50):
            off = ((seed * 131 + k * 977) % 2000) * 4096
            if small_stack.read(off, 65536) != want[off : off + 65536]:
                errors.append(off)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_writable_layer_on_top_of_a_sealed_one(tmp_path):
    base = lsmt.LsmtFile.open(BytesSource(_build(1 << 20, [("d", 0, 64, 9)])))
    rw = lsmt.create_rw(tmp_path / "data", tmp_path / "index", 1 << 20)
    rw.pwrite(b"u" * 1024, 4096)
    rw.discard(16 * S, 8 * S)
    disk = StackedDisk([base, rw])
    got = disk.read(0, 64 * S)
    assert got == bytes([9]) * 4096 + b"u" * 1024 + bytes([9]) * (3 * 1024) + bytes(4096) + \
        bytes([9]) * (64 * S - 12288)
    rw.close()


HELLO_BLOB = "aci-hello-world/sha256_022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
HELLO_AT, HELLO_SIZE = 6356992, 13256  # the ``hello`` file's bytes on the layer's disk


def test_read_cached_serves_a_warm_block_cache_and_never_fetches(vectors, tmp_path):
    from tcmu_overlaybd.block.source import CountingSource
    from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource

    key = "sha256:" + HELLO_BLOB.rsplit("_", 1)[1]
    origin = CountingSource(FileSource(vectors / HELLO_BLOB, name=key))
    cache = BlockCache(tmp_path / "cache", 64 << 20, 4096)  # opening fetches a few blocks only
    disk = StackedDisk([open_layer_blob(CachedSource(origin, cache, key))])
    fetched = origin.calls
    assert disk.read_cached(HELLO_AT, HELLO_SIZE) is None  # cold: the caller must read()
    assert origin.calls == fetched
    hello = disk.read(HELLO_AT, HELLO_SIZE)
    assert hello[:4] == b"\x7fELF"
    again = StackedDisk([open_layer_blob(CachedSource(origin, cache, key))])  # a new process, say
    fetched = origin.calls
    assert again.read_cached(HELLO_AT, HELLO_SIZE) == hello
    assert again.read_cached(HELLO_AT + 4096, 512) == hello[4096:4608]
    hole = max(o + n for o, n, _z, _lvl in again.extents())  # past the last mapped byte
    assert again.read_cached(hole, 4096) is None  # zeros are read()'s job
    assert again.read(hole, 4096) == bytes(4096)
    assert origin.calls == fetched


def test_read_cached_is_none_for_levels_that_cannot_read_without_waiting(tmp_path):
    base = lsmt.LsmtFile.open(BytesSource(_build(1 << 20, [("d", 0, 64, 9)])))  # no cache below
    rw = lsmt.create_rw(tmp_path / "data", tmp_path / "index", 1 << 20)
    rw.pwrite(b"u" * 1024, 4096)
    disk = StackedDisk([base, rw])
    assert disk.read_cached(0, 4096) is None and disk.read_cached(4096, 1024) is None
    assert disk.read(0, 4096) == bytes([9]) * 4096 and disk.read(4096, 1024) == b"u" * 1024
    rw.close()


class _ShortLayer:
    """A layer whose data file ends before its one segment does (e.g. a blob cut short)."""

    warp = False
    name = "short.layer"
    vsize = 1 << 20

    def __init__(self):
        self.index = lsmt.SegmentIndex.empty()
        for col, v in zip((self.index.offsets, self.index.lengths, self.index.moffsets, self.index.zeroed,
                           self.index.tags), (0, 64, 8, 0, 0)):
            col.append(v)

    def read_mapped(self, tag: int, pos: int, n: int) -> bytes:
        return bytes(min(n, 1000))

    def close(self) -> None:
        pass


def test_a_segment_past_the_end_of_its_data_file_is_one_line_error():
    from tcmu_overlaybd.errors import CorruptDataError

    disk = StackedDisk([_ShortLayer()])
    with pytest.raises(CorruptDataError) as e:
        disk.read(512, 4096)
    assert str(e.value) == ("short.layer at offset 4608: segment at virtual byte 512 maps past the end of "
                            "its data file (wanted 4096 bytes at 4608, got 1000)")
