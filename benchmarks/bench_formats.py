"""Merged-index lookups and sequential reads of a ZFile-LZ4 layer through the layer stack.

Reported:

* ``index``: for stacks whose merged index holds ~1k and ~1M segments (two layers,
  interleaved), the time to open and merge, bisect lookups/s on the merged index,
  and random 4 KiB ``read()``s/s through the stack;
* ``sequential``: a tar-wrapped ZFile-LZ4 layer of ``--mib`` MiB of mixed content,
  read front to back through ``open_layer_blob`` + ``StackedDisk`` in 128 KiB and
  1 MiB requests, as MB/s and as a ratio to reading an uncompressed raw file with
  the same content (``FileSource``, same request sizes, measured in the same run,
  page cache warm for both).

Writes ``benchmarks/results/formats.json``.

Usage: .venv/bin/python benchmarks/bench_formats.py [--mib 64] [--lookups 200000]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import platform
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcmu_overlaybd.block.source import BytesSource, FileSource  # noqa: E402
from tcmu_overlaybd.block.stack import StackedDisk  # noqa: E402
from tcmu_overlaybd.format import lsmt, tarwrap, zfile  # noqa: E402
from tcmu_overlaybd.format.layer import open_layer_blob  # noqa: E402

S = lsmt.SECTOR


def _interleaved_layer(count: int, phase: int) -> bytes:
    """A sealed layer of ``count`` 1-sector zeroed segments every 4 sectors from ``phase``.

    Zeroed segments carry no data, so a million of them fit in a 16 MB file;
    the merged index does not care what a segment holds.
    """
    b = lsmt.SealedLayerBuilder(count * 4 * S + 8 * S)
    for k in range(count):
        b.add_zeroed((k * 4 + phase) * S, S)
    out = io.BytesIO()
    b.finish(out)
    return out.getvalue()


def bench_index(segments: int, lookups: int) -> dict:
    # two layers, each holding half the segments; a layer's index is limited to 1M entries
    per_layer = min(segments // 2, lsmt.MAX_RO_INDEX_SIZE - lsmt.INDEX_PAD_ENTRIES)
    blobs = [_interleaved_layer(per_layer, 0), _interleaved_layer(per_layer, 2)]
    t0 = time.perf_counter()
    layers = [lsmt.LsmtFile.open(BytesSource(b, name=f"layer{i}")) for i, b in enumerate(blobs)]
    t1 = time.perf_counter()
    disk = StackedDisk(layers)
    t2 = time.perf_counter()
    rng = random.Random(1)
    span = disk.size // S
    sectors = [rng.randrange(span) for _ in range(lookups)]
    lookup = disk.index.lookup
    t3 = time.perf_counter()
    hits = sum(1 for s in sectors if lookup(s) is not None)
    t4 = time.perf_counter()
    offsets = [rng.randrange(disk.size // 4096) * 4096 for _ in range(lookups // 4)]
    t5 = time.perf_counter()
    for off in offsets:
        disk.read(off, 4096)
    t6 = time.perf_counter()
    return {
        "merged_segments": len(disk.index),
        "open_layers_s": round(t1 - t0, 3),
        "merge_s": round(t2 - t1, 3),
        "lookups_per_s": round(lookups / (t4 - t3)),
        "lookup_hit_ratio": round(hits / lookups, 3),
        "random_4k_reads_per_s": round(len(offsets) / (t6 - t5)),
    }


def _content(mib: int) -> bytes:
    """Mixed content: text-like runs (compress ~3x), random blocks, and zero blocks."""
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(2000)]
    text = b" ".join(rng.choices(words, k=300_000))[: 1 << 20]
    noise = rng.randbytes(1 << 20)
    parts = []
    for k in range(mib):
        parts.append((text, text, noise, bytes(1 << 20))[k % 4] if k % 4 != 1 else text[::-1])
    return b"".join(parts)


def _seq(source, size: int, request: int) -> float:
    t0 = time.perf_counter()
    for pos in range(0, size, request):
        source.read(pos, request)
    return time.perf_counter() - t0


def bench_sequential(mib: int, tmp: pathlib.Path) -> dict:
    data = _content(mib)
    raw_path = tmp / "disk.raw"
    raw_path.write_bytes(data)
    b = lsmt.SealedLayerBuilder(len(data))
    b.add_data(0, data)
    sealed = io.BytesIO()
    b.finish(sealed)
    zbuf = io.BytesIO()
    t0 = time.perf_counter()
    zfile.compress_source(BytesSource(sealed.getvalue()), zbuf, "lz4", 4096)
    compress_s = time.perf_counter() - t0
    blob_path = tmp / "layer.blob"
    with open(blob_path, "wb") as f:
        tarwrap.wrap(io.BytesIO(zbuf.getvalue()), f, len(zbuf.getvalue()))
    result = {"content_mib": mib, "blob_bytes": blob_path.stat().st_size,
              "compress_MBps": round(len(data) / compress_s / 1e6, 1)}
    for request in (128 << 10, 1 << 20):
        raw = FileSource(raw_path)
        _seq(raw, len(data), request)  # warm the page cache
        raw_s = min(_seq(raw, len(data), request) for _ in range(2))
        best = None
        for _ in range(2):
            disk = StackedDisk([open_layer_blob(FileSource(blob_path))])  # fresh block cache
            best = min(best or 1e9, _seq(disk, len(data), request))
        assert disk.read(0, len(data)) == data
        key = f"{request >> 10}k"
        result[key] = {"raw_MBps": round(len(data) / raw_s / 1e6, 1),
                       "stack_zfile_MBps": round(len(data) / best / 1e6, 1),
                       "ratio_to_raw": round(raw_s / best, 3)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=64, help="content size of the sequential-read layer")
    ap.add_argument("--lookups", type=int, default=200_000)
    args = ap.parse_args()
    results = {"python": platform.python_version(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "index": {}}
    for label, segments in (("1k", 1000), ("1M", 1_000_000)):
        results["index"][label] = r = bench_index(segments, args.lookups)
        print(f"index {label:>3}: {r['merged_segments']} merged segments, open {r['open_layers_s']} s, "
              f"merge {r['merge_s']} s, {r['lookups_per_s']:,} lookups/s, "
              f"{r['random_4k_reads_per_s']:,} random 4 KiB reads/s")
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        results["sequential"] = r = bench_sequential(args.mib, pathlib.Path(tmp))
    for key in ("128k", "1024k"):
        x = r[key]
        print(f"sequential {key} reads: raw {x['raw_MBps']} MB/s, ZFile-LZ4 via stack "
              f"{x['stack_zfile_MBps']} MB/s, ratio {x['ratio_to_raw']}")
    out = ROOT / "benchmarks" / "results" / "formats.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
