"""The serving loop: wait on the uio fd, drain the ring, execute, complete out of order.

One ring thread owns consumption (spec tcmu.md §1.9): after every wake-up it
copies out all queued commands, answers the cheap ones (INQUIRY, MODE SENSE,
errors) at once and hands READs to a small pool of worker threads, so a read
that waits for the registry never holds back one the cache can answer.
Completions are serialised by a lock and use slot stealing; the ``write(4)``
notification is coalesced: only the thread that finds no notification in
progress writes, and it repeats while others completed meanwhile (§7.3).
"""

from __future__ import annotations

import logging
import os
import queue
import select
import threading

from ..errors import NetworkError, ObdError
from .ring import Command, Ring
from .scsi import (CHECK_CONDITION, GOOD, SENSE_INTERNAL_FAILURE, SENSE_LUN_COMM_FAILURE, SENSE_READ_ERROR,
                   ReadIO, Target)

log = logging.getLogger(__name__)

_NOTIFY = b"\0\0\0\0"  # uio write/read must be exactly 4 bytes (§1.9)
_STOP = object()


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
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._workers = [threading.Thread(target=self._worker, name=f"tcmu-io-{i}", daemon=True)
                         for i in range(workers)]
        self.commands = 0
        self.errors = 0

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
        fd, stop_fd = self.fd, self._stop_fd
        self._drain()  # commands queued before open() raise no event (§1.9)
        while True:
            for ready, events in poller.poll():
                if ready == stop_fd:
                    return
                if events & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                    log.info("tcmu: device closed by the kernel")
                    return
            try:
                os.read(fd, 4)
            except BlockingIOError:
                pass
            except OSError as e:  # EIO once the backstore is deleted
                log.info("tcmu: device gone (%s)", e.strerror)
                return
            self._drain()

    def _drain(self) -> None:
        """Consume every queued command; answer cheap and local ones in place and notify
        the kernel once per batch (one ``write(4)`` per burst, §7.3)."""
        ring, execute, work, post = self.ring, self.target.execute, self._work, self._post
        inline = self._inline
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
                    if not inline:
                        work.put((cmd, r))
                        continue
                    post(cmd, *self._do_read(cmd, r))
                else:
                    if r.data or cmd.data_length:
                        ring.write_data(cmd.iovs, r.data)
                    post(cmd, r.status, r.sense)
                posted = True
            if posted:
                self._notify()

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
        except ObdError as e:
            self.errors += 1
            log.warning("tcmu: read of %d bytes at %d failed: %s", length, io.offset, e)
            if isinstance(e, NetworkError):
                return CHECK_CONDITION, SENSE_LUN_COMM_FAILURE
            return CHECK_CONDITION, SENSE_READ_ERROR
        except Exception:
            self.errors += 1
            log.exception("tcmu: read of %d bytes at %d", length, io.offset)
            return CHECK_CONDITION, SENSE_READ_ERROR
        return GOOD, None

    # -- completion ------------------------------------------------------------------------
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
