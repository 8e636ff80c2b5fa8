"""The on-disk block cache shared by every mount and process (issue 3, spec §8.2).

Layer blobs are content-addressed and immutable, so the cache stores fixed-size,
aligned blocks of a blob keyed by its digest; a block never changes once written.

On-disk layout (one directory per cache, dirs 0700, files 0600)::

    <dir>/.lock                          flock: serialises inserts and evictions
    <dir>/.usage                         decimal byte count of all block files
    <dir>/tmp/<pid>.<n>                  blocks being written (never read)
    <dir>/v1-<block_size>/<algo>/<hex>/<index>   block ``index`` of blob ``algo:hex``

Crash safety: a block is written to ``tmp/`` and renamed into place, so a reader
sees a complete file or none; a reader also checks the file length against the
length the block must have (``block_size`` or the blob's tail), so a block
truncated by a power cut reads as a miss and is fetched again.  Temp files of
dead writers are removed by the next eviction scan.

Size cap: every insert takes the lock and charges the block to ``.usage``
before renaming it into place (a crash in between over-counts, never
under-counts); when the insert would exceed the cap, the cache scans its block
files (the bytes it owns, nothing else in the file system), deletes least
recently used blocks down to ``LOW_WATER`` of the cap and rewrites ``.usage``
from the scan.  Recency is the block file's mtime, refreshed by a hit when it is
older than ``TOUCH_INTERVAL`` (so LRU order has that resolution).  Readers in
other processes that lose a block to eviction see a miss, or keep reading the
same bytes from an fd they hold.  Threads of one process that miss the same
block wait for one fetch instead of each fetching it.

Parallel fetches: a read that misses several blocks sends up to
``parallel_fetches`` (``io.parallelFetches``) Range requests at once, each for a
run of whole adjacent blocks, so a cold 1 MiB read costs about one round trip
instead of four (see ``split_runs``).

Priority: fetches of device reads are counted process-wide; prefetch threads
(marked with ``background_fetches()``) call ``yield_to_foreground()`` between
their fetches, which waits (boundedly) while any device fetch is in flight.
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import itertools
import logging
import os
import resource
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

from .. import config
from ..block.source import ByteSource, clamp_read
from ..errors import CorruptDataError, StateError, UsageError

log = logging.getLogger(__name__)

DEFAULT_DIR = "/var/cache/obd/blocks"
DEFAULT_BLOCK_SIZE = 256 * 1024  # overlaybd's refillSize (spec §8.2)
#: an eviction frees blocks until usage is at most this fraction of the cap
LOW_WATER = 0.9
#: seconds between two mtime refreshes of the same block by one process
TOUCH_INTERVAL = 30.0
def _fd_table_size() -> int:
    """Open block files kept per cache object: a quarter of the fd limit, 64..1024."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(64, min(1024, soft // 4))


