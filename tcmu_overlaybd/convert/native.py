"""Native overlaybd output: one tar-wrapped ZFile'd sealed LSMT blob per source layer (§3.1).

Each blob is ``tar wrapper(ZFile(sealed LSMT))`` of the block diff the layer
made to the working ext4 image; the LSMT UUID is the layer's chainID and its
parent the previous layer's (§3.1).  The descriptor follows §3.3: an
uncompressed-tar media type although the payload is compressed, plus the
overlaybd annotations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..format import tarwrap
from ..format.zfile import ZFileWriter
from ..image.store import file_digest
from .apply import MODE_DATA
from .engine import LayerDelta, LayerProgress, apply_layers
from .mkfs import GIB
from .sealed import write_layer_lsmt

MEDIA_TYPE_OCI = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_DOCKER = "application/vnd.docker.image.rootfs.diff.tar"
ANNOTATION_DIGEST = "containerd.io/snapshot/overlaybd/blob-digest"
ANNOTATION_SIZE = "containerd.io/snapshot/overlaybd/blob-size"
ANNOTATION_VERSION = "containerd.io/snapshot/overlaybd/version"
VERSION = "0.1.0"


@dataclass(frozen=True)
class NativeLayer:
    """One converted layer blob on disk."""

    path: str
    digest: str  # sha256:<hex> of the blob; also its diff_id (§3.3)
    size: int
    source_diff_id: str
    uuid: str

    def descriptor(self, oci: bool = True) -> dict:
        """The manifest layer descriptor of §3.3."""
        return {
            "mediaType": MEDIA_TYPE_OCI if oci else MEDIA_TYPE_DOCKER,
            "digest": self.digest,
            "size": self.size,
            "annotations": {
                ANNOTATION_DIGEST: self.digest,
                ANNOTATION_SIZE: str(self.size),
                ANNOTATION_VERSION: VERSION,
            },
        }



def write_native_blob(delta: LayerDelta, path: str, *, algorithm: str = "lz4", block_size: int = 4096) -> NativeLayer:
    """Write the native layer blob of ``delta`` to ``path``."""
    zpath = path + ".zfile"
    try:
        with open(zpath, "w+b") as zf:
            writer = ZFileWriter(zf, algorithm=algorithm, block_size=block_size)
            write_layer_lsmt(delta, writer)
            zsize = writer.close()
        with open(path, "wb") as out:
            size = tarwrap.wrap(zpath, out, zsize)
    finally:
        if os.path.exists(zpath):
            os.unlink(zpath)
    return NativeLayer(path, file_digest(path), size, delta.applied.diff_id, delta.uuid)


def convert_native(
    layers: list[str],
    workdir: str,
    outdir: str,
    *,
    vsize: int = 64 * GIB,
    algorithm: str = "lz4",
    block_size: int = 4096,
    progress: LayerProgress | None = None,
) -> list[NativeLayer]:
    """Convert source layer blobs (bottom first) into native overlaybd layer blobs in ``outdir``."""
    os.makedirs(outdir, exist_ok=True)
    out = []
    for delta in apply_layers(layers, workdir, mode=MODE_DATA, vsize=vsize, progress=progress):
        out.append(
            write_native_blob(
                delta, os.path.join(outdir, f"layer{delta.index:04d}.obd"), algorithm=algorithm, block_size=block_size
            )
        )
    return out
