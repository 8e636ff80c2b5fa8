"""Tar headers with data offsets, and tar-meta files (spec §4.6).

A TurboOCI layer needs, for every tar entry, its metadata and -- for regular
files -- where its data starts in the *uncompressed* tar.  ``scan_tar`` walks a
real tar (skipping file data) and yields ``TarEntry`` objects;
``read_tar_meta`` yields the same entries from a tar-meta file, which is what
``turboOCI-apply --export`` writes:

* every 512-byte header block of the tar, verbatim, in order, including GNU
  ``L``/``K`` long-name blocks and PAX ``x``/``g`` headers *with* their data
  blocks; no file contents and no end-of-archive zero blocks;
* in the header of a regular file, bytes 329..336 (``devmajor``) hold the
  file's data offset in the uncompressed tar as a little-endian i64; the header
  checksum is left stale (readers skip checksum checks of those headers).

"Regular file" follows upstream libtar exactly: typeflag ``'0'``, ``'\\0'`` or
``'7'``, or a mode with ``S_IFREG`` set and typeflag other than ``'1'``.
Only regular files have their data skipped.  A PAX ``size`` record overrides
the header size when it is positive.
"""

from __future__ import annotations

import posixpath
import stat
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator

from ..block.source import ByteSource
from ..errors import CorruptDataError

BLOCK = 512

# ustar header fields (POSIX.1-1988; GNU and PAX extensions below)
NAME = slice(0, 100)
MODE = slice(100, 108)
UID = slice(108, 116)
GID = slice(116, 124)
SIZE = slice(124, 136)
MTIME = slice(136, 148)
CHKSUM = slice(148, 156)
TYPEFLAG = 156
LINKNAME = slice(157, 257)
MAGIC = slice(257, 263)
UNAME = slice(265, 297)
GNAME = slice(297, 329)
DEVMAJOR = slice(329, 337)
DEVMINOR = slice(337, 345)
PREFIX = slice(345, 500)
#: tar-meta: the data offset replaces ``devmajor`` in regular-file headers
DATA_OFFSET = struct.Struct("<q")
DATA_OFFSET_AT = DEVMAJOR.start

GNU_LONGNAME, GNU_LONGLINK, PAX_LOCAL, PAX_GLOBAL = "L", "K", "x", "g"
_EXTENSIONS = (GNU_LONGNAME, GNU_LONGLINK, PAX_LOCAL, PAX_GLOBAL)
_ZERO_BLOCK = bytes(BLOCK)


@dataclass
class TarEntry:
    """One tar member: its header fields, extension records and (regular files) data offset."""

    header_offset: int  # offset of the member's main header block in its input
    name: str  # PAX path > GNU long name > ustar prefix/name, as stored
    typeflag: str
    mode: int
    uid: int
    gid: int
    mtime: int
    size: int  # PAX size when positive, else the header's
    linkname: str = ""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    data_offset: int | None = None  # regular files: where the data starts in the uncompressed tar
    pax: dict[str, bytes] = field(default_factory=dict, repr=False)
    #: the blocks this member contributes to a tar-meta file (extension blocks + patched header)
    meta_blocks: bytes = field(default=b"", repr=False)

    @property
    def path(self) -> str:
        """``name`` cleaned like upstream: no ``.``/``..``/duplicate or trailing slashes, relative."""
        return _clean(self.name)

    @property
    def link_path(self) -> str:
        return _clean(self.linkname)

    @property
    def is_regular(self) -> bool:
        return _is_regular(self.typeflag, self.mode)

    @property
    def xattrs(self) -> dict[str, bytes]:
        """``SCHILY.xattr.*`` PAX records (name without the prefix -> raw value)."""
        p = "SCHILY.xattr."
        return {k[len(p):]: v for k, v in self.pax.items() if k.startswith(p)}


def _clean(name: str) -> str:
    if not name:
        return ""
    cleaned = posixpath.normpath("/" + name).lstrip("/")
    return cleaned or "."


def _is_regular(typeflag: str, mode: int) -> bool:
    return typeflag in ("0", "\0", "7") or (stat.S_ISREG(mode) and typeflag != "1")


