"""ZFile (spec §2): known answers from the vectors, byte-exact writer, random reads, bad input."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_overlaybd.block.source import BytesSource, FileSource, SliceSource
from tcmu_overlaybd.errors import CorruptDataError, UnsupportedError
from tcmu_overlaybd.format import zfile

HELLO = "aci-hello-world/sha256_022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
HELLO_PAYLOAD = (1536, 639491)


def _case(vectors, prefix):
    cases = json.loads((vectors / "EXPECTED.json").read_text())["cases"]
    return next(v for k, v in cases.items() if k.startswith(prefix))


def _hello_zfile(vectors):
    return SliceSource(FileSource(vectors / HELLO), *HELLO_PAYLOAD)


def _fields(h: zfile.ZFileHeader) -> dict:
    return {"size": h.size, "digest": h.digest, "flags": h.raw_flags, "idx_off": h.index_offset,
            "idx_size": h.index_size, "orig": h.original_file_size, "idx_crc": h.index_crc,
            "bs": h.block_size, "algo": h.algo, "level": h.level, "use_dict": h.use_dict,
            "dict_size": h.dict_size, "verify": h.verify}


def _sha256(src, step=1 << 22) -> str:
    h = hashlib.sha256()
    for pos in range(0, src.size, step):
        h.update(src.read(pos, step))
    return h.hexdigest()


def test_hello_world_header_and_trailer_known_answers(vectors):
    exp = _case(vectors, "aci-hello-world")
    src = _hello_zfile(vectors)
    assert zfile.is_zfile(src)
    header = zfile.ZFileHeader.from_bytes(src.read(0, 512))
    trailer = zfile.ZFileHeader.from_bytes(src.read(src.size - 512, 512))
    want_h = {k: v for k, v in exp["zfile_header"].items() if k != "magic"}
    want_t = {k: v for k, v in exp["zfile_trailer"].items() if k != "magic"}
    assert _fields(header) == want_h
    assert _fields(trailer) == want_t
    reader = zfile.ZFileReader(src)
    assert reader.size == exp["lsmt_size"] == 71528448
    assert reader.trailer is None  # overwritten header: the trailer is never read
    assert _sha256(reader) == exp["lsmt_sha256"]


def test_writer_reproduces_hello_world_zfile_byte_for_byte(vectors):
    # The lz4 wheel bundles liblz4 1.9.4, but lz4.block.compress picks different matches in
    # 26 blocks; the writer calls the system liblz4's LZ4_compress_default (liblz4-1 is in
    # scripts/install-deps), which reproduces every stored block, so the whole file matches.
    original = _hello_zfile(vectors).read(0, HELLO_PAYLOAD[1])
    lsmt_bytes = zfile.ZFileReader(BytesSource(original)).read(0, 71528448)
    out = io.BytesIO()
    size = zfile.compress_source(BytesSource(lsmt_bytes), out, "lz4", 4096)
    assert size == len(original)
    assert out.getvalue() == original


def test_writer_layout_flags_and_digests():
    data = os.urandom(5000) + bytes(20000) + b"tail"
    out = io.BytesIO()
    out.write(b"P" * 100)  # the ZFile may start anywhere in the output (e.g. after tar headers)
    with zfile.ZFileWriter(out, algorithm="zstd", block_size=8192) as w:
        for k in range(0, len(data), 777):
            w.write(data[k : k + 777])
    blob = out.getvalue()[100:]
    header, trailer = blob[:512], blob[-512:]
    h, t = zfile.ZFileHeader.from_bytes(header), zfile.ZFileHeader.from_bytes(trailer)
    assert (h.raw_flags, t.raw_flags) == (0x1B, 0x16)
    assert [i for i in range(512) if header[i] != trailer[i]] == [28, 29, 30, 31, 32]
    assert t.index_size == 4 and t.original_file_size == len(data) and t.block_size == 8192
    assert t.algo == zfile.ALGO_ZSTD and t.verify == 1
    assert t.index_offset + 4 * 4 + 512 == len(blob)
    reader = zfile.ZFileReader(BytesSource(blob))
    assert reader.read(0, len(data) + 10) == data


def test_writer_without_header_overwrite_keeps_0x13():
    out = io.BytesIO()
    w = zfile.ZFileWriter(out, overwrite_header=False)
    w.write(b"abc" * 3000)
    w.close()
    blob = out.getvalue()
    assert zfile.ZFileHeader.from_bytes(blob[:512]).raw_flags == 0x13
    assert zfile.ZFileReader(BytesSource(blob)).read(0, 9000) == b"abc" * 3000


def test_legacy_zfile_with_garbage_fields(vectors):
    exp = _case(vectors, "overlaybd/ext4_64.zfile")
    src = FileSource(vectors / "overlaybd/ext4_64.zfile")
    assert src.size == exp["file_size"]
    header = zfile.ZFileHeader.from_bytes(src.read(0, 512))
    assert hex(header.raw_flags) == exp["zfile_header_raw_flags_hex"]
    reader = zfile.ZFileReader(src)
    assert reader.trailer is not None
    want = {k: v for k, v in exp["zfile_trailer"].items() if k != "magic"}
    assert _fields(reader.trailer) == want
    assert reader.size == exp["lsmt_size"]
    assert _sha256(reader) == exp["lsmt_sha256"]


def test_older_zfile_without_block_crc(vectors, tmp_path):
    exp = _case(vectors, "overlaybd/ext4_256")
    with tarfile.open(vectors / "overlaybd/ext4_256.tar.gz") as tf:
        tf.extract("ext4_256", tmp_path, filter="data")
    src = FileSource(tmp_path / "ext4_256")
    assert src.size == exp["file_size"]
    reader = zfile.ZFileReader(src)
    want = {k: v for k, v in exp["zfile_trailer"].items() if k != "magic"}
    assert _fields(reader.trailer) == want
    assert reader.info.verify == 0 and reader.size == exp["lsmt_size"]
    assert reader.read(0, 8) == b"LSMT\x00\x01\x02\x00"
    last = reader.read(reader.size - 4096, 4096)
    assert last[:8] == b"LSMT\x00\x01\x02\x00"


@settings(max_examples=40, deadline=None)
@given(data=st.binary(min_size=0, max_size=40000), algorithm=st.sampled_from(["lz4", "zstd"]),
       block_size=st.sampled_from([4096, 16384]), reads=st.lists(st.tuples(st.integers(0, 45000),
                                                                          st.integers(0, 20000)),
                                                                max_size=8))
def test_random_reads_match_the_input(data, algorithm, block_size, reads):
    out = io.BytesIO()
    w = zfile.ZFileWriter(out, algorithm=algorithm, block_size=block_size)
    w.write(data)
    w.close()
    reader = zfile.ZFileReader(BytesSource(out.getvalue()), cache_blocks=2)
    for off, n in reads:
        assert reader.read(off, n) == data[off : off + n]


def test_concurrent_reads_are_consistent():
    data = b"".join(struct.pack("<I", i) for i in range(200_000))
    out = io.BytesIO()
    zfile.compress_source(BytesSource(data), out)
    reader = zfile.ZFileReader(BytesSource(out.getvalue()), cache_blocks=4)
    errors = []

    def worker(seed):
        for k in range(300):
            off = (seed * 7919 + k * 104729) % (len(data) - 9000)
            if reader.read(off, 9000) != data[off : off + 9000]:
                errors.append(off)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def _small_zfile(**kw) -> bytes:
    out = io.BytesIO()
    w = zfile.ZFileWriter(out, **kw)
    w.write(bytes(range(256)) * 64)
    w.close()
    return out.getvalue()


def test_block_crc_mismatch_names_blob_and_block_offset():
    blob = bytearray(_small_zfile())
    blob[520] ^= 0xFF
    reader = zfile.ZFileReader(BytesSource(bytes(blob), name="bad.zfile"))
    with pytest.raises(CorruptDataError) as e:
        reader.read(0, 10)
    assert str(e.value) == "bad.zfile at offset 512: ZFile block 0 CRC mismatch"
    # verify=False skips the CRC; the damaged block then either fails to decompress or differs
    try:
        assert zfile.ZFileReader(BytesSource(bytes(blob)), verify=False).read(0, 4096) != \
            bytes(range(256)) * 16
    except CorruptDataError as e2:
        assert "ZFile block 0" in str(e2)


def test_header_digest_mismatch():
    blob = bytearray(_small_zfile())
    blob[64] ^= 1  # index_crc in the overwritten header
    src = BytesSource(bytes(blob), name="d.zfile")
    assert not zfile.is_zfile(src)
    with pytest.raises(CorruptDataError, match=r"^d.zfile at offset 28: ZFile header digest mismatch$"):
        zfile.ZFileReader(src)


def test_jump_table_crc_mismatch():
    blob = bytearray(_small_zfile(overwrite_header=False))
    t = zfile.ZFileHeader.from_bytes(bytes(blob[-512:]))
    blob[t.index_offset] ^= 1
    with pytest.raises(CorruptDataError) as e:
        zfile.ZFileReader(BytesSource(bytes(blob), name="j.zfile"))
    assert str(e.value) == f"j.zfile at offset {t.index_offset}: ZFile jump table CRC mismatch"


def test_truncated_and_bad_magic():
    blob = _small_zfile(overwrite_header=False)
    with pytest.raises(CorruptDataError, match=r"^t.zfile at offset \d+: bad ZFile magic$"):
        zfile.ZFileReader(BytesSource(blob[:-100], name="t.zfile"))
    with pytest.raises(CorruptDataError, match="^m.zfile at offset 0: bad ZFile magic$"):
        zfile.ZFileReader(BytesSource(b"X" + blob[1:], name="m.zfile"))
    assert not zfile.is_zfile(BytesSource(b"LSMT" + bytes(600)))


def test_unsupported_algorithm():
    blob = bytearray(_small_zfile())
    h = zfile.ZFileHeader.from_bytes(bytes(blob[:512]))
    blob[:512] = zfile.ZFileHeader(**{**h.__dict__, "algo": 0, "digest": 0, "raw_flags": 0}).to_bytes()
    with pytest.raises(UnsupportedError, match="mini-LZO"):
        zfile.ZFileReader(BytesSource(bytes(blob), name="lzo.zfile"))


def test_block_that_decompresses_to_the_wrong_size():
    blob = bytearray(_small_zfile())  # 16384 bytes in four 4 KiB blocks
    h = zfile.ZFileHeader.from_bytes(bytes(blob[:512]))
    blob[:512] = zfile.ZFileHeader(**{**h.__dict__, "original_file_size": 16000}).to_bytes()
    reader = zfile.ZFileReader(BytesSource(bytes(blob), name="s.zfile"))
    assert reader.size == 16000
    assert reader.read(0, 100) == bytes(range(100))
    with pytest.raises(CorruptDataError) as e:
        reader.read(15000, 100)
    assert str(e.value) == (f"s.zfile at offset {reader._starts[3]}: ZFile block 3 decompresses "
                            f"to 4096 bytes, expected 3712")


def test_reads_join_lru_edge_blocks_with_decoded_middle_blocks():
    data = os.urandom(4096) * 2 + bytes(range(256)) * 16 * 6  # 8 blocks, two incompressible
    out = io.BytesIO()
    zfile.compress_source(BytesSource(data), out)
    reader = zfile.ZFileReader(BytesSource(out.getvalue()), cache_blocks=16)
    assert reader.read(100, 10) == data[100:110]  # block 0 decoded, kept
    assert reader.read(7 * 4096 + 5, 10) == data[7 * 4096 + 5 : 7 * 4096 + 15]  # block 7 kept
    for off, n in ((100, 7 * 4096), (0, 8 * 4096), (4095, 4096 * 6 + 2), (4096, 4096)):
        assert reader.read(off, n) == data[off : off + n]


def _cached_hello(vectors, tmp_path):
    """The hello-world layer blob (tar -> ZFile) read through a block cache; (reader, origin)."""
    from tcmu_overlaybd.block.source import CountingSource
    from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource

    key = "sha256:" + HELLO.rsplit("_", 1)[1]
    origin = CountingSource(BytesSource((vectors / HELLO).read_bytes(), name=key))
    cache = BlockCache(tmp_path / "cache", 64 << 20, 64 * 1024)
    blob = CachedSource(origin, cache, key)
    return zfile.ZFileReader(SliceSource(blob, *HELLO_PAYLOAD)), origin, blob


def test_read_cached_decodes_from_the_block_cache_through_the_tar_slice(vectors, tmp_path):
    reader, origin, blob = _cached_hello(vectors, tmp_path)
    fetched = origin.calls
    assert reader.read_cached(6356992 - 4096, 100_000) is None  # not fetched yet: no waiting
    assert origin.calls == fetched
    want = reader.read(6356992 - 4096, 100_000)
    assert len(want) == 100_000
    fresh = zfile.ZFileReader(SliceSource(blob, *HELLO_PAYLOAD))  # empty LRU, warm block cache
    fetched = origin.calls
    assert fresh.read_cached(6356992 - 4096, 100_000) == want
    assert fresh.read_cached(6356992, 4096) == want[4096:8192]
    assert origin.calls == fetched


def test_read_cached_gives_none_for_a_bad_cached_block_and_read_refetches_it(vectors, tmp_path):
    reader, origin, blob = _cached_hello(vectors, tmp_path)
    want = reader.read(6356992, 13256)
    n = 6356992 // 4096 + 1  # the second ZFile block of the range: flip a byte of it in the cache
    pos = HELLO_PAYLOAD[0] + (reader._starts[n] + reader._starts[n + 1]) // 2
    bs = blob.cache.block_size
    with open(blob.cache.block_path(blob.key, pos // bs), "r+b") as f:
        f.seek(pos % bs)
        f.write(bytes([f.read(1)[0] ^ 0xFF]))  # same length: only the block CRC can tell
    fresh = zfile.ZFileReader(SliceSource(blob, *HELLO_PAYLOAD))
    assert fresh.read_cached(6356992, 13256) is None
    fetched = origin.bytes_read
    assert fresh.read(6356992, 13256) == want
    assert origin.bytes_read > fetched  # the bad cache block was dropped and fetched again
    assert fresh.read_cached(6356992, 13256) == want


def test_read_cached_without_a_caching_source_serves_only_decoded_blocks():
    data = bytes(range(256)) * 64
    out = io.BytesIO()
    zfile.compress_source(BytesSource(data), out)
    reader = zfile.ZFileReader(BytesSource(out.getvalue()))
    assert reader.read_cached(0, 100) is None
    assert reader.read(0, 4096) == data[:4096]
    assert reader.read_cached(10, 100) == data[10:110]
    assert reader.read_cached(4000, 200) is None  # block 1 was never decoded
