"""Tar-meta (spec §4.6): upstream layer.tar.meta known answers, writer, extensions, corrupt input."""

from __future__ import annotations

import gzip
import io
import struct
import tarfile

import pytest

from tcmu_overlaybd.block.source import BytesSource
from tcmu_overlaybd.errors import CorruptDataError
from tcmu_overlaybd.format.tarmeta import (
    BLOCK,
    DATA_OFFSET_AT,
    export_tar_meta,
    read_tar_meta,
    scan_tar,
    write_tar_meta,
)

LAYERS = {
    0: "571e1a65fc028b27eef187aacb31f98c45aaec82a8f24b0e9bce1f658d7d94c1",
    1: "ed5169527c7317edecd662ed75cada0b65adc02a4431825bccc713dcb0dd6c07",
}


@pytest.fixture(scope="module", params=[0, 1])
def layer(request, vectors):
    root = vectors / "upstream-small"
    blob = (root / "original" / "blobs" / "sha256" / LAYERS[request.param]).read_bytes()
    meta = (root / "turbooci" / f"layer{request.param}" / "layer.tar.meta").read_bytes()
    return request.param, gzip.decompress(blob), meta


def test_upstream_meta_entries_match_the_real_tar(layer):
    n, tar, meta = layer
    entries = list(read_tar_meta(BytesSource(meta, "layer.tar.meta")))
    members = tarfile.open(fileobj=io.BytesIO(tar)).getmembers()
    assert len(entries) == len(members) == {0: 168, 1: 7}[n]
    for e, m in zip(entries, members):
        assert e.path == m.name.rstrip("/")
        assert (e.typeflag, e.mode, e.uid, e.gid, e.mtime) == (m.type.decode(), m.mode, m.uid, m.gid, m.mtime)
        if m.isreg():
            assert e.size == m.size
            assert e.data_offset == m.offset_data
            # the offset really points at the file's bytes in the uncompressed tar
            assert tar[e.data_offset : e.data_offset + m.size] == tarfile.open(
                fileobj=io.BytesIO(tar)).extractfile(m.name).read()
        else:
            assert e.data_offset is None
            assert e.linkname == m.linkname


def test_upstream_special_entries(vectors):
    meta = (vectors / "upstream-small" / "turbooci" / "layer0" / "layer.tar.meta").read_bytes()
    by_path = {e.path: e for e in read_tar_meta(BytesSource(meta))}
    assert by_path["etc/motd.link"].typeflag == "2" and by_path["etc/motd.link"].linkname == "motd"
    assert by_path["data/big.hard"].typeflag == "1" and by_path["data/big.hard"].link_path == "data/big.txt"
    big = by_path["data/big.txt"]
    assert (big.size, big.data_offset) == (1572864, 3813888)
    meta1 = (vectors / "upstream-small" / "turbooci" / "layer1" / "layer.tar.meta").read_bytes()
    names = [e.path for e in read_tar_meta(BytesSource(meta1))]
    assert "data/a/.wh.f002.txt" in names and "data/b/.wh..wh..opq" in names


def test_writer_reproduces_upstream_bytes(layer):
    _, tar, meta = layer
    assert export_tar_meta(BytesSource(tar, "layer.tar")) == meta
    assert export_tar_meta(io.BytesIO(tar)) == meta  # streamed, front to back
    assert write_tar_meta(read_tar_meta(BytesSource(meta))) == meta  # read -> write round trip


def _tar(fmt, members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name, data=b"", **kw):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1700000000
    for k, v in kw.items():
        setattr(info, k, v)
    return info, data


LONG = "deep/" + "d" * 120 + "/" + "f" * 120 + ".txt"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_long_names_and_extension_blocks_are_kept(fmt):
    link = tarfile.TarInfo("short.lnk")
    link.type = tarfile.SYMTYPE
    link.linkname = "/" + "t" * 150
    tar = _tar(fmt, [_file(LONG, b"x" * 1000), (link, None), _file("small", b"hello")])
    entries = list(scan_tar(BytesSource(tar, "ext.tar")))
    assert [e.name for e in entries] == [LONG, "short.lnk", "small"]
    assert entries[1].linkname == "/" + "t" * 150
    real = {m.name: m for m in tarfile.open(fileobj=io.BytesIO(tar)).getmembers()}
    assert entries[0].data_offset == real[LONG].offset_data
    assert tar[entries[2].data_offset : entries[2].data_offset + 5] == b"hello"
    meta = export_tar_meta(BytesSource(tar))
    # headers only: extension headers with their data blocks, no file contents, no EOF blocks
    assert b"x" * 1000 not in meta and b"hello" not in meta
    assert len(meta) % BLOCK == 0 and meta[-BLOCK:] != bytes(BLOCK)
    again = list(read_tar_meta(BytesSource(meta)))
    assert [(e.name, e.linkname, e.data_offset) for e in again] == [
        (e.name, e.linkname, e.data_offset) for e in entries
    ]


def test_pax_records_size_and_xattrs():
    info, data = _file("big", b"z" * 3000)
    info.pax_headers = {"SCHILY.xattr.user.k": "v1", "size": "3000", "path": "renamed/by/pax"}
    tar = _tar(tarfile.PAX_FORMAT, [(info, data)])
    (e,) = read_tar_meta(BytesSource(export_tar_meta(BytesSource(tar))))
    assert e.path == "renamed/by/pax"
    assert e.xattrs == {"user.k": b"v1"}
    assert e.size == 3000 and tar[e.data_offset : e.data_offset + 3000] == data


