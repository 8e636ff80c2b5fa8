"""CPU per MB of the FastOCI read path (gzip index + gzip cache) against overlaybd's ZFile LZ4.

The layer is a deterministic gzip'd tar (>= 100 MB uncompressed) of this machine's
own Python and Perl installations (``.py`` sources, byte code, ``.so`` files, ``.pm``
modules: many small files and some large ones), cached with its gzip index
(``build_gzip_index``, 1 MiB spans as ``obd convert --fastoci`` writes) and a ZFile
LZ4 (4 KiB blocks, as ``obd convert --overlaybd`` writes) of the same tar in
``/var/cache/obd-bench/fastoci-read-<key>/`` (``--rebuild`` to redo).

The read pattern is what ext4 issues when a program starts from the mounted image,
expressed in tar offsets (TurboOCI maps a file's blocks onto its data in the tar,
512-byte aligned): a random 40% of the files read front to back in 128 KiB requests
(readahead), interleaved with 4 KiB reads at random 4 KiB blocks of other files.
The same requests are replayed, each phase in a fresh child process (nothing in
memory), over:

* ``fastoci_cold``: ``GzipIndexedSource`` with an empty gzip cache (inflate + refill);
* ``fastoci_warm``: a new ``GzipIndexedSource`` over the gzip cache the cold phase filled;
* ``fastoci_uncached``: ``GzipIndexedSource`` without a gzip cache (inflate only);
* ``zfile``: ``ZFileReader`` over the LZ4 ZFile (overlaybd's format path; no cache to warm).

Each phase runs ``--rounds`` times (a fresh gzip cache per round); the round with
the least CPU counts, which filters out a busy shared machine.

Blobs are local files (``FileSource``): this measures the format path's CPU, not the
network.  Reported per phase: process CPU seconds per MB read, reads/s (wall), and
the ratio of each FastOCI phase's CPU per MB to ZFile's.  ``--profile`` prints each
phase's top cProfile entries.  Writes ``benchmarks/results/fastoci_read.json``.

Usage: .venv/bin/python benchmarks/bench_fastoci_read.py [--rebuild] [--profile] [--phases a,b] [--rounds N]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import pathlib
import platform
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcmu_overlaybd.block.source import FileSource  # noqa: E402
from tcmu_overlaybd.cache.gzipcache import GzipCache  # noqa: E402
from tcmu_overlaybd.format.gzindex import GzipIndex, GzipIndexedSource, build_gzip_index  # noqa: E402
from tcmu_overlaybd.format.zfile import ZFileReader, ZFileWriter  # noqa: E402

BUILDER_VERSION = "1"
CACHE = pathlib.Path("/var/cache/obd-bench")
RESULTS = ROOT / "benchmarks" / "results" / "fastoci_read.json"
DIRS = ("usr/lib/python3.11", "usr/lib/python3", "usr/share/perl", "usr/lib/x86_64-linux-gnu/perl")
MIN_TAR = 100 * 10**6
MTIME = 1_686_355_200
READAHEAD = 128 << 10
BLOCK = 4096
#: share of the files read whole, and 4 KiB random reads per file read whole
FILES_READ = 0.4
RANDOM_PER_FILE = 1
PHASES = ("fastoci_cold", "fastoci_warm", "fastoci_uncached", "zfile")


def _files(dirs: tuple[str, ...]) -> list[str]:
    out = []
    for top in dirs:
        for base, subdirs, names in os.walk("/" + top):
            subdirs.sort()
            out.extend(os.path.join(base, n)[1:] for n in sorted(names))
    return out


def build(workdir: pathlib.Path) -> dict:
    """Write ``layer.tar.gz``, ``gzip.meta``, ``layer.zfile`` and ``files.json`` (data offsets)."""
    workdir.mkdir(parents=True, exist_ok=True)
    tar_path, gz_path = workdir / "layer.tar", workdir / "layer.tar.gz"
    files = []
    with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for rel in _files(DIRS):
            info = tar.gettarinfo("/" + rel, arcname=rel)
            if not info.isfile() or info.size == 0:
                continue
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = MTIME
            with open("/" + rel, "rb") as f:
                tar.addfile(info, f)
            files.append((tar.offset - -(-info.size // 512) * 512, info.size))  # data ends the entry
    tar_size = tar_path.stat().st_size
    if tar_size < MIN_TAR:
        raise SystemExit(f"{DIRS} make only a {tar_size}-byte tar, the benchmark wants {MIN_TAR}")
    with open(tar_path, "rb") as src, open(gz_path, "wb") as raw, \
            gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        shutil.copyfileobj(src, gz, 1 << 20)
    with open(gz_path, "rb") as f:
        (workdir / "gzip.meta").write_bytes(build_gzip_index(f))
    with open(tar_path, "rb") as src, open(workdir / "layer.zfile", "wb") as out:
        with ZFileWriter(out, algorithm="lz4", block_size=4096) as zw:
            while chunk := src.read(1 << 20):
                zw.write(chunk)
    tar_path.unlink()
    meta = {"tar_size": tar_size, "gzip_size": gz_path.stat().st_size,
            "zfile_size": (workdir / "layer.zfile").stat().st_size, "files": files}
    (workdir / "files.json").write_text(json.dumps(meta))
    return meta


def read_pattern(files: list[tuple[int, int]], seed: int = 6) -> list[tuple[int, int]]:
    """(tar offset, length) requests: whole files in 128 KiB requests, 4 KiB reads between."""
    rnd = random.Random(seed)
    chosen = rnd.sample(range(len(files)), int(len(files) * FILES_READ))
    others = [files[i] for i in sorted(set(range(len(files))) - set(chosen))]
    reads = []
    for i in chosen:
        start, size = files[i]
        padded = -(-size // 512) * 512
        reads.extend((start + at, min(READAHEAD, padded - at)) for at in range(0, padded, READAHEAD))
        for _ in range(RANDOM_PER_FILE):
            start, size = rnd.choice(others)
            at = rnd.randrange(-(-size // BLOCK)) * BLOCK
            reads.append((start + at, min(BLOCK, -(-(size - at) // 512) * 512)))
    return reads


def _open(phase: str, workdir: pathlib.Path, cache_dir: pathlib.Path):
    blob = str(workdir / "layer.tar.gz")
    if phase == "zfile":
        return ZFileReader(FileSource(str(workdir / "layer.zfile")))
    index = GzipIndex.from_bytes((workdir / "gzip.meta").read_bytes())
    pool = None if phase == "fastoci_uncached" else GzipCache(cache_dir, capacity_gb=8)
    return GzipIndexedSource(FileSource(blob), index, cache=pool, cache_key="sha256:" + "f" * 64)


def run_phase(phase: str, workdir: pathlib.Path, cache_dir: pathlib.Path, profile: bool) -> dict:
    """One phase in this process: replay the pattern, return its figures."""
    meta = json.loads((workdir / "files.json").read_text())
    reads = read_pattern(meta["files"])
    src = _open(phase, workdir, cache_dir)
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    wall, before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    total = 0
    for off, n in reads:
        total += len(src.read(off, n))
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    cpu = user + system
    out = {"reads": len(reads), "bytes": total, "cpu_s": round(cpu, 3), "system_s": round(system, 3),
           "wall_s": round(wall, 3),
           "cpu_s_per_MB": round(cpu / (total / 1e6), 5), "reads_per_s": round(len(reads) / wall),
           "sha256": None}
    if isinstance(src, GzipIndexedSource):  # decompression amplification: refill units, restarts
        out["inflated_MB"] = round(src.inflate_stats()["bytes_inflated"] / 1e6, 1)
    if prof is not None:
        import io
        import pstats

        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
        out["profile"] = text.getvalue()
    digest = hashlib.sha256()
    # the bytes are checked once, outside the timed loop: every phase must read the same
    for off, n in reads[:: max(1, len(reads) // 2000)]:
        digest.update(src.read(off, n))
    out["sha256"] = digest.hexdigest()
    src.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--profile", action="store_true", help="print each phase's top cProfile entries")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--rounds", type=int, default=3, help="runs of each phase; the least CPU counts (default 3)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--child", nargs=3, metavar=("PHASE", "WORKDIR", "CACHEDIR"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        phase, workdir, cache_dir = args.child
        print(json.dumps(run_phase(phase, pathlib.Path(workdir), pathlib.Path(cache_dir), args.profile)))
        return

    key = hashlib.sha256(f"{BUILDER_VERSION}:{DIRS}".encode()).hexdigest()[:16]
    workdir = CACHE / f"fastoci-read-{key}"
    if args.rebuild and workdir.exists():
        shutil.rmtree(workdir)
    if not (workdir / "files.json").exists():
        t = time.perf_counter()
        print(f"building the layer in {workdir} ...", flush=True)
        shutil.rmtree(workdir, ignore_errors=True)
        build(workdir)
        print(f"  built in {time.perf_counter() - t:.0f} s", flush=True)
    meta = json.loads((workdir / "files.json").read_text())
    phases = [p for p in args.phases.split(",") if p]
    if "fastoci_warm" in phases and "fastoci_cold" not in phases:
        phases.insert(phases.index("fastoci_warm"), "fastoci_cold")  # warm needs the cache cold filled
    results: dict[str, dict] = {}
    for round_ in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="bench-fastoci-read-") as tmp:
            for phase in phases:
                cmd = [sys.executable, __file__, "--child", phase, str(workdir), tmp + "/gzcache"]
                if args.profile:
                    cmd.insert(2, "--profile")
                child = subprocess.run(cmd, check=True, capture_output=True, text=True)
                r = json.loads(child.stdout)
                if phase not in results or r["cpu_s"] < results[phase]["cpu_s"]:
                    results[phase] = r
    digests = {r["sha256"] for r in results.values()}
    if len(digests) != 1:
        raise SystemExit(f"phases read different bytes: {[(p, r['sha256']) for p, r in results.items()]}")
    zfile = results.get("zfile")
    for phase, r in results.items():
        if zfile and phase != "zfile":
            r["cpu_x_zfile"] = round(r["cpu_s_per_MB"] / zfile["cpu_s_per_MB"], 2)
    report = {
        "benchmark": "fastoci_read",
        "layer": {k: meta[k] for k in ("tar_size", "gzip_size", "zfile_size")} | {"files": len(meta["files"])},
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "phases": {p: {k: v for k, v in r.items() if k not in ("profile", "sha256")} for p, r in results.items()},
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    lay = report["layer"]
    print(f"layer: {lay['files']} files, tar {lay['tar_size'] / 1e6:.0f} MB, gzip {lay['gzip_size'] / 1e6:.0f} MB, "
          f"ZFile {lay['zfile_size'] / 1e6:.0f} MB")
    for phase, r in results.items():
        ratio = f" ({r['cpu_x_zfile']}x ZFile)" if "cpu_x_zfile" in r else ""
        if r.get("inflated_MB"):
            ratio += f", {r['inflated_MB']} MB inflated"
        print(f"{phase:17s} {r['reads']} reads, {r['bytes'] / 1e6:.1f} MB: {r['cpu_s_per_MB'] * 1000:.2f} ms CPU/MB"
              f"{ratio} ({r['system_s'] / r['cpu_s']:.0%} in the kernel), {r['reads_per_s']} reads/s")
        if args.profile:
            print(r["profile"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
