"""Whole-image conversion into an OCI layout, read back through obd's own image code."""

from __future__ import annotations

import json
import os

import pytest

from tcmu_overlaybd.block.export import export_raw
from tcmu_overlaybd.convert.image import (
    FORMAT_FASTOCI,
    FORMAT_OVERLAYBD,
    ConvertOptions,
    convert_all_platforms,
    convert_image,
)
from tcmu_overlaybd.errors import UnsupportedError
from tcmu_overlaybd.image.disk import open_disk
from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.resolve import open_image

from .helpers.ext4_tree import fsck_clean, read_tree
from .helpers.oci_build import Entry, build_tar, compress, write_oci_layout, write_oci_multiarch
from .helpers.reference_tree import reference_tree
from .test_convert_apply import VSIZE, torture_entries

PLAIN = OpenOptions(discover_accelerated=False, gzip_cache_enable=False)


@pytest.fixture()
def source(tmp_path):
    layout = str(tmp_path / "src")
    manifest = write_oci_layout(layout, torture_entries(), "gzip", tag="v1")
    blobs = []
    for layer in manifest["layers"]:
        with open(os.path.join(layout, "blobs", "sha256", layer["digest"][7:]), "rb") as f:
            blobs.append(f.read())
    return layout, blobs


@pytest.mark.parametrize("fmt", [FORMAT_OVERLAYBD, FORMAT_FASTOCI])
def test_converted_layout_reads_back_as_the_source_tree(tmp_path, source, fmt):
    layout, blobs = source
    out = str(tmp_path / "out")
    seen: dict[int, tuple[int, int]] = {}
    res = convert_image(open_image(f"oci:{layout}:v1", PLAIN), out, str(tmp_path / "work"),
                        ConvertOptions(fmt=fmt, tag="acc", vsize=VSIZE, oci=False,
                                       progress=lambda i, done, total: seen.__setitem__(i, (done, total))))
    # per-layer progress ends at each source blob's full size
    assert seen == {i: (len(b), len(b)) for i, b in enumerate(blobs)}
    image = open_image(f"oci:{out}:acc", PLAIN)
    assert image.mode == fmt and len(image.layers) == len(blobs)
    assert image.manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert image.config["rootfs"]["diff_ids"] == res.config["rootfs"]["diff_ids"]
    raw = str(tmp_path / "disk.img")
    export_raw(open_disk(image, PLAIN), raw)
    rc, msg = fsck_clean(raw)
    assert rc == 0, msg
    assert read_tree(raw) == reference_tree(blobs)
    assert os.listdir(str(tmp_path / "work")) == []  # sources and the working image are cleaned up


def test_referrer_makes_the_plain_reference_find_the_accelerated_image(tmp_path, source):
    layout, blobs = source
    plain = open_image(f"oci:{layout}:v1", PLAIN)
    res = convert_image(plain, layout, str(tmp_path / "work"), ConvertOptions(vsize=VSIZE, referrer=True, oci=False))
    assert res.manifest["mediaType"] == "application/vnd.oci.image.manifest.v1+json"  # --referrer forces OCI
    assert res.manifest["subject"]["digest"] == plain.manifest_descriptor.digest
    assert [d.digest for d in OciLayoutStore(layout).referrers(plain.manifest_descriptor.digest)] == [
        res.manifest_descriptor.digest
    ]
    found = open_image(f"oci:{layout}:v1", OpenOptions(gzip_cache_enable=False))
    assert found.mode == "overlaybd" and found.manifest_descriptor.digest == res.manifest_descriptor.digest
    with pytest.raises(UnsupportedError, match="already overlaybd"):
        convert_image(found, str(tmp_path / "again"), str(tmp_path / "w2"), ConvertOptions(vsize=VSIZE))


def test_all_platforms_become_an_index_of_converted_images(tmp_path):
    images = {
        "amd64": [[Entry("arch", data=b"amd64"), Entry("bin/sh", data=b"x86")]],
        "arm64": [[Entry("arch", data=b"arm64")], [Entry("extra", data=b"second layer")]],
    }
    src = str(tmp_path / "src")
    source_index = write_oci_multiarch(src, images, tag="v1")
    out = str(tmp_path / "out")
    ref = parse_reference(f"oci:{src}:v1")
    desc = convert_all_platforms(OciLayoutStore(src), ref, out, str(tmp_path / "work"),
                                 ConvertOptions(tag="acc", vsize=VSIZE, referrer=True))
    assert desc.media_type == "application/vnd.oci.image.index.v1+json"
    with open(os.path.join(src, "index.json")) as f:
        source_index_digest = json.load(f)["manifests"][0]["digest"]
    with open(os.path.join(out, "blobs", "sha256", desc.digest[7:])) as f:
        assert json.load(f)["subject"]["digest"] == source_index_digest
    for arch, layers in images.items():
        image = open_image(f"oci:{out}:acc", OpenOptions(platform=f"linux/{arch}", discover_accelerated=False,
                                                          gzip_cache_enable=False))
        assert image.mode == "overlaybd" and image.platform == f"linux/{arch}"
        raw = str(tmp_path / f"{arch}.img")
        export_raw(open_disk(image, PLAIN), raw)
        assert read_tree(raw) == reference_tree([compress(build_tar(entries), "gzip") for entries in layers])
        # each converted manifest points at its own source manifest
        src_digest = next(m["digest"] for m in source_index["manifests"] if m["platform"]["architecture"] == arch)
        assert image.manifest["subject"]["digest"] == src_digest
