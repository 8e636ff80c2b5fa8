"""A small ctypes binding of Debian's ``libext2fs.so.2`` (e2fsprogs 1.47).

Only what the converter needs: open/close an ext4 image file in userspace
(``unix_io_manager``, no root, no kernel mount), look names up, create and
remove inodes (files, directories, symlinks, devices, FIFOs, hard links),
write file data, ``fallocate`` initialised extents (FastOCI mapping, spec
§4.2), xattrs, and list a file's physical extents.

Inodes are handled as raw 256-byte ``ext2_inode_large`` buffers
(:class:`.inode.Inode`).  Directory entries are kept in memory per directory
and appended to a directory's last block, so big directories cost O(1) per
entry.  Every libext2fs failure becomes an :class:`Ext2fsError` naming the
image and the operation.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import stat
import struct
from dataclasses import dataclass
from typing import Iterator

from ..errors import ObdError
from .inode import INODE_SIZE, Inode

# --------------------------------------------------------------------------------------------
# Library loading and prototypes

_c = ctypes
_P = _c.c_void_p
_errcode = _c.c_long
_ino = _c.c_uint32
_blk64 = _c.c_uint64

try:
    _lib = _c.CDLL("libext2fs.so.2", use_errno=True)
    _com_err = _c.CDLL("libcom_err.so.2")
except OSError as e:  # pragma: no cover - depends on the host
    raise ImportError(f"libext2fs.so.2 is needed for conversion (apt install libext2fs2): {e}")

_com_err.error_message.restype = _c.c_char_p
_com_err.error_message.argtypes = [_errcode]
_lib.initialize_ext2_error_table.restype = None
_lib.initialize_ext2_error_table()

#: (name, restype, argtypes) of every libext2fs function used here
_PROTOTYPES = [
    ("ext2fs_open2", _errcode, [_c.c_char_p, _c.c_char_p, _c.c_int, _c.c_int, _c.c_uint, _P, _c.POINTER(_P)]),
    ("ext2fs_close2", _errcode, [_P, _c.c_int]),
    ("ext2fs_free", None, [_P]),
    ("ext2fs_flush", _errcode, [_P]),
    ("ext2fs_read_bitmaps", _errcode, [_P]),
    ("ext2fs_lookup", _errcode, [_P, _ino, _c.c_char_p, _c.c_int, _P, _c.POINTER(_ino)]),
    ("ext2fs_new_inode", _errcode, [_P, _ino, _c.c_int, _P, _c.POINTER(_ino)]),
    ("ext2fs_inode_alloc_stats2", None, [_P, _ino, _c.c_int, _c.c_int]),
    ("ext2fs_read_inode_full", _errcode, [_P, _ino, _c.c_char_p, _c.c_int]),
    ("ext2fs_write_inode_full", _errcode, [_P, _ino, _c.c_char_p, _c.c_int]),
    ("ext2fs_link", _errcode, [_P, _ino, _c.c_char_p, _ino, _c.c_int]),
    ("ext2fs_unlink", _errcode, [_P, _ino, _c.c_char_p, _ino, _c.c_int]),
    ("ext2fs_expand_dir", _errcode, [_P, _ino]),
    ("ext2fs_mkdir", _errcode, [_P, _ino, _ino, _c.c_char_p]),
    ("ext2fs_symlink", _errcode, [_P, _ino, _ino, _c.c_char_p, _c.c_char_p]),
    ("ext2fs_punch", _errcode, [_P, _ino, _c.c_char_p, _c.c_char_p, _blk64, _blk64]),
    ("ext2fs_free_ext_attr", _errcode, [_P, _ino, _c.c_char_p]),
    ("ext2fs_inode_has_valid_blocks2", _c.c_int, [_P, _c.c_char_p]),
    ("ext2fs_fallocate", _errcode, [_P, _c.c_int, _ino, _c.c_char_p, _blk64, _blk64, _blk64]),
    ("ext2fs_file_open", _errcode, [_P, _ino, _c.c_int, _c.POINTER(_P)]),
    ("ext2fs_file_llseek", _errcode, [_P, _c.c_uint64, _c.c_int, _c.POINTER(_c.c_uint64)]),
    ("ext2fs_file_read", _errcode, [_P, _c.c_char_p, _c.c_uint, _c.POINTER(_c.c_uint)]),
    ("ext2fs_file_write", _errcode, [_P, _c.c_char_p, _c.c_uint, _c.POINTER(_c.c_uint)]),
    ("ext2fs_file_set_size2", _errcode, [_P, _c.c_uint64]),
    ("ext2fs_file_close", _errcode, [_P]),
    ("ext2fs_xattrs_open", _errcode, [_P, _ino, _c.POINTER(_P)]),
    ("ext2fs_xattrs_read", _errcode, [_P]),
    ("ext2fs_xattr_set", _errcode, [_P, _c.c_char_p, _c.c_char_p, _c.c_size_t]),
    ("ext2fs_xattrs_close", _errcode, [_c.POINTER(_P)]),
    ("ext2fs_extent_open2", _errcode, [_P, _ino, _c.c_char_p, _c.POINTER(_P)]),
    ("ext2fs_extent_get", _errcode, [_P, _c.c_int, _P]),
    ("ext2fs_extent_free", None, [_P]),
    ("ext2fs_dir_iterate2", _errcode, [_P, _ino, _c.c_int, _P, _P, _P]),
    ("ext2fs_bmap2", _errcode, [_P, _ino, _P, _P, _c.c_int, _blk64, _P, _c.POINTER(_blk64)]),
    ("ext2fs_read_dir_block4", _errcode, [_P, _blk64, _c.c_char_p, _c.c_int, _ino]),
    ("ext2fs_write_dir_block4", _errcode, [_P, _blk64, _c.c_char_p, _c.c_int, _ino]),
]
for _name, _res, _args in _PROTOTYPES:
    _fn = getattr(_lib, _name)
    _fn.restype = _res
    _fn.argtypes = _args

_UNIX_IO_MANAGER = _P.in_dll(_lib, "unix_io_manager")

# Constants from ext2fs.h / ext2_fs.h / ext2_err.h (e2fsprogs 1.47)
EXT2_FLAG_RW = 0x01
EXT2_FLAG_64BITS = 0x20000
EXT2_FLAG_DIRTY = 0x04
EXT2_FLAG_CHANGED = 0x02
EXT2_FLAG_MASTER_SB_ONLY = 0x200
EXT2_FILE_WRITE = 0x0001
EXT2_FALLOCATE_FORCE_INIT = 0x2
EXT2_ET_FILE_NOT_FOUND = 2133571404
EXT2_ET_DIR_NO_SPACE = 2133571366
EXT2_ET_EXTENT_NO_NEXT = 2133571452
EXT2_ET_NO_CURRENT_NODE = 2133571456
EXT2_EXTENT_ROOT = 0x0001
EXT2_EXTENT_NEXT = 0x0009
EXT2_EXTENT_FLAGS_LEAF = 0x0001
EXT2_EXTENT_FLAGS_UNINIT = 0x0002
EXT2_EXTENT_FLAGS_SECOND_VISIT = 0x0004
DIRENT_OTHER_FILE = 3
EXT2_INDEX_FL = 0x00001000
ROOT_INO = 2
DIR_NLINK_MAX = 65000  # EXT4_LINK_MAX

#: dirent file types (ext2_fs.h EXT2_FT_*) by the S_IFMT of the inode
FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}


class Ext2fsError(ObdError):
    """A libext2fs call failed; ``code`` is the com_err error code."""

    def __init__(self, image: str, what: str, code: int):
        self.code = code
        text = _com_err.error_message(code).decode("utf-8", "replace")
        super().__init__(f"{image}: {what}: {text}")


@dataclass(frozen=True)
class PhysicalExtent:
    """A run of a file's blocks: logical block, physical block, block count."""

    logical: int
    physical: int
    count: int
    uninit: bool


