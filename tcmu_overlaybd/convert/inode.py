"""The ext4 on-disk inode (``struct ext2_inode_large``, ext2_fs.h) as a raw buffer.

Fields are declared once below (offsets in bytes, little-endian) together with
the encodings the converter needs: 64-bit sizes, 32-bit uid/gid split in two
halves, timestamps with nanoseconds and epoch bits in the ``*_extra`` words,
device numbers in the old (8:8) or new format, an empty extent-tree root.
"""

from __future__ import annotations

import stat
import struct

EXT4_EXTENTS_FL = 0x00080000

INODE_SIZE = 256  # spec §6.2: 256-byte inodes
#: EXT2_GOOD_OLD_INODE_SIZE + i_extra_isize == sizeof(struct ext2_inode_large) in 1.47
EXTRA_ISIZE = 32
_U16, _U32 = struct.Struct("<H"), struct.Struct("<I")
_FIELDS = {  # name: (offset, struct)
    "i_mode": (0x00, _U16),
    "i_uid": (0x02, _U16),
    "i_size_lo": (0x04, _U32),
    "i_atime": (0x08, _U32),
    "i_ctime": (0x0C, _U32),
    "i_mtime": (0x10, _U32),
    "i_dtime": (0x14, _U32),
    "i_gid": (0x18, _U16),
    "i_links_count": (0x1A, _U16),
    "i_blocks_lo": (0x1C, _U32),
    "i_flags": (0x20, _U32),
    "i_block0": (0x28, _U32),
    "i_block1": (0x2C, _U32),
    "i_file_acl_lo": (0x68, _U32),
    "i_size_high": (0x6C, _U32),
    "i_uid_high": (0x78, _U16),
    "i_gid_high": (0x7A, _U16),
    "i_extra_isize": (0x80, _U16),
    "i_ctime_extra": (0x84, _U32),
    "i_mtime_extra": (0x88, _U32),
    "i_atime_extra": (0x8C, _U32),
    "i_crtime": (0x90, _U32),
    "i_crtime_extra": (0x94, _U32),
}
_I_BLOCK = slice(0x28, 0x28 + 60)
#: empty extent tree root in i_block: magic 0xF30A, 0 entries, max 4, depth 0, generation 0
_EMPTY_EXTENT_ROOT = struct.pack("<HHHHI", 0xF30A, 0, 4, 0, 0)


def _split_time(seconds: int, nsec: int) -> tuple[int, int]:
    """ext4 timestamp encoding: low 32 bits signed + (epoch bits | nsec << 2) in *_extra."""
    lo = seconds & 0xFFFFFFFF
    signed_lo = lo - (1 << 32) if lo & 0x80000000 else lo
    epoch = ((seconds - signed_lo) >> 32) & 3
    return lo, epoch | (nsec << 2)


def _encode_rdev(major: int, minor: int) -> tuple[int, int]:
    """Device number in i_block[0] (old 8:8 format) or i_block[1] (new format), like Linux."""
    if major < 256 and minor < 256:
        return (major << 8) | minor, 0
    return 0, (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def decode_rdev(block0: int, block1: int) -> tuple[int, int]:
    """Inverse of the device number encoding (major, minor)."""
    if block0:
        return (block0 >> 8) & 0xFF, block0 & 0xFF
    return (block1 & 0xFFF00) >> 8, (block1 & 0xFF) | ((block1 >> 12) & 0xFFF00)


class Inode:
    """One raw inode buffer with named field access."""

    __slots__ = ("buf",)

    def __init__(self, buf: bytes | bytearray | None = None):
        self.buf = bytearray(buf) if buf is not None else bytearray(INODE_SIZE)

    def get(self, name: str) -> int:
        off, st = _FIELDS[name]
        return st.unpack_from(self.buf, off)[0]

    def set(self, name: str, value: int) -> None:
        off, st = _FIELDS[name]
        st.pack_into(self.buf, off, value)

    @property
    def mode(self) -> int:
        return self.get("i_mode")

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def links(self) -> int:
        return self.get("i_links_count")

    @property
    def size(self) -> int:
        return self.get("i_size_lo") | (self.get("i_size_high") << 32)

    def set_size(self, size: int) -> None:
        self.set("i_size_lo", size & 0xFFFFFFFF)
        self.set("i_size_high", size >> 32)

    def set_owner(self, uid: int, gid: int) -> None:
        self.set("i_uid", uid & 0xFFFF)
        self.set("i_uid_high", uid >> 16)
        self.set("i_gid", gid & 0xFFFF)
        self.set("i_gid_high", gid >> 16)

    def set_times(self, seconds: int, nsec: int = 0) -> None:
        """atime = mtime = ctime = crtime = the given time (like upstream's utimes)."""
        lo, extra = _split_time(seconds, nsec)
        for base in ("i_atime", "i_mtime", "i_ctime", "i_crtime"):
            self.set(base, lo)
            self.set(base + "_extra", extra)

    def set_rdev(self, major: int, minor: int) -> None:
        b0, b1 = _encode_rdev(major, minor)
        self.set("i_block0", b0)
        self.set("i_block1", b1)

    def fast_link_target(self) -> bytes:
        """A fast symlink's target, stored in i_block itself."""
        return bytes(self.buf[_I_BLOCK][: self.size])

    def is_fast_link(self) -> bool:
        """Symlink whose target fits i_block (no extents flag, < 60 bytes)."""
        return self.size < 60 and not self.get("i_flags") & EXT4_EXTENTS_FL

    def init_extents(self) -> None:
        """Mark the inode extent-mapped with an empty tree (regular files)."""
        self.buf[_I_BLOCK] = _EMPTY_EXTENT_ROOT.ljust(60, b"\0")
        self.set("i_flags", self.get("i_flags") | EXT4_EXTENTS_FL)

    @classmethod
    def new(cls, mode: int, uid: int, gid: int, seconds: int, nsec: int) -> "Inode":
        ino = cls()
        ino.set("i_mode", mode)
        ino.set("i_links_count", 1)
        ino.set("i_extra_isize", EXTRA_ISIZE)
        ino.set_owner(uid, gid)
        ino.set_times(seconds, nsec)
        return ino
