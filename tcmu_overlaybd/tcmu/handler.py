"""The serving loop: wait on the uio fd, drain the ring, execute, complete.

One ring thread owns consumption (spec tcmu.md §1.9).  How commands are
completed depends on the source:

* a *local* source (``local = True``: a raw file, a local OCI layout) never
  waits for a network, so the ring thread serves every command itself, in ring
  order: each response goes into the command's own slot, the tail moves once
  per wake-up and one ``write(4)`` tells the kernel (tcmu-runner's batching,
  §7.3, without its hand-off to an I/O thread).  READs with one data buffer
  are decoded straight from the ring (no Command object, no CDB copy) and, with
  ``readinto``, read in place into the mapped data area.
* a *remote* source (registry blobs) may wait for the network: the ring thread
  answers the cheap commands and hands READs to a pool of worker threads, so a
  read that waits for the registry never holds back one the cache can answer.
  A source with ``read_cached(offset, length) -> bytes | None`` (non-blocking:
  None unless every block is cached) lets the ring thread serve cache hits
  itself; only the misses pay the hop to a worker.
  Completions are then out of order (slot stealing), serialised by a lock, and
  the ``write(4)`` is coalesced: only the thread that finds no notification in
  progress writes, and it repeats while others completed meanwhile (§7.3).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading

from ..errors import NetworkError, ObdError
from .ring import (ENTRY, HDR_UFLAGS_OFF, MB_CMD_HEAD_OFF, OP_CMD, OP_MASK, OP_PAD, OP_TMR,
                   RSP_STATUS_OFF, U32, UFLAG_UNKNOWN_OP, Command, Ring)
from .scsi import (CHECK_CONDITION, GOOD, READ_CDB, SENSE_INTERNAL_FAILURE, SENSE_LUN_COMM_FAILURE,
                   SENSE_READ_ERROR, ReadIO, Target)

log = logging.getLogger(__name__)

_NOTIFY = b"\0\0\0\0"  # uio write/read must be exactly 4 bytes (§1.9)
_STOP = object()
_CLOSED = select.POLLERR | select.POLLHUP | select.POLLNVAL


class Handler:
    """Serve one TCMU device: ``fd``/``buf`` from ``UioDevice``, reads from ``source``.

    ``source`` is any ByteSource with a thread-safe ``read(offset, length)``.  Two
    optional source features speed things up: ``readinto(offset, buffers) -> int``
    (fill writable buffers in place: no intermediate bytes) and ``local = True``
    (reads never wait for a network: they are served on the ring thread, which
    saves a thread hop per command; remote sources always go to the workers so
    a slow fetch never holds back other commands).
    """

    def __init__(self, fd: int, buf, target: Target, source, workers: int = 4):
        self.fd = fd
        self.ring = Ring(buf)
        self.target = target
        self.source = source
        self._lock = threading.Lock()
        self._notifying = 0
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._readinto = getattr(source, "readinto", None)
        self._inline = bool(getattr(source, "local", False))
        self._read_cached = getattr(source, "read_cached", None)
        self._drain = self._drain_inline if self._inline else self._drain_async
        ring, info = self.ring, target.info
        #: everything _drain_inline needs, fetched with one attribute load per wake-up
        self._inline_ctx = (ring, ring.buf, ring.mv, ring.cmdr_off, ring.cmdr_size, info.block_size,
                            info.num_blocks, READ_CDB.get, self._readinto or self._readinto_by_read,
                            ring.respond, ENTRY.unpack_from, ENTRY.size, U32.unpack_from)
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        # a local source needs no workers: every command is served on the ring thread
        self._workers = [] if self._inline else [
            threading.Thread(target=self._worker, name=f"tcmu-io-{i}", daemon=True) for i in range(workers)]
        self.commands = 0
        self.errors = 0
        #: READs of a remote source served on the ring thread (``read_cached`` hits)
        self.cached_reads = 0

    # -- public --------------------------------------------------------------------------
    def serve(self) -> None:
        """Run until ``stop()`` or until the device goes away (backstore deleted)."""
        for t in self._workers:
            t.start()
        try:
            self._loop()
        finally:
            for _ in self._workers:
                self._work.put(_STOP)
            for t in self._workers:
                t.join()
            stop_fd, self._stop_fd = self._stop_fd, -1
            os.close(stop_fd)

    def stop(self) -> None:
        """Ask ``serve()`` to return (thread-safe, signal-safe; no-op once it returned)."""
        if self._stop_fd >= 0:
            os.eventfd_write(self._stop_fd, 1)

    # -- ring thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_fd, select.POLLIN)
        poll, read, drain = poller.poll, os.read, self._drain
        fd, wake = self.fd, [(self.fd, select.POLLIN)]
        drain()  # commands queued before open() raise no event (§1.9)
        while True:
            ready = poll()
            if ready != wake:  # the common case is exactly one POLLIN on the device
                for rfd, events in ready:
                    if rfd != fd:
                        return  # stop()
                    if events & _CLOSED:
                        log.info("tcmu: device closed by the kernel")
                        return
            try:
                read(fd, 4)
            except BlockingIOError:
                pass
            except OSError as e:  # EIO once the backstore is deleted
                log.info("tcmu: device gone (%s)", e.strerror)
                return
            drain()

    def _drain_inline(self) -> None:
        """Serve every queued command on this thread, in ring order, each response in the
        command's own slot; then move the tail and notify once (§1.9, §7.3)."""
        (ring, buf, mv, base, size, bs, nblocks, read_cdb, fill, respond, entry, entry_size,
         u32) = self._inline_ctx
        cursor = ring.cursor
        while True:
            head = u32(buf, MB_CMD_HEAD_OFF)[0]
            if head == cursor:
                return
            served = 0
            while cursor != head:
                pos = base + cursor
                if size - cursor >= entry_size:
                    (len_op, _id, _kf, _uf, iov_cnt, bidi_cnt, _dif, cdb_off,
                     iov_base, iov_len) = entry(buf, pos)
                else:  # only a PAD fits here
                    len_op, iov_cnt = u32(buf, pos)[0], 0
                length = len_op & ~OP_MASK
                if length == 0 or length > size - cursor:
                    ring.entry_length(cursor, len_op)  # raises KernelError
                op = len_op & OP_MASK
                if op == OP_CMD:
                    served += 1
                    fields = read_cdb(buf[cdb_off]) if iov_cnt == 1 and not bidi_cnt else None
                    if fields is not None:
                        # fast path: a READ into one buffer of exactly its transfer length
                        lba, count = fields.unpack_from(buf, cdb_off)
                        if count * bs == iov_len and 0 < count and lba + count <= nblocks:
                            view = mv[iov_base:iov_base + iov_len]
                            try:
                                got = fill(lba * bs, [view])
                            except Exception as e:
                                respond(pos, CHECK_CONDITION, self._read_failed(e, lba * bs, iov_len))
                            else:
                                if got < iov_len:  # the source's end: zeros, never stale bytes (§1.8)
                                    view[got:] = bytes(iov_len - got)
                                buf[pos + RSP_STATUS_OFF] = GOOD
                            cursor = (cursor + length) % size
                            continue
                    respond(pos, *self._execute_now(ring.command_at(cursor)))
                elif op != OP_PAD and op != OP_TMR:
                    buf[pos + HDR_UFLAGS_OFF] |= UFLAG_UNKNOWN_OP
                cursor = (cursor + length) % size
            ring.cursor = cursor
            ring.publish_tail(cursor)
            if served:
                self.commands += served
                try:
                    os.write(self.fd, _NOTIFY)
                except OSError as e:
                    log.info("tcmu: notify failed (%s)", e.strerror)

    def _readinto_by_read(self, offset: int, buffers: list) -> int:
        """``readinto`` for a source that only has ``read``: one copy out of its bytes."""
        data = self.source.read(offset, sum(map(len, buffers)))
        pos = 0
        for b in buffers:
            n = min(len(b), len(data) - pos)
            if n <= 0:
                break
            b[:n] = data[pos:pos + n]
            pos += n
        return len(data)

    def _execute_now(self, cmd: Command) -> tuple[int, bytes | None]:
        """Emulate ``cmd``, reading its data here if it is a READ: (status, sense)."""
        try:
            r = self.target.execute(cmd.cdb)
        except Exception:  # a bug in emulation must not leave a command unanswered
            log.exception("tcmu: emulating %r", cmd)
            return CHECK_CONDITION, SENSE_INTERNAL_FAILURE
        if r.__class__ is ReadIO:
            return self._do_read(cmd, r)
        if r.data or cmd.data_length:
            self.ring.write_data(cmd.iovs, r.data)
        return r.status, r.sense

    def _drain_async(self) -> None:
        """Consume every queued command; answer the cheap ones in place, hand READs to
        the workers; notify the kernel once per batch (one ``write(4)`` per burst, §7.3)."""
        ring, execute, work, post = self.ring, self.target.execute, self._work, self._post
        cached = self._read_cached is not None
        while True:
            cmds = ring.consume()
            if not cmds:
                return
            self.commands += len(cmds)
            posted = False
            for cmd in cmds:
                try:
                    r = execute(cmd.cdb)
                except Exception:  # a bug in emulation must not leave a command unanswered
                    log.exception("tcmu: emulating %r", cmd)
                    post(cmd, CHECK_CONDITION, SENSE_INTERNAL_FAILURE)
                    posted = True
                    continue
                if r.__class__ is ReadIO:
                    if cached and self._serve_cached(cmd, r):
                        posted = True
                    else:
                        work.put((cmd, r))
                    continue
                if r.data or cmd.data_length:
                    ring.write_data(cmd.iovs, r.data)
                post(cmd, r.status, r.sense)
                posted = True
            if posted:
                self._notify()

    def _serve_cached(self, cmd: Command, io: ReadIO) -> bool:
        """Complete a READ here if the source has its bytes without waiting (no post otherwise;
        an error, too, is left to the worker's read, which reports it)."""
        length = min(io.length, cmd.data_length)
        try:
            data = self._read_cached(io.offset, length)
        except Exception:
            return False
        if data is None:
            return False
        self.ring.write_data(cmd.iovs, data)
        self._post(cmd, GOOD, None)
        self.cached_reads += 1
        return True

    # -- workers ---------------------------------------------------------------------------
    def _worker(self) -> None:
        get, do_read, post, notify = self._work.get, self._do_read, self._post, self._notify
        while True:
            item = get()
            if item is _STOP:
                return
            post(item[0], *do_read(*item))
            notify()

    def _do_read(self, cmd: Command, io: ReadIO) -> tuple[int, bytes | None]:
        """Fill the command's Data-In buffer from the source: (status, sense)."""
        length = min(io.length, cmd.data_length)
        try:
            if self._readinto is not None:
                self.ring.read_into(cmd.iovs, cmd.data_length, self._readinto, io.offset, length)
            else:
                self.ring.write_data(cmd.iovs, self.source.read(io.offset, length))
        except Exception as e:
            return CHECK_CONDITION, self._read_failed(e, io.offset, length)
        return GOOD, None

    def _read_failed(self, e: Exception, offset: int, length: int) -> bytes:
        """Log a failed read and choose its sense: a registry that cannot be reached is a
        LUN communication failure (EIO), anything else an unrecovered read error."""
        self.errors += 1
        if not isinstance(e, ObdError):
            log.error("tcmu: read of %d bytes at %d", length, offset, exc_info=e)
            return SENSE_READ_ERROR
        log.warning("tcmu: read of %d bytes at %d failed: %s", length, offset, e)
        return SENSE_LUN_COMM_FAILURE if isinstance(e, NetworkError) else SENSE_READ_ERROR

    # -- completion (remote sources) ------------------------------------------------------
    def _post(self, cmd: Command, status: int, sense: bytes | None) -> None:
        """Write one completion into the ring (slot stealing, serialised); no notification."""
        with self._lock:
            self.ring.complete(cmd.cmd_id, status, sense)

    def _notify(self) -> None:
        """Tell the kernel about posted completions: only the thread that finds no
        notification in progress writes, and it writes again while others posted meanwhile."""
        with self._lock:
            self._notifying += 1
            if self._notifying > 1:
                return
        while True:
            try:
                os.write(self.fd, _NOTIFY)
            except OSError as e:
                log.info("tcmu: notify failed (%s)", e.strerror)
            with self._lock:
                if self._notifying == 1:
                    self._notifying = 0
                    return
                self._notifying = 1