class _Extent(ctypes.Structure):  # struct ext2fs_extent
    _fields_ = [("e_pblk", _c.c_uint64), ("e_lblk", _c.c_uint64), ("e_len", _c.c_uint32), ("e_flags", _c.c_uint32)]


class _FilsysHead(ctypes.Structure):
    """The leading members of struct struct_ext2_filsys (ext2fs.h) that we touch."""

    _fields_ = [
        ("magic", _c.c_long),
        ("io", _P),
        ("flags", _c.c_int),
        ("device_name", _c.c_char_p),
        ("super", _P),
        ("blocksize", _c.c_uint),
        ("fragsize", _c.c_int),
        ("group_desc_count", _c.c_uint32),
        ("desc_blocks", _c.c_ulong),
        ("group_desc", _P),
        ("inode_blocks_per_group", _c.c_uint),
        ("inode_map", _P),
        ("block_map", _P),
        ("get_blocks", _P),
        ("check_directory", _P),
        ("write_bitmaps", _P),
        ("read_inode", _P),
        ("write_inode", _P),
        ("badblocks", _P),
        ("dblist", _P),
        ("stride", _c.c_uint32),
        ("orig_super", _P),
        ("image_header", _P),
        ("umask", _c.c_uint32),
        ("now", _c.c_int64),
    ]


