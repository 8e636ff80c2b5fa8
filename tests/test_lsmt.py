"""LSMT layers (spec §1): known answers, byte-exact commit/builder, writable layers, bad input."""

from __future__ import annotations

import gzip
import io
import json
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_overlaybd.block.source import BytesSource, FileSource
from tcmu_overlaybd.errors import CorruptDataError, UsageError
from tcmu_overlaybd.format import lsmt
from tcmu_overlaybd.format.layer import open_layer_blob
from tcmu_overlaybd.format.zfile import ZFileReader

HELLO = "aci-hello-world/sha256_022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
HELLO_ORIGINAL = "aci-hello-world/sha256_719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6"
S = lsmt.SECTOR


def _case(vectors, prefix):
    cases = json.loads((vectors / "EXPECTED.json").read_text())["cases"]
    return next(v for k, v in cases.items() if k.startswith(prefix))


def _header_fields(h: lsmt.LsmtHeader) -> dict:
    return {"size": h.size, "flags": h.flags, "idx_off": h.index_offset, "idx_size": h.index_size,
            "vsize": h.virtual_size, "uuid": h.uuid, "puuid": h.parent_uuid, "ver": h.version,
            "sub": h.sub_version, "tag": h.user_tag}


def _want_header(exp: dict) -> dict:
    return {k: exp[k] for k in ("size", "flags", "idx_off", "idx_size", "vsize", "uuid", "puuid",
                                "ver", "sub", "tag")}


def _count_on_disk(layer: lsmt.LsmtFile) -> tuple[int, int, int]:
    return layer.trailer.index_size, len(layer.index), sum(layer.index.zeroed)


def _check_known_answers(layer: lsmt.LsmtFile, exp: dict) -> None:
    assert _header_fields(layer.header) == _want_header(exp["lsmt_header"])
    assert _header_fields(layer.trailer) == _want_header(exp["lsmt_trailer"])
    assert _count_on_disk(layer) == (exp["index_entries_on_disk"], exp["index_entries_valid"],
                                     exp["zeroed_entries"])
    segs = [[o, n, m, int(z), t] for o, n, m, z, t in layer.segments()]
    first = exp["first_valid_entries_offset_len_moffset_zeroed_tag"]
    assert segs[: len(first)] == first
    assert segs[-len(exp["last_valid_entries"]) :] == exp["last_valid_entries"]


@pytest.fixture(scope="module")
def hello(vectors):
    return open_layer_blob(FileSource(vectors / HELLO))


def test_hello_world_layer_known_answers(vectors, hello):
    exp = _case(vectors, "aci-hello-world")
    _check_known_answers(hello, exp)
    assert hello.vsize == hello.size == 64 << 30
    assert hello.uuid == "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31"


def test_hello_binary_is_at_the_documented_disk_offset(vectors, hello):
    with tarfile.open(vectors / HELLO_ORIGINAL) as tf:
        data = tf.extractfile("hello").read()
    assert len(data) == 13256
    assert hello.read(6356992, len(data)) == data


def test_holes_read_as_zeros_and_reads_stop_at_vsize(hello):
    assert hello.read(100 << 30, 10) == b""
    assert hello.read(hello.vsize - 4, 100) == bytes(4)
    seg_end = 8448 * S
    assert hello.read(seg_end, 4096) == bytes(4096)  # [8448, 12288) is a hole


def test_header_and_trailer_round_trip_to_identical_bytes(hello):
    raw = hello.source
    for pos in (0, raw.size - 4096):
        block = raw.read(pos, 4096)
        assert lsmt.LsmtHeader.from_bytes(block).to_bytes() == block


def test_recommit_reproduces_the_hello_world_lsmt(hello):
    original = hello.source.read(0, hello.source.size)
    out = io.BytesIO()
    assert lsmt.commit(hello, out, uuid=hello.uuid) == len(original)
    assert out.getvalue() == original


def test_builder_reproduces_the_hello_world_lsmt(hello):
    original = hello.source.read(0, hello.source.size)
    b = lsmt.SealedLayerBuilder(hello.vsize, uuid=hello.uuid.lower())
    for o, n, m, _z, _t in hello.segments():
        b.add_data(o * S, original[m * S : (m + n) * S])
    out = io.BytesIO()
    assert b.finish(out) == len(original)
    assert out.getvalue() == original


