"""Trace files and prefetch lists (spec §7.1)."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcmu_overlaybd.crc32c import crc32c_raw
from tcmu_overlaybd.errors import CorruptDataError
from tcmu_overlaybd.format.trace import (
    OP_READ, TRACE_MAGIC, TraceRecord, decode_trace, encode_trace, is_trace, parse_prefetch_list,
)


def test_layout_and_checksum_by_hand():
    recs = [TraceRecord(OP_READ, 2, 1 << 20, 4096), TraceRecord(OP_READ, 0, 4096, 0)]
    data = encode_trace(recs)
    assert len(data) == 24 + 48
    magic, size, crc = struct.unpack_from("<I4xQI4x", data)
    assert (magic, size) == (0xC2EF1820, 48)
    # chaining over records equals one CRC over all record bytes
    assert crc == crc32c_raw(data[24:])
    assert data[24] == ord("R") and data[25:28] == b"\0\0\0"
    assert struct.unpack_from("<IQq", data, 28) == (2, 1 << 20, 4096)
    assert decode_trace(data) == recs and is_trace(data)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 2**40), st.integers(0, 2**50)), max_size=40))
def test_round_trip(items):
    recs = [TraceRecord(OP_READ, a, b, c) for a, b, c in items]
    assert decode_trace(encode_trace(recs)) == recs


@pytest.mark.parametrize("mutate,where", [
    (lambda d: d[:20], "offset 0"),
    (lambda d: struct.pack("<I", 1) + d[4:], "offset 0"),
    (lambda d: d[:-1], "offset 8"),
    (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "offset 16"),
])
def test_corrupt_traces_name_the_offset(mutate, where):
    data = encode_trace([TraceRecord(OP_READ, 0, 4096, 8192)])
    with pytest.raises(CorruptDataError, match=where):
        decode_trace(mutate(data), name="trace")


def test_prefetch_list_keeps_paths_upstream_keeps():
    text = "/usr/bin/python3\n  /usr/lib/python3/  \nnot a path!\n/etc/*\n\n/opt/app/main.py\n"
    assert parse_prefetch_list(text) == ["/usr/bin/python3", "/usr/lib/python3/", "/opt/app/main.py"]
    assert not is_trace(text.encode())
    assert TRACE_MAGIC == 3270449184


def test_spool_records_ignore_a_torn_tail_and_reject_bad_ops():
    from tcmu_overlaybd.format.trace import RECORD, decode_records

    body = RECORD.pack(OP_READ, 1, 4096, 0) + RECORD.pack(OP_READ, 0, 512, 8192)
    assert decode_records(body + body[:10], "spool") == [TraceRecord(OP_READ, 1, 4096, 0),
                                                          TraceRecord(OP_READ, 0, 512, 8192)]
    with pytest.raises(CorruptDataError, match="spool.*offset 24"):
        decode_records(body[:24] + RECORD.pack(ord("X"), 0, 1, 0), "spool")


def test_prefetch_file_detection_follows_upstream():
    from tcmu_overlaybd.format.trace import load_prefetch_file

    trace = encode_trace([TraceRecord(OP_READ, 0, 4096, 0)])
    assert load_prefetch_file(trace, "f").kind == "trace"
    assert load_prefetch_file(b"/usr/lib/\n/etc/hosts\n", "f").paths == ("/usr/lib/", "/etc/hosts")
    # --prefetch-list: a file is a list even when it happens to start with the magic
    with pytest.raises(CorruptDataError, match="no path"):
        load_prefetch_file(trace, "f", force_list=True)


def test_merge_folds_touching_and_overlapping_reads_of_one_layer_in_order():
    from tcmu_overlaybd.prefetch.record import merge_records

    R = lambda layer, off, n: TraceRecord(OP_READ, layer, n, off)  # noqa: E731
    reads = [R(0, 0, 4096), R(1, 0, 4096), R(0, 4096, 4096), R(0, 2048, 8192), R(1, 8192, 4096),
             R(0, 1 << 20, 4096)]
    assert merge_records(reads) == [R(0, 0, 10240), R(1, 0, 4096), R(1, 8192, 4096), R(0, 1 << 20, 4096)]
    far = [R(0, 0, 10)] + [R(2, i * 100, 10) for i in range(20)] + [R(0, 10, 10)]
    assert len(merge_records(far, window=4)) == 22  # only recent records are extended
