"""Where a file's blocks are: extent trees (ext4) and legacy block maps (ext2/ext3).

Both are turned into one sorted list of ``Run(logical_block, physical_block,
count, uninit)``; blocks not covered by a run are holes.  ``uninit`` runs are
allocated but unwritten (they read as zeros).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable

from ..crc32c import crc32c_raw
from ..errors import CorruptDataError
from .inode import Inode

# struct ext4_extent_header (12 bytes) and its entries (12 bytes each)
EXTENT_MAGIC = 0xF30A
_HEADER = struct.Struct("<HHHHI")   # eh_magic, eh_entries, eh_max, eh_depth, eh_generation
_INDEX = struct.Struct("<IIH2x")    # ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused
_LEAF = struct.Struct("<IHHI")      # ee_block, ee_len, ee_start_hi, ee_start_lo
ENTRY_SIZE = 12
MAX_DEPTH = 5
#: ee_len above this marks an unwritten (uninitialised) extent of ee_len - this blocks
UNINIT_BIAS = 32768

#: i_block slots of the legacy map: 12 direct, then single, double, triple indirect
DIRECT_SLOTS = 12

#: read_block(block_number, offset_of_the_pointer_on_disk) -> one block of bytes
ReadBlock = Callable[[int, int], bytes]


@dataclass(frozen=True)
class Run:
    logical: int
    physical: int
    count: int
    uninit: bool = False


def _append(runs: list[Run], logical: int, physical: int, count: int, uninit: bool) -> None:
    if runs:
        last = runs[-1]
        if (last.uninit == uninit and last.logical + last.count == logical
                and last.physical + last.count == physical):
            runs[-1] = Run(last.logical, last.physical, last.count + count, uninit)
            return
    runs.append(Run(logical, physical, count, uninit))


def extent_runs(inode: Inode, read_block: ReadBlock, block_size: int, blob: str,
                csum_seed: int | None = None) -> list[Run]:
    """Walk the extent tree rooted in ``inode.block``; depth > 0 nodes are read with ``read_block``.

    With ``csum_seed`` (metadata_csum) each node block's ``ext4_extent_tail`` checksum is checked.
    """
    runs: list[Run] = []
    # stack of (node bytes, disk offset of the node, expected depth or None at the root)
    pending = [(inode.block, inode.offset + 0x28, None)]
    while pending:
        node, where, want_depth = pending.pop()
        magic, entries, maximum, depth, _gen = _HEADER.unpack_from(node, 0)
        if magic != EXTENT_MAGIC:
            raise CorruptDataError(f"inode {inode.ino}: bad extent header magic 0x{magic:04x}",
                                   blob=blob, offset=where)
        if (entries > maximum or 12 + entries * ENTRY_SIZE > len(node) or depth > MAX_DEPTH
                or (want_depth is not None and depth != want_depth)):
            raise CorruptDataError(
                f"inode {inode.ino}: inconsistent extent node ({entries}/{maximum} entries, depth {depth})",
                blob=blob, offset=where)
        if csum_seed is not None and want_depth is not None:
            tail = 12 + maximum * ENTRY_SIZE  # struct ext4_extent_tail follows eh_max entries
            if tail + 4 > len(node) or crc32c_raw(node[:tail], csum_seed) != struct.unpack_from(
                    "<I", node, tail)[0]:
                raise CorruptDataError(f"inode {inode.ino}: extent block checksum does not match its content",
                                       blob=blob, offset=where + min(tail, len(node) - 4))
        if depth == 0:
            for i in range(entries):
                lblk, length, hi, lo = _LEAF.unpack_from(node, 12 + i * ENTRY_SIZE)
                uninit = length > UNINIT_BIAS
                if uninit:
                    length -= UNINIT_BIAS
                if length:
                    _append(runs, lblk, lo | (hi << 32), length, uninit)
        else:
            children = []
            for i in range(entries):
                _lblk, lo, hi = _INDEX.unpack_from(node, 12 + i * ENTRY_SIZE)
                child = lo | (hi << 32)
                children.append((read_block(child, where + 12 + i * ENTRY_SIZE), child * block_size, depth - 1))
            pending.extend(reversed(children))  # keep logical order
    return runs


def blockmap_runs(inode: Inode, read_block: ReadBlock, block_size: int, blob: str,
                  csum_seed: int | None = None) -> list[Run]:
    """Follow the 12 direct and the single/double/triple indirect pointers of an ext2/3 inode
    (indirect blocks carry no checksum, so ``csum_seed`` is unused)."""
    runs: list[Run] = []
    nblocks = -(-inode.size // block_size)
    per_block = block_size // 4
    slots = struct.unpack("<15I", inode.block)
    logical = 0
    for slot in range(DIRECT_SLOTS):
        if logical >= nblocks:
            return runs
        if slots[slot]:
            _append(runs, logical, slots[slot], 1, False)
        logical += 1

    def walk(pointer: int, where: int, level: int, logical: int) -> int:
        span = per_block ** level
        if pointer == 0:
            return logical + span
        table = struct.unpack(f"<{per_block}I", read_block(pointer, where))
        for i, ptr in enumerate(table):
            if logical >= nblocks:
                break
            if level == 1:
                if ptr:
                    _append(runs, logical, ptr, 1, False)
                logical += 1
            else:
                logical = walk(ptr, pointer * block_size + 4 * i, level - 1, logical)
        return logical

    for level, slot in ((1, 12), (2, 13), (3, 14)):
        if logical >= nblocks:
            break
        logical = walk(slots[slot], inode.offset + 0x28 + 4 * slot, level, logical)
    return runs
