"""The Prometheus text exposition (format 0.0.4) of a stats document, and the small HTTP
server thread that serves it on ``metrics.listen`` at ``/metrics``.

Every sample carries the labels ``mount_id`` and ``mountpoint``.  The metrics are
derived from the same document ``obd stats --json`` shows (telemetry.py), so the
two never disagree.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from ..errors import UsageError

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: (metric name, type, help, document key) of the plain counters and gauges
SCALARS: tuple[tuple[str, str, str, str], ...] = (
    ("obd_device_reads_total", "counter", "Reads of the virtual disk served to the kernel.", "device_reads"),
    ("obd_device_read_bytes_total", "counter", "Bytes of the virtual disk served to the kernel.",
     "device_bytes_read"),
    ("obd_device_read_errors_total", "counter", "Device reads that failed (the kernel got an error).",
     "read_errors"),
    ("obd_device_slow_reads_total", "counter", "Device reads slower than io.slowMs.", "slow_reads"),
    ("obd_device_reads_in_flight", "gauge", "Device reads being served now.", "inflight_reads"),
    ("obd_device_stuck_reads", "gauge", "Device reads in flight for longer than io.slowMs now.", "stuck_reads"),
    ("obd_registry_fetched_bytes_total", "counter", "Bytes fetched from registries (cache misses).",
     "bytes_fetched"),
    ("obd_registry_fetch_requests_total", "counter", "Range requests sent to registries.", "fetch_requests"),
    ("obd_handler_restarts_total", "counter", "Handler restarts by the supervisor since the mount.", "restarts"),
    ("obd_handler_uptime_seconds", "gauge", "Seconds since this handler process started.", "uptime_s"),
)
#: (metric name, help, key in the document's ``cache`` object)
CACHE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("obd_cache_hits_total", "Block cache blocks served from disk.", "hits"),
    ("obd_cache_misses_total", "Block cache blocks fetched from the registry.", "misses"),
)
#: (metric name, help, key in the document's ``gzip_cache`` object)
GZIP_CACHE_COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("obd_gzip_cache_hits_total", "FastOCI reads served from decompressed-data cache pages alone.", "hits"),
    ("obd_gzip_cache_misses_total", "FastOCI reads that needed a refill of the decompressed-data cache.",
     "misses"),
    ("obd_gzip_cache_served_bytes_total", "Bytes of FastOCI reads served from cached pages.", "bytes_from_cache"),
    ("obd_gzip_cache_inflated_bytes_total", "Bytes inflated from gzip layers, skipped ones included.",
     "bytes_inflated"),
    ("obd_gzip_spans_inflated_total", "Inflates started at a gzip index checkpoint.", "spans_inflated"),
    ("obd_gzip_compressed_read_bytes_total", "Compressed bytes of gzip layers read to inflate.",
     "compressed_bytes"),
)
HISTOGRAM = "obd_device_read_duration_seconds"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def render(doc: dict) -> str:
    """The exposition text of one stats document."""
    labels = f'mount_id="{_escape(doc["mount_id"])}",mountpoint="{_escape(doc["mountpoint"])}"'
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, str, object]]) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, extra, value in samples:
            out.append(f"{name}{suffix}{{{labels}{extra}}} {_num(value)}")

    for name, kind, help_, key in SCALARS:
        if doc.get(key) is not None:
            metric(name, kind, help_, [("", "", doc[key])])
    cache = doc.get("cache") or {}
    for name, help_, key in CACHE_COUNTERS:
        if key in cache:
            metric(name, "counter", help_, [("", "", cache[key])])
    gzip_cache = doc.get("gzip_cache") or {}
    for name, help_, key in GZIP_CACHE_COUNTERS:
        if isinstance(gzip_cache.get(key), int):
            metric(name, "counter", help_, [("", "", gzip_cache[key])])
    buckets = doc["latency_buckets"]
    samples, cumulative = [], 0
    for le_ms, count in zip(buckets["le_ms"] + ["+Inf"], buckets["counts"]):
        cumulative += count
        le = "+Inf" if le_ms == "+Inf" else repr(le_ms / 1000)
        samples.append(("_bucket", f',le="{le}"', cumulative))
    samples.append(("_sum", "", doc["latency_sum_s"]))
    samples.append(("_count", "", cumulative))
    metric(HISTOGRAM, "histogram", "Latency of device reads.", samples)
    for key, value in sorted((doc.get("prefetch") or {}).items()):
        name = "obd_prefetch_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)
        if isinstance(value, (bool, int, float)):
            metric(name, "gauge", f"Prefetch counter {key}.", [("", "", value)])
        elif isinstance(value, str):
            metric(name, "gauge", f"Prefetch {key} (the label holds it).", [("", f',{key}="{_escape(value)}"', 1)])
    return "\n".join(out) + "\n"


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) of ``metrics.listen`` as a socket address."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise UsageError(f"metrics.listen must be HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    """``GET /metrics`` → ``render(document())`` on an HTTP server thread."""

    def __init__(self, listen: str, document: Callable[[], dict]):
        self.host, self.port = parse_listen(listen)
        self.document = document
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        #: ``HOST:PORT`` actually bound (the free port when 0 was asked for), once started
        self.address = ""

    def start(self) -> None:
        document = self.document

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] != "/metrics":
                    self.send_error(404, "only /metrics is served")
                    return
                body = render(document()).encode()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("metrics: " + fmt, *args)

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            daemon_threads = True

        try:
            self._httpd = Server((self.host, self.port), Handler)
        except OSError as e:
            raise UsageError(f"metrics.listen {format_address(self.host, self.port)}: {e.strerror}") from None
        self.address = format_address(*self._httpd.server_address[:2])
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="obd-metrics-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
