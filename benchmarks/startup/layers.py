"""Tree snapshots, their differences, and the deterministic layer writer.

A build stage changes a root directory in place (debootstrap, ``apt-get install``).
``snapshot`` records what every path looks like (without reading contents);
``diff`` compares two snapshots the way a container engine's layer differ does:
a path is in the new layer if it is new or its metadata changed (inode number and
ctime included, so a file rewritten by dpkg's rename is caught); a path that
disappeared becomes a whiteout ``.wh.<name>`` in its parent (OCI image spec,
"Whiteouts"), only for the top-most removed path, and only where the parent is
still a directory (a lower directory replaced by a file hides its children).

``write_layer`` turns a list of paths into a gzip tar (PAX format, numeric owners
with empty user/group names, mtimes clamped to ``mtime_clamp``, gzip header
without name or time, entries in path-component order) and returns the layer's
digest (compressed) and diff_id (uncompressed), so identical trees give
identical digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from dataclasses import asdict, dataclass

from tcmu_overlaybd.errors import CorruptDataError, UsageError

#: the default clamp for mtimes: 2023-06-10, Debian 12's release day (SOURCE_DATE_EPOCH style)
DEFAULT_MTIME_CLAMP = 1686355200
#: gzip level of the layers (Go's compress/gzip default, what docker and buildkit use)
GZIP_LEVEL = 6
WHITEOUT_PREFIX = ".wh."
_COPY_CHUNK = 1 << 20
#: xattrs a layer carries (SELinux labels belong to the host, not the image)
_SKIP_XATTRS = ("security.selinux",)


@dataclass(frozen=True)
class Node:
    """What ``snapshot`` records about one path (``kind``: dir file symlink char block fifo)."""

    kind: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    link: str = ""


_KINDS = {stat.S_IFDIR: "dir", stat.S_IFREG: "file", stat.S_IFLNK: "symlink", stat.S_IFCHR: "char",
          stat.S_IFBLK: "block", stat.S_IFIFO: "fifo"}


def snapshot(root: str, skip_contents_of: tuple[str, ...] = ()) -> dict[str, Node]:
    """Every path under ``root`` (relative, no leading ``/``) -> Node; sockets are left out.

    Directories named in ``skip_contents_of`` (relative paths such as ``"dev"``) are
    recorded themselves but not descended into.
    """
    out: dict[str, Node] = {}
    skip = set(skip_contents_of)
    stack = [""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(root, rel) if rel else root) as it:
            for entry in it:
                path = f"{rel}/{entry.name}" if rel else entry.name
                st = entry.stat(follow_symlinks=False)
                kind = _KINDS.get(stat.S_IFMT(st.st_mode))
                if kind is None:
                    continue
                link = os.readlink(entry.path) if kind == "symlink" else ""
                out[path] = Node(kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                                 st.st_size if kind == "file" else 0, st.st_mtime_ns, st.st_ctime_ns,
                                 st.st_ino, link)
                if kind == "dir" and path not in skip:
                    stack.append(path)
    return out


def save_snapshot(snap: dict[str, Node], path: str) -> None:
    """Store a snapshot as gzip JSON (the build cache keeps one per stage)."""
    with gzip.open(path, "wt", compresslevel=1) as f:
        json.dump({p: asdict(n) for p, n in snap.items()}, f)


def load_snapshot(path: str) -> dict[str, Node]:
    try:
        with gzip.open(path, "rt") as f:
            return {p: Node(**n) for p, n in json.load(f).items()}
    except (OSError, ValueError, TypeError) as e:
        raise CorruptDataError(f"unreadable tree snapshot ({e})", blob=path) from None


def path_key(path: str) -> tuple[str, ...]:
    """Sort key that puts every directory right before its contents."""
    return tuple(path.split("/"))


@dataclass
class Diff:
    """What a layer holds: changed or new paths, and paths that need a whiteout."""

    changed: list[str]
    removed: list[str]


def diff(lower: dict[str, Node], upper: dict[str, Node]) -> Diff:
    """The layer that turns ``lower`` into ``upper`` (see the module docstring)."""
    changed = {p for p, n in upper.items() if lower.get(p) != n}
    removed = []
    for p in lower:
        if p in upper:
            continue
        parent = p.rpartition("/")[0]
        if not parent:
            removed.append(p)
        elif parent in upper and upper[parent].kind == "dir":
            removed.append(p)
            changed.add(parent)  # the whiteout's directory goes in the layer with it
        # else: the parent is gone or no longer a directory; an entry above covers p
    # every entry needs its parent directories in the layer too (as an engine's copy-up does)
    for p in list(changed):
        parent = p.rpartition("/")[0]
        while parent and parent not in changed:
            changed.add(parent)
            parent = parent.rpartition("/")[0]
    return Diff(sorted(changed, key=path_key), sorted(removed, key=path_key))


def whiteout_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/{WHITEOUT_PREFIX}{tail}" if head else WHITEOUT_PREFIX + tail


@dataclass
class LayerBlob:
    """A written layer: ``digest``/``size`` of the gzip blob, ``diff_id``/``tar_size`` of the tar."""

    digest: str
    size: int
    diff_id: str
    tar_size: int
    entries: int
    whiteouts: int
    media_type: str = "application/vnd.oci.image.layer.v1.tar+gzip"

    def to_json(self) -> dict:
        return asdict(self)


class _HashingWriter(io.RawIOBase):
    """A write-only stream that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink):
        self.sink = sink
        self.sha = hashlib.sha256()
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.count += len(b)
        if self.sink is not None:
            self.sink.write(b)
        return len(b)


