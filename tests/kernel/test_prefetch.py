"""Trace record and replay through the kernel: obd mount --record-trace / --prefetch, obd umount,
obd record-trace stop, with a registry in the guest reached through the counting proxy."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import time

import pytest

from tcmu_overlaybd.convert.publish import publish
from tcmu_overlaybd.format.trace import decode_trace
from tcmu_overlaybd.image.manifest import REF_NAME
from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions

from ..helpers.layouts import native_layout
from ..helpers.registry import Proxy, RegistryServer, needs_registry
from .conftest import obd

pytestmark = [pytest.mark.kernel, needs_registry]

SMALL = "upstream-small"
FILE = "data/big.txt"  # 1.5 MiB
FILE_SHA = "769af9e484a4392f79d925377d556ce06f8bf92801c38816987fdb898444fce5"


@pytest.fixture
def small_image(vectors, tmp_path, monkeypatch):
    """The two-layer upstream image in a guest registry behind the proxy; a private cache."""
    monkeypatch.setenv("OBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OBD_GZIP_CACHE_DIR", str(tmp_path / "gzcache"))
    reg = RegistryServer(str(tmp_path / "registry"))
    proxy = Proxy(reg.host)
    try:
        commits = [vectors / SMALL / "overlaybd" / f"layer{i}.commit" for i in (0, 1)]
        layout = native_layout(tmp_path / "layout", commits, "obd")
        [desc] = [d for d in OciLayoutStore(layout).entries if d.annotations.get(REF_NAME) == "obd"]
        publish(str(layout), desc, f"{reg.host}/small:obd", OpenOptions(plain_http=True, quiet=True))
        yield f"{proxy.host}/small:obd", proxy, tmp_path / "cache"
    finally:
        proxy.stop()
        reg.stop()


def _blob_gets(proxy) -> int:
    return sum(1 for r in proxy.log.requests if r[0] == "GET" and "/blobs/" in r[1])


def _sha(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _prefetch_done(mnt, field: str = "state", timeout: float = 180.0) -> dict:
    """Wait until the mount's prefetch ``field`` (obd stats) says done; its counters."""
    import json

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc, out = obd("stats", "--json", str(mnt))
        prefetch = (json.loads(out).get("prefetch") or {}) if rc == 0 else {}
        if prefetch.get(field) in ("done", "failed"):
            assert prefetch[field] == "done", prefetch
            return prefetch
        time.sleep(0.5)
    raise AssertionError(f"prefetch {field} not done after {timeout:g} s: {prefetch}")


def test_record_at_umount_and_on_stop_then_replay_fetches_the_file_before_it_is_read(small_image, tmp_path):
    ref, proxy, cache = small_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    trace = tmp_path / "app.trace"

    # 1. record: the trace is written by obd umount
    assert obd("mount", "--plain-http", "--record-trace", str(trace), ref, str(mnt))[0] == 0
    try:
        assert _sha(mnt / FILE) == FILE_SHA
    finally:
        assert obd("umount", str(mnt))[0] == 0
    records = decode_trace(trace.read_bytes(), str(trace))
    assert records and stat.S_IMODE(os.stat(trace).st_mode) == 0o600
    assert sum(r.count for r in records) >= 1_500_000  # at least the file's bytes (compressed layers' view)
    assert not os.path.exists(f"{trace}.spool")

    # 2. obd record-trace stop writes the trace while the mount goes on
    stopped = tmp_path / "stopped.trace"
    assert obd("mount", "--plain-http", "--record-trace", str(stopped), ref, str(mnt))[0] == 0
    try:
        assert _sha(mnt / FILE) == FILE_SHA
        rc, out = obd("record-trace", "stop", str(mnt))
        assert rc == 0 and out.startswith(f"{stopped}: ") and decode_trace(stopped.read_bytes())
        assert obd("record-trace", "stop", str(mnt))[0] != 0  # already finished
    finally:
        assert obd("umount", str(mnt))[0] == 0

    # 3. replay on a cold cache: the file's blocks arrive without the file being read
    shutil.rmtree(cache)
    proxy.reset_counters()
    assert obd("mount", "--plain-http", "--prefetch", str(trace), ref, str(mnt))[0] == 0
    try:
        stats = _prefetch_done(mnt)
        assert stats["ranges_done"] == stats["ranges_total"] > 0 and _blob_gets(proxy) > 0
        proxy.reset_counters()
        assert _sha(mnt / FILE) == FILE_SHA
        assert _blob_gets(proxy) == 0  # and reading the file needs no request
    finally:
        assert obd("umount", str(mnt))[0] == 0


