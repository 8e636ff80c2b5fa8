"""Prefetch against a real registry: trace record → replay, prefetch lists, errors, rate cap, priority.

The image is upstream's two-layer native overlaybd commit of the small tree
(vectors/upstream-small), published to Debian's docker-registry and read
through the counting proxy, so "no request" means the proxy saw no blob GET.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import stat
import threading
import time

import pytest

from tcmu_overlaybd.block.source import BytesSource, CountingSource
from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource, shared_cache
from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.convert.publish import publish
from tcmu_overlaybd.errors import CorruptDataError
from tcmu_overlaybd.ext4.fs import Ext4
from tcmu_overlaybd.format.zfile import ZFileReader, ZFileWriter
from tcmu_overlaybd.format.trace import OP_READ, TraceRecord, decode_trace, encode_trace
from tcmu_overlaybd.image.disk import ImageDisk, open_disk
from tcmu_overlaybd.image.manifest import REF_NAME
from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image
from tcmu_overlaybd.prefetch import record
from tcmu_overlaybd.prefetch.background import BackgroundDownload
from tcmu_overlaybd.prefetch.replay import IN_FLIGHT_MAX, WARM_PIECE_MAX, Piece, Replayer, list_pieces, trace_pieces
from tcmu_overlaybd.prefetch.session import STOP_WAIT_S, PrefetchSession, PrefetchStats, configure

from .helpers.layouts import native_layout, turbo_layout
from .helpers.registry import needs_registry, plain_registry, proxied_registry  # noqa: F401 - fixtures



def registry_test(fn):
    """A test that starts Debian's docker-registry (skipped without it)."""
    return pytest.mark.registry(needs_registry(fn))

SMALL = "upstream-small"
WORKLOAD = ["/data/a/f004.txt", "/data/a/f008.txt", "/data/big.txt"]


def _tree(vectors) -> dict[str, str]:
    out = {}
    for line in (vectors / SMALL / "tree.txt").read_text().splitlines():
        kind, path, *rest = line.split()
        if kind == "file":
            out[path[1:]] = rest[1]
    return out


@pytest.fixture
def small_image(proxied_registry, vectors, tmp_path):
    """The small two-layer image at ``<proxy>/small:obd``; yields (reference, proxy)."""
    registry, proxy = proxied_registry
    commits = [vectors / SMALL / "overlaybd" / f"layer{i}.commit" for i in (0, 1)]
    layout = native_layout(tmp_path / "layout", commits, "obd")
    [desc] = [d for d in OciLayoutStore(layout).entries if d.annotations.get(REF_NAME) == "obd"]
    publish(str(layout), desc, f"{registry.host}/small:obd", OpenOptions(plain_http=True, quiet=True))
    return f"{proxy.host}/small:obd", proxy


def _open(ref: str, cache_dir: pathlib.Path, **kw) -> tuple[ImageDisk, OpenOptions]:
    opts = OpenOptions(plain_http=True, quiet=True, cache_dir=str(cache_dir), **kw)
    image = open_image(ref, opts)
    return open_disk(image, opts), opts


def _blob_gets(proxy) -> list:
    return [r for r in proxy.log.requests if r[0] == "GET" and "/blobs/" in r[1]]


def _wait(session: PrefetchSession, timeout: float = 30.0) -> PrefetchStats:
    deadline = time.monotonic() + timeout
    while session.stats.state not in ("done", "failed", "stopped", "idle") and time.monotonic() < deadline:
        time.sleep(0.02)
    return session.stats


def _read_files(disk, paths) -> dict[str, str]:
    fs = Ext4(disk)
    return {p: hashlib.sha256(fs.read(fs.lookup(p))).hexdigest() for p in paths}


def _record(ref, cache_dir, trace) -> PrefetchSession:
    record.create_spool(str(trace))
    disk, opts = _open(ref, cache_dir, record_trace=str(trace))
    session = PrefetchSession.start(dataclasses.asdict(opts), disk)
    assert session.recorder is not None and session.stats.recording
    return disk, session


