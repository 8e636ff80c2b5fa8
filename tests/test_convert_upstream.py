"""Our conversion of upstream's own test image against upstream's output (vectors/upstream-small)."""

from __future__ import annotations

import os

import pytest

from tcmu_overlaybd.block.export import export_raw
from tcmu_overlaybd.block.source import BytesSource, FileSource
from tcmu_overlaybd.block.stack import StackedDisk
from tcmu_overlaybd.convert.image import FORMAT_FASTOCI, FORMAT_OVERLAYBD, ConvertOptions, convert_image
from tcmu_overlaybd.format.layer import open_layer_blob
from tcmu_overlaybd.format.turbooci import read_meta_tarball
from tcmu_overlaybd.image.disk import open_disk
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image

from .helpers.ext4_tree import fsck_clean, read_tree

PLAIN = OpenOptions(discover_accelerated=False, gzip_cache_enable=False)


@pytest.fixture(scope="module")
def upstream_tree(vectors, tmp_path_factory):
    """The tree of upstream's native conversion (overlaybd-commit blobs, stacked)."""
    d = vectors / "upstream-small" / "overlaybd"
    layers = [open_layer_blob(FileSource(str(d / f"layer{i}.commit"))) for i in range(2)]
    raw = str(tmp_path_factory.mktemp("upstream") / "disk.img")
    export_raw(StackedDisk(layers), raw)
    return read_tree(raw), [(layer.uuid, layer.parent_uuid) for layer in layers]


@pytest.mark.parametrize("fmt", [FORMAT_OVERLAYBD, FORMAT_FASTOCI])
def test_same_tree_as_upstream(vectors, tmp_path, upstream_tree, fmt):
    tree, _uuids = upstream_tree
    source = open_image(f"oci:{vectors / 'upstream-small' / 'original'}:small", PLAIN)
    out = str(tmp_path / "out")
    convert_image(source, out, str(tmp_path / "work"), ConvertOptions(fmt=fmt, tag="acc"))
    raw = str(tmp_path / "disk.img")
    export_raw(open_disk(open_image(f"oci:{out}:acc", PLAIN), PLAIN), raw)
    rc, msg = fsck_clean(raw)
    assert rc == 0, msg  # (upstream's own disk fails this: bad HTREE on lost+found)
    ours = read_tree(raw)
    assert sorted(ours) == sorted(tree)
    assert {p: n for p, n in ours.items() if n != tree[p]} == {}


def test_layer_uuids_are_upstreams_chain_ids(vectors, tmp_path, upstream_tree):
    _tree, uuids = upstream_tree
    source = open_image(f"oci:{vectors / 'upstream-small' / 'original'}:small", PLAIN)
    out = str(tmp_path / "out")
    res = convert_image(source, out, str(tmp_path / "work"), ConvertOptions(tag="acc"))
    ours = []
    for desc in res.manifest["layers"]:
        layer = open_layer_blob(FileSource(os.path.join(out, "blobs", "sha256", desc["digest"][7:])))
        ours.append((layer.uuid, layer.parent_uuid))
    assert ours == uuids


def _tar_sectors(warp) -> set[int]:
    """Sectors of the original layer's tar that a warp layer maps (tag-1 entries)."""
    out: set[int] = set()
    for _off, n, moffset, _zeroed, tag in warp.segments():
        if tag == 1:
            out.update(range(moffset, moffset + n))
    return out


def test_fastoci_maps_the_same_tar_bytes_as_turbooci_apply(vectors, tmp_path):
    small = vectors / "upstream-small"
    source = open_image(f"oci:{small / 'original'}:small", PLAIN)
    out = str(tmp_path / "out")
    res = convert_image(source, out, str(tmp_path / "work"), ConvertOptions(fmt=FORMAT_FASTOCI, tag="acc"))
    for i, desc in enumerate(res.manifest["layers"]):
        meta = read_meta_tarball(FileSource(os.path.join(out, "blobs", "sha256", desc["digest"][7:])))
        ours = _tar_sectors(open_layer_blob(BytesSource(meta.fs_meta), warp=True))
        upstream = FileSource(str(small / "turbooci" / f"layer{i}" / "ext4.fs.meta"))
        theirs = _tar_sectors(open_layer_blob(upstream, warp=True))
        assert ours == theirs and ours
