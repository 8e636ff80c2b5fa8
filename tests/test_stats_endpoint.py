"""The stats socket, ``obd stats`` and the Prometheus endpoint, against a handler-like process
(a real separate process reading a file-backed disk through ``stats.telemetry.Telemetry``)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcmu_overlaybd.block.source import FileSource
from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource
from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.errors import StateError
from tcmu_overlaybd.mount.state import MountRecord, MountState, RecordDir, StateDir, mount_id
from tcmu_overlaybd.stats.prometheus import render
from tcmu_overlaybd.stats.telemetry import Telemetry, metrics_address_path, stats_socket_path
from tcmu_overlaybd.stats.unix_endpoint import query

from .conftest import ROOT

#: the handler-like process: serves stats for MNT, reads ``argv[3]`` times 4 KiB, then waits for
#: "read N" lines on stdin (more reads) until stdin closes or SIGTERM
CHILD = r"""
import os, signal, sys, threading
from tcmu_overlaybd.block.source import FileSource
from tcmu_overlaybd.mount.state import StateDir
from tcmu_overlaybd.stats.telemetry import Telemetry
state_dir, mid, nreads, listen = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sd = StateDir(state_dir)
st = sd.load(mid)
sd.write_pids(mid, os.getppid(), os.getpid(), 2)
tel = Telemetry(st, FileSource(st.image), state_dir=state_dir, slow_ms=1000, metrics_listen=listen)
tel.prefetch = type("Prefetch", (), {})()
tel.prefetch.bytes_prefetched, tel.prefetch.state = 8192, "running"
tel.start()
for i in range(nreads):
    tel.device.read(i * 4096, 4096)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
def commands():
    for line in sys.stdin:
        n = int(line.split()[1])
        for i in range(n):
            tel.device.read(i * 4096, 4096)
        print("done", flush=True)
    done.set()
