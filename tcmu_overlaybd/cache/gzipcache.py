"""Decompressed-data cache of gzip layers (spec §4.5).

Inflating from a gzip-index checkpoint costs up to a span (1 MiB) of inflate
per read, so TurboOCI layers keep the *decompressed* tar in a cache directory:

* one sparse file per layer, named by the target digest (``sha256:<hex>``), at
  the same offsets as the uncompressed tar;
* 4 KiB pages, filled a refill unit (default 1 MiB, aligned) at a time;
* a pool cap in GiB; when the files together allocate more, whole files are
  dropped least-recently-used first (a dropped file is truncated to zero, which
  frees its blocks even if another handler still has it open);
* directory 0700 and files 0600: the cache holds image contents.

Crash safety: beside each data file, ``<name>.pages`` (the sidecar) starts with
``SIDECAR_HEADER`` (magic, a random *generation*) followed by one ``PAGE_ENTRY`` per page
= (``PAGE_PRESENT``, ``page_checksum`` of the page's bytes), written *after* the data.
A page is served only if its entry is present and the checksum of the bytes read back
matches, so a torn write, a lost data write after a crash, a truncated file or a
corrupted disk block all read as a miss and are fetched again -- never served.

Each process checks a page's checksum once: the first time it reads the page, or
never when it wrote the page itself (the checksum came from the bytes in memory).
From then on the page is *verified* for that view and read with one ``pread`` of the
asked range and no check, as long as the sidecar's generation is the one the view
remembers.  This is sound because obd never rewrites a page in place with other bytes
(a key names one content, and concurrent refills of a page write identical bytes), so
a verified page changes only through eviction or ``clear``.  Those truncate the
sidecar, then the data file, holding the sidecar's exclusive ``flock``; refills claim
the generation and write under its shared lock, so none re-creates a header between
the two truncations.  Once data is truncated the header is gone, and the next writer
draws a new random generation: a view that reads its data and *then* the header finds
the generation it remembers only if no truncation reached the bytes it read.  On a
mismatch (or a short read) the view forgets every page it verified and checks again.
On a file system without ``flock`` nothing is marked: every read checks its pages.

Policy for anything else that changes a cache file under a running handler (a user
editing it, a media error surfacing after the page left the page cache): the handler
that verified the page keeps serving what it reads; the next process (every ``obd
mount`` starts one) checks the page again and re-fetches it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import struct
import threading
import time

import xxhash

from ..block.source import ByteSource, clamp_read
from ..errors import CorruptDataError, StateError

log = logging.getLogger(__name__)

PAGE = 4096
DEFAULT_REFILL = 1 << 20
#: the sidecar's first bytes: magic, generation (random, drawn when the file starts over)
SIDECAR_HEADER = struct.Struct("<8sQ")
SIDECAR_MAGIC = b"obdgzc2\0"
#: per-page sidecar entry after the header: marker, page_checksum(page bytes)
PAGE_ENTRY = struct.Struct("<II")
PAGE_PRESENT = 0x32504447  # "GDP2" (version 1 sidecars, without a header, used "GBDP": they read as misses)
#: the 32-bit check of a page in its entry: XXH32, seed 0.  Version 1 used CRC-32C, which is
#: no faster on real CPUs and ~15x slower under QEMU's TCG (it emulates SSE4.2 ``crc32``
#: bit by bit: 80 us per page there, XXH32 6 us), where a refill checksums every page
page_checksum = xxhash.xxh32_intdigest
_PRESENT_BYTES = struct.pack("<I", PAGE_PRESENT)
SIDECAR_SUFFIX = ".pages"
#: after an eviction the pool is brought down to this fraction of the cap (hysteresis)
LOW_WATER = 0.9
#: the pool's size is re-read from disk after this fraction of the cap was written, or this often
RESCAN_FRACTION = 1 / 16
RESCAN_SECONDS = 60.0
#: a view refreshes its file's mtime (the LRU clock) at most this often on pure hits
TOUCH_INTERVAL = 30.0

#: a blob named ``registry/repo@<digest>`` or ``.../blobs/<algo>/<hex>`` (OCI layout) is that digest
_NAMED_DIGEST = re.compile(r"(?:@|^)([a-z0-9]+:[a-f0-9]{32,128})$|/blobs/([a-z0-9]+)/([a-f0-9]{32,128})$")


def entry_offset(page: int) -> int:
    """Where page ``page``'s ``PAGE_ENTRY`` sits in the sidecar."""
    return SIDECAR_HEADER.size + page * PAGE_ENTRY.size


