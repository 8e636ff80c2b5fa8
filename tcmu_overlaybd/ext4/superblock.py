"""The ext4 superblock and group descriptors (layouts from the kernel's ``struct ext4_super_block``).

The superblock sits at byte 1024 of the device whatever the block size.  Only
the fields a read-only reader needs are decoded; offsets are named once here.
Features that change how data is found and that this reader does not
implement are refused with ``UnsupportedError`` instead of guessing.  With
metadata_csum, checksums are the kernel's: raw CRC-32C (no final inversion)
seeded from the filesystem UUID (or ``s_checksum_seed``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..block.source import ByteSource, read_exact
from ..crc32c import crc32c_raw
from ..errors import CorruptDataError, UnsupportedError

SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT4_MAGIC = 0xEF53

# struct ext4_super_block: (name, struct code, byte offset)
_SB_FIELDS = (
    ("inodes_count", "I", 0x00),
    ("blocks_count_lo", "I", 0x04),
    ("first_data_block", "I", 0x14),
    ("log_block_size", "I", 0x18),
    ("blocks_per_group", "I", 0x20),
    ("inodes_per_group", "I", 0x28),
    ("magic", "H", 0x38),
    ("rev_level", "I", 0x4C),
    ("first_ino", "I", 0x54),
    ("inode_size", "H", 0x58),
    ("feature_compat", "I", 0x5C),
    ("feature_incompat", "I", 0x60),
    ("feature_ro_compat", "I", 0x64),
    ("uuid", "16s", 0x68),
    ("volume_name", "16s", 0x78),
    ("desc_size", "H", 0xFE),
    ("first_meta_bg", "I", 0x104),
    ("blocks_count_hi", "I", 0x150),
    ("backup_bgs", "2I", 0x24C),
    ("checksum_type", "B", 0x175),
    ("checksum_seed", "I", 0x270),
    ("checksum", "I", 0x3FC),
)
#: s_checksum covers the superblock up to this offset (metadata_csum)
SB_CHECKSUM_OFFSET = 0x3FC
CHECKSUM_TYPE_CRC32C = 1

# feature_compat
COMPAT_SPARSE_SUPER2 = 0x200
# feature_ro_compat
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_METADATA_CSUM = 0x400
# feature_incompat
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000

#: incompat features this reader understands (RECOVER: an unreplayed journal is
#: ignored, as ``mount -o ro,noload`` does; MMP only matters to writers)
SUPPORTED_INCOMPAT = (
    INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG | INCOMPAT_EXTENTS | INCOMPAT_64BIT
    | INCOMPAT_MMP | INCOMPAT_FLEX_BG | INCOMPAT_EA_INODE | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
)
_INCOMPAT_NAMES = {
    INCOMPAT_COMPRESSION: "compression",
    INCOMPAT_JOURNAL_DEV: "journal_dev",
    INCOMPAT_DIRDATA: "dirdata",
    INCOMPAT_ENCRYPT: "encrypt",
    INCOMPAT_CASEFOLD: "casefold",
}


@dataclass(frozen=True)
class Superblock:
    """The decoded fields of the superblock plus derived geometry."""

    inodes_count: int
    blocks_count: int
    first_data_block: int
    block_size: int
    blocks_per_group: int
    inodes_per_group: int
    rev_level: int
    first_ino: int
    inode_size: int
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    uuid: bytes
    volume_name: str
    desc_size: int
    first_meta_bg: int
    backup_bgs: tuple[int, int]
    #: seed of every metadata checksum (metadata_csum), None when checksums are off
    csum_seed: int | None

    def has_incompat(self, flag: int) -> bool:
        return bool(self.feature_incompat & flag)

    @classmethod
    def read(cls, src: ByteSource) -> "Superblock":
        """Read and validate the superblock of ``src``; refuse features we cannot read."""
        raw = read_exact(src, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE, "ext4 superblock")
        f = {name: struct.unpack_from("<" + code, raw, off) for name, code, off in _SB_FIELDS}
        f = {k: (v if len(v) > 1 else v[0]) for k, v in f.items()}
        if f["magic"] != EXT4_MAGIC:
            raise CorruptDataError(
                f"not an ext2/3/4 filesystem (superblock magic 0x{f['magic']:04x}, want 0x{EXT4_MAGIC:04x})",
                blob=src.name, offset=SUPERBLOCK_OFFSET + 0x38,
            )
        incompat = f["feature_incompat"]
        unknown = incompat & ~SUPPORTED_INCOMPAT
        if unknown:
            names = [n for bit, n in _INCOMPAT_NAMES.items() if unknown & bit]
            rest = unknown & ~sum(_INCOMPAT_NAMES)
            if rest:
                names.append(f"0x{rest:x}")
            raise UnsupportedError(f"{src.name}: ext4 feature(s) not supported: {', '.join(names)}")
        if f["log_block_size"] > 6:
            raise CorruptDataError(f"block size 2^{10 + f['log_block_size']} is invalid",
                                   blob=src.name, offset=SUPERBLOCK_OFFSET + 0x18)
        is64 = bool(incompat & INCOMPAT_64BIT)
        inode_size = f["inode_size"] if f["rev_level"] >= 1 else 128
        desc_size = f["desc_size"] if is64 else 32
        first_ino = f["first_ino"] if f["rev_level"] >= 1 else 11
        block_size = 1024 << f["log_block_size"]
        if (inode_size < 128 or inode_size & (inode_size - 1) or inode_size > block_size
                or desc_size < 32 or desc_size & (desc_size - 1)
                or not f["blocks_per_group"] or not f["inodes_per_group"]):
            raise CorruptDataError(
                f"inconsistent geometry (inode size {inode_size}, descriptor size {desc_size}, "
                f"{f['blocks_per_group']} blocks and {f['inodes_per_group']} inodes per group)",
                blob=src.name, offset=SUPERBLOCK_OFFSET,
            )
        blocks = f["blocks_count_lo"] | ((f["blocks_count_hi"] << 32) if is64 else 0)
        csum_seed = None
        if f["feature_ro_compat"] & RO_COMPAT_METADATA_CSUM:
            if f["checksum_type"] != CHECKSUM_TYPE_CRC32C:
                raise UnsupportedError(f"{src.name}: ext4 checksum type {f['checksum_type']} (only crc32c)")
            computed = crc32c_raw(raw[:SB_CHECKSUM_OFFSET], 0xFFFFFFFF)
            if computed != f["checksum"]:
                raise CorruptDataError(
                    f"superblock checksum 0x{f['checksum']:08x} does not match its content (0x{computed:08x})",
                    blob=src.name, offset=SUPERBLOCK_OFFSET + SB_CHECKSUM_OFFSET)
            csum_seed = (f["checksum_seed"] if incompat & INCOMPAT_CSUM_SEED
                         else crc32c_raw(f["uuid"], 0xFFFFFFFF))
        return cls(
            inodes_count=f["inodes_count"],
            blocks_count=blocks,
            first_data_block=f["first_data_block"],
            block_size=block_size,
            blocks_per_group=f["blocks_per_group"],
            inodes_per_group=f["inodes_per_group"],
            rev_level=f["rev_level"],
            first_ino=first_ino,
            inode_size=inode_size,
            feature_compat=f["feature_compat"],
            feature_incompat=incompat,
            feature_ro_compat=f["feature_ro_compat"],
            uuid=f["uuid"],
            volume_name=f["volume_name"].split(b"\0", 1)[0].decode("utf-8", "replace"),
            desc_size=desc_size,
            first_meta_bg=f["first_meta_bg"],
            backup_bgs=tuple(f["backup_bgs"]),
            csum_seed=csum_seed,
        )

    # -- where the group descriptors live -------------------------------------------------

    def _group_has_super(self, group: int) -> bool:
        if group == 0:
            return True
        if self.feature_compat & COMPAT_SPARSE_SUPER2:
            return group in self.backup_bgs
        if group == 1 or not self.feature_ro_compat & RO_COMPAT_SPARSE_SUPER:
            return True
        for base in (3, 5, 7):
            n = base
            while n < group:
                n *= base
            if n == group:
                return True
        return False

    def descriptor_offset(self, group: int) -> int:
        """Byte offset of group ``group``'s descriptor (handles meta_bg)."""
        per_block = self.block_size // self.desc_size
        meta_group, index = divmod(group, per_block)
        if self.has_incompat(INCOMPAT_META_BG) and meta_group >= self.first_meta_bg:
            first = meta_group * per_block
            block = self.first_data_block + first * self.blocks_per_group
            block += 1 if self._group_has_super(first) else 0
        else:
            block = self.first_data_block + 1 + meta_group
        return block * self.block_size + index * self.desc_size


# struct ext4_group_desc: only where the inode table is
_GD_INODE_TABLE_LO = struct.Struct("<I")  # @0x08
_GD_INODE_TABLE_HI = struct.Struct("<I")  # @0x28 (64-byte descriptors only)


def inode_table_block(sb: Superblock, raw: bytes) -> int:
    """The first block of a group's inode table from its raw descriptor bytes."""
    lo = _GD_INODE_TABLE_LO.unpack_from(raw, 0x08)[0]
    hi = _GD_INODE_TABLE_HI.unpack_from(raw, 0x28)[0] if sb.desc_size >= 64 else 0
    return lo | (hi << 32)
