"""Create the base ext4 filesystem of a converted image (spec §6.2) with e2fsprogs.

Upstream (photon ``make_extfs`` on libext2fs) writes: 4 KiB blocks, 256-byte
inodes, 16 KiB per inode, 5 % reserved, rev 1, features ``64bit sparse_super
sparse_super2 (backups in group 1 and the last group) filetype resize_inode
dir_index ext_attr dir_nlink large_file huge_file flex_bg (log_groups_per_flex
0) extents extra_isize``, no journal, half_md4 hash, max mount count -1, an
all-zero UUID and hash seed and ``s_mkfs_time`` = 0.

``mke2fs`` 1.47 reproduces all of that except, by design of mke2fs:

* the all-zero hash seed (mke2fs draws a random one when given zeros): patched
  into the superblock afterwards, together with ``s_mkfs_time`` = 0 and
  ``s_kbytes_written`` = 1;
* lost+found gets mke2fs's 16 KiB instead of photon's 2 blocks, and root and
  lost+found carry the timestamp 1 (``E2FSPROGS_FAKE_TIME``; mke2fs treats 0
  as "unset");
* without ``uninit_bg`` mke2fs zero-fills every inode table (1 GiB at 64 GiB,
  done as unwritten extents); those ranges are punched back to holes so the
  sparse image stays a few MiB.
"""

from __future__ import annotations

import ctypes
import os
import subprocess

from ..errors import ObdError, UsageError
from .ext2fs import Filesystem

GIB = 1 << 30
BLOCK_SIZE = 4096
MIN_VSIZE = 64 << 20

#: spec §6.2 feature list, in mke2fs ``-O`` spelling ("none" first: no config defaults)
FEATURES = (
    "none,64bit,sparse_super,sparse_super2,filetype,resize_inode,dir_index,ext_attr,"
    "dir_nlink,large_file,huge_file,flex_bg,extents,extra_isize"
)

# struct ext2_super_block offsets (ext2_fs.h) of the fields patched after mke2fs
SB_HASH_SEED = 0xEC  # __u32 s_hash_seed[4]
SB_MKFS_TIME = 0x108  # __u32
SB_KBYTES_WRITTEN = 0x178  # __u64

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def mke2fs_command(path: str) -> list[str]:
    """The mke2fs invocation for the spec §6.2 parameters."""
    return [
        "mke2fs", "-F", "-q",
        "-b", str(BLOCK_SIZE), "-I", "256", "-i", "16384", "-m", "5", "-r", "1",
        "-O", FEATURES,
        "-G", "1",
        "-E", "lazy_itable_init=1,num_backup_sb=2,root_owner=0:0,nodiscard",
        "-U", "clear",
        path,
    ]  # fmt: skip


def punch_holes(path: str) -> None:
    """Turn every range SEEK_DATA calls a hole (incl. unwritten extents) into a real hole."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                data = size
            if data > pos:
                if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, pos, data - pos) != 0:
                    return  # filesystem without hole punching: the image just stays bigger
            if data >= size:
                return
            pos = os.lseek(fd, data, os.SEEK_HOLE)
    finally:
        os.close(fd)


def make_ext4(path: str, vsize: int = 64 * GIB) -> None:
    """Create a sparse file of ``vsize`` bytes holding an empty spec §6.2 ext4."""
    if vsize < MIN_VSIZE or vsize % BLOCK_SIZE:
        raise UsageError(f"--vsize must be a multiple of 4 KiB and at least 64 MiB, not {vsize}")
    with open(path, "wb") as f:
        f.truncate(vsize)
    env = dict(os.environ, MKE2FS_CONFIG="/dev/null", E2FSPROGS_FAKE_TIME="1")
    try:
        res = subprocess.run(mke2fs_command(path), env=env, capture_output=True, text=True)
    except FileNotFoundError:
        raise ObdError("mke2fs not found: install e2fsprogs") from None
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise ObdError(f"mke2fs {path} failed: {msg[-1] if msg else 'exit ' + str(res.returncode)}")
    punch_holes(path)
    with Filesystem(path) as fs:
        fs.patch_super(SB_HASH_SEED, bytes(16))
        fs.patch_super(SB_MKFS_TIME, bytes(4))
        fs.patch_super(SB_KBYTES_WRITTEN, (1).to_bytes(8, "little"))