def digest_in(name: str) -> str | None:
    """The digest a blob name carries: ``sha256:<hex>``, ``host/repo@sha256:<hex>`` or an OCI
    layout path ``.../blobs/sha256/<hex>``; None for other names (plain paths)."""
    m = _NAMED_DIGEST.search(name)
    if not m:
        return None
    return m.group(1) or f"{m.group(2)}:{m.group(3)}"


class GzipCache:
    """A pool directory of decompressed layer views with a size cap and LRU eviction."""

    def __init__(self, cache_dir: str | os.PathLike, *, capacity_gb: float = 4.0, refill_size: int = DEFAULT_REFILL):
        if refill_size <= 0 or refill_size % PAGE:
            raise StateError(f"gzip cache refill size {refill_size} must be a positive multiple of {PAGE}")
        self.dir = os.fspath(cache_dir)
        self.capacity = int(capacity_gb * (1 << 30))
        self.refill_size = refill_size
        self._lock = threading.Lock()
        self._estimate: int | None = None
        self._since_scan = 0
        self._scanned_at = 0.0
        self._views: list["CachedView"] = []
        self._closed_counts: dict[str, int] = {}
        _prepare_dir(self.dir)

    @classmethod
    def try_open(cls, cache_dir: str | os.PathLike, **kw) -> "GzipCache | None":
        """The pool, or None (with a warning) when its directory is unusable, e.g. for a
        non-root user: reads then simply go uncached."""
        try:
            return cls(cache_dir, **kw)
        except StateError as e:
            log.warning("gzip cache disabled: %s", e)
            return None

    @staticmethod
    def file_name(key: str) -> str:
        """The digest ``key`` carries, as upstream names cache files; other keys are hashed.

        Keying by digest lets every mount of a layer, from any registry, share one file.
        A key must identify the *content*: pages are checked against their own checksum, not
        against the source, so a key reused for other bytes would serve stale pages.
        """
        digest = digest_in(key)
        if digest:
            return digest
        return "key-" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()

    def open(self, key: str, source: ByteSource) -> "CachedView":
        """A ByteSource of ``source`` whose pages are kept in this pool under ``key``."""
        return CachedView(self, self.file_name(key), source)

    def _attach(self, view: "CachedView") -> None:
        with self._lock:
            self._views.append(view)

    def _detach(self, view: "CachedView") -> None:
        """Forget a closing view, keeping what it counted."""
        counts = view.stats()
        with self._lock:
            if view in self._views:
                self._views.remove(view)
                for key, value in counts.items():
                    self._closed_counts[key] = self._closed_counts.get(key, 0) + value

    def stats(self) -> dict:
        """What this process's views of the pool counted, summed (the ``gzip_cache`` object of
        ``obd stats``): ``hits``/``misses`` (reads served from cached pages alone / needing a
        refill), ``bytes_from_cache``, ``bytes_from_source`` (inflated for refills),
        ``refills`` (units), the inflater's ``spans_inflated`` (restarts at a checkpoint),
        ``continued``, ``bytes_inflated``, ``compressed_reads``, ``compressed_bytes``; plus
        ``layers`` (views open now), ``usage_bytes`` and ``capacity_bytes`` of the pool."""
        with self._lock:
            views = list(self._views)
            total = dict(self._closed_counts)
        for view in views:
            for key, value in view.stats().items():
                total[key] = total.get(key, 0) + value
        for key in ("hits", "misses", "bytes_from_cache", "bytes_from_source", "refills"):
            total.setdefault(key, 0)
        try:
            usage = self.usage()
        except StateError:
            usage = None
        return {**total, "layers": len(views), "usage_bytes": usage, "capacity_bytes": self.capacity}

    # --- accounting and eviction ---------------------------------------------------

    def files(self) -> list[tuple[str, int, float]]:
        """``(name, allocated bytes incl. sidecar, last use)`` of every cached layer."""
        out = []
        try:
            names = os.listdir(self.dir)
        except OSError as e:
            raise StateError(f"{self.dir}: cannot list gzip cache: {e.strerror}") from None
        for name in names:
            if name.endswith(SIDECAR_SUFFIX):
                continue
            try:
                st = os.stat(os.path.join(self.dir, name), follow_symlinks=False)
            except FileNotFoundError:
                continue
            used = st.st_blocks * 512
            try:
                used += os.stat(os.path.join(self.dir, name + SIDECAR_SUFFIX)).st_blocks * 512
            except FileNotFoundError:
                pass
            out.append((name, used, st.st_mtime))
        return out

    def usage(self) -> int:
        """Bytes the pool allocates on disk."""
        return sum(used for _, used, _ in self.files())

    def note_written(self, nbytes: int) -> None:
        """Account a refill; evict when the pool may be over its cap.

        Other handler processes fill the same directory, so the running estimate is
        refreshed from disk after every ``RESCAN_FRACTION`` of the cap written here or
        ``RESCAN_SECONDS``; the pool may overshoot by about that much between scans.
        """
        with self._lock:
            now = time.monotonic()
            self._since_scan += nbytes
            if (self._estimate is None or self._since_scan > self.capacity * RESCAN_FRACTION
                    or now - self._scanned_at > RESCAN_SECONDS):
                self._estimate = self.usage()
                self._since_scan = 0
                self._scanned_at = now
            else:
                self._estimate += nbytes
            if self._estimate <= self.capacity:
                return
            self._estimate = self._evict(int(self.capacity * LOW_WATER))

    def _evict(self, target: int, force: bool = False) -> int:
        """Truncate least recently used files until the pool holds at most ``target`` bytes
        (only when it is over the cap, unless ``force``); returns what it then holds."""
        files = self.files()
        total = sum(used for _, used, _ in files)
        if total <= (target if force else self.capacity):
            return total
        for name, used, _ in sorted(files, key=lambda f: f[2]):
            if total <= target:
                break
            if used == 0:
                continue
            _drop_layer(self.dir, name)
            total -= used
        return total

    def prune(self, max_bytes: int | None = None) -> int:
        """Drop least recently used layers down to ``max_bytes`` (default: the cap); returns bytes freed."""
        with self._lock:
            before = self.usage()
            limit = self.capacity if max_bytes is None else max_bytes
            after = before if before <= limit else self._evict(limit, force=True)
            self._estimate = after
        return before - after

    def clear(self, digest: str | None = None) -> int:
        """Delete every cached layer (or the one of ``digest``); returns the bytes freed."""
        freed = 0
        with self._lock:
            for name, used, _ in self.files():
                if digest is not None and name != self.file_name(digest):
                    continue
                _drop_layer(self.dir, name, unlink=True)
                freed += used
            self._estimate = None
        return freed


