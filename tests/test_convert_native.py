"""Native overlaybd conversion: per-layer sealed LSMT -> ZFile -> tar blobs, read back stacked."""

from __future__ import annotations

import hashlib
import os

import pytest

from tcmu_overlaybd.block.export import export_raw
from tcmu_overlaybd.block.source import FileSource
from tcmu_overlaybd.block.stack import StackedDisk
from tcmu_overlaybd.convert.engine import chain_ids, uuid_of
from tcmu_overlaybd.convert.native import convert_native
from tcmu_overlaybd.format.layer import open_layer_blob

from .helpers.ext4_tree import fsck_clean, read_tree
from .helpers.reference_tree import reference_tree
from .test_convert_apply import VSIZE, torture_layers


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    paths, blobs = [], []
    for i, (blob, _tar) in enumerate(torture_layers()):
        p = d / f"layer{i}"
        p.write_bytes(blob)
        paths.append(str(p))
        blobs.append(blob)
    return paths, blobs


def _stack(layers):
    return StackedDisk([open_layer_blob(FileSource(layer.path)) for layer in layers])


def test_native_layers_stack_to_the_reference_tree(tmp_path, source):
    paths, blobs = source
    layers = convert_native(paths, str(tmp_path / "work"), str(tmp_path / "out"), vsize=VSIZE)
    assert len(layers) == len(paths)
    raw = str(tmp_path / "export.img")
    export_raw(_stack(layers), raw)
    rc, out = fsck_clean(raw)
    assert rc == 0, out
    assert read_tree(raw) == reference_tree(blobs)
    # §3.1: LSMT UUID = chainID of the source diff_ids, parent = the layer below
    diff_ids = [layer.source_diff_id for layer in layers]
    chains = chain_ids(diff_ids)
    for i, layer in enumerate(layers):
        lsmt = open_layer_blob(FileSource(layer.path))
        assert lsmt.uuid.lower() == uuid_of(chains[i])
        assert (lsmt.parent_uuid.lower() if i else lsmt.parent_uuid) == (
            uuid_of(chains[i - 1]) if i else "00000000-0000-0000-0000-000000000000"
        )
        d = layer.descriptor()
        assert d["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
        assert d["annotations"]["containerd.io/snapshot/overlaybd/blob-size"] == str(os.path.getsize(layer.path))
        with open(layer.path, "rb") as f:
            assert layer.digest == "sha256:" + hashlib.sha256(f.read()).hexdigest()


def test_each_layer_alone_shows_the_tree_up_to_it(tmp_path, source):
    """A stack cut after layer k is the image of the first k+1 source layers."""
    paths, blobs = source
    layers = convert_native(paths, str(tmp_path / "work"), str(tmp_path / "out"), vsize=VSIZE, algorithm="zstd",
                            block_size=16384)
    raw = str(tmp_path / "export.img")
    export_raw(_stack(layers[:1]), raw)
    assert read_tree(raw) == reference_tree(blobs[:1])


def test_conversion_is_reproducible(tmp_path, source):
    """§3.6: the same source gives byte-identical layer blobs."""
    paths, _ = source
    a = convert_native(paths[:2], str(tmp_path / "w1"), str(tmp_path / "o1"), vsize=VSIZE)
    b = convert_native(paths[:2], str(tmp_path / "w2"), str(tmp_path / "o2"), vsize=VSIZE)
    assert [x.digest for x in a] == [y.digest for y in b]