def test_data_offset_field_is_little_endian_i64_with_stale_checksum():
    tar = _tar(tarfile.USTAR_FORMAT, [_file("a", b"1" * 600), _file("b", b"2")])
    meta = export_tar_meta(BytesSource(tar))
    assert len(meta) == 2 * BLOCK
    assert struct.unpack_from("<q", meta, DATA_OFFSET_AT)[0] == 512
    assert struct.unpack_from("<q", meta, BLOCK + DATA_OFFSET_AT)[0] == 512 + 1024 + 512
    assert meta[:DATA_OFFSET_AT] == tar[:DATA_OFFSET_AT]  # checksum not recomputed
    with pytest.raises(tarfile.TarError):  # a normal tar reader rejects the stale checksum
        tarfile.open(fileobj=io.BytesIO(meta + bytes(1024))).getmembers()


def test_bad_checksum_names_blob_and_offset():
    tar = bytearray(_tar(tarfile.USTAR_FORMAT, [_file("a", b"1" * 600), _file("b", b"2")]))
    tar[1536 + 5] ^= 0x01  # name of the second header
    with pytest.raises(CorruptDataError) as ei:
        list(scan_tar(BytesSource(bytes(tar), "layer.tar")))
    assert str(ei.value) == "layer.tar at offset 1536: tar header checksum mismatch"


def test_truncated_inputs_are_one_line_errors():
    tar = _tar(tarfile.GNU_FORMAT, [_file(LONG, b"x")])
    with pytest.raises(CorruptDataError, match=r"^cut\.tar at offset 512: truncated 'L' extension data"):
        list(scan_tar(BytesSource(tar[:700], "cut.tar")))
    meta = export_tar_meta(BytesSource(tar))
    with pytest.raises(CorruptDataError, match=r"^m at offset 1024: truncated tar header \(100 of 512 bytes\)"):
        list(read_tar_meta(BytesSource(meta[:1124], "m")))


def test_malformed_pax_record_is_named():
    info, data = _file("p", b"")
    info.pax_headers = {"comment": "hello"}
    tar = bytearray(_tar(tarfile.PAX_FORMAT, [(info, data)]))
    tar[512:514] = b"99"  # record length beyond the data
    with pytest.raises(CorruptDataError, match=r"^pax\.tar at offset 512: malformed PAX record"):
        list(scan_tar(BytesSource(bytes(tar), "pax.tar")))


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_names = st.text(alphabet="abcdefghij_.-/é", min_size=1, max_size=140).filter(
    lambda s: s.strip("/") and "//" not in s and not s.startswith("/") and not s.endswith("/") and ".." not in s
)
_members = st.lists(
    st.tuples(_names, st.sampled_from(["file", "dir", "symlink", "hardlink"]), st.integers(0, 3000)),
    min_size=1, max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(members=_members, fmt=st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
def test_any_tar_round_trips_with_exact_offsets(members, fmt):
    items = []
    for i, (name, kind, size) in enumerate(members):
        info = tarfile.TarInfo(f"{i}/{name}")
        info.mtime = 1700000000 + i
        data = None
        if kind == "file":
            data = bytes([i % 251]) * size
            info.size = size
        elif kind == "dir":
            info.type = tarfile.DIRTYPE
        else:
            info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
            info.linkname = name
        items.append((info, data))
    tar = _tar(fmt, items)
    real = tarfile.open(fileobj=io.BytesIO(tar)).getmembers()
    scanned = list(scan_tar(BytesSource(tar)))
    assert [e.name.rstrip("/") if e.typeflag == "5" else e.name for e in scanned] == [m.name for m in real]
    for e, m in zip(scanned, real):
        assert e.linkname == m.linkname and e.size == m.size
        assert e.data_offset == (m.offset_data if m.isreg() else None)
    meta = export_tar_meta(BytesSource(tar))
    again = list(read_tar_meta(BytesSource(meta)))
    assert [(e.name, e.typeflag, e.size, e.data_offset) for e in again] == [
        (e.name, e.typeflag, e.size, e.data_offset) for e in scanned
    ]
    assert write_tar_meta(again) == meta


def test_a_lone_zero_block_is_skipped_two_end_the_archive():
    a = _tar(tarfile.USTAR_FORMAT, [_file("a", b"1" * 10)])[:1024]  # header + data, no EOF blocks
    b = _tar(tarfile.USTAR_FORMAT, [_file("b", b"2" * 10)])[:1024]
    tar = a + bytes(BLOCK) + b + bytes(2 * BLOCK) + _tar(tarfile.USTAR_FORMAT, [_file("after-eof", b"x")])
    entries = list(scan_tar(BytesSource(tar)))
    assert [(e.name, e.data_offset) for e in entries] == [("a", 512), ("b", 2048)]
    meta = export_tar_meta(BytesSource(tar))
    assert len(meta) == 2 * BLOCK  # the lone zero block is not exported


def test_signed_checksums_and_base256_sizes():
    from tcmu_overlaybd.format.tarmeta import _octal

    info, data = _file("héllo-\xff", b"abc")
    block = bytearray(_tar(tarfile.USTAR_FORMAT, [(info, data)])[:BLOCK])
    # rewrite the checksum the way old signed-char tars did
    block[148:156] = b" " * 8
    signed = sum(b - 256 if b & 0x80 else b for b in block)
    block[148:156] = b"%06o\0 " % signed
    tar = bytes(block) + data + bytes(BLOCK - len(data)) + bytes(1024)
    (e,) = scan_tar(BytesSource(tar))
    assert e.name == "héllo-\xff" and e.size == 3 and e.data_offset == 512
    assert _octal(b"\x80" + (5 << 33).to_bytes(11, "big")) == 5 << 33  # > 8 GiB size field
    assert _octal(b"\xff" * 12) == -1
    assert _octal(b"  0000644\0") == 0o644
