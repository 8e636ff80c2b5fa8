"""Build OCI layers and images for tests from declarative entry lists.

Tars are written with Python's ``tarfile`` (PAX or GNU headers); sparse files,
which ``tarfile`` cannot write, are assembled here byte by byte in the four
formats GNU tar produces: old GNU ``S`` headers and PAX GNU sparse 0.0, 0.1 and
1.0.  Layers come out plain, gzip'd or zstd'd, and :func:`write_oci_layout`
stores a whole image as an OCI image layout directory.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass, field

import zstandard

MTIME = 1_600_000_000


@dataclass
class Entry:
    """One tar entry.  ``kind``: file dir symlink hardlink char block fifo whiteout opaque sparse."""

    path: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    mtime_ns: int = 0
    link: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)
    rdev: tuple[int, int] = (0, 0)
    #: sparse files: the real size and the stored (offset, bytes) pieces
    size: int = 0
    pieces: list[tuple[int, bytes]] = field(default_factory=list)
    sparse_format: str = "pax1.0"  # pax0.0 | pax0.1 | pax1.0 | gnu

    def default_mode(self) -> int:
        if self.mode is not None:
            return self.mode
        return {"dir": 0o755, "symlink": 0o777}.get(self.kind, 0o644)


_TYPES = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n += 1
    return str(n).encode() + body


def _pax_header(records: list[tuple[str, bytes]], name: str = "./PaxHeaders/sparse") -> bytes:
    payload = b"".join(_pax_record(k, v) for k, v in records)
    info = tarfile.TarInfo(name)
    info.type = tarfile.XHDTYPE
    info.size = len(payload)
    return info.tobuf(tarfile.USTAR_FORMAT) + _pad(payload)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def _base_info(e: Entry, name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.REGTYPE
    info.size = size
    info.mode = e.default_mode()
    info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
    return info


def _sparse_bytes(e: Entry) -> bytes:
    data = b"".join(d for _, d in e.pieces)
    pieces = [(off, len(d)) for off, d in e.pieces]
    if e.sparse_format == "gnu":
        if len(pieces) > 4:
            raise ValueError("old GNU sparse test entries hold at most 4 pieces")
        info = _base_info(e, e.path, len(data))
        hdr = bytearray(info.tobuf(tarfile.GNU_FORMAT))
        hdr[156] = ord(tarfile.GNUTYPE_SPARSE)
        for i, (off, n) in enumerate(pieces):  # struct sparse[4] at 386, 24 bytes each
            hdr[386 + 24 * i : 386 + 24 * i + 24] = b"%011o\0%011o\0" % (off, n)
        hdr[482] = 0  # isextended
        hdr[483:495] = b"%011o\0" % e.size  # realsize
        hdr[148:156] = b" " * 8
        hdr[148:156] = b"%06o\0 " % sum(hdr)
        return bytes(hdr) + _pad(data)
    if e.sparse_format == "pax1.0":
        sparse_map = f"{len(pieces)}\n" + "".join(f"{o}\n{n}\n" for o, n in pieces)
        body = _pad(sparse_map.encode()) + data
        dirname, base = os.path.split(e.path)
        records = [
            ("GNU.sparse.major", b"1"),
            ("GNU.sparse.minor", b"0"),
            ("GNU.sparse.name", e.path.encode()),
            ("GNU.sparse.realsize", str(e.size).encode()),
        ]
        info = _base_info(e, os.path.join(dirname, "GNUSparseFile.0", base), len(body))
        return _pax_header(records) + info.tobuf(tarfile.USTAR_FORMAT) + _pad(body)
    records = [("GNU.sparse.size", str(e.size).encode()), ("GNU.sparse.numblocks", str(len(pieces)).encode())]
    if e.sparse_format == "pax0.0":
        for o, n in pieces:
            records += [("GNU.sparse.offset", str(o).encode()), ("GNU.sparse.numbytes", str(n).encode())]
    elif e.sparse_format == "pax0.1":
        records.append(("GNU.sparse.map", ",".join(f"{o},{n}" for o, n in pieces).encode()))
    else:
        raise ValueError(f"unknown sparse format {e.sparse_format}")
    info = _base_info(e, e.path, len(data))
    return _pax_header(records) + info.tobuf(tarfile.USTAR_FORMAT) + _pad(data)


def build_tar(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """An uncompressed layer tar holding ``entries`` in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape") as tar:
        for e in entries:
            if e.kind == "sparse":
                raw = _sparse_bytes(e)
                tar.fileobj.write(raw)
                tar.offset += len(raw)
                continue
            name = e.path
            if e.kind == "whiteout":
                head, tail = os.path.split(e.path)
                name, kind = os.path.join(head, ".wh." + tail), "file"
            elif e.kind == "opaque":
                name, kind = os.path.join(e.path, ".wh..wh..opq"), "file"
            else:
                kind = e.kind
            info = tarfile.TarInfo(name)
            info.type = _TYPES[kind]
            info.mode = e.default_mode() if e.kind not in ("whiteout", "opaque") else 0o644
            info.uid, info.gid, info.mtime = e.uid, e.gid, e.mtime
            info.linkname = e.link
            info.devmajor, info.devminor = e.rdev
            pax = {f"SCHILY.xattr.{k}": v.decode("utf-8", "surrogateescape") for k, v in e.xattrs.items()}
            if e.mtime_ns:
                pax["mtime"] = f"{e.mtime}.{e.mtime_ns:09d}"
            if pax:
                info.pax_headers = pax
            if kind == "file":
                info.size = len(e.data)
                tar.addfile(info, io.BytesIO(e.data))
            else:
                tar.addfile(info)
    return out.getvalue()


