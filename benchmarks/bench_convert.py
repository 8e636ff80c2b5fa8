"""``obd convert`` of a multi-layer image of Debian files: time, peak RSS and output size, per mode.

The input image (~600 MB uncompressed, three gzip layers) is built from this
machine's own Debian-installed files with Python's ``tarfile`` + ``gzip``:

=========  ==========================================================================
layer      contents
=========  ==========================================================================
``base``   /usr/share/{doc,man,locale,perl,i18n}  (many small text files)
``python`` /usr/lib/python3, /usr/lib/python3.11  (.py sources, byte code, .so)
``app``    /usr/share/{vim,icons,cmake-3.25}, a replaced file, whiteouts of base files
=========  ==========================================================================

Tars are deterministic (sorted names, uid/gid 0, mtimes clamped, gzip mtime 0)
and cached in ``/var/cache/obd-bench/convert-<key>/layout`` (``--rebuild`` to
redo).  Each mode then runs as its own ``obd convert`` child process from that
``oci:`` layout into a fresh ``oci:`` layout; the child's peak RSS comes from
``os.wait4`` (the largest process of its tree).  Baseline, measured in the same
run: gunzip of every layer (zlib, in this process).

Modes: ``overlaybd``, ``fastoci``, and ``both`` (one run building both, the
source read once).  Reported per mode: wall seconds, ratio to the gunzip
baseline, uncompressed input MB/s, peak RSS MiB, and the output's layer bytes
as % of the input (compressed and uncompressed).  FastOCI's output excludes the original layers it
reads from (they are the unchanged input).  Writes ``benchmarks/results/convert.json``.

Usage: .venv/bin/python benchmarks/bench_convert.py [--rebuild] [--modes overlaybd,fastoci,both]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import hashlib
import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tcmu_overlaybd.image.oci_layout import OciLayoutStore, write_index  # noqa: E402
from tcmu_overlaybd.image.reference import parse_reference  # noqa: E402
from tcmu_overlaybd.image.store import Descriptor, file_digest  # noqa: E402

BUILDER_VERSION = "1"
CACHE = pathlib.Path("/var/cache/obd-bench")
RESULTS = ROOT / "benchmarks" / "results" / "convert.json"
OBD = ROOT / ".venv" / "bin" / "obd"
MTIME = 1_686_355_200  # every entry's mtime, so the tars do not depend on install dates
TAG = "debian-files"
#: (layer name, directories, paths whited out in it, file replaced in it)
LAYERS = (
    ("base", ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/perl", "usr/share/i18n"), (), None),
    ("python", ("usr/lib/python3", "usr/lib/python3.11"), (), None),
    ("app", ("usr/share/vim", "usr/share/icons", "usr/share/cmake-3.25"),
     ("usr/share/doc/apt", "usr/share/man/man1"), "usr/share/perl/5.36/strict.pm"),
)
FORMATS = ("overlaybd", "fastoci")
#: ``both``: one ``obd convert --overlaybd --fastoci`` run, sharing the source
MODES = FORMATS + ("both",)


def _entries(dirs: tuple[str, ...]) -> list[str]:
    """Every path under ``dirs`` (and their parents), sorted, relative to /."""
    out: set[str] = set()
    for top in dirs:
        parts = top.split("/")
        out.update("/".join(parts[: i + 1]) for i in range(len(parts)))
        for base, subdirs, files in os.walk("/" + top):
            subdirs.sort()
            rel = base[1:]
            out.update(f"{rel}/{n}" for n in subdirs + files)
    return sorted(out)


def _add(tar: tarfile.TarFile, rel: str) -> None:
    info = tar.gettarinfo("/" + rel, arcname=rel)
    if not (info.isfile() or info.isdir() or info.issym()):
        return
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    info.mtime = MTIME
    if info.islnk():  # hard links are stored as copies: each layer stands on its own
        info.type, info.linkname, info.size = tarfile.REGTYPE, "", os.lstat("/" + rel).st_size
    if info.isfile():
        with open("/" + rel, "rb") as f:
            tar.addfile(info, f)
    else:
        tar.addfile(info)


def build_layer(layer: tuple, out: str) -> dict:
    """Write one gzip'd tar layer; returns its descriptor fields and uncompressed size."""
    name, dirs, whiteouts, replaced = layer
    diff = hashlib.sha256()
    tar_size = 0

    class Tee:
        def write(self, data):
            nonlocal tar_size
            diff.update(data)
            tar_size += len(data)
            return gz.write(data)

    with open(out + ".part", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as gz:
        with tarfile.open(fileobj=Tee(), mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for rel in _entries(dirs):
                _add(tar, rel)
            for path in whiteouts:
                head, tail = os.path.split(path)
                info = tarfile.TarInfo(f"{head}/.wh.{tail}")
                info.mtime = MTIME
                tar.addfile(info)
            if replaced:
                data = b"# replaced by the app layer\n" * 100
                info = tarfile.TarInfo(replaced)
                info.size, info.mtime = len(data), MTIME
                tar.addfile(info, _Bytes(data))
    os.replace(out + ".part", out)
    return {"name": name, "diff_id": "sha256:" + diff.hexdigest(), "tar_size": tar_size}


class _Bytes:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        chunk = self.data[self.pos:] if n < 0 else self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk



def _put(layout: pathlib.Path, data: bytes) -> dict:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(data)
    return {"digest": digest, "size": len(data)}


def build_image(rebuild: bool) -> tuple[pathlib.Path, list[dict]]:
    """The cached input layout and its layers ({name, digest, size, diff_id, tar_size})."""
    key = hashlib.sha256(json.dumps([BUILDER_VERSION, LAYERS]).encode()).hexdigest()[:16]
    home = CACHE / f"convert-{key}"
    layout, meta = home / "layout", home / "layers.json"
    if meta.exists() and not rebuild:
        return layout, json.loads(meta.read_text())
    shutil.rmtree(home, ignore_errors=True)
    (layout / "blobs" / "sha256").mkdir(parents=True)
    started = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        parts = [str(home / f"{layer[0]}.tar.gz") for layer in LAYERS]
        layers = list(pool.map(build_layer, LAYERS, parts))
    for info, part in zip(layers, parts):
        info["digest"], info["size"] = file_digest(part), os.path.getsize(part)
        os.replace(part, layout / "blobs" / "sha256" / info["digest"][7:])
    print(f"built input image in {time.monotonic() - started:.1f} s", file=sys.stderr)
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": [i["diff_id"] for i in layers]}}
    cfg = _put(layout, json.dumps(config).encode())
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **cfg},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": i["digest"],
                            "size": i["size"]} for i in layers]}
    man = _put(layout, json.dumps(manifest).encode())
    write_index(str(layout), [Descriptor(manifest["mediaType"], man["digest"], man["size"],
                                         annotations={"org.opencontainers.image.ref.name": TAG})])
    meta.write_text(json.dumps(layers, indent=1))
    return layout, layers