def test_recording_survives_a_handler_killed_and_restarted(small_image, tmp_path):
    import signal

    from .conftest import obd_json_list

    ref, proxy, cache = small_image
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    trace = tmp_path / "app.trace"
    first, second = "data/a/f004.txt", FILE
    assert obd("mount", "--plain-http", "--record-trace", str(trace), ref, str(mnt))[0] == 0
    try:
        (mnt / first).read_bytes()
        time.sleep(1.5)  # the recorder appends to its spool once a second
        [m] = obd_json_list()
        os.kill(m["handler_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            [m2] = obd_json_list()
            if m2["handler_alive"] and m2["handler_pid"] != m["handler_pid"]:
                break
            time.sleep(0.2)
        assert m2["restarts"] >= 1
        assert _sha(mnt / second) == FILE_SHA  # read by the restarted handler
    finally:
        assert obd("umount", str(mnt))[0] == 0
    assert decode_trace(trace.read_bytes())

    shutil.rmtree(cache)  # the trace covers what both handlers served
    assert obd("mount", "--plain-http", "--prefetch", str(trace), ref, str(mnt))[0] == 0
    try:
        _prefetch_done(mnt)
        proxy.reset_counters()
        (mnt / first).read_bytes()
        assert _sha(mnt / second) == FILE_SHA
        assert _blob_gets(proxy) == 0
    finally:
        assert obd("umount", str(mnt))[0] == 0


def test_background_download_pulls_the_whole_image_then_nothing_is_fetched(small_image, tmp_path, monkeypatch):
    import subprocess

    ref, proxy, _cache = small_image
    monkeypatch.setenv("OBD_PREFETCH_BACKGROUND_DELAY", "0")
    monkeypatch.setenv("OBD_PREFETCH_BACKGROUND_RATE", "100")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert obd("mount", "--plain-http", "--background-download", ref, str(mnt))[0] == 0
    try:
        stats = _prefetch_done(mnt, "background_state")
        assert stats["background_bytes"] > 0
        proxy.reset_counters()
        # every file's bytes (tar -f /dev/null would skip reading them)
        r = subprocess.run(f"tar -cf - -C {mnt} . | sha256sum", shell=True, capture_output=True)
        assert r.returncode == 0 and _sha(mnt / FILE) == FILE_SHA
        assert _blob_gets(proxy) == 0  # every block was already in the cache
    finally:
        assert obd("umount", str(mnt))[0] == 0


def test_a_list_pushed_with_the_image_is_replayed_by_a_plain_mount(small_image, tmp_path):
    ref, proxy, _cache = small_image
    listing = tmp_path / "list"
    listing.write_text("/data/\n")
    traced = ref.replace(":obd", ":obd-list")
    rc, out = obd("trace", "push", "--plain-http", "-q", ref, str(listing), "--to", traced)
    assert rc == 0 and out.startswith(traced.rsplit(":", 1)[0])
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proxy.reset_counters()
    assert obd("mount", "--plain-http", traced, str(mnt))[0] == 0  # no --prefetch flag
    try:
        stats = _prefetch_done(mnt)
        assert stats["source"].startswith("list acceleration layer sha256:")
        proxy.reset_counters()
        assert _sha(mnt / FILE) == FILE_SHA and (mnt / "data/b/new.txt").read_bytes()
        assert _blob_gets(proxy) == 0, (stats, proxy.log.requests)
    finally:
        assert obd("umount", str(mnt))[0] == 0
