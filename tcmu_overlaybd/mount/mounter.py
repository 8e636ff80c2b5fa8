"""``obd mount`` / ``umount`` / ``list`` / ``recover``: from an image to a writable rootfs.

Mount: backstore (enable → /dev/uioN) → handler process serving the ring →
tcm_loop LUN (the SCSI scan runs inside that call) → /dev/sdX → ext4
``ro,noload`` on a private lower directory → overlayfs with an upper and work
directory on the mountpoint.  Teardown runs the other way round: overlay and
ext4 unmounted, loopback target removed while the handler still serves, handler
stopped, backstore deleted (tcmu.md §4.8).
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
from .state import SECRET_OPTIONS, MountState, StateDir, mount_id, pid_alive

READY_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0


def state_dir() -> StateDir:
    return StateDir(config.load()["state.dir"])


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

def _spawn_supervisor(sd: StateDir, st: MountState, recover: bool, secrets: dict | None = None) -> subprocess.Popen:
    """Start the handler process group and wait until its handler serves the ring.

    ``secrets`` (registry credentials given with ``-u``) reach the supervisor on its
    standard input: never on a command line, in the environment or in a state file.
    """
    r, w = os.pipe()
    argv = [sys.executable, "-m", "tcmu_overlaybd.mount.supervisor", sd.file(st.id), str(w)]
    if recover:
        argv.append("--recover")
    with open(sd.log(st.id), "ab") as logf:
        proc = subprocess.Popen(argv, pass_fds=(w,), stdin=subprocess.PIPE, stdout=logf,
                                stderr=logf, start_new_session=True, close_fds=True)
    os.close(w)
    try:
        proc.stdin.write(json.dumps(secrets or {}).encode())
        proc.stdin.close()
    except BrokenPipeError:
        pass  # it died at once: the ready pipe says why
    try:
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


def _read_ready(fd: int, timeout: float) -> str:
    import select

    out = b""
    deadline = time.monotonic() + timeout
    while not out.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return f"error 8 handler not ready after {timeout:.0f}s"
        chunk = os.read(fd, 512)
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace").strip()


def _probe_size(st: MountState, secrets: dict) -> int:
    from .supervisor import open_source

    src = open_source(st, secrets)
    try:
        return src.size
    finally:
        src.close()


def mount(image: str, mountpoint: str, opts: OpenOptions, upper: str | None = None,
          raw: bool = False) -> MountState:
    """Mount ``image`` as a writable rootfs on ``mountpoint``; returns once it is usable."""
    mp = os.path.realpath(mountpoint)
    if not os.path.isdir(mp):
        raise UsageError(f"{mountpoint}: mountpoint is not a directory")
    if raw:
        image = os.path.realpath(image)
    sd = state_dir()
    mid = mount_id(mp)
    if os.path.exists(sd.file(mid)):
        raise StateError(f"{mp} is already an obd mount (obd umount {mp} first)")
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
    st = MountState(id=mid, mountpoint=mp, image=image, raw=raw, options=options,
                    size=0, backstore=f"obd-{mid}", wwn=loopback.wwn_for(mid),
                    lower=os.path.join(sd.path, mid + ".lower"), upper=upper_dir, work=work_dir,
                    own_upper=own_upper)
    st.size = _probe_size(st, secrets)
    sd.save(st)
    try:
        st.backstore_path = backstore.create(st.backstore, st.size)
        sd.save(st)
        _spawn_supervisor(sd, st, recover=False, secrets=secrets)
        st.device = loopback.export(st.backstore, st.wwn)
        sd.save(st)
        os.makedirs(st.lower, exist_ok=True)
        _run(["mount", "-t", "ext4", "-o", "ro,noload", st.device, st.lower],
             f"cannot mount {st.device} (ext4) of {image}")
        os.makedirs(st.upper, exist_ok=True)
        os.makedirs(st.work, exist_ok=True)
        _run(["mount", "-t", "overlay", "overlay", "-o",
              f"lowerdir={st.lower},upperdir={st.upper},workdir={st.work}", mp],
             f"cannot mount overlayfs on {mp}")
    except BaseException:
        teardown(st, sd)
        raise
    st.phase = "mounted"
    sd.save(st)
    return st


def _stop_processes(sd: StateDir, st: MountState) -> None:
    pids = sd.read_pids(st.id)
    sup, handler = pids["supervisor_pid"], pids["handler_pid"]
    for pid in (sup, handler):
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (pid_alive(sup) or pid_alive(handler)) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in (sup, handler):
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def _fail_pending_io(st: MountState) -> None:
    """No handler serves the ring: removing the LUN would wait forever on sd's flush and on
    commands queued in the ring.  Fail them first: short sd timeout, device offline, ring
    reset with errors (the order obd-cleanup uses)."""
    dev = loopback.device_of(st.wwn)
    steps = []
    if dev:
        steps += [lambda: loopback.set_disk_timeout(dev, 5), lambda: loopback.set_offline(dev)]
    if st.backstore_path and backstore.exists(st.backstore):
        steps.append(lambda: backstore.fail_ring(st.backstore_path))
    for step in steps:
        try:
            step()
        except KernelError as e:  # best effort: the next steps may still unblock teardown
            log.warning("%s: %s", st.mountpoint, e)


def teardown(st: MountState, sd: StateDir, lazy: bool = False) -> None:
    """Undo everything ``mount`` did, in the kernel's order; each step skips what is absent."""
    for path in (st.mountpoint, st.lower):
        if _mounted(path):
            argv = ["umount", "-l", path] if lazy else ["umount", path]
            _run(argv, f"cannot unmount {path}")
    if not pid_alive(sd.read_pids(st.id)["handler_pid"]):
        _fail_pending_io(st)
    loopback.unexport(st.wwn)
    _stop_processes(sd, st)
    backstore.delete(st.backstore)
    for d in (st.lower,):
        if os.path.isdir(d):
            os.rmdir(d)
    if st.own_upper:
        shutil.rmtree(os.path.dirname(st.upper), ignore_errors=True)
    elif os.path.isdir(st.work):
        shutil.rmtree(st.work, ignore_errors=True)
    sd.remove(st.id)