def gunzip_seconds(layout: pathlib.Path, layers: list[dict]) -> float:
    started = time.monotonic()
    for layer in layers:
        d = zlib.decompressobj(31)
        with open(layout / "blobs" / "sha256" / layer["digest"][7:], "rb") as f:
            while chunk := f.read(1 << 20):
                d.decompress(chunk)
    return time.monotonic() - started


def formats_of(mode: str) -> tuple[str, ...]:
    return FORMATS if mode == "both" else (mode,)


def convert(layout: pathlib.Path, mode: str, out: str, workdir: str) -> tuple[float, int]:
    """Run ``obd convert`` for one mode; (wall seconds, peak RSS bytes of its process tree)."""
    cmd = [str(OBD), "convert", f"oci:{layout}:{TAG}", "-q", "--workdir", workdir]
    for fmt in formats_of(mode):
        cmd += [f"--{fmt}", f"oci:{out}:{fmt}"]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode().strip()}")
    return seconds, usage.ru_maxrss * 1024


def output_bytes(out: str, mode: str) -> int:
    store = OciLayoutStore(out)
    manifest = json.loads(store.fetch_manifest(store.resolve(parse_reference(f"oci:{out}:{mode}"))))
    return sum(layer["size"] for layer in manifest["layers"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached input image")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: overlaybd,fastoci,both")
    args = ap.parse_args()
    layout, layers = build_image(args.rebuild)
    compressed = sum(i["size"] for i in layers)
    uncompressed = sum(i["tar_size"] for i in layers)
    baseline = gunzip_seconds(layout, layers)
    result = {
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "input": {"layers": len(layers), "compressed_bytes": compressed, "uncompressed_bytes": uncompressed},
        "baseline_gunzip_s": round(baseline, 2),
        "modes": {},
    }
    print(f"input: {len(layers)} layers, {uncompressed / 1e6:.0f} MB uncompressed, {compressed / 1e6:.0f} MB gzip; "
          f"gunzip baseline {baseline:.1f} s")
    scratch = tempfile.mkdtemp(prefix="obd-bench-convert-", dir="/var/tmp")
    try:
        for mode in args.modes.split(","):
            out = os.path.join(scratch, f"out-{mode}")
            seconds, rss = convert(layout, mode, out, scratch)
            size = sum(output_bytes(out, fmt) for fmt in formats_of(mode))
            row = {"seconds": round(seconds, 2), "x_gunzip": round(seconds / baseline, 1),
                   "input_mb_per_s": round(uncompressed / 1e6 / seconds, 1), "peak_rss_mib": round(rss / 2**20, 1),
                   "output_bytes": size, "pct_of_compressed_input": round(100 * size / compressed, 2),
                   "pct_of_uncompressed_input": round(100 * size / uncompressed, 2)}
            result["modes"][mode] = row
            print(f"{mode:>9}: {seconds:6.1f} s ({row['x_gunzip']}x gunzip, {row['input_mb_per_s']} MB/s), "
                  f"peak RSS {row['peak_rss_mib']} MiB, output {size / 1e6:.1f} MB = "
                  f"{row['pct_of_compressed_input']}% of the gzip input, {row['pct_of_uncompressed_input']}% "
                  f"uncompressed")
            shutil.rmtree(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