threading.Thread(target=commands, daemon=True).start()
print("ready", flush=True)
done.wait()
tel.stop()
"""


def make_mount(tmp_path, name="mnt") -> tuple[StateDir, MountState]:
    sd = StateDir(str(tmp_path / "state"))
    mnt = tmp_path / name
    mnt.mkdir()
    disk = tmp_path / f"{name}.img"
    disk.write_bytes(os.urandom(1 << 20))
    mid = mount_id(str(mnt))
    st = MountState(id=mid, mountpoint=str(mnt), image=str(disk), raw=True, options={}, size=1 << 20,
                    backstore=f"obd-{mid}", wwn="naa.0", lower="", upper="", work="", own_upper=False)
    sd.save(st)
    return sd, st


class Child:
    def __init__(self, sd: StateDir, st: MountState, nreads: int, listen: str = ""):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, sd.path, st.id, str(nreads), listen],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        assert self.proc.stdout.readline() == "ready\n"

    def read(self, n: int) -> None:
        self.proc.stdin.write(f"read {n}\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline() == "done\n"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)


@pytest.fixture
def env_state(tmp_path, monkeypatch):
    monkeypatch.setenv("OBD_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("OBD_PERSIST_DIR", str(tmp_path / "records"))
    monkeypatch.setenv("OBD_CONFIG", str(tmp_path / "none.json"))
    (tmp_path / "none.json").write_text("{}")


@pytest.fixture
def child(tmp_path, env_state):
    sd, st = make_mount(tmp_path)
    c = Child(sd, st, nreads=10)
    yield sd, st, c
    c.stop()


def obd(capsys, *args) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_obd_stats_json_shows_the_handlers_counters(child, capsys):
    sd, st, c = child
    rc, out, err = obd(capsys, "stats", st.mountpoint, "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["mount_id"] == st.id and doc["mountpoint"] == st.mountpoint and doc["image"] == st.image
    assert doc["handler_pid"] == c.proc.pid and doc["restarts"] == 2
    assert (doc["device_reads"], doc["device_bytes_read"]) == (10, 40960)
    assert (doc["inflight_reads"], doc["slow_reads"], doc["stuck_reads"], doc["read_errors"]) == (0, 0, 0, 0)
    lat = doc["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"] < 1000
    assert sum(doc["latency_buckets"]["counts"]) == 10
    assert doc["cache"] is None and doc["bytes_fetched"] is None  # a local file: no registry
    assert doc["prefetch"] == {"bytes_prefetched": 8192, "state": "running"}
    assert doc["metrics_address"] is None and doc["device"] == ""
    st.device = "/dev/sdq"  # obd mount records the device once the LUN shows up
    sd.save(st)
    c.read(5)
    rc, out, _ = obd(capsys, "stats", st.mountpoint, "--json")
    doc = json.loads(out)
    assert doc["device_reads"] == 15 and doc["device"] == "/dev/sdq"


def test_obd_stats_table_and_all_mounts(child, capsys):
    sd, st, c = child
    rc, out, _ = obd(capsys, "stats", st.mountpoint)
    assert rc == 0
    assert out.splitlines()[0] == st.mountpoint
    assert "  reads     10 (40.0 KiB), 0 in flight, 0 slow (> 1000 ms), 0 stuck, 0 errors" in out
    assert "p50 " in out and "p99 " in out
    assert "  prefetch  bytes_prefetched 8192, state running" in out
    rc, out, _ = obd(capsys, "stats", "--json")
    assert rc == 0 and [d["device_reads"] for d in json.loads(out)] == [10]


def test_socket_is_root_only_and_removed_when_the_handler_stops(child):
    sd, st, c = child
    path = stats_socket_path(sd.path, st.id)
    mode = os.stat(path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert c.stop() == 0
    assert not os.path.exists(path)
    assert sorted(os.listdir(sd.path)) == [f"{st.id}.json", f"{st.id}.pids"]


def test_not_an_obd_mount_is_a_one_line_error(tmp_path, env_state, capsys):
    rc, out, err = obd(capsys, "stats", str(tmp_path))
    assert rc == StateError.exit_code
    assert err == f"obd: {tmp_path} is not an obd mount\n"


def test_a_mount_not_back_after_a_reboot_suggests_recover(tmp_path, env_state, capsys):
    sd, st = make_mount(tmp_path)
    RecordDir(str(tmp_path / "records")).save(MountRecord.of(st))
    os.unlink(sd.file(st.id))  # /run/obd is empty after a reboot; the record survives
    rc, out, err = obd(capsys, "stats", st.mountpoint)
    assert rc == StateError.exit_code
    assert err == f"obd: {st.mountpoint}: not mounted since the last reboot (run obd recover)\n"


def test_dead_handler_says_so_and_suggests_recover(tmp_path, env_state, capsys):
    sd, st = make_mount(tmp_path)
    sd.write_pids(st.id, 0, 0, 0)
    rc, out, err = obd(capsys, "stats", st.mountpoint)
    assert rc == StateError.exit_code
    assert err == f"obd: {st.mountpoint}: the handler is not running (run obd recover)\n"
    rc, out, err = obd(capsys, "stats", "--json")  # all mounts: reported per mount, not fatal
    assert rc == 0 and json.loads(out)[0]["error"].endswith("the handler is not running (run obd recover)")
    rc, out, err = obd(capsys, "stats")
    assert rc == 0 and out == f"{st.mountpoint}\n  error     {st.mountpoint}: the handler is not running " \
                              f"(run obd recover)\n"


def test_live_handler_without_socket_is_a_one_line_error(tmp_path, env_state, capsys):
    sd, st = make_mount(tmp_path)
    sd.write_pids(st.id, os.getpid(), os.getpid(), 0)  # alive, but serves no stats
    rc, out, err = obd(capsys, "stats", st.mountpoint)
    assert rc == StateError.exit_code
    assert err.count("\n") == 1 and "no stats socket" in err and st.id in err


def test_query_of_something_that_is_not_a_stats_socket(tmp_path):
    import socket
    import threading

    path = str(tmp_path / "x.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def answer():
        conn, _ = srv.accept()
        conn.sendall(b"hello\n")
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    with pytest.raises(StateError, match="not JSON"):
        query(path)
    srv.close()


# -- Prometheus ---------------------------------------------------------------------------------------------
def scrape(address: str) -> dict:
    """``{(name, sample suffix, le or None): value}`` of a scrape, parsed by prometheus_client."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    out, labels = {}, set()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels.add((s.labels["mount_id"], s.labels["mountpoint"]))
            out[(fam.type, s.name, s.labels.get("le"))] = s.value
    assert len(labels) == 1
    return out, labels.pop()