def _octal(raw: bytes) -> int:
    """A numeric field: octal text (leading spaces, stops at the first non-digit) or base-256."""
    if raw and raw[0] in (0x80, 0xFF):  # GNU base-256: 0x80 positive, 0xFF two's complement negative
        value = int.from_bytes(raw[1:], "big")
        return value - 256 ** (len(raw) - 1) if raw[0] == 0xFF else value
    text = raw.lstrip(b" ")
    end = 0
    while end < len(text) and 0x30 <= text[end] <= 0x37:
        end += 1
    return int(text[:end], 8) if end else 0


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


_HIGH_BYTES = bytes(range(0x80, 0x100))


def _checksum_ok(block: bytes) -> bool:
    """The header sum with the checksum field as spaces, bytes unsigned or (old tars) signed."""
    stored = _octal(block[CHKSUM])
    unsigned = sum(block) - sum(block[CHKSUM]) + 8 * 0x20
    if stored == unsigned:
        return True
    rest = block[:CHKSUM.start] + block[CHKSUM.stop :]
    high = len(rest) - len(rest.translate(None, _HIGH_BYTES))
    return stored == unsigned - 256 * high


def is_tar_header(block: bytes) -> bool:
    """True for a 512-byte block that starts a tar: a header with a valid checksum, or zeros."""
    return len(block) == BLOCK and (block == _ZERO_BLOCK or _checksum_ok(block))


def _parse_pax(data: bytes, blob: str, offset: int) -> dict[str, bytes]:
    """PAX records ``"<len> <key>=<value>\\n"``."""
    records: dict[str, bytes] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else -1
        except ValueError:
            length = -1
        end = pos + length
        if length < 5 or end > len(data) or data[end - 1] != 0x0A or b"=" not in data[space + 1 : end]:
            raise CorruptDataError("malformed PAX record", blob=blob, offset=offset + pos)
        key, value = data[space + 1 : end - 1].split(b"=", 1)
        records[key.decode("utf-8", "surrogateescape")] = value
        pos = end
    return records


class _Input:
    """Sequential block reader over a ByteSource (random access) or a binary stream."""

    READ_AHEAD = 1 << 16

    def __init__(self, src: ByteSource | BinaryIO):
        self.src = src
        self.is_source = isinstance(src, ByteSource)
        name = getattr(src, "name", None)
        self.name = name if isinstance(name, str) else "<tar stream>"
        self.pos = 0
        self._buf = b""
        self._buf_at = 0

    def read(self, n: int) -> bytes:
        if self.is_source:
            if not self._buf_at <= self.pos <= self._buf_at + len(self._buf) - n:
                self._buf = self.src.read(self.pos, max(n, self.READ_AHEAD))
                self._buf_at = self.pos
            start = self.pos - self._buf_at
            data = self._buf[start : start + n]
        else:
            data = self.src.read(n)
            while len(data) < n and (more := self.src.read(n - len(data))):
                data += more
        self.pos += len(data)
        return data

    def skip(self, n: int) -> None:
        if self.is_source:
            self.pos += n
            return
        left = n
        while left:
            chunk = self.src.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
        self.pos += n - left


