"""Random 4 KiB reads into a gzip layer through its index: cold, sequential, and via the gzip cache.

Baseline (measured in the same run): plain gunzip of the whole layer, in MB/s of
uncompressed output.  Reported per layer:

* ``build_index``: ``build_gzip_index`` throughput (one inflate pass + window deflates);
* ``random_cold``: random 4 KiB reads, no cache (each restarts at a checkpoint);
* ``sequential``: consecutive 4 KiB reads, no cache (parked inflaters continue);
* ``random_cache_fill`` / ``random_cache_warm``: the same random reads through the
  gzip cache, first pass (refills) and second pass (pages from disk);
* ``decoders``: cold 1 MiB reads (the gzip cache's refill unit, each from its checkpoint)
  with each raw deflate decoder this machine has (``format.inflate``: zlib, ISA-L): MB/s
  inflated per CPU second, the ratio to zlib, and the compressed bytes each read;
* ``latency``: the layer behind a real block cache (256 KiB blocks, 4 parallel
  fetches) over a blob with ``--latency-ms`` injected per request: for a cold 4 KiB
  read in the middle of a span, a cold 1 MiB gzip-cache refill unit, and 64
  sequential 4 KiB reads from a cold span, the serial round trips (the longest
  chain of requests that waited for each other), requests, bytes fetched and
  milliseconds.

Throughputs are bytes handed to the caller per second; ``x_gunzip`` is the ratio
to the gunzip baseline.  Writes ``benchmarks/results/gzindex.json``.

Usage: .venv/bin/python benchmarks/bench_gzindex.py [--reads N] [--synthetic-mib M] [--latency-ms L]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
import threading
import time
import zlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcmu_overlaybd.block.source import FileSource  # noqa: E402
from tcmu_overlaybd.cache.blockcache import BlockCache, CachedSource  # noqa: E402
from tcmu_overlaybd.cache.gzipcache import GzipCache  # noqa: E402
from tcmu_overlaybd.format.gzindex import GzipIndex, GzipIndexedSource, build_gzip_index  # noqa: E402
from tcmu_overlaybd.format import inflate  # noqa: E402

VECTOR_LAYER0 = "upstream-small/original/blobs/sha256/571e1a65fc028b27eef187aacb31f98c45aaec82a8f24b0e9bce1f658d7d94c1"
READ = 4096


def _synthetic_layer(path: pathlib.Path, mib: int) -> None:
    """A tar-like gzip stream: text-ish files (compress ~3x) with some random blobs."""
    rnd = random.Random(42)
    words = [bytes(rnd.choices(b"abcdefghijklmnopqrstuvwxyz_ ", k=rnd.randint(3, 10))) for _ in range(4000)]
    comp = zlib.compressobj(6, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        written = 0
        while written < mib << 20:
            if rnd.random() < 0.1:
                chunk = rnd.randbytes(64 << 10)
            else:
                chunk = b" ".join(rnd.choices(words, k=12000))[: 256 << 10]
            f.write(comp.compress(chunk))
            written += len(chunk)
        f.write(comp.flush())


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e6 if seconds > 0 else float("inf")


class _LatencySource:
    """A blob file with ``latency`` seconds per read; records each read's (start, end, bytes)."""

    def __init__(self, path: pathlib.Path, latency: float):
        self.base = FileSource(path)
        self.name, self.size = self.base.name, self.base.size
        self.latency = latency
        self.reads: list[tuple[float, float, int]] = []
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        t0 = time.monotonic()
        time.sleep(self.latency)
        data = self.base.read(offset, length)
        with self._lock:
            self.reads.append((t0, time.monotonic(), len(data)))
        return data

    def round_trips(self) -> int:
        """The longest chain of reads each started after the previous one ended."""
        chain, end = 0, float("-inf")
        for t0, t1, _ in sorted(self.reads, key=lambda r: r[1]):
            if t0 >= end:
                chain, end = chain + 1, t1
        return chain

    def close(self) -> None:
        self.base.close()


