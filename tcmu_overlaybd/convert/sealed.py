"""Write one layer delta as a sealed LSMT file (spec §1.3; warp layers §4.3)."""

from __future__ import annotations

import os
from typing import BinaryIO

from ..format.lsmt import SealedLayerBuilder
from .apply import Mapping
from .diff import Change
from .engine import LayerDelta

#: changed data is copied from the working image in pieces of this size
COPY_CHUNK = 4 << 20


def write_layer_lsmt(delta: LayerDelta, out: BinaryIO, *, warp: bool = False) -> int:
    """Stream the sealed LSMT of ``delta`` into ``out``; returns its size.

    Native layers carry the changed blocks (zeroed entries where blocks became
    zero) and the chainID UUIDs (§3.1).  Warp layers (FastOCI, ``warp=True``)
    carry the changed metadata blocks plus tag-1 entries pointing into the
    original layer's uncompressed tar, null UUIDs (§4.3).
    """
    vsize = os.stat(delta.image).st_size
    if warp:
        builder = SealedLayerBuilder(vsize, warp=True)
    else:
        builder = SealedLayerBuilder(vsize, uuid=delta.uuid, parent_uuid=delta.parent_uuid)
    builder.bind(out)
    items: list[Change | Mapping] = list(delta.changes)
    if warp:
        items += delta.applied.mappings
    items.sort(key=lambda it: it.offset if isinstance(it, Change) else it.physical)
    fd = os.open(delta.image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for it in items:
            if isinstance(it, Mapping):
                builder.add_remote(it.physical, it.length, it.tar_offset)
            elif it.zero:
                builder.add_zeroed(it.offset, it.length)
            else:
                for pos in range(it.offset, it.offset + it.length, COPY_CHUNK):
                    n = min(COPY_CHUNK, it.offset + it.length - pos)
                    builder.add_data(pos, os.pread(fd, n, pos))
    finally:
        os.close(fd)
    return builder.finish()
