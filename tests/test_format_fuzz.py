"""Fuzz the format parsers: whatever the bytes, only ObdError may escape (bounded, a few seconds)."""

from __future__ import annotations

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcmu_overlaybd.block.source import BytesSource
from tcmu_overlaybd.errors import ObdError
from tcmu_overlaybd.format import lsmt, tarwrap, zfile
from tcmu_overlaybd.format.layer import open_layer_blob

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _sample_layer() -> bytes:
    b = lsmt.SealedLayerBuilder(1 << 20, uuid="01bb4fce-3eb1-b56b-05ad-f99504dafd31")
    b.add_data(0, bytes(range(256)) * 8)
    b.add_zeroed(4096, 4096)
    b.add_data(65536, b"q" * 1024)
    out = io.BytesIO()
    b.finish(out)
    return out.getvalue()


LAYER = _sample_layer()
ZF = io.BytesIO()
zfile.compress_source(BytesSource(LAYER), ZF)
WRAPPED = io.BytesIO()
tarwrap.wrap(io.BytesIO(ZF.getvalue()), WRAPPED, len(ZF.getvalue()))
SAMPLES = {"lsmt": LAYER, "zfile": ZF.getvalue(), "blob": WRAPPED.getvalue()}


def _mutations(sample: bytes):
    """Byte flips, truncations and splices of a valid sample (more useful than pure noise)."""
    n = len(sample)
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=6)
    return st.one_of(
        flips.map(lambda fs: _flip(sample, fs)),
        st.integers(0, n).map(lambda k: sample[:k]),
        st.binary(max_size=5000),
    )


def _flip(sample: bytes, flips) -> bytes:
    b = bytearray(sample)
    for pos, val in flips:
        b[pos] = val
    return bytes(b)


def _exercise(source) -> None:
    source.read(0, 4096)
    source.read(max(0, source.size - 100), 200)


@FUZZ
@given(data=_mutations(SAMPLES["lsmt"]))
def test_lsmt_parser_only_raises_obd_errors(data):
    try:
        _exercise(lsmt.LsmtFile.open(BytesSource(data, name="f")))
    except ObdError:
        pass


@FUZZ
@given(data=_mutations(SAMPLES["zfile"]))
def test_zfile_parser_only_raises_obd_errors(data):
    try:
        _exercise(zfile.ZFileReader(BytesSource(data, name="f")))
    except ObdError:
        pass


@FUZZ
@given(data=_mutations(SAMPLES["blob"]))
def test_layer_blob_opener_only_raises_obd_errors(data):
    try:
        layer = open_layer_blob(BytesSource(data, name="f"))
        layer.read(0, 70000)
    except ObdError:
        pass


@FUZZ
@given(data=st.binary(max_size=3000), header=st.sampled_from([SAMPLES["blob"][:1536], b""]))
def test_tar_unwrap_only_raises_obd_errors(data, header):
    try:
        payload = tarwrap.unwrap(BytesSource(header + data, name="f"))
        payload.read(0, 10)
    except ObdError:
        pass
