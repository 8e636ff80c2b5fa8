"""FastOCI (TurboOCI) output: a meta layer per source layer over the UNMODIFIED original (§4).

Each source layer is applied in ``map`` mode; its meta layer blob
``turboOCIv1.tar.gz`` holds ``ext4.fs.meta`` (ZFile, LZ4 4 KiB, of a sealed
warp LSMT: the changed metadata blocks as tag 0, the file data as tag-1
entries into the original layer's uncompressed tar), the ``.turbo.ociv1``
marker and, for gzip originals, ``gzip.meta`` (the gzip index, §4.4).  The
descriptor carries the §4.1 annotations naming the original layer.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass

from ..errors import UnsupportedError
from ..format.gzindex import build_gzip_index
from ..format.turbooci import build_meta_tar, build_meta_tarball
from ..format.zfile import ZFileWriter
from ..image.store import file_digest
from .apply import MODE_MAP
from .tarstream import GZIP_MAGIC, ZSTD_MAGIC
from .engine import LayerDelta, LayerProgress, apply_layers
from .mkfs import GIB
from .native import ANNOTATION_DIGEST, ANNOTATION_SIZE, ANNOTATION_VERSION
from .sealed import write_layer_lsmt

VERSION = "0.1.0-turbo.ociv1"
ANNOTATION_TARGET_DIGEST = "containerd.io/snapshot/overlaybd/turbo-oci/target-digest"
ANNOTATION_TARGET_MEDIA_TYPE = "containerd.io/snapshot/overlaybd/turbo-oci/target-media-type"
MEDIA_TYPES = {  # (oci, gzip) -> layer media type
    (True, True): "application/vnd.oci.image.layer.v1.tar+gzip",
    (True, False): "application/vnd.oci.image.layer.v1.tar",
    (False, True): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    (False, False): "application/vnd.docker.image.rootfs.diff.tar",
}


@dataclass(frozen=True)
class TurboLayer:
    """One meta layer blob on disk and the original layer it indexes."""

    path: str
    digest: str  # sha256 of the meta tarball
    size: int
    diff_id: str  # sha256 of the uncompressed meta tar
    target_digest: str  # digest of the original layer blob
    target_is_gzip: bool
    mapped_bytes: int  # file data served from the original layer

    def descriptor(self, oci: bool = True) -> dict:
        """The manifest layer descriptor of §4.1."""
        return {
            "mediaType": MEDIA_TYPES[(oci, True)],
            "digest": self.digest,
            "size": self.size,
            "annotations": {
                ANNOTATION_VERSION: VERSION,
                ANNOTATION_DIGEST: self.digest,
                ANNOTATION_SIZE: str(self.size),
                ANNOTATION_TARGET_DIGEST: self.target_digest,
                ANNOTATION_TARGET_MEDIA_TYPE: MEDIA_TYPES[(oci, self.target_is_gzip)],
            },
        }



def _is_gzip(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    if head.startswith(GZIP_MAGIC):
        return True
    if head == ZSTD_MAGIC:
        raise UnsupportedError(f"{path}: FastOCI needs tar or tar+gzip layers; this one is zstd")
    return False


def write_turbo_blob(delta: LayerDelta, path: str) -> TurboLayer:
    """Write the meta layer blob of a map-mode ``delta`` to ``path``."""
    gz = _is_gzip(delta.source)
    fs_meta = io.BytesIO()
    writer = ZFileWriter(fs_meta, algorithm="lz4", block_size=4096)
    write_layer_lsmt(delta, writer, warp=True)
    writer.close()
    gzip_index = None
    if gz:
        with open(delta.source, "rb") as f:
            gzip_index = build_gzip_index(f)
    meta = fs_meta.getvalue()
    with open(path, "wb") as out:
        out.write(build_meta_tarball(meta, gzip_index))
    return TurboLayer(
        path=path,
        digest=file_digest(path),
        size=os.path.getsize(path),
        diff_id="sha256:" + hashlib.sha256(build_meta_tar(meta, gzip_index)).hexdigest(),
        target_digest=file_digest(delta.source),
        target_is_gzip=gz,
        mapped_bytes=sum(m.length for m in delta.applied.mappings),
    )


def convert_turbo(
    layers: list[str], workdir: str, outdir: str, *, vsize: int = 64 * GIB, progress: LayerProgress | None = None
) -> list[TurboLayer]:
    """Build FastOCI meta layer blobs for source layer blobs (bottom first) in ``outdir``."""
    for layer in layers:
        _is_gzip(layer)  # refuse zstd before any work
    os.makedirs(outdir, exist_ok=True)
    return [
        write_turbo_blob(delta, os.path.join(outdir, f"layer{delta.index:04d}.turbo.tar.gz"))
        for delta in apply_layers(layers, workdir, mode=MODE_MAP, vsize=vsize, progress=progress)
    ]
