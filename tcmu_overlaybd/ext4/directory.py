"""ext4 directory entries (``struct ext4_dir_entry_2``) and their parsing.

Directory blocks are read linearly.  Hashed (htree) directories keep their
index in blocks that look like one empty entry spanning the block (and in the
root block, behind a ``..`` entry whose ``rec_len`` covers the rest), so a
linear scan of every block returns exactly the leaf entries.  The checksum
tail of metadata_csum filesystems is an entry with inode 0 and is skipped too.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..crc32c import crc32c_raw
from ..errors import CorruptDataError

# struct ext4_dir_entry_2: inode u32, rec_len u16, name_len u8, file_type u8, name
_ENTRY = struct.Struct("<IHBB")
# without the filetype feature the two bytes are one 16-bit name_len (little-endian: low byte first)
ENTRY_HEADER = 8

# file_type values (EXT4_FT_*) -> the type letters used by ``ls -l``
FILE_TYPES = {0: "?", 1: "-", 2: "d", 3: "c", 4: "b", 5: "p", 6: "s", 7: "l"}


# struct ext4_dir_entry_tail (metadata_csum): looks like an empty 12-byte entry with file type
# 0xDE at the end of each leaf block, then the block's checksum
_TAIL_SIZE = 12
_TAIL_MAGIC = struct.pack("<IHBB", 0, _TAIL_SIZE, 0, 0xDE)


def verify_leaf_tails(data: bytes, base_offset: int, block_size: int, seed: int, blob: str,
                      dir_ino: int) -> None:
    """Check the checksum tail of every leaf block in ``data``; htree index blocks have none."""
    for start in range(0, len(data), block_size):
        tail = start + block_size - _TAIL_SIZE
        if data[tail:tail + 8] != _TAIL_MAGIC:
            continue
        stored = struct.unpack_from("<I", data, tail + 8)[0]
        if crc32c_raw(data[start:tail], seed) != stored:
            raise CorruptDataError(f"directory inode {dir_ino}: block checksum does not match its content",
                                   blob=blob, offset=base_offset + tail + 8)


class DirEntry(NamedTuple):
    """One name in a directory; ``type`` is a letter: - d l c b p s (``?`` if unknown)."""

    name: str
    ino: int
    type: str
    #: the raw name bytes (names are not required to be UTF-8)
    raw_name: bytes


def parse_entries(data: bytes, base_offset: int, block_size: int, has_filetype: bool, blob: str,
                  dir_ino: int) -> list[DirEntry]:
    """Entries in ``data`` (whole directory blocks, or an inline-data area), skipping empty slots."""
    out: list[DirEntry] = []
    append = out.append
    pos = 0
    end = len(data)
    data = bytes(data)
    unpack = _ENTRY.unpack_from
    while pos + ENTRY_HEADER <= end:
        ino, rec_len, name_len, ftype = unpack(data, pos)
        if not has_filetype:  # 16-bit name_len, no file type
            name_len |= ftype << 8
            ftype = 0
        if rec_len < ENTRY_HEADER or rec_len & 3 or ENTRY_HEADER + name_len > rec_len:
            if block_size == 65536 and rec_len in (0, 65535):
                rec_len = 65536
            else:
                raise CorruptDataError(
                    f"directory inode {dir_ino}: bad entry (rec_len {rec_len}, name_len {name_len})",
                    blob=blob, offset=base_offset + pos)
        if pos + rec_len > end or pos // block_size != (pos + rec_len - 1) // block_size:
            raise CorruptDataError(
                f"directory inode {dir_ino}: entry (rec_len {rec_len}) crosses its block",
                blob=blob, offset=base_offset + pos)
        if ino:
            raw = data[pos + ENTRY_HEADER: pos + ENTRY_HEADER + name_len]
            append(DirEntry(raw.decode("utf-8", "surrogateescape"), ino, FILE_TYPES.get(ftype, "?"), raw))
        pos += rec_len
    return out


def parse_inline_dir(iblock: bytes, iblock_offset: int, extra: bytes, extra_offset: int,
                     has_filetype: bool, blob: str, dir_ino: int) -> list[DirEntry]:
    """An inline directory: the 60-byte i_block holds the parent inode number then entries,
    continued (entries never straddle) in the ``system.data`` xattr value ``extra``."""
    parent = struct.unpack_from("<I", iblock, 0)[0]
    entries = [DirEntry(".", dir_ino, "d", b"."), DirEntry("..", parent, "d", b"..")]
    for area, where in ((iblock[4:], iblock_offset + 4), (extra, extra_offset)):
        if area:
            entries += parse_entries(area, where, len(area), has_filetype, blob, dir_ino)
    return entries
