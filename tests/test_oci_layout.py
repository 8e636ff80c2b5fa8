"""The OCI layout store: tags, digests, blobs, verification, referrers and discovery."""

from __future__ import annotations

import json
import shutil

import pytest

from tcmu_overlaybd.errors import CorruptDataError, NotFoundError, UsageError
from tcmu_overlaybd.image.discovery import ARTIFACT_NATIVE
from tcmu_overlaybd.image.manifest import OCI_MANIFEST
from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.resolve import open_image
from tcmu_overlaybd.image.store import Descriptor

from .helpers.layouts import add_blob, add_manifest, json_bytes, layout_from_flat

AMD64 = "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"
CONVERTED = "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"
CONFIG = "sha256:9c7a54a9a43cca047013b82af109fe963fde787f63f9e016fdc3384500c2823d"


@pytest.fixture
def hello(vectors, tmp_path):
    return layout_from_flat(vectors / "aci-hello-world", tmp_path / "hello")


def _ref(text):
    return parse_reference(text)


def test_resolve_by_tag_and_digest(hello):
    store = OciLayoutStore(hello)
    assert store.resolve(_ref(f"oci:{hello}:amd64")).digest == AMD64
    assert store.resolve(_ref(f"oci:{hello}@{CONVERTED}")).size == 641
    assert store.tags == ["amd64-converted", "arm64", "docker-list", "amd64"]
    with pytest.raises(UsageError, match=r"holds 11 manifests; name one as oci:.*:TAG \(tags: amd64-converted"):
        store.resolve(_ref(f"oci:{hello}"))
    with pytest.raises(NotFoundError, match=r"no tag 'latest' \(tags: amd64-converted, arm64, docker-list, amd64\)"):
        store.resolve(_ref(f"oci:{hello}:latest"))


def test_resolve_digest_not_in_index_and_single_manifest(tmp_path):
    layout = tmp_path / "l"
    desc = add_manifest(layout, {"os": "linux", "architecture": "amd64"}, [], None)
    store = OciLayoutStore(layout)
    assert store.resolve(_ref(f"oci:{layout}")).digest == desc.digest  # the only manifest, no tag
    # a manifest only reachable through a nested index: found by digest, media type from its content
    nested = json_bytes({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}, "layers": []})
    digest, size = add_blob(layout, nested)
    got = store.resolve(_ref(f"oci:{layout}@{digest}"))
    assert (got.media_type, got.size) == (OCI_MANIFEST, size)


def test_blobs_are_verified(hello):
    store = OciLayoutStore(hello)
    assert json.loads(store.fetch_blob(CONFIG))["architecture"] == "amd64"
    with pytest.raises(CorruptDataError, match="blob is 1470 bytes, its descriptor says 1000"):
        store.fetch_blob(CONFIG, 1000)
    path = hello / "blobs" / "sha256" / CONFIG[7:]
    path.write_bytes(path.read_bytes().replace(b"amd64", b"arm64"))
    with pytest.raises(CorruptDataError, match=f"blob {CONFIG}: content does not match digest"):
        store.fetch_blob(CONFIG)
    with pytest.raises(CorruptDataError, match="blob content does not match its digest"):
        store.open_blob(CONFIG, 1470)
    with pytest.raises(NotFoundError, match=r"blob sha256:efebf0f7\S+ is missing"):
        store.open_blob("sha256:efebf0f7aee69450f99deafe11121afa720abed733943e50581a9dc7540689c8", 525)
    with pytest.raises(UsageError, match="invalid digest"):
        store.open_blob("sha256:../../../etc/passwd", None)


def test_layout_errors(tmp_path, hello):
    with pytest.raises(NotFoundError, match="no such OCI layout directory"):
        OciLayoutStore(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match=r"not an OCI layout \(no index.json\)"):
        OciLayoutStore(tmp_path / "empty")
    (hello / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')
    with pytest.raises(CorruptDataError, match="unsupported imageLayoutVersion '2.0.0'"):
        OciLayoutStore(hello)


def _add_converted_referrer(layout):
    """List the converted hello-world manifest again, now as a referrer of the amd64 one (spec §3.4)."""
    doc = json.loads((layout / "blobs" / "sha256" / CONVERTED[7:]).read_bytes())
    doc["artifactType"] = ARTIFACT_NATIVE
    doc["subject"] = {"mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                      "digest": AMD64, "size": 525}
    digest, size = add_blob(layout, json_bytes(doc))
    index = json.loads((layout / "index.json").read_text())
    index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size})
    (layout / "index.json").write_text(json.dumps(index))
    return digest


def test_referrers_and_discovery(hello):
    referrer = _add_converted_referrer(hello)
    store = OciLayoutStore(hello)
    [found] = store.referrers(AMD64)
    assert (found.digest, found.artifact_type) == (referrer, ARTIFACT_NATIVE)
    assert store.referrers(AMD64, artifact_type="application/other") == []
    assert store.referrers(CONVERTED) == []
    # a plain image with an accelerated referrer opens as the accelerated one ...
    image = open_image(f"oci:{hello}:amd64", OpenOptions())
    assert (image.mode, image.manifest_descriptor.digest) == ("overlaybd", referrer)
    # ... unless discovery is off
    image = open_image(f"oci:{hello}:amd64", OpenOptions(discover_accelerated=False))
    assert (image.mode, image.manifest_descriptor.digest) == ("oci", AMD64)


def test_index_platform_through_layout(hello, tmp_path):
    """An OCI index in a layout: the entry for --platform is used, others are never fetched."""
    layout = tmp_path / "multi"
    shutil.copytree(hello, layout)
    amd = Descriptor("application/vnd.docker.distribution.manifest.v2+json", AMD64, 525,
                     platform={"os": "linux", "architecture": "amd64"})
    absent = Descriptor(OCI_MANIFEST, "sha256:" + "e" * 64, 100, platform={"os": "linux", "architecture": "arm64"})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": [absent.to_json(), amd.to_json()]}
    digest, size = add_blob(layout, json_bytes(index))
    doc = json.loads((layout / "index.json").read_text())
    doc["manifests"].append({"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest,
                             "size": size, "annotations": {"org.opencontainers.image.ref.name": "multi"}})
    (layout / "index.json").write_text(json.dumps(doc))
    image = open_image(f"oci:{layout}:multi", OpenOptions(platform="linux/amd64", discover_accelerated=False))
    assert (image.platform, image.manifest_descriptor.digest, image.index_descriptor.digest) == \
        ("linux/amd64", AMD64, digest)
    with pytest.raises(NotFoundError, match=r"blob sha256:e{64} is missing"):
        open_image(f"oci:{layout}:multi", OpenOptions(platform="linux/arm64"))