@registry_test
def test_recorded_trace_replayed_makes_the_workload_read_nothing_from_the_registry(small_image, vectors,
                                                                                  tmp_path, monkeypatch):
    ref, proxy = small_image
    tree = _tree(vectors)
    cache_dir = tmp_path / "cache"
    trace = tmp_path / "app.trace"
    disk, session = _record(ref, cache_dir, trace)
    assert _read_files(disk, WORKLOAD) == {p: tree[p] for p in WORKLOAD}
    session.stop()
    disk.close()
    assert not os.path.exists(record.spool_path(str(trace)))
    assert stat.S_IMODE(os.stat(trace).st_mode) == 0o600
    records = decode_trace(trace.read_bytes(), str(trace))
    assert records and {r.layer_index for r in records} <= {0, 1} and all(r.op == OP_READ for r in records)
    assert len(records) < session.stats.trace_reads  # adjacent reads merged

    shared_cache(str(cache_dir), None).clear()  # a cold cache, as on another host
    decompressed = []  # the layers are ZFile (LZ4): which blocks get decompressed, when
    real = ZFileReader._decompress
    monkeypatch.setattr(ZFileReader, "_decompress",
                        lambda self, n, stored: decompressed.append(n) or real(self, n, stored))
    disk, opts = _open(ref, cache_dir, prefetch_file=str(trace))
    decompressed.clear()  # opening reads the LSMT index through ZFile
    proxy.reset_counters()
    session = PrefetchSession.start(dataclasses.asdict(opts), disk)
    stats = _wait(session)
    assert (stats.state, stats.ranges_failed) == ("done", 0)
    assert 0 < stats.ranges_done == stats.ranges_total <= len(records)  # neighbours merged
    assert stats.source == f"trace {trace}"
    assert _blob_gets(proxy) and decompressed == []  # compressed blocks fetched, none decoded twice
    proxy.reset_counters()
    assert _read_files(disk, WORKLOAD) == {p: tree[p] for p in WORKLOAD}
    assert _blob_gets(proxy) == []  # every block the workload reads was prefetched
    assert decompressed  # ... and decompressed once, by the workload's reads
    session.stop()
    disk.close()


@registry_test
def test_fastoci_trace_replay_fetches_meta_and_original_ranges_and_fills_the_gzip_cache(
        proxied_registry, vectors, tmp_path):
    """A TurboOCI layer is recorded in its own view of the disk; replaying it on cold block and
    gzip caches fetches what the workload needs from the meta and the original gzip blobs."""
    registry, proxy = proxied_registry
    metas = [vectors / SMALL / "turbooci" / f"layer{i}" / "turboOCIv1.tar.gz" for i in (0, 1)]
    layout = turbo_layout(tmp_path / "layout", vectors / SMALL / "original", metas, "small", "turbo")
    [desc] = [d for d in OciLayoutStore(layout).entries if d.annotations.get(REF_NAME) == "turbo"]
    publish(str(layout), desc, f"{registry.host}/small:turbo", OpenOptions(plain_http=True, quiet=True))
    ref, tree = f"{proxy.host}/small:turbo", _tree(vectors)
    trace = tmp_path / "t"
    record.create_spool(str(trace))
    disk, opts = _open(ref, tmp_path / "c1", record_trace=str(trace), gzip_cache_dir=str(tmp_path / "gz1"))
    session = PrefetchSession.start(dataclasses.asdict(opts), disk)
    assert _read_files(disk, WORKLOAD) == {p: tree[p] for p in WORKLOAD}
    session.stop()
    disk.close()
    assert {r.layer_index for r in decode_trace(trace.read_bytes())} <= {0, 1}

    disk, opts = _open(ref, tmp_path / "c2", prefetch_file=str(trace), gzip_cache_dir=str(tmp_path / "gz2"))
    assert all(getattr(layer, "warp", False) for layer in disk.data_layers)
    session = PrefetchSession.start(dataclasses.asdict(opts), disk)
    assert _wait(session).state == "done" and session.stats.ranges_failed == 0
    assert any(os.scandir(tmp_path / "gz2"))  # inflated data landed in the gzip cache
    proxy.reset_counters()
    assert _read_files(disk, WORKLOAD) == {p: tree[p] for p in WORKLOAD}
    assert _blob_gets(proxy) == []
    session.stop()
    disk.close()


