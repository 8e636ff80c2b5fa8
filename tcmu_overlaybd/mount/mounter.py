"""``obd mount`` / ``umount`` / ``list`` / ``recover``: from an image to a writable rootfs.

Mount: backstore (enable → /dev/uioN) → handler process serving the ring →
tcm_loop LUN (the SCSI scan runs inside that call) → /dev/sdX → ext4
``ro,noload`` on a private lower directory → overlayfs with an upper and work
directory on the mountpoint.  Teardown runs the other way round: overlay and
ext4 unmounted, loopback target removed while the handler still serves, handler
stopped, backstore deleted (tcmu.md §4.8).

Every mount but ``obd mount -f`` also leaves a record in ``state.persistDir``
(removed by ``umount``) from which ``recover`` re-creates it after a reboot,
on the same upper directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

from .. import config
from ..errors import KernelError, ObdError, StateError, UsageError
from ..image.options import OpenOptions
from ..lio import backstore, host, loopback
from .state import SECRET_OPTIONS, MountRecord, MountState, RecordDir, StateDir, mount_id, obd_pid_alive

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0


def state_dir() -> StateDir:
    return StateDir(config.load()["state.dir"])


def record_dir() -> RecordDir:
    return RecordDir(config.load()["state.persistDir"])


def _mounted(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


def _run(argv: list[str], what: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip() or r.stdout.strip() or f"exit {r.returncode}").splitlines()[-1]
        raise KernelError(f"{what}: {msg}")


log = logging.getLogger(__name__)


class Phases:
    """Durations of the steps of one mount, logged at debug level as they end
    (``mount phase <name> <seconds>``: benchmarks/bench_mount.py reads these lines)."""

    def __init__(self):
        self.t0 = self.t = time.monotonic()
        self.done: list[tuple[str, float]] = []

    def mark(self, name: str, seconds: float | None = None) -> None:
        """End step ``name`` now (or record ``seconds`` measured elsewhere)."""
        now = time.monotonic()
        if seconds is None:
            seconds, self.t = now - self.t, now
        self.done.append((name, seconds))
        log.debug("mount phase %s %.3f", name, seconds)

    def total(self) -> None:
        log.debug("mount phase total %.3f", time.monotonic() - self.t0)


def _spawn_supervisor(sd: StateDir, st: MountState, recover: bool, secrets: dict | None = None,
                      on_size=None, phases: Phases | None = None) -> subprocess.Popen:
    """Start the handler process group and wait until its handler serves the ring.

    ``secrets`` (registry credentials given with ``-u``) reach the supervisor on its
    standard input: never on a command line, in the environment or in a state file.
    ``on_size(size, manifest_digest)``: the handler opens the image first and reports
    what it opened; this callback creates the backstore, then the handler goes on
    (supervisor ``--probe``).  It may raise: the handler then exits.
    """
    r, w = os.pipe()
    argv = [sys.executable, "-m", "tcmu_overlaybd.mount.supervisor", sd.file(st.id), str(w)]
    if recover:
        argv.append("--recover")
    if on_size is not None:
        argv.append("--probe")
    with open(sd.log(st.id), "ab") as logf:
        proc = subprocess.Popen(argv, pass_fds=(w,), stdin=subprocess.PIPE, stdout=logf,
                                stderr=logf, start_new_session=True, close_fds=True)
    os.close(w)
    try:
        try:
            proc.stdin.write(json.dumps(secrets or {}).encode() + b"\n")
            proc.stdin.flush()
            if on_size is None:
                proc.stdin.close()
        except BrokenPipeError:
            pass  # it died at once: the ready pipe says why
        line = _read_ready(r, READY_TIMEOUT_S)
        if on_size is not None and line.startswith("size "):
            size, digest, open_ms = line.split()[1:4]
            if phases is not None:
                phases.mark("supervisor start", max(0.0, time.monotonic() - phases.t - int(open_ms) / 1000))
                phases.mark("open image", int(open_ms) / 1000)
                phases.t = time.monotonic()
            try:
                on_size(int(size), None if digest == "-" else digest)
                proc.stdin.write(b"go\n")
            except BaseException:
                _abandon(proc)
                raise
            finally:
                try:
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
            line = _read_ready(r, READY_TIMEOUT_S)
    finally:
        os.close(r)
    if line == "ready":
        return proc
    if proc.poll() is None and not recover:
        proc.terminate()
    code, _, message = line.partition(" ")[2].partition(" ")
    err = ObdError(message or f"handler did not start (see {sd.log(st.id)})")
    err.exit_code = int(code) if code.isdigit() else 1
    raise err


def _abandon(proc: subprocess.Popen) -> None:
    """Stop a supervisor whose mount is given up before its handler served (stdin closed
    without ``go``: the handler exits, and so does its supervisor)."""
    try:
        proc.stdin.close()
    except BrokenPipeError:
        pass
    try:
        proc.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_ready(fd: int, timeout: float) -> str:
    import select

    out = b""
    deadline = time.monotonic() + timeout
    poller = select.poll()  # select() fails on descriptors above 1024
    poller.register(fd, select.POLLIN)
    while not out.endswith(b"\n"):  # one line per call: the writer waits for an answer after each
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            return f"error 8 handler not ready after {timeout:.0f}s"
        chunk = os.read(fd, 512)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace").strip()


def _new_state(sd: StateDir, mid: str, mountpoint: str, image: str, raw: bool, options: dict,
               upper: str, work: str, own_upper: bool) -> MountState:
    return MountState(id=mid, mountpoint=mountpoint, image=image, raw=raw, options=options,
                      size=0, backstore=backstore.name_for(mid), wwn=loopback.wwn_for(mid),
                      lower=os.path.join(sd.path, mid + ".lower"), upper=upper, work=work,
                      own_upper=own_upper)


def _bring_up(st: MountState, sd: StateDir, secrets: dict, on_success=None, keep_upper: bool = False,
              expect_size: int | None = None, phases: Phases | None = None) -> None:
    """Handler, backstore, LUN, ext4 and overlayfs of ``st``.

    The handler opens the image (the only open of this mount) and reports its size and
    manifest digest, which go into the state before the backstore is created; the digest
    pins the image for restarted handlers and ``recover``.  ``expect_size``: refuse an
    image of another size (``recover`` over an existing upper layer).
    ``on_success`` runs once everything is mounted, before the state turns "mounted";
    on any failure everything is undone (the upper directory too unless ``keep_upper``).
    """
    from .supervisor import PIN_KEY

    phases = phases or Phases()

    def create_backstore(size: int, digest: str | None) -> None:
        if expect_size is not None and size != expect_size:
            raise StateError(f"{st.image} is now {size} bytes, not the {expect_size} it had when "
                             f"mounted: not putting the old upper layer over it")
        st.size = size
        if digest:
            st.options["extra"] = {**st.options.get("extra", {}), PIN_KEY: digest}
        sd.save(st)
        st.backstore_path = backstore.create(st.backstore, st.size)
        sd.save(st)
        phases.mark("backstore")

    sd.save(st)
    backstore.preload_rtslib()
    try:
        _spawn_supervisor(sd, st, recover=False, secrets=secrets, on_size=create_backstore, phases=phases)
        phases.mark("handler start")
        st.device = loopback.export(st.backstore, st.wwn)
        sd.save(st)
        _set_read_ahead(st.device)
        phases.mark("export + wait for disk")
        os.makedirs(st.lower, exist_ok=True)
        _run(["mount", "-t", "ext4", "-o", "ro,noload", st.device, st.lower],
             f"cannot mount {st.device} (ext4) of {st.image}")
        phases.mark("mount ext4")
        os.makedirs(st.upper, exist_ok=True)
        os.makedirs(st.work, exist_ok=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={st.lower},upperdir={st.upper},workdir={st.work}", st.mountpoint],
             f"cannot mount overlayfs on {st.mountpoint}")
        phases.mark("mount overlay")
        if on_success is not None:
            on_success()
    except BaseException:
        teardown(st, sd, forget=not keep_upper)
        raise
    st.phase = "mounted"
    sd.save(st)
    phases.mark("record")
    phases.total()


def _set_read_ahead(device: str) -> None:
    """Apply ``io.readAheadKb`` to ``device`` (before ext4 is mounted on it); 0 leaves the kernel's."""
    kb = config.load()["io.readAheadKb"]
    if not kb:
        return
    path = f"/sys/block/{os.path.basename(device)}/queue/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(f"{kb}\n")
    except OSError as e:
        raise KernelError(f"cannot set io.readAheadKb={kb} on {device} ({path}): {e.strerror}") from None


