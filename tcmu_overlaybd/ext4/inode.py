"""ext4 inodes (kernel ``struct ext4_inode``): mode, size, times, links, block pointers.

Timestamps are returned in nanoseconds since the epoch: the 32-bit seconds
field is signed and extended by the two "epoch" bits of the ``*_extra``
field, whose upper 30 bits are the nanoseconds (only present when the inode's
``i_extra_isize`` covers them).
"""

from __future__ import annotations

import stat as _stat
import struct
from dataclasses import dataclass

from ..crc32c import crc32c_raw

# struct ext4_inode, first 128 bytes ("good old" inode)
_BASE = struct.Struct(
    "<H"    # 0x00 i_mode
    "H"     # 0x02 i_uid (low 16)
    "I"     # 0x04 i_size_lo
    "I"     # 0x08 i_atime
    "I"     # 0x0C i_ctime
    "I"     # 0x10 i_mtime
    "I"     # 0x14 i_dtime
    "H"     # 0x18 i_gid (low 16)
    "H"     # 0x1A i_links_count
    "I"     # 0x1C i_blocks_lo
    "I"     # 0x20 i_flags
    "4x"    # 0x24 osd1
    "60s"   # 0x28 i_block[15]
    "I"     # 0x64 i_generation
    "I"     # 0x68 i_file_acl_lo
    "I"     # 0x6C i_size_high
    "4x"    # 0x70 i_obso_faddr
    "H"     # 0x74 l_i_blocks_high
    "H"     # 0x76 l_i_file_acl_high
    "H"     # 0x78 l_i_uid_high
    "H"     # 0x7A l_i_gid_high
    "4x"    # 0x7C checksum_lo, reserved
)
GOOD_OLD_INODE_SIZE = 128
_EXTRA_ISIZE = struct.Struct("<H")  # @0x80
# from 0x84: i_ctime_extra, i_mtime_extra, i_atime_extra, i_crtime, i_crtime_extra -- only the
# fields that i_extra_isize covers are valid, so there is one struct per count
_EXTRA_FIELDS = [struct.Struct("<" + "I" * n) for n in range(6)]

# i_flags
FL_INDEX = 0x1000          # hashed (htree) directory
FL_HUGE_FILE = 0x40000     # i_blocks counts file-system blocks
FL_EXTENTS = 0x80000
FL_EA_INODE = 0x200000
FL_INLINE_DATA = 0x10000000

ROOT_INO = 2
# metadata_csum: i_checksum_lo @0x7C (16 bits), i_checksum_hi @0x82 (present if extra_isize >= 4)
_CSUM_LO = 0x7C
_CSUM_HI = 0x82


def inode_seed(fs_seed: int, ino: int, generation: int) -> int:
    """Seed of an inode's own checksums (inode, extent blocks, directory blocks)."""
    return crc32c_raw(struct.pack("<I", generation), crc32c_raw(struct.pack("<I", ino), fs_seed))


def inode_checksum_ok(raw: bytes, seed: int) -> bool:
    """Whether the checksum stored in ``raw`` matches (``seed`` from :func:`inode_seed`)."""
    stored = struct.unpack_from("<H", raw, _CSUM_LO)[0]
    extra = struct.unpack_from("<H", raw, 0x80)[0] if len(raw) > GOOD_OLD_INODE_SIZE else 0
    has_hi = len(raw) > GOOD_OLD_INODE_SIZE and GOOD_OLD_INODE_SIZE + extra >= _CSUM_HI + 2
    zero16 = b"\0\0"
    csum = crc32c_raw(raw[:_CSUM_LO], seed)
    csum = crc32c_raw(zero16, csum)
    csum = crc32c_raw(raw[_CSUM_LO + 2:GOOD_OLD_INODE_SIZE], csum)
    if len(raw) > GOOD_OLD_INODE_SIZE:
        csum = crc32c_raw(raw[GOOD_OLD_INODE_SIZE:_CSUM_HI], csum)
        rest = _CSUM_HI
        if has_hi:
            csum = crc32c_raw(zero16, csum)
            rest += 2
            stored |= struct.unpack_from("<H", raw, _CSUM_HI)[0] << 16
        csum = crc32c_raw(raw[rest:], csum)
    if not has_hi:
        csum &= 0xFFFF
    return csum == stored