def test_prometheus_endpoint_parses_and_counters_move(tmp_path, env_state):
    sd, st = make_mount(tmp_path)
    c = Child(sd, st, nreads=3, listen="127.0.0.1:0")
    try:
        address = open(metrics_address_path(sd.path, st.id)).read().strip()
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        m, labels = scrape(address)
        assert labels == (st.id, st.mountpoint)
        assert m[("counter", "obd_device_reads_total", None)] == 3
        assert m[("counter", "obd_device_read_bytes_total", None)] == 3 * 4096
        assert m[("gauge", "obd_device_reads_in_flight", None)] == 0
        assert m[("counter", "obd_handler_restarts_total", None)] == 2
        assert m[("histogram", "obd_device_read_duration_seconds_bucket", "+Inf")] == 3
        assert m[("histogram", "obd_device_read_duration_seconds_count", None)] == 3
        assert m[("histogram", "obd_device_read_duration_seconds_bucket", "100.0")] == 3
        assert m[("gauge", "obd_prefetch_bytes_prefetched", None)] == 8192
        c.read(4)
        m, _ = scrape(address)
        assert m[("counter", "obd_device_reads_total", None)] == 7
        assert m[("histogram", "obd_device_read_duration_seconds_count", None)] == 7
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(f"http://{address}/other", timeout=10)
        assert e.value.code == 404
        r = subprocess.run([str(ROOT / ".venv/bin/obd"), "stats", st.mountpoint], capture_output=True,
                           text=True, timeout=60)  # the real console script, in its own process
        assert f"  metrics   http://{address}/metrics" in r.stdout
    finally:
        assert c.stop() == 0
    assert not os.path.exists(metrics_address_path(sd.path, st.id))


def test_metrics_port_in_use_is_a_warning_not_a_dead_handler(tmp_path, env_state):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    sd, st = make_mount(tmp_path)
    c = Child(sd, st, nreads=1, listen=f"127.0.0.1:{port}")
    try:
        doc = query(stats_socket_path(sd.path, st.id))
        assert doc["metrics_address"] is None and doc["device_reads"] == 1
    finally:
        c.stop()
        busy.close()


def test_registry_fetches_and_hit_ratio_come_from_the_block_cache(tmp_path):
    """A store whose blobs go through a real BlockCache: a cold read fetches, a warm one hits."""
    sd, st = make_mount(tmp_path)
    cache = BlockCache(tmp_path / "cache", 64 << 20, block_size=65536)
    blob = CachedSource(FileSource(st.image), cache, key="sha256:" + "ab" * 32)
    store = type("Store", (), {"cache": cache})()
    tel = Telemetry(st, blob, state_dir=sd.path, slow_ms=1000, store=store)
    tel.device.read(65536 + 512, 4096)  # cold: its block is fetched
    tel.device.read(65536, 4096)  # warm: a hit
    tel.device.read(65536 + 8192, 4096)  # a hit
    doc = tel.document()
    assert doc["bytes_fetched"] == 65536 and doc["fetch_requests"] == 1
    assert (doc["cache"]["hits"], doc["cache"]["misses"], doc["cache"]["hit_ratio"]) == (2, 1, 0.6667)
    text = render(doc)
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    assert fams["obd_cache_hits"].samples[0].value == 2
    assert fams["obd_registry_fetched_bytes"].samples[0].value == 65536


def test_prefetch_that_cannot_be_read_does_not_break_stats(tmp_path):
    sd, st = make_mount(tmp_path)
    tel = Telemetry(st, FileSource(st.image), state_dir=sd.path, slow_ms=1000)

    class Broken:
        def stats(self):
            raise RuntimeError("half-built")

    tel.prefetch = Broken()
    assert tel.document()["prefetch"] == {"unreadable": "RuntimeError: half-built"}
    tel.prefetch = None
    assert tel.document()["prefetch"] is None


def test_prefetch_counters_from_a_stats_method_returning_a_dataclass(tmp_path):
    """The prefetcher's shape (``session.stats()`` -> a dataclass of plain fields) in JSON and text."""
    import dataclasses

    @dataclasses.dataclass
    class Counters:
        state: str = "replaying"
        ranges_total: int = 40
        ranges_done: int = 12
        recording: bool = True

    class Session:
        def stats(self):
            return Counters()

    sd, st = make_mount(tmp_path)
    tel = Telemetry(st, FileSource(st.image), state_dir=sd.path, slow_ms=1000)
    tel.prefetch = Session()
    doc = tel.document()
    assert doc["prefetch"] == {"state": "replaying", "ranges_total": 40, "ranges_done": 12, "recording": True}
    samples = {s.name: s for f in text_string_to_metric_families(render(doc)) for s in f.samples}
    assert samples["obd_prefetch_ranges_done"].value == 12
    assert samples["obd_prefetch_recording"].value == 1
    assert samples["obd_prefetch_state"].labels["state"] == "replaying"


