"""CPU per device read of an overlaybd image from a registry (issue 6): cold and warm block cache.

A lazy start under QEMU TCG is CPU-bound: every device read the container's
page cache misses runs the handler's read path (merged stack -> LSMT -> ZFile
CRC + LZ4 per 4 KiB block -> tar slice -> block cache -> registry on a miss).
This benchmark measures that path on the host, with real components only:

1. Image: ``bench_convert``'s cached input (three gzip layers of this machine's
   Debian files, ~540 MB) converted once with ``obd convert --overlaybd`` (ZFile
   LZ4, 4 KiB blocks), cached in ``/var/cache/obd-bench/readpath-<key>``.
2. Workload: every regular file under ``--subtree`` (default the Python
   standard library) is read with obd's own ext4 reader over the merged disk of
   the local layout; the disk reads it makes become *device reads* the way the
   kernel would issue them: 4 KiB pages, each read once (page cache), adjacent
   new pages merged and cut at 128 KiB (the default ``read_ahead_kb``).
3. Replay: the image is pushed to Debian's ``docker-registry`` on 127.0.0.1 and
   each phase runs in a fresh process that opens it by reference through a block
   cache directory (``image.resolve.open_image`` + ``image.disk.open_disk``, what
   the handler opens): *cold* (empty cache: every 256 KiB block is fetched once)
   then *warm* (same cache, new process: every read is a cache hit followed by
   ZFile decompression, the state trace prefetch leaves behind; the best of
   ``WARM_PASSES`` replays over freshly opened objects).  Reported per
   phase: CPU seconds per MB served (``time.process_time``: every thread of the
   process, fetch threads included), device reads per second of wall time, and
   the read bytes' SHA-256, checked against the local layout's.

``--baseline REV`` replays with obd as of git revision REV too, interleaved with the
working tree's (each in its own cache and processes), and prints the CPU ratio.
Last, obd's ``Handler`` serves the same reads from the warm cache at queue depth 1
through the test suite's simulated kernel ring (``tests/tcmu_sim.py``; the real
ring needs the VM harness): CPU per READ with every READ handed to a worker
thread, and with cache hits served on the ring thread (``read_cached``).
``--profile`` adds one cProfile'd cold and warm pass each and prints the reading thread's
own time (waits included) by layer of the stack (stack, LSMT, ZFile, LZ4, CRC32C, slice, block
cache, system calls, registry/HTTP, ...).  Writes ``benchmarks/results/readpath.json``.

Usage: .venv/bin/python benchmarks/bench_readpath.py [--subtree PATH] [--baseline REV] [--profile] [--rounds N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: a replay child of ``--baseline`` imports obd from the older revision extracted here
CODE_ENV = "BENCH_READPATH_CODE"
sys.path[:0] = [p for p in (os.environ.get(CODE_ENV), str(ROOT)) if p]

from tcmu_overlaybd.ext4.fs import Ext4  # noqa: E402
from tcmu_overlaybd.image.disk import open_disk  # noqa: E402
from tcmu_overlaybd.image.options import OpenOptions  # noqa: E402
from tcmu_overlaybd.image.resolve import open_image  # noqa: E402

PY = ROOT / ".venv" / "bin" / "python"
OBD = ROOT / ".venv" / "bin" / "obd"
RESULTS = ROOT / "benchmarks" / "results" / "readpath.json"
PAGE = 4096
#: the kernel's default readahead window (``read_ahead_kb`` = 128): the largest device read here
MAX_DEVICE_READ = 128 * 1024
DEFAULT_SUBTREE = "usr/lib/python3.11"
#: a warm phase replays this many times in its process, each over freshly opened objects
WARM_PASSES = 3
TAG = "overlaybd"

#: profile rows: (label, predicate on a pstats key's file and function name), first match wins
_LAYERS = (
    ("stack (block/stack.py)", lambda f, n: f.endswith("block/stack.py")),
    ("LSMT index (format/lsmt.py)", lambda f, n: f.endswith("format/lsmt.py")),
    ("ZFile reader (format/zfile.py)", lambda f, n: f.endswith("format/zfile.py")),
    ("LZ4 decompress (C)", lambda f, n: "lz4" in n),
    ("CRC32C (C)", lambda f, n: "crc32c" in n),
    ("tar slice (block/source.py)", lambda f, n: f.endswith("block/source.py")),
    ("block cache (cache/blockcache.py)", lambda f, n: f.endswith("cache/blockcache.py")),
    # requests also reads the proxy variables (os.environ) and checks typing protocols per request
    ("registry + HTTP (waits included)", lambda f, n: "_socket" in n or "_ssl" in n or any(
        s in f for s in ("image/registry.py", "image/mirrors.py", "requests", "urllib3", "http/", "email/",
                         "socket.py", "ssl.py", "urllib/", "<frozen os>", "typing.py", "_collections_abc"))),
    ("pread", lambda f, n: "posix.pread" in n),
    ("cache inserts: write/rename/flock", lambda f, n: f == "~" and any(
        s in n for s in ("posix.write", "posix.replace", "posix.rename", "posix.unlink", "posix.mkdir", "flock"))),
    ("open/stat/close/utime", lambda f, n: f == "~" and "posix." in n),
    ("locks", lambda f, n: "lock" in n and f == "~"),
    ("threads/futures", lambda f, n: any(s in f for s in ("threading.py", "concurrent/", "queue.py"))),
    ("bytes/memoryview/join (C)", lambda f, n: f == "~" and any(s in n for s in ("bytes", "memoryview", "join"))),
)


def _sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"bench_readpath: {' '.join(cmd)} failed: {r.stderr.strip()[-600:]}")


def build_image(rebuild: bool) -> pathlib.Path:
    """The converted overlaybd layout (cached): ``<dir>`` holding tag ``overlaybd``."""
    from benchmarks.bench_convert import CACHE, TAG as SOURCE_TAG, build_image as build_source

    source, _layers = build_source(rebuild)
    home = CACHE / f"readpath-{source.parent.name.split('-', 1)[1]}"
    done = home / "converted"
    if done.exists() and not rebuild:
        return done
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    started = time.monotonic()
    _sh(str(OBD), "convert", f"oci:{source}:{SOURCE_TAG}", "-q", "--workdir", "/var/tmp",
        "--overlaybd", f"oci:{home / 'converted.part'}:{TAG}")
    os.replace(home / "converted.part", done)
    print(f"converted the input image in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return done


class RecordingDisk:
    """A byte source that logs the (offset, length) of every read of ``base``."""

    def __init__(self, base):
        self.base, self.name, self.size = base, base.name, base.size
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.base.read(offset, length)

    def close(self) -> None:
        self.base.close()


def device_reads(disk_reads: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The reads a kernel would send the device for ``disk_reads``: whole 4 KiB pages, each page
    once (the page cache keeps it), adjacent new pages merged, cut at ``MAX_DEVICE_READ``."""
    seen: set[int] = set()
    out: list[tuple[int, int]] = []
    for offset, length in disk_reads:
        run_start = run_end = -1
        for page in range(offset // PAGE, (offset + length - 1) // PAGE + 1):
            if page in seen:
                continue
            seen.add(page)
            if page == run_end and (run_end - run_start) * PAGE < MAX_DEVICE_READ:
                run_end += 1
                continue
            if run_start >= 0:
                out.append((run_start * PAGE, (run_end - run_start) * PAGE))
            run_start, run_end = page, page + 1
        if run_start >= 0:
            out.append((run_start * PAGE, (run_end - run_start) * PAGE))
    return out


def record(layout: pathlib.Path, subtree: str) -> tuple[list[tuple[int, int]], int, str]:
    """(device reads, files read, SHA-256 of the bytes the reads return) of reading ``subtree``."""
    opts = OpenOptions(quiet=True, discover_accelerated=False)
    disk = open_disk(open_image(f"oci:{layout}:{TAG}", opts), opts)
    rec = RecordingDisk(disk)
    fs = Ext4(rec)
    files = 0
    todo = [fs.lookup(subtree)]
    while todo:
        inode = todo.pop()
        for entry in fs.listdir(inode):
            child = fs.inode(entry.ino)
            if stat.S_ISDIR(child.mode):
                todo.append(child)
            elif stat.S_ISREG(child.mode):
                fs.read(child)
                files += 1
    reads = device_reads(rec.reads)
    digest = hashlib.sha256()
    for offset, length in reads:
        digest.update(disk.read(offset, length))
    disk.close()
    return reads, files, digest.hexdigest()


def extract(rev: str, dest: str) -> str:
    """obd's package as of git revision ``rev``, extracted under ``dest`` (a ``--baseline``)."""
    os.makedirs(dest)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "tcmu_overlaybd"], capture_output=True)
    if archive.returncode:
        sys.exit(f"bench_readpath: git archive {rev}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return dest


def _layer_split(profile) -> list[tuple[str, float]]:
    """Own time (tottime) of the profiled functions, summed per ``_LAYERS`` row."""
    import pstats

    totals: dict[str, float] = {}
    for (file, _line, name), (_cc, _nc, tottime, _ct, _callers) in pstats.Stats(profile).stats.items():
        label = next((lab for lab, match in _LAYERS if match(file, name)), "other")
        totals[label] = totals.get(label, 0.0) + tottime
    return sorted(totals.items(), key=lambda kv: -kv[1])


def replay_child(ref: str, reads_path: str, cache_dir: str, profile: bool, passes: int) -> dict:
    """One phase, in this (fresh) process: open ``ref`` through ``cache_dir``, replay the reads
    ``passes`` times, each over a freshly opened disk (new layer, ZFile and cache objects: only
    the files of the block cache carry over); the pass that used the least CPU is reported."""
    with open(reads_path) as f:
        reads = [tuple(r) for r in json.load(f)]
    opts = OpenOptions(quiet=True, plain_http=True, discover_accelerated=False, cache_dir=cache_dir,
                       device_reads=True)
    t0 = time.perf_counter()
    image = open_image(ref, opts)
    disk = open_disk(image, opts)
    out = {"open_s": time.perf_counter() - t0, "reads": len(reads), "cpu_s": float("inf")}
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    for k in range(passes):
        if k:
            disk = open_disk(image, opts)
        read = disk.read
        wall0, cpu0 = time.perf_counter(), time.process_time()
        total = 0
        for offset, length in reads:
            total += len(read(offset, length))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        if cpu < out["cpu_s"]:
            out.update(cpu_s=cpu, wall_s=wall, bytes=total)
    if prof is not None:
        prof.disable()
        out["profile"] = _layer_split(prof)
    else:  # an untimed last pass: the bytes served must be the local layout's
        digest = hashlib.sha256()
        for offset, length in reads:
            digest.update(read(offset, length))
        out["sha256"] = digest.hexdigest()
    disk.close()
    return out


class _WithoutCachedReads:
    """The disk without ``read_cached``: the handler hands every READ to a worker (as before)."""

    def __init__(self, disk):
        self.name, self.size, self.read = disk.name, disk.size, disk.read

    def close(self) -> None:
        pass


def handler_child(ref: str, reads_path: str, cache_dir: str, rounds: int = 3) -> dict:
    """CPU per READ of obd's ``Handler`` serving the reads (QD1) from a warm cache, through the
    test suite's simulated kernel ring (``tests/tcmu_sim.py``: the same buffer layout, a socket
    pair for the uio fd): cache hits on the ring thread, and every READ through a worker."""
    import struct
    import threading

    from tcmu_overlaybd.tcmu.handler import Handler
    from tcmu_overlaybd.tcmu.scsi import DiskInfo, Target
    from tests.tcmu_sim import SimKernel

    with open(reads_path) as f:
        reads = [tuple(r) for r in json.load(f)]
    opts = OpenOptions(quiet=True, plain_http=True, discover_accelerated=False, cache_dir=cache_dir,
                       device_reads=True)
    disk = open_disk(open_image(ref, opts), opts)
    cdbs = [(struct.pack(">BBIBHB", 0x28, 0, off // 512, 0, n // 512, 0), n) for off, n in reads]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for label, source in (("worker hop", _WithoutCachedReads(disk)), ("ring thread", disk)):
            sim = SimKernel(data_blocks=MAX_DEVICE_READ // 4096)
            h = Handler(sim.handler_fd.fileno(), sim.buf, Target(DiskInfo.for_size(disk.size, "0b0d")), source)
            t = threading.Thread(target=h.serve, daemon=True)
            t.start()
            cpu0 = time.process_time()
            for cdb, n in cdbs:
                cid = sim.submit(cdb, n)
                if sim.wait([cid])[cid][0] != 0:
                    sys.exit(f"bench_readpath: READ through the handler ({label}) failed")
            cpu = time.process_time() - cpu0
            h.stop()
            t.join()
            sim.close()
            best[label] = min(best.get(label, cpu), cpu)
    disk.close()
    return {label: 1e3 * cpu / len(reads) for label, cpu in best.items()}


def run_phase(ref: str, reads_path: str, cache_dir: str, passes: int, profile: bool = False,
              code: str | None = None) -> dict:
    """One phase in a fresh process, with the working tree's obd or the one extracted in ``code``."""
    env = dict(os.environ, **{CODE_ENV: code}) if code else None
    r = subprocess.run([str(PY), __file__, "--child", ref, reads_path, cache_dir, "--passes", str(passes)]
                       + (["--profile"] if profile else []), capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(f"bench_readpath: replay of {ref} failed: {r.stderr.strip()[-800:]}")
    return json.loads(r.stdout.splitlines()[-1])


def summarize(phase: dict) -> dict:
    mb = phase["bytes"] / 1e6
    return {"cpu_s_per_mb": phase["cpu_s"] / mb, "reads_per_s": phase["reads"] / phase["wall_s"],
            "cpu_ms_per_read": 1e3 * phase["cpu_s"] / phase["reads"], "mb_per_s": mb / phase["wall_s"],
            **{k: phase[k] for k in ("cpu_s", "wall_s", "open_s", "bytes", "reads")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subtree", default=DEFAULT_SUBTREE, help="directory of the image whose files are read")
    ap.add_argument("--profile", action="store_true", help="add a cProfile'd cold and warm pass: time by layer")
    ap.add_argument("--rounds", type=int, default=5, help="cold+warm rounds; the best of each is kept")
    ap.add_argument("--baseline", metavar="REV", help="also replay with obd as of git revision REV (interleaved)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached input and converted images")
    ap.add_argument("--child", nargs=3, metavar=("REF", "READS", "CACHE"), help=argparse.SUPPRESS)
    ap.add_argument("--passes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--handler-child", nargs=3, metavar=("REF", "READS", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(replay_child(*args.child, args.profile, args.passes)))
        return 0
    if args.handler_child:
        print(json.dumps(handler_child(*args.handler_child)))
        return 0

    from benchmarks.startup.registry import BenchRegistry

    layout = build_image(args.rebuild)
    reads, files, expect = record(layout, args.subtree)
    total = sum(n for _o, n in reads)
    print(f"workload: {files} files under /{args.subtree}: {len(reads)} device reads, {total / 1e6:.1f} MB "
          f"(mean {total / len(reads) / 1024:.1f} KiB)")
    work = tempfile.mkdtemp(prefix="bench-readpath-", dir="/var/tmp")
    reg = BenchRegistry(os.path.join(work, "registry"))
    try:
        reg.push_layout(f"oci:{layout}:{TAG}", "bench/readpath", TAG)
        ref = f"{reg.host}/bench/readpath:{TAG}"
        reads_path = os.path.join(work, "reads.json")
        with open(reads_path, "w") as f:
            json.dump(reads, f)
        codes = {"current": None}
        if args.baseline:
            codes = {f"baseline {args.baseline}": extract(args.baseline, os.path.join(work, "baseline")),
                     "current": None}
        rows: dict[tuple[str, str], list[dict]] = {}
        for k in range(args.rounds):  # interleaved, so a busy host slows every variant alike
            for v, (label, code) in enumerate(codes.items()):
                cache = os.path.join(work, f"cache-{k}-{v}")
                for name in ("cold", "warm"):
                    got = run_phase(ref, reads_path, cache, WARM_PASSES if name == "warm" else 1, code=code)
                    if got["sha256"] != expect:
                        sys.exit(f"bench_readpath: {name} replay ({label}) read different bytes than the local layout")
                    rows.setdefault((name, label), []).append(summarize(got))
        best = {key: min(runs, key=lambda r: r["cpu_s"]) for key, runs in sorted(rows.items())}
        result = {"host": {"python": platform.python_version(), "cpus": os.cpu_count()},
                  "workload": {"subtree": args.subtree, "files": files, "reads": len(reads), "bytes": total},
                  "phases": {f"{name} ({label})": r for (name, label), r in best.items()}}
        print(f"{'phase':6} {'code':22} {'CPU s/MB':>9} {'CPU ms/read':>12} {'reads/s':>9} {'MB/s':>7} {'wall s':>7}"
              f"   (best CPU of {args.rounds} fresh processes each)")
        for (name, label), r in best.items():
            base = best.get((name, next(iter(codes))))
            ratio = f"  x{r['cpu_s'] / base['cpu_s']:.2f} CPU" if len(codes) > 1 and r is not base else ""
            print(f"{name:6} {label:22} {r['cpu_s_per_mb']:9.4f} {r['cpu_ms_per_read']:12.3f} {r['reads_per_s']:9.0f} "
                  f"{r['mb_per_s']:7.1f} {r['wall_s']:7.2f}{ratio}")
        r = subprocess.run([str(PY), __file__, "--handler-child", ref, reads_path, os.path.join(work, "cache-0-0")],
                           capture_output=True, text=True, cwd=ROOT)
        if r.returncode:
            sys.exit(f"bench_readpath: handler replay failed: {r.stderr.strip()[-800:]}")
        result["handler_cpu_ms_per_read"] = hop = json.loads(r.stdout.splitlines()[-1])
        print(f"handler, warm, QD1 (simulated ring; CPU of handler + simulator): "
              f"{hop['worker hop']:.3f} ms/read with a worker hop per READ, {hop['ring thread']:.3f} ms/read "
              f"with hits served on the ring thread (x{hop['ring thread'] / hop['worker hop']:.2f})")
        if args.profile:
            cache = os.path.join(work, "cache-profile")
            result["profile"] = {}
            for name in ("cold", "warm"):
                got = run_phase(ref, reads_path, cache, 1, profile=True)
                result["profile"][name] = got["profile"]
                own = sum(s for _label, s in got["profile"])
                print(f"profile, {name} (own time of the reading thread by layer, waits included; {own:.2f} s under cProfile):")
                for label, s in got["profile"]:
                    print(f"  {label:36} {s:7.3f} s {100 * s / own:5.1f} %")
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