@registry_test
def test_prefetch_list_fetches_exactly_the_listed_files_extents(small_image, vectors, tmp_path):
    ref, proxy = small_image
    listing = tmp_path / "list"
    listing.write_text("/data/a/f004.txt\n  /data/b/  \nnot a path!\n/no/such/file\n")
    disk, opts = _open(ref, tmp_path / "cache", prefetch_file=str(listing), prefetch_list=True)
    fs = Ext4(disk)
    wanted = []
    for path in ("/data/a/f004.txt", "/data/b/new.txt"):
        wanted += [(phys, n) for _l, phys, n in fs.file_extents(fs.lookup(path))]
    pieces = list_pieces(disk, ["/data/a/f004.txt", "/data/b/", "/no/such/file"], "list")
    assert [(p.offset, p.length) for p in pieces] == wanted and all(p.length <= 1 << 20 for p in pieces)

    session = PrefetchSession.start(dataclasses.asdict(opts), disk)
    stats = _wait(session)
    assert (stats.state, stats.ranges_done, stats.bytes_prefetched) == ("done", len(wanted),
                                                                       sum(n for _o, n in wanted))
    proxy.reset_counters()
    tree = _tree(vectors)
    assert _read_files(disk, ["/data/a/f004.txt", "/data/b/new.txt"]) == {
        p: tree[p] for p in ("/data/a/f004.txt", "/data/b/new.txt")}
    assert _blob_gets(proxy) == []
    session.stop()
    disk.close()


@registry_test
def test_trace_push_stores_the_list_with_the_image_and_mounts_replay_it(small_image, tmp_path, capfd):
    import io
    import tarfile

    ref, proxy = small_image
    listing = tmp_path / "list"
    listing.write_text("/data/a/f008.txt\n")
    flags = ["--plain-http", "-q", "--cache-dir", str(tmp_path / "cache")]
    assert main(["trace", "push", ref, str(listing), "--to", ref.replace(":obd", ":obd-traced"), *flags]) == 0
    assert capfd.readouterr()[0].startswith(ref.replace(":obd", ":obd-traced").split("/")[0])
    disk, opts = _open(ref.replace(":obd", ":obd-traced"), tmp_path / "cache")
    top = disk.image.manifest["layers"][-1]
    assert top["mediaType"] == "application/vnd.oci.image.layer.v1.tar"
    assert top["annotations"]["containerd.io/snapshot/overlaybd/acceleration-layer"] == "yes"
    assert disk.image.config["rootfs"]["diff_ids"][-1] == top["digest"]
    assert disk.image.config["history"][-1]["created_by"] == "Acceleration Layer"
    blob = disk.image.store.fetch_blob(top["digest"], top["size"])
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        [member] = tar.getmembers()
        assert (member.name, member.mode, tar.extractfile(member).read()) == ("trace", 0o444, listing.read_bytes())
    assert len(disk.data_layers) == 2  # the trace layer is no disk layer
    session = PrefetchSession.start(dataclasses.asdict(opts), disk)  # no --prefetch: the image's own list
    stats = _wait(session)
    assert (stats.state, stats.source) == ("done", f"list acceleration layer {top['digest']}")
    proxy.reset_counters()
    assert _read_files(disk, ["/data/a/f008.txt"])
    assert _blob_gets(proxy) == []
    session.stop()
    disk.close()


def test_trace_show_prints_records_and_paths(tmp_path, capfd):
    trace = tmp_path / "t"
    trace.write_bytes(encode_trace([TraceRecord(OP_READ, 1, 8192, 4096)]))
    assert main(["trace", "show", str(trace)]) == 0
    assert capfd.readouterr()[0].splitlines() == ["trace: 1 records, 8192 bytes, layers [1]",
                                                  "R   1           4096       8192"]
    listing = tmp_path / "l"
    listing.write_text("/usr/bin/\n")
    assert main(["trace", "show", str(listing)]) == 0
    assert capfd.readouterr()[0].splitlines() == ["prefetch list: 1 paths", "/usr/bin/"]