def test_a_state_dir_too_deep_for_a_unix_socket_is_one_warning_not_a_crash(tmp_path, caplog):
    sd, st = make_mount(tmp_path)
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    tel = Telemetry(st, FileSource(st.image), state_dir=str(deep), slow_ms=1000)
    tel.start()
    try:
        assert tel.device.read(0, 4096) and tel.document()["device_reads"] == 1
    finally:
        tel.stop()
    [msg] = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert msg.startswith("obd stats unavailable: ") and "path too long" in msg


def test_the_prefetch_session_of_a_mount_shows_under_prefetch(tmp_path):
    """The object run_handler hands over (prefetch.session.PrefetchSession), idle on a raw disk."""
    from tcmu_overlaybd.prefetch.session import PrefetchSession

    sd, st = make_mount(tmp_path)
    tel = Telemetry(st, FileSource(st.image), state_dir=sd.path, slow_ms=1000)
    tel.prefetch = PrefetchSession.start({}, None)
    doc = tel.document()
    assert doc["prefetch"]["state"] == "idle" and doc["prefetch"]["ranges_done"] == 0
    assert "obd_prefetch_ranges_done{" in render(doc)


def _turbo_mount(tmp_path, vectors, **options):
    """A mount state of the upstream-small TurboOCI image (an OCI layout) as run_handler opens it."""
    from .test_turbooci import _turbo_layout

    layout = _turbo_layout(vectors / "upstream-small", tmp_path / "layout")
    sd, st = make_mount(tmp_path)
    st = dataclasses.replace(st, image=f"oci:{layout}:turbo", raw=False, size=0, options={
        "gzip_cache_dir": str(tmp_path / "gzcache"), "cache_dir": str(tmp_path / "blocks"), **options})
    sd.save(st)
    return sd, st


def test_fastoci_mount_shows_its_gzip_cache(tmp_path, vectors):
    """The disk run_handler serves (supervisor.open_source) carries the gzip cache: a file read
    cold refills and inflates, read again it is served from cached pages."""
    from tcmu_overlaybd.ext4.fs import Ext4
    from tcmu_overlaybd.mount.supervisor import open_source

    sd, st = _turbo_mount(tmp_path, vectors)
    source = open_source(st)
    try:
        tel = Telemetry(st, source, state_dir=sd.path, slow_ms=1000, store=source._store)
        fs = Ext4(tel.device)
        big = fs.lookup("data/big.txt")
        data = fs.read(big)
        cold = tel.document()["gzip_cache"]
        assert cold["misses"] >= 1 and cold["refills"] >= 1 and cold["spans_inflated"] >= 1
        assert (cold["refills"] - 1) << 20 < cold["bytes_from_source"] <= cold["refills"] << 20  # a tail unit
        assert cold["layers"] == 2
        assert fs.read(big) == data
        warm = tel.document()["gzip_cache"]
        assert warm["hits"] - cold["hits"] >= 1 and warm["misses"] == cold["misses"]
        assert warm["compressed_bytes"] == cold["compressed_bytes"] and warm["bytes_from_cache"] - cold["bytes_from_cache"] == len(data)
        assert 0 < warm["hit_ratio"] < 1 and warm["hit_ratio"] == round(warm["hits"] / (warm["hits"] + warm["misses"]), 4)
        samples = {s.name: s.value for f in text_string_to_metric_families(render(tel.document())) for s in f.samples}
        assert samples["obd_gzip_cache_hits_total"] == warm["hits"]
        assert samples["obd_gzip_compressed_read_bytes_total"] == warm["compressed_bytes"]
        from tcmu_overlaybd.cli.stats_cmd import render_text

        gz_line = next(ln for ln in render_text(tel.document()).splitlines() if ln.strip().startswith("gzip"))
        assert f"{warm['hits']} hits, {warm['misses']} misses" in gz_line
        assert f"{warm['spans_inflated']} spans inflated" in gz_line
    finally:
        source.close()


def test_gzip_cache_is_null_when_off_or_not_fastoci(tmp_path, vectors):
    from tcmu_overlaybd.mount.supervisor import open_source

    sd, st = _turbo_mount(tmp_path, vectors, gzip_cache_enable=False)
    source = open_source(st)
    try:
        tel = Telemetry(st, source, state_dir=sd.path, slow_ms=1000)
        tel.device.read(0, 4096)
        doc = tel.document()
        assert doc["gzip_cache"] is None and "obd_gzip_cache" not in render(doc)
    finally:
        source.close()
    (tmp_path / "raw").mkdir()
    sd, st = make_mount(tmp_path / "raw")
    assert Telemetry(st, FileSource(st.image), state_dir=sd.path, slow_ms=1000).document()["gzip_cache"] is None
