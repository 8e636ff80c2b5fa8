"""Prefetch of one mount: what ``obd mount`` checks and what the handler starts and stops.

CLI side (``obd mount``): ``configure`` validates the prefetch flags before
anything is mounted (a bad trace is a one-line error naming the file), makes
their paths absolute and, for ``--record-trace``, creates the spool;
``abandon`` undoes that when the mount fails; ``after_umount`` writes a trace
whose handler died before it could.

Handler side: ``PrefetchSession.start(state, source)`` right after the handler
reported ready (never delaying ``obd mount``): starts the recorder, then, in one
background thread, replays the ``--prefetch`` file, or else the image's own
acceleration layer (spec §7.2), and afterwards runs the background download
when enabled.  ``stop()`` at the end of the handler stops all of it and
finishes the trace.  SIGUSR1 (``obd record-trace stop``) finishes the trace
while the mount goes on.

``PrefetchSession.stats`` is a plain ``PrefetchStats`` object (``as_dict()``), read by ``obd stats``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass

from .. import config
from ..cache.blockcache import background_fetches
from ..errors import CorruptDataError, ObdError, UsageError
from ..format.trace import PrefetchFile, load_prefetch_file
from . import record

log = logging.getLogger(__name__)

#: prefetch files and acceleration layers larger than this are not read (1 M records = 24 MB)
FILE_MAX = 64 << 20
#: seconds ``stop`` waits for prefetch threads to notice
STOP_WAIT_S = 2.0


@dataclass
class PrefetchStats:
    """Counters of one mount's prefetch (plain attributes; ``as_dict`` for JSON)."""

    #: idle (nothing to replay), planning, replaying, done, failed, stopped
    state: str = "idle"
    #: what is replayed: "trace FILE", "list FILE", "acceleration layer DIGEST", or ""
    source: str = ""
    ranges_total: int = 0
    ranges_done: int = 0
    ranges_failed: int = 0
    #: bytes read by replay (decompressed view), whether they were fetched or already cached
    bytes_prefetched: int = 0
    recording: bool = False
    #: reads noted by the trace recorder
    trace_reads: int = 0
    #: off, waiting, suppressed, running, done, stopped
    background_state: str = "off"
    background_total: int = 0
    background_bytes: int = 0
    background_skipped: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


# ---- CLI side --------------------------------------------------------------------------------


def read_prefetch_file(path: str) -> bytes:
    """The bytes of a trace or prefetch list (at most ``FILE_MAX``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(FILE_MAX + 1)
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    if len(data) > FILE_MAX:
        raise CorruptDataError(f"larger than {FILE_MAX} bytes: not a trace obd records", blob=path)
    return data


def configure(opts, *, record_trace: str | None, prefetch: str | None, prefetch_list: str | None,
              background: bool | None, raw: bool) -> None:
    """Check the prefetch flags of ``obd mount`` and put them into ``opts`` (absolute paths)."""
    if prefetch and prefetch_list:
        raise UsageError("--prefetch and --prefetch-list are exclusive")
    if raw and (record_trace or prefetch or prefetch_list or background):
        raise UsageError("--raw disks are local: --record-trace, --prefetch and background download "
                         "do not apply")
    path = prefetch or prefetch_list
    if path:
        path = os.path.abspath(path)
        load_prefetch_file(read_prefetch_file(path), path, force_list=bool(prefetch_list))
        opts.prefetch_file, opts.prefetch_list = path, bool(prefetch_list)
    if background is not None:
        opts.background_download = background
    if record_trace:
        target = os.path.abspath(record_trace)
        parent = os.path.dirname(target)
        if not os.path.isdir(parent):
            raise UsageError(f"--record-trace {record_trace}: directory {parent} does not exist")
        if path == target:
            raise UsageError("--record-trace FILE must not be the file given to --prefetch")
        record.create_spool(target)
        opts.record_trace = target


def abandon(opts) -> None:
    """The mount failed: remove the spool ``configure`` created."""
    if opts.record_trace:
        try:
            os.unlink(record.spool_path(opts.record_trace))
        except FileNotFoundError:
            pass


def after_umount(options: dict) -> int | None:
    """After ``obd umount``: write the trace from its spool if the handler could not."""
    path = options.get("record_trace")
    if path and os.path.exists(record.spool_path(path)):
        return record.finish_spool(path)
    return None


# ---- handler side ----------------------------------------------------------------------------


def _acceleration_file(disk) -> tuple[bytes, str]:
    """The trace or list in the image's acceleration layer, and a name for messages."""
    from .acceleration import read_layer

    desc = disk.acceleration.descriptor
    name = f"acceleration layer {desc.digest}"
    if desc.size > FILE_MAX:
        raise CorruptDataError(f"{desc.size} bytes is too large for an acceleration layer", blob=name)
    return read_layer(disk.image.store.fetch_blob(desc.digest, desc.size), name), name


