"""Local layouts hash a blob file once across processes (``oci_layout.VerifiedFiles``).

The layout is upstream's two-layer native commit of the small tree plus a few
random blobs, built once and left to age past ``SETTLE_NS`` (a file changed
that recently is never recorded).  Bytes read are the process's ``rchar``
(/proc/self/io), so "not hashed again" means the blob's bytes were not read.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from tcmu_overlaybd.errors import CorruptDataError
from tcmu_overlaybd.image import oci_layout
from tcmu_overlaybd.image.disk import open_disk
from tcmu_overlaybd.image.oci_layout import VERIFIED_RECORD, OciLayoutStore, VerifiedFiles
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image

from .helpers.layouts import add_blob, native_layout, turbo_layout

BLOB_SIZE = 4 << 20
#: blobs of the aged layout, one per test that changes or records one
BLOB_NAMES = ("process", "rewrite", "utime", "memo", "record-trust", "garbage", "readonly", "symlink")


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


@pytest.fixture(scope="module")
def aged(vectors, tmp_path_factory):
    """(layout, {name: (digest, size)}): files older than SETTLE_NS; a TurboOCI layout beside it."""
    layout = tmp_path_factory.mktemp("aged") / "layout"
    commits = [vectors / "upstream-small" / "overlaybd" / f"layer{i}.commit" for i in (0, 1)]
    native_layout(layout, commits, "obd")
    metas = [vectors / "upstream-small" / "turbooci" / f"layer{i}" / "turboOCIv1.tar.gz" for i in (0, 1)]
    turbo_layout(layout.parent / "turbo", vectors / "upstream-small" / "original", metas, "small", "turbo")
    blobs = {name: add_blob(layout, os.urandom(BLOB_SIZE)) for name in BLOB_NAMES}
    time.sleep(oci_layout.SETTLE_NS / 1e9 + 0.05)
    return layout, blobs


def _open(layout, cache, digest, size) -> int:
    """Bytes read by opening ``digest`` through a new store with the record in ``cache``."""
    store = OciLayoutStore(layout, VerifiedFiles.in_dir(str(cache)))
    before = _rchar()
    store.open_blob(digest, size).close()
    return _rchar() - before


def _rewrite_in_place(path, keep_mtime: bool) -> None:
    st = os.stat(path)
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    assert os.path.getsize(path) == st.st_size
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_second_process_does_not_hash_again(aged, tmp_path):
    layout, blobs = aged
    digest, size = blobs["process"]
    assert _open(layout, tmp_path, digest, size) >= BLOB_SIZE
    record = tmp_path / VERIFIED_RECORD
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert digest in record.read_text()
    code = ("import sys; from tests.test_layout_verified import _open; "
            "print(_open(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))")
    out = subprocess.run([sys.executable, "-c", code, str(layout), str(tmp_path), digest, str(size)],
                         cwd=os.path.dirname(os.path.dirname(__file__)), check=True, capture_output=True, text=True)
    assert int(out.stdout) < 64 << 10  # the record and python's own files, not the 4 MiB blob


@pytest.mark.parametrize("name,keep_mtime", [("rewrite", False), ("utime", True)])
def test_blob_rewritten_after_recording_is_detected(aged, tmp_path, name, keep_mtime):
    layout, blobs = aged
    digest, size = blobs[name]
    _open(layout, tmp_path, digest, size)
    assert digest in (tmp_path / VERIFIED_RECORD).read_text()
    _rewrite_in_place(layout / "blobs" / "sha256" / digest[7:], keep_mtime)
    with pytest.raises(CorruptDataError) as err:
        _open(layout, tmp_path, digest, size)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"{digest}: oci:{layout}: blob content does not match its digest (got sha256:")


def test_store_notices_a_rewrite_between_two_opens(aged, tmp_path):
    """A store that verified a file once hashes it again once it changed (handler re-opens)."""
    layout, blobs = aged
    digest, size = blobs["memo"]
    store = OciLayoutStore(layout)
    store.open_blob(digest, size).close()
    before = _rchar()
    store.open_blob(digest, size).close()
    assert _rchar() - before < 64 << 10
    _rewrite_in_place(layout / "blobs" / "sha256" / digest[7:], keep_mtime=True)
    with pytest.raises(CorruptDataError, match="blob content does not match its digest"):
        store.open_blob(digest, size)


def test_fresh_file_is_hashed_every_time(tmp_path):
    """A file changed within SETTLE_NS is verified but not recorded (a second write could share its ctime)."""
    layout = tmp_path / "layout"
    digest, size = add_blob(layout, os.urandom(BLOB_SIZE))
    (layout / "index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    assert _open(layout, tmp_path / "cache", digest, size) >= BLOB_SIZE
    assert not (tmp_path / "cache" / VERIFIED_RECORD).exists()
    assert _open(layout, tmp_path / "cache", digest, size) >= BLOB_SIZE


def test_record_of_another_user_or_writable_by_others_is_ignored(aged, tmp_path):
    layout, blobs = aged
    digest, size = blobs["record-trust"]
    _open(layout, tmp_path, digest, size)
    record = tmp_path / VERIFIED_RECORD
    record.chmod(0o622)
    assert _open(layout, tmp_path, digest, size) >= BLOB_SIZE
    # hashed again and the record rewritten 0600, so trusted again
    assert stat.S_IMODE(record.stat().st_mode) == 0o600
    assert _open(layout, tmp_path, digest, size) < 64 << 10
    os.chown(record, 65534, 65534)
    assert _open(layout, tmp_path, digest, size) >= BLOB_SIZE


@pytest.mark.parametrize("junk", [b"", b"{not json", b'{"version": 99, "files": {}}', b'[1, 2]',
                                  b'{"version": 1, "files": {"1:2": "x"}}'])
def test_corrupt_record_means_hash_again(aged, tmp_path, junk):
    layout, blobs = aged
    digest, size = blobs["garbage"]
    record = tmp_path / VERIFIED_RECORD
    record.write_bytes(junk)
    record.chmod(0o600)
    assert _open(layout, tmp_path, digest, size) >= BLOB_SIZE
    doc = json.loads(record.read_bytes())
    assert doc["version"] == 1 and [e[3] for e in doc["files"].values()] == [digest]
    assert _open(layout, tmp_path, digest, size) < 64 << 10


def test_unwritable_record_dir_still_opens(aged, tmp_path):
    layout, blobs = aged
    digest, size = blobs["readonly"]
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    assert _open(layout, blocker, digest, size) >= BLOB_SIZE
    assert _open(layout, blocker, digest, size) >= BLOB_SIZE


def test_record_keeps_the_most_recent_files(tmp_path, monkeypatch):
    monkeypatch.setattr(oci_layout, "VERIFIED_RECORD_MAX", 3)
    record = VerifiedFiles.in_dir(str(tmp_path))
    idents = [oci_layout.FileIdentity(1, ino, 10, 5, 5) for ino in range(5)]
    for ident in idents:
        record.add(ident, f"sha256:{ident.ino}")
    fresh = VerifiedFiles.in_dir(str(tmp_path))
    assert [fresh.holds(i, f"sha256:{i.ino}") for i in idents] == [False, False, True, True, True]
    assert not fresh.holds(idents[4], "sha256:other")


def test_image_open_records_its_layers(aged, tmp_path):
    """``open_disk`` with a cache dir: layer blobs of a local layout are hashed by the first mount only."""
    layout, _ = aged
    opts = OpenOptions(cache_dir=str(tmp_path))
    image = open_image(f"oci:{layout}:obd", opts)
    before = _rchar()
    disk = open_disk(image, opts)
    first = _rchar() - before
    layer_bytes = sum(la.descriptor.size for la in image.layers)
    assert first >= layer_bytes
    data = disk.read(0, 1 << 20)
    disk.close()
    recorded = {e[3] for e in json.loads((tmp_path / VERIFIED_RECORD).read_text())["files"].values()}
    assert recorded == {la.descriptor.digest for la in image.layers}
    image = open_image(f"oci:{layout}:obd", opts)
    before = _rchar()
    disk = open_disk(image, opts)
    assert _rchar() - before < layer_bytes / 4
    assert disk.read(0, 1 << 20) == data
    disk.close()


def test_symlinked_record_is_neither_read_nor_written_through(aged, tmp_path):
    """A record path planted as a symlink (a cache dir others can write): the link is not
    followed, its target keeps its bytes and the record becomes a file of our own."""
    layout, blobs = aged
    digest, size = blobs["symlink"]
    _open(layout, tmp_path / "elsewhere", digest, size)
    planted = tmp_path / "elsewhere" / VERIFIED_RECORD  # a genuine record that names the blob
    before = planted.read_bytes()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / VERIFIED_RECORD).symlink_to(planted)
    assert _open(layout, tmp_path / "cache", digest, size) >= BLOB_SIZE
    assert planted.read_bytes() == before
    assert not (tmp_path / "cache" / VERIFIED_RECORD).is_symlink()
    assert _open(layout, tmp_path / "cache", digest, size) < 64 << 10


def test_fastoci_image_records_meta_and_original_layers(aged, tmp_path):
    layout, _ = aged
    turbo = layout.parent / "turbo"
    opts = OpenOptions(cache_dir=str(tmp_path), gzip_cache_enable=False)
    image = open_image(f"oci:{turbo}:turbo", opts)
    open_disk(image, opts).close()
    recorded = {e[3] for e in json.loads((tmp_path / VERIFIED_RECORD).read_text())["files"].values()}
    assert recorded == {d.digest for la in image.layers for d in (la.descriptor, la.target)}
    originals = sum(os.path.getsize(turbo / "blobs" / "sha256" / la.target.digest[7:]) for la in image.layers)
    before = _rchar()
    open_disk(open_image(f"oci:{turbo}:turbo", opts), opts).close()
    # the meta tarballs are read whole to be unpacked, the originals only at their heads
    assert _rchar() - before < originals / 4
