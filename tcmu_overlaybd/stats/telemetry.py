"""The telemetry of one handler process: what ``run_handler`` (mount/supervisor.py) sets up.

``Telemetry`` wraps the mount's virtual disk in a ``CountingDevice`` (the handler
reads through ``telemetry.device``), runs the slow-read watchdog, answers the stats
socket ``<state.dir>/<id>.stats.sock`` and, when ``metrics.listen`` is set, serves
Prometheus text and writes the bound address to ``<state.dir>/<id>.metrics``.

The document (``document()``) is the one ``obd stats --json`` prints; its fields:

====================================  ==================================================
field                                 meaning
====================================  ==================================================
mount_id, mountpoint, image, device   from the mount's state file
handler_pid, restarts                 this process; supervisor restarts so far
started_at, uptime_s                  unix time this handler started; seconds since
slow_ms                               ``io.slowMs`` in force
device_reads, device_bytes_read       reads served to the kernel, their bytes
read_errors                           reads that failed
inflight_reads, stuck_reads           reads in flight now / of those, older than slow_ms
slow_reads, slow_warnings             completed reads slower than slow_ms / watchdog warnings
latency_ms                            {p50, p90, p99, max, mean} of device reads
latency_buckets, latency_sum_s        {le_ms: [...], counts: [... +Inf last]}, total seconds
bytes_fetched, fetch_requests         from registries (null: no registry, e.g. a local layout)
cache                                 the block cache's stats() plus hit_ratio, or null
gzip_cache                            FastOCI's decompressed-data cache: GzipCache.stats()
                                      plus hit_ratio, or null (not FastOCI, or the cache is off)
scsi_commands                         commands the handler consumed from the ring
prefetch                              the prefetcher's counters when one runs, else null
metrics_address                       HOST:PORT of the Prometheus endpoint, or null
====================================  ==================================================
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from ..atomic import write_private_file
from ..errors import ObdError, StateError
from ..mount.state import MountState, StateDir
from .device import CountingDevice, SlowReadWatchdog
from .latency import BOUNDS_NS
from .unix_endpoint import StatsSocketServer

log = logging.getLogger(__name__)

_LE_MS = [b / 1e6 for b in BOUNDS_NS]


def stats_socket_path(state_dir: str, mid: str) -> str:
    return os.path.join(state_dir, f"{mid}.stats.sock")


def metrics_address_path(state_dir: str, mid: str) -> str:
    return os.path.join(state_dir, f"{mid}.metrics")


def _ms(ns: int) -> float:
    return round(ns / 1e6, 3)


def _scalars(data) -> dict:
    return {k: v for k, v in data.items()
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str)))}


def counters_of(obj) -> dict | None:
    """The public scalar counters of an object someone else owns (e.g. the prefetcher):
    its ``stats()``/``as_dict()``/``snapshot()`` result when it has one, else its
    attributes; None for no object."""
    if obj is None:
        return None
    try:
        for name in ("stats", "as_dict", "snapshot"):
            fn = getattr(obj, name, None)
            if callable(fn):
                data = fn()
                break
        else:
            data = obj
        if dataclasses.is_dataclass(data) and not isinstance(data, type):
            data = dataclasses.asdict(data)
        elif not isinstance(data, dict):
            data = vars(data)
        return _scalars(data)
    except Exception as e:  # another component's bug must not break obd stats
        log.debug("stats: cannot read counters of %r: %s", obj, e)
        return {"unreadable": f"{type(e).__name__}: {e}"}


class Telemetry:
    """Counters, watchdog and endpoints of one handler process."""

    def __init__(self, st: MountState, source, *, state_dir: str, slow_ms: float,
                 metrics_listen: str = "", store=None):
        self.st = st
        self.state_dir = state_dir
        self.device = CountingDevice(source, slow_ms)
        self.cache = getattr(store, "cache", None) if store is not None else None
        # the image disk (``source`` or the ``disk`` it wraps, see mount/supervisor.py) holds the pool
        self.gzip_cache = getattr(getattr(source, "disk", source), "gzip_cache", None)
        #: the prefetcher of this mount (set by whoever starts it); read by attribute name
        self.prefetch = None
        self.handler = None
        self.metrics_listen = metrics_listen
        self.started_at = time.time()
        self._t0 = time.monotonic()
        self._watchdog = SlowReadWatchdog(self.device)
        self._socket = StatsSocketServer(stats_socket_path(state_dir, st.id), self.document)
        self._metrics = None  # a prometheus.MetricsServer when metrics.listen is set

    def start(self, handler=None) -> None:
        """Start the watchdog and the endpoints (a failing endpoint is logged, never fatal)."""
        self.handler = handler
        self._watchdog.start()
        try:
            self._socket.start()
        except ObdError as e:
            log.warning("obd stats unavailable: %s", e)
        if self.metrics_listen:
            from .prometheus import MetricsServer  # http.server only when it is wanted

            metrics = MetricsServer(self.metrics_listen, self.document)
            try:
                metrics.start()
                self._write_metrics_address(metrics.address)
                self._metrics = metrics
                log.info("metrics: http://%s/metrics", metrics.address)
            except (ObdError, OSError) as e:
                metrics.stop()
                log.warning("metrics endpoint unavailable: %s", e)

    def _write_metrics_address(self, address: str) -> None:
        write_private_file(metrics_address_path(self.state_dir, self.st.id), (address + "\n").encode())

    def stop(self) -> None:
        """Stop the endpoints and the watchdog; remove the files they made."""
        self._socket.stop()
        if self._metrics is not None:
            self._metrics.stop()
            self._metrics = None
            try:
                os.unlink(metrics_address_path(self.state_dir, self.st.id))
            except FileNotFoundError:
                pass
        self._watchdog.stop()

    def document(self) -> dict:
        """The stats document (field list in the module docstring)."""
        st, snap = self.st, self.device.snapshot()
        sd = StateDir(self.state_dir)
        restarts = sd.read_pids(st.id).get("restarts", 0)
        try:  # obd mount learns the /dev/sdX name after this handler started
            device = sd.load(st.id).device
        except StateError:
            device = st.device
        cache = None
        if self.cache is not None and hasattr(self.cache, "stats"):
            cache = self.cache.stats()
            looked = cache.get("hits", 0) + cache.get("misses", 0)
            cache["hit_ratio"] = round(cache.get("hits", 0) / looked, 4) if looked else None
        gzip_cache = counters_of(self.gzip_cache)
        if gzip_cache is not None and "unreadable" not in gzip_cache:
            looked = gzip_cache.get("hits", 0) + gzip_cache.get("misses", 0)
            gzip_cache["hit_ratio"] = round(gzip_cache.get("hits", 0) / looked, 4) if looked else None
        return {
            "mount_id": st.id,
            "mountpoint": st.mountpoint,
            "image": st.image,
            "device": device,
            "handler_pid": os.getpid(),
            "restarts": restarts,
            "started_at": round(self.started_at, 3),
            "uptime_s": round(time.monotonic() - self._t0, 3),
            "slow_ms": self.device.slow_ns / 1e6,
            "device_reads": snap.reads,
            "device_bytes_read": snap.bytes_read,
            "read_errors": snap.errors,
            "inflight_reads": snap.inflight,
            "stuck_reads": snap.stuck,
            "slow_reads": snap.slow,
            "slow_warnings": snap.slow_warnings,
            "latency_ms": {
                "p50": _ms(snap.percentile_ns(0.50)),
                "p90": _ms(snap.percentile_ns(0.90)),
                "p99": _ms(snap.percentile_ns(0.99)),
                "max": _ms(snap.max_ns),
                "mean": _ms(snap.sum_ns // snap.reads) if snap.reads else 0.0,
            },
            "latency_buckets": {"le_ms": _LE_MS, "counts": list(snap.counts)},
            "latency_sum_s": snap.sum_ns / 1e9,
            "bytes_fetched": cache.get("bytes_fetched") if cache else None,
            "fetch_requests": cache.get("fetch_requests") if cache else None,
            "cache": cache,
            "gzip_cache": gzip_cache,
            "scsi_commands": getattr(self.handler, "commands", None),
            "prefetch": counters_of(self.prefetch),
            "metrics_address": self._metrics.address if self._metrics is not None else None,
        }