def test_corrupt_or_empty_prefetch_files_are_one_line_errors_naming_the_file(tmp_path, capfd):
    good = encode_trace([TraceRecord(OP_READ, 0, 4096, 0)])
    bad_crc = good[:-1] + bytes([good[-1] ^ 1])
    cases = {"crc.trace": (bad_crc, "checksum"), "short.trace": (good[:30], "data_size"),
             "empty": (b"", "empty"), "junk.list": (b"\x00\xff" * 10, "no path"),
             "big.list": (b"a" * (64 * 1024 + 1), "too large")}
    for name, (data, why) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        rc = main(["mount", "--prefetch", str(path), "registry.invalid/x:y", str(tmp_path)])
        _out, err = capfd.readouterr()
        assert rc == CorruptDataError.exit_code and err.count("\n") == 1, err
        assert err.startswith("obd: ") and str(path) in err and why in err, err
    rc = main(["mount", "--prefetch", str(tmp_path / "crc.trace"), "--prefetch-list", str(tmp_path / "empty"),
               "registry.invalid/x:y", str(tmp_path)])
    assert rc != 0 and "exclusive" in capfd.readouterr()[1]


def test_record_trace_flag_creates_a_private_spool_and_rejects_bad_places(tmp_path):
    opts = OpenOptions()
    configure(opts, record_trace=str(tmp_path / "t"), prefetch=None, prefetch_list=None, background=None,
              raw=False)
    assert opts.record_trace == str(tmp_path / "t")
    assert stat.S_IMODE(os.stat(record.spool_path(opts.record_trace)).st_mode) == 0o600
    with pytest.raises(Exception, match="does not exist"):
        configure(OpenOptions(), record_trace=str(tmp_path / "nodir" / "t"), prefetch=None, prefetch_list=None,
                  background=None, raw=False)


def test_spool_survives_a_killed_recorder_and_merges_into_one_trace(tmp_path):
    trace = str(tmp_path / "t")
    record.create_spool(trace)
    first = record.TraceRecorder(trace)
    assert first.start()
    for off in range(0, 64 * 4096, 4096):  # a streaming read: one record
        first.note(0, off, 4096)
    first.note(1, 1 << 30, 8192)
    first.flush()
    first.active = False  # killed: no finish, the spool stays
    second = record.TraceRecorder(trace)  # the restarted handler appends to the same spool
    assert second.start()
    second.note(0, 64 * 4096, 4096)  # continues the first record
    second.note(2, 0, 512)
    assert second.finish() == 3
    assert decode_trace(open(trace, "rb").read()) == [
        TraceRecord(OP_READ, 0, 65 * 4096, 0), TraceRecord(OP_READ, 1, 8192, 1 << 30),
        TraceRecord(OP_READ, 2, 512, 0)]
    assert not record.TraceRecorder(trace).start()  # finished: a later handler records nothing


# ---- background download ------------------------------------------------------------------------

BS = 64 * 1024


def _blob_source(tmp_path, size: int, seed: int = 1):
    data = os.urandom(size)
    base = CountingSource(BytesSource(data, name="blob"))
    return data, base, CachedSource(base, BlockCache(tmp_path / "c", 64 << 20, BS), "sha256:" + "d" * 64,
                                    parallel=1)


def test_background_download_holds_the_rate_cap_and_skips_cached_blocks(tmp_path):
    data, base, blob = _blob_source(tmp_path, 40 * BS)
    blob.read(5 * BS, 1)  # block 5 already cached
    blob.read(30 * BS, 3 * BS)  # blocks 30-32 too
    base.bytes_read = 0
    stats = PrefetchStats()
    rate = 1_000_000  # 1 MB/s: 36 blocks of 64 KiB take ~2.4 s
    t0 = time.monotonic()
    BackgroundDownload([blob], rate, stats, threading.Event()).run()
    wall = time.monotonic() - t0
    assert stats.background_state == "done" and base.bytes_read == stats.background_bytes == 36 * BS
    assert stats.background_skipped == 4 * BS
    achieved = base.bytes_read / wall
    assert achieved <= 1.1 * rate, achieved  # the cap holds (a loaded host may only be slower)
    assert all(blob.is_cached(i) for i in range(40))