#: struct ext2_dir_entry_2 (ext2_fs.h): inode, rec_len, name_len, file_type, then the name
_DIRENT = struct.Struct("<IHBB")


def _dirent_size(name_len: int) -> int:
    """Bytes a directory entry with a name of ``name_len`` needs (EXT2_DIR_REC_LEN)."""
    return (_DIRENT.size + name_len + 3) & ~3


_DIR_CALLBACK = _c.CFUNCTYPE(_c.c_int, _ino, _c.c_int, _P, _c.c_int, _c.c_int, _P, _P)


class Filesystem:
    """An ext4 image file opened read-write through libext2fs.

    Names are ``bytes`` (ext4 stores bytes); callers encode with
    ``os.fsencode``.  All inode numbers are plain ints.
    """

    def __init__(self, path: str, writable: bool = True, now: int = 1):
        """Open ``path``; ``now`` is the clock libext2fs stamps into new inodes and the
        superblock's write time (fixed so conversions are reproducible, spec §3.6)."""
        self.path = path
        self._fs = _P()
        flags = EXT2_FLAG_64BITS | (EXT2_FLAG_RW if writable else 0)
        # no block cache in libext2fs's unix I/O: file data written straight into the image
        # (write_direct) can then never be shadowed by a stale cached block
        err = _lib.ext2fs_open2(path.encode(), b"cache=off", flags, 0, 0, _UNIX_IO_MANAGER, _c.byref(self._fs))
        if err:
            raise Ext2fsError(path, "open", err)
        self._fd = -1
        self._head = _FilsysHead.from_address(self._fs.value)
        self.block_size = self._head.blocksize
        self._head.now = now
        #: contents (name -> inode) of the directories used through this handle, read once
        #: and then kept up to date: libext2fs looks names up and finds room for new entries
        #: by scanning the whole directory, which makes big directories quadratic
        self._dirs: dict[int, dict[bytes, int]] = {}
        self._check(_lib.ext2fs_read_bitmaps(self._fs), "read bitmaps")

    # -- plumbing ---------------------------------------------------------------------------
    def _check(self, err: int, what: str) -> None:
        if err:
            raise Ext2fsError(self.path, what, err)

    def close(self) -> None:
        """Write back bitmaps, group descriptors and superblocks; release the handle."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._fs:
            fs, self._fs = self._fs, _P()
            err = _lib.ext2fs_close2(fs, 0)
            if err:
                _lib.ext2fs_free(fs)
                raise Ext2fsError(self.path, "close", err)

    def __enter__(self) -> "Filesystem":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def patch_super(self, offset: int, data: bytes) -> None:
        """Overwrite bytes of the in-memory superblock; written back to the primary AND the
        backup superblocks on close (libext2fs opens with "master superblock only")."""
        _c.memmove(self._head.super + offset, data, len(data))
        self._head.flags = (self._head.flags | EXT2_FLAG_DIRTY | EXT2_FLAG_CHANGED) & ~EXT2_FLAG_MASTER_SB_ONLY

    # -- inodes -----------------------------------------------------------------------------
    def read_inode(self, ino: int) -> Inode:
        buf = _c.create_string_buffer(INODE_SIZE)
        self._check(_lib.ext2fs_read_inode_full(self._fs, ino, buf, INODE_SIZE), f"read inode {ino}")
        return Inode(buf.raw)

    def write_inode(self, ino: int, inode: Inode) -> None:
        self._check(
            _lib.ext2fs_write_inode_full(self._fs, ino, bytes(inode.buf), INODE_SIZE), f"write inode {ino}"
        )

    def _dir(self, dir_ino: int) -> dict[bytes, int]:
        known = self._dirs.get(dir_ino)
        if known is None:
            known = self._dirs[dir_ino] = dict(self._scan_dir(dir_ino))
        return known

    def lookup(self, dir_ino: int, name: bytes) -> int | None:
        """Inode number of ``name`` in directory ``dir_ino``, or None."""
        return self._dir(dir_ino).get(name)

    def list_dir(self, dir_ino: int) -> list[tuple[bytes, int]]:
        """(name, inode) of every entry of a directory except ``.`` and ``..``."""
        return list(self._dir(dir_ino).items())

    def _scan_dir(self, dir_ino: int) -> list[tuple[bytes, int]]:
        found: list[tuple[bytes, int]] = []

        def visit(_dir, entry, dirent, _off, _bs, _buf, _priv):
            if entry == DIRENT_OTHER_FILE:
                ino, _rec, name_len = struct.unpack_from("<IHH", _c.string_at(dirent, 8))
                name = _c.string_at(dirent + 8, name_len & 0xFF)
                if ino:
                    found.append((name, ino))
            return 0

        cb = _DIR_CALLBACK(visit)
        self._check(_lib.ext2fs_dir_iterate2(self._fs, dir_ino, 0, None, cb, None), f"list inode {dir_ino}")
        return found

    def _new_inode_number(self, dir_ino: int, mode: int) -> int:
        out = _ino()
        self._check(_lib.ext2fs_new_inode(self._fs, dir_ino, mode, None, _c.byref(out)), "allocate inode")
        return out.value

    def _with_dir_space(self, dir_ino: int, what: str, call) -> None:
        """Run ``call()``; when the directory block is full, grow the directory and retry."""
        err = call()
        while err == EXT2_ET_DIR_NO_SPACE:
            self._check(_lib.ext2fs_expand_dir(self._fs, dir_ino), f"expand directory inode {dir_ino}")
            err = call()
        self._check(err, what)

    def link(self, dir_ino: int, name: bytes, ino: int, mode: int) -> None:
        """Add the entry ``name -> ino`` to a directory (does not touch link counts)."""
        ftype = FILE_TYPES[stat.S_IFMT(mode)]
        entries = self._dir(dir_ino)
        if name in entries:
            raise ObdError(f"{self.path}: {name!r} already exists in directory inode {dir_ino}")
        if not self._append_entry(dir_ino, name, ino, ftype):
            self._with_dir_space(
                dir_ino, f"link {name!r}", lambda: _lib.ext2fs_link(self._fs, dir_ino, name, ino, ftype)
            )
        entries[name] = ino

    def _append_entry(self, dir_ino: int, name: bytes, ino: int, ftype: int) -> bool:
        """Put the entry into the LAST block of a linear directory (growing it by a block
        when full) instead of scanning every block for room.  False for hash-indexed
        directories, which are left to ext2fs_link."""
        bs = self.block_size
        for _attempt in range(2):
            inode = self.read_inode(dir_ino)
            if inode.get("i_flags") & EXT2_INDEX_FL:
                return False
            last = inode.size // bs - 1
            pblk = _blk64()
            self._check(
                _lib.ext2fs_bmap2(self._fs, dir_ino, None, None, 0, last, None, _c.byref(pblk)),
                f"map directory inode {dir_ino}",
            )
            buf = _c.create_string_buffer(bs)
            self._check(_lib.ext2fs_read_dir_block4(self._fs, pblk.value, buf, 0, dir_ino), "read directory")
            block = bytearray(buf.raw)
            pos = 0
            while True:  # find the last entry of the block
                e_ino, rec_len, name_len, _ft = _DIRENT.unpack_from(block, pos)
                if rec_len < _DIRENT.size or pos + rec_len > bs:
                    raise ObdError(f"{self.path}: corrupt directory block {pblk.value} (inode {dir_ino})")
                if pos + rec_len == bs:
                    break
                pos += rec_len
            used = _dirent_size(name_len) if e_ino else 0
            need = _dirent_size(len(name))
            if rec_len - used >= need:
                if used:
                    _DIRENT.pack_into(block, pos, e_ino, used, name_len, _ft)
                at = pos + used
                _DIRENT.pack_into(block, at, ino, bs - at, len(name), ftype)
                block[at + _DIRENT.size : at + _DIRENT.size + len(name)] = name
                self._check(
                    _lib.ext2fs_write_dir_block4(self._fs, pblk.value, bytes(block), 0, dir_ino), "write directory"
                )
                return True
            self._check(_lib.ext2fs_expand_dir(self._fs, dir_ino), f"expand directory inode {dir_ino}")
        raise ObdError(f"{self.path}: no room for {name!r} in a fresh block of directory inode {dir_ino}")

    def create(self, dir_ino: int, name: bytes, inode: Inode) -> int:
        """Allocate an inode, write ``inode`` to it and link it as ``name``."""
        ino = self._new_inode_number(dir_ino, inode.mode)
        self.write_inode(ino, inode)
        self.link(dir_ino, name, ino, inode.mode)
        _lib.ext2fs_inode_alloc_stats2(self._fs, ino, 1, int(inode.is_dir))
        return ino

    def mkdir(self, dir_ino: int, name: bytes) -> int:
        """Create an empty directory (mode 0755, root-owned; callers set the rest)."""
        ino = self._new_inode_number(dir_ino, stat.S_IFDIR | 0o755)
        parent_links = self.read_inode(dir_ino).links
        # no name: libext2fs makes the inode and its block, the entry is added here
        self._check(_lib.ext2fs_mkdir(self._fs, dir_ino, ino, None), f"mkdir {name!r}")
        self.link(dir_ino, name, ino, stat.S_IFDIR)
        if parent_links == 1 or parent_links + 1 >= DIR_NLINK_MAX:
            # dir_nlink: a directory with too many subdirectories counts 1 link
            # (libext2fs would let the 16-bit counter wrap)
            parent = self.read_inode(dir_ino)
            parent.set("i_links_count", 1)
            self.write_inode(dir_ino, parent)
        self._dirs[ino] = {}
        return ino

    def symlink(self, dir_ino: int, name: bytes, target: bytes) -> int:
        """Create a symbolic link (fast when the target is < 60 bytes)."""
        if len(target) >= self.block_size:
            raise ObdError(f"{self.path}: symlink {name!r}: target longer than {self.block_size - 1} bytes")
        ino = self._new_inode_number(dir_ino, stat.S_IFLNK | 0o777)
        self._check(_lib.ext2fs_symlink(self._fs, dir_ino, ino, None, target), f"symlink {name!r}")
        self.link(dir_ino, name, ino, stat.S_IFLNK)
        return ino

    def hardlink(self, dir_ino: int, name: bytes, ino: int) -> None:
        """Add another name for an existing non-directory inode."""
        inode = self.read_inode(ino)
        self.link(dir_ino, name, ino, inode.mode)
        inode.set("i_links_count", inode.links + 1)
        self.write_inode(ino, inode)

    def remove(self, dir_ino: int, name: bytes, ino: int) -> list[int]:
        """Remove the entry ``name`` and, for a directory, everything below it.

        Returns the inodes released (whose last link went).  Entries inside a removed
        directory are not unlinked one by one (that rescans the directory each time):
        the directory's blocks are freed whole and its children lose one link each.
        """
        inode = self.read_inode(ino)
        self._check(_lib.ext2fs_unlink(self._fs, dir_ino, name, ino, 0), f"unlink {name!r}")
        self._dir(dir_ino).pop(name, None)
        if inode.is_dir:
            parent = self.read_inode(dir_ino)
            if parent.links > 2:  # the child's ".." no longer points at the parent
                parent.set("i_links_count", parent.links - 1)
                self.write_inode(dir_ino, parent)
        released: list[int] = []
        self._drop_link(ino, inode, released)
        return released

    def _drop_link(self, ino: int, inode: Inode, released: list[int]) -> None:
        if inode.is_dir:
            for _name, child in self.list_dir(ino):
                self._drop_link(child, self.read_inode(child), released)
            self._dirs.pop(ino, None)
        elif inode.links > 1:
            inode.set("i_links_count", inode.links - 1)
            self.write_inode(ino, inode)
            return
        self._release(ino, inode)
        released.append(ino)

    def clear_dir(self, ino: int) -> list[int]:
        """Empty a directory in place: every child loses its link (subtrees go whole) and
        the directory shrinks back to one block holding ``.`` and ``..``.

        O(entries), unlike unlinking each name.  Returns the inodes released.
        """
        entries = self.list_dir(ino)
        if not entries:
            return []
        parent = _ino()
        self._check(_lib.ext2fs_lookup(self._fs, ino, b"..", 2, None, _c.byref(parent)), f"'..' of inode {ino}")
        released: list[int] = []
        for _name, child in entries:
            self._drop_link(child, self.read_inode(child), released)
        bs = self.block_size
        buf = _c.create_string_buffer(bytes(self.read_inode(ino).buf), INODE_SIZE)
        self._check(_lib.ext2fs_punch(self._fs, ino, buf, None, 1, 0xFFFFFFFFFFFFFFFF), f"shrink directory {ino}")
        inode = Inode(buf.raw)
        inode.set_size(bs)
        inode.set("i_links_count", 2)
        inode.set("i_flags", inode.get("i_flags") & ~EXT2_INDEX_FL)
        self.write_inode(ino, inode)
        pblk = _blk64()
        self._check(_lib.ext2fs_bmap2(self._fs, ino, None, None, 0, 0, None, _c.byref(pblk)), f"map directory {ino}")
        block = bytearray(bs)
        _DIRENT.pack_into(block, 0, ino, 12, 1, FILE_TYPES[stat.S_IFDIR])
        block[8:9] = b"."
        _DIRENT.pack_into(block, 12, parent.value, bs - 12, 2, FILE_TYPES[stat.S_IFDIR])
        block[20:22] = b".."
        self._check(_lib.ext2fs_write_dir_block4(self._fs, pblk.value, bytes(block), 0, ino), "write directory")
        self._dirs[ino] = {}
        return released

    def _release(self, ino: int, inode: Inode) -> None:
        """Free an unlinked inode's xattr block, data blocks and the inode itself."""
        buf = _c.create_string_buffer(bytes(inode.buf), INODE_SIZE)
        self._check(_lib.ext2fs_free_ext_attr(self._fs, ino, buf), f"free xattrs of inode {ino}")
        if _lib.ext2fs_inode_has_valid_blocks2(self._fs, buf):
            self._check(_lib.ext2fs_punch(self._fs, ino, buf, None, 0, 0xFFFFFFFFFFFFFFFF), f"free inode {ino}")
        freed = Inode(buf.raw)
        freed.set("i_links_count", 0)
        freed.set("i_dtime", max(freed.get("i_mtime"), 1))
        self.write_inode(ino, freed)
        _lib.ext2fs_inode_alloc_stats2(self._fs, ino, -1, int(freed.is_dir))

    def read_link(self, ino: int) -> bytes:
        """The target of a symbolic link (fast: in i_block; slow: its data block)."""
        inode = self.read_inode(ino)
        size = inode.size
        if inode.is_fast_link():
            return inode.fast_link_target()
        fh = _P()
        self._check(_lib.ext2fs_file_open(self._fs, ino, 0, _c.byref(fh)), f"open symlink inode {ino}")
        try:
            buf = _c.create_string_buffer(size)
            got = _c.c_uint()
            err = _lib.ext2fs_file_read(fh, buf, size, _c.byref(got))
        finally:
            _lib.ext2fs_file_close(fh)
        self._check(err, f"read symlink inode {ino}")
        return buf.raw[: got.value]

    # -- data -------------------------------------------------------------------------------
    def write_file(self, ino: int, chunks: Iterator[tuple[int, bytes]], size: int) -> None:
        """Write ``(offset, data)`` pieces into a regular file and set its size."""
        fh = _P()
        self._check(_lib.ext2fs_file_open(self._fs, ino, EXT2_FILE_WRITE, _c.byref(fh)), f"open inode {ino}")
        try:
            pos = _c.c_uint64()
            written = _c.c_uint()
            for offset, data in chunks:
                self._check(_lib.ext2fs_file_llseek(fh, offset, 0, _c.byref(pos)), f"seek inode {ino}")
                done = 0
                while done < len(data):
                    piece = data if done == 0 else data[done:]  # whole chunks go through uncopied
                    self._check(
                        _lib.ext2fs_file_write(fh, piece, len(piece), _c.byref(written)), f"write inode {ino}"
                    )
                    if not written.value:
                        raise ObdError(f"{self.path}: writing inode {ino} made no progress")
                    done += written.value
            self._check(_lib.ext2fs_file_set_size2(fh, size), f"set size of inode {ino}")
        finally:
            err = _lib.ext2fs_file_close(fh)
        self._check(err, f"close inode {ino}")

    def write_direct(self, extents: list[PhysicalExtent], pieces: Iterator[tuple[int, bytes]]) -> None:
        """Write ``(file offset, bytes)`` pieces straight into the image file at the blocks
        ``extents`` (of an inode whose blocks :meth:`fallocate` allocated).

        Much faster than ext2fs_file_write, which goes block by block; safe because the
        I/O channel runs without a cache.
        """
        if self._fd < 0:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        bs = self.block_size
        starts = [e.logical for e in extents]
        for offset, data in pieces:
            view = memoryview(data)
            while view:
                i = bisect.bisect_right(starts, offset // bs) - 1
                ext = extents[i] if i >= 0 else None
                if ext is None or offset >= (ext.logical + ext.count) * bs:
                    raise ObdError(f"{self.path}: no block allocated for file offset {offset}")
                n = min(len(view), (ext.logical + ext.count) * bs - offset)
                phys = ext.physical * bs + offset - ext.logical * bs
                if os.pwrite(self._fd, view[:n], phys) != n:
                    raise ObdError(f"{self.path}: short write at byte {phys}")
                view, offset = view[n:], offset + n

    def fallocate(self, ino: int, first_block: int, count: int) -> None:
        """Allocate initialised extents for blocks [first_block, first_block+count), no data written."""
        self._check(
            _lib.ext2fs_fallocate(self._fs, EXT2_FALLOCATE_FORCE_INIT, ino, None, 0xFFFFFFFFFFFFFFFF, first_block, count),
            f"fallocate inode {ino}",
        )

    def extents(self, ino: int) -> list[PhysicalExtent]:
        """The leaf extents of an extent-mapped inode, in logical order."""
        handle = _P()
        self._check(_lib.ext2fs_extent_open2(self._fs, ino, None, _c.byref(handle)), f"extents of inode {ino}")
        out: list[PhysicalExtent] = []
        ext = _Extent()
        try:
            op = EXT2_EXTENT_ROOT
            while True:
                err = _lib.ext2fs_extent_get(handle, op, _c.byref(ext))
                op = EXT2_EXTENT_NEXT
                if err in (EXT2_ET_EXTENT_NO_NEXT, EXT2_ET_NO_CURRENT_NODE):
                    break
                self._check(err, f"extents of inode {ino}")
                if ext.e_flags & EXT2_EXTENT_FLAGS_LEAF and not ext.e_flags & EXT2_EXTENT_FLAGS_SECOND_VISIT:
                    out.append(
                        PhysicalExtent(ext.e_lblk, ext.e_pblk, ext.e_len, bool(ext.e_flags & EXT2_EXTENT_FLAGS_UNINIT))
                    )
        finally:
            _lib.ext2fs_extent_free(handle)
        return out

    # -- xattrs -----------------------------------------------------------------------------
    def set_xattrs(self, ino: int, xattrs: dict[str, bytes]) -> None:
        """Set extended attributes (full names such as ``user.x``, ``security.capability``)."""
        if not xattrs:
            return
        handle = _P()
        self._check(_lib.ext2fs_xattrs_open(self._fs, ino, _c.byref(handle)), f"xattrs of inode {ino}")
        try:
            self._check(_lib.ext2fs_xattrs_read(handle), f"read xattrs of inode {ino}")
            for key, value in xattrs.items():
                self._check(
                    _lib.ext2fs_xattr_set(handle, key.encode("utf-8", "surrogateescape"), value, len(value)),
                    f"set xattr {key} on inode {ino}",
                )
        finally:
            err = _lib.ext2fs_xattrs_close(_c.byref(handle))
        self._check(err, f"write xattrs of inode {ino}")

