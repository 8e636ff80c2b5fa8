"""Trace recording (spec §7.1): which byte ranges of which lower layer a workload read.

``obd mount --record-trace FILE`` creates ``FILE.spool`` (empty, 0600); a
handler whose mount has a spool records into it.  Every successful read of a
layer is noted as (layer index, offset, count):

* ordinary layers: offsets in the layer's decompressed LSMT file (below LSMT,
  above the tar/ZFile adaptors), exactly as upstream records them;
* TurboOCI layers: offsets in the layer's own view of the virtual disk (the
  layer is one opaque warp file in the stack).  Replaying such a record reads
  the layer through its index, which fetches the same ``ext4.fs.meta`` ranges
  and the same original-blob (gzip) ranges the workload needed.

A read that touches or overlaps one of the ``MERGE_WINDOW`` most recent
records of its layer extends that record, so streaming reads of a file become
one record.  Once a second (``FLUSH_INTERVAL_S``) the records are appended to
the spool and the window starts afresh, so a handler killed and restarted by
its supervisor loses at most the last second; the next handler appends to the
same spool.  ``finish`` (at ``obd umount``, on ``obd record-trace stop``, i.e.
SIGUSR1 to the handler) merges the spool once more, writes ``FILE`` atomically
(a temporary file + rename, 0600) and removes the spool: recording is over for
good, a restarted handler finds no spool and records nothing.
"""

from __future__ import annotations

import logging
import os
import threading

from ..atomic import write_private_file
from ..cache.blockcache import in_background_fetch
from ..errors import StateError
from ..format.trace import OP_READ, RECORD, TraceRecord, decode_records, encode_trace

log = logging.getLogger(__name__)

#: recent records of the same layer that a new read may extend
MERGE_WINDOW = 16
#: seconds between appends to the spool
FLUSH_INTERVAL_S = 1.0
SPOOL_SUFFIX = ".spool"


def spool_path(trace_path: str) -> str:
    """Where the handler appends the records of a trace being recorded."""
    return trace_path + SPOOL_SUFFIX