#: open block files kept per cache object (fd reuse makes warm reads cheap)
FD_CACHE_SIZE = _fd_table_size()
FORMAT_PREFIX = "v1-"
#: Range requests in flight per cold read (the ``io.parallelFetches`` default)
DEFAULT_PARALLEL_FETCHES = 4
#: threads of the process-wide pool that sends the extra requests of parallel fetches
FETCH_POOL_THREADS = 32

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    """The process-wide pool of fetch threads (created on first use, so after any fork)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(FETCH_POOL_THREADS, thread_name_prefix="obd-fetch")
        return _pool


#: the longest a prefetch thread waits for device fetches to finish before its next fetch
YIELD_MAX_S = 0.5

_kind = threading.local()  # .background: this thread fetches for prefetch, not for a reader
_fg_cond = threading.Condition()
_fg_fetches = 0  # fetches of foreground (device) reads in flight in this process


@contextlib.contextmanager
def background_fetches():
    """Mark the fetches of this thread, for the duration, as prefetch (lower priority)."""
    _kind.background = True
    try:
        yield
    finally:
        _kind.background = False


def in_background_fetch() -> bool:
    """Whether this thread fetches for prefetch (inside ``background_fetches()``)."""
    return getattr(_kind, "background", False)


def yield_to_foreground(stop: threading.Event | None = None, max_wait: float = YIELD_MAX_S) -> None:
    """Wait while device reads are fetching (at most ``max_wait`` s, or until ``stop`` is set)."""
    with _fg_cond:
        if _fg_fetches:
            _fg_cond.wait_for(lambda: _fg_fetches == 0 or (stop is not None and stop.is_set()), max_wait)


def foreground_fetches() -> int:
    """Device-read fetches in flight in this process right now."""
    return _fg_fetches


def _foreground_delta(n: int) -> None:
    global _fg_fetches
    with _fg_cond:
        _fg_fetches += n
        if not _fg_fetches:
            _fg_cond.notify_all()


def split_runs(runs: list[list[int]], parallel: int) -> list[list[int]]:
    """Cut runs of adjacent block indexes into at most ``parallel`` requests where possible.

    Runs are never merged (they are not adjacent); while there are fewer pieces
    than ``parallel``, the longest piece is halved on a block boundary.  Pieces
    come back in block order.
    """
    heap = [(-len(r), r[0], r) for r in runs]
    heapq.heapify(heap)
    while len(heap) < parallel and heap and -heap[0][0] > 1:
        _n, _first, run = heapq.heappop(heap)
        half = len(run) // 2
        for piece in (run[:half], run[half:]):
            heapq.heappush(heap, (-len(piece), piece[0], piece))
    return [r for _n, _first, r in sorted(heap, key=lambda e: e[1])]


@dataclass
class CacheStats:
    """Counters of one process's use of a cache (``obd stats`` reads them)."""

    hits: int = 0  # blocks served from disk
    misses: int = 0  # blocks fetched from the base source
    bytes_fetched: int = 0  # bytes read from base sources (registries)
    fetch_requests: int = 0  # calls to a base source (merged ranges count once)
    bytes_served: int = 0  # bytes returned to readers
    evicted_bytes: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass(frozen=True)
class BlockEntry:
    """One block file as seen by a scan."""

    path: str
    digest: str
    index: int
    size: int
    mtime: float


def _split_digest(key: str) -> tuple[str, str]:
    algo, sep, hexpart = key.partition(":")
    if not sep or not algo.isalnum() or not hexpart or not all(c.isalnum() for c in hexpart):
        raise UsageError(f"cache key must be a digest algo:hex, got {key!r}")
    return algo, hexpart