def bench_latency(blob_path: pathlib.Path, index: GzipIndex, workdir: pathlib.Path, latency_ms: float) -> dict:
    """Cold reads over an injected-latency blob behind a real block cache (see the module doc)."""
    cps = index.checkpoints
    # the longest span (the one upstream-small's layer 0 has in the middle is typical)
    k = max(range(len(cps)), key=lambda i: (cps[i + 1].de_pos if i + 1 < len(cps) else index.uncompressed_size)
            - cps[i].de_pos)
    span_end = cps[k + 1].de_pos if k + 1 < len(cps) else index.uncompressed_size
    mid = (cps[k].de_pos + span_end) // 2
    unit = -(-cps[k].de_pos // (1 << 20)) << 20  # the refill unit that starts in span k
    cases = {
        "cold_4k_mid_span": [(mid, READ)],
        "cold_refill_unit_1MiB": [(unit, 1 << 20)],
        "sequential_64x4k_from_span_start": [(cps[k].de_pos + i * READ, READ) for i in range(64)],
    }
    out = {"latency_ms": latency_ms}
    for case, reads in cases.items():
        slow = _LatencySource(blob_path, latency_ms / 1000)
        cache = BlockCache(workdir / f"blocks-{case}", 1 << 30)
        src = GzipIndexedSource(CachedSource(slow, cache, key="sha256:" + "1" * 64, parallel=4), index)
        t0 = time.perf_counter()
        for off, n in reads:
            src.read(off, n)
        out[case] = {"round_trips": slow.round_trips(), "requests": len(slow.reads),
                     "bytes_fetched": sum(r[2] for r in slow.reads),
                     "ms": round((time.perf_counter() - t0) * 1000, 1)}
        src.close()
    return out


def bench_decoders(blob_path: pathlib.Path, index: GzipIndex, plain_size: int, reads: int) -> dict:
    """Cold 1 MiB reads (fresh inflaters at their checkpoints) with each decoder available here."""
    unit = 1 << 20
    rnd = random.Random(11)
    offsets = [rnd.randrange(0, max(1, plain_size - unit)) for _ in range(max(8, reads // 8))]
    out, saved = {}, inflate._DECODER
    try:
        for dec in inflate.available_decoders():
            inflate._DECODER = dec
            src = GzipIndexedSource(FileSource(blob_path), index)
            t0 = time.process_time()
            for off in offsets:
                src._parked.clear()  # every read restarts at its checkpoint, as a cold refill does
                src.read(off, unit)
            cpu = time.process_time() - t0
            stats = src.inflate_stats()
            src.close()
            out[dec.name] = {"inflated_MBps_cpu": round(stats["bytes_inflated"] / cpu / 1e6, 1),
                             "compressed_bytes_read": stats["compressed_bytes"], "reads": len(offsets)}
    finally:
        inflate._DECODER = saved
    for r in out.values():
        r["x_zlib"] = round(r["inflated_MBps_cpu"] / out["zlib"]["inflated_MBps_cpu"], 2)
    return out


def bench_layer(name: str, blob_path: pathlib.Path, reads: int, workdir: pathlib.Path, latency_ms: float) -> dict:
    blob = blob_path.read_bytes()
    t = time.perf_counter()
    plain_size = len(zlib.decompress(blob, 47))
    gunzip = _rate(plain_size, time.perf_counter() - t)

    t = time.perf_counter()
    meta = build_gzip_index(FileSource(blob_path))
    build = _rate(plain_size, time.perf_counter() - t)
    index = GzipIndex.from_bytes(meta)

    rnd = random.Random(7)
    offsets = [rnd.randrange(0, plain_size - READ) for _ in range(reads)]
    results = {"compressed_bytes": len(blob), "uncompressed_bytes": plain_size,
               "checkpoints": len(index.checkpoints), "reads": reads}

    def timed(src, offs) -> float:
        t0 = time.perf_counter()
        for off in offs:
            src.read(off, READ)
        return _rate(len(offs) * READ, time.perf_counter() - t0)

    results["gunzip_MBps"] = round(gunzip, 1)
    results["build_index_MBps"] = round(build, 1)
    cold = GzipIndexedSource(FileSource(blob_path), index)
    results["random_cold_MBps"] = round(timed(cold, offsets), 2)
    seq_start = plain_size // 3
    seq = GzipIndexedSource(FileSource(blob_path), index)
    results["sequential_MBps"] = round(timed(seq, [seq_start + i * READ for i in range(reads)]), 1)
    pool = GzipCache(workdir / f"cache-{name}")
    cached = GzipIndexedSource(FileSource(blob_path, name="sha256:" + "0" * 64), index, cache=pool)
    results["random_cache_fill_MBps"] = round(timed(cached, offsets), 2)
    results["random_cache_warm_MBps"] = round(timed(cached, offsets), 1)
    for key in ("random_cold", "sequential", "random_cache_fill", "random_cache_warm", "build_index"):
        results[f"{key}_x_gunzip"] = round(results[f"{key}_MBps"] / gunzip, 3)
    for src in (cold, seq, cached):
        src.close()
    results["decoders"] = bench_decoders(blob_path, index, plain_size, reads)
    results["latency"] = bench_latency(blob_path, index, workdir, latency_ms)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reads", type=int, default=400)
    ap.add_argument("--synthetic-mib", type=int, default=64)
    ap.add_argument("--latency-ms", type=float, default=20.0, help="injected per request (default 20)")
    ap.add_argument("--vectors", default=os.environ.get("OBD_SHARED", str(ROOT.parent / "shared")) + "/spec/vectors")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gzindex.json"))
    args = ap.parse_args()

    layers = {}
    with tempfile.TemporaryDirectory(prefix="bench-gzindex-") as tmp:
        work = pathlib.Path(tmp)
        vector = pathlib.Path(args.vectors) / VECTOR_LAYER0
        if vector.exists():
            layers["upstream_small_layer0"] = bench_layer("vector", vector, args.reads, work, args.latency_ms)
        synth = work / "synthetic.tar.gz"
        _synthetic_layer(synth, args.synthetic_mib)
        layers[f"synthetic_{args.synthetic_mib}MiB"] = bench_layer("synthetic", synth, args.reads, work,
                                                                   args.latency_ms)

    report = {
        "benchmark": "gzindex",
        "read_size": READ,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()},
        "layers": layers,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in layers.items():
        print(f"{name}: gunzip {r['gunzip_MBps']} MB/s | index build {r['build_index_MBps']} MB/s | "
              f"random 4K cold {r['random_cold_MBps']} MB/s ({r['random_cold_x_gunzip']}x) | "
              f"sequential {r['sequential_MBps']} MB/s | cache fill {r['random_cache_fill_MBps']} MB/s | "
              f"cache warm {r['random_cache_warm_MBps']} MB/s ({r['random_cache_warm_x_gunzip']}x)")
        print("  cold 1 MiB reads by decoder: " + " | ".join(
            f"{n} {v['inflated_MBps_cpu']} MB/s per CPU s ({v['x_zlib']}x zlib), {v['compressed_bytes_read']} B read"
            for n, v in r["decoders"].items()))
        lat = r["latency"]
        print(f"  {lat['latency_ms']} ms per request: " + " | ".join(
            f"{case} {v['round_trips']} round trips, {v['requests']} requests, {v['bytes_fetched']} B, {v['ms']} ms"
            for case, v in lat.items() if case != "latency_ms"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
