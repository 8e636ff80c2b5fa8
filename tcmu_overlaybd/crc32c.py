"""Raw CRC-32C (spec §0.1): Castagnoli polynomial, no initial and no final inversion.

overlaybd's ZFile blocks, ZFile header digests, gzip indexes and trace files all
use this "raw" variant.  The ``crc32c`` package computes the standard variant
(with both inversions) in C; the two relate by

    raw(data, init) == standard(data, previous=init ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

so the fast implementation is reused and only the inversions are undone.
"""

from __future__ import annotations

import crc32c as _crc

_MASK = 0xFFFFFFFF

#: init value of the per-block CRC that ZFile appends to each compressed block
ZFILE_BLOCK_CRC_INIT = 100007


def crc32c_raw(data: bytes | bytearray | memoryview, init: int = 0) -> int:
    """CRC-32C of ``data`` starting from ``init``, without inversions."""
    return _crc.crc32c(data, init ^ _MASK) ^ _MASK


def crc32c_extend(data: bytes | bytearray | memoryview, crc: int) -> int:
    """Continue a raw CRC over more data (``crc32c_extend(b, crc32c_raw(a)) == crc32c_raw(a+b)``)."""
    return crc32c_raw(data, crc)
