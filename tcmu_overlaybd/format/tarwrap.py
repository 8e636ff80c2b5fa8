"""The tar wrapper around native overlaybd layer blobs (spec §3.2).

``overlaybd-commit -t`` makes a layer blob a single-file tar so OCI tools accept
it: a PAX header (``overlaybd.pax``) whose record carries the payload size, a
ustar header (``overlaybd.commit``, size field 0), the payload, zero padding to
512 bytes and two zero blocks.  Readers accept any single ustar header (Go's
``archive/tar`` wrapper of the ext4 base layer has no PAX header).
"""

from __future__ import annotations

import grp
import os
import pwd
from typing import BinaryIO

from ..block.source import ByteSource, SliceSource, read_exact
from ..errors import CorruptDataError

BLOCK = 512
PAX_NAME = b"overlaybd.pax"
FILE_NAME = b"overlaybd.commit"

# ustar header field offsets and widths (POSIX ustar; spec §3.2)
NAME = (0, 100)
MODE = (100, 8)
UID = (108, 8)
GID = (116, 8)
SIZE = (124, 12)
MTIME = (136, 12)
CHKSUM = (148, 8)
TYPEFLAG = (156, 1)
MAGIC = (257, 6)
VERSION = (263, 2)
UNAME = (265, 32)
GNAME = (297, 32)


def _field(block: bytes, f: tuple[int, int]) -> bytes:
    return block[f[0] : f[0] + f[1]]


