"""The lazy modes: ``obd mount`` an overlaybd or FastOCI image, start the app from the mountpoint.

One cold start, as a user would run it: fresh block and gzip caches (their
directories handed to obd through ``OBD_CACHE_DIR``/``OBD_GZIP_CACHE_DIR``),
``obd mount --plain-http -q REF MNT`` as its own process (pull s = until it
returns, when the mountpoint is usable), the app started from MNT exactly as
the traditional mode starts it from its unpacked root (service available s =
until ``GET /`` answers), both timed from the same start.  Then, untimed: the
handler's peak RSS (``VmHWM`` of the handler pid ``obd list --json`` names), the
bytes the device served (sectors read in ``/sys/block/sdX/stat`` × 512), the
handler's own counters (``obd stats --json``), app stopped, ``obd umount``.
Bytes fetched are counted by the registry (the driver reads its access log
around the run).

With ``record_trace`` the mount records which blocks the workload read (the
trace is written at umount); with ``prefetch`` it replays such a trace in the
background after mounting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from tcmu_overlaybd.errors import KernelError, NotFoundError, ObdError
from tcmu_overlaybd.stats.sampler import ENV as STACKS_ENV

from . import cpu
from .result import ColdStart
from .service import AppConfig, RunningApp, wait_http

SECTOR = 512


def obd_command() -> list[str]:
    """The ``obd`` console script of the Python running this driver (the checkout's venv)."""
    exe = os.path.join(os.path.dirname(sys.executable), "obd")
    if not os.access(exe, os.X_OK):
        raise NotFoundError(f"{exe}: obd is not installed next to {sys.executable}")
    return [exe]


def _obd(args: list[str], env: dict, what: str) -> str:
    """Run ``obd ARGS``; its stdout, or an ObdError with the last line it printed on stderr."""
    res = subprocess.run(obd_command() + args, env=env, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or [f"exit status {res.returncode}"])[-1]
        raise ObdError(f"{what}: {last.removeprefix('obd: ')}")
    return res.stdout


#: what obd mount, its supervisor and the handler import: loaded once before the timed runs
_OBD_MODULES = ("tcmu_overlaybd.mount.mounter", "tcmu_overlaybd.mount.supervisor", "tcmu_overlaybd.tcmu.handler",
                "tcmu_overlaybd.image.resolve", "tcmu_overlaybd.image.disk")


def warm_up() -> float:
    """Read obd's own code once (in the VM harness it comes over 9p), so the timed runs measure the
    image's cold start, not obd's; returns the seconds a warm ``obd --help`` then takes (CLI start-up)."""
    res = subprocess.run([sys.executable, "-c", "import " + ", ".join(_OBD_MODULES)], capture_output=True, text=True)
    if res.returncode != 0:
        raise ObdError(f"obd's modules do not import: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    _obd(["--help"], dict(os.environ), "obd --help")
    t0 = time.monotonic()
    _obd(["--help"], dict(os.environ), "obd --help")
    return time.monotonic() - t0


def mount_entry(listing: str, mountpoint: str) -> dict:
    """The ``obd list --json`` entry of ``mountpoint`` (its device and handler pid)."""
    for m in json.loads(listing):
        if os.path.realpath(m["mountpoint"]) == os.path.realpath(mountpoint):
            return m
    raise KernelError(f"obd list does not show {mountpoint} although obd mount succeeded")


def obd_stats(mountpoint: str, env: dict) -> dict:
    """``obd stats --json MNT`` (the handler's own counters, kept beside the registry's count as a
    diagnosis of where the time went); an ``error`` entry when obd cannot give them."""
    try:
        return json.loads(_obd(["stats", "--json", mountpoint], env, "obd stats"))
    except ObdError as e:
        return {"error": str(e)}
    except json.JSONDecodeError as e:
        return {"error": f"obd stats --json printed no JSON ({e.msg})"}


def peak_rss(pid: int) -> int:
    """``VmHWM`` of ``pid`` in bytes: the most memory it ever had resident."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise KernelError(f"/proc/{pid}/status has no VmHWM line")


def device_bytes_read(device: str) -> int:
    """Bytes read from ``/dev/sdX`` since it appeared (``/sys/block/sdX/stat``, field 3 is sectors read)."""
    with open(f"/sys/block/{os.path.basename(device)}/stat") as f:
        return int(f.read().split()[2]) * SECTOR


def cold_start(image: str, mode: str, ref: str, work: str, app: AppConfig, port: int, timeout: float,
               registry_size: int, record_trace: str | None = None,
               prefetch: str | None = None, sample_stacks: bool = False,
               obd_env: dict[str, str] | None = None) -> ColdStart:
    """Measure one cold start of ``ref`` mounted under ``work`` (fresh caches, removed afterwards)."""
    mnt, caches = os.path.join(work, "mnt"), os.path.join(work, "caches")
    shutil.rmtree(caches, ignore_errors=True)
    os.makedirs(mnt, exist_ok=True)
    env = dict(os.environ, **(obd_env or {}), OBD_CACHE_DIR=os.path.join(caches, "blocks"),
               OBD_GZIP_CACHE_DIR=os.path.join(caches, "gzip"))
    stacks = os.path.join(work, "handler-stacks.json")
    if sample_stacks:
        env[STACKS_ENV] = stacks
        if os.path.exists(stacks):
            os.unlink(stacks)
    args = ["mount", "--plain-http", "-q"]
    if record_trace:
        args += ["--record-trace", record_trace]
    if prefetch:
        args += ["--prefetch", prefetch]
    c0 = cpu.Snapshot.take()
    t0 = time.monotonic()
    _obd(args + [ref, mnt], env, f"obd mount {ref}")
    t_pull = time.monotonic()
    c_pull = cpu.Snapshot.take()
    try:
        running = RunningApp(mnt, app.with_port(port))
        try:
            t_up = wait_http(running, port, timeout, since=t0)
            c_up = cpu.Snapshot.take()
        finally:
            running.stop()
        entry = mount_entry(_obd(["list", "--json"], env, "obd list"), mnt)
        used = cpu.phases(c0, c_pull, c_up, {entry["handler_pid"]: "obd handler",
                                                 os.getpid(): "benchmark driver"})
        rss = peak_rss(entry["handler_pid"])
        read = device_bytes_read(entry["device"])
        stats = obd_stats(mnt, env)
    except BaseException as e:
        try:
            _obd(["umount", mnt], env, f"obd umount {mnt}")
        except ObdError as u:  # the first failure is the one to report
            raise ObdError(f"{e}; then {u}") from e
        shutil.rmtree(caches, ignore_errors=True)
        raise
    t_umount = time.monotonic()
    _obd(["umount", mnt], env, f"obd umount {mnt}")
    umount_s = time.monotonic() - t_umount
    shutil.rmtree(caches, ignore_errors=True)
    details = {"ref": ref, "umount_s": round(umount_s, 2), "obd_stats": stats, "cpu_s": used}
    if obd_env:
        details["obd_env"] = dict(obd_env)
    if sample_stacks:
        try:
            with open(stacks) as f:
                details["handler_stacks"] = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            details["handler_stacks"] = {"error": f"{stacks}: {e}"}
    return ColdStart(image, mode, t_pull - t0, t_up - t0, 0, registry_size, bytes_read=read, handler_rss=rss,
                     details=details)
