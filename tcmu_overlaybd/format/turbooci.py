"""TurboOCI (FastOCI) layers: the meta tarball and the warp LSMT over the original layer (spec §4).

A TurboOCI image leaves the original OCI layers untouched and adds, per layer, a
meta layer ``turboOCIv1.tar.gz`` (§4.1): a gzip tar holding

* ``ext4.fs.meta`` (or ``erofs.fs.meta``): a ZFile'd sealed *warp* LSMT (§4.3)
  whose tag-0 entries hold ext4 metadata and whose tag-1 entries point into the
  original layer's *uncompressed* tar (``moffset`` in sectors);
* ``.turbo.ociv1``: an empty marker (legacy FastOCI: ``.fastoci.overlaybd``);
* ``gzip.meta``: the gzip index of the original layer when it is gzip (§4.4).

``open_turbo_layer`` turns a meta blob plus the original layer blob into one
LSMT layer (a ByteSource of the virtual disk) ready for ``StackedDisk``.  Its
two reads that may each cost a registry round trip, ``open_meta`` (the meta
tarball) and ``check_target_kind`` (the head of the original layer), depend on
nothing but their own blob, so an image opener may run them concurrently and
join the results with ``turbo_layer``.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass

from ..block.source import ByteSource, BytesSource, clamp_read
from ..errors import CorruptDataError, UnsupportedError
from . import layer, lsmt
from .gzindex import GzipIndex, GzipIndexedSource
from .tarmeta import is_tar_header, scan_tar

EXT4_META = "ext4.fs.meta"
EROFS_META = "erofs.fs.meta"
GZIP_META = "gzip.meta"
MARKER = ".turbo.ociv1"
#: the identifier of legacy FastOCI meta layers (``foci.tar.gz``, version ``0.1.0-fastoci``)
LEGACY_MARKER = ".fastoci.overlaybd"
#: tag of warp-LSMT entries that point into the original layer's uncompressed tar
TARGET_TAG = 1
#: a meta layer is ~3% of its layer; refuse to inflate absurd ones into memory
MAX_META_TAR = 1 << 30
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclass(frozen=True)
class TurboMeta:
    """The members of a meta layer tarball."""

    fs_type: str  # "ext4" (or "erofs")
    fs_meta: bytes  # the ZFile'd warp LSMT
    gzip_index: bytes | None  # ``gzip.meta`` when the original layer is gzip
    has_marker: bool  # ``.turbo.ociv1`` (or legacy ``.fastoci.overlaybd``) present


def read_meta_tarball(meta_blob: ByteSource) -> TurboMeta:
    """Unpack ``turboOCIv1.tar.gz`` (gzip or plain tar) into its members."""
    name = meta_blob.name
    raw = meta_blob.read(0, meta_blob.size)
    if len(raw) != meta_blob.size:
        raise CorruptDataError(f"truncated: {len(raw)} of {meta_blob.size} bytes", blob=name, offset=len(raw))
    tar = _gunzip(raw, name) if raw[:2] == _GZIP_MAGIC else raw
    tar_src = BytesSource(tar, f"{name} (tar)")
    members: dict[str, bytes] = {}
    for entry in scan_tar(tar_src):
        if entry.is_regular:
            end = entry.data_offset + entry.size
            if end > len(tar):
                raise CorruptDataError(
                    f"member {entry.path} runs past the end of the tar ({end} > {len(tar)})",
                    blob=tar_src.name, offset=entry.header_offset,
                )
            members[entry.path] = tar[entry.data_offset : end]
    if EXT4_META in members:
        fs_type, fs_meta = "ext4", members[EXT4_META]
    elif EROFS_META in members:
        fs_type, fs_meta = "erofs", members[EROFS_META]
    else:
        names = sorted(members)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise CorruptDataError(
            f"not a TurboOCI meta layer: no {EXT4_META} among its files ({shown or 'none'})", blob=name, offset=0
        )
    return TurboMeta(fs_type, fs_meta, members.get(GZIP_META), MARKER in members or LEGACY_MARKER in members)


# --- writing the meta tarball (the convertor's Go archive/tar output) -------------------

#: USTAR header as Go's archive/tar writes it for tar.Header{Name, Mode, Size, Typeflag}:
#: octal fields zero-padded with a NUL (mtime 0, uid/gid 0, empty user/group names,
#: devmajor/devminor "0000000"), checksum as 6 digits + NUL + space; the archive ends
#: with exactly two zero blocks (no padding to a 10 KiB record)
_GO_OCTAL_FIELDS = ((100, 8, "mode"), (108, 8, "uid"), (116, 8, "gid"), (124, 12, "size"),
                    (136, 12, "mtime"), (329, 8, "devmajor"), (337, 8, "devminor"))


def _go_ustar_header(name: str, size: int, mode: int) -> bytes:
    block = bytearray(512)
    raw_name = name.encode()
    block[0 : len(raw_name)] = raw_name
    values = {"mode": mode, "uid": 0, "gid": 0, "size": size, "mtime": 0, "devmajor": 0, "devminor": 0}
    for at, width, field in _GO_OCTAL_FIELDS:
        block[at : at + width - 1] = b"%0*o" % (width - 1, values[field])
    block[156] = ord("0")
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def build_meta_tar(fs_meta: bytes, gzip_index: bytes | None = None, *, fs_type: str = "ext4",
                   mode: int = 0o644) -> bytes:
    """The uncompressed meta layer tar, byte for byte as ACI's convertor writes it.

    Its sha256 is the layer's ``diff_id``; the gzip around it (Go's deflate) cannot be
    reproduced, so ``build_meta_tarball`` compresses with zlib instead.
    """
    members = [(f"{fs_type}.fs.meta", fs_meta), (MARKER, b"")]
    if gzip_index is not None:
        members.append((GZIP_META, gzip_index))
    out = bytearray()
    for name, data in members:
        out += _go_ustar_header(name, len(data), mode)
        out += data
        out += bytes(-len(data) % 512)
    return bytes(out + bytes(1024))


def build_meta_tarball(fs_meta: bytes, gzip_index: bytes | None = None, *, fs_type: str = "ext4") -> bytes:
    """``turboOCIv1.tar.gz``: ``build_meta_tar`` gzip-compressed (no timestamp)."""
    return gzip.compress(build_meta_tar(fs_meta, gzip_index, fs_type=fs_type), mtime=0)


def _gunzip(raw: bytes, name: str) -> bytes:
    d = zlib.decompressobj(47)
    try:
        tar = d.decompress(raw, MAX_META_TAR + 1)
    except zlib.error as e:
        raise CorruptDataError(f"meta layer does not gunzip: {e}", blob=name, offset=0) from None
    if len(tar) > MAX_META_TAR:
        raise UnsupportedError(f"{name}: meta layer inflates beyond {MAX_META_TAR >> 20} MiB")
    if not d.eof:
        raise CorruptDataError("truncated gzip stream", blob=name, offset=len(raw))
    return tar


class _TarView:
    """The original layer's uncompressed tar; a short read means the target is truncated.

    Warp entries map whole sectors of 512-padded tar data, so a correct target
    always has every byte the LSMT asks for.
    """

    def __init__(self, base: ByteSource, blob: str):
        self.base = base
        self.name = base.name
        self.size = base.size
        self._blob = blob

    def read(self, offset: int, length: int) -> bytes:
        data = self.base.read(offset, length)
        if len(data) != length:
            raise CorruptDataError(
                f"truncated: the layer's tar has {self.size} bytes, TurboOCI metadata maps "
                f"[{offset}, {offset + length})",
                blob=self._blob, offset=min(offset + len(data), self.size),
            )
        return data

    def warm_map(self, offset: int, length: int):
        """Warming a range of the tar warms the same range of the source behind it."""
        return self.base, offset, clamp_read(self.size, offset, length)

    def close(self) -> None:
        self.base.close()


def open_warp_layer(fs_meta: ByteSource, tar_view: ByteSource) -> lsmt.LsmtFile:
    """The warp LSMT in ``fs_meta`` (ZFile or raw) with tag 1 reading ``tar_view``."""
    if fs_meta.size == 0:
        raise CorruptDataError("empty fs.meta", blob=fs_meta.name, offset=0)
    view = tar_view if isinstance(tar_view, _TarView) else _TarView(tar_view, tar_view.name)
    warp = layer.open_layer_blob(fs_meta, warp=True, targets={TARGET_TAG: view})
    if not any(tag == 0 for *_, tag in warp.segments()):
        raise CorruptDataError("warp layer has no metadata (tag 0) entries", blob=fs_meta.name, offset=0)
    return warp


def check_target_kind(target: ByteSource, target_is_gzip: bool) -> None:
    """A mislabelled layer would hand compressed bytes to ext4 as file contents: check up front.

    Reads the first 512 bytes of the original layer (one request to a registry)."""
    head = target.read(0, 512)
    if head[:4] == _ZSTD_MAGIC:
        raise UnsupportedError(f"{target.name}: TurboOCI over a zstd-compressed layer is not supported")
    if head[:2] == _GZIP_MAGIC:
        found = "gzip"
    elif is_tar_header(head):
        found = "plain tar"
    else:
        raise CorruptDataError("the original layer is neither gzip nor a tar", blob=target.name, offset=0)
    said = "gzip" if target_is_gzip else "plain tar"
    if found != said:
        raise CorruptDataError(f"the original layer is {found} but its media type says {said}",
                               blob=target.name, offset=0)


def open_meta(meta_blob: ByteSource) -> TurboMeta:
    """The members of the meta tarball ``meta_blob``, which must describe an ext4 layer."""
    meta = read_meta_tarball(meta_blob)
    if meta.fs_type != "ext4":
        raise UnsupportedError(f"{meta_blob.name}: {meta.fs_type} TurboOCI layers are not supported (only ext4)")
    return meta


def turbo_layer(
    meta: TurboMeta,
    meta_name: str,
    target: ByteSource,
    *,
    target_is_gzip: bool,
    gzip_cache=None,
    cache_key: str | None = None,
) -> lsmt.LsmtFile:
    """The layer of ``meta`` (from ``open_meta`` of the blob ``meta_name``) over ``target``,
    whose kind ``check_target_kind`` accepted; reads nothing from ``target``."""
    if target_is_gzip:
        if meta.gzip_index is None:
            raise CorruptDataError(
                f"the original layer is gzip but the meta layer has no {GZIP_META}", blob=meta_name, offset=0
            )
        index = GzipIndex.from_bytes(meta.gzip_index, name=f"{meta_name}:{GZIP_META}")
        tar_view: ByteSource = GzipIndexedSource(target, index, cache=gzip_cache, cache_key=cache_key)
    else:
        tar_view = target
    fs_meta = BytesSource(meta.fs_meta, f"{meta_name}:{EXT4_META}")
    return open_warp_layer(fs_meta, _TarView(tar_view, target.name))


def open_turbo_layer(
    meta_blob: ByteSource,
    target: ByteSource,
    *,
    target_is_gzip: bool,
    gzip_cache=None,
    cache_key: str | None = None,
) -> lsmt.LsmtFile:
    """One TurboOCI layer: the meta tarball's warp LSMT over the original layer ``target``.

    ``target`` is the original layer blob (gzip or plain tar per ``target_is_gzip``);
    gzip targets are read through the tarball's ``gzip.meta`` and, with
    ``gzip_cache`` (a ``cache.gzipcache.GzipCache``), through the decompressed-data
    cache keyed by ``cache_key`` (default: the digest in ``target.name``; a target
    known only by path is not cached).
    """
    meta = open_meta(meta_blob)
    check_target_kind(target, target_is_gzip)
    return turbo_layer(meta, meta_blob.name, target, target_is_gzip=target_is_gzip,
                       gzip_cache=gzip_cache, cache_key=cache_key)