def mount(image: str, mountpoint: str, opts: OpenOptions, upper: str | None = None,
          raw: bool = False, persist: bool = True) -> MountState:
    """Mount ``image`` as a writable rootfs on ``mountpoint``; returns once it is usable.

    ``persist``: also record it in ``state.persistDir`` so ``recover`` re-creates it after a
    reboot (off for ``obd mount -f``, whose caller, e.g. a systemd unit, mounts it again).
    """
    phases = Phases()
    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise UsageError(f"{mountpoint}: mountpoint is not a directory")
    if raw:
        image = os.path.realpath(image)
    sd, rd = state_dir(), record_dir()
    mid = mount_id(mp)
    if os.path.exists(sd.file(mid)):
        raise StateError(f"{mp} is already an obd mount (obd umount {mp} first)")
    if os.path.exists(rd.file(mid)):
        raise StateError(f"{mp} has an obd mount record from before a restart "
                         f"(obd recover brings it back, obd umount {mp} drops it)")
    if _mounted(mp):
        raise StateError(f"{mp} is already a mountpoint")
    host.prepare()
    cfg = config.load()
    own_upper = upper is None
    if own_upper:
        base = os.path.join(cfg["state.upperDir"], mid)
        upper_dir, work_dir = os.path.join(base, "upper"), os.path.join(base, "work")
    else:
        upper_dir = os.path.realpath(upper)
        work_dir = os.path.join(os.path.dirname(upper_dir), f".{os.path.basename(upper_dir)}.obd-work")
    options = dataclasses.asdict(opts)
    # credentials stay in memory: the state file must never hold them (see _spawn_supervisor)
    secrets = {k: options.pop(k) for k in SECRET_OPTIONS if options.get(k)}
    if secrets:
        options["extra"] = {**options.get("extra", {}), "credentials": "memory-only"}
    st = _new_state(sd, mid, mp, image, raw, options, upper_dir, work_dir, own_upper)
    phases.mark("checks")
    _bring_up(st, sd, secrets, on_success=(lambda: rd.save(MountRecord.of(st))) if persist else None,
              phases=phases)
    return st


