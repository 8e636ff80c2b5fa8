"""Gzip index (spec §4.4): upstream gzip.meta known answers, byte-exact writer, random reads."""

from __future__ import annotations

import gzip
import io
import os
import random
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_overlaybd.block.source import BytesSource, CountingSource, FileSource
from tcmu_overlaybd.errors import CorruptDataError, UsageError
from tcmu_overlaybd.format import inflate
from tcmu_overlaybd.format.gzindex import (
    HEADER,
    WINSIZE,
    GzipIndex,
    GzipIndexedSource,
    build_gzip_index,
)

LAYER0 = "571e1a65fc028b27eef187aacb31f98c45aaec82a8f24b0e9bce1f658d7d94c1"
LAYER1 = "ed5169527c7317edecd662ed75cada0b65adc02a4431825bccc713dcb0dd6c07"
#: (de_pos, en_pos, bits) of upstream's layer-0 index: a 1 MiB span over a 5.3 MB tar
LAYER0_CHECKPOINTS = [
    (0, 10, 0),
    (988582, 412781, 4),
    (2059384, 856816, 0),
    (3126476, 1300360, 4),
    (4133513, 1719340, 7),
    (5197569, 2168957, 5),
]


@pytest.fixture(scope="module", autouse=True, params=inflate.available_decoders(), ids=lambda d: d.name)
def decoder(request):
    """Every test of this module runs with each raw deflate decoder this machine has (libz
    always, ISA-L where libisal2 is installed): reads must not depend on which one is used."""
    saved, inflate._DECODER = inflate._DECODER, request.param
    yield request.param
    inflate._DECODER = saved


def test_isa_l_is_used_where_it_is_installed_and_decodes_like_zlib():
    """scripts/install-deps installs libisal2: reads then inflate with ISA-L, which passes the
    same known-answer test as zlib (a dictionary, a start in mid-byte, the end of the stream)."""
    assert inflate.known_answer(inflate.ZlibDecoder)
    assert inflate.IsalDecoder in inflate.available_decoders(), \
        "libisal.so.2 missing: FastOCI reads fall back to slower zlib"
    assert inflate._choose() is inflate.IsalDecoder


@pytest.fixture(scope="module")
def small(vectors):
    root = vectors / "upstream-small"
    layers = {}
    for n, digest in enumerate((LAYER0, LAYER1)):
        path = root / "original" / "blobs" / "sha256" / digest
        blob = path.read_bytes()
        layers[n] = {
            "path": path,
            "blob": blob,
            "tar": gzip.decompress(blob),
            "meta_path": root / "turbooci" / f"layer{n}" / "gzip.meta",
            "meta": (root / "turbooci" / f"layer{n}" / "gzip.meta").read_bytes(),
        }
    return layers


def test_upstream_layer0_index_fields(small):
    idx = GzipIndex.from_source(FileSource(small[0]["meta_path"]))
    h = idx.header
    assert (h.major_version, h.minor_version, h.dict_compress_algo, h.dict_compress_level) == (1, 0, 1, 6)
    assert (h.span, h.window, h.index_size, h.flag) == (1 << 20, WINSIZE, 29, 0)
    assert h.gzip_file_size == len(small[0]["blob"]) == 2249143
    assert h.uncompress_file_size == len(small[0]["tar"]) == 5396480
    assert h.index_file_size == len(small[0]["meta"]) == 83431
    assert (h.index_start, h.index_area_len, h.crc) == (83324, 107, 0xD7A8CB42)
    assert [(c.de_pos, c.en_pos, c.bits) for c in idx.checkpoints] == LAYER0_CHECKPOINTS
    # windows are consecutive from the end of the header up to the entry table
    assert idx.checkpoints[0].win_pos == HEADER.size
    for a, b in zip(idx.checkpoints, idx.checkpoints[1:]):
        assert b.win_pos == a.win_pos + a.win_len
    assert idx.checkpoints[-1].win_pos + idx.checkpoints[-1].win_len == h.index_start


def test_upstream_windows_are_the_preceding_32k(small):
    idx = GzipIndex.from_bytes(small[0]["meta"])
    tar = small[0]["tar"]
    for cp in idx.checkpoints:
        expect = tar[max(0, cp.de_pos - WINSIZE) : cp.de_pos]
        assert idx.window(cp) == bytes(WINSIZE - len(expect)) + expect


