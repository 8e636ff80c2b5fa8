"""The counting wrapper around a mount's virtual disk and the slow-read watchdog.

``CountingDevice`` is what the TCMU handler reads from: it forwards ``read`` (and
``readinto``, ``read_cached`` and ``local`` when the wrapped source has them, see
tcmu/handler.py)
and records, per reading thread and without locks or allocation per read, the
number of reads, bytes, errors, slow reads and a latency histogram (latency.py).
Each thread owns one ``ReadSlot``; a snapshot sums the slots.  A slot also shows
the read its thread is doing now (start time, offset, length), which is what the
``SlowReadWatchdog`` scans: a read stuck longer than ``io.slowMs`` gets exactly one
warning naming its device offset and length, and another line when it completes.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from dataclasses import dataclass

from .latency import BOUNDS_NS, NBUCKETS, merge, percentile

log = logging.getLogger(__name__)

_now_ns = time.monotonic_ns


class ReadSlot:
    """Counters of one reading thread, and the read it is doing now (``started`` != 0)."""

    __slots__ = ("thread", "started", "offset", "length", "warned", "reads", "bytes", "errors",
                 "slow", "sum_ns", "max_ns", "counts")

    def __init__(self, thread: str):
        self.thread = thread
        self.started = 0  # monotonic ns of the read in progress, 0 when idle
        self.offset = 0
        self.length = 0
        self.warned = 0  # ``started`` of the read the watchdog warned about
        self.reads = 0
        self.bytes = 0
        self.errors = 0
        self.slow = 0
        self.sum_ns = 0
        self.max_ns = 0
        self.counts = [0] * NBUCKETS


@dataclass(frozen=True)
class DeviceSnapshot:
    """Totals over every reading thread at one moment (``obd stats`` fields in comments)."""

    reads: int  # device_reads
    bytes_read: int  # device_bytes_read
    errors: int  # read_errors
    slow: int  # slow_reads: completed reads slower than slow_ms
    inflight: int  # inflight_reads
    stuck: int  # stuck_reads: in flight for longer than slow_ms now
    slow_warnings: int  # reads the watchdog warned about
    sum_ns: int
    max_ns: int
    counts: tuple[int, ...]  # per bucket of latency.BOUNDS_NS (+Inf last)

    def percentile_ns(self, q: float) -> int:
        return percentile(list(self.counts), q, self.max_ns)


class CountingDevice:
    """A ByteSource that counts and times every read of ``source`` (thread-safe)."""

    def __init__(self, source, slow_ms: float):
        self.source = source
        self.name = source.name
        self.size = source.size
        self.local = bool(getattr(source, "local", False))
        self.slow_ns = int(slow_ms * 1_000_000)
        self._read = source.read
        self._readinto = getattr(source, "readinto", None)
        if self._readinto is not None:
            self.readinto = self._timed_readinto  # only offered when the source has it
        self._read_cached = getattr(source, "read_cached", None)
        if self._read_cached is not None:
            self.read_cached = self._timed_read_cached  # likewise
        self._tls = threading.local()
        self._slots: list[ReadSlot] = []
        self._slots_lock = threading.Lock()
        self.slow_warnings = 0

    def _new_slot(self) -> ReadSlot:
        slot = ReadSlot(threading.current_thread().name)
        with self._slots_lock:
            self._slots.append(slot)
        self._tls.slot = slot
        return slot

    def read(self, offset: int, length: int) -> bytes:
        try:
            slot = self._tls.slot
        except AttributeError:
            slot = self._new_slot()
        slot.offset = offset
        slot.length = length
        t0 = slot.started = _now_ns()
        try:
            data = self._read(offset, length)
        except BaseException:
            slot.errors += 1
            self._finish(slot, t0, 0)
            raise
        self._finish(slot, t0, len(data))
        return data

    def _timed_readinto(self, offset: int, buffers) -> int:
        try:
            slot = self._tls.slot
        except AttributeError:
            slot = self._new_slot()
        slot.offset = offset
        slot.length = sum(map(len, buffers))
        t0 = slot.started = _now_ns()
        try:
            n = self._readinto(offset, buffers)
        except BaseException:
            slot.errors += 1
            self._finish(slot, t0, 0)
            raise
        self._finish(slot, t0, n)
        return n

    def _timed_read_cached(self, offset: int, length: int) -> bytes | None:
        """The source's non-blocking read; only the reads it serves are counted (a None is
        followed by the handler's ``read`` of the same range, which counts)."""
        t0 = _now_ns()
        data = self._read_cached(offset, length)
        if data is not None:
            try:
                slot = self._tls.slot
            except AttributeError:
                slot = self._new_slot()
            slot.offset = offset
            slot.length = length
            self._finish(slot, t0, len(data))
        return data

    def _finish(self, slot: ReadSlot, t0: int, n: int) -> None:
        dt = _now_ns() - t0
        slot.started = 0
        slot.reads += 1
        slot.bytes += n
        slot.sum_ns += dt
        slot.counts[bisect_left(BOUNDS_NS, dt)] += 1
        if dt > slot.max_ns:
            slot.max_ns = dt
        if dt > self.slow_ns:
            slot.slow += 1
            if slot.warned == t0:
                log.warning("device read of %d bytes at offset %d completed after %.0f ms",
                            slot.length, slot.offset, dt / 1e6)

    def close(self) -> None:
        self.source.close()

    # -- readers of the counters -------------------------------------------------------------
    def snapshot(self) -> DeviceSnapshot:
        with self._slots_lock:
            slots = list(self._slots)
        now = _now_ns()
        started = [s.started for s in slots]
        return DeviceSnapshot(
            reads=sum(s.reads for s in slots),
            bytes_read=sum(s.bytes for s in slots),
            errors=sum(s.errors for s in slots),
            slow=sum(s.slow for s in slots),
            inflight=sum(1 for t in started if t),
            stuck=sum(1 for t in started if t and now - t > self.slow_ns),
            slow_warnings=self.slow_warnings,
            sum_ns=sum(s.sum_ns for s in slots),
            max_ns=max((s.max_ns for s in slots), default=0),
            counts=tuple(merge(s.counts for s in slots)),
        )

    def warn_stuck(self) -> int:
        """Log one warning for each read in flight longer than ``slow_ns`` not yet warned
        about; returns how many were logged now (the watchdog's body)."""
        with self._slots_lock:
            slots = list(self._slots)
        now, warned = _now_ns(), 0
        for s in slots:
            t0 = s.started
            if not t0 or now - t0 <= self.slow_ns or s.warned == t0:
                continue
            offset, length = s.offset, s.length
            if s.started != t0:  # finished while we looked: offset/length may be the next read's
                continue
            s.warned = t0
            warned += 1
            log.warning("device read of %d bytes at offset %d in flight for %.0f ms (thread %s)",
                        length, offset, (now - t0) / 1e6, s.thread)
        self.slow_warnings += warned
        return warned


class SlowReadWatchdog:
    """A daemon thread running ``device.warn_stuck()`` a few times per ``slow_ms``."""

    def __init__(self, device: CountingDevice):
        self.device = device
        self.period = min(1.0, max(0.01, device.slow_ns / 4e9))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="obd-slow-io-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.device.warn_stuck()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