def _checksum_ok(block: bytes) -> bool:
    try:
        stored = int(_field(block, CHKSUM).split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    body = block[: CHKSUM[0]] + b" " * 8 + block[CHKSUM[0] + 8 :]
    unsigned = sum(body)
    signed = sum(b - 256 if b > 127 else b for b in body)
    return stored in (unsigned, signed)


def is_tar_header(block: bytes) -> bool:
    """True when ``block`` is a ustar header with a valid checksum (``is_tar_file``)."""
    return (
        len(block) >= BLOCK
        and block[257:262] == b"ustar"
        and _field(block, VERSION) == b"00"
        and _checksum_ok(block)
    )


def _parse_size(raw: bytes, name: str, offset: int) -> int:
    if raw and raw[0] & 0x80:  # GNU base-256
        return int.from_bytes(bytes([raw[0] & 0x7F]) + raw[1:], "big")
    text = raw.split(b"\0", 1)[0].strip()
    try:
        return int(text or b"0", 8)
    except ValueError:
        raise CorruptDataError(f"tar size field {raw!r} is not octal", blob=name, offset=offset) from None


def _pax_size(records: bytes, name: str, offset: int) -> int | None:
    pos = 0
    size = None
    while pos < len(records) and records[pos] != 0:
        sp = records.find(b" ", pos)
        try:
            length = int(records[pos:sp])
        except ValueError:
            raise CorruptDataError("malformed PAX record", blob=name, offset=offset + pos) from None
        if sp < 0 or length <= 0 or pos + length > len(records):
            raise CorruptDataError("malformed PAX record", blob=name, offset=offset + pos)
        key, _, value = records[sp + 1 : pos + length - 1].partition(b"=")
        if key == b"size":
            try:
                size = int(value)
            except ValueError:
                raise CorruptDataError(f"PAX size {value!r} is not a number", blob=name,
                                       offset=offset + pos) from None
        pos += length
    return size


def unwrap(source: ByteSource) -> ByteSource:
    """The payload of a tar-wrapped blob, or ``source`` itself when it is not a tar."""
    name = source.name
    first = source.read(0, BLOCK)
    if not is_tar_header(first):
        return source
    header_pos = 0
    size = None
    if _field(first, TYPEFLAG) in (b"x", b"g"):
        pax_len = _parse_size(_field(first, SIZE), name, SIZE[0])
        records = read_exact(source, BLOCK, pax_len, "PAX records")
        size = _pax_size(records, name, BLOCK) if _field(first, TYPEFLAG) == b"x" else None
        header_pos = BLOCK + -(-pax_len // BLOCK) * BLOCK
        header = read_exact(source, header_pos, BLOCK, "tar header")
        if not is_tar_header(header):
            raise CorruptDataError("no valid tar header after the PAX header", blob=name, offset=header_pos)
    else:
        header = first
    if size is None:
        size = _parse_size(_field(header, SIZE), name, header_pos + SIZE[0])
    start = header_pos + BLOCK
    if start + size > source.size:
        raise CorruptDataError(
            f"tar payload of {size} bytes at {start} runs past the end of the blob ({source.size} bytes)",
            blob=name, offset=source.size)
    return SliceSource(source, start, size, name=name)


def _octal(value: int, width: int) -> bytes:
    """8-byte style numeric field: ``%0{width-2}o`` space-padded, then space and NUL."""
    return b"%*o \0" % (width - 2, value)


def _octal12(value: int) -> bytes:
    """12-byte size/mtime field: ``%11o`` then a space, no NUL."""
    return b"%11o " % value


def _finish(block: bytearray) -> bytes:
    block[CHKSUM[0] : CHKSUM[0] + 8] = b" " * 8
    block[CHKSUM[0] : CHKSUM[0] + 8] = b"%6o \0" % sum(block)
    return bytes(block)


def _put(block: bytearray, f: tuple[int, int], value: bytes) -> None:
    block[f[0] : f[0] + len(value)] = value


def _owner_names() -> tuple[bytes, bytes]:
    try:
        user = pwd.getpwuid(0).pw_name
    except KeyError:
        user = ""
    try:
        group = grp.getgrgid(0).gr_name
    except KeyError:
        group = ""
    return user.encode()[:31], group.encode()[:31]


def wrapper_headers(payload_size: int, mode: int = 0o100644) -> bytes:
    """The 1536 bytes in front of the payload (PAX header, PAX record, ustar header)."""
    body = b" size=%d\n" % payload_size
    n = len(body) + 1
    while len(b"%d" % n) + len(body) != n:
        n += 1
    record = b"%d" % n + body

    pax = bytearray(BLOCK)
    _put(pax, NAME, PAX_NAME)
    _put(pax, SIZE, _octal12(len(record)))
    _put(pax, TYPEFLAG, b"x")
    _put(pax, MAGIC, b"ustar\0")
    _put(pax, VERSION, b"00")

    data = record + bytes(-len(record) % BLOCK)

    hdr = bytearray(BLOCK)
    uname, gname = _owner_names()
    _put(hdr, NAME, FILE_NAME)
    _put(hdr, MODE, _octal(mode, 8))
    _put(hdr, UID, _octal(0, 8))
    _put(hdr, GID, _octal(0, 8))
    _put(hdr, SIZE, _octal12(0))
    _put(hdr, MTIME, _octal12(0))
    _put(hdr, TYPEFLAG, b"0")
    _put(hdr, MAGIC, b"ustar\0")
    _put(hdr, VERSION, b"00")
    _put(hdr, UNAME, uname)
    _put(hdr, GNAME, gname)
    return _finish(pax) + data + _finish(hdr)


def wrapper_tail(payload_size: int) -> bytes:
    """Zero padding to a 512 multiple plus the two zero end-of-archive blocks."""
    return bytes(-payload_size % BLOCK + 2 * BLOCK)


def wrap(payload: "BinaryIO | str | os.PathLike", out: BinaryIO, payload_size: int,
         mode: int = 0o100644) -> int:
    """Write ``payload`` (a file object or path) tar-wrapped to ``out``; returns bytes written."""
    out.write(wrapper_headers(payload_size, mode))
    if isinstance(payload, (str, os.PathLike)):
        with open(payload, "rb") as f:
            copied = _copy(f, out)
    else:
        copied = _copy(payload, out)
    if copied != payload_size:
        raise ValueError(f"payload has {copied} bytes, {payload_size} announced")
    tail = wrapper_tail(payload_size)
    out.write(tail)
    return 3 * BLOCK + payload_size + len(tail)


def _copy(src: BinaryIO, dst: BinaryIO) -> int:
    n = 0
    while chunk := src.read(1 << 20):
        dst.write(chunk)
        n += len(chunk)
    return n

