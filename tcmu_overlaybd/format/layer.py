"""Open one overlaybd layer blob: tar wrapper -> ZFile (if magic) -> LSMT (spec §0.3)."""

from __future__ import annotations

from typing import Mapping

from ..block.source import ByteSource
from ..errors import CorruptDataError
from . import lsmt, tarwrap, zfile


def open_layer_blob(source: ByteSource, *, verify: bool = True, warp: bool = False,
                    targets: Mapping[int, ByteSource] | None = None) -> lsmt.LsmtFile:
    """The sealed LSMT layer inside a layer blob (native or TurboOCI ``ext4.fs.meta``).

    ``verify`` checks ZFile block CRCs; ``warp``/``targets`` are passed to
    :meth:`LsmtFile.open` for TurboOCI layers.  Anything that is neither a
    ZFile nor an LSMT file raises CorruptDataError naming the blob.
    """
    payload = tarwrap.unwrap(source)
    if zfile.is_zfile(payload):
        payload = zfile.ZFileReader(payload, verify=verify)
    elif payload.read(0, len(lsmt.MAGIC0)) != lsmt.MAGIC0:
        start = getattr(payload, "start", 0)
        raise CorruptDataError("not an overlaybd layer (neither ZFile nor LSMT magic)",
                               blob=source.name, offset=start)
    return lsmt.LsmtFile.open(payload, warp=warp, targets=targets)