def compress(tar: bytes, how: str) -> bytes:
    """``how``: tar | gzip | zstd."""
    if how == "gzip":
        return gzip.compress(tar, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


MEDIA_TYPES = {
    "tar": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


def _put_blob(root: str, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    os.makedirs(os.path.join(root, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(root, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _put_manifest(root: str, layers: list[list[Entry]], compression: str, arch: str) -> tuple[dict, dict]:
    """Store the layers, config and manifest of one image; returns (manifest, its descriptor)."""
    tars = [build_tar(entries) for entries in layers]
    blobs = [compress(t, compression) for t in tars]
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in tars]},
    }
    cfg = _put_blob(root, json.dumps(config).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
        "layers": [{"mediaType": MEDIA_TYPES[compression], **_put_blob(root, b)} for b in blobs],
    }
    desc = {"mediaType": "application/vnd.oci.image.manifest.v1+json", **_put_blob(root, json.dumps(manifest).encode())}
    return manifest, desc


def _write_index(root: str, entry: dict, tag: str) -> None:
    index = {"schemaVersion": 2, "manifests": [{**entry, "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    with open(os.path.join(root, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(root, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def write_oci_layout(root: str, layers: list[list[Entry]], compression: str = "gzip", tag: str = "latest") -> dict:
    """Store an image made of ``layers`` as an OCI layout; returns the manifest."""
    manifest, desc = _put_manifest(root, layers, compression, "amd64")
    _write_index(root, desc, tag)
    return manifest


def write_oci_multiarch(root: str, images: dict[str, list[list[Entry]]], tag: str = "latest") -> dict:
    """Store one image per architecture behind an OCI index (tagged ``tag``); returns the index."""
    manifests = []
    for arch, layers in images.items():
        _manifest, desc = _put_manifest(root, layers, "gzip", arch)
        manifests.append({**desc, "platform": {"os": "linux", "architecture": arch}})
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": manifests}
    _write_index(root, {"mediaType": index["mediaType"], **_put_blob(root, json.dumps(index).encode())}, tag)
    return index
