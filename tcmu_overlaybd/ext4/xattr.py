"""Extended attributes: the in-inode area and the external xattr block.

Both start with the magic 0xEA020000 (the block has a 32-byte header,
``struct ext4_xattr_header``; the in-inode area only the 4-byte magic) followed
by ``struct ext4_xattr_entry`` records ended by four zero bytes.  Value
offsets are relative to the first entry (in-inode) or to the block start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..crc32c import crc32c_raw
from ..errors import CorruptDataError

XATTR_MAGIC = 0xEA020000
BLOCK_HEADER_SIZE = 32
# struct ext4_xattr_entry: e_name_len u8, e_name_index u8, e_value_offs u16, e_value_inum u32,
# e_value_size u32, e_hash u32, then the name, padded to 4 bytes
_ENTRY = struct.Struct("<BBHIII")

#: e_name_index -> prefix of the full attribute name
NAME_PREFIXES = {
    0: "",
    1: "user.",
    2: "system.posix_acl_access",
    3: "system.posix_acl_default",
    4: "trusted.",
    6: "security.",
    7: "system.",
    8: "system.richacl",
}


_H_CHECKSUM = 16  # ext4_xattr_header.h_checksum


def xattr_block_checksum_ok(block: bytes, block_nr: int, fs_seed: int) -> bool:
    """metadata_csum of an xattr block: seeded with the filesystem seed and the block number."""
    csum = crc32c_raw(struct.pack("<Q", block_nr), fs_seed)
    csum = crc32c_raw(block[:_H_CHECKSUM], csum)
    csum = crc32c_raw(b"\0\0\0\0", csum)
    csum = crc32c_raw(block[_H_CHECKSUM + 4:], csum)
    return csum == struct.unpack_from("<I", block, _H_CHECKSUM)[0]


@dataclass(frozen=True)
class XattrEntry:
    name: str
    #: the value bytes, or b"" when it lives in another inode (``value_inum``)
    value: bytes
    value_inum: int
    value_size: int


def parse_xattrs(area: bytes, area_offset: int, in_inode: bool, blob: str, owner: int) -> list[XattrEntry]:
    """Decode the entries of an xattr area; an area without the magic has no attributes
    (in-inode) or is corrupt (block)."""
    if len(area) < 4 or struct.unpack_from("<I", area, 0)[0] != XATTR_MAGIC:
        if in_inode:
            return []
        raise CorruptDataError(f"inode {owner}: xattr block has a bad magic", blob=blob, offset=area_offset)
    first = 4 if in_inode else BLOCK_HEADER_SIZE
    value_base = first if in_inode else 0
    out: list[XattrEntry] = []
    pos = first
    while pos + 4 <= len(area) and struct.unpack_from("<I", area, pos)[0] != 0:
        if pos + _ENTRY.size > len(area):
            raise CorruptDataError(f"inode {owner}: truncated xattr entry", blob=blob, offset=area_offset + pos)
        name_len, index, value_offs, value_inum, value_size, _hash = _ENTRY.unpack_from(area, pos)
        name_end = pos + _ENTRY.size + name_len
        if name_end > len(area):
            raise CorruptDataError(f"inode {owner}: xattr name runs past its area",
                                   blob=blob, offset=area_offset + pos)
        pos_next = (name_end + 3) & ~3
        if index not in NAME_PREFIXES:  # e.g. Lustre or Hurd attributes: not shown, like the kernel
            pos = pos_next
            continue
        name = NAME_PREFIXES[index] + area[pos + _ENTRY.size:name_end].decode("utf-8", "surrogateescape")
        value = b""
        if not value_inum:
            start = value_base + value_offs
            if start + value_size > len(area):
                raise CorruptDataError(f"inode {owner}: xattr {name!r} value runs past its area",
                                       blob=blob, offset=area_offset + pos)
            value = bytes(area[start:start + value_size])
        out.append(XattrEntry(name, value, value_inum, value_size))
        pos = pos_next
    return out
