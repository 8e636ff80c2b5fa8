"""A read-only ext2/3/4 reader over a ByteSource: lookup, listdir, read, stat, xattrs.

``Ext4(source)`` reads the superblock eagerly and everything else on demand
(inodes, block maps and directory listings are cached in small LRU maps), so
listing one directory of a 64 GiB virtual disk touches a few blocks only.
Corrupt structures raise ``CorruptDataError`` with the byte offset on the disk;
on metadata_csum filesystems the superblock, inode, extent-block, directory-leaf
and xattr-block checksums are verified as they are read.
"""

from __future__ import annotations

import bisect
import io
import stat as _stat
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..block.source import ByteSource, read_exact
from ..errors import CorruptDataError, NotFoundError, UsageError
from .directory import DirEntry, parse_entries, parse_inline_dir, verify_leaf_tails
from .extents import Run, blockmap_runs, extent_runs
from .inode import ROOT_INO, Inode, inode_checksum_ok, inode_seed
from .superblock import INCOMPAT_FILETYPE, RO_COMPAT_HUGE_FILE, Superblock, inode_table_block
from .xattr import XattrEntry, parse_xattrs, xattr_block_checksum_ok

#: symlinks followed during one lookup before giving up (Linux's MAXSYMLINKS)
MAX_SYMLINKS = 40
INLINE_DATA_XATTR = "system.data"
_I_BLOCK_SIZE = 60
#: longest symlink target (PATH_MAX - 1; ext4 also keeps it below one block)
SYMLINK_MAX = 4096
#: largest xattr value Linux accepts (XATTR_SIZE_MAX)
XATTR_SIZE_MAX = 65536
#: bytes of metadata blocks kept in memory per filesystem
METADATA_CACHE_BYTES = 8 << 20


@dataclass(frozen=True)
class Stat:
    """What ``ls -l`` / ``stat`` show about an inode; times in nanoseconds since the epoch."""

    ino: int
    mode: int
    type: str  # - d l c b p s
    uid: int
    gid: int
    size: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    crtime_ns: int | None
    #: (major, minor) for character and block devices, else None
    rdev: tuple[int, int] | None
    blocks: int  # allocated 512-byte units