def _drop_layer(directory: str, name: str, unlink: bool = False) -> None:
    """Truncate (and with ``unlink``, delete) a cached layer: the sidecar first, then the
    data, under the sidecar's exclusive ``flock``.  Refills write under its shared lock,
    so none lands between the two truncations: once the data is gone, the generation
    header is too, and any later one is new (module doc: crash safety)."""
    path = os.path.join(directory, name)
    side = path + SIDECAR_SUFFIX
    try:
        fd = os.open(side, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        fd = -1
    try:
        if fd >= 0:
            _flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            if unlink:
                os.unlink(side)
        try:
            os.truncate(path, 0)
            if unlink:
                os.unlink(path)
        except FileNotFoundError:
            pass
    finally:
        if fd >= 0:
            os.close(fd)  # releases the lock


def _flock(fd: int, op: int) -> bool:
    """``flock(fd, op)``; False on a file system that has no such locks."""
    try:
        fcntl.flock(fd, op)
    except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        return False
    return True


def _prepare_dir(path: str) -> None:
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise StateError(f"{path}: cannot create gzip cache directory: {e.strerror}") from None
    if st.st_uid != os.geteuid():
        raise StateError(f"{path}: gzip cache directory is owned by uid {st.st_uid}, not us")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)


def _open_private(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    return fd


class _Refill:
    """One refill unit being fetched: the bytes, once there, for readers that waited."""

    __slots__ = ("done", "data")

    def __init__(self):
        self.done = threading.Event()
        self.data: bytes | None = None


class CachedView:
    """One layer's decompressed view through the pool (a ByteSource).

    Pages this view checked or wrote are marked in ``_verified`` and then read without
    a checksum while the sidecar's header is ``_header`` (module doc: crash safety)."""

    def __init__(self, pool: GzipCache, file_name: str, source: ByteSource):
        self.pool = pool
        self.source = source
        self.name = source.name
        self.size = source.size
        self.path = os.path.join(pool.dir, file_name)
        try:
            self._data = _open_private(self.path)
            self._side = _open_private(self.path + SIDECAR_SUFFIX)
        except OSError as e:
            raise StateError(f"{self.path}: cannot open gzip cache file: {e.strerror}") from None
        self._caching = True
        self._touched = 0.0
        self._lock = threading.Lock()
        self._inflight: dict[int, _Refill] = {}
        #: one byte per page: 1 once this view checked the page's checksum (or wrote it) while
        #: the sidecar header was ``_header``; reset whenever the header changes
        self._verified = bytearray(-(-self.size // PAGE))
        #: the sidecar header (magic + generation) the marks in ``_verified`` belong to
        self._header = self._read_header()
        #: False on a file system without ``flock``: eviction could then race a refill, so
        #: every read checks its pages (no marks are made)
        self._trusting = True
        #: reads answered from cached pages alone / reads that needed a refill (or went
        #: uncached after a full disk); bytes of reads answered from cached pages; bytes
        #: fetched from ``source``; refill units fetched
        self.hits = 0
        self.misses = 0
        self.bytes_from_cache = 0
        self.bytes_from_source = 0
        self.refills = 0
        self._touch()
        pool._attach(self)

    def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        if not self._caching:
            self._count(misses=1)
            return self._fetch(offset, n)
        first, last = offset // PAGE, (offset + n - 1) // PAGE
        header = self._header
        if header is not None and self._verified.find(0, first, last + 1) < 0:
            # every page verified: the bytes, then the header (a truncation of the data
            # follows the sidecar's, so an unchanged header vouches for what was read)
            data = os.pread(self._data, n, offset)
            if len(data) == n and os.pread(self._side, SIDECAR_HEADER.size, 0) == header:
                with self._lock:  # _count and _touch inlined: this is every warm read
                    self.hits += 1
                    self.bytes_from_cache += n
                if time.monotonic() - self._touched >= TOUCH_INTERVAL:
                    self._touch()
                return data
            self._forget(header)
            header = self._header
        return self._read_checked(offset, n, first, last, header)

    def _read_checked(self, offset: int, n: int, first: int, last: int, header: bytes | None) -> bytes:
        """A read with a checksum check of each page (marking those that pass) and refills of the
        units of pages that fail; ``header``: the sidecar header when the read started."""
        lo = first * PAGE
        hi = min((last + 1) * PAGE, self.size)
        entries = os.pread(self._side, (last - first + 1) * PAGE_ENTRY.size, entry_offset(first))
        data = None
        if _PRESENT_BYTES not in entries:  # a cold range: no page to check, nothing to read back
            missing = list(range(first, last + 1))
        else:
            data = os.pread(self._data, hi - lo, lo)
            if len(data) < hi - lo:
                data += bytes(hi - lo - len(data))
            missing = self._missing_pages(data, entries, first, last - first + 1)
            if not missing:
                self._mark(first, last + 1, header, hit=n)
                if time.monotonic() - self._touched >= TOUCH_INTERVAL:
                    self._touch()
                return data if offset == lo and n == len(data) else data[offset - lo : offset - lo + n]
            gone = set(missing)
            for page in range(first, last + 1):
                if page not in gone:
                    self._mark(page, page + 1, header)
        refill = self.pool.refill_size
        fresh = sorted(self._refill(sorted({p * PAGE // refill for p in missing})), key=lambda unit: unit[0])
        end = offset + n
        missed = sum(min((p + 1) * PAGE, end) - max(p * PAGE, offset) for p in missing)
        self._count(misses=1, from_cache=n - missed)
        if data is None:  # the refilled units cover the whole read: no page buffer to patch
            pieces = [unit[max(offset - u_lo, 0) : end - u_lo] for u_lo, unit in fresh
                      if u_lo < end and u_lo + len(unit) > offset]
            return bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
        buf = bytearray(data)
        for u_lo, unit in fresh:
            a, b = max(u_lo, lo), min(u_lo + len(unit), hi)
            buf[a - lo : b - lo] = unit[a - u_lo : b - u_lo]
        return bytes(memoryview(buf)[offset - lo : end - lo])

    @staticmethod
    def _missing_pages(data: bytes, entries: bytes, first: int, npages: int) -> list[int]:
        """Numbers of the pages (``first`` is ``data[0:PAGE]``) whose sidecar entry is absent,
        not ``PAGE_PRESENT`` or has a checksum other than their bytes' (a short last page is
        checked as it is).  One unpack for all entries."""
        have = min(npages, len(entries) // PAGE_ENTRY.size)
        fields = struct.unpack_from(f"<{2 * have}I", entries)
        view = memoryview(data)
        missing = [first + i for i in range(have) if fields[2 * i] != PAGE_PRESENT
                   or fields[2 * i + 1] != page_checksum(view[i * PAGE : (i + 1) * PAGE])]
        missing.extend(range(first + have, first + npages))
        return missing

    def _read_header(self) -> bytes | None:
        """The sidecar's header if it is one (a fresh, truncated or version 1 sidecar has none)."""
        head = os.pread(self._side, SIDECAR_HEADER.size, 0)
        if len(head) == SIDECAR_HEADER.size and head.startswith(SIDECAR_MAGIC):
            return head
        return None

    def _mark(self, start: int, stop: int, header: bytes | None, hit: int = 0) -> None:
        """Pages ``[start, stop)`` were checked (or written) while the header was ``header``;
        with ``hit``, also count a read of that many bytes answered from them (one lock)."""
        with self._lock:
            if header is not None and header == self._header and self._trusting:
                self._verified[start:stop] = b"\x01" * (stop - start)
            if hit:
                self.hits += 1
                self.bytes_from_cache += hit

    def _forget(self, header: bytes | None) -> None:
        """The header is no longer ``header`` (or the data was short): every mark is void."""
        with self._lock:
            if self._header == header:
                self._verified = bytearray(len(self._verified))
                self._header = self._read_header()

    def _claim_header(self) -> bytes:
        """The sidecar header to write pages under, drawing a new generation for a sidecar
        that has none (new, evicted, or version 1); adopting it forgets the old marks."""
        header = self._read_header()
        if header is None:
            header = SIDECAR_HEADER.pack(SIDECAR_MAGIC, int.from_bytes(os.urandom(8), "little") | 1)
            os.pwrite(self._side, header, 0)
        with self._lock:
            if header != self._header:
                self._verified = bytearray(len(self._verified))
                self._header = header
        return header

    def _count(self, hits: int = 0, misses: int = 0, from_cache: int = 0) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
            self.bytes_from_cache += from_cache

    def _refill(self, units: list[int]) -> list[tuple[int, memoryview]]:
        """Fetch and store the refill ``units`` (sorted); returns ``(offset, bytes)`` per unit.

        Adjacent units this thread fetches go to the source as one read, so a read
        across a unit boundary costs one inflate pass (and, cold, one round trip for
        its compressed input).  Units another thread is fetching are waited for.
        """
        refill = self.pool.refill_size
        with self._lock:
            mine, theirs = [], []
            for unit in units:
                pending = self._inflight.get(unit)
                if pending is None:
                    self._inflight[unit] = _Refill()
                    mine.append(unit)
                else:
                    theirs.append((unit, pending))
        out: list[tuple[int, memoryview]] = []
        try:
            for run in _adjacent_runs(mine):
                r_lo = run[0] * refill
                data = memoryview(self._fetch(r_lo, min(len(run) * refill, self.size - r_lo)))
                self._store(r_lo, data)
                with self._lock:
                    self.refills += len(run)
                for unit in run:
                    fresh = data[(unit - run[0]) * refill : (unit - run[0] + 1) * refill]
                    self._inflight[unit].data = fresh
                    out.append((unit * refill, fresh))
        finally:
            with self._lock:
                done = [self._inflight.pop(unit) for unit in mine]
            for pending in done:
                pending.done.set()
        for unit, pending in theirs:
            pending.done.wait()
            u_lo = unit * refill
            fresh = pending.data
            if fresh is None:  # that fetch failed: try ourselves
                fresh = memoryview(self._fetch(u_lo, min(refill, self.size - u_lo)))
            out.append((u_lo, fresh))
        return out

    def warm_map(self, offset: int, length: int):
        """A miss refills whole ``refill_size`` units from the source: warming a range of this view
        warms those units of the source (pages already cached are not looked at: a replay's
        compressed prefetch may fetch a little that the cache already has)."""
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return self.source, 0, 0
        refill = self.pool.refill_size
        lo = offset // refill * refill
        hi = min(self.size, -(-(offset + n) // refill) * refill)
        return self.source, lo, hi - lo

    def stats(self) -> dict:
        """This view's counters (``GzipCache.stats`` sums them over the pool's views)."""
        with self._lock:
            counts = {"hits": self.hits, "misses": self.misses, "refills": self.refills,
                      "bytes_from_cache": self.bytes_from_cache, "bytes_from_source": self.bytes_from_source}
        counts.update(getattr(self.source, "inflate_stats", dict)())
        return counts

    def _fetch(self, offset: int, n: int):
        """``n`` bytes of the source at ``offset`` (any bytes-like object: the inflater hands
        over the buffer it inflated into, uncopied)."""
        data = self.source.read(offset, n)
        if len(data) != n:
            raise CorruptDataError(
                f"truncated: the layer's uncompressed view has {len(data)} of {n} bytes", blob=self.name, offset=offset
            )
        with self._lock:
            self.bytes_from_source += n
        return data

    def _store(self, offset: int, data: memoryview) -> None:
        """Data first, then the page entries: an entry never describes bytes not yet written.
        The pages written count as verified (their checksums come from these very bytes)."""
        fields = [PAGE_PRESENT, 0] * (-(-len(data) // PAGE))
        fields[1::2] = [page_checksum(data[i : i + PAGE]) for i in range(0, len(data), PAGE)]
        entries = struct.pack(f"<{len(fields)}I", *fields)  # PAGE_ENTRY per page, in one pack
        try:
            if not _flock(self._side, fcntl.LOCK_SH):  # no eviction between claim and writes
                self._trusting = False
            try:
                header = self._claim_header()
                os.pwrite(self._data, data, offset)
                os.pwrite(self._side, entries, entry_offset(offset // PAGE))
            finally:
                _flock(self._side, fcntl.LOCK_UN)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
                raise
            self._caching = False  # keep serving from the source
            return
        self._mark(offset // PAGE, (offset + len(data) + PAGE - 1) // PAGE, header)
        self._touched = time.monotonic()
        self.pool.note_written(len(data) + len(entries))

    def _touch(self) -> None:
        now = time.monotonic()
        if now - self._touched >= TOUCH_INTERVAL:
            self._touched = now
            try:
                os.utime(self._data)
            except OSError:
                pass

    def close(self) -> None:
        if self._data >= 0:
            self.pool._detach(self)
        for fd in (self._data, self._side):
            if fd >= 0:
                os.close(fd)
        self._data = self._side = -1
        self.source.close()


def _adjacent_runs(units: list[int]) -> list[list[int]]:
    """Sorted unit numbers cut into runs of consecutive ones."""
    runs: list[list[int]] = []
    for unit in units:
        if runs and runs[-1][-1] == unit - 1:
            runs[-1].append(unit)
        else:
            runs.append([unit])
    return runs