def test_upstream_layer1_single_checkpoint(small):
    idx = GzipIndex.from_bytes(small[1]["meta"], name="layer1/gzip.meta")
    assert idx.header.index_num == 1 and idx.uncompressed_size == 81920 == len(small[1]["tar"])
    (cp,) = idx.checkpoints
    assert (cp.de_pos, cp.en_pos, cp.bits, cp.win_pos, cp.win_len) == (0, 10, 0, 333, 52)


@pytest.mark.parametrize("n", [0, 1])
def test_writer_reproduces_upstream_bytes(small, n):
    assert build_gzip_index(FileSource(small[n]["path"])) == small[n]["meta"]
    with open(small[n]["path"], "rb") as f:  # a sequential stream gives the same file
        assert build_gzip_index(f) == small[n]["meta"]


def test_reads_start_exactly_at_each_checkpoint(small):
    tar = small[0]["tar"]
    src = GzipIndexedSource(FileSource(small[0]["path"]), GzipIndex.from_bytes(small[0]["meta"]))
    for de_pos, _, _ in LAYER0_CHECKPOINTS:
        for a in (de_pos - 1, de_pos, de_pos + 1):
            if a >= 0:
                assert src.read(a, 4096) == tar[a : a + 4096]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_reads_equal_gunzip(small, data):
    tar = small[0]["tar"]
    src = GzipIndexedSource(FileSource(small[0]["path"]), GzipIndex.from_bytes(small[0]["meta"]))
    edges = [c[0] for c in LAYER0_CHECKPOINTS] + [len(tar)]
    offset = data.draw(
        st.one_of(
            st.integers(0, len(tar) + 100),
            st.sampled_from(edges).flatmap(lambda e: st.integers(max(0, e - 5000), e + 50)),
        )
    )
    length = data.draw(st.integers(0, 1_200_000))
    assert src.read(offset, length) == tar[offset : offset + length]


def test_whole_stream_and_past_the_end(small):
    tar = small[0]["tar"]
    src = GzipIndexedSource(FileSource(small[0]["path"]), GzipIndex.from_bytes(small[0]["meta"]))
    assert src.size == len(tar)
    assert src.read(0, len(tar) + 1000) == tar
    assert src.read(len(tar) - 10, 100) == tar[-10:]
    assert src.read(len(tar), 10) == b""


def test_sequential_reads_continue_instead_of_restarting(small):
    tar = small[0]["tar"]
    gz = CountingSource(FileSource(small[0]["path"]))
    src = GzipIndexedSource(gz, GzipIndex.from_bytes(small[0]["meta"]))
    start = LAYER0_CHECKPOINTS[2][0] + 600_000  # far from any checkpoint
    chunks = [src.read(start + i * 4096, 4096) for i in range(64)]
    assert b"".join(chunks) == tar[start : start + 64 * 4096]
    # restarting from the checkpoint each time would inflate ~600 KB per read and re-read
    # ~250 KB of compressed input 64 times; continuing reads the input about once
    assert gz.bytes_read < 600_000