def _time_ns(seconds: int, extra: int | None) -> int:
    secs = seconds - (1 << 32) if seconds & 0x80000000 else seconds
    if extra is None:
        return secs * 1_000_000_000
    return (secs + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


@dataclass
class Inode:
    """One decoded inode; ``offset`` is its byte position on the disk (for error messages)."""

    ino: int
    offset: int
    mode: int
    uid: int
    gid: int
    size: int
    links: int
    flags: int
    block: bytes  # the raw 60-byte i_block area (extent root, block map, inline data or symlink)
    file_acl: int
    blocks_512: int  # allocated space in 512-byte units
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int | None
    generation: int
    #: the in-inode extended attribute area (after i_extra_isize), may be empty
    xattr_area: bytes
    #: byte offset on disk of ``xattr_area``
    xattr_area_offset: int
    #: seed of this inode's extent-block and directory-block checksums (metadata_csum only)
    csum_seed: int | None = None

    @classmethod
    def from_bytes(cls, ino: int, raw: bytes, offset: int, block_size: int, huge_file: bool) -> "Inode":
        (mode, uid, size_lo, atime, ctime, mtime, _dtime, gid, links, blocks_lo, flags, block,
         generation, acl_lo, size_hi, blocks_hi, acl_hi, uid_hi, gid_hi) = _BASE.unpack_from(raw, 0)
        extra_isize = _EXTRA_ISIZE.unpack_from(raw, 0x80)[0] if len(raw) > GOOD_OLD_INODE_SIZE else 0
        if extra_isize & 3 or GOOD_OLD_INODE_SIZE + extra_isize > len(raw):
            extra_isize = 0  # garbage: act as if there were no extra fields
        end_extra = GOOD_OLD_INODE_SIZE + extra_isize
        # *_extra fields: ctime @0x84, mtime @0x88, atime @0x8C, crtime @0x90 + crtime_extra @0x94
        n_extra = min(5, max(0, (end_extra - 0x84) // 4))
        extra = _EXTRA_FIELDS[n_extra].unpack_from(raw, 0x84) + (None,) * (5 - n_extra)
        ctime_x, mtime_x, atime_x, crtime, crtime_x = extra
        crtime_ns = _time_ns(crtime, crtime_x) if crtime_x is not None else None
        blocks = blocks_lo | (blocks_hi << 32)
        if huge_file and flags & FL_HUGE_FILE:
            blocks *= block_size // 512
        return cls(
            ino=ino,
            offset=offset,
            mode=mode,
            uid=uid | (uid_hi << 16),
            gid=gid | (gid_hi << 16),
            size=size_lo | (size_hi << 32),
            links=links,
            flags=flags,
            block=block,
            file_acl=acl_lo | (acl_hi << 32),
            blocks_512=blocks,
            atime_ns=_time_ns(atime, atime_x),
            mtime_ns=_time_ns(mtime, mtime_x),
            ctime_ns=_time_ns(ctime, ctime_x),
            crtime_ns=crtime_ns,
            generation=generation,
            xattr_area=bytes(raw[end_extra:]),
            xattr_area_offset=offset + end_extra,
        )

    # -- types ----------------------------------------------------------------------------

    @property
    def is_dir(self) -> bool:
        return _stat.S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return _stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return _stat.S_ISLNK(self.mode)

    @property
    def is_device(self) -> bool:
        return _stat.S_ISCHR(self.mode) or _stat.S_ISBLK(self.mode)

    @property
    def has_extents(self) -> bool:
        return bool(self.flags & FL_EXTENTS)

    @property
    def has_inline_data(self) -> bool:
        return bool(self.flags & FL_INLINE_DATA)

    def data_blocks_512(self, block_size: int) -> int:
        """Allocated 512-byte units excluding the external xattr block."""
        return self.blocks_512 - (block_size // 512 if self.file_acl else 0)

    def device_numbers(self) -> tuple[int, int]:
        """(major, minor) of a character or block device (old or new encoding in i_block)."""
        old, new = struct.unpack_from("<II", self.block, 0)
        if old:
            return (old >> 8) & 0xFF, old & 0xFF
        return (new >> 8) & 0xFFF, (new & 0xFF) | ((new >> 12) & 0xFFF00)
