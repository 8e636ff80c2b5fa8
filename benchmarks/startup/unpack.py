"""Applying a layer tar to a root directory, as a container engine's unpacker does.

OCI image spec "Applying Changesets": entries are extracted in order; an existing
non-directory (or a directory replaced by a non-directory) is removed first;
``.wh.<name>`` removes ``<name>`` from the layers below; ``.wh..wh..opq`` empties
its directory of lower content.  Owners are numeric, modes and mtimes are kept.
Names that would leave the root (absolute, ``..``) are refused with the blob and
the entry's offset.
"""

from __future__ import annotations

import gzip
import os
import shutil
import tarfile
import zlib

from tcmu_overlaybd.errors import CorruptDataError

from .layers import WHITEOUT_PREFIX

OPAQUE = WHITEOUT_PREFIX + WHITEOUT_PREFIX + ".opq"
#: Pythons with extraction filters (3.11.4+) get "fully_trusted": apply_layer does its own path checks, and
#: device nodes, owners and modes must come out as the layer says
_EXTRACT_ARGS = {"filter": "fully_trusted"} if hasattr(tarfile, "fully_trusted_filter") else {}


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.unlink(path)


def apply_layer(fileobj, root: str, blob: str) -> int:
    """Extract the (uncompressed) tar stream ``fileobj`` into ``root``; returns the entry count.

    ``blob`` names the layer in error messages.  Directory mtimes are set after
    all entries, since extracting into a directory changes its mtime.
    """
    count = 0
    dirs: list[tarfile.TarInfo] = []
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|", errorlevel=2)
        for member in tar:
            count += 1
            name = member.name.rstrip("/")
            parts = name.split("/")
            if name.startswith("/") or ".." in parts:
                raise CorruptDataError(f"entry {member.name!r} leaves the root", blob=blob, offset=member.offset)
            head, tail = os.path.dirname(name), os.path.basename(name)
            target = os.path.join(root, name)
            if tail == OPAQUE:
                parent = os.path.join(root, head)
                for child in os.listdir(parent):
                    _remove(os.path.join(parent, child))
                continue
            if tail.startswith(WHITEOUT_PREFIX):
                _remove(os.path.join(root, head, tail[len(WHITEOUT_PREFIX):]))
                continue
            if os.path.lexists(target) and not (member.isdir() and os.path.isdir(target)
                                                and not os.path.islink(target)):
                _remove(target)
            if member.islnk() and (member.linkname.startswith("/") or ".." in member.linkname.split("/")):
                raise CorruptDataError(f"hard link {member.name!r} -> {member.linkname!r} leaves the root",
                                       blob=blob, offset=member.offset)
            tar.extract(member, root, set_attrs=not member.isdir(), numeric_owner=True, **_EXTRACT_ARGS)
            if member.isdir():
                dirs.append(member)
        tar.close()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise CorruptDataError(f"cannot unpack layer: {e}", blob=blob) from None
    for member in reversed(dirs):
        path = os.path.join(root, member.name)
        os.chown(path, member.uid, member.gid, follow_symlinks=False)
        os.chmod(path, member.mode)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
    return count
