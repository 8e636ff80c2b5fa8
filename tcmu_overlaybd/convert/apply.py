"""Apply one OCI layer tar stream to an ext4 image in userspace (spec §6.3, §6.4, §4.2).

No root and no kernel mount: the image is edited through libext2fs
(:mod:`.ext2fs`).  Every tar entry type is handled: regular files (plain and
GNU sparse, all PAX variants, EXPANDED at their real offsets), directories,
symlinks, hard links (also to files of lower layers), character/block devices,
FIFOs, ``SCHILY.xattr.*``, uid/gid, the full mode (setuid/setgid/sticky), and
mtime with nanoseconds from PAX.

Paths are cleaned with Plan 9 rules inside the image root (``..`` cannot climb
above ``/``, absolute names are rooted); symlinks met in *parent* components
are followed but confined to the root (like containerd's scoped joins), the
last component is never followed.  Missing parents are created 0755; an
existing non-directory in the way of a parent is replaced by a directory.

Whiteouts (§6.4) delete in the filesystem: ``.wh.<name>`` removes ``<name>``
and ``.wh..wh..opq`` removes every child of its directory, both sparing paths
already extracted from the same layer.  Directory times are set at the end.

Regular files whose stored pieces lie on the 4 KiB grid (all plain files, most
sparse ones) get their blocks from ``fallocate`` (initialised extents) and the
data is written straight to those blocks; other sparse files go through
libext2fs's file writer.  Two modes:

``data``  the image is all there is (native overlaybd);
``map``   (FastOCI) additionally returns ``Mapping(physical, length, tar_offset)``
          records pointing each grid-aligned file's blocks at its bytes in the
          uncompressed tar stream (§4.2), and the meta layer leaves those ranges
          out (:mod:`.diff`).  The data is written into the working image all the
          same, so that it always is the true merged view: the block diff of the
          next layer then stays exact even when it frees and reuses blocks that a
          lower layer mapped.  Files past the first member of a multi-member gzip
          layer are not mapped (a gzip index covers one member), nor are sparse
          files off the grid: their data stays in the meta layer.
"""

from __future__ import annotations

import itertools
import os
import stat
import tarfile
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

from ..errors import CorruptDataError, ObdError, UnsupportedError
from .ext2fs import ROOT_INO, Filesystem
from .inode import Inode
from .tarstream import STREAM_ERRORS, HashingReader, decompressed, file_segments, pax_time, pax_xattrs

MODE_DATA = "data"
MODE_MAP = "map"
FS_BLOCK = 4096
SECTOR = 512
CHUNK = 1 << 20  # data is written in <= 1 MiB pieces
MAX_SYMLINK_HOPS = 40
MAX_NAME = 255

WHITEOUT_PREFIX = b".wh."
OPAQUE_MARKER = b".wh..wh..opq"

Path = tuple[bytes, ...]


@dataclass(frozen=True, order=True)
class Mapping:
    """File data at ``physical`` (bytes in the ext4 image) is ``length`` bytes of the
    uncompressed layer tar starting at ``tar_offset`` (spec §4.2)."""

    physical: int
    length: int
    tar_offset: int


@dataclass
class ApplyResult:
    """What applying a layer produced."""

    mappings: list[Mapping] = field(default_factory=list)
    entries: int = 0
    tar_size: int = 0  # bytes of the uncompressed tar stream
    diff_id: str = ""  # "sha256:<hex>" of the uncompressed tar stream


def clean_path(name: str | bytes) -> Path:
    """Plan 9 ``clean`` of a tar name rooted at ``/``: components, no ``.``/``..``/empty."""
    raw = name.encode("utf-8", "surrogateescape") if isinstance(name, str) else name
    out: list[bytes] = []
    for part in raw.split(b"/"):
        if part in (b"", b"."):
            continue
        if part == b"..":
            if out:
                out.pop()
            continue
        out.append(part)
    return tuple(out)


def _show(path: Path) -> str:
    return "/" + b"/".join(path).decode("utf-8", "replace")


def _mappable(segments: list[tuple[int, int, int]], size: int) -> bool:
    """Can every piece be mapped sector for sector onto whole, otherwise unused fs blocks?"""
    return all(
        off % FS_BLOCK == 0 and tar % SECTOR == 0 and (length % FS_BLOCK == 0 or off + length == size)
        for off, length, tar in segments
    )


