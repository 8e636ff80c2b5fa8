"""Build OCI image layouts for tests: from the flat vector dirs or from overlaybd layer blobs."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

from tcmu_overlaybd.image.manifest import (
    ANN_BLOB_DIGEST, ANN_BLOB_SIZE, ANN_VERSION, OCI_CONFIG, OCI_LAYER_TAR, OCI_MANIFEST, REF_NAME,
    VERSION_NATIVE,
)
from tcmu_overlaybd.image.oci_layout import write_index
from tcmu_overlaybd.image.store import Descriptor


def add_blob(layout: pathlib.Path, data: bytes) -> tuple[str, int]:
    """Store ``data`` under blobs/sha256/ and return (digest, size)."""
    hexd = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / hexd
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"sha256:{hexd}", len(data)


def add_file_blob(layout: pathlib.Path, src: pathlib.Path) -> tuple[str, int]:
    """Copy a (possibly large) file into the layout's blobs and return (digest, size)."""
    h = hashlib.sha256()
    with open(src, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    dst = layout / "blobs" / "sha256" / h.hexdigest()
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return f"sha256:{h.hexdigest()}", os.path.getsize(src)


def layout_from_flat(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    """Turn a flat ``sha256_<hex>`` + index.json directory (the aci-hello-world vector) into a layout."""
    (dst / "blobs" / "sha256").mkdir(parents=True)
    for f in src.iterdir():
        if f.name.startswith("sha256_"):
            shutil.copyfile(f, dst / "blobs" / "sha256" / f.name[len("sha256_"):])
    shutil.copyfile(src / "index.json", dst / "index.json")
    (dst / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return dst


def json_bytes(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def add_manifest(layout: pathlib.Path, config: dict, layers: list[dict], tag: str | None,
                 media_type: str = OCI_MANIFEST, entries: list[Descriptor] | None = None,
                 **extra) -> Descriptor:
    """Store a config and a manifest over ``layers`` (descriptor dicts); list it in index.json."""
    cdigest, csize = add_blob(layout, json_bytes(config))
    manifest = {"schemaVersion": 2, "mediaType": media_type,
                "config": {"mediaType": OCI_CONFIG, "digest": cdigest, "size": csize},
                "layers": layers, **extra}
    mdigest, msize = add_blob(layout, json_bytes(manifest))
    desc = Descriptor(media_type, mdigest, msize, annotations={REF_NAME: tag} if tag else {})
    entries = list(entries or []) + [desc]
    write_index(str(layout), entries)
    return desc


def native_layout(dst: pathlib.Path, commits: list[pathlib.Path], tag: str) -> pathlib.Path:
    """A native overlaybd image (spec §3.3) over already-committed layer blobs, lowest first."""
    layers = []
    for commit in commits:
        digest, size = add_file_blob(dst, commit)
        layers.append({"mediaType": OCI_LAYER_TAR, "digest": digest, "size": size, "annotations": {
            ANN_BLOB_DIGEST: digest, ANN_BLOB_SIZE: str(size), ANN_VERSION: VERSION_NATIVE}})
    config = {"architecture": "amd64", "os": "linux",
              "rootfs": {"type": "layers", "diff_ids": [layer["digest"] for layer in layers]}}
    add_manifest(dst, config, layers, tag)
    return dst


def turbo_layout(dst: pathlib.Path, original: pathlib.Path, meta_blobs: list[pathlib.Path],
                 source_tag: str, tag: str) -> pathlib.Path:
    """A TurboOCI image (spec §4.1) added to a copy of ``original``: one meta tarball per source layer."""
    from tcmu_overlaybd.image.manifest import (
        ANN_TURBO_TARGET_DIGEST, ANN_TURBO_TARGET_MEDIA_TYPE, OCI_LAYER_GZIP, VERSION_TURBO,
    )
    from tcmu_overlaybd.image.oci_layout import OciLayoutStore

    shutil.copytree(original, dst)
    store = OciLayoutStore(dst)
    [source] = [d for d in store.entries if d.annotations.get(REF_NAME) == source_tag]
    targets = json.loads(store.fetch_manifest(source))["layers"]
    layers = []
    for meta, target in zip(meta_blobs, targets, strict=True):
        digest, size = add_file_blob(dst, meta)
        layers.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size, "annotations": {
            ANN_BLOB_DIGEST: digest, ANN_BLOB_SIZE: str(size), ANN_VERSION: VERSION_TURBO,
            ANN_TURBO_TARGET_DIGEST: target["digest"], ANN_TURBO_TARGET_MEDIA_TYPE: target["mediaType"]}})
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}
    add_manifest(dst, config, layers, tag, entries=store.entries)
    return dst
