"""Raw CRC-32C (spec §0.1): Castagnoli polynomial, no initial and no final inversion.

overlaybd's ZFile blocks, ZFile header digests, gzip indexes and trace files all
use this "raw" variant.  The ``crc32c`` package computes the standard variant
(with both inversions) in C; the two relate by

    raw(data, init) == standard(data, previous=init ^ 0xFFFFFFFF) ^ 0xFFFFFFFF

so the fast implementation is reused and only the inversions are undone.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def _extension():
    """The ``crc32c`` package's C extension, loaded without the package's ``__init__``.

    That ``__init__`` imports ``importlib.metadata`` and asks it for the package's own version,
    which scans the installed distributions: 40 ms on the build host (more under QEMU's TCG,
    over 9p), in every obd process (the CLI, the supervisor and the handler of each mount).
    Falls back to the plain import wherever the extension is not beside it."""
    name = "crc32c._crc32c"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("crc32c")  # locates the package, does not run it
    for where in (spec.submodule_search_locations or []) if spec is not None else []:
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(where, "_crc32c" + suffix)
            if os.path.isfile(path):
                ext = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(ext)
                ext.loader.exec_module(module)
                sys.modules[name] = module
                return module
    import crc32c

    return crc32c


#: ``crc32c(data, value=0)``: the standard CRC-32C (both inversions), in C
crc32c_standard = _extension().crc32c

_MASK = 0xFFFFFFFF

#: init value of the per-block CRC that ZFile appends to each compressed block
ZFILE_BLOCK_CRC_INIT = 100007


def crc32c_raw(data: bytes | bytearray | memoryview, init: int = 0) -> int:
    """CRC-32C of ``data`` starting from ``init``, without inversions."""
    return crc32c_standard(data, init ^ _MASK) ^ _MASK


def crc32c_extend(data: bytes | bytearray | memoryview, crc: int) -> int:
    """Continue a raw CRC over more data (``crc32c_extend(b, crc32c_raw(a)) == crc32c_raw(a+b)``)."""
    return crc32c_raw(data, crc)