class LayerApplier:
    """Applies tar entries of one layer to an open :class:`Filesystem`."""

    def __init__(self, fs: Filesystem, mode: str = MODE_DATA, name: str = "layer", stream: object = None):
        """``stream`` is the decompressing reader (its ``first_member_end`` limits mappings)."""
        if mode not in (MODE_DATA, MODE_MAP):
            raise ValueError(f"unknown apply mode {mode!r}")
        self.fs = fs
        self.stream = stream
        self.mode = mode
        self.name = name
        self.kept: set[Path] = set()
        self.dir_times: dict[Path, tuple[int, int]] = {}
        #: mappings by inode; dropped when the inode is released within the layer, so that
        #: blocks it freed and something else reused are never served from the tar
        self.mapped: dict[int, list[Mapping]] = {}
        #: directory paths resolved so far (path -> inode, real path); cleared by any removal
        self._resolved: dict[Path, tuple[int, Path]] = {}
        self.result = ApplyResult()

    # -- path resolution --------------------------------------------------------------------
    def resolve_dir(self, path: Path, create: bool) -> tuple[int, Path] | None:
        """Inode and real path of directory ``path``, following symlinks inside the root.

        With ``create`` missing components become 0755 directories and non-directories
        in the way are replaced; without it a missing component gives None.
        """
        hit = self._resolved.get(path)
        if hit is not None:
            return hit
        hops = 0
        # continue from the longest prefix already resolved
        k = len(path) - 1
        while k > 0 and path[:k] not in self._resolved:
            k -= 1
        ino, real = self._resolved[path[:k]] if k > 0 else (ROOT_INO, ())
        todo = list(path[k:])
        while todo:
            comp = todo.pop(0)
            child = self.fs.lookup(ino, comp)
            if child is not None:
                inode = self.fs.read_inode(child)
                if inode.is_dir:
                    ino, real = child, real + (comp,)
                    continue
                if stat.S_ISLNK(inode.mode):
                    hops += 1
                    if hops > MAX_SYMLINK_HOPS:
                        raise CorruptDataError(f"too many levels of symbolic links in {_show(path)}", blob=self.name)
                    target = self.fs.read_link(child)
                    base = () if target.startswith(b"/") else real
                    todo = list(clean_path(b"/".join(base) + b"/" + target)) + todo
                    ino, real = ROOT_INO, ()
                    continue
                if not create:
                    return None
                self._remove(ino, comp, child)
            elif not create:
                return None
            ino, real = self.fs.mkdir(ino, comp), real + (comp,)
        self._resolved[path] = (ino, real)
        return ino, real

    # -- removal ----------------------------------------------------------------------------
    def _remove(self, dir_ino: int, name: bytes, ino: int) -> None:
        """Remove ``name`` (recursively for directories)."""
        self._resolved.clear()
        for gone in self.fs.remove(dir_ino, name, ino):
            self.mapped.pop(gone, None)

    def _remove_lower(self, dir_ino: int, dir_path: Path, name: bytes, ino: int) -> None:
        """Remove ``name`` except what this layer extracted (whiteout semantics, §6.4)."""
        path = dir_path + (name,)
        if path not in self.kept:
            self._remove(dir_ino, name, ino)
        elif self.fs.read_inode(ino).is_dir:
            self._clear_lower_children(ino, path)

    def _clear_lower_children(self, dir_ino: int, dir_path: Path) -> None:
        n = len(dir_path)
        if not any(len(k) > n and k[:n] == dir_path for k in self.kept):
            # nothing of this layer below: empty the directory in one go
            self._resolved.clear()
            for gone in self.fs.clear_dir(dir_ino):
                self.mapped.pop(gone, None)
            return
        for child, cino in self.fs.list_dir(dir_ino):
            self._remove_lower(dir_ino, dir_path, child, cino)

    def _whiteout(self, parent: Path, base: bytes) -> None:
        found = self.resolve_dir(parent, create=False)
        if found is None:
            return
        dir_ino, real = found
        if base == OPAQUE_MARKER:
            self._clear_lower_children(dir_ino, real)
            return
        target = base[len(WHITEOUT_PREFIX) :]
        ino = self.fs.lookup(dir_ino, target)
        if ino is not None:
            self._remove_lower(dir_ino, real, target, ino)

    # -- entries ----------------------------------------------------------------------------
    def _metadata(self, info: tarfile.TarInfo, fmt: int) -> Inode:
        """A new inode of type ``fmt`` with the entry's mode bits, owner and mtime."""
        self._check_ids(info)
        sec, nsec = pax_time(info)
        return Inode.new(fmt | (info.mode & 0o7777), info.uid, info.gid, sec, nsec)

    def _check_ids(self, info: tarfile.TarInfo) -> None:
        if not (0 <= info.uid < 1 << 32 and 0 <= info.gid < 1 << 32):
            raise UnsupportedError(f"{self.name}: {info.name}: uid/gid do not fit 32 bits")

    def apply_entry(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        path = clean_path(info.name)
        if not path:
            return  # the root itself: upstream skips it
        parent, base = path[:-1], path[-1]
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base)
            return
        if len(base) > MAX_NAME:
            raise CorruptDataError(f"name longer than {MAX_NAME} bytes: {info.name!r}", blob=self.name, offset=info.offset)
        dir_ino, real_parent = self.resolve_dir(parent, create=True)  # type: ignore[misc]
        real = real_parent + (base,)
        existing = self.fs.lookup(dir_ino, base)
        if info.isdir():
            self._directory(info, dir_ino, real, base, existing)
        elif info.islnk():
            self._hardlink(info, dir_ino, base, existing)
        else:
            if existing is not None:
                self._remove(dir_ino, base, existing)
            if info.isreg():
                self._regular(tar, info, dir_ino, base)
            elif info.issym():
                self._symlink(info, dir_ino, base)
            elif info.ischr() or info.isblk() or info.isfifo():
                self._device(info, dir_ino, base)
            else:
                raise UnsupportedError(f"{self.name}: {info.name}: unsupported tar entry type {info.type!r}")
        self.kept.add(real)
        self.result.entries += 1

    def _directory(self, info, dir_ino, real: Path, base: bytes, existing: int | None) -> None:
        if existing is not None and not self.fs.read_inode(existing).is_dir:
            self._remove(dir_ino, base, existing)
            existing = None
        ino = existing if existing is not None else self.fs.mkdir(dir_ino, base)
        self._check_ids(info)
        inode = self.fs.read_inode(ino)
        inode.set("i_mode", stat.S_IFDIR | (info.mode & 0o7777))
        inode.set_owner(info.uid, info.gid)
        self.fs.write_inode(ino, inode)
        self.fs.set_xattrs(ino, pax_xattrs(info))
        self.dir_times[real] = pax_time(info)

    def _hardlink(self, info, dir_ino, base: bytes, existing: int | None) -> None:
        target = clean_path(info.linkname)
        found = self.resolve_dir(target[:-1], create=False) if target else None
        tino = self.fs.lookup(found[0], target[-1]) if found else None
        if tino is None or self.fs.read_inode(tino).is_dir:
            raise CorruptDataError(
                f"hard link {info.name!r} points at missing or directory {info.linkname!r}",
                blob=self.name,
                offset=info.offset,
            )
        if existing == tino:
            return
        if existing is not None:
            self._remove(dir_ino, base, existing)
        self.fs.hardlink(dir_ino, base, tino)

    def _symlink(self, info, dir_ino, base: bytes) -> None:
        self._check_ids(info)
        ino = self.fs.symlink(dir_ino, base, info.linkname.encode("utf-8", "surrogateescape"))
        inode = self.fs.read_inode(ino)
        sec, nsec = pax_time(info)
        inode.set_owner(info.uid, info.gid)
        inode.set_times(sec, nsec)
        self.fs.write_inode(ino, inode)
        self.fs.set_xattrs(ino, pax_xattrs(info))

    def _device(self, info, dir_ino, base: bytes) -> None:
        fmt = stat.S_IFCHR if info.ischr() else stat.S_IFBLK if info.isblk() else stat.S_IFIFO
        inode = self._metadata(info, fmt)
        if fmt != stat.S_IFIFO:
            inode.set_rdev(info.devmajor, info.devminor)
        ino = self.fs.create(dir_ino, base, inode)
        self.fs.set_xattrs(ino, pax_xattrs(info))

    def _regular(self, tar: tarfile.TarFile, info, dir_ino, base: bytes) -> None:
        inode = self._metadata(info, stat.S_IFREG)
        inode.init_extents()
        segments = file_segments(info)
        # pieces on the 4 KiB grid get their blocks first (fallocate) and are written
        # straight to them; FastOCI maps exactly those blocks onto the tar (§4.2)
        direct = bool(segments) and _mappable(segments, info.size)
        if direct:
            inode.set_size(info.size)
        ino = self.fs.create(dir_ino, base, inode)
        self.fs.set_xattrs(ino, pax_xattrs(info))
        pieces = self._pieces(tar, info, segments)
        if not direct:
            self.fs.write_file(ino, pieces, info.size)
            return
        for off, length, _tar in segments:
            first = off // FS_BLOCK
            self.fs.fallocate(ino, first, -(-(off + length) // FS_BLOCK) - first)
        if info.size % FS_BLOCK and sum(segments[-1][:2]) == info.size:
            # zero the rest of the last block: it may hold stale bytes of a reused block,
            # and a mapped layer serves the tar's zero padding there
            pieces = itertools.chain(pieces, [(info.size, bytes(FS_BLOCK - info.size % FS_BLOCK))])
        extents = self.fs.extents(ino)
        self.fs.write_direct(extents, pieces)
        if self.mode != MODE_MAP:
            return
        end = segments[-1][2] + segments[-1][1]
        first_member_end = getattr(self.stream, "first_member_end", None)
        if first_member_end is None or end <= first_member_end:
            self._record_mappings(ino, segments, extents)
        # else: past the first gzip member, which is all a gzip index covers (§4.4):
        # the data written above stays in the meta layer instead

    def _pieces(self, tar: tarfile.TarFile, info, segments) -> Iterator[tuple[int, bytes]]:
        """(file offset, bytes) of the stored data, read forward from the tar stream.

        The stored pieces lie back to back from ``offset_data``; reading them straight
        from the (forward-only) stream keeps sparse holes from ever being expanded.
        """
        src = tar.fileobj
        for off, length, tar_off in segments:
            src.seek(tar_off)
            done = 0
            while done < length:
                data = src.read(min(CHUNK, length - done))
                if not data:
                    raise CorruptDataError(f"{info.name}: file data ends early", blob=self.name, offset=tar_off + done)
                yield off + done, data
                done += len(data)

    def _record_mappings(self, ino: int, segments, extents) -> None:
        """Map each piece, rounded up to whole sectors, onto its physical extents (§4.2)."""
        bs = self.fs.block_size
        out = self.mapped.setdefault(ino, [])
        for off, length, tar_off in segments:
            start, end = off, off + -(-length // SECTOR) * SECTOR
            for ext in extents:
                lo = max(start, ext.logical * bs)
                hi = min(end, (ext.logical + ext.count) * bs)
                if lo >= hi:
                    continue
                if ext.uninit:
                    raise ObdError(f"{self.fs.path}: fallocate left uninitialised extents in inode {ino}")
                phys = ext.physical * bs + (lo - ext.logical * bs)
                out.append(Mapping(phys, hi - lo, tar_off + (lo - off)))

    def finish(self) -> None:
        """Set the times of directories named in this layer (after their contents changed)
        and collect the mappings of the files that still exist, by physical offset."""
        self.result.mappings = sorted(m for ms in self.mapped.values() for m in ms)
        for path, (sec, nsec) in self.dir_times.items():
            found = self.resolve_dir(path, create=False)
            if found is None or found[1] != path:
                continue
            inode = self.fs.read_inode(found[0])
            inode.set_times(sec, nsec)
            self.fs.write_inode(found[0], inode)


def apply_layer(fs: Filesystem, stream: BinaryIO, mode: str = MODE_DATA, name: str = "layer") -> ApplyResult:
    """Apply the layer blob ``stream`` (tar, tar+gzip or tar+zstd) to ``fs``."""
    tar = None
    try:
        inner = decompressed(stream)
        applier = LayerApplier(fs, mode, name, inner)
        raw = HashingReader(inner)
        tar = tarfile.open(fileobj=raw, mode="r|", encoding="utf-8", errors="surrogateescape")
        for info in tar:
            applier.apply_entry(tar, info)
        applier.finish()
        raw.drain()  # end-of-archive blocks and any trailing bytes belong to the diff_id
        applier.result.tar_size = raw.size
        applier.result.diff_id = "sha256:" + raw.sha.hexdigest()
    except STREAM_ERRORS as e:
        offset = tar.offset if tar is not None else 0
        raise CorruptDataError(f"not a valid layer tar: {e}", blob=name, offset=offset) from None
    finally:
        if tar is not None:
            tar.close()
    return applier.result


#: ``progress(bytes_read, bytes_total)`` of the layer blob being applied
Progress = Callable[[int, int], None]


class _Reporting:
    """Reports how much of a blob file has been read, every ``step`` bytes."""

    def __init__(self, f: BinaryIO, total: int, progress: Progress, step: int = 1 << 20):
        self._f, self._total, self._progress, self._step = f, total, progress, step
        self._done = self._next = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._done += len(data)
        if self._done >= self._next or not data:
            self._progress(self._done, self._total)
            self._next = self._done + self._step
        return data


def apply_layer_file(image: str, layer: str, mode: str = MODE_DATA, progress: Progress | None = None) -> ApplyResult:
    """Open the ext4 image file ``image``, apply the layer blob file ``layer``, close."""
    with Filesystem(image) as fs, open(layer, "rb") as f:
        if progress is None:
            return apply_layer(fs, f, mode, name=layer)
        reporting = _Reporting(f, os.fstat(f.fileno()).st_size, progress)
        return apply_layer(fs, reporting, mode, name=layer)  # type: ignore[arg-type]