def test_background_download_waits_while_recording_and_stops_at_once(tmp_path):
    _data, base, blob = _blob_source(tmp_path, 8 * BS)
    stats, stop = PrefetchStats(), threading.Event()
    recording = threading.Event()
    recording.set()
    dl = BackgroundDownload([blob], 1e9, stats, stop, recording=recording.is_set)
    t = threading.Thread(target=dl.run)
    t.start()
    time.sleep(0.3)
    assert stats.background_state == "suppressed" and base.bytes_read == 0
    stop.set()
    t.join(2)
    assert not t.is_alive() and stats.background_state == "stopped" and base.bytes_read == 0


# ---- device reads keep priority -----------------------------------------------------------------

class _Gate:
    """A blob whose reads block until ``release`` (a device read stuck on a slow registry)."""

    def __init__(self, size: int):
        self.name, self.size = "gate", size
        self.release = threading.Event()

    def read(self, offset: int, length: int) -> bytes:
        self.release.wait(10)
        return bytes(length)

    def close(self) -> None:
        pass


def test_replay_runs_on_a_quarter_of_its_lanes_while_a_device_read_waits_then_on_all(tmp_path):
    gate = _Gate(4 * BS)
    device = CachedSource(gate, BlockCache(tmp_path / "g", 64 << 20, BS), "sha256:" + "e" * 64)
    reader = threading.Thread(target=device.read, args=(0, 4096))
    reader.start()
    time.sleep(0.1)  # the device read is now waiting for the registry

    def slow(off, n):
        time.sleep(0.02)
        return bytes(n)

    pieces = [Piece(slow, i, 1) for i in range(200)]
    stats, stop = PrefetchStats(), threading.Event()
    replay = Replayer(pieces, 8, stats, stop).start()
    time.sleep(0.5)
    while_waiting = stats.ranges_done
    gate.release.set()
    reader.join()
    assert replay.join(10) and stats.ranges_done == 200
    # 2 of 8 lanes at ~20 ms per piece: about 50 pieces in 0.5 s, not 8 lanes' 200
    assert 10 <= while_waiting <= 110, while_waiting


def test_replay_holds_at_most_its_in_flight_budget_of_piece_bytes():
    """16 workers on merged 4 MiB pieces would hold 64 MiB of fetched bytes at once (the handler's
    RSS); the replay keeps the bytes of pieces being read under ``IN_FLIGHT_MAX``, and a piece
    larger than the budget still goes, alone."""
    lock, now, peak = threading.Lock(), [0], [0]

    def held(off, n):
        with lock:
            now[0] += n
            peak[0] = max(peak[0], now[0])
        time.sleep(0.01)
        with lock:
            now[0] -= n
        return None

    assert WARM_PIECE_MAX * 16 > IN_FLIGHT_MAX  # the budget, not the number of workers, is the bound
    stats = PrefetchStats()
    assert Replayer([Piece(held, i, WARM_PIECE_MAX) for i in range(40)], 16, stats, threading.Event()).start().join(30)
    assert stats.ranges_done == 40
    assert IN_FLIGHT_MAX // 2 <= peak[0] <= IN_FLIGHT_MAX  # several at once, never more than the budget
    peak[0] = 0
    assert Replayer([Piece(held, 0, 2 * IN_FLIGHT_MAX), Piece(held, 1, 1)], 16, stats, threading.Event()).start().join(30)
    assert stats.ranges_done == 42 and peak[0] == 2 * IN_FLIGHT_MAX  # an oversized piece goes alone