def _makedirs_private(path: str) -> None:
    """``os.makedirs`` that makes every missing level 0700 (makedirs only does the leaf)."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.isdir(parent):
        _makedirs_private(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class BlockCache:
    """Fixed-size aligned blocks of immutable blobs on disk, under a hard byte cap."""

    def __init__(self, dir: str | os.PathLike | None, capacity_bytes: int,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        if block_size < 4096 or block_size & (block_size - 1):
            raise UsageError(f"cache block size must be a power of two >= 4096, got {block_size}")
        if capacity_bytes < block_size:
            raise UsageError(f"cache capacity {capacity_bytes} is smaller than one block ({block_size})")
        self.dir = os.path.abspath(os.fspath(dir or DEFAULT_DIR))
        self.capacity = int(capacity_bytes)
        self.block_size = block_size
        self.counters = CacheStats()
        #: Range requests one cold read may have in flight (``io.parallelFetches``)
        self.parallel_fetches = DEFAULT_PARALLEL_FETCHES
        self._blocks_dir = os.path.join(self.dir, f"{FORMAT_PREFIX}{block_size}")
        self._tmp_dir = os.path.join(self.dir, "tmp")
        self._seq = itertools.count()
        self._lock = threading.Lock()  # in-process: open-file table, in-flight fetches, counters
        self._fds: OrderedDict[str, _OpenBlock] = OrderedDict()
        self._blob_dirs: dict[str, str] = {}  # digest -> its block directory (validated once)
        self._inflight: dict[tuple[str, int], threading.Event] = {}  # blocks being fetched here
        self._write_failed = False  # warned once that blocks cannot be stored
        for d in (self.dir, self._blocks_dir, self._tmp_dir):
            self._mkdir(d)
        self._lock_path = os.path.join(self.dir, ".lock")
        self._usage_path = os.path.join(self.dir, ".usage")
        try:
            with self._exclusive():
                if not os.path.exists(self._usage_path):
                    self._write_usage(self._scan_total())
        except OSError as e:
            raise StateError(f"cache directory {self.dir}: {e.strerror}") from None

    # ---- paths and small helpers -------------------------------------------------
    def _mkdir(self, path: str) -> None:
        try:
            _makedirs_private(path)
        except OSError as e:
            raise StateError(f"cache directory {path}: {e.strerror}") from None

    def block_path(self, key: str, index: int) -> str:
        d = self._blob_dirs.get(key)
        if d is None:
            algo, hexpart = _split_digest(key)
            d = self._blob_dirs[key] = os.path.join(self._blocks_dir, algo, hexpart) + os.sep
        return d + str(index)

    def _exclusive(self):
        return _FileLock(self._lock_path)

    def _read_usage(self) -> int:
        try:
            with open(self._usage_path, "rb") as f:
                return int(f.read().strip() or b"0")
        except (FileNotFoundError, ValueError):
            return self._scan_total()

    def _write_usage(self, n: int) -> None:
        tmp = self._tmp_name()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, str(max(0, n)).encode())
        finally:
            os.close(fd)
        os.replace(tmp, self._usage_path)

    def _tmp_name(self) -> str:
        return os.path.join(self._tmp_dir, f"{os.getpid()}.{threading.get_ident()}.{next(self._seq)}")

    # ---- reads ----------------------------------------------------------------
    def get(self, key: str, index: int, expected_len: int, offset: int = 0,
            length: int | None = None) -> bytes | None:
        """Bytes ``[offset, offset+length)`` of a cached block, or None on a miss.

        A block whose file length is not ``expected_len`` (torn by a crash) is a miss
        and is removed.  Reads of different threads run in parallel: the lock only
        guards the table of open block files, never a ``pread``.
        """
        d = self._blob_dirs.get(key)
        path = d + str(index) if d is not None else self.block_path(key, index)
        if length is None:
            length = expected_len - offset
        lock, fds = self._lock, self._fds
        with lock:
            handle = fds.get(path)
            if handle is not None:
                fds.move_to_end(path)
                handle.users += 1
        if handle is None:
            handle = self._open_block(path, expected_len)
            if handle is None:
                return None
        try:
            data = os.pread(handle.fd, length, offset)
        except BaseException:
            with lock:
                self._unuse(handle)
            raise
        now = time.monotonic()
        with lock:
            handle.users -= 1  # _unuse, inline: this is every hit's path
            if handle.retired and handle.users == 0:
                os.close(handle.fd)
            counters = self.counters
            counters.hits += 1
            counters.bytes_served += len(data)
            touch = now - handle.touched >= TOUCH_INTERVAL
            if touch:
                handle.touched = now
        if touch:  # refresh the LRU time other processes see
            try:
                os.utime(path)
            except FileNotFoundError:
                pass
        return data

    @staticmethod
    def _unuse(handle: "_OpenBlock") -> None:
        """One reader is done with ``handle`` (lock held)."""
        handle.users -= 1
        if handle.retired and handle.users == 0:
            os.close(handle.fd)

    def _open_block(self, path: str, expected_len: int) -> "_OpenBlock | None":
        """Open a block file into the fd table (one user counted), or None if absent/torn."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # absent, or unreadable: a miss either way
            return None
        st = os.fstat(fd)
        if st.st_size != expected_len:
            os.close(fd)
            self._discard_torn(path, expected_len)
            return None
        with self._lock:
            handle = self._fds.get(path)
            if handle is None:
                handle = self._fds[path] = _OpenBlock(fd)
                age = time.time() - st.st_mtime
                if age < TOUCH_INTERVAL:  # recent enough for LRU: no utime yet
                    handle.touched = time.monotonic() - age
                while len(self._fds) > FD_CACHE_SIZE:
                    self._fds.popitem(last=False)[1].retire()
            else:  # another thread opened it meanwhile
                os.close(fd)
            handle.users += 1
        return handle

    def discard(self, key: str, index: int) -> None:
        """Forget one block (e.g. its bytes failed a format checksum); the next read refetches it."""
        path = self.block_path(key, index)
        with self._lock:
            handle = self._fds.pop(path, None)
            if handle is not None:
                handle.retire()
        with self._exclusive():
            try:
                size = os.stat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                return
            self._write_usage(self._read_usage() - size)

    def _discard_torn(self, path: str, expected_len: int) -> None:
        with self._exclusive():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                return
            if st.st_size != expected_len:
                os.unlink(path)
                self._write_usage(self._read_usage() - st.st_size)

    def _claim(self, key: str, indexes: list[int]) -> tuple[list[int], list[tuple[int, threading.Event]]]:
        """Split ``indexes`` into blocks this thread must fetch and (block, event) pairs in flight elsewhere."""
        mine, theirs = [], []
        with self._lock:
            for idx in indexes:
                ev = self._inflight.get((key, idx))
                if ev is None:
                    self._inflight[(key, idx)] = threading.Event()
                    mine.append(idx)
                else:
                    theirs.append((idx, ev))
        return mine, theirs

    def _release(self, key: str, indexes: list[int]) -> None:
        with self._lock:
            for idx in indexes:
                self._inflight.pop((key, idx)).set()

    # ---- writes and eviction ---------------------------------------------------------
    def put(self, key: str, index: int, data: bytes | memoryview) -> None:
        """Store one complete block (see ``put_many``)."""
        self.put_many(key, [(index, data)])

    def put_many(self, key: str, blocks: list[tuple[int, bytes | memoryview]]) -> None:
        """Store complete blocks of blob ``key``: each is written to ``tmp/``, then, under one
        lock, they are charged to ``.usage`` together and renamed into place.

        One lock, one usage update and no directory check per block keep a fetched
        run cheap (the blob's directory is made only when a rename finds it missing).
        A cache that cannot be written (full disk, read-only, permissions) only
        costs speed: the failure is logged once and the read goes on uncached.
        """
        for _index, data in blocks:
            if len(data) > self.block_size:
                raise ValueError(f"block of {len(data)} bytes > block size {self.block_size}")
        if len(blocks) > 1 and sum(len(d) for _i, d in blocks) > self.capacity:
            for block in blocks:  # a run larger than the cap: evict block by block
                self.put_many(key, [block])
            return
        written: list[tuple[str, str, int]] = []  # (tmp, path, size)
        try:
            for index, data in blocks:
                tmp = self._tmp_name()
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                written.append((tmp, self.block_path(key, index), len(data)))
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view):]
                finally:
                    os.close(fd)
            with self._exclusive():
                fresh = []
                for tmp, path, n in written:
                    if os.path.exists(path):
                        os.unlink(tmp)
                    else:
                        fresh.append((tmp, path, n))
                if not fresh:
                    return
                need = sum(n for _t, _p, n in fresh)
                usage = self._read_usage()
                if usage + need > self.capacity:
                    usage = self._evict_locked(self.capacity - need)
                # charge first: a crash before the renames over-counts, which only evicts early
                self._write_usage(usage + need)
                for tmp, path, _n in fresh:
                    try:
                        os.rename(tmp, path)
                    except FileNotFoundError:  # the blob's first block here (or its dir was evicted)
                        _makedirs_private(os.path.dirname(path))
                        os.rename(tmp, path)
        except OSError as e:
            for tmp, _path, _n in written:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            if not self._write_failed:
                self._write_failed = True
                log.warning("block cache %s: cannot store blocks (%s); reading uncached", self.dir, e.strerror)

    def scan(self) -> list[BlockEntry]:
        """Every block file of every block size, with size and last-use time."""
        out = []
        try:
            formats = [e for e in os.scandir(self.dir) if e.is_dir() and e.name.startswith(FORMAT_PREFIX)]
        except FileNotFoundError:
            return out
        for fmt in formats:
            for algo in os.scandir(fmt.path):
                for blob in os.scandir(algo.path):
                    digest = f"{algo.name}:{blob.name}"
                    try:
                        entries = list(os.scandir(blob.path))
                    except FileNotFoundError:
                        continue
                    for e in entries:
                        try:
                            st = e.stat()
                            idx = int(e.name)
                        except (FileNotFoundError, ValueError):
                            continue
                        out.append(BlockEntry(e.path, digest, idx, st.st_size, st.st_mtime))
        return out

    def _scan_total(self) -> int:
        return sum(e.size for e in self.scan())

    def _evict_locked(self, target: int) -> int:
        """Delete LRU blocks until usage <= min(target, LOW_WATER*cap); returns new usage."""
        self._clean_tmp()
        entries = self.scan()
        total = sum(e.size for e in entries)
        goal = min(target, int(self.capacity * LOW_WATER))
        if total <= goal:
            return total
        for e in sorted(entries, key=lambda e: e.mtime):
            if total <= goal:
                break
            try:
                os.unlink(e.path)
            except FileNotFoundError:
                pass
            total -= e.size
            self.counters.evicted_bytes += e.size
            try:
                os.rmdir(os.path.dirname(e.path))
            except OSError:
                pass
        return total

    def _clean_tmp(self) -> None:
        for e in os.scandir(self._tmp_dir):
            pid = e.name.split(".", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                try:
                    os.unlink(e.path)
                except FileNotFoundError:
                    pass

    def stats(self) -> dict:
        """This process's hits, misses, bytes fetched/served/evicted, plus usage and capacity."""
        with self._lock:
            out = self.counters.as_dict()
        out.update(usage=self.usage(), capacity=self.capacity, block_size=self.block_size)
        return out

    def usage(self) -> int:
        """Bytes of block files, as charged (exact unless a writer crashed mid-insert)."""
        return self._read_usage()

    def prune(self, max_bytes: int | None = None) -> int:
        """Evict down to ``max_bytes`` (default: the cap); returns bytes freed."""
        with self._exclusive():
            before = self._scan_total()
            limit = self.capacity if max_bytes is None else max_bytes
            after = before if before <= limit else self._evict_locked(limit)
            self._clean_tmp()
            self._write_usage(after)
        return before - after

    def clear(self, digest: str | None = None) -> int:
        """Remove every block (or those of one digest); returns bytes freed."""
        freed = 0
        with self._exclusive():
            for e in self.scan():
                if digest is None or e.digest == digest:
                    try:
                        os.unlink(e.path)
                        freed += e.size
                    except FileNotFoundError:
                        pass
            for root, dirs, _files in os.walk(self.dir, topdown=False):
                for d in dirs:
                    try:
                        os.rmdir(os.path.join(root, d))
                    except OSError:
                        pass
            for d in (self._blocks_dir, self._tmp_dir):
                self._mkdir(d)
            self._clean_tmp()
            self._write_usage(self._scan_total())
        self.close_fds()
        return freed

    def close_fds(self) -> None:
        """Close the block files this object keeps open (reads in progress finish first)."""
        with self._lock:
            for handle in self._fds.values():
                handle.retire()
            self._fds.clear()


class _OpenBlock:
    """An open block file shared by readers; closed when retired and unused (lock held)."""

    __slots__ = ("fd", "users", "retired", "touched")

    def __init__(self, fd: int):
        self.fd = fd
        self.users = 0
        self.retired = False
        self.touched = -TOUCH_INTERVAL  # time.monotonic() of the last LRU refresh

    def retire(self) -> None:
        if self.users == 0:
            os.close(self.fd)
        else:
            self.retired = True


class _FileLock:
    """An exclusive ``flock`` on a lock file, for the duration of a ``with`` block."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)  # closing drops the flock
        self.fd = -1


#: an event that is set: a block found cached after all is "fetched by another thread, done"
_DONE = threading.Event()
_DONE.set()


class CachedSource:
    """A ByteSource reading ``base`` through a BlockCache, fetching only missing blocks.

    Consecutive missing blocks of one read are fetched together: as one
    ``base.read`` (one Range GET for a registry blob), or, up to ``parallel``
    (default: the cache's ``parallel_fetches``), as that many concurrent reads
    of whole-block pieces; ``base.read`` must therefore be thread-safe.  Sequential reads that miss grow a readahead window
    (doubling from ``READAHEAD_MIN`` up to ``READAHEAD_MAX`` blocks) so a streaming
    reader makes few large requests; random reads never read ahead.  ``key`` is the
    blob's digest: the cache trusts that the same key always names the same bytes.
    """

    READAHEAD_MIN = 2
    READAHEAD_MAX = 16

    def __init__(self, base: ByteSource, cache: BlockCache, key: str, parallel: int | None = None):
        self.base = base
        self.cache = cache
        self.key = key
        self.parallel = max(1, parallel if parallel is not None else cache.parallel_fetches)
        self.name = base.name
        self.size = base.size
        _split_digest(key)
        # readahead heuristic state (races between threads only tune it, never corrupt)
        self._next_offset = -1
        self._sequential_misses = 0
        self._window = 0

    def is_cached(self, index: int) -> bool:
        """Whether block ``index`` of this blob is in the cache (a torn block counts until read)."""
        return os.path.exists(self.cache.block_path(self.key, index))

    def fetch_range(self, offset: int, length: int) -> int:
        """Make the blocks under ``[offset, offset+length)`` cached without reading ahead
        (background download); returns the bytes of the blocks that were missing."""
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return 0
        bs = self.cache.block_size
        first, last = offset // bs, (offset + n - 1) // bs
        missing = [i for i in range(first, last + 1) if not self.is_cached(i)]
        if missing:
            self._fill(missing, offset, offset + n, first, [None] * (last - first + 1))
        return sum(self._block_len(i) for i in missing)

    def _block_len(self, index: int) -> int:
        bs = self.cache.block_size
        return min(bs, self.size - index * bs)

    def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        end = offset + n
        bs = self.cache.block_size
        first, last = offset // bs, (end - 1) // bs
        sequential = offset == self._next_offset
        self._next_offset = end
        if first == last:  # the common case: inside one block
            lo = offset - first * bs
            data = self.cache.get(self.key, first, min(bs, self.size - first * bs), lo, n)
            if data is not None:
                return data
        parts: list[bytes | None] = list(self._cached_parts(offset, end, first, last))
        missing = [first + i for i, data in enumerate(parts) if data is None]
        if missing:
            self._fill(missing, offset, end, first, parts, self._readahead(sequential, missing[-1] == last, last))
        return b"".join(parts) if len(parts) > 1 else parts[0]

    def read_cached(self, offset: int, length: int) -> bytes | None:
        """The bytes ``read`` would return if every block they lie in is cached, else None.

        Never fetches, reads ahead or waits for another thread's fetch (the TCMU
        handler serves such reads on its ring thread and hands only the others to
        its workers); it may open a block file, a local system call.
        """
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        end = offset + n
        bs = self.cache.block_size
        first, last = offset // bs, (end - 1) // bs
        if first == last:
            return self.cache.get(self.key, first, self._block_len(first), offset - first * bs, n)
        parts = []
        for data in self._cached_parts(offset, end, first, last):
            if data is None:
                return None
            parts.append(data)
        return b"".join(parts)

    def _cached_parts(self, offset: int, end: int, first: int, last: int) -> Iterator[bytes | None]:
        """For each block ``first..last``, its part of ``[offset, end)`` from the cache, or None
        where the block is not cached (lazily: a caller may stop at the first None)."""
        bs = self.cache.block_size
        get, key = self.cache.get, self.key
        for idx in range(first, last + 1):
            lo = max(offset, idx * bs) - idx * bs
            hi = min(end, (idx + 1) * bs) - idx * bs
            yield get(key, idx, self._block_len(idx), lo, hi - lo)

    def _readahead(self, sequential: bool, tail_missing: bool, last: int) -> list[int]:
        """Blocks after ``last`` to fetch along with a sequential miss (uncached ones only)."""
        if not (sequential and tail_missing):
            self._sequential_misses = 0
            self._window = 0
            return []
        self._sequential_misses += 1
        if self._sequential_misses < 2:
            return []
        self._window = min(self.READAHEAD_MAX, max(self.READAHEAD_MIN, 2 * self._window))
        nblocks = -(-self.size // self.cache.block_size)
        ahead = []
        for idx in range(last + 1, min(nblocks, last + 1 + self._window)):
            if self.is_cached(idx):
                break
            ahead.append(idx)
        return ahead

    def _fill(self, missing: list[int], offset: int, end: int, first: int, parts: list,
              ahead: list[int] = ()) -> None:
        """Fetch the missing blocks (and the readahead blocks ``ahead``), store them, fill ``parts``.

        Blocks another thread of this process is already fetching are waited for,
        not fetched twice; the rest go out as runs of adjacent blocks, up to
        ``self.parallel`` requests at once (see ``split_runs``), or, in a background
        fetch, one request per run.
        """
        foreground = not in_background_fetch()
        if foreground:
            _foreground_delta(1)
        try:
            self._fill_claimed(missing, offset, end, first, parts, ahead)
        finally:
            if foreground:
                _foreground_delta(-1)

    def _fill_claimed(self, missing: list[int], offset: int, end: int, first: int, parts: list,
                      ahead: list[int], recheck: bool = True) -> None:
        bs = self.cache.block_size
        mine, theirs = self.cache._claim(self.key, list(missing) + list(ahead))
        # another thread's fetch may have ended between the caller's look and this claim
        landed = [idx for idx in mine if self.is_cached(idx)] if recheck else []
        if landed:
            self.cache._release(self.key, landed)
            gone = set(landed)
            mine = [idx for idx in mine if idx not in gone]
            theirs += [(idx, _DONE) for idx in landed]
        wanted = set(missing)
        theirs = [(idx, done) for idx, done in theirs if idx in wanted]
        try:
            runs: list[list[int]] = []
            for idx in mine:
                if runs and runs[-1][-1] == idx - 1:
                    runs[-1].append(idx)
                else:
                    runs.append([idx])
            # a background fetch (replay, whole-image download) runs beside others of its own:
            # one request per run, not ``parallel`` smaller ones (each costs the registry a request)
            pieces = runs if in_background_fetch() else split_runs(runs, self.parallel)
            if len(pieces) == 1:
                self._fetch_run(pieces[0], offset, end, first, parts)
            elif pieces:
                self._fetch_parallel(pieces, offset, end, first, parts)
        finally:
            self.cache._release(self.key, mine)
        for idx, done in theirs:
            done.wait()
            lo = max(offset, idx * bs) - idx * bs
            hi = min(end, (idx + 1) * bs) - idx * bs
            data = self.cache.get(self.key, idx, self._block_len(idx), lo, hi - lo)
            if data is None:  # that fetch failed or the block was evicted at once: our turn
                self._fill_claimed([idx], offset, end, first, parts, [], recheck=False)
            else:
                parts[idx - first] = data

    def _fetch_parallel(self, pieces: list[list[int]], offset: int, end: int, first: int,
                        parts: list) -> None:
        """Fetch ``pieces`` with at most ``self.parallel`` in flight: this thread and pool threads
        take pieces from one queue; the first failure is raised once every piece is done."""
        queue = iter(pieces)
        lock = threading.Lock()

        def drain() -> None:
            while True:
                with lock:
                    piece = next(queue, None)
                if piece is None:
                    return
                self._fetch_run(piece, offset, end, first, parts)

        pool = _fetch_pool()
        helpers = [pool.submit(drain) for _ in range(min(self.parallel, len(pieces)) - 1)]
        error: BaseException | None = None
        try:
            drain()
        except BaseException as e:  # wait for the helpers first: they fill ``parts``
            error = e
        for fut in helpers:
            try:
                fut.result()
            except BaseException as e:
                error = error or e
        if error is not None:
            raise error

    def _fetch_run(self, run: list[int], offset: int, end: int, first: int, parts: list) -> None:
        """One base read for adjacent blocks ``run``; every block is stored."""
        bs = self.cache.block_size
        stats = self.cache.counters
        start = run[0] * bs
        want = sum(self._block_len(i) for i in run)
        data = self.base.read(start, want)
        if len(data) != want:
            raise CorruptDataError(
                f"source returned {len(data)} bytes for a {want}-byte range", blob=self.name, offset=start
            )
        with self.cache._lock:
            stats.misses += len(run)
            stats.bytes_fetched += want
            stats.fetch_requests += 1
        view = memoryview(data)
        blocks = [(idx, view[idx * bs - start : idx * bs - start + self._block_len(idx)]) for idx in run]
        self.cache.put_many(self.key, blocks)
        served = 0
        for idx, block in blocks:
            if idx - first >= len(parts):  # readahead: stored only
                continue
            lo = max(offset, idx * bs) - idx * bs
            hi = min(end, (idx + 1) * bs) - idx * bs
            parts[idx - first] = bytes(block[lo:hi])
            served += hi - lo
        with self.cache._lock:
            stats.bytes_served += served

    def invalidate(self, offset: int, length: int) -> None:
        """Drop the cached blocks under ``[offset, offset+length)``.

        For readers that find bad bytes (a ZFile block CRC mismatch): after this the
        range is fetched again instead of failing forever from the cache.
        """
        bs = self.cache.block_size
        end = min(self.size, offset + length)
        if end <= offset:
            return
        for idx in range(offset // bs, (end - 1) // bs + 1):
            self.cache.discard(self.key, idx)

    def close(self) -> None:
        self.base.close()


_shared: dict[tuple[str, int], BlockCache] = {}
_shared_lock = threading.Lock()


def shared_cache(dir: str | None, capacity_bytes: int | None, block_size: int = DEFAULT_BLOCK_SIZE) -> BlockCache:
    """The process-wide BlockCache for ``dir`` (one object per directory and block size)."""
    path = os.path.abspath(dir or DEFAULT_DIR)
    with _shared_lock:
        cache = _shared.get((path, block_size))
        if cache is None:
            cap = capacity_bytes if capacity_bytes else 4 << 30
            cache = BlockCache(path, cap, block_size)
            cache.parallel_fetches = config.load()["io.parallelFetches"]
            _shared[(path, block_size)] = cache
        return cache
