"""Image config, manifest and OCI layout output (OCI image spec: config.md, manifest.md, image-layout.md).

Several images can share one layout directory (and its blobs): each is an
``index.json`` entry tagged with ``org.opencontainers.image.ref.name``, named
``oci:DIR:TAG`` by obd and skopeo.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field

from tcmu_overlaybd.errors import CorruptDataError
from tcmu_overlaybd.image.manifest import OCI_CONFIG, OCI_MANIFEST, REF_NAME
from tcmu_overlaybd.image.oci_layout import INDEX_FILE, write_index
from tcmu_overlaybd.image.store import Descriptor

from .layers import DEFAULT_MTIME_CLAMP, LayerBlob


@dataclass
class ImageConfig:
    """The parts of an OCI image config the benchmark sets (``config`` object fields)."""

    cmd: list[str]
    env: list[str]
    working_dir: str = "/"
    exposed_port: int | None = None
    #: one history line per layer, as ``docker history`` shows them
    history: list[str] = field(default_factory=list)

    def to_json(self, layers: list[LayerBlob]) -> dict:
        created = _rfc3339(DEFAULT_MTIME_CLAMP)
        config = {"Cmd": list(self.cmd), "Env": list(self.env), "WorkingDir": self.working_dir}
        if self.exposed_port:
            config["ExposedPorts"] = {f"{self.exposed_port}/tcp": {}}
        return {
            "created": created,
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
            "history": [{"created": created, "created_by": line} for line in self.history],
        }


def _rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def blob_path(layout: str, digest: str) -> str:
    algo, _, hexpart = digest.partition(":")
    return os.path.join(layout, "blobs", algo, hexpart)


def put_blob(layout: str, data: bytes) -> Descriptor:
    """Store ``data`` as a blob of ``layout``; returns a descriptor without media type."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = blob_path(layout, digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        with open(path + ".part", "wb") as f:
            f.write(data)
        os.replace(path + ".part", path)
    return Descriptor("", digest, len(data))


def write_image(layout: str, tag: str, layers: list[LayerBlob], config: ImageConfig) -> Descriptor:
    """Write config and manifest for ``layers`` (already in ``layout``) and tag the manifest.

    Other tags of the layout are kept; an entry with the same tag is replaced.
    """
    for layer in layers:
        path = blob_path(layout, layer.digest)
        if not os.path.exists(path) or os.path.getsize(path) != layer.size:
            raise CorruptDataError(f"layer blob missing or of the wrong size in {layout}", blob=layer.digest)
    cfg = put_blob(layout, json.dumps(config.to_json(layers), sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": cfg.digest, "size": cfg.size},
        "layers": [{"mediaType": layer.media_type, "digest": layer.digest, "size": layer.size}
                   for layer in layers],
    }
    man = put_blob(layout, json.dumps(manifest, sort_keys=True).encode())
    entry = Descriptor(OCI_MANIFEST, man.digest, man.size, annotations={REF_NAME: tag})
    entries = [e for e in read_index(layout) if e.annotations.get(REF_NAME) != tag]
    write_index(layout, entries + [entry])
    return entry


def read_index(layout: str) -> list[Descriptor]:
    """The entries of ``layout``'s ``index.json`` ([] if there is none yet)."""
    path = os.path.join(layout, INDEX_FILE)
    try:
        with open(path, "rb") as f:
            doc = json.load(f)
        return [Descriptor.from_json(m) for m in doc["manifests"]]
    except FileNotFoundError:
        return []
    except (ValueError, KeyError, TypeError):
        raise CorruptDataError("not an OCI image index", blob=path) from None
