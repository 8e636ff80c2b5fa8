"""Block diffs between sparse images (convert.diff)."""

from __future__ import annotations

import hashlib
import os

from tcmu_overlaybd.convert.apply import MODE_MAP, apply_layer_file
from tcmu_overlaybd.convert.diff import Change, changed_extents, data_ranges, snapshot
from tcmu_overlaybd.convert.mkfs import make_ext4

from .helpers.oci_build import Entry, build_tar

MIB = 1 << 20


def _sparse(path, size, writes):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            f.seek(off)
            f.write(data)


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
    return h.hexdigest()


def test_changes_against_nothing_are_the_nonzero_blocks(tmp_path):
    img = str(tmp_path / "a")
    _sparse(img, 4 * MIB, [(8192, b"a" * 4096), (3 * MIB, b"\0" * 4096), (3 * MIB + 8192, b"x")])
    assert changed_extents(None, img) == [Change(8192, 4096, False), Change(3 * MIB + 8192, 4096, False)]


def test_changes_between_snapshots_and_zeroed_blocks(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _sparse(a, 4 * MIB, [(8192, b"a" * 8192)])
    snapshot(a, b)
    assert _digest(a) == _digest(b)
    assert list(data_ranges(os.open(b, os.O_RDONLY), 4 * MIB)) == list(data_ranges(os.open(a, os.O_RDONLY), 4 * MIB))
    with open(a, "r+b") as f:
        f.seek(8192)
        f.write(b"\0" * 4096)  # now zero: the layer must hide the lower bytes
        f.seek(MIB - 4096)
        f.write(b"n" * 4100)  # spans two blocks
    assert changed_extents(b, a) == [
        Change(8192, 4096, True),
        Change(MIB - 4096, 8192, False),
    ]
    # excluded (mapped) sectors are cut out, at sector granularity
    assert changed_extents(b, a, exclude=[(MIB - 4096 + 512, 1024)]) == [
        Change(8192, 4096, True),
        Change(MIB - 4096, 512, False),
        Change(MIB - 4096 + 1536, 8192 - 1536, False),
    ]


def test_diff_of_a_real_layer_rebuilds_the_after_image(tmp_path):
    image, before = str(tmp_path / "img"), str(tmp_path / "before")
    make_ext4(image, 256 * MIB)
    snapshot(image, before)
    layer = tmp_path / "layer.tar"
    layer.write_bytes(build_tar([Entry("f", data=os.urandom(50_000)), Entry("d/g", data=b"g" * 9000)]))
    res = apply_layer_file(image, str(layer), MODE_MAP)
    changes = changed_extents(before, image)
    # replaying the changes onto the snapshot gives the after image, byte for byte
    with open(before, "r+b") as dst, open(image, "rb") as src:
        for c in changes:
            src.seek(c.offset)
            dst.seek(c.offset)
            dst.write(src.read(c.length))
    assert _digest(before) == _digest(image)
    # the mapped file data is not part of the metadata diff
    meta = changed_extents(None, image, exclude=[(m.physical, m.length) for m in res.mappings])
    for m in res.mappings:
        assert all(c.offset + c.length <= m.physical or c.offset >= m.physical + m.length for c in meta)
    assert sum(m.length for m in res.mappings) == 50_176 + 9216


def test_the_rest_of_a_cut_block_is_compared_sector_by_sector(tmp_path):
    """A mapped file's last block: only sectors that really changed remain."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _sparse(a, MIB, [(4096, b"d" * 600)])  # data in sectors 0-1 of block 1, zeros after
    assert changed_extents(None, a, exclude=[(4096, 1024)]) == []
    _sparse(b, MIB, [(4096, b"s" * 4096)])  # below: stale bytes in the whole block
    assert changed_extents(b, a, exclude=[(4096, 1024)]) == [Change(4096 + 1024, 3072, True)]