def _blocky_gzip(size: int, seed: int, level: int = 6) -> bytes:
    rnd = random.Random(seed)
    words = [bytes(rnd.choices(b"abcdefghij \n", k=rnd.randint(2, 12))) for _ in range(500)]
    body = b"".join(rnd.choice(words) for _ in range(size // 6))[:size]
    return gzip.compress(body, compresslevel=level, mtime=0)


@pytest.mark.parametrize("algo", [0, 1])
def test_small_span_many_checkpoints_roundtrip(algo):
    blob = _blocky_gzip(3_000_000, seed=7, level=1)
    plain = gzip.decompress(blob)
    meta = build_gzip_index(BytesSource(blob, "gen.tar.gz"), span=65536, dict_algo=algo)
    idx = GzipIndex.from_bytes(meta)
    assert idx.header.dict_compress_algo == algo
    assert len(idx.checkpoints) > 20
    if algo == 0:
        assert {c.win_len for c in idx.checkpoints} == {WINSIZE}
    # every checkpoint after the first sits on or just before a span multiple
    for c in idx.checkpoints[1:]:
        assert c.de_pos % 65536 == 0 or (c.de_pos // 65536 + 1) * 65536 - c.de_pos < 65536
    src = GzipIndexedSource(BytesSource(blob, "gen.tar.gz"), idx)
    rnd = random.Random(1)
    for _ in range(200):
        a = rnd.randrange(len(plain))
        n = rnd.randrange(1, 70000)
        assert src.read(a, n) == plain[a : a + n]


def test_only_first_member_is_indexed():
    first = gzip.compress(b"first member " * 1000, mtime=0)
    blob = first + gzip.compress(b"second", mtime=0)
    idx = GzipIndex.from_bytes(build_gzip_index(BytesSource(blob)))
    assert idx.gzip_size == len(blob)  # upstream stats the whole file
    assert idx.uncompressed_size == 13000
    with io.BytesIO(blob) as f:
        assert GzipIndex.from_bytes(build_gzip_index(f)).gzip_size == len(blob)


def test_writer_rejects_bad_arguments_and_bad_streams():
    with pytest.raises(UsageError, match="span"):
        build_gzip_index(BytesSource(gzip.compress(b"x")), span=4096)
    with pytest.raises(UsageError, match="level"):
        build_gzip_index(BytesSource(gzip.compress(b"x")), dict_level=12)
    with pytest.raises(CorruptDataError, match=r"^junk\.gz at offset \d+: not a valid gzip stream"):
        build_gzip_index(BytesSource(b"this is not gzip at all" * 10, "junk.gz"))
    blob = _blocky_gzip(200_000, seed=3)
    with pytest.raises(CorruptDataError, match=r"^cut\.gz at offset \d+: gzip stream truncated"):
        build_gzip_index(BytesSource(blob[: len(blob) // 2], "cut.gz"))


# --- corrupt or mismatched input: one line naming the blob and the offset -------------


def _one_line(err: CorruptDataError) -> str:
    msg = str(err)
    assert "\n" not in msg
    return msg


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def _recrc(data: bytes) -> bytes:
    from tcmu_overlaybd.crc32c import crc32c_raw

    return _patch(data, 329, struct.pack("<I", crc32c_raw(data[:329])))


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda m: m[:200], r"gzip\.meta at offset 0: gzip index header needs 333 bytes"),
        (lambda m: _patch(m, 0, b"XX"), r"gzip\.meta at offset 0: bad gzip index magic"),
        (lambda m: _patch(m, 50, b"\x01"), r"gzip\.meta at offset 329: gzip index header CRC"),
        (lambda m: _recrc(_patch(m, 8, b"\x02")), r"gzip\.meta at offset 8: .*major version 2"),
        (lambda m: _recrc(_patch(m, 25, struct.pack("<q", 10**6))), r"gzip\.meta at offset 25: implausible checkpoint"),
        (lambda m: m + b"\0", r"gzip\.meta at offset 41: gzip index says its size is 83431, file has 83432"),
        (lambda m: _patch(m, 83324 + 5, b"\xff\xff\xff"), r"gzip\.meta at offset 83324: entry table"),
        (lambda m: _patch(m, 400, b"\xff" * 8), r"gzip\.meta at offset 385: window does not inflate"),
    ],
)
def test_corrupt_index_is_one_line_error(small, mutate, pattern):
    bad = mutate(small[0]["meta"])
    with pytest.raises(CorruptDataError) as ei:
        idx = GzipIndex.from_bytes(bad, name="gzip.meta")
        GzipIndexedSource(BytesSource(small[0]["blob"], "layer0.tar.gz"), idx).read(1_000_000, 10)
    assert ei.value.blob == "gzip.meta"
    assert pytest.importorskip("re").match(pattern, _one_line(ei.value))


def test_checkpoint_out_of_range_names_the_table(small):
    meta = small[1]["meta"]
    table = zlib.decompress(meta[385:])
    bad_table = _patch(table, 16, struct.pack("<q", 10**9))  # win_pos far outside the file
    area = zlib.compress(bad_table, 6)
    bad = meta[:385] + area
    bad = _patch(bad, 321, struct.pack("<q", len(area)))
    bad = _patch(bad, 41, struct.pack("<q", len(bad)))
    with pytest.raises(CorruptDataError, match=r"^l1\.meta at offset 385: checkpoint 0: window"):
        GzipIndex.from_bytes(_recrc(bad), name="l1.meta")


def test_target_of_wrong_size_is_refused(small):
    idx = GzipIndex.from_bytes(small[0]["meta"])
    with pytest.raises(CorruptDataError) as ei:
        GzipIndexedSource(BytesSource(small[0]["blob"][:-100], "sha256:abc"), idx)
    assert _one_line(ei.value).startswith("sha256:abc at offset 2249043: gzip blob is 2249043 bytes")


def test_gzip_body_zlib_rejects_is_one_line_error(decoder):
    # stored blocks (level 0): a damaged NLEN is something inflate must reject.  (Damage
    # inside Huffman data often still inflates; only the gzip trailer CRC at the very end
    # could tell, which random access never reads.)
    blob = bytearray(gzip.compress(os.urandom(200_000), compresslevel=0, mtime=0))
    meta = build_gzip_index(BytesSource(bytes(blob)))
    blob[13] ^= 0xFF  # NLEN of the first stored block (10-byte header, 1 byte of block bits, LEN)
    src = GzipIndexedSource(BytesSource(bytes(blob), "sha256:stored"), GzipIndex.from_bytes(meta))
    with pytest.raises(CorruptDataError) as ei:
        src.read(100, 10)
    # ISA-L buffers a few more input bytes before it finds the damage, and says it less precisely
    where, msg = (15, "invalid stored block lengths") if decoder is inflate.ZlibDecoder else (18, "invalid deflate block")
    assert _one_line(ei.value) == f"sha256:stored at offset {where}: gzip data does not inflate: {msg}"


def test_concurrent_reads_from_many_threads(small):
    import threading

    tar = small[0]["tar"]
    src = GzipIndexedSource(FileSource(small[0]["path"]), GzipIndex.from_bytes(small[0]["meta"]))
    failures = []

    def worker(seed):
        rnd = random.Random(seed)
        pos = rnd.randrange(len(tar))
        for _ in range(40):
            if rnd.random() < 0.5:  # mix sequential runs (parked inflaters) and random jumps
                pos = rnd.randrange(len(tar))
            n = rnd.randrange(1, 20000)
            if src.read(pos, n) != tar[pos : pos + n]:
                failures.append((seed, pos, n))
            pos += n

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    size=st.integers(0, 400_000),
    level=st.integers(0, 9),
    span=st.sampled_from([65536, 100_000, 1 << 20]),
    algo=st.sampled_from([0, 1]),
)
def test_any_gzip_stream_round_trips(seed, size, level, span, algo):
    rnd = random.Random(seed)
    chunks = []
    while sum(map(len, chunks)) < size:  # mixes text-like, repetitive and random runs
        kind = rnd.random()
        if kind < 0.4:
            chunks.append(bytes(rnd.choices(b"the quick brown fox\n", k=rnd.randint(1, 20000))))
        elif kind < 0.7:
            chunks.append(bytes([rnd.randrange(256)]) * rnd.randint(1, 30000))
        else:
            chunks.append(rnd.randbytes(rnd.randint(1, 20000)))
    plain = b"".join(chunks)[:size]
    blob = gzip.compress(plain, compresslevel=level, mtime=0)
    meta = build_gzip_index(BytesSource(blob), span=span, dict_algo=algo)
    idx = GzipIndex.from_bytes(meta)
    assert idx.uncompressed_size == size and idx.gzip_size == len(blob)
    assert idx.checkpoints[0].de_pos == 0 and len(idx.checkpoints) <= size // 65536 + 2
    src = GzipIndexedSource(BytesSource(blob, "g"), idx)
    for _ in range(6):
        a = rnd.randrange(size + 1)
        n = rnd.randrange(70000)
        assert src.read(a, n) == plain[a : a + n]


def test_gzip_cli_stream_with_file_name_header(tmp_path):
    import subprocess

    plain = gzip.decompress(_blocky_gzip(2_500_000, seed=9))
    (tmp_path / "layer.tar").write_bytes(plain)
    blob = subprocess.run(["gzip", "-9", "-c", str(tmp_path / "layer.tar")], capture_output=True, check=True).stdout
    assert blob[3] & 0x08  # FNAME set: the deflate data starts after "layer.tar\0"
    idx = GzipIndex.from_bytes(build_gzip_index(BytesSource(blob)))
    assert idx.checkpoints[0].en_pos == 10 + len(b"layer.tar\0")
    src = GzipIndexedSource(BytesSource(blob, "cli.gz"), idx)
    for a in (0, 1, 999_999, 1_048_576, len(plain) - 5):
        assert src.read(a, 100_000) == plain[a : a + 100_000]


# --- cold reads: the compressed input of a read in one request -------------------------------


class _LatencySource:
    """A blob with a fixed delay per read that records each read's (start, end) time."""

    def __init__(self, base, latency: float):
        import threading

        self.base, self.latency = base, latency
        self.name, self.size = base.name, base.size
        self.intervals: list[tuple[float, float]] = []
        self._lock = threading.Lock()

    def read(self, offset, length):
        import time

        t0 = time.monotonic()
        time.sleep(self.latency)
        data = self.base.read(offset, length)
        with self._lock:
            self.intervals.append((t0, time.monotonic()))
        return data

    def round_trips(self) -> int:
        """Reads that had to wait for an earlier one: the longest chain of non-overlapping reads."""
        chain, end = 0, float("-inf")
        for t0, t1 in sorted(self.intervals, key=lambda iv: iv[1]):
            if t0 >= end:
                chain, end = chain + 1, t1
        return chain

    def close(self):
        self.base.close()


def _span(n: int) -> int:
    """Compressed bytes of layer 0's span n (checkpoint n to checkpoint n + 1)."""
    return LAYER0_CHECKPOINTS[n + 1][1] - LAYER0_CHECKPOINTS[n][1]


@pytest.mark.parametrize("span", [1, 3])  # checkpoint 1 has 4 unused bits, 3 has 4 too: primed
def test_cold_read_mid_span_reads_its_compressed_span_once(small, span):
    tar = small[0]["tar"]
    gz = CountingSource(FileSource(small[0]["path"]))
    src = GzipIndexedSource(gz, GzipIndex.from_bytes(small[0]["meta"]))
    mid = (LAYER0_CHECKPOINTS[span][0] + LAYER0_CHECKPOINTS[span + 1][0]) // 2
    assert src.read(mid, 4096) == tar[mid : mid + 4096]
    # one read from the byte before the checkpoint (its unused bits) to the next checkpoint
    assert gz.calls == 1
    assert _span(span) < gz.bytes_read <= 1.1 * _span(span)
    # the rest of the span continues the parked inflater on the bytes already read
    end = LAYER0_CHECKPOINTS[span + 1][0]
    assert src.read(mid + 4096, end - mid - 4096) == tar[mid + 4096 : end]
    assert gz.calls == 1
    assert src.inflate_stats() == {"spans_inflated": 1, "continued": 1, "bytes_inflated": end - LAYER0_CHECKPOINTS[span][0],
                                   "compressed_reads": 1, "compressed_bytes": gz.bytes_read}


def test_cold_read_through_the_block_cache_is_one_round_trip(small, tmp_path):
    """Latency injected under a real BlockCache: the span goes out as one batch of parallel
    Range requests (it used to take one round trip per 64 KiB of compressed input)."""
    from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource

    tar = small[0]["tar"]
    slow = _LatencySource(FileSource(small[0]["path"]), latency=0.2)
    blob = CachedSource(slow, BlockCache(tmp_path / "blocks", 1 << 30), key="sha256:" + LAYER0, parallel=4)
    src = GzipIndexedSource(blob, GzipIndex.from_bytes(small[0]["meta"]))
    mid = (LAYER0_CHECKPOINTS[1][0] + LAYER0_CHECKPOINTS[2][0]) // 2
    assert src.read(mid, 4096) == tar[mid : mid + 4096]
    assert slow.round_trips() == 1 and len(slow.intervals) >= 2
    blob.cache.close_fds()


def test_sequential_refill_units_read_each_compressed_byte_about_once(small):
    """1 MiB reads (the gzip cache's refill units) cross a checkpoint each: the crossed span is
    read whole and only an estimate of the next span's head, so the stream is read ~once."""
    tar = small[0]["tar"]
    gz = CountingSource(FileSource(small[0]["path"]))
    src = GzipIndexedSource(gz, GzipIndex.from_bytes(small[0]["meta"]))
    unit = 1 << 20
    for off in range(0, len(tar), unit):
        assert src.read(off, unit) == tar[off : off + unit]
    assert gz.bytes_read <= 1.1 * len(small[0]["blob"])
    assert gz.calls <= 2 * len(range(0, len(tar), unit))  # one read per unit, two at most
    # a cold unit alone: one read, covering its checkpoint's span and the head of the next
    cold = CountingSource(FileSource(small[0]["path"]))
    src = GzipIndexedSource(cold, GzipIndex.from_bytes(small[0]["meta"]))
    assert src.read(3 * unit, unit) == tar[3 * unit : 4 * unit]
    assert cold.calls == 1 and cold.bytes_read < 1.25 * _span(3)


def test_an_underestimated_tail_costs_a_second_read_never_wrong_bytes():
    """A last span that is random data then zeros compresses ~8:1 on average, so the estimate
    for a read ending in its random head is far too low: the inflater reads the rest of the span."""
    rnd = random.Random(3)
    body = rnd.randbytes(1_250_000) + bytes(1_500_000)
    blob = gzip.compress(body, compresslevel=6, mtime=0)
    idx = GzipIndex.from_bytes(build_gzip_index(BytesSource(blob), span=1 << 20))
    [_, cp1] = idx.checkpoints
    assert cp1.de_pos < 1_100_000 and (len(blob) - cp1.en_pos) / (len(body) - cp1.de_pos) < 0.2
    gz = CountingSource(BytesSource(blob, "sha256:" + "1" * 64))
    src = GzipIndexedSource(gz, idx)
    start, end = cp1.de_pos - 1000, 1_200_000
    assert src.read(start, end - start) == body[start:end]
    assert gz.calls == 2 and gz.bytes_read == len(blob) - 10  # the rest: up to the end of the stream
    assert src.read(0, len(body)) == body


def test_parked_inflaters_keep_only_input_they_have_not_used(small, decoder):
    """Each span is read whole, but an inflater parked near its span's end keeps just the rest:
    memory stays ~the decoder states, not PARKED x a compressed span.  (ISA-L decodes ahead and
    holds back its last input bytes: it keeps up to a 64 KiB read past the span's end and may
    need it to finish the span.)"""
    tar = small[0]["tar"]
    src = GzipIndexedSource(FileSource(small[0]["path"]), GzipIndex.from_bytes(small[0]["meta"]))
    for k in range(1, 5):
        at = LAYER0_CHECKPOINTS[k + 1][0] - 8192
        assert src.read(at, 4096) == tar[at : at + 4096]
    held = [len(inf._input or b"") for inf in src._parked]
    zlib_ = decoder is inflate.ZlibDecoder
    assert len(held) == 4 and sum(held) < 4 * (16384 if zlib_ else 65536 + decoder.INPUT_SLACK)
    # and they still continue: the next 4 KiB of each comes without restarting at the checkpoint
    # (and with zlib without reading the blob again)
    for k in range(1, 5):
        at = LAYER0_CHECKPOINTS[k + 1][0] - 4096
        assert src.read(at, 4096) == tar[at : at + 4096]
    assert src.inflate_stats()["compressed_reads"] == (4 if zlib_ else 8)
    assert src.inflate_stats()["continued"] == 4 and src.inflate_stats()["spans_inflated"] == 4


def test_warming_a_range_fetches_the_compressed_input_its_inflation_then_reads(tmp_path):
    """A FastOCI trace replay fetches a record's compressed input first (merged with its
    neighbours); the read that inflates it afterwards must then find all of it cached."""
    from tcmu_overlaybd.block.source import warm, warm_target
    from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource

    blob = _blocky_gzip(3_000_000, seed=9, level=6)
    plain = gzip.decompress(blob)
    idx = GzipIndex.from_bytes(build_gzip_index(BytesSource(blob, "gen.tar.gz"), span=262144))
    rnd = random.Random(4)
    for k in range(12):
        base = CountingSource(BytesSource(blob, "sha256:" + "d" * 64))
        cached = CachedSource(base, BlockCache(tmp_path / f"c{k}", 64 << 20, 16384), "sha256:" + "d" * 64)
        src = GzipIndexedSource(cached, idx)
        a, n = rnd.randrange(len(plain) - 1), rnd.randrange(1, 400_000)
        target, lo, length = warm_target(src, a, n)
        assert target is cached and 0 < length <= 4 << 20
        warm(target, lo, length)
        calls = base.calls
        assert src.read(a, n) == plain[a : a + n]
        assert base.calls == calls  # nothing left to fetch
        cached.cache.close_fds()  # the cache keeps its block files open: not 12 caches' worth
