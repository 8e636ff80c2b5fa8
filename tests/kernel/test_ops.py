"""The operator's helpers on a real kernel: scripts/obd-setup from a bare guest, then a
crash (every obd process killed) handled by obd-cleanup and obd recover."""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import threading
import time

import pytest

from .conftest import kernel_leftovers, kill_every_obd_process, obd, obd_json_list

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETUP = os.path.join(REPO, "scripts", "obd-setup")
CLEANUP = os.path.join(REPO, "scripts", "obd-cleanup")
FOREIGN_WWN = "naa.5001405deadbeef0"
#: obd's backstore naming, but dev_config names another handler
FOREIGN_LOOKALIKE = "obd-0123456789ab"


def script(*argv: str) -> tuple[int, str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def make_image(tmp_path, name: str) -> str:
    tree = tmp_path / f"{name}-tree"
    tree.mkdir()
    (tree / "whoami").write_text(f"image {name}\n")
    img = str(tmp_path / f"{name}.img")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(tree), img, "16M"], check=True)
    return img


@pytest.fixture
def foreign_lio():
    """Makes LIO objects that are not obd's and must never be touched: a ramdisk backstore
    exported by its own tcm_loop target, and an unexported TCMU backstore named like obd's
    but configured for another handler.  Returns their configfs paths and the SCSI
    address prefix of the foreign disk."""
    import rtslib_fb as rtslib

    made = []

    def create() -> tuple[list[str], str]:
        so = rtslib.RDMCPStorageObject("foreign-disk", size=4 << 20)
        made.append(so)
        lookalike = rtslib.UserBackedStorageObject(FOREIGN_LOOKALIKE, config=f"other/{FOREIGN_LOOKALIKE}",
                                                   size=1 << 20, control="nl_reply_supported=-1")
        made.append(lookalike)
        target = rtslib.Target(rtslib.FabricModule("loopback"), FOREIGN_WWN, mode="create")
        made.insert(0, target)
        tpg = rtslib.TPG(target, 1, mode="create")
        rtslib.LUN(tpg, 0, storage_object=so)
        with open(os.path.join(tpg.path, "address")) as f:
            return [so.path, lookalike.path, target.path], f.read().strip() + ":"
    yield create
    for obj in made:
        obj.delete()


def obd_leftovers(foreign_scsi: str) -> dict:
    """``kernel_leftovers`` without the foreign objects, and without mount records: obd-cleanup
    keeps those by design (the tests check them through ``obd list``)."""
    left = kernel_leftovers()
    left.pop("records")
    left["targets"] = [t for t in left["targets"] if not t.endswith(FOREIGN_WWN)]
    left["scsi_disks"] = [d for d in left["scsi_disks"] if not os.path.basename(d).startswith(foreign_scsi)]
    left["backstores"] = [b for b in left["backstores"] if not b.endswith(FOREIGN_LOOKALIKE)]
    left["uio"] = [u for u in left["uio"] if FOREIGN_LOOKALIKE not in open(f"{u}/name").read()]
    return left


