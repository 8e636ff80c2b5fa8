"""Convert a whole single-platform OCI image into an OCI layout (native overlaybd or FastOCI).

The source is an :class:`~tcmu_overlaybd.image.manifest.Image` (any store:
registry or ``oci:`` layout).  Its layer blobs are fetched (digests verified),
converted layer by layer (:mod:`.native` / :mod:`.turbo`), and the result is
written to an OCI image layout directory with the manifest and config of §3.3
(native) or §4.1 (FastOCI), optionally linked to the source manifest with
``subject`` + ``artifactType`` (§3.4).  A FastOCI layout also receives the
original layer blobs, which its layers read their file data from.  Pushing the
layout to a registry is a separate step.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace

from ..errors import CorruptDataError, UnsupportedError
from ..image.manifest import Image, index_entries, load_manifest, manifest_kind, parse_json
from ..image.oci_layout import write_index
from ..image.reference import Reference
from ..image.store import BlobStore, Descriptor
from .engine import LayerProgress
from .mkfs import GIB
from .native import convert_native
from .turbo import convert_turbo

FORMAT_OVERLAYBD = "overlaybd"
FORMAT_FASTOCI = "fastoci"
MANIFEST_TYPES = {True: "application/vnd.oci.image.manifest.v1+json",
                  False: "application/vnd.docker.distribution.manifest.v2+json"}
CONFIG_TYPES = {True: "application/vnd.oci.image.config.v1+json",
                False: "application/vnd.docker.container.image.v1+json"}
INDEX_TYPES = {True: "application/vnd.oci.image.index.v1+json",
               False: "application/vnd.docker.distribution.manifest.list.v2+json"}
ARTIFACT_TYPES = {FORMAT_OVERLAYBD: "application/vnd.containerd.overlaybd.native.v1+json",
                  FORMAT_FASTOCI: "application/vnd.containerd.overlaybd.turbo.v1+json"}
REF_NAME = "org.opencontainers.image.ref.name"

#: fields of the OCI image-spec config (the Go ``specs.Image`` round trip keeps only these, §3.3)
_CONFIG_FIELDS = ("created", "author", "architecture", "os", "os.version", "os.features", "variant",
                  "config", "rootfs", "history")
_RUNTIME_FIELDS = ("User", "ExposedPorts", "Env", "Entrypoint", "Cmd", "Volumes", "WorkingDir", "Labels",
                   "StopSignal", "ArgsEscaped")
COPY_CHUNK = 4 << 20


@dataclass(frozen=True)
class ConvertedImage:
    """The converted image as stored in the output layout."""

    format: str
    manifest_descriptor: Descriptor
    manifest: dict
    config: dict


def _put_blob(layout: str, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest[7:])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return digest, len(data)


def _put_file(layout: str, src: str, digest: str) -> None:
    """Place a blob file in the layout (hard link when possible)."""
    path = os.path.join(layout, "blobs", "sha256", digest.split(":", 1)[1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.exists(path):
        return
    try:
        os.link(src, path)
    except OSError:
        shutil.copyfile(src, path)


def fetch_layer(image: Image, desc: Descriptor, path: str) -> None:
    """Copy a source layer blob to ``path``, checking its digest."""
    src = image.store.open_blob(desc.digest, desc.size)
    h = hashlib.sha256()
    try:
        with open(path, "wb") as out:
            for pos in range(0, src.size, COPY_CHUNK):
                data = src.read(pos, COPY_CHUNK)
                h.update(data)
                out.write(data)
    finally:
        src.close()
    if "sha256:" + h.hexdigest() != desc.digest:
        raise CorruptDataError(f"layer content does not match its digest {desc.digest}", blob=desc.digest)


def _config_for(source: dict, diff_ids: list[str]) -> dict:
    config = {k: source[k] for k in _CONFIG_FIELDS if k in source}
    if isinstance(source.get("config"), dict):
        config["config"] = {k: v for k, v in source["config"].items() if k in _RUNTIME_FIELDS}
    config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    return config


def _update_index(layout: str, desc: Descriptor, tag: str | None) -> None:
    entries: list[Descriptor] = []
    index_path = os.path.join(layout, "index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            entries = [Descriptor.from_json(d) for d in json.load(f).get("manifests", [])]
    if tag:
        entries = [e for e in entries if e.annotations.get(REF_NAME) != tag]
    entries.append(desc)
    write_index(layout, entries)


@dataclass(frozen=True)
class ConvertOptions:
    """What ``obd convert`` builds (defaults as upstream's convertor, §6.1)."""

    fmt: str = FORMAT_OVERLAYBD
    tag: str | None = None  # ref name of the result in the output layout's index
    vsize: int = 64 * GIB
    algorithm: str = "lz4"  # ZFile algorithm of native layers: lz4 | zstd
    block_size: int = 4096  # ZFile block size of native layers: 4 KiB .. 64 KiB
    oci: bool = True  # OCI media types (False: Docker v2)
    referrer: bool = False  # link to the source manifest with subject + artifactType (§3.4)
    #: ``progress(layer_index, bytes_read, bytes_total)`` while each source layer is applied
    progress: LayerProgress | None = None


def convert_image(image: Image, layout: str, workdir: str, opts: ConvertOptions = ConvertOptions()) -> ConvertedImage:
    """Convert ``image`` into the OCI layout directory ``layout`` (created if needed).

    ``workdir`` holds the source layer copies and the working ext4 image (a sparse
    file of ``vsize`` bytes) while converting; both are removed afterwards.
    """
    if image.mode != "oci":
        raise UnsupportedError(f"{image.reference}: image is already {image.mode}; convert a plain OCI image")
    if opts.fmt not in ARTIFACT_TYPES:
        raise UnsupportedError(f"unknown output format {opts.fmt!r}")
    if not image.layers:
        raise UnsupportedError(f"{image.reference}: image has no layers to convert")
    os.makedirs(workdir, exist_ok=True)
    sources: list[str] = []
    try:
        for i, layer in enumerate(image.layers):
            sources.append(os.path.join(workdir, f"source{i:04d}"))
            fetch_layer(image, layer.descriptor, sources[-1])
        return _write_image(image, layout, workdir, sources, opts)
    finally:  # the source copies and the working image are not needed afterwards
        shutil.rmtree(os.path.join(workdir, opts.fmt), ignore_errors=True)
        shutil.rmtree(os.path.join(workdir, "fs"), ignore_errors=True)
        for path in sources:
            if os.path.exists(path):
                os.unlink(path)


def _write_image(image: Image, layout: str, workdir: str, sources: list[str], opts: ConvertOptions) -> ConvertedImage:
    oci = opts.oci or opts.referrer  # referrers need OCI media types (§3.4)
    fs_dir, out_dir = os.path.join(workdir, "fs"), os.path.join(workdir, opts.fmt)
    if opts.fmt == FORMAT_OVERLAYBD:
        native = convert_native(sources, fs_dir, out_dir, vsize=opts.vsize, algorithm=opts.algorithm,
                                block_size=opts.block_size, progress=opts.progress)
        descriptors = [layer.descriptor(oci) for layer in native]
        diff_ids = [layer.digest for layer in native]
        for layer in native:
            _put_file(layout, layer.path, layer.digest)
    else:
        turbo = convert_turbo(sources, fs_dir, out_dir, vsize=opts.vsize, progress=opts.progress)
        descriptors = [layer.descriptor(oci) for layer in turbo]
        diff_ids = [layer.diff_id for layer in turbo]
        for layer, src, orig in zip(turbo, sources, image.layers):
            _put_file(layout, layer.path, layer.digest)
            _put_file(layout, src, orig.descriptor.digest)  # the data the meta layers point into
    config = _config_for(image.config, diff_ids)
    config_digest, config_size = _put_blob(layout, json.dumps(config, separators=(",", ":")).encode())
    manifest: dict = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPES[oci],
        "config": {"mediaType": CONFIG_TYPES[oci], "digest": config_digest, "size": config_size},
        "layers": descriptors,
    }
    if opts.referrer:
        src = image.manifest_descriptor
        manifest["artifactType"] = ARTIFACT_TYPES[opts.fmt]
        manifest["subject"] = {"mediaType": src.media_type, "digest": src.digest, "size": src.size}
    digest, size = _put_blob(layout, json.dumps(manifest, separators=(",", ":")).encode())
    platform = dict(zip(("os", "architecture"), image.platform.split("/")[:2]))
    desc = Descriptor(MANIFEST_TYPES[oci], digest, size, annotations={REF_NAME: opts.tag} if opts.tag else {},
                      platform=platform, artifact_type=manifest.get("artifactType"))
    _update_index(layout, desc, opts.tag)
    return ConvertedImage(opts.fmt, desc, manifest, config)