@registry_test
def test_starting_a_replay_never_waits_for_the_registry(small_image, tmp_path):
    """The handler reports ready before the session starts, and the start itself only spawns a
    thread: a slow registry delays the prefetch, never the mount."""
    ref, proxy = small_image
    listing = tmp_path / "list"
    listing.write_text("/data/\n")
    disk, opts = _open(ref, tmp_path / "cache", prefetch_file=str(listing), prefetch_list=True)
    proxy.add_fault("delay:10", "/blobs/", times=1000)
    t0 = time.monotonic()
    session = PrefetchSession.start(dataclasses.asdict(opts), disk)
    # not the 10 s of a fetch; the plan may be ready already (the ext4 metadata it reads can be
    # in the block cache from the open), the replay cannot be (its data fetches wait 10 s)
    assert time.monotonic() - t0 < 5 and session.stats.state in ("planning", "replaying")
    session.stop()  # and stopping does not wait for the slow registry either (at most STOP_WAIT_S)
    assert time.monotonic() - t0 < 5 + STOP_WAIT_S
    disk.close()


@registry_test
def test_a_list_replayed_while_recording_stays_out_of_the_trace(small_image, vectors, tmp_path):
    ref, _proxy = small_image
    listing = tmp_path / "list"
    listing.write_text("/data/\n")
    trace = tmp_path / "t"
    record.create_spool(str(trace))
    disk, opts = _open(ref, tmp_path / "cache", record_trace=str(trace), prefetch_file=str(listing),
                       prefetch_list=True)
    session = PrefetchSession.start(dataclasses.asdict(opts), disk)
    assert _wait(session).state == "done" and session.stats.trace_reads == 0
    assert _read_files(disk, ["/data/a/f004.txt"])  # the workload's own reads are recorded
    assert session.stats.trace_reads > 0
    session.stop()
    disk.close()
    recorded = sum(r.count for r in decode_trace(trace.read_bytes()))
    assert recorded < 1 << 20  # one small file and metadata, not the whole /data (> 3 MiB)


def test_record_trace_stop_writes_the_spool_of_a_mount_whose_handler_is_gone(tmp_path, monkeypatch, capfd):
    from tcmu_overlaybd.mount.state import MountState, StateDir, mount_id

    monkeypatch.setenv("OBD_STATE_DIR", str(tmp_path / "state"))
    os.makedirs(tmp_path / "state")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    trace = str(tmp_path / "t")
    record.create_spool(trace)
    with open(record.spool_path(trace), "ab") as f:  # what a killed handler left behind
        from tcmu_overlaybd.format.trace import RECORD

        f.write(RECORD.pack(OP_READ, 0, 4096, 0) + RECORD.pack(OP_READ, 0, 4096, 4096))
    mid = mount_id(str(mnt))
    StateDir(str(tmp_path / "state")).save(MountState(
        id=mid, mountpoint=str(mnt), image="r/x:y", raw=False, options={"record_trace": trace}, size=0,
        backstore="b", wwn="w", lower="l", upper="u", work="w", own_upper=True))
    assert main(["record-trace", "stop", str(mnt)]) == 0
    assert capfd.readouterr()[0] == f"{trace}: 1 records\n"
    assert decode_trace(open(trace, "rb").read()) == [TraceRecord(OP_READ, 0, 8192, 0)]
    assert main(["record-trace", "stop", str(mnt)]) == 9  # StateError: already finished
    assert "already finished" in capfd.readouterr()[1]