@pytest.mark.parametrize("path,warp", [
    ("upstream-small/overlaybd/layer0.commit", False), ("upstream-small/overlaybd/layer1.commit", False),
    ("upstream-small/turbooci/layer0/ext4.fs.meta", True), ("upstream-small/turbooci/layer1/ext4.fs.meta", True),
])
def test_builder_reproduces_upstream_commits(vectors, path, warp):
    """Feeding upstream's own segments back reproduces overlaybd-commit's bytes (warp: unpadded)."""
    layer = open_layer_blob(FileSource(vectors / path), warp=warp)
    original = layer.source.read(0, layer.source.size)
    b = lsmt.SealedLayerBuilder(layer.vsize, uuid=layer.uuid, parent_uuid=layer.parent_uuid, warp=warp)
    for o, n, m, z, t in layer.segments():
        if t == 1:
            b.add_remote(o * S, n * S, m * S)
        elif z:
            b.add_zeroed(o * S, n * S)
        else:
            b.add_data(o * S, original[m * S : (m + n) * S])
    out = io.BytesIO()
    b.finish(out)
    assert out.getvalue() == original
    if warp:
        assert layer.trailer.index_size == len(layer.index)  # not padded


def test_legacy_layer_with_zeroed_entries(vectors):
    exp = _case(vectors, "overlaybd/ext4_64.zfile")
    layer = open_layer_blob(FileSource(vectors / "overlaybd/ext4_64.zfile"))
    _check_known_answers(layer, exp)
    # zeroed ranges read as zeros even though their moffset points at data
    o, n, m, z, _ = next(s for s in layer.segments() if s[3])
    assert layer.read(o * S, n * S) == bytes(n * S)
    assert layer.read(1024 + 56, 2) == b"\x53\xef"  # the ext4 superblock magic


def test_legacy_1158_byte_header_with_user_tag(vectors, tmp_path):
    exp = _case(vectors, "overlaybd/ext4_256")
    with tarfile.open(vectors / "overlaybd/ext4_256.tar.gz") as tf:
        tf.extract("ext4_256", tmp_path, filter="data")
    layer = open_layer_blob(FileSource(tmp_path / "ext4_256"))
    _check_known_answers(layer, exp)
    assert layer.user_tag == "base layer with UUID, committed by tuji.yyf"
    assert layer.read(1024 + 56, 2) == b"\x53\xef"


# --- writable layers ----------------------------------------------------------------------

VSIZE = 64 * S * 64  # 2 MiB


class Model:
    """Naive per-sector model of a virtual disk."""

    def __init__(self, size: int):
        self.data = bytearray(size)

    def write(self, off, data):
        self.data[off : off + len(data)] = data

    def discard(self, off, n):
        self.data[off : off + n] = bytes(n)


