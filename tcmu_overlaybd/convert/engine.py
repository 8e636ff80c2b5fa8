"""The conversion loop shared by native overlaybd and FastOCI output.

One working ext4 image (a sparse file of ``vsize`` bytes) holds the merged
view of all layers applied so far.  For each source layer: snapshot the image,
apply the layer (:mod:`.apply`), diff the image against the snapshot
(:mod:`.diff`).  Each step yields a :class:`LayerDelta` that the writers turn
into blobs.  Layer 0's diff is taken against an all-zero disk, so it contains
the filesystem made by :func:`.mkfs.make_ext4` (upstream ``--mkfs``, §6.1).
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

#: ``progress(layer_index, bytes_read, bytes_total)`` while a source layer is applied
LayerProgress = Callable[[int, int, int], None]

from ..errors import UsageError
from .apply import MODE_DATA, ApplyResult, Progress, apply_layer_file
from .diff import Change, changed_extents, data_ranges, snapshot
from .mkfs import GIB, make_ext4


@dataclass(frozen=True)
class LayerDelta:
    """What one source layer changed: the block diff plus (map mode) its tar mappings."""

    index: int
    source: str  # path of the source layer blob
    applied: ApplyResult
    changes: list[Change]  # excluding mapped ranges in map mode
    chain_id: str
    uuid: str  # LSMT uuid of this layer (§3.1)
    parent_uuid: str | None
    image: str  # the working image: read change data from here


def next_chain_id(parent: str | None, diff_id: str) -> str:
    """OCI chainID: the diff_id for the bottom layer, else sha256("<parent chainID> <diff_id>")."""
    if parent is None:
        return diff_id
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def chain_ids(diff_ids: Iterable[str]) -> list[str]:
    """The chainIDs of a layer list, bottom first."""
    out: list[str] = []
    for d in diff_ids:
        out.append(next_chain_id(out[-1] if out else None, d))
    return out


def uuid_of(chain_id: str) -> str:
    """§3.1: the first 32 hex digits of a chainID as an 8-4-4-4-12 UUID (lower case)."""
    h = chain_id.split(":", 1)[-1][:32]
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


def _require_sparse(image: str) -> None:
    """Refuse a work directory whose filesystem cannot report holes: every diff would
    then read the whole virtual disk (64 GiB by default)."""
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        data = sum(e - s for s, e in data_ranges(fd, size))
    finally:
        os.close(fd)
    if data > size // 2:
        raise UsageError(f"{os.path.dirname(image)}: the work directory must be on a filesystem with sparse "
                         "files and SEEK_HOLE (ext4, xfs, btrfs, tmpfs)")


def apply_layers(
    layers: list[str],
    workdir: str,
    *,
    mode: str = MODE_DATA,
    vsize: int = 64 * GIB,
    progress: LayerProgress | None = None,
) -> Iterator[LayerDelta]:
    """Apply the layer blobs (bottom first) one by one, yielding each layer's delta.

    The image in ``workdir`` is valid only until the next delta is requested.
    """
    os.makedirs(workdir, exist_ok=True)
    image = os.path.join(workdir, "image.ext4")
    before = os.path.join(workdir, "before.ext4")
    make_ext4(image, vsize)
    _require_sparse(image)
    chain: str | None = None
    parent: str | None = None
    try:
        for i, layer in enumerate(layers):
            if i:
                snapshot(image, before)
            report: Progress | None = functools.partial(progress, i) if progress else None
            applied = apply_layer_file(image, layer, mode, report)
            exclude = [(m.physical, m.length) for m in applied.mappings]
            changes = changed_extents(before if i else None, image, exclude)
            chain = next_chain_id(chain, applied.diff_id)
            uuid = uuid_of(chain)
            yield LayerDelta(i, layer, applied, changes, chain, uuid, parent, image)
            parent = uuid
    finally:
        if os.path.exists(before):
            os.unlink(before)
