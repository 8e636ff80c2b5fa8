"""The acceleration layer (spec §7.2): a trace or prefetch list stored with the image.

The layer is an uncompressed tar holding one file ``trace`` (mode 0444),
appended to the manifest with media type ``application/vnd.oci.image.layer.v1.tar``
and the annotations upstream's ``ctr record-trace`` writes (version 0.1.0,
blob digest and size, ``acceleration-layer: yes``, the file-system type of the
layer below); the config gets its digest as a diff_id and an "Acceleration
Layer" history entry.  A mount of the image replays it automatically.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import io
import tarfile

from ..errors import CorruptDataError
from ..image.manifest import (ANN_ACCELERATION, ANN_BLOB_DIGEST, ANN_BLOB_SIZE, ANN_FS_TYPE, ANN_VERSION)

#: the member holding the trace or list
MEMBER = "trace"
MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar"
LAYER_VERSION = "0.1.0"
HISTORY_ENTRY = "Acceleration Layer"
#: acceleration layers and prefetch files larger than this are refused (1 M trace records = 24 MB)
MAX_SIZE = 64 << 20


def build_layer(data: bytes) -> bytes:
    """The tar blob of an acceleration layer holding ``data`` (deterministic: owner 0, mtime 0)."""
    out = io.BytesIO()
    info = tarfile.TarInfo(MEMBER)
    info.size, info.mode, info.mtime = len(data), 0o444, 0
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def read_layer(blob: bytes, name: str) -> bytes:
    """The ``trace`` member of an acceleration layer blob."""
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tar:
            f = tar.extractfile(tar.getmember(MEMBER))
            if f is None:
                raise KeyError(f"{MEMBER} is not a regular file")
            return f.read()
    except (tarfile.TarError, KeyError) as e:
        raise CorruptDataError(f"not a tar holding a {MEMBER!r} file ({e})", blob=name) from None


def append_to_image(manifest: dict, config: dict, layer_blob: bytes) -> tuple[dict, dict, dict]:
    """(manifest, config, layer descriptor) with the acceleration layer ``layer_blob`` on top.

    An acceleration layer the image already has is replaced.  The caller
    pushes the layer and the new config, and sets the manifest's config
    descriptor (``config_descriptor``).
    """
    manifest, config = copy.deepcopy(manifest), copy.deepcopy(config)
    layers = manifest.get("layers", [])
    diff_ids = config.setdefault("rootfs", {}).setdefault("diff_ids", [])
    history = config.get("history")
    if layers and layers[-1].get("annotations", {}).get(ANN_ACCELERATION) == "yes":
        layers.pop()
        if len(diff_ids) > len(layers):
            diff_ids.pop()
        if history and history[-1].get("created_by") == HISTORY_ENTRY:
            history.pop()
    digest = "sha256:" + hashlib.sha256(layer_blob).hexdigest()
    annotations = {ANN_VERSION: LAYER_VERSION, ANN_BLOB_DIGEST: digest, ANN_BLOB_SIZE: str(len(layer_blob)),
                   ANN_ACCELERATION: "yes"}
    fs_type = layers[-1].get("annotations", {}).get(ANN_FS_TYPE) if layers else None
    if fs_type:
        annotations[ANN_FS_TYPE] = fs_type
    desc = {"mediaType": MEDIA_TYPE, "digest": digest, "size": len(layer_blob), "annotations": annotations}
    layers.append(desc)
    manifest["layers"] = layers
    diff_ids.append(digest)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config.setdefault("history", []).append({"created": now, "created_by": HISTORY_ENTRY})
    return manifest, config, desc


def config_descriptor(manifest: dict, config_bytes: bytes) -> dict:
    """The manifest's config descriptor pointing at ``config_bytes``."""
    return {**manifest["config"], "digest": "sha256:" + hashlib.sha256(config_bytes).hexdigest(),
            "size": len(config_bytes)}