def _stop_processes(sd: StateDir, st: MountState) -> None:
    pids = sd.read_pids(st.id)
    sup, handler = pids["supervisor_pid"], pids["handler_pid"]
    for pid in (sup, handler):
        if obd_pid_alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (obd_pid_alive(sup) or obd_pid_alive(handler)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in (sup, handler):
        if obd_pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _fail_pending_io(st: MountState) -> None:
    """No handler serves the ring: removing the LUN would wait forever on sd's flush and on
    commands queued in the ring.  Fail them first: short sd timeout, device offline, ring
    reset with errors (the order obd-cleanup uses)."""
    dev = loopback.device_of(st.wwn, st.backstore)
    steps = []
    if dev:
        steps += [lambda: loopback.set_disk_timeout(dev, 5), lambda: loopback.set_offline(dev)]
    path = backstore.path_of(st.backstore)  # ours only: never the path a state file claims
    if path:
        steps.append(lambda: backstore.fail_ring(path))
    for step in steps:
        try:
            step()
        except KernelError as e:  # best effort: the next steps may still unblock teardown
            log.warning("%s: %s", st.mountpoint, e)


def teardown(st: MountState, sd: StateDir, lazy: bool = False, forget: bool = True) -> None:
    """Undo everything ``mount`` did, in the kernel's order; each step skips what is absent.

    ``forget``: also drop the mount record and an upper directory obd created; without it
    both stay, for ``recover`` to mount the same upper again later.
    """
    for path in (st.mountpoint, st.lower):
        if _mounted(path):
            argv = ["umount", "-l", path] if lazy else ["umount", path]
            _run(argv, f"cannot unmount {path}")
    if not obd_pid_alive(sd.read_pids(st.id)["handler_pid"]):
        _fail_pending_io(st)
    loopback.unexport(st.wwn, st.backstore)
    _stop_processes(sd, st)
    backstore.delete(st.backstore)
    for d in (st.lower,):
        if os.path.isdir(d):
            os.rmdir(d)
    if forget:
        _drop_upper(st.upper, st.work, st.own_upper)
        record_dir().remove(st.id)
    sd.remove(st.id)


def _drop_upper(upper: str, work: str, own_upper: bool) -> None:
    """Remove what obd created for the writes: the whole upper/work pair if obd chose it,
    else only the work directory beside the user's upper."""
    if own_upper:
        shutil.rmtree(os.path.dirname(upper), ignore_errors=True)
    elif os.path.isdir(work):
        shutil.rmtree(work, ignore_errors=True)


def umount(mountpoint: str) -> MountState | MountRecord:
    """Tear down the obd mount on ``mountpoint``, or drop its record if it is not active;
    returns what was torn down or dropped."""
    sd = state_dir()
    st = sd.find_mountpoint(mountpoint)
    if st is None:
        rd = record_dir()
        rec = rd.find_mountpoint(mountpoint)
        if rec is None:
            raise StateError(f"{mountpoint} is not an obd mount")
        _drop_upper(rec.upper, rec.work, rec.own_upper)
        rd.remove(rec.id)
        return rec
    if _mounted(st.mountpoint):
        r = subprocess.run(["umount", st.mountpoint], capture_output=True, text=True)
        if r.returncode != 0:
            raise StateError(f"{st.mountpoint} is busy: {r.stderr.strip().splitlines()[-1]}")
    teardown(st, sd)
    return st


def status(st: MountState, sd: StateDir, persisted: bool) -> dict:
    """What ``obd list`` shows about one mount with a state file."""
    pids = sd.read_pids(st.id)
    d = st.public()
    d.update(pids)
    d["device"] = loopback.device_of(st.wwn, st.backstore) or st.device
    d["mounted"] = _mounted(st.mountpoint)
    d["handler_alive"] = obd_pid_alive(pids["handler_pid"])
    d["supervisor_alive"] = obd_pid_alive(pids["supervisor_pid"])
    d["persisted"] = persisted
    if st.phase != "mounted":
        d["status"] = st.phase
    else:
        d["status"] = "active" if d["handler_alive"] else "handler dead"
    return d


def _record_status(rec: MountRecord) -> dict:
    """What ``obd list`` shows about a recorded mount that is not active (after a reboot)."""
    d = rec.public()
    d.update(device="", supervisor_pid=0, handler_pid=0, restarts=0, mounted=_mounted(rec.mountpoint),
             handler_alive=False, supervisor_alive=False, persisted=True, status="not active")
    return d


def list_mounts() -> list[dict]:
    """Every mount with a state file, then every recorded mount without one."""
    sd, rd = state_dir(), record_dir()
    recorded = set(rd.ids())
    out = []
    for mid in sd.ids():
        try:
            out.append(status(sd.load(mid), sd, mid in recorded))
        except StateError as e:  # one broken file must not hide every other mount
            log.warning("%s", e)
    for mid in recorded - set(sd.ids()):
        try:
            out.append(_record_status(rd.load(mid)))
        except StateError as e:
            log.warning("%s", e)
    return out


def _crash_outcome(st: MountState, sd: StateDir) -> str:
    """The supervisor of ``st`` is dead but its backstore lives: restart the handler (one
    that outlived its supervisor is stopped first: nothing would restart it if it died)."""
    _stop_processes(sd, st)
    try:
        _spawn_supervisor(sd, st, recover=True)
    except ObdError as e:
        return f"failed: {e}"
    note = ""
    if st.options.get("extra", {}).get("credentials") == "memory-only":
        note = " (its -u credentials were kept in memory only: registry access now uses the authfile/docker config)"
    return "handler restarted" + note


def _recreate(rec: MountRecord, sd: StateDir) -> str:
    """Mount a recorded mount again from nothing (after a reboot), on its own upper directory."""
    if _mounted(rec.mountpoint):
        return f"failed: {rec.mountpoint} is already a mountpoint"
    if not os.path.isdir(rec.upper):  # mounting an empty one would hide that the writes are lost
        return f"failed: its upper directory {rec.upper} is gone"
    try:
        host.prepare()
        os.makedirs(rec.mountpoint, exist_ok=True)
        st = _new_state(sd, rec.id, rec.mountpoint, rec.image, rec.raw, dict(rec.options),
                        rec.upper, rec.work, rec.own_upper)
        _bring_up(st, sd, {}, keep_upper=True, expect_size=rec.size)
    except ObdError as e:
        return f"failed: {e}"
    except OSError as e:
        return f"failed: {e.filename or rec.mountpoint}: {e.strerror}"
    return "recovered"


def _mount_in_progress(sd: StateDir, st: MountState) -> bool:
    """An ``obd mount`` that may still be starting this mount's handler (not ours to restart)."""
    try:
        age = time.time() - os.path.getmtime(sd.file(st.id))
    except OSError:
        return False
    return st.phase == "starting" and age < READY_TIMEOUT_S + 60


def recover() -> list[tuple[str, str]]:
    """Bring back every obd mount that is down: (mountpoint, outcome) per mount acted on.

    - state file, supervisor dead, backstore alive (a crash): restart the handler;
    - recorded but without a state file (a reboot), or state file left but backstore gone
      (leftovers are torn down first): re-create it from its record, same upper directory;
    - running mounts are not touched, so a second run does nothing.
    A mount that cannot be brought back is reported ``failed: <reason>``; its record stays.
    """
    sd, rd = state_dir(), record_dir()
    states, done = {}, []
    ids = sd.ids()
    for mid in ids:
        try:
            states[mid] = sd.load(mid)
        except StateError as e:  # it may belong to a live mount: leave that mount alone
            done.append((sd.file(mid), f"failed: {e}"))
    unreadable = set(ids) - set(states)
    for mid in sorted((set(states) | set(rd.ids())) - unreadable):
        st = states.get(mid)
        if st is not None and (obd_pid_alive(sd.read_pids(mid)["supervisor_pid"]) or _mount_in_progress(sd, st)):
            continue
        if st is not None and backstore.exists(st.backstore):
            done.append((st.mountpoint, _crash_outcome(st, sd)))
            continue
        try:
            rec = rd.load(mid) if os.path.exists(rd.file(mid)) else None
        except StateError as e:
            done.append((st.mountpoint if st else rd.file(mid), f"failed: {e}"))
            continue
        if rec is None:
            done.append((st.mountpoint, f"failed: its backstore is gone and it has no mount record "
                                        f"(obd umount {st.mountpoint} cleans up)"))
            continue
        if st is not None:
            try:  # what is left of it (mounts, LUN, files) goes; the upper and record stay
                teardown(st, sd, lazy=True, forget=False)
            except ObdError as e:
                done.append((st.mountpoint, f"failed: cannot clear what is left of it: {e}"))
                continue
        done.append((rec.mountpoint, _recreate(rec, sd)))
    return done


def foreground(st: MountState, stop: list) -> None:
    """Stay until ``stop`` fills (the caller's SIGINT/SIGTERM handler appends to it) or the
    handler process ends, then tear down (obd mount -f)."""
    sd = state_dir()
    while not stop and obd_pid_alive(sd.read_pids(st.id)["supervisor_pid"]):
        time.sleep(0.2)
    teardown(st, sd, lazy=True)
