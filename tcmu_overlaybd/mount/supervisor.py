"""The handler process of one mount and its supervisor.

``python -m tcmu_overlaybd.mount.supervisor STATE_FILE READY_FD [--recover | --probe]``

The supervisor forks the handler (which opens the image from the state
file, opens ``/dev/uioN`` and serves the ring) and restarts it whenever it dies
abnormally (SIGKILL, crash): the kernel keeps the ring and in-flight commands,
the new handler resets the ring so they are retried (tcmu.md §4.5), and readers
only see a slow read.  The first handler's outcome is written to READY_FD as
one line: ``ready`` or ``error <exit code> <message>``.  SIGTERM stops both.

``--probe`` (``obd mount``: the image is opened once per mount, in the handler):
the first handler opens the image before the backstore exists, writes
``size <bytes> <manifest digest or -> <ms spent opening>`` to READY_FD and waits
for a ``go`` line on standard input (the backstore now exists) before it looks
for its device.  Standard input carries first one line of credentials (JSON),
then that ``go``.  A restarted handler re-reads the state file, where ``obd
mount`` pinned the image by manifest digest, so it serves the same image.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time

from .. import config
from ..errors import ObdError, StateError
from ..logs import register_secret, setup_logging
from ..tcmu.handler import Handler
from ..tcmu.scsi import DiskInfo, Target
from ..tcmu.uio import UioDevice, find_uio
from ..lio import backstore
from ..stats.sampler import StackSampler
from ..stats.telemetry import Telemetry
from .state import SECRET_OPTIONS, MountState, StateDir

log = logging.getLogger(__name__)

#: key of ``OpenOptions.extra`` in a mount's state and record: the manifest digest the
#: mount resolved, so a restarted handler or ``obd recover`` opens the very same image
PIN_KEY = "manifest_digest"
RESTART_DELAY_S = 0.2
REOPEN_RETRY_S = 1.0


def open_source(st: MountState, secrets: dict | None = None):
    """The virtual disk of the mount as a ByteSource (re-opened in every handler).

    ``secrets``: credentials that are not in the state file (given by ``obd mount -u``)."""
    if st.raw:
        from .rawdisk import RawDisk

        return RawDisk(st.image)
    from ..image.disk import open_disk
    from ..image.options import OpenOptions
    from ..image.resolve import open_image

    opts = OpenOptions(**{**st.options, **(secrets or {})})
    opts.device_reads = True  # an outage is slow I/O up to io.timeout, then EIO
    pinned = opts.extra.get(PIN_KEY)
    image = _open_pinned(st.image, pinned, opts) if pinned else open_image(st.image, opts)
    try:
        return _ImageDisk(open_disk(image, opts), image.store, local=image.reference.transport == "oci",
                          manifest_digest=image.manifest_descriptor.digest)
    except BaseException:
        image.store.close()
        raise


def _open_pinned(ref_text: str, digest: str, opts):
    """The image of ``ref_text`` whose manifest is ``digest`` (what the mount resolved
    first, accelerated counterpart included): no tag lookup, no discovery."""
    from ..image.manifest import load_manifest
    from ..image.reference import parse_reference
    from ..image.resolve import open_store

    ref = parse_reference(ref_text).with_digest(digest)
    store = open_store(ref, opts)
    try:
        return load_manifest(store, ref, store.resolve(ref), opts.platform)
    except BaseException:
        store.close()
        raise


class _ImageDisk:
    """An image's virtual disk that also closes the image's blob store.

    ``local``: the blobs are in a local OCI layout, so reads never wait for a
    network and the handler serves them on its ring thread (see handler.Handler).
    """

    def __init__(self, disk, store, local: bool, manifest_digest: str):
        self.name, self.size, self.local = disk.name, disk.size, local
        self.manifest_digest = manifest_digest
        self.read = disk.read  # bound method: no extra call per read
        if hasattr(disk, "read_cached"):  # block-cache hits served on the handler's ring thread
            self.read_cached = disk.read_cached
        self.disk, self._store = disk, store

    def close(self) -> None:
        self.disk.close()
        self._store.close()


def _probe(st: MountState, ready_fd: int, secrets: dict | None):
    """``--probe``: open the image, report its size and manifest, wait for ``go``
    (None: ``obd mount`` gave up, e.g. it could not create the backstore)."""
    t0 = time.monotonic()
    source = open_source(st, secrets)
    st.size = source.size
    digest = getattr(source, "manifest_digest", None) or "-"
    ms = (time.monotonic() - t0) * 1000
    os.write(ready_fd, f"size {source.size} {digest} {ms:.0f}\n".encode())
    if _read_line(0) != "go":
        source.close()
        return None
    return source


#: glibc malloc arenas of a handler process.  glibc lets threads create up to 8 arenas per CPU,
#: and each keeps the large buffers its threads freed (fetched ranges, inflated refill units): in
#: the startup benchmark a FastOCI handler's peak RSS went from 148 MB with 1 CPU to 178 MB with 2
MALLOC_ARENAS = 2
M_ARENA_MAX = -8  # mallopt parameter, malloc.h


def _limit_malloc_arenas() -> None:
    """Cap this (single-threaded, just forked) process's malloc arenas; a no-op without glibc."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass


