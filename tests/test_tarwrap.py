"""Tar wrapper (spec §3.2): known answers from the hello-world blob, exact writer, bad input."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from tcmu_overlaybd.block.source import BytesSource, FileSource
from tcmu_overlaybd.errors import CorruptDataError
from tcmu_overlaybd.format import tarwrap

HELLO = "aci-hello-world/sha256_022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"


@pytest.fixture(scope="module")
def expected(vectors):
    cases = json.loads((vectors / "EXPECTED.json").read_text())["cases"]
    return next(v for k, v in cases.items() if k.startswith("aci-hello-world"))["tar_wrapper"]


def test_unwrap_hello_world_payload_offsets(vectors, expected):
    payload = tarwrap.unwrap(FileSource(vectors / HELLO))
    assert payload.start == expected["payload_offset"] == 1536
    assert payload.size == expected["payload_size"] == 639491
    assert payload.read(0, 5) == b"ZFile"


def test_wrap_reproduces_hello_world_blob(vectors):
    blob = (vectors / HELLO).read_bytes()
    payload = blob[1536 : 1536 + 639491]
    out = io.BytesIO()
    n = tarwrap.wrap(io.BytesIO(payload), out, len(payload))
    assert n == len(blob)
    assert out.getvalue() == blob


def test_wrapped_blob_is_a_tar_python_can_list(tmp_path):
    payload = b"x" * 1000
    out = io.BytesIO()
    tarwrap.wrap(io.BytesIO(payload), out, len(payload), mode=0o100444)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        member = tf.getmember("overlaybd.commit")
        assert member.size == 1000 and member.isreg() and member.mode & 0o7777 == 0o444
        assert tf.extractfile(member).read() == payload
    assert tarwrap.unwrap(BytesSource(out.getvalue())).read(0, 2000) == payload


def test_plain_ustar_header_without_pax_is_accepted():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info = tarfile.TarInfo("overlaybd.commit")
        info.size = 700
        info.mode = 0o444
        tf.addfile(info, io.BytesIO(b"z" * 700))
    payload = tarwrap.unwrap(BytesSource(buf.getvalue()))
    assert (payload.start, payload.size) == (512, 700)


def test_non_tar_is_returned_unchanged():
    src = BytesSource(b"LSMT" + bytes(4000), name="raw")
    assert tarwrap.unwrap(src) is src


def test_truncated_payload_names_blob_and_offset(vectors):
    blob = (vectors / HELLO).read_bytes()[:100_000]
    with pytest.raises(CorruptDataError) as e:
        tarwrap.unwrap(BytesSource(blob, name="cut.tar"))
    assert "cut.tar at offset 100000" in str(e.value)
    assert "runs past the end" in str(e.value)


def test_bad_pax_record_is_corrupt_data():
    out = io.BytesIO()
    tarwrap.wrap(io.BytesIO(b"a" * 512), out, 512)
    blob = bytearray(out.getvalue())
    blob[512:520] = b"zz size="
    with pytest.raises(CorruptDataError) as e:
        tarwrap.unwrap(BytesSource(bytes(blob), name="pax.tar"))
    assert "pax.tar at offset 512: malformed PAX record" == str(e.value)
