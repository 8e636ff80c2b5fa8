"""Where the time of ``obd mount`` goes, and what the single-open mount saves (issue 6).

Host part (any host): the import time of the ``obd`` CLI on the ``obd mount`` path,
lazy (one command module) against eager (every command module, as before); and
the resolve + open of the startup benchmark's python-large overlaybd and FastOCI
images from a local docker-registry (``supervisor.open_source``, the handler's own
path), cold cache: the open by tag that a mount does once now (twice before: the
CLI probed the size, then the handler re-opened it) and the pinned open (manifest
digest, no tag lookup) that a restarted handler does, with the registry requests each made.
Layer opens (issue 6): ``open_disk`` of the same images through a proxy that delays
every request by ``LATENCY_S`` (a WAN round trip), cold cache, with the layers
opened one after the other (``OPEN_CONCURRENCY = 1``, as before) and concurrently
(now); and the open of python-large from its local layouts in a first process (hashes
every layer blob) and in the next one (finds them in the verified-files record).

VM part (needs TCMU: on a host without it, re-run with ``--vm`` to run it inside
the VM harness): ``obd -vv mount`` of python-small/large from a local OCI layout
(twice with the same cache directory: the second mount finds the layer blobs in
the verified-files record) and of python-small from a registry in the guest, each
phase of the mount as ``obd mount`` logs it (``mount phase <name> <seconds>``).

The images are the startup benchmark's converted layouts under
/var/cache/obd-bench/<chain>/converted (``benchmarks/startup/run`` builds them).
Run: .venv/bin/python benchmarks/bench_mount.py [--vm]; writes results/mount.json
(results/mount-vm.json for the VM part).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = os.path.join(ROOT, ".venv", "bin", "python")
OBD = os.path.join(ROOT, ".venv", "bin", "obd")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
CONVERTED = "/var/cache/obd-bench/*/converted"
IMPORT_ROUNDS = 5
#: injected delay of every registry request in the layer-open figures (a 20 ms round trip)
LATENCY_S = 0.020
#: layer opens are timed this many times (fresh caches each), the best kept
OPEN_ROUNDS = 3
CLI_MODULES = ("userspace", "cache_cmd", "kernel", "convert_cmd", "stats_cmd", "trace_cmd")


def layout_of(fmt: str, image: str) -> tuple[str, str]:
    """(layout dir, tag) of the newest finished conversion of ``image`` to ``fmt``."""
    done = glob.glob(os.path.join(CONVERTED, f"{fmt}-{image}-*", "converted.json"))
    if not done:
        sys.exit(f"bench_mount: no {fmt} {image} layout under {CONVERTED} (run benchmarks/startup/run first)")
    path = max(done, key=os.path.getmtime)
    with open(path) as f:
        return os.path.dirname(path), json.load(f)["tag"]


def push_source(reg, fmt: str, image: str) -> None:
    """A FastOCI image reads the original gzip layers: push the source image to the same repository."""
    if fmt == "fastoci":
        layout = os.path.join(glob.glob(os.path.join(CONVERTED, "..", "layout"))[0])
        reg.push_layout(f"oci:{os.path.normpath(layout)}:{image}", f"bench/{fmt}", f"{image}-source")


def import_seconds(code: str) -> float:
    """Median wall time of a fresh Python running ``code`` (the interpreter start included)."""
    times = []
    for _ in range(IMPORT_ROUNDS):
        t0 = time.perf_counter()
        subprocess.run([PY, "-c", code], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_imports() -> dict:
    mount_path = ("from tcmu_overlaybd.cli.main import cli; cli.get_command(None, 'mount'); "
                  "import tcmu_overlaybd.mount.mounter, tcmu_overlaybd.prefetch.session")
    eager = "; ".join([mount_path] + [f"import tcmu_overlaybd.cli.{m}" for m in CLI_MODULES])
    return {"python_s": import_seconds("pass"), "obd_mount_lazy_s": import_seconds(mount_path),
            "obd_mount_eager_s": import_seconds(eager),
            "supervisor_s": import_seconds("import tcmu_overlaybd.mount.supervisor")}


def open_once(ref: str, pin: str | None, cache_dir: str) -> tuple[float, int]:
    """Seconds of ``open_source`` of ``ref`` (pinned to ``pin`` if given), in a fresh process."""
    code = (
        "import sys, time, json\n"
        "from tcmu_overlaybd.mount.state import MountState\n"
        "from tcmu_overlaybd.mount.supervisor import open_source, PIN_KEY\n"
        "from benchmarks.startup.registry import registry_options\n"
        "import dataclasses\n"
        "opts = dataclasses.asdict(registry_options())\n"
        "opts['cache_dir'] = sys.argv[3]; opts['gzip_cache_dir'] = sys.argv[3] + '/gz'\n"
        "if sys.argv[2] != '-': opts['extra'] = {PIN_KEY: sys.argv[2]}\n"
        "st = MountState(id='bench', mountpoint='/', image=sys.argv[1], raw=False, options=opts, size=0,\n"
        "                backstore='', wwn='', lower='', upper='', work='', own_upper=False)\n"
        "t0 = time.perf_counter(); src = open_source(st); dt = time.perf_counter() - t0\n"
        "print(json.dumps([dt, src.size, src.manifest_digest])); src.close()\n")
    r = subprocess.run([PY, "-c", code, ref, pin or "-", cache_dir], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"bench_mount: open of {ref} failed: {r.stderr.strip()[-600:]}")
    return tuple(json.loads(r.stdout.splitlines()[-1]))


def layer_open_seconds(ref: str, work: str, concurrency: int) -> tuple[float, int]:
    """Best of ``OPEN_ROUNDS`` ``open_disk`` of ``ref`` (cold caches; the image resolved
    beforehand, untimed) with ``OPEN_CONCURRENCY = concurrency``, and its number of layers."""
    from benchmarks.startup.registry import registry_options
    from tcmu_overlaybd.image import disk
    from tcmu_overlaybd.image.resolve import open_image

    saved, disk.OPEN_CONCURRENCY = disk.OPEN_CONCURRENCY, concurrency
    best = float("inf")
    try:
        for _ in range(OPEN_ROUNDS):
            opts = registry_options()
            opts.cache_dir = tempfile.mkdtemp(prefix="cache-", dir=work)
            opts.gzip_cache_dir = os.path.join(opts.cache_dir, "gz")
            image = open_image(ref, opts)
            t0 = time.perf_counter()
            opened = disk.open_disk(image, opts)
            best = min(best, time.perf_counter() - t0)
            layers = len(opened.data_layers)
            opened.close()
    finally:
        disk.OPEN_CONCURRENCY = saved
    return best, layers


def measure_layer_opens(reg, refs: dict[str, str], work: str) -> dict:
    """Serial vs concurrent layer opens of each ref through a proxy adding ``LATENCY_S`` per request."""
    from tests.helpers.registry import Proxy

    proxy = Proxy(reg.host)
    proxy.add_fault(f"delay:{LATENCY_S}", "", times=1 << 30)
    out = {}
    try:
        for fmt, ref in refs.items():
            ref = ref.replace(reg.host, proxy.host, 1)
            serial, layers = layer_open_seconds(ref, work, 1)
            from tcmu_overlaybd.image.disk import OPEN_CONCURRENCY

            concurrent, _ = layer_open_seconds(ref, work, OPEN_CONCURRENCY)
            out[fmt] = {"layers": layers, "latency_s": LATENCY_S, "serial_s": serial, "concurrent_s": concurrent}
    finally:
        proxy.stop()
    return out


def measure_layout_opens(work: str) -> dict:
    """``open_source`` of python-large from its local layouts: in a first process, in the next one."""
    out = {}
    for fmt in ("overlaybd", "fastoci"):
        layout, tag = layout_of(fmt, "python-large")
        cache = os.path.join(work, f"cache-layout-{fmt}")
        first = open_once(f"oci:{layout}:{tag}", None, cache)[0]
        again = open_once(f"oci:{layout}:{tag}", None, cache)[0]
        out[fmt] = {"layout": layout, "first_process_s": first, "next_process_s": again}
    return out


def measure_opens() -> dict:
    from benchmarks.startup.registry import BenchRegistry

    out = {}
    refs = {}
    work = tempfile.mkdtemp(prefix="bench-mount-")
    reg = BenchRegistry(os.path.join(work, "registry"))
    try:
        for fmt in ("overlaybd", "fastoci"):
            layout, tag = layout_of(fmt, "python-large")
            push_source(reg, fmt, "python-large")
            pushed = reg.push_layout(f"oci:{layout}:{tag}", f"bench/{fmt}", tag)
            ref = refs[fmt] = f"{reg.host}/bench/{fmt}:{tag}"
            row = {}
            # the second open of a mount (before: the handler after the CLI's probe) found the cache warm
            for what, pin, cache in (("by_tag", None, "cold"), ("again_warm", None, "cold"),
                                     ("pinned", pushed.manifest_digest, "pinned")):
                cache = os.path.join(work, f"cache-{fmt}-{cache}")
                mark = reg.mark()
                seconds, size, digest = open_once(ref, pin, cache)
                row[what] = {"seconds": seconds, "requests": reg.served_since(mark).requests,
                             "bytes": reg.served_since(mark).bytes}
                row["size"], row["manifest"] = size, digest
            out[fmt] = row
        layer_opens = measure_layer_opens(reg, refs, work)
        layout_opens = measure_layout_opens(work)
    finally:
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"registry": out, "layer_opens": layer_opens, "layout_opens": layout_opens}


def host_report() -> dict:
    imports = measure_imports()
    measured = measure_opens()
    opens = measured["registry"]
    print("obd mount import path (median of %d fresh processes)" % IMPORT_ROUNDS)
    print(f"  python alone                 {imports['python_s']:.3f} s")
    print(f"  obd mount, before (eager)    {imports['obd_mount_eager_s']:.3f} s")
    print(f"  obd mount, after (lazy)      {imports['obd_mount_lazy_s']:.3f} s")
    print(f"  supervisor module            {imports['supervisor_s']:.3f} s")
    print("resolve + open of python-large from a local registry (cold cache, fresh process)")
    print(f"  {'format':10} {'disk':>9} {'open by tag':>16} {'pinned open':>16} {'again, warm':>16}"
          f" {'before: 2 opens':>16} {'after: 1 open':>14}")
    for fmt, r in opens.items():
        tag, pin, warm = r["by_tag"], r["pinned"], r["again_warm"]
        print(f"  {fmt:10} {r['size'] / 2**30:7.1f}Gi {tag['seconds']:7.3f}s {tag['requests']:3d} req"
              f" {pin['seconds']:7.3f}s {pin['requests']:3d} req {warm['seconds']:7.3f}s {warm['requests']:3d} req"
              f" {tag['seconds'] + warm['seconds']:15.3f}s {tag['seconds']:13.3f}s")
    print(f"layer opens of python-large, every request delayed {LATENCY_S * 1e3:.0f} ms, cold cache "
          f"(best of {OPEN_ROUNDS})")
    print(f"  {'format':10} {'layers':>6} {'before: serial':>15} {'now: concurrent':>16}")
    for fmt, r in measured["layer_opens"].items():
        print(f"  {fmt:10} {r['layers']:6d} {r['serial_s']:14.3f}s {r['concurrent_s']:15.3f}s")
    lo = measured["layout_opens"]
    print("open of python-large from its local layout (fresh process each)")
    print(f"  {'format':10} {'first process (hashes blobs)':>29} {'next process (record)':>22}")
    for fmt, r in lo.items():
        print(f"  {fmt:10} {r['first_process_s']:28.3f}s {r['next_process_s']:21.3f}s")
    return {"imports": imports, "opens": opens, "layer_opens": measured["layer_opens"], "layout_opens": lo}


def obd_mount_phases(ref: str, extra: list[str], cache: str | None = None) -> dict:
    """``obd -vv mount`` of ``ref`` on a fresh mountpoint: its phases, wall time, then umount.

    ``cache``: the block cache directory (default: a fresh one)."""
    mnt = tempfile.mkdtemp(prefix="bench-mnt-")
    cache = cache or tempfile.mkdtemp(prefix="bench-cache-")
    t0 = time.perf_counter()
    r = subprocess.run([OBD, "-vv", "mount", "--cache-dir", cache, *extra, ref, mnt], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"bench_mount: obd mount {ref} failed: {r.stderr.strip()[-400:]}")
    phases = {}
    for line in r.stderr.splitlines():
        if "mount phase " in line:
            name, _, secs = line.split("mount phase ", 1)[1].rpartition(" ")
            phases[name] = float(secs)
    t0 = time.perf_counter()
    subprocess.run([OBD, "umount", mnt], check=True)
    return {"ref": ref, "wall_s": wall, "phases": phases, "umount_s": time.perf_counter() - t0}


def vm_report() -> dict:
    from benchmarks.startup.registry import BenchRegistry

    subprocess.run(["modprobe", "-a", "target_core_user", "tcm_loop"], check=True)
    t0 = time.perf_counter()
    subprocess.run([OBD, "--help"], check=True, capture_output=True)
    runs = {"obd --help": {"wall_s": time.perf_counter() - t0, "phases": {}}}
    print("obd mount phases in the VM (s; QEMU TCG, ~20x slower than the host)", flush=True)
    # the large image from its layout only: pushing ~1 GB into a registry on the guest's tmpfs
    # does not fit in the VM's memory
    for image in ("python-small", "python-large"):
        layout, tag = layout_of("overlaybd", image)
        cache = tempfile.mkdtemp(prefix="bench-cache-")
        runs[f"overlaybd {image}, local layout"] = show(obd_mount_phases(f"oci:{layout}:{tag}", [], cache))
        # the same cache dir: the layer blobs are in its verified-files record, not hashed again
        runs[f"overlaybd {image}, local layout, mounted again"] = show(
            obd_mount_phases(f"oci:{layout}:{tag}", [], cache))
    reg = BenchRegistry(tempfile.mkdtemp(prefix="bench-registry-"))
    try:
        for fmt in ("overlaybd", "fastoci"):
            layout, tag = layout_of(fmt, "python-small")
            push_source(reg, fmt, "python-small")
            reg.push_layout(f"oci:{layout}:{tag}", f"bench/{fmt}", tag)
            ref = f"{reg.host}/bench/{fmt}:{tag}"
            runs[f"{fmt} python-small, registry"] = show(obd_mount_phases(ref, ["--plain-http"]))
    finally:
        reg.stop()
    return runs


def show(run: dict) -> dict:
    print(f"  {run['ref']}: wall {run['wall_s']:.2f}", flush=True)
    for name, secs in run["phases"].items():
        print(f"    {name:24} {secs:7.3f}", flush=True)
    return run


def main(argv: list[str]) -> int:
    os.makedirs(RESULTS, exist_ok=True)
    if "--in-vm" in argv:
        doc, name = vm_report(), "mount-vm.json"
        out_dir = os.environ.get("OBD_VM_OUT", RESULTS)
    elif "--vm" in argv:
        out = os.environ.get("OBD_VM_RESULTS") or os.path.join(ROOT, "build", "bench-mount-vm")
        rc = subprocess.call([os.path.join(ROOT, "scripts", "vm-run"), "--timeout", "1800", "--out", out,
                              "--", PY, os.path.abspath(__file__), "--in-vm"])
        if rc == 0:
            shutil.copyfile(os.path.join(out, "mount-vm.json"), os.path.join(RESULTS, "mount-vm.json"))
        return rc
    else:
        doc, name = host_report(), "mount.json"
        out_dir = RESULTS
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(doc, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
