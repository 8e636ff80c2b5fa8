"""A reboot, as far as one can be simulated without rebooting: every obd process killed, every
mount, LIO object and state file gone; `obd recover` re-creates the mounts from their records
in state.persistDir, on the same upper directories."""

from __future__ import annotations

import gzip
import io
import os
import shutil
import signal
import stat
import subprocess
import tarfile

import pytest

from tcmu_overlaybd import config

from ..helpers.layouts import layout_from_flat
from .conftest import kernel_leftovers, kill_every_obd_process, obd, obd_json_list

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLEANUP = os.path.join(REPO, "scripts", "obd-cleanup")
HELLO_LAYER = "sha256_719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6"


def hello_bytes(vectors) -> bytes:
    """/hello as the original docker layer (gzip tar) holds it."""
    raw = gzip.decompress((vectors / "aci-hello-world" / HELLO_LAYER).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return tf.extractfile("hello").read()


def raw_image(tmp_path, name: str) -> str:
    tree = tmp_path / f"{name}-tree"
    tree.mkdir()
    (tree / "whoami").write_text(f"raw image {name}\n")
    img = str(tmp_path / f"{name}.img")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree), img, "16M"], check=True)
    return img


def simulate_reboot(mounts: list[dict]) -> None:
    """What a reboot takes away: processes (SIGKILL), mounts, LIO objects, /run/obd."""
    kill_every_obd_process()
    for m in mounts:
        for path in (m["mountpoint"], m["lower"]):
            subprocess.run(["umount", "-l", path], check=True)
    r = subprocess.run([CLEANUP], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    for m in mounts:  # no longer recoverable in place: torn down, but the record stays
        assert f"rmdir /sys/kernel/config/target/loopback/{m['wwn']}" in r.stdout
        assert f"kept the mount record of {m['mountpoint']} " in r.stdout
    state = config.load()["state.dir"]
    for name in os.listdir(state):
        path = os.path.join(state, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def test_recover_after_a_reboot_brings_back_every_mount_with_its_writes(vectors, tmp_path, monkeypatch):
    monkeypatch.setenv("OBD_CACHE_DIR", str(tmp_path / "cache"))
    records = config.load()["state.persistDir"]
    layout = layout_from_flat(vectors / "aci-hello-world", tmp_path / "hello")
    hello_ref = f"oci:{layout}:amd64-converted"
    raw_b, raw_c = raw_image(tmp_path, "b"), raw_image(tmp_path, "c")
    mnt = {n: tmp_path / f"mnt-{n}" for n in "abc"}
    for p in mnt.values():
        p.mkdir()
    b_upper = tmp_path / "b-upper"  # a user-chosen upper directory (--upper)
    baseline = kernel_leftovers()
    try:
        assert obd("mount", hello_ref, str(mnt["a"]))[0] == 0
        assert obd("mount", "--raw", "--upper", str(b_upper), raw_b, str(mnt["b"]))[0] == 0
        assert obd("mount", "--raw", raw_c, str(mnt["c"]))[0] == 0
        (mnt["a"] / "written-before-reboot").write_text("into the hello-world rootfs\n")
        (mnt["b"] / "written-before-reboot").write_text("into raw image b\n")
        before = {m["mountpoint"]: m for m in obd_json_list()}
        assert sorted(os.listdir(records)) == sorted(f"{m['id']}.json" for m in before.values())
        assert stat.S_IMODE(os.stat(records).st_mode) == 0o700
        assert {stat.S_IMODE(os.stat(os.path.join(records, n)).st_mode) for n in os.listdir(records)} == {0o600}

        simulate_reboot(list(before.values()))
        left = kernel_leftovers()
        assert len(left.pop("records")) == 3  # the records are what survives a reboot
        assert left == {k: v for k, v in baseline.items() if k != "records"}
        listed = {m["mountpoint"]: m["status"] for m in obd_json_list()}
        assert listed == {str(p): "not active" for p in mnt.values()}

        os.unlink(raw_c)  # c's image can no longer be reached
        rc, out = obd("recover")
        assert rc == 8
        assert sorted(out.splitlines()) == sorted([f"{mnt['a']}: recovered", f"{mnt['b']}: recovered",
                                                   f"{mnt['c']}: failed: {raw_c}: no such file"])
        assert (mnt["a"] / "written-before-reboot").read_text() == "into the hello-world rootfs\n"
        assert (mnt["b"] / "written-before-reboot").read_text() == "into raw image b\n"
        assert (mnt["a"] / "hello").read_bytes() == hello_bytes(vectors)
        assert (mnt["b"] / "whoami").read_text() == "raw image b\n"
        after = {m["mountpoint"]: m for m in obd_json_list()}
        assert {p: m["status"] for p, m in after.items()} == {
            str(mnt["a"]): "active", str(mnt["b"]): "active", str(mnt["c"]): "not active"}
        for p in (mnt["a"], mnt["b"]):  # the same upper directories, new handlers and devices
            assert after[str(p)]["upper"] == before[str(p)]["upper"]
            assert after[str(p)]["supervisor_pid"] != before[str(p)]["supervisor_pid"]
            assert after[str(p)]["device"].startswith("/dev/sd")

        rc, out = obd("recover")  # idempotent: only the unreachable one is reported again
        assert (rc, out) == (8, f"{mnt['c']}: failed: {raw_c}: no such file\n")
        assert obd("umount", str(mnt["c"]))[0] == 0  # drops the record of the lost mount
        assert obd("recover") == (0, "")

        for p in (mnt["a"], mnt["b"]):
            assert obd("umount", str(p))[0] == 0
        assert os.listdir(records) == []
        assert not os.path.exists(os.path.dirname(after[str(mnt["a"])]["upper"]))  # obd's own upper
        assert (b_upper / "written-before-reboot").read_text() == "into raw image b\n"  # the user's
        assert kernel_leftovers() == baseline
    finally:  # whatever is left after a failure: mounts and records (rc 9 where there is none)
        for p in mnt.values():
            obd("umount", str(p))


def test_a_foreground_mount_leaves_no_record(tmp_path):
    """`obd mount -f` (what obd-mount@.service runs) is mounted again by its unit after a reboot:
    a record would make obd-recover.service mount it first and the unit then fail."""
    records = config.load()["state.persistDir"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([os.path.join(REPO, ".venv", "bin", "obd"), "mount", "-f", "--raw",
                             raw_image(tmp_path, "f"), str(mnt)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == str(mnt)  # printed once mounted
        assert (mnt / "whoami").read_text() == "raw image f\n"
        [m] = obd_json_list()
        assert (m["status"], m["persisted"]) == ("active", False)
        assert not os.path.exists(os.path.join(records, f"{m['id']}.json"))
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    assert obd_json_list() == []