class PrefetchSession:
    """The recorder, replay and background download of one handler."""

    def __init__(self):
        self._stats = PrefetchStats()
        self.recorder: record.TraceRecorder | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def start(cls, options: dict, disk) -> "PrefetchSession":
        """Start what ``options`` (the mount's OpenOptions as a dict) asks for on ``disk``.

        ``disk`` is the mount's ``image.disk.ImageDisk`` (anything else, e.g. a raw
        disk, gets an idle session).  Call from the main thread (installs SIGUSR1).
        """
        from ..image.disk import ImageDisk

        self = cls()
        if not isinstance(disk, ImageDisk):
            return self
        if disk.recorder is not None and disk.recorder.start():
            self.recorder = disk.recorder
            self.stats.recording = True
            signal.signal(signal.SIGUSR1, lambda *_: self.recorder.request_finish())
        cfg = config.load()
        background = options.get("background_download")
        if background is None:
            background = cfg["prefetch.background"]
        if options.get("prefetch_file") or disk.acceleration is not None:
            self._stats.state = "planning"
        self._thread = threading.Thread(target=self._run, args=(disk, options, cfg, bool(background)),
                                        name="obd-prefetch", daemon=True)
        self._thread.start()
        return self

    def _plan(self, disk, options: dict, cfg):
        """The pieces to replay (None: nothing to replay)."""
        from .replay import list_pieces, trace_pieces

        path = options.get("prefetch_file")
        if path:
            data, name = read_prefetch_file(path), path
        elif disk.acceleration is not None:
            data, name = _acceleration_file(disk)
        else:
            return None
        spec: PrefetchFile = load_prefetch_file(data, name, force_list=bool(options.get("prefetch_list")))
        self.stats.source = f"{spec.kind} {name}"
        if spec.kind == "trace":
            return trace_pieces(disk.data_layers, list(spec.records), name, cfg["prefetch.mergeGapKb"] << 10)
        return list_pieces(disk, list(spec.paths), name)

    def _run(self, disk, options: dict, cfg, background: bool) -> None:
        with background_fetches():  # planning reads (a list's ext4 lookups) are prefetch too
            self._replay_then_download(disk, options, cfg, background)

    def _replay_then_download(self, disk, options: dict, cfg, background: bool) -> None:
        from .background import BackgroundDownload
        from .replay import Replayer

        t0 = time.monotonic()
        try:
            pieces = self._plan(disk, options, cfg)
            if pieces is not None:
                self.stats.state = "replaying"
                Replayer(pieces, cfg["prefetch.concurrency"], self.stats, self._stop).start().join()
                self.stats.state = "stopped" if self._stop.is_set() else "done"
                log.info("prefetch %s: %d of %d ranges, %d bytes", self.stats.source, self.stats.ranges_done,
                         self.stats.ranges_total, self.stats.bytes_prefetched)
        except ObdError as e:
            self.stats.state = "failed"
            log.warning("prefetch: %s", e)
        if background and not self._stop.is_set():
            delay = max(0.0, cfg["prefetch.backgroundDelay"] - (time.monotonic() - t0))
            recorder = self.recorder
            BackgroundDownload(disk.blobs, cfg["prefetch.backgroundRateMBps"] * 1e6, self.stats, self._stop,
                               recording=lambda: recorder is not None and recorder.active).run(delay)

    @property
    def stats(self) -> PrefetchStats:
        """The counters (the recorder's folded in at each access)."""
        rec = self.recorder
        if rec is not None:
            self._stats.recording = rec.active
            self._stats.trace_reads = rec.noted
        return self._stats

    def as_dict(self) -> dict:
        """The counters as a dict (what the handler's telemetry reports under ``prefetch``)."""
        return self.stats.as_dict()

    def stop(self) -> None:
        """End of the handler: stop replay and download, finish the trace being recorded."""
        self._stop.set()
        if self.recorder is not None:  # first: the trace matters more than a prefetch in flight
            self.recorder.stop()
        if self._thread is not None:
            self._thread.join(STOP_WAIT_S)
