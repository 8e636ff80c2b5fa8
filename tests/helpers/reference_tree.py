"""A REFERENCE extraction of an image's layers into a tree description.

Deliberately independent of ``tcmu_overlaybd.convert.apply``: a plain dict
model applying the OCI image-spec rules layer by layer.  Whiteouts of a layer
act on the lower layers only (they are applied before the layer's other
entries), a hard link is a copy of its target as it is at that moment, parent
symlinks are followed inside the root, a path replaced by another type drops
everything below it.  Paths are ``/``-rooted strings.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import posixpath
import tarfile
from dataclasses import dataclass, field, replace

import zstandard


@dataclass(frozen=True)
class Node:
    type: str  # reg dir sym chr blk fifo
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int
    gid: int
    size: int = 0
    sha256: str = ""
    link: str = ""
    xattrs: tuple[tuple[str, bytes], ...] = field(default_factory=tuple)
    rdev: tuple[int, int] = (0, 0)


def _clean(name: str) -> str:
    parts: list[str] = []
    for p in name.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if parts:
                parts.pop()
        else:
            parts.append(p)
    return "/" + "/".join(parts)


def _open_tar(blob: bytes) -> tarfile.TarFile:
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    elif blob[:4] == b"\x28\xb5\x2f\xfd":
        blob = zstandard.ZstdDecompressor().decompressobj().decompress(blob)
    return tarfile.open(fileobj=io.BytesIO(blob), mode="r:", encoding="utf-8", errors="surrogateescape")


class ReferenceTree:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {"/": Node("dir", 0o755, 0, 0)}

    # -- helpers ----------------------------------------------------------------------------
    def _drop(self, path: str) -> None:
        self.nodes.pop(path, None)
        prefix = path.rstrip("/") + "/"
        for p in [p for p in self.nodes if p.startswith(prefix)]:
            del self.nodes[p]

    def _resolve_parent(self, path: str, create: bool) -> str | None:
        """Real path of the parent directory of ``path`` (symlinks followed inside /)."""
        parts = [p for p in path.split("/") if p][:-1]
        real = "/"
        hops = 0
        while parts:
            comp = parts.pop(0)
            cand = posixpath.join(real, comp)
            node = self.nodes.get(cand)
            if node is not None and node.type == "sym":
                hops += 1
                assert hops < 40
                target = node.link if node.link.startswith("/") else posixpath.join(real, node.link)
                parts = [p for p in _clean(target).split("/") if p] + parts
                real = "/"
                continue
            if node is None or node.type != "dir":
                if not create:
                    return None
                self._drop(cand)
                self.nodes[cand] = Node("dir", 0o755, 0, 0)
            real = cand
        return real

    # -- layers -----------------------------------------------------------------------------
    def apply_layer(self, blob: bytes) -> None:
        with _open_tar(blob) as tar:
            members = list(tar)
            whiteouts = [m for m in members if posixpath.basename(_clean(m.name)).startswith(".wh.")]
            for m in whiteouts:
                path = _clean(m.name)
                parent = self._resolve_parent(path, create=False)
                if parent is None:
                    continue
                base = posixpath.basename(path)
                if base == ".wh..wh..opq":
                    prefix = parent.rstrip("/") + "/"
                    for p in [p for p in self.nodes if p.startswith(prefix)]:
                        del self.nodes[p]
                else:
                    self._drop(posixpath.join(parent, base[4:]))
            for m in members:
                path = _clean(m.name)
                if path == "/" or posixpath.basename(path).startswith(".wh."):
                    continue
                parent = self._resolve_parent(path, create=True)
                real = posixpath.join(parent, posixpath.basename(path))
                self._add(tar, m, real)

    def _add(self, tar: tarfile.TarFile, m: tarfile.TarInfo, real: str) -> None:
        xattrs = tuple(
            sorted(
                (k[len("SCHILY.xattr.") :], v.encode("utf-8", "surrogateescape"))
                for k, v in m.pax_headers.items()
                if k.startswith("SCHILY.xattr.")
            )
        )
        old = self.nodes.get(real)
        common = dict(mode=m.mode & 0o7777, uid=m.uid, gid=m.gid, xattrs=xattrs)
        if m.isdir():
            if old is not None and old.type == "dir":
                merged = tuple(sorted({**dict(old.xattrs), **dict(xattrs)}.items()))
                self.nodes[real] = replace(old, mode=m.mode & 0o7777, uid=m.uid, gid=m.gid, xattrs=merged)
                return
            self._drop(real)
            self.nodes[real] = Node("dir", **common)
            return
        if m.islnk():
            target_path = _clean(m.linkname)
            tparent = self._resolve_parent(target_path, create=False)
            target = self.nodes[posixpath.join(tparent, posixpath.basename(target_path))]
            self._drop(real)
            self.nodes[real] = target
            return
        self._drop(real)
        if m.isreg():
            data = tar.extractfile(m).read()
            self.nodes[real] = Node("reg", size=len(data), sha256=hashlib.sha256(data).hexdigest(), **common)
        elif m.issym():
            self.nodes[real] = Node("sym", link=m.linkname, size=len(m.linkname.encode()), **{**common, "mode": 0o777})
        elif m.ischr() or m.isblk():
            self.nodes[real] = Node("chr" if m.ischr() else "blk", rdev=(m.devmajor, m.devminor), **common)
        elif m.isfifo():
            self.nodes[real] = Node("fifo", **common)
        else:
            raise ValueError(f"reference: unsupported entry {m.name} type {m.type!r}")


def reference_tree(blobs: list[bytes]) -> dict[str, Node]:
    """The tree an image made of the layer ``blobs`` (bottom first) must show."""
    tree = ReferenceTree()
    for blob in blobs:
        tree.apply_layer(blob)
    return tree.nodes