def _iter_entries(src: ByteSource | BinaryIO, *, from_meta: bool) -> Iterator[TarEntry]:
    inp = _Input(src)
    while True:
        ext_blocks = bytearray()
        longname = longlink = None
        pax: dict[str, bytes] = {}
        zero_blocks = 0
        while True:
            at = inp.pos
            block = inp.read(BLOCK)
            if not block:
                return
            if len(block) < BLOCK:
                raise CorruptDataError(f"truncated tar header ({len(block)} of {BLOCK} bytes)", blob=inp.name, offset=at)
            if block == _ZERO_BLOCK:
                # two zero blocks in a row end the archive; a lone one is skipped (not exported)
                zero_blocks += 1
                if zero_blocks >= 2:
                    return
                continue
            zero_blocks = 0
            typeflag = chr(block[TYPEFLAG])
            mode = _octal(block[MODE])
            # upstream patches every header block it calls regular, extension headers included
            regular = _is_regular(typeflag, mode)
            if not (from_meta and regular) and not _checksum_ok(block):
                raise CorruptDataError("tar header checksum mismatch", blob=inp.name, offset=at)
            meta_block = block
            if regular and not from_meta:
                meta_block = block[:DATA_OFFSET_AT] + DATA_OFFSET.pack(inp.pos) + block[DEVMAJOR.stop :]
            if typeflag not in _EXTENSIONS:
                break
            size = _octal(block[SIZE])
            data_at = inp.pos
            padded = -(-size // BLOCK) * BLOCK
            data = inp.read(padded)
            if len(data) != padded:
                raise CorruptDataError(
                    f"truncated {typeflag!r} extension data ({len(data)} of {padded} bytes)", blob=inp.name, offset=data_at
                )
            ext_blocks += meta_block + data
            if typeflag == GNU_LONGNAME:
                longname = _text(data[:size])
            elif typeflag == GNU_LONGLINK:
                longlink = _text(data[:size])
            elif typeflag == PAX_LOCAL:
                pax = _parse_pax(data[:size], inp.name, data_at)
        entry = _entry(block, at, typeflag, mode, longname, longlink, pax)
        if regular:
            entry.devmajor = 0
            if from_meta:
                entry.data_offset = DATA_OFFSET.unpack_from(block, DATA_OFFSET_AT)[0]
                if entry.data_offset < 0:
                    raise CorruptDataError(
                        f"negative data offset {entry.data_offset}", blob=inp.name, offset=at + DATA_OFFSET_AT
                    )
            else:
                entry.data_offset = inp.pos
                inp.skip(-(-entry.size // BLOCK) * BLOCK)
        entry.meta_blocks = bytes(ext_blocks) + meta_block
        yield entry


def _entry(block: bytes, at: int, typeflag: str, mode: int, longname, longlink, pax) -> TarEntry:
    name = _text(block[NAME])
    if block[MAGIC][:5] == b"ustar" and block[PREFIX.start]:
        name = _text(block[PREFIX]) + "/" + name
    if longname is not None:
        name = longname
    if "path" in pax:
        name = pax["path"].decode("utf-8", "surrogateescape")
    linkname = _text(block[LINKNAME])
    if longlink is not None:
        linkname = longlink
    if "linkpath" in pax:
        linkname = pax["linkpath"].decode("utf-8", "surrogateescape")
    size = _octal(block[SIZE])
    if "size" in pax:
        try:
            pax_size = int(pax["size"])
        except ValueError:
            pax_size = 0
        if pax_size > 0:
            size = pax_size
    return TarEntry(
        header_offset=at, name=name, typeflag=typeflag, mode=mode, uid=_octal(block[UID]),
        gid=_octal(block[GID]), mtime=_octal(block[MTIME]), size=size, linkname=linkname,
        uname=_text(block[UNAME]), gname=_text(block[GNAME]), devmajor=_octal(block[DEVMAJOR]),
        devminor=_octal(block[DEVMINOR]), pax=pax,
    )


def scan_tar(tar: ByteSource | BinaryIO) -> Iterator[TarEntry]:
    """Walk an uncompressed tar (a ByteSource, or a stream read front to back), skipping file data.

    Header checksums are verified; a bad or truncated header raises CorruptDataError
    naming the tar and the header's offset.
    """
    return _iter_entries(tar, from_meta=False)


def read_tar_meta(meta: ByteSource | BinaryIO) -> Iterator[TarEntry]:
    """Entries of a tar-meta file; regular files carry ``data_offset`` from bytes 329..336."""
    return _iter_entries(meta, from_meta=True)


def write_tar_meta(entries: Iterator[TarEntry] | list[TarEntry]) -> bytes:
    """The tar-meta bytes for ``entries`` (from ``scan_tar`` or ``read_tar_meta``)."""
    return b"".join(e.meta_blocks for e in entries)


def export_tar_meta(tar: ByteSource | BinaryIO) -> bytes:
    """``turboOCI-apply --export``: the tar-meta of an uncompressed tar, byte for byte."""
    return write_tar_meta(scan_tar(tar))
