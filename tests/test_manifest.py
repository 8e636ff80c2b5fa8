"""Manifest parsing, platform choice and layer kinds, on upstream manifests (ACI CI) and indexes."""

from __future__ import annotations

import json

import pytest

from tcmu_overlaybd.errors import CorruptDataError, NotFoundError, UnsupportedError, UsageError
from tcmu_overlaybd.image import manifest as m
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image
from tcmu_overlaybd.image.store import Descriptor

from .helpers.layouts import add_manifest

IMAGES = ("centos", "nginx", "redis", "ubuntu", "wordpress")


def _layers(path):
    doc = json.loads(path.read_text())
    assert m.manifest_kind(doc, Descriptor("", "sha256:" + "0" * 64, 0), str(path)) == "manifest"
    return [m.classify_layer(Descriptor.from_json(d), str(path)) for d in doc["layers"]]


@pytest.mark.parametrize("name", IMAGES)
def test_upstream_converted_manifests_classify(vectors, name):
    base = vectors / "aci-uconv-reproduce" / name
    native = _layers(base / "manifest.json")
    assert {layer.kind for layer in native} == {"overlaybd"}
    assert m.image_mode(native, name) == "overlaybd"
    for turbo_file in ("manifest-turbo.json", "manifest-turbo-erofs.json"):
        turbo = _layers(base / turbo_file)
        assert {layer.kind for layer in turbo} == {"fastoci"}
        assert m.image_mode(turbo, name) == "fastoci"
        doc = json.loads((base / turbo_file).read_text())
        for layer, raw in zip(turbo, doc["layers"]):
            ann = raw["annotations"]
            assert layer.target.digest == ann[m.ANN_TURBO_TARGET_DIGEST]
            assert layer.target_is_gzip == ann[m.ANN_TURBO_TARGET_MEDIA_TYPE].endswith("gzip")


def _desc(media_type=m.OCI_LAYER_GZIP, **annotations):
    return Descriptor(media_type, "sha256:" + "a" * 64, 10, annotations=annotations)


def test_layer_kinds():
    assert m.classify_layer(_desc(m.DOCKER_LAYER_GZIP), "x").kind == "oci-gzip"
    assert m.classify_layer(_desc(m.OCI_LAYER_TAR), "x").kind == "oci-tar"
    assert m.classify_layer(_desc(m.DOCKER_LAYER_TAR), "x").kind == "oci-tar"
    assert m.classify_layer(_desc(m.OCI_LAYER_ZSTD), "x").kind == "oci-zstd"
    legacy = m.classify_layer(_desc(**{m.ANN_FASTOCI_TARGET_DIGEST: "sha256:" + "b" * 64,
                                       m.ANN_FASTOCI_TARGET_MEDIA_TYPE: m.OCI_LAYER_TAR,
                                       m.ANN_VERSION: m.VERSION_FASTOCI}), "x")
    assert (legacy.kind, legacy.target.digest, legacy.target_is_gzip) == ("fastoci", "sha256:" + "b" * 64, False)
    accel = m.classify_layer(_desc(m.OCI_LAYER_TAR, **{
        m.ANN_BLOB_DIGEST: "d", m.ANN_BLOB_SIZE: "1", m.ANN_VERSION: "0.1.0", m.ANN_ACCELERATION: "yes"}), "x")
    assert accel.kind == "acceleration"
    native = [m.classify_layer(_desc(m.OCI_LAYER_TAR, **{m.ANN_BLOB_DIGEST: "d", m.ANN_BLOB_SIZE: "1"}), "x")]
    assert m.image_mode(native + [accel], "x") == "overlaybd"


def test_layer_kind_errors():
    with pytest.raises(UnsupportedError, match="unsupported media type 'application/vnd.foo'"):
        m.classify_layer(_desc("application/vnd.foo"), "img")
    with pytest.raises(UnsupportedError, match="overlaybd version '9.9'"):
        m.classify_layer(_desc(**{m.ANN_BLOB_DIGEST: "d", m.ANN_BLOB_SIZE: "1", m.ANN_VERSION: "9.9"}), "img")
    mixed = [m.classify_layer(_desc(), "x"),
             m.classify_layer(_desc(**{m.ANN_BLOB_DIGEST: "d", m.ANN_BLOB_SIZE: "1"}), "x")]
    with pytest.raises(UnsupportedError, match="mixes plain OCI and accelerated layers"):
        m.image_mode(mixed, "img")


def test_manifest_validation():
    d = Descriptor("", "sha256:" + "0" * 64, 0)
    with pytest.raises(UnsupportedError, match="'application/vnd.example' is not an image manifest"):
        m.manifest_kind({"mediaType": "application/vnd.example"}, d, "img")
    with pytest.raises(CorruptDataError, match="manifest without 'config' and 'layers'"):
        m.manifest_kind({"mediaType": m.OCI_MANIFEST, "layers": []}, d, "img")
    with pytest.raises(CorruptDataError, match="index without a 'manifests' list"):
        m.manifest_kind({"mediaType": m.DOCKER_LIST}, d, "img")
    assert m.manifest_kind({"manifests": []}, d, "img") == "index"  # media type may be omitted
    with pytest.raises(CorruptDataError, match="img at offset 9: malformed JSON"):
        m.parse_json(b'{"a": 1, ]', "img")
    with pytest.raises(CorruptDataError, match="expected an object"):
        m.parse_json(b"[1]", "img")


def test_platform_selection(vectors):
    index = json.loads((vectors / "aci-hello-world" / "index.json").read_text())
    pick = lambda p: m.select_platform(index, m.Platform.parse(p), "hello").digest[7:15]  # noqa: E731
    assert pick("linux/amd64") == "7e9b6e7b"
    assert pick("linux/arm64") == "efebf0f7"
    assert pick("linux/arm64/v8") == "efebf0f7"
    assert pick("linux/arm/v5") == "084c3bdd"
    assert pick("linux/arm") == "a0a38631"  # any variant when none is asked for: the first listed
    with pytest.raises(NotFoundError, match=r"no image for platform linux/mips \(available: linux/386, "
                                            r"linux/amd64, linux/arm/v5, linux/arm/v7, linux/arm64/v8"):
        pick("linux/mips")
    for bad in ("linux", "linux/", "a/b/c/d"):
        with pytest.raises(UsageError, match="invalid platform"):
            m.Platform.parse(bad)


def test_host_platform(monkeypatch):
    monkeypatch.setattr(m._platform, "machine", lambda: "aarch64")
    assert str(m.Platform.host()) == "linux/arm64/v8"
    monkeypatch.setattr(m._platform, "machine", lambda: "x86_64")
    assert str(m.Platform.host()) == "linux/amd64"


@pytest.mark.parametrize("layer", [
    {"digest": 5},
    {"digest": "sha256:" + "a" * 64, "size": "big"},
    {"digest": "sha256:" + "a" * 64, "size": 1, "annotations": {m.ANN_TURBO_TARGET_DIGEST: 7}},
    {"digest": "sha256:" + "a" * 64, "size": 1, "mediaType": ["x"]},
    "not-an-object",
])
def test_malformed_layer_descriptors_are_corrupt_data(layer, tmp_path):
    desc = add_manifest(tmp_path, {"os": "linux", "architecture": "amd64"}, [layer], "bad")
    with pytest.raises(CorruptDataError, match=rf"oci:{tmp_path}:bad \({desc.digest}\): descriptor"):
        open_image(f"oci:{tmp_path}:bad", OpenOptions(discover_accelerated=False))