def test_setup_from_nothing_then_crash_recovery_and_cleanup(tmp_path, foreign_lio):
    # a bare guest: TCMU modules unloaded (the session fixture loaded them; earlier tests'
    # mounts left the empty loopback fabric directory, which holds a reference on tcm_loop)
    for fabric in ("/sys/kernel/config/target/loopback",):
        if os.path.isdir(fabric) and not any(n.startswith("naa.") for n in os.listdir(fabric)):
            os.rmdir(fabric)
    subprocess.run(["modprobe", "-r", "tcm_loop", "target_core_user"], capture_output=True)
    assert not os.path.isdir("/sys/module/target_core_user") and not os.path.isdir("/sys/module/tcm_loop")
    rc, out = script(SETUP, "--dry-run")  # plans everything, changes nothing
    assert rc == 0 and "would: modprobe -a target_core_user tcm_loop" in out, out
    assert "would: install -D -m 0644 " + os.path.join(REPO, "udev", "61-obd.rules") in out
    assert not os.path.isdir("/sys/module/target_core_user") and not os.path.isdir("/sys/module/tcm_loop")
    assert not os.path.exists("/etc/udev/rules.d/61-obd.rules")
    assert not os.path.exists("/etc/systemd/system/obd-recover.service")
    rc, out = script(SETUP)
    assert rc == 0, out
    assert os.path.isdir("/sys/module/target_core_user") and os.path.isdir("/sys/module/tcm_loop")
    with open(os.path.join(REPO, "udev", "61-obd.rules"), "rb") as f:
        assert open("/etc/udev/rules.d/61-obd.rules", "rb").read() == f.read()
    assert os.path.exists("/etc/systemd/system/obd-recover.service")
    rc, again = script(SETUP)
    assert rc == 0 and "\n+ " not in "\n" + again, again  # idempotent: nothing left to do
    foreign_paths, foreign_scsi = foreign_lio()
    baseline = obd_leftovers(foreign_scsi)  # the guest's own mounts (/tmp, ...)

    mounts = {}
    for name in ("a", "b"):
        mnt = tmp_path / f"mnt-{name}"
        mnt.mkdir()
        assert obd("mount", "--raw", make_image(tmp_path, name), str(mnt))[0] == 0
        (mnt / "note").write_text(f"written into {name}\n")
        mounts[name] = mnt
    listed = {m["mountpoint"]: m for m in obd_json_list()}

    # live mounts: obd-cleanup (for real) finds nothing to do
    rc, out = script(CLEANUP)
    assert (rc, out.strip()) == (0, "obd-cleanup: nothing to clean")

    kill_every_obd_process()
    rc, out = script(CLEANUP, "--dry-run")
    assert rc == 0, out
    for mnt in mounts.values():
        assert f"kept {mnt}: handler dead but recoverable" in out
    for m in listed.values():  # nothing of a recoverable mount is proposed
        assert m["backstore"] not in out and m["wwn"] not in out and m["device"] not in out
    assert "foreign" not in out and FOREIGN_WWN not in out and FOREIGN_LOOKALIKE not in out

    rc, out = obd("recover")
    assert rc == 0 and sorted(out.splitlines()) == sorted(f"{m}: handler restarted" for m in mounts.values())
    for name, mnt in mounts.items():
        assert (mnt / "note").read_text() == f"written into {name}\n"
        assert (mnt / "whoami").read_text() == f"image {name}\n"

    # a crash that also lost a's state file (a is an orphan: nothing can recover it)
    kill_every_obd_process()
    a = listed[str(mounts["a"])]
    b = listed[str(mounts["b"])]
    os.unlink(f"/run/obd/{a['id']}.json")
    rc, out = script(CLEANUP)
    assert rc == 0, out
    assert f"rmdir /sys/kernel/config/target/loopback/{a['wwn']}/tpgt_1" in out
    assert f"kept {mounts['b']}: handler dead but recoverable" in out
    assert not os.path.exists(f"/sys/kernel/config/target/loopback/{a['wwn']}")
    assert not any(p.endswith(a["backstore"]) for p in obd_leftovers(foreign_scsi)["backstores"])
    assert str(mounts["a"]) not in obd_leftovers(foreign_scsi)["mounts"]

    rc, out = script(CLEANUP, "--discard-recoverable")
    assert rc == 0, out
    assert obd_leftovers(foreign_scsi) == baseline
    assert all(os.path.isdir(p) for p in foreign_paths)  # foreign objects intact
    assert open(os.path.join(b["upper"], "note")).read() == "written into b\n"  # user data is never removed
    rc, out = script(CLEANUP)
    assert (rc, out.strip()) == (0, "obd-cleanup: nothing to clean")
    # obd-cleanup never drops mount records: both mounts wait for obd recover (or obd umount)
    assert {m["mountpoint"]: m["status"] for m in obd_json_list()} == {
        str(mnt): "not active" for mnt in mounts.values()}
    for mnt in mounts.values():
        assert obd("umount", str(mnt))[0] == 0
    assert obd_json_list() == []