def _is_attestation(desc: Descriptor) -> bool:
    """BuildKit attestation manifests in an index are dropped, not converted (§3.4)."""
    return desc.annotations.get("vnd.docker.reference.type") == "attestation-manifest" or (
        desc.platform or {}).get("os") == "unknown"


def convert_all_platforms(store: BlobStore, ref: Reference, layout: str, workdir: str,
                          opts: ConvertOptions = ConvertOptions()) -> Descriptor:
    """``--all-platforms``: convert every image of the index ``ref`` names into ``layout``.

    Each platform's manifest is converted on its own (with ``--referrer`` its subject
    is its own source manifest); the result is an index of them tagged ``opts.tag``,
    whose subject is the source index (§3.4).  A plain manifest is converted alone.
    Returns the descriptor of the result in the layout.
    """
    desc = store.resolve(ref)
    what = f"{ref} ({desc.digest})"
    doc = parse_json(store.fetch_manifest(desc), what)
    if manifest_kind(doc, desc, what) != "index":
        return convert_image(load_manifest(store, ref, desc, None), layout, workdir, opts).manifest_descriptor
    oci = opts.oci or opts.referrer
    children = []
    for i, entry in enumerate(index_entries(doc, what)):
        if _is_attestation(entry):
            continue
        image = load_manifest(store, ref, entry, None)
        res = convert_image(image, layout, os.path.join(workdir, f"platform{i}"), replace(opts, tag=None))
        child = res.manifest_descriptor
        children.append(Descriptor(child.media_type, child.digest, child.size, platform=entry.platform,
                                   artifact_type=child.artifact_type))
    index: dict = {"schemaVersion": 2, "mediaType": INDEX_TYPES[oci], "manifests": [c.to_json() for c in children]}
    if opts.referrer:
        index["artifactType"] = ARTIFACT_TYPES[opts.fmt]
        index["subject"] = {"mediaType": desc.media_type or doc.get("mediaType", ""), "digest": desc.digest,
                            "size": desc.size}
    digest, size = _put_blob(layout, json.dumps(index, separators=(",", ":")).encode())
    out = Descriptor(INDEX_TYPES[oci], digest, size, annotations={REF_NAME: opts.tag} if opts.tag else {},
                     artifact_type=index.get("artifactType"))
    _update_index(layout, out, opts.tag)
    return out