def umount(mountpoint: str) -> MountState:
    """Tear down the obd mount on ``mountpoint``."""
    sd = state_dir()
    st = sd.find_mountpoint(mountpoint)
    if st is None:
        raise StateError(f"{mountpoint} is not an obd mount")
    if _mounted(st.mountpoint):
        r = subprocess.run(["umount", st.mountpoint], capture_output=True, text=True)
        if r.returncode != 0:
            raise StateError(f"{st.mountpoint} is busy: {r.stderr.strip().splitlines()[-1]}")
    teardown(st, sd)
    return st


def status(st: MountState, sd: StateDir) -> dict:
    """What ``obd list`` shows about one mount."""
    pids = sd.read_pids(st.id)
    d = st.public()
    d.update(pids)
    d["device"] = loopback.device_of(st.wwn) or st.device
    d["mounted"] = _mounted(st.mountpoint)
    d["handler_alive"] = pid_alive(pids["handler_pid"])
    d["supervisor_alive"] = pid_alive(pids["supervisor_pid"])
    return d


def list_mounts() -> list[dict]:
    sd = state_dir()
    return [status(st, sd) for st in sd.all()]


def recover() -> list[tuple[MountState, str]]:
    """Restart the handler process of every mount whose supervisor is gone."""
    sd = state_dir()
    done = []
    for st in sd.all():
        if pid_alive(sd.read_pids(st.id)["supervisor_pid"]):
            continue
        if not backstore.exists(st.backstore):
            done.append((st, "backstore gone: run obd umount"))
            continue
        try:
            _spawn_supervisor(sd, st, recover=True)
            note = ""
            if st.options.get("extra", {}).get("credentials") == "memory-only":
                note = " (its -u credentials were kept in memory only: registry access now uses the authfile/docker config)"
            done.append((st, "handler restarted" + note))
        except ObdError as e:
            done.append((st, f"restart failed: {e}"))
    return done


def foreground(st: MountState, stop: list) -> None:
    """Stay until ``stop`` fills (the caller's SIGINT/SIGTERM handler appends to it) or the
    handler process ends, then tear down (obd mount -f)."""
    sd = state_dir()
    while not stop and pid_alive(sd.read_pids(st.id)["supervisor_pid"]):
        time.sleep(0.2)
    teardown(st, sd, lazy=True)