def test_vagrant_provisioning_runs_in_the_harness_and_serves_the_sample_image(tmp_path, vectors):
    """vagrant/provision.sh (minus install-deps: the guest has no network) sets the guest up
    with the shared scripts and a sample registry whose image obd mounts."""
    storage = tmp_path / "registry"
    env = {**os.environ, "OBD_REGISTRY_DIR": str(storage), "OBD_SHARED": os.path.dirname(os.path.dirname(vectors))}
    r = subprocess.run([os.path.join(REPO, "vagrant", "provision.sh"), "--no-deps"], env=env,
                       capture_output=True, text=True, timeout=300)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        assert "provision: sample image: localhost:5000/hello-world:obd" in r.stdout
        assert "obd-setup: done" in r.stdout
        mnt = tmp_path / "rootfs"
        mnt.mkdir()
        assert obd("mount", "--plain-http", "localhost:5000/hello-world:obd", str(mnt))[0] == 0
        assert os.path.getsize(mnt / "hello") > 0
        assert obd("umount", str(mnt))[0] == 0
        again = subprocess.run([os.path.join(REPO, "vagrant", "provision.sh"), "--no-deps"], env=env,
                               capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "registry already answers on localhost:5000" in again.stdout
    finally:
        pidfile = f"{storage}.pid"
        if os.path.exists(pidfile):
            os.kill(int(open(pidfile).read()), signal.SIGTERM)


def test_cleanup_of_a_dead_handler_with_a_blocked_reader_does_not_hang(tmp_path):
    """The §4.8 trap: commands waiting in the ring of a dead handler.  obd-cleanup fails them
    (disk offline, ring reset) instead of waiting the 24-day command timeout; without those
    two steps the LUN removal hangs the guest (checked once by removing them)."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(8 << 20))
    img = str(tmp_path / "disk.img")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), img, "32M"], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    baseline = kernel_leftovers()
    assert obd("mount", "--raw", img, str(mnt))[0] == 0
    [m] = obd_json_list()
    kill_every_obd_process()
    outcome: list = []

    def read_device():
        fd = os.open(m["device"], os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 1 << 20)
            outcome.append(os.preadv(fd, [buf], 16 << 20))
        except OSError as e:
            outcome.append(e)
        finally:
            os.close(fd)
    reader = threading.Thread(target=read_device, daemon=True)
    reader.start()
    time.sleep(3)
    assert reader.is_alive() and not outcome  # waits for the dead handler
    start = time.monotonic()
    rc, out = script(CLEANUP, "--discard-recoverable")
    assert rc == 0, out
    reader.join(120)
    assert not reader.is_alive() and isinstance(outcome[0], OSError), outcome
    assert time.monotonic() - start < 120
    left = kernel_leftovers()
    assert len(left.pop("records")) == 1 and left == {k: v for k, v in baseline.items() if k != "records"}
    # the record stays (obd-cleanup never drops one): obd umount does
    assert "kept the mount record of " + str(mnt) in out
    assert [x["status"] for x in obd_json_list()] == ["not active"]
    assert obd("umount", str(mnt))[0] == 0 and obd_json_list() == []
    assert kernel_leftovers() == baseline


def start_supervisor(state_file: str, *flags: str) -> tuple[subprocess.Popen, str]:
    """Run the handler's supervisor on ``state_file`` the way obd mount does; its first line."""
    r, w = os.pipe()
    proc = subprocess.Popen([os.path.join(REPO, ".venv", "bin", "python"), "-m", "tcmu_overlaybd.mount.supervisor",
                             state_file, str(w), *flags], pass_fds=(w,), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r) as f:
        return proc, f.readline().strip()


def uio_holders(uio: str) -> list[str]:
    held = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        held += [pid for target in fds if target == f"/dev/{uio}"]
    return held


def read_direct(dev: str, offset: int, timeout: float = 60.0) -> bytes:
    """One O_DIRECT 64 KiB read of ``dev`` that must finish within ``timeout``."""
    out: list = []

    def run():
        fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
        try:
            buf = mmap.mmap(-1, 1 << 16)
            os.preadv(fd, [buf], offset)
            out.append(bytes(buf))
        finally:
            os.close(fd)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert out, f"read of {dev} at {offset} did not complete within {timeout:.0f}s"
    return out[0]


def test_handler_refuses_devices_whose_config_is_not_its_own(tmp_path):
    """A state file pointing at a tcmu-runner backstore or at another mount's: the handler
    says why in one line and neither opens nor resets that ring (issue 7.7)."""
    import json

    import rtslib_fb as rtslib

    from tcmu_overlaybd.tcmu.uio import tcmu_devices

    mnt, img = {}, {}
    for name in ("a", "b"):
        mnt[name] = tmp_path / f"mnt-{name}"
        mnt[name].mkdir()
        img[name] = make_image(tmp_path, name)
        assert obd("mount", "--raw", img[name], str(mnt[name]))[0] == 0
    ms = {m["mountpoint"]: m for m in obd_json_list()}
    a, b = ms[str(mnt["a"])], ms[str(mnt["b"])]
    runner = rtslib.UserBackedStorageObject("runner-disk", config="file//srv/disk.img", size=1 << 20,
                                            control="nl_reply_supported=-1")
    try:
        [runner_uio] = [d for d in tcmu_devices() if d.name.dev_name == "runner-disk"]
        [b_uio] = [d for d in tcmu_devices() if d.name.dev_name == b["backstore"]]
        forged = tmp_path / "forged"
        forged.mkdir()
        st = json.load(open(f"/run/obd/{a['id']}.json"))
        for target, uio, flags in ((runner, runner_uio, ()), (None, b_uio, ("--recover",))):
            name = target.name if target is not None else b["backstore"]
            path = target.path if target is not None else b_uio.name.configfs_path
            (forged / f"{a['id']}.json").write_text(json.dumps({**st, "backstore": name, "backstore_path": path}))
            proc, line = start_supervisor(str(forged / f"{a['id']}.json"), *flags)
            proc.kill()  # --recover would retry: the one answer is enough
            proc.wait()
            assert line == (f"error 8 refusing /dev/{uio.uio} ({uio.name}): its config is "
                            f"{uio.name.dev_config}, not this mount's obd/{a['backstore']}")
        assert uio_holders(runner_uio.uio) == []
        # b's ring was neither blocked nor reset: its handler still answers uncached reads
        assert set(uio_holders(b_uio.uio)) == {str(b["handler_pid"])}
        with open(img["b"], "rb") as f:
            f.seek(1 << 20)
            assert read_direct(b["device"], 1 << 20) == f.read(1 << 16)
        assert (mnt["b"] / "whoami").read_text() == "image b\n"
    finally:
        runner.delete()
        for p in mnt.values():
            obd("umount", str(p))


def test_udev_links_dev_obd_to_the_disk_of_each_mount(tmp_path):
    """Under a real systemd-udevd with the rules obd-setup installs: /dev/obd/<mount id> names
    the sdX of the mount while it exists."""
    udevd = "/lib/systemd/systemd-udevd"
    assert os.access(udevd, os.X_OK), "udev is not installed (scripts/install-deps lists it)"
    proc = subprocess.Popen([udevd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists("/run/udev/control"):
            assert proc.poll() is None and time.monotonic() < deadline, "systemd-udevd did not start"
            time.sleep(0.1)
        rc, out = script(SETUP)
        assert rc == 0 and "+ udevadm control --reload" in out, out
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        assert obd("mount", "--raw", make_image(tmp_path, "u"), str(mnt))[0] == 0
        try:
            [m] = obd_json_list()
            subprocess.run(["udevadm", "settle", "--timeout=60"], check=True)
            link = f"/dev/obd/{m['id']}"
            assert os.path.islink(link) and os.path.realpath(link) == m["device"]
        finally:
            assert obd("umount", str(mnt))[0] == 0
        subprocess.run(["udevadm", "settle", "--timeout=60"], check=True)
        assert not os.path.lexists(link)
    finally:
        proc.terminate()
        proc.wait(30)


def test_umount_of_a_state_file_naming_a_foreign_target_touches_nothing(tmp_path, foreign_lio, capsys):
    """A state file edited to name another tool's tcm_loop target: obd umount refuses in one
    line; that target, its LUN and its disk stay as they were (not offlined, not removed)."""
    import json

    from tcmu_overlaybd.mount.state import mount_id

    foreign_paths, foreign_scsi = foreign_lio()
    [disk] = [d for d in os.listdir("/sys/class/scsi_disk") if d.startswith(foreign_scsi)]
    state_of = f"/sys/class/scsi_disk/{disk}/device/state"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mid = mount_id(str(mnt))
    forged = f"/run/obd/{mid}.json"
    os.makedirs("/run/obd", exist_ok=True)
    with open(forged, "w") as f:
        json.dump({"id": mid, "mountpoint": str(mnt), "image": "x", "raw": True, "options": {}, "size": 1 << 20,
                   "backstore": f"obd-{mid}", "wwn": FOREIGN_WWN, "lower": f"/run/obd/{mid}.lower",
                   "upper": str(tmp_path / "upper"), "work": str(tmp_path / "work"), "own_upper": False,
                   "phase": "mounted"}, f)
    try:
        capsys.readouterr()
        rc, _ = obd("umount", str(mnt))
        [err] = capsys.readouterr().err.splitlines()
        assert rc == 8 and err.startswith(f"obd: refusing to remove loopback target {FOREIGN_WWN}: it serves ")
        assert err.endswith(f"/foreign-disk, not obd backstore obd-{mid}")
        [m] = [x for x in obd_json_list() if x["id"] == mid]
        assert m["device"] == ""  # a foreign disk is not shown as this mount's
        assert all(os.path.isdir(p) for p in foreign_paths)
        assert open(state_of).read().strip() == "running"
    finally:
        os.unlink(forged)


def test_every_obd_module_has_current_bytecode_in_the_guest():
    """The guest sees the checkout read-only, so bytecode it compiles is lost: without the
    compiled modules scripts/vm-run leaves beside the sources, every obd process in the guest
    (each mount's CLI, supervisor and handler) compiles them again, seconds under TCG."""
    import importlib.util

    package = os.path.join(REPO, "tcmu_overlaybd")
    stale = []
    for dirpath, _, files in os.walk(package):
        for name in (n for n in files if n.endswith(".py")):
            src = os.path.join(dirpath, name)
            try:
                with open(importlib.util.cache_from_source(src), "rb") as f:
                    header = f.read(16)
            except FileNotFoundError:
                stale.append(f"{src}: no bytecode")
                continue
            st = os.stat(src)
            flags = int.from_bytes(header[4:8], "little")
            timestamp_ok = flags & 1 or (int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                                          and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF)
            if header[:4] != importlib.util.MAGIC_NUMBER or not timestamp_ok:
                stale.append(f"{src}: bytecode out of date")
    assert not stale, "\n".join(stale)