def run_handler(st: MountState, ready_fd: int, reset: bool, secrets: dict | None = None,
                probe: bool = False) -> int:
    """Child process body: serve the device until it goes away or SIGTERM."""
    _limit_malloc_arenas()
    try:
        if probe:  # the backstore is created only once the size is known
            source = _probe(st, ready_fd, secrets)
            if source is None:
                return 1
        # ownership first (issue 7.7): a device that is not this mount's is never reset nor opened
        tcmu = find_uio(st.backstore, backstore.dev_config(backstore.name_for(st.id)))
        if not probe:
            source = open_source(st, secrets)
            if source.size != st.size:
                source.close()
                raise StateError(f"{st.image} is now {source.size} bytes, not the {st.size} "
                                 f"it had when mounted: not serving it")
        dev = UioDevice(tcmu.uio)  # exclusive (EBUSY while another handler serves it): before any reset
        if reset:  # the ring cursor is read below, after the reset (tcmu.md §4.5)
            backstore.reset_for_new_handler(tcmu.name.configfs_path)
        info = DiskInfo.for_size(st.size, st.id, backstore.BLOCK_SIZE, backstore.MAX_SECTORS)
        cfg = config.load()
        telemetry = Telemetry(st, source, state_dir=cfg["state.dir"], slow_ms=cfg["io.slowMs"],
                              metrics_listen=cfg["metrics.listen"], store=getattr(source, "_store", None))
        handler = Handler(dev.fd, dev.buf, Target(info), telemetry.device, workers=cfg["io.threads"])
    except ObdError as e:
        os.write(ready_fd, f"error {e.exit_code} {e}\n".encode())
        return e.exit_code
    signal.signal(signal.SIGTERM, lambda *_: handler.stop())
    telemetry.start(handler)
    if reset:
        backstore.unblock(tcmu.name.configfs_path)
    os.write(ready_fd, b"ready\n")
    os.close(ready_fd)
    log.info("handler %d serving %s (%s)", os.getpid(), st.backstore, st.image)
    from ..prefetch.session import PrefetchSession  # trace recording, replay, background download

    prefetch = PrefetchSession.start(st.options, getattr(source, "disk", None))
    telemetry.prefetch = prefetch  # obd stats shows its counters
    sampler = StackSampler.from_env()  # diagnostics only (OBD_SAMPLE_STACKS)
    try:
        handler.serve()
    finally:
        telemetry.stop()
        prefetch.stop()  # before the source closes; finishes a trace being recorded
        if sampler is not None:
            sampler.stop()
    dev.close()
    source.close()
    log.info("handler %d done after %d commands", os.getpid(), handler.commands)
    return 0


def _read_line(fd: int) -> str:
    out = b""
    while not out.endswith(b"\n"):
        chunk = os.read(fd, 512)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace").strip()


class Supervisor:
    def __init__(self, state_path: str, secrets: dict | None = None):
        self.secrets = secrets or {}
        self.state_dir = StateDir(os.path.dirname(state_path))
        self.state_path = state_path
        self.child = 0
        self.stopping = False

    def _on_term(self, *_):
        self.stopping = True
        if self.child:
            try:
                os.kill(self.child, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def _spawn(self, st: MountState, reset: bool, probe: bool, ready_fd: int) -> tuple[int, str]:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 1
            try:
                code = run_handler(st, w, reset, self.secrets, probe)
            finally:
                logging.shutdown()
                os._exit(code)
        os.close(w)
        self.child = pid
        msg = _read_line(r)
        if probe and msg.startswith("size "):  # obd mount answers on the handler's stdin
            os.write(ready_fd, (msg + "\n").encode())
            msg = _read_line(r)
        os.close(r)
        return pid, msg or "error 1 handler exited before it was ready"

    def run(self, ready_fd: int, recover: bool, probe: bool = False) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        st = self.state_dir.load_file(self.state_path)
        me, restarts = os.getpid(), 0
        reset = recover
        first = True
        while not self.stopping:
            self.state_dir.write_pids(st.id, me, 0, restarts)
            if not first:  # size and manifest pin as obd mount saved them
                st = self.state_dir.load_file(self.state_path)
            pid, msg = self._spawn(st, reset, probe and first, ready_fd)
            if first:
                os.write(ready_fd, (msg + "\n").encode())
                os.close(ready_fd)
            if msg != "ready":
                os.waitpid(pid, 0)
                self.child = 0
                if first and not recover:
                    return 1  # obd mount reports the error and tears down
                log.warning("handler failed to start: %s; retrying", msg)
                first = False
                reset = True
                time.sleep(REOPEN_RETRY_S)
                continue
            first = False
            self.state_dir.write_pids(st.id, me, pid, restarts)
            _, status = os.waitpid(pid, 0)
            self.child = 0
            if self.stopping or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                break
            why = (f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
                   else f"exit {os.WEXITSTATUS(status)}")
            restarts += 1
            log.warning("handler %d died (%s); restarting (restart #%d)", pid, why, restarts)
            reset = True
            time.sleep(RESTART_DELAY_S)
        self.state_dir.write_pids(st.id, me, 0, restarts)
        return 0


def main(argv: list[str]) -> int:
    state_path, ready_fd = argv[0], int(argv[1])
    recover, probe = "--recover" in argv[2:], "--probe" in argv[2:]
    cfg = config.load()
    # every line of this mount's supervisor and handler carries its id (the state file's name)
    mid = os.path.splitext(os.path.basename(state_path))[0]
    setup_logging(cfg["log.level"], cfg["log.file"] or None, mount_id=mid)
    secrets = _read_secrets()
    return Supervisor(state_path, secrets).run(ready_fd, recover, probe)


def _read_secrets() -> dict:
    """Credentials sent by ``obd mount`` on standard input (empty for ``obd recover``)."""
    try:
        # one line: with --probe, stdin stays open for the handler's "go"
        text = sys.stdin.readline() if sys.stdin is not None else ""
    except OSError:
        return {}
    try:
        secrets = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {}
    if not isinstance(secrets, dict):
        return {}
    register_secret(secrets.get("password"))
    return {k: v for k, v in secrets.items() if k in SECRET_OPTIONS and isinstance(v, str)}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