class _LRU:
    """A small thread-safe LRU map (prefetchers may share one Ext4 between threads)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def put(self, key, value):
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def get(self, key):
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value


class Ext4:
    """An ext2/3/4 filesystem on ``source`` (a whole-disk byte source)."""

    def __init__(self, source: ByteSource):
        self.source = source
        self.name = source.name
        self.sb = Superblock.read(source)
        self.block_size = self.sb.block_size
        self._filetype = self.sb.has_incompat(INCOMPAT_FILETYPE)
        self._huge = bool(self.sb.feature_ro_compat & RO_COMPAT_HUGE_FILE)
        self._tables: dict[int, int] = {}
        self._inodes = _LRU(4096)
        self._runs = _LRU(1024)
        self._dirs = _LRU(256)
        #: metadata blocks (inode tables, extent and xattr blocks): one stack read serves 16 inodes
        self._blocks = _LRU(METADATA_CACHE_BYTES // self.block_size)

    # -- blocks and inodes ------------------------------------------------------------------

    def _read_block(self, block: int, pointer_at: int) -> bytes:
        """One metadata block (cached); ``pointer_at`` is where its number was read (named if it
        is out of range)."""
        if block >= self.sb.blocks_count or block == 0:
            raise CorruptDataError(f"block number {block} outside the filesystem "
                                   f"({self.sb.blocks_count} blocks)", blob=self.name, offset=pointer_at)
        data = self._blocks.get(block)
        if data is None:
            data = self._blocks.put(block, read_exact(self.source, block * self.block_size, self.block_size,
                                                      f"ext4 block {block}"))
        return data

    def _inode_table(self, group: int) -> int:
        table = self._tables.get(group)
        if table is None:
            off = self.sb.descriptor_offset(group)
            raw = read_exact(self.source, off, self.sb.desc_size, f"group descriptor {group}")
            table = inode_table_block(self.sb, raw)
            if not 0 < table < self.sb.blocks_count:
                raise CorruptDataError(f"group {group}: inode table at block {table} is outside the "
                                       f"filesystem", blob=self.name, offset=off)
            self._tables[group] = table
        return table

    def inode(self, ino: int) -> Inode:
        """Inode number ``ino`` (1-based)."""
        cached = self._inodes.get(ino)
        if cached is not None:
            return cached
        if not 1 <= ino <= self.sb.inodes_count:
            raise CorruptDataError(f"inode number {ino} out of range (1..{self.sb.inodes_count})",
                                   blob=self.name)
        group, index = divmod(ino - 1, self.sb.inodes_per_group)
        offset = self._inode_table(group) * self.block_size + index * self.sb.inode_size
        block, within = divmod(offset, self.block_size)  # inodes never straddle blocks
        if block >= self.sb.blocks_count:
            raise CorruptDataError(f"inode {ino} lies past the end of the filesystem",
                                   blob=self.name, offset=self.sb.descriptor_offset(group) + 0x08)
        raw = self._read_block(block, 0)[within:within + self.sb.inode_size]
        inode = Inode.from_bytes(ino, raw, offset, self.block_size, self._huge)
        if self.sb.csum_seed is not None:
            inode.csum_seed = inode_seed(self.sb.csum_seed, ino, inode.generation)
            if not inode_checksum_ok(raw, inode.csum_seed) and any(raw):
                raise CorruptDataError(f"inode {ino}: checksum does not match its content",
                                       blob=self.name, offset=offset + 0x7C)
        return self._inodes.put(ino, inode)

    @property
    def root(self) -> Inode:
        root = self.inode(ROOT_INO)
        if not root.is_dir:
            raise CorruptDataError("root inode is not a directory", blob=self.name, offset=root.offset)
        return root

    def _block_map(self, inode: Inode) -> tuple[list[Run], list[int]]:
        """The inode's runs and, for bisecting, their first logical blocks."""
        cached = self._runs.get(inode.ino)
        if cached is None:
            walk = extent_runs if inode.has_extents else blockmap_runs
            runs = walk(inode, self._read_block, self.block_size, self.name, inode.csum_seed)
            for r in runs:
                if r.physical == 0 or r.physical + r.count > self.sb.blocks_count:
                    raise CorruptDataError(
                        f"inode {inode.ino}: blocks {r.physical}..{r.physical + r.count - 1} are outside "
                        f"the filesystem ({self.sb.blocks_count} blocks)", blob=self.name, offset=inode.offset)
            cached = self._runs.put(inode.ino, (runs, [r.logical for r in runs]))
        return cached

    # -- file data --------------------------------------------------------------------------

    def _inline_bytes(self, inode: Inode) -> bytes:
        extra = next((x.value for x in self._xattr_entries(inode) if x.name == INLINE_DATA_XATTR), b"")
        return inode.block + extra

    def read(self, inode: Inode, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes of the file (to EOF when None or past the end); holes read as zeros."""
        if offset < 0 or (length is not None and length < 0):
            raise UsageError(f"negative read range (offset {offset}, length {length})")
        end = inode.size if length is None else min(inode.size, offset + length)
        if offset >= end:
            return b""
        if inode.has_inline_data:
            return self._inline_bytes(inode)[offset:end]
        if inode.is_symlink and self._is_fast_symlink(inode):
            return inode.block[offset:end]
        bs = self.block_size
        runs, starts = self._block_map(inode)
        i = max(bisect.bisect_right(starts, offset // bs) - 1, 0)
        if i < len(runs):  # fast path: one written run covers the whole range, no copying
            r = runs[i]
            run_start = r.logical * bs
            if not r.uninit and run_start <= offset and end <= run_start + r.count * bs:
                disk = r.physical * bs + (offset - run_start)
                return read_exact(self.source, disk, end - offset, f"inode {inode.ino} data")
        pieces = []
        pos = offset  # everything before pos is in pieces
        while i < len(runs):
            r = runs[i]
            run_start = r.logical * bs
            if run_start >= end:
                break
            lo = max(offset, run_start)
            hi = min(end, run_start + r.count * bs)
            if lo < hi and not r.uninit:
                if lo > pos:
                    pieces.append(bytes(lo - pos))  # a hole
                disk = r.physical * bs + (lo - run_start)
                pieces.append(read_exact(self.source, disk, hi - lo, f"inode {inode.ino} data"))
                pos = hi
            i += 1
        if pos < end:
            pieces.append(bytes(end - pos))
        return b"".join(pieces)

    def open(self, inode: Inode) -> "Ext4File":
        """A seekable binary file object over the inode's data (reads on demand)."""
        return Ext4File(self, inode)

    def file_extents(self, inode: Inode) -> list[tuple[int, int, int]]:
        """``(logical_byte, physical_byte, length)`` of the written data, clipped to the file size.

        Unwritten extents and inline data are not listed (nothing to fetch).
        """
        if inode.has_inline_data or (inode.is_symlink and self._is_fast_symlink(inode)):
            return []
        bs = self.block_size
        out = []
        for r in self._block_map(inode)[0]:
            start = r.logical * bs
            if r.uninit or start >= inode.size:
                continue
            out.append((start, r.physical * bs, min(r.count * bs, inode.size - start)))
        return out

    # -- symlinks, xattrs, stat -------------------------------------------------------------

    def _is_fast_symlink(self, inode: Inode) -> bool:
        return (not inode.has_inline_data and inode.size < _I_BLOCK_SIZE
                and inode.data_blocks_512(self.block_size) == 0)

    def readlink(self, inode: Inode) -> str:
        """The target of a symlink inode."""
        if not inode.is_symlink:
            raise UsageError(f"inode {inode.ino} is not a symbolic link")
        if inode.size >= min(SYMLINK_MAX, self.block_size):
            raise CorruptDataError(f"symlink inode {inode.ino} claims a {inode.size}-byte target",
                                   blob=self.name, offset=inode.offset + 4)
        return self.read(inode).decode("utf-8", "surrogateescape")

    def _xattr_entries(self, inode: Inode) -> list[XattrEntry]:
        entries = parse_xattrs(inode.xattr_area, inode.xattr_area_offset, True, self.name, inode.ino)
        if inode.file_acl:
            block = self._read_block(inode.file_acl, inode.offset + 0x68)
            if self.sb.csum_seed is not None and not xattr_block_checksum_ok(
                    block, inode.file_acl, self.sb.csum_seed):
                raise CorruptDataError(f"inode {inode.ino}: xattr block checksum does not match its content",
                                       blob=self.name, offset=inode.file_acl * self.block_size + 16)
            entries += parse_xattrs(block, inode.file_acl * self.block_size, False, self.name, inode.ino)
        return entries

    def xattrs(self, inode: Inode) -> dict[str, bytes]:
        """Extended attributes by full name (``user.x``, ``security.capability``, ...)."""
        out = {}
        for x in self._xattr_entries(inode):
            if x.name == INLINE_DATA_XATTR:
                continue  # storage for inline data, hidden like the kernel does
            if x.value_size > XATTR_SIZE_MAX:
                raise CorruptDataError(f"inode {inode.ino}: xattr {x.name!r} claims {x.value_size} bytes",
                                       blob=self.name, offset=inode.offset)
            if x.value_inum:
                holder = self.inode(x.value_inum)
                value = self.read(holder, 0, x.value_size)
                if len(value) != x.value_size:
                    raise CorruptDataError(f"inode {inode.ino}: xattr {x.name!r} value inode "
                                           f"{x.value_inum} is short", blob=self.name, offset=holder.offset)
                out[x.name] = value
            else:
                out[x.name] = x.value
        return out

    def stat(self, inode: Inode) -> Stat:
        return Stat(
            ino=inode.ino, mode=inode.mode, type=_stat.filemode(inode.mode)[0],
            uid=inode.uid, gid=inode.gid, size=inode.size, nlink=inode.links,
            atime_ns=inode.atime_ns, mtime_ns=inode.mtime_ns, ctime_ns=inode.ctime_ns,
            crtime_ns=inode.crtime_ns,
            rdev=inode.device_numbers() if inode.is_device else None,
            blocks=inode.blocks_512,
        )

    # -- directories and paths --------------------------------------------------------------

    def _entries(self, inode: Inode) -> dict[bytes, DirEntry]:
        cached = self._dirs.get(inode.ino)
        if cached is not None:
            return cached
        if not inode.is_dir:
            raise UsageError(f"inode {inode.ino} is not a directory")
        if inode.has_inline_data:
            extra = next((x.value for x in self._xattr_entries(inode) if x.name == INLINE_DATA_XATTR), b"")
            entries = parse_inline_dir(inode.block, inode.offset + 0x28, extra, inode.xattr_area_offset,
                                       self._filetype, self.name, inode.ino)
        else:
            bs = self.block_size
            nblocks = -(-inode.size // bs)
            entries = []
            for r in self._block_map(inode)[0]:
                count = min(r.count, nblocks - r.logical)
                if count <= 0 or r.uninit:
                    continue
                data = read_exact(self.source, r.physical * bs, count * bs, f"directory inode {inode.ino}")
                if inode.csum_seed is not None:
                    verify_leaf_tails(data, r.physical * bs, bs, inode.csum_seed, self.name, inode.ino)
                entries += parse_entries(data, r.physical * bs, bs, self._filetype, self.name, inode.ino)
        table = {e.raw_name: e for e in entries}
        return self._dirs.put(inode.ino, table)

    def listdir(self, inode: Inode) -> list[DirEntry]:
        """Entries of a directory in on-disk order, without ``.`` and ``..``."""
        return [e for e in self._entries(inode).values() if e.raw_name not in (b".", b"..")]

    def lookup(self, path: str, follow: bool = True) -> Inode:
        """Inode at ``path`` (relative paths start at the root); symlinks in intermediate
        components are always resolved, the last one only when ``follow``."""
        remaining = [p for p in path.split("/") if p and p != "."]
        must_be_dir = path.endswith("/")
        follow = follow or must_be_dir  # "link/" means the directory the link points to
        stack = [self.root]  # the directories from the root to the current one
        links = 0
        walked: list[str] = []
        while remaining:
            part = remaining.pop(0)
            cur = stack[-1]
            if part == "..":
                if len(stack) > 1:
                    stack.pop()
                    walked.pop()
                continue
            where = "/" + "/".join(walked + [part])
            if not cur.is_dir:
                raise NotFoundError(f"{'/' + '/'.join(walked)}: not a directory")
            entry = self._entries(cur).get(part.encode("utf-8", "surrogateescape"))
            if entry is None:
                raise NotFoundError(f"{where}: no such file or directory")
            child = self.inode(entry.ino)
            if child.is_symlink and (remaining or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise NotFoundError(f"{path}: too many levels of symbolic links")
                target = self.readlink(child)
                if target.startswith("/"):
                    del stack[1:]
                    del walked[:]
                remaining[:0] = [p for p in target.split("/") if p and p != "."]
                continue
            stack.append(child)
            walked.append(part)
        if must_be_dir and not stack[-1].is_dir:
            raise NotFoundError(f"{path}: not a directory")
        return stack[-1]


class Ext4File(io.RawIOBase):
    """Streaming reader of one file; ``read(n)`` fetches only the blocks it needs."""

    def __init__(self, fs: Ext4, inode: Inode):
        super().__init__()
        self._fs = fs
        self._inode = inode
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def size(self) -> int:
        return self._inode.size

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (all remaining when negative), returned without extra copies."""
        data = self._fs.read(self._inode, self._pos, None if size is None or size < 0 else size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def readinto(self, buffer) -> int:
        data = self._fs.read(self._inode, self._pos, len(buffer))
        buffer[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._inode.size}[whence]
        if base + offset < 0:
            raise UsageError("seek before the start of the file")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

