"""Background download (spec §8.4, our variant): every block of every blob into the block cache.

Upstream copies a whole layer blob to a local file after a delay, at most
``maxMBps``.  obd has a shared block cache instead, so the download walks the
blobs of the stack (native layer blobs; FastOCI meta and original blobs) block
by block, skips blocks already cached, fetches runs of missing blocks (at most
``RUN_BLOCKS`` per read) and paces itself so the bytes it fetched never exceed
``rate × elapsed`` (``prefetch.backgroundRateMBps``, 1 MB = 10^6 bytes).  It
waits while a trace is being recorded (the trace must show what the workload
reads, not what the download pulled), yields to device reads, and stops at
once when the mount goes away.  Blobs read from a local OCI layout are
already local and skipped.
"""

from __future__ import annotations

import logging
import threading
import time

from ..cache.blockcache import CachedSource, background_fetches, yield_to_foreground
from ..errors import ObdError

log = logging.getLogger(__name__)

#: blocks fetched per read at most (4 × 256 KiB = 1 MiB)
RUN_BLOCKS = 4
#: seconds between two looks at whether a recording is still in progress
RECORDING_POLL_S = 1.0


class BackgroundDownload:
    """Pull ``blobs`` into the cache at most ``rate`` bytes/s; counters go to ``stats``.

    ``recording()`` returns True while a trace is being recorded (the download
    then waits).  ``stats.background_state`` is one of ``waiting``,
    ``suppressed`` (recording), ``running``, ``done``, ``stopped``.
    """

    def __init__(self, blobs: list, rate: float, stats, stop: threading.Event,
                 recording=lambda: False):
        if rate <= 0:
            raise ValueError("background download rate must be > 0")
        self.blobs = [b for b in blobs if isinstance(b, CachedSource)]
        self.rate = rate
        self.stats = stats
        self.stop = stop
        self.recording = recording
        self._sent = 0  # bytes fetched, for the pacing
        self._t0 = 0.0

    def run(self, delay: float = 0.0) -> None:
        """Wait ``delay`` seconds, then download everything (returns when done or stopped)."""
        self.stats.background_state = "waiting"
        if self.stop.wait(delay):
            self.stats.background_state = "stopped"
            return
        self.stats.background_total = sum(b.size for b in self.blobs)
        with background_fetches():
            self._t0 = time.monotonic()
            for blob in self.blobs:
                if not self._blob(blob):
                    self.stats.background_state = "stopped"
                    return
        self.stats.background_state = "done"
        log.info("background download done: %d bytes fetched", self.stats.background_bytes)

    def _blob(self, blob: CachedSource) -> bool:
        bs = blob.cache.block_size
        nblocks = -(-blob.size // bs)
        idx = 0
        while idx < nblocks:
            if not self._may_go():
                return False
            if blob.is_cached(idx):
                self.stats.background_skipped += min(bs, blob.size - idx * bs)
                idx += 1
                continue
            run = 1
            while run < RUN_BLOCKS and idx + run < nblocks and not blob.is_cached(idx + run):
                run += 1
            start, end = idx * bs, min(blob.size, (idx + run) * bs)
            try:
                fetched = blob.fetch_range(start, end - start)
            except ObdError as e:  # the registry went away: device reads will say so; stop quietly
                log.warning("background download of %s stopped: %s", blob.name, e)
                return False
            self._sent += fetched
            self.stats.background_bytes += fetched
            idx += run
            self._pace()
        return True

    def _may_go(self) -> bool:
        """Wait out recordings and device fetches; False once stopped."""
        while self.recording():
            self.stats.background_state = "suppressed"
            if self.stop.wait(RECORDING_POLL_S):
                return False
        self.stats.background_state = "running"
        yield_to_foreground(self.stop)
        return not self.stop.is_set()

    def _pace(self) -> None:
        """Sleep until the bytes fetched so far are within ``rate`` × elapsed."""
        ahead = self._sent / self.rate - (time.monotonic() - self._t0)
        if ahead > 0:
            self.stop.wait(ahead)