def test_trace_replay_merges_neighbouring_records_into_few_large_fetches_of_no_extra_bytes(tmp_path):
    """A trace of many small reads scattered over a ZFile layer is replayed as few Range GETs (each
    costs the registry and the handler a request), fetching exactly the cache blocks the records'
    compressed blocks lie in, no more; the workload then reads it all from the cache."""
    import io
    import random

    rnd = random.Random(3)
    data = b"".join(rnd.randbytes(1024) + bytes(3072) for _ in range(3000))  # ~12 MB, half compressible
    out = io.BytesIO()
    with ZFileWriter(out, algorithm="lz4", block_size=4096) as w:
        w.write(data)
    bs = 64 << 10
    cache = BlockCache(tmp_path / "cache", 256 << 20, bs)
    base = CountingSource(BytesSource(out.getvalue(), name="layer"))
    blob = CachedSource(base, cache, "sha256:" + "c" * 64, parallel=4)
    zf = ZFileReader(blob)
    layer = type("Layer", (), {"targets": {0: zf}})()
    offsets = sorted(rnd.sample(range(0, len(data) - 8192, 4096), 900))
    records = [TraceRecord(OP_READ, 0, 6000, off) for off in offsets]
    rnd.shuffle(records)  # first-read order is not file order
    pieces = trace_pieces([layer], records, "t")
    assert len(pieces) < len(records) // 20 and all(p.length <= WARM_PIECE_MAX for p in pieces)
    wanted = set()
    for r in records:
        _src, lo, n = zf.warm_map(r.offset, r.count)
        wanted.update(range(lo // bs, (lo + n - 1) // bs + 1))
    missing = [i for i in wanted if not blob.is_cached(i)]  # opening the ZFile read its index
    calls, fetched = base.calls, cache.counters.bytes_fetched
    stats, stop = PrefetchStats(), threading.Event()
    assert Replayer(pieces, 4, stats, stop).start().join(30)
    assert stats.ranges_done == len(pieces) and stats.ranges_failed == 0
    assert base.calls - calls <= len(missing) // 3  # one GET per cache block before the merge
    assert cache.counters.bytes_fetched - fetched == sum(min(bs, base.size - i * bs) for i in missing)
    calls = base.calls
    for r in records:
        assert zf.read(r.offset, r.count) == data[r.offset:r.offset + r.count]
    assert base.calls == calls  # everything the trace names was prefetched
    cache.close_fds()


def test_trace_replay_fetches_small_gaps_to_join_records_into_fewer_requests(tmp_path):
    """Records two cache blocks apart (typical of files imported from one package) cannot merge
    without extra bytes; with ``prefetch.mergeGapKb`` covering the gap the replay fetches the gaps
    too, in a fraction of the Range GETs, and never more than the gap per record."""
    import io
    import random

    rnd = random.Random(5)
    bs = 64 << 10
    data = rnd.randbytes(12 << 20)  # incompressible: compressed offsets follow the plain ones
    out = io.BytesIO()
    with ZFileWriter(out, algorithm="lz4", block_size=4096) as w:
        w.write(data)
    records = [TraceRecord(OP_READ, 0, 4096, off) for off in range(0, len(data) - 4096, 3 * bs)]
    rnd.shuffle(records)
    results = {}
    for gap in (0, 2 * bs):
        cache = BlockCache(tmp_path / f"cache-{gap}", 256 << 20, bs)
        base = CountingSource(BytesSource(out.getvalue(), name="layer"))
        blob = CachedSource(base, cache, "sha256:" + "d" * 64, parallel=4)
        zf = ZFileReader(blob)
        pieces = trace_pieces([type("Layer", (), {"targets": {0: zf}})()], records, "t", merge_gap=gap)
        wanted = set()
        for r in records:
            _src, lo, n = zf.warm_map(r.offset, r.count)
            wanted.update(range(lo // bs, (lo + n - 1) // bs + 1))
        calls, fetched = base.calls, cache.counters.bytes_fetched
        assert Replayer(pieces, 4, PrefetchStats(), threading.Event()).start().join(30)
        results[gap] = (base.calls - calls, cache.counters.bytes_fetched - fetched)
        assert all(blob.is_cached(i) for i in wanted)
        calls = base.calls
        for r in records:
            assert zf.read(r.offset, r.count) == data[r.offset:r.offset + r.count]
        assert base.calls == calls  # everything the trace names was prefetched
        cache.close_fds()
    (gets_before, bytes_before), (gets_after, bytes_after) = results[0], results[2 * bs]
    assert gets_before >= len(records) * 0.9  # nothing touches: about one GET per record
    assert gets_after * 10 <= gets_before
    assert bytes_before < bytes_after <= bytes_before + len(records) * 2 * bs