def create_spool(trace_path: str) -> str:
    """Start a recording: an empty spool beside ``trace_path`` (done by ``obd mount``)."""
    path = spool_path(trace_path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StateError(f"{path}: cannot create the trace spool: {e.strerror}") from None
    os.close(fd)
    return path


def merge_records(records, window: int = MERGE_WINDOW) -> list[TraceRecord]:
    """Records in first-read order, each touching/overlapping neighbour of its layer folded in.

    A record extends one of the last ``window`` output records of its layer that
    it touches or overlaps; otherwise it is appended.
    """
    out: list[list[int]] = []  # [layer, start, end]
    for r in records:
        start, end = r.offset, r.offset + r.count
        for rec in reversed(out[-window:]):
            if rec[0] == r.layer_index and rec[1] <= end and start <= rec[2]:
                rec[1], rec[2] = min(rec[1], start), max(rec[2], end)
                break
        else:
            out.append([r.layer_index, start, end])
    return [TraceRecord(OP_READ, layer, end - start, start) for layer, start, end in out]


def write_trace_file(path: str, records: list[TraceRecord]) -> None:
    """``path`` holds exactly this trace, or is unchanged (temporary file + fsync + rename, 0600)."""
    try:
        write_private_file(path, encode_trace(records), fsync=True)
    except OSError as e:
        raise StateError(f"{path}: cannot write the trace: {e.strerror}") from None


def finish_spool(trace_path: str) -> int:
    """Turn the spool of ``trace_path`` into the trace file; returns the record count.

    Used by the handler at the end of a recording, and by the CLI when the
    handler died before it could.
    """
    spool = spool_path(trace_path)
    try:
        with open(spool, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise StateError(f"{trace_path}: no recording in progress (no {spool})") from None
    records = merge_records(decode_records(raw, spool), window=4 * MERGE_WINDOW)
    write_trace_file(trace_path, records)
    os.unlink(spool)
    return len(records)


class TraceRecorder:
    """Notes the reads of the layers of one mount (``note`` is called by ``RecordingLayer``).

    Inert until ``start()``: ``obd mount`` opens the disk once to learn its size
    and must not record anything.  Thread-safe.
    """

    def __init__(self, trace_path: str):
        self.path = trace_path
        self.spool = spool_path(trace_path)
        self.active = False
        self.noted = 0  # reads noted since start
        self._recent: list[list[int]] = []  # [layer, start, end], newest last
        self._lock = threading.Lock()  # the window
        self._io = threading.Lock()  # the spool fd
        self._fd = -1
        self._wake = threading.Event()
        self._finish_requested = False
        self._thread: threading.Thread | None = None

    def start(self) -> bool:
        """Begin appending to the spool; False when there is none (recording already finished)."""
        try:
            self._fd = os.open(self.spool, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        self.active = True
        self._thread = threading.Thread(target=self._run, name="obd-trace-flush", daemon=True)
        self._thread.start()
        log.info("recording a trace into %s", self.path)
        return True

    def note(self, layer: int, offset: int, count: int) -> None:
        """One successful read of ``count`` bytes at ``offset`` of layer ``layer``."""
        if not self.active or count <= 0:
            return
        end = offset + count
        with self._lock:
            self.noted += 1
            recent = self._recent
            for i in range(len(recent) - 1, max(-1, len(recent) - 1 - MERGE_WINDOW), -1):
                rec = recent[i]
                if rec[0] == layer and rec[1] <= end and offset <= rec[2]:
                    if offset < rec[1]:
                        rec[1] = offset
                    if end > rec[2]:
                        rec[2] = end
                    return
            recent.append([layer, offset, end])

    def flush(self, close: bool = False) -> None:
        """Append the records noted since the last flush to the spool (then close it if asked)."""
        with self._io:
            with self._lock:
                recent, self._recent = self._recent, []
            try:
                if recent and self._fd >= 0:
                    os.write(self._fd, b"".join(RECORD.pack(OP_READ, layer, end - start, start)
                                                for layer, start, end in recent))
            finally:
                if close and self._fd >= 0:
                    os.close(self._fd)
                    self._fd = -1

    def request_finish(self) -> None:
        """Finish the trace soon, from the flusher thread (safe in a signal handler)."""
        self._finish_requested = True
        self._wake.set()

    def _run(self) -> None:
        while self.active:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            if not self.active:
                return
            try:
                if self._finish_requested:
                    self.finish()
                    return
                self.flush()
            except Exception as e:  # a full disk must not kill the handler: log and go on
                log.warning("trace %s: %s", self.path, e)

    def finish(self) -> int | None:
        """Stop recording and write the trace file; the record count (None if not recording)."""
        with self._lock:
            if not self.active:
                return None
            self.active = False
        self._wake.set()
        self.flush(close=True)
        n = finish_spool(self.path)
        log.info("trace %s written: %d records from %d reads", self.path, n, self.noted)
        return n

    def stop(self) -> None:
        """End of the handler: finish the trace (errors are logged, never raised)."""
        try:
            self.finish()
        except Exception as e:
            log.warning("trace %s not written: %s", self.path, e)


class RecordingLayer:
    """One layer of the stack whose reads are noted by a recorder; everything else passes through.

    The stack reads an ordinary layer with ``read_mapped(0, pos, n)`` (``pos`` in
    the decompressed LSMT file) and a warp (TurboOCI) layer with ``read(off, n)``
    (``off`` in the layer's view of the disk): those are the offsets recorded.
    Reads of prefetch threads (a list replayed while recording) are not the
    workload's and are left out.
    """

    def __init__(self, layer, index: int, recorder: TraceRecorder):
        self.layer = layer
        self.layer_index = index
        self.recorder = recorder
        self.warp = bool(getattr(layer, "warp", False))

    def __getattr__(self, name):
        return getattr(self.layer, name)

    def read_mapped(self, tag: int, byte_offset: int, length: int) -> bytes:
        data = self.layer.read_mapped(tag, byte_offset, length)
        if tag == 0 and not self.warp and not in_background_fetch():
            self.recorder.note(self.layer_index, byte_offset, len(data))
        return data

    def read(self, offset: int, length: int) -> bytes:
        data = self.layer.read(offset, length)
        if self.warp and not in_background_fetch():
            self.recorder.note(self.layer_index, offset, len(data))
        return data