ops = st.lists(
    st.tuples(st.sampled_from(["w", "w", "d"]), st.integers(0, VSIZE // S - 1), st.integers(1, 300),
              st.integers(0, 255)),
    min_size=1, max_size=25)


def _apply(layer, model, operations):
    for kind, sector, count, fill in operations:
        count = min(count, VSIZE // S - sector)
        if kind == "w":
            data = bytes([fill]) * (count * S - 1) + bytes([sector % 251])
            layer.pwrite(data, sector * S)
            model.write(sector * S, data)
        else:
            layer.discard(sector * S, count * S)
            model.discard(sector * S, count * S)


def _check_sealed_layout(blob: bytes, vsize: int, pad: bool = True) -> lsmt.LsmtFile:
    header = lsmt.LsmtHeader.from_bytes(blob[:4096])
    trailer = lsmt.LsmtHeader.from_bytes(blob[-4096:])
    assert (header.flags, trailer.flags) == (0x07, 0x06)
    assert header.index_offset == header.index_size == 0
    assert trailer.index_offset % 512 == 0
    if pad:
        assert trailer.index_size % 256 == 0
    assert len(blob) == trailer.index_offset + 16 * trailer.index_size + 4096
    layer = lsmt.LsmtFile.open(BytesSource(blob))
    assert layer.vsize == vsize
    assert all(n <= lsmt.MAX_LENGTH for _o, n, _m, _z, _t in layer.segments())
    return layer


@settings(max_examples=30, deadline=None)
@given(operations=ops, sparse=st.booleans())
def test_rw_layer_and_commit_match_a_sector_model(tmp_path_factory, operations, sparse):
    d = tmp_path_factory.mktemp("rw")
    model = Model(VSIZE)
    with lsmt.create_rw(d / "data", d / "index", VSIZE, sparse=sparse,
                        parent_uuid="2a183e6a-e7a5-b6ce-577d-f2f14c995b32") as rw:
        _apply(rw, model, operations)
        assert rw.read(0, VSIZE) == bytes(model.data)
    reopened = lsmt.open_rw(d / "data", d / "index")
    assert reopened.read(0, VSIZE) == bytes(model.data)
    out = io.BytesIO()
    lsmt.commit((str(d / "data"), str(d / "index")), out, user_tag="msg")
    sealed = _check_sealed_layout(out.getvalue(), VSIZE)
    assert sealed.read(0, VSIZE) == bytes(model.data)
    assert sealed.parent_uuid == "2A183E6A-E7A5-B6CE-577D-F2F14C995B32"
    assert sealed.user_tag == "msg" and sealed.uuid == lsmt.NULL_UUID


def test_rw_index_log_is_appended_in_write_order(tmp_path):
    with lsmt.create_rw(tmp_path / "d", tmp_path / "i", VSIZE) as rw:
        rw.pwrite(b"a" * 1024, 4096)
        rw.pwrite(b"b" * 512, 4608)
        rw.discard(0, 20000 * S if 20000 * S <= VSIZE else VSIZE)
    log = (tmp_path / "i").read_bytes()
    assert lsmt.LsmtHeader.from_bytes(log[:4096]).flags == 0x01
    entries = [lsmt.unpack_entry(log, p) for p in range(4096, len(log), 16)]
    assert entries == [(8, 2, 8, False, 0), (9, 1, 10, False, 0), (0, VSIZE // S, 11, True, 0)]
    assert lsmt.LsmtHeader.from_bytes((tmp_path / "d").read_bytes()[:4096]).flags == 0x03


def test_commit_of_sparse_layer_equals_builder_output(tmp_path):
    rw = lsmt.create_rw(tmp_path / "d", tmp_path / "i", 64 << 20, sparse=True)
    payload = bytes(range(256)) * 40000  # 10,240,000 bytes: one extent longer than 16383 sectors
    rw.pwrite(payload, 1 << 20)
    rw.pwrite(b"\x01" * 8192, 32 << 20)
    out = io.BytesIO()
    lsmt.commit(rw, out, uuid="01bb4fce-3eb1-b56b-05ad-f99504dafd31")
    rw.close()
    b = lsmt.SealedLayerBuilder(64 << 20, uuid="01bb4fce-3eb1-b56b-05ad-f99504dafd31")
    b.add_data(1 << 20, payload[: 3 << 20])  # contiguous calls form one extent
    b.add_data(4 << 20, payload[3 << 20 :])
    b.add_data(32 << 20, b"\x01" * 8192)
    out2 = io.BytesIO()
    b.finish(out2)
    assert out2.getvalue() == out.getvalue()
    layer = _check_sealed_layout(out.getvalue(), 64 << 20)
    lengths = [n for _o, n, _m, _z, _t in layer.segments()]
    # extent pieces of 16383 sectors, 64-sector chunks, merged while the sum stays < 16383:
    # 255 chunks (16320), then the 63-sector tail merges with the next piece's 3617 sectors
    assert lengths == [16320, 3680, 16]


def test_zeroed_entries_merge_and_mask(tmp_path):
    b = lsmt.SealedLayerBuilder(1 << 30)
    b.add_data(0, b"x" * 4096)
    b.add_zeroed(4096, 20000 * S)
    b.add_zeroed(4096 + 20000 * S, 8 * S)
    out = io.BytesIO()
    b.finish(out)
    layer = _check_sealed_layout(out.getvalue(), 1 << 30)
    # zeroed entries are split at 16383 and then merged while the sum stays < 16383
    assert list(layer.segments()) == [(0, 8, 8, False, 0), (8, 16383, 16, True, 0),
                                      (16391, 3625, 16, True, 0)]
    assert layer.read(0, 8192) == b"x" * 4096 + bytes(4096)


def test_warp_layer_reads_remote_data_from_its_target():
    target = BytesSource(b"T" * 1024 + bytes(range(256)) * 100, name="layer.tar")
    b = lsmt.SealedLayerBuilder(1 << 30, warp=True)
    b.add_data(0, b"m" * 4096)
    b.add_remote(1 << 20, 25600, 1024)
    out = io.BytesIO()
    b.finish(out)
    blob = out.getvalue()
    trailer = lsmt.LsmtHeader.from_bytes(blob[-4096:])
    assert trailer.index_size == 2  # warp indexes are not padded
    layer = lsmt.LsmtFile.open(BytesSource(blob), warp=True, targets={1: target})
    assert list(layer.segments()) == [(0, 8, 8, False, 0), (2048, 50, 2, False, 1)]
    assert layer.read((1 << 20) - 2, 25604) == b"\0\0" + bytes(range(256)) * 100 + b"\0\0"
    with pytest.raises(CorruptDataError, match="outside the data area"):
        lsmt.LsmtFile.open(BytesSource(blob))  # ordinary layers get the range check
    with pytest.raises(CorruptDataError, match="target 1, which was not supplied"):
        lsmt.LsmtFile.open(BytesSource(blob, name="w"), warp=True).read(1 << 20, 512)


def test_ordinary_layer_tags_are_forced_to_zero():
    layer = lsmt.LsmtFile.open(BytesSource(bytes(_sealed([(0, 4, 8, False, 3), (4, 4, 12, False, 7)]))))
    assert [t for *_x, t in layer.segments()] == [0, 0]
    warp = lsmt.LsmtFile.open(BytesSource(bytes(_sealed([(0, 4, 8, False, 3), (4, 4, 12, False, 4)]))),
                              warp=True)
    assert [t for *_x, t in warp.segments()] == [0, 1]  # normalised by the minimum tag


def test_builder_rejects_out_of_order_ranges():
    b = lsmt.SealedLayerBuilder(1 << 20)
    b.add_data(8192, bytes(512))
    with pytest.raises(ValueError, match="not after the previous one"):
        b.add_data(4096, bytes(512))
    with pytest.raises(ValueError, match="512-aligned"):
        b.add_data(9000, bytes(512))


def test_invalid_uuid_is_a_usage_error():
    with pytest.raises(UsageError, match="invalid UUID 'nope'"):
        lsmt.SealedLayerBuilder(1 << 20, uuid="nope")


# --- bad input ----------------------------------------------------------------------------


def _sealed(entries: list[tuple], data_sectors: int = 8, index_size: int | None = None) -> bytearray:
    raw = bytearray(lsmt.LsmtHeader(flags=7, virtual_size=1 << 30).to_bytes())
    raw += bytes(data_sectors * S)
    ioff = len(raw)
    for e in entries:
        raw += lsmt.pack_entry(*e)
    n = len(entries) if index_size is None else index_size
    raw += lsmt.LsmtHeader(flags=6, virtual_size=1 << 30, index_offset=ioff, index_size=n).to_bytes()
    return raw


def _open_bad(raw, name="bad.lsmt") -> str:
    with pytest.raises(CorruptDataError) as e:
        lsmt.LsmtFile.open(BytesSource(bytes(raw), name=name))
    return str(e.value)


def test_good_synthetic_layer_opens():
    layer = lsmt.LsmtFile.open(BytesSource(bytes(_sealed([(0, 4, 8, False, 0), (4, 4, 12, False, 0)]))))
    assert len(layer.index) == 2


def test_invalid_entries_are_dropped_wherever_they_are():
    entries = [(0, 4, 8, False, 0), (lsmt.INVALID_OFFSET, 0, 0, False, 0), (4, 4, 12, False, 0)]
    layer = lsmt.LsmtFile.open(BytesSource(bytes(_sealed(entries))))
    assert list(layer.segments()) == [(0, 4, 8, False, 0), (4, 4, 12, False, 0)]
    bad = [(0, 4, 8, False, 0), (lsmt.INVALID_OFFSET, 0, 0, False, 0), (2, 4, 12, False, 0)]
    assert _open_bad(_sealed(bad)).startswith(f"bad.lsmt at offset {4096 + 8 * S + 32}: index entries")


def test_entry_past_the_data_area():
    msg = _open_bad(_sealed([(0, 4, 8, False, 0), (4, 8, 12, False, 0)]))
    ioff = 4096 + 8 * S
    assert msg == (f"bad.lsmt at offset {ioff + 16}: index entry maps sectors [12, 20) outside "
                   f"the data area [8, 16)")


def test_overlapping_entries():
    msg = _open_bad(_sealed([(0, 4, 8, False, 0), (2, 4, 12, False, 0)]))
    assert msg.startswith(f"bad.lsmt at offset {4096 + 8 * S + 16}: index entries out of order")


def test_index_size_over_the_limit():
    raw = _sealed([], index_size=1_000_001)
    msg = _open_bad(raw)
    assert msg.endswith("index has 1000001 entries, more than the limit 1000000")
    assert f"offset {len(raw) - 4096 + 40}" in msg


def test_index_that_does_not_fit_and_bad_magic_and_truncation():
    assert "does not fit before the trailer" in _open_bad(_sealed([(0, 1, 8, False, 0)], index_size=300))
    raw = _sealed([(0, 1, 8, False, 0)])
    raw[-4096] ^= 0xFF
    assert _open_bad(raw) == f"bad.lsmt at offset {len(raw) - 4096}: bad LSMT magic"
    assert _open_bad(raw[:5000]) == "bad.lsmt at offset 5000: truncated LSMT layer (5000 bytes)"
    assert _open_bad(b"LSMT") == "bad.lsmt at offset 0: truncated: LSMT header needs 4096 bytes, only 4 available"


def test_trailer_must_be_a_sealed_data_trailer():
    raw = _sealed([(0, 1, 8, False, 0)])
    raw[-4096 + 28] = 0x07  # a header where the trailer should be
    assert "are not those of a sealed data file" in _open_bad(raw)


def test_not_a_layer_blob():
    with pytest.raises(CorruptDataError, match=r"^x.bin at offset 0: not an overlaybd layer"):
        open_layer_blob(BytesSource(b"\x1f\x8b" + bytes(9000), name="x.bin"))
    with pytest.raises(CorruptDataError, match=r"^g.tar at offset 1536: not an overlaybd layer"):
        from tcmu_overlaybd.format import tarwrap
        out = io.BytesIO()
        tarwrap.wrap(io.BytesIO(gzip.compress(b"x")), out, len(gzip.compress(b"x")))
        open_layer_blob(BytesSource(out.getvalue(), name="g.tar"))


def test_zfile_inside_layer_blob_is_decoded(vectors):
    layer = open_layer_blob(FileSource(vectors / "upstream-small/overlaybd/layer1.commit"))
    assert isinstance(layer.source, ZFileReader)
    assert layer.parent_uuid == "2A183E6A-E7A5-B6CE-577D-F2F14C995B32"


@settings(max_examples=60, deadline=None)
@given(log=st.lists(st.tuples(st.integers(0, 300), st.integers(1, 60), st.integers(8, 1000), st.booleans()),
                    max_size=40))
def test_log_replay_equals_inserting_one_by_one(log):
    """The O(n log n) replay used by open_rw gives the same pieces as ordered-set inserts."""
    one_by_one = lsmt.SegmentMap.empty()
    for o, n, m, z in log:
        one_by_one.insert(o, n, m, z)
    replayed = lsmt.replay_log([(o, o + n, m, z) for o, n, m, z in log])
    assert list(replayed) == list(one_by_one)