def write_layer(root: str, paths: list[str], whiteouts: list[str], out_path: str,
                mtime_clamp: int = DEFAULT_MTIME_CLAMP) -> LayerBlob:
    """Write the gzip tar of ``paths`` (relative to ``root``) plus whiteouts to ``out_path``.

    Entries are written in ``path_key`` order with the whiteouts merged in, so the
    output depends only on the tree's contents and metadata, never on the order
    the filesystem lists directories in.
    """
    items = [(path_key(p), p, False) for p in paths] + [(path_key(whiteout_name(p)), p, True) for p in whiteouts]
    items.sort(key=lambda t: t[0])
    tmp = out_path + ".part"
    with open(tmp, "wb") as raw:
        compressed = _HashingWriter(raw)
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0)
        plain = _HashingWriter(gz)
        tar = tarfile.open(fileobj=plain, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
                           errors="surrogateescape")
        tar.copybufsize = _COPY_CHUNK
        links: dict[tuple[int, int], str] = {}
        for _key, rel, is_whiteout in items:
            if is_whiteout:
                info = tarfile.TarInfo(whiteout_name(rel))
                info.mode, info.mtime = 0o644, mtime_clamp
                tar.addfile(info)
            else:
                _add_path(tar, root, rel, mtime_clamp, links)
        tar.close()
        gz.close()
    os.replace(tmp, out_path)
    return LayerBlob(digest="sha256:" + compressed.sha.hexdigest(), size=compressed.count,
                     diff_id="sha256:" + plain.sha.hexdigest(), tar_size=plain.count,
                     entries=len(paths), whiteouts=len(whiteouts))


_TAR_TYPES = {stat.S_IFDIR: tarfile.DIRTYPE, stat.S_IFREG: tarfile.REGTYPE, stat.S_IFLNK: tarfile.SYMTYPE,
              stat.S_IFCHR: tarfile.CHRTYPE, stat.S_IFBLK: tarfile.BLKTYPE, stat.S_IFIFO: tarfile.FIFOTYPE}


def _add_path(tar: tarfile.TarFile, root: str, rel: str, mtime_clamp: int,
              links: dict[tuple[int, int], str]) -> None:
    full = os.path.join(root, rel)
    try:
        st = os.lstat(full)
    except FileNotFoundError:
        raise UsageError(f"{full}: vanished while its layer was written") from None
    fmt = stat.S_IFMT(st.st_mode)
    info = tarfile.TarInfo(rel)
    info.type = _TAR_TYPES.get(fmt, tarfile.REGTYPE)
    info.mode = stat.S_IMODE(st.st_mode)
    info.uid, info.gid = st.st_uid, st.st_gid
    info.uname = info.gname = ""
    info.mtime = min(int(st.st_mtime), mtime_clamp)
    pax = {}
    for name in os.listxattr(full, follow_symlinks=False):
        if name not in _SKIP_XATTRS:
            value = os.getxattr(full, name, follow_symlinks=False)
            pax["SCHILY.xattr." + name] = value.decode("utf-8", "surrogateescape")
    if pax:
        info.pax_headers = pax
    if fmt == stat.S_IFLNK:
        info.linkname = os.readlink(full)
    elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif fmt == stat.S_IFREG:
        if st.st_nlink > 1:
            first = links.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                info.type, info.linkname = tarfile.LNKTYPE, first
                tar.addfile(info)
                return
        info.size = st.st_size
        with open(full, "rb", buffering=0) as f:
            tar.addfile(info, _SizedReader(f, st.st_size, full))
        return
    tar.addfile(info)


class _SizedReader(io.RawIOBase):
    """A file read as exactly the size its tar header announced (a file that shrank is an error)."""

    def __init__(self, f, size: int, name: str):
        self.f, self.left, self.name = f, size, name

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = self.f.read(n) if n else b""
        if len(data) < n:
            raise UsageError(f"{self.name}: file shrank while its layer was written")
        self.left -= len(data)
        return data
