"""FastOCI conversion: meta layers over the unmodified original layers, read back stacked."""

from __future__ import annotations

import gzip
import os

import pytest

from tcmu_overlaybd.block.export import export_raw
from tcmu_overlaybd.block.source import CountingSource, FileSource
from tcmu_overlaybd.block.stack import StackedDisk
from tcmu_overlaybd.convert.turbo import convert_turbo
from tcmu_overlaybd.errors import UnsupportedError
from tcmu_overlaybd.format.turbooci import open_turbo_layer, read_meta_tarball

from .helpers.ext4_tree import fsck_clean, read_tree
from .helpers.oci_build import Entry, build_tar, compress
from .helpers.reference_tree import reference_tree
from .test_convert_apply import VSIZE, torture_layers


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The torture image with gzip, gzip and plain tar layers (FastOCI takes no zstd)."""
    d = tmp_path_factory.mktemp("src")
    paths, blobs = [], []
    for i, ((_blob, tar), how) in enumerate(zip(torture_layers(), ["gzip", "gzip", "tar"])):
        blob = compress(tar, how)
        p = d / f"layer{i}"
        p.write_bytes(blob)
        paths.append(str(p))
        blobs.append(blob)
    return paths, blobs


def test_fastoci_meta_layers_serve_file_data_from_the_original_blobs(tmp_path, source):
    paths, blobs = source
    layers = convert_turbo(paths, str(tmp_path / "work"), str(tmp_path / "out"), vsize=VSIZE)
    assert [open(p, "rb").read() for p in paths] == blobs  # originals untouched
    targets = [CountingSource(FileSource(p)) for p in paths]
    stack = StackedDisk(
        [
            open_turbo_layer(FileSource(layer.path), target, target_is_gzip=layer.target_is_gzip)
            for layer, target in zip(layers, targets)
        ]
    )
    raw = str(tmp_path / "export.img")
    export_raw(stack, raw)
    rc, out = fsck_clean(raw)
    assert rc == 0, out
    assert read_tree(raw) == reference_tree(blobs)
    for layer, target in zip(layers, targets):
        assert layer.mapped_bytes > 0 and target.bytes_read > 0
        meta = read_meta_tarball(FileSource(layer.path))
        assert meta.has_marker and (meta.gzip_index is not None) == layer.target_is_gzip
    # the 3 MiB random file of layer 1 is not in its meta layer: it is read from the original
    assert layers[1].size < 0.05 * os.path.getsize(paths[1])
    d = layers[1].descriptor()
    assert d["annotations"]["containerd.io/snapshot/overlaybd/turbo-oci/target-digest"] == layers[1].target_digest
    assert d["annotations"]["containerd.io/snapshot/overlaybd/version"] == "0.1.0-turbo.ociv1"


def test_fastoci_refuses_zstd_layers(tmp_path):
    p = tmp_path / "layer.zst"
    p.write_bytes(compress(build_tar([Entry("f", data=b"x")]), "zstd"))
    with pytest.raises(UnsupportedError, match="tar or tar\\+gzip"):
        convert_turbo([str(p)], str(tmp_path / "w"), str(tmp_path / "o"), vsize=VSIZE)


def test_multi_member_gzip_maps_only_into_the_first_member(tmp_path):
    """A gzip index covers one member (§4.4): data past it stays in the meta layer."""
    tar = build_tar([Entry(f"f{i}", data=os.urandom(20_000 + i)) for i in range(20)])
    cut = len(tar) // 2
    blob = gzip.compress(tar[:cut], mtime=0) + gzip.compress(tar[cut:], mtime=0)  # like eStargz / pigz -i
    src = tmp_path / "layer.tgz"
    src.write_bytes(blob)
    (layer,) = convert_turbo([str(src)], str(tmp_path / "w"), str(tmp_path / "o"), vsize=VSIZE)
    assert 0 < layer.mapped_bytes < sum(-(-(20_000 + i) // 512) * 512 for i in range(20))
    target = CountingSource(FileSource(str(src)))
    stack = StackedDisk([open_turbo_layer(FileSource(layer.path), target, target_is_gzip=True)])
    raw = str(tmp_path / "export.img")
    export_raw(stack, raw)
    # files of the second member come from the meta layer, the others from the original
    assert read_tree(raw) == reference_tree([blob])
    assert target.bytes_read > 0
