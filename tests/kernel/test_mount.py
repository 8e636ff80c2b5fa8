"""obd mount end to end in a real kernel: TCMU handler, tcm_loop, sd, ext4 + overlayfs."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from .conftest import kernel_leftovers, obd, obd_json_list

pytestmark = pytest.mark.kernel


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "tree"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("obd-test\n")
    (root / "big.bin").write_bytes(os.urandom(3 << 20) + b"tail")
    (root / "dir" / "sub").mkdir(parents=True)
    for i in range(50):
        (root / "dir" / "sub" / f"f{i}").write_bytes(os.urandom(i * 997))
    os.symlink("etc/hostname", root / "link")
    return root


def files_of(root) -> dict:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def test_raw_mount_reads_writes_and_leaves_nothing_behind(tree, mkext4, tmp_path):
    img = mkext4(str(tree))
    img_sum = hashlib.sha256(open(img, "rb").read()).hexdigest()
    before = kernel_leftovers()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    for round_ in range(2):  # a second mount of the same image works
        rc, out = obd("mount", "--raw", img, str(mnt))
        assert rc == 0 and out.strip() == str(mnt)
        assert files_of(mnt) == files_of(tree)
        assert os.readlink(mnt / "link") == "etc/hostname"
        [m] = obd_json_list()
        assert m["mountpoint"] == str(mnt) and m["device"].startswith("/dev/sd") and m["handler_alive"]
        # the whole device reads back as the image (handler + sd + ring, large requests)
        with open(m["device"], "rb") as dev, open(img, "rb") as raw:
            assert hashlib.sha256(dev.read()).hexdigest() == hashlib.sha256(raw.read()).hexdigest()
        # writes land in the upper directory, never in the image
        (mnt / "etc" / "hostname").write_text("changed\n")
        (mnt / f"new{round_}").write_bytes(b"x" * 10000)
        assert (mnt / "etc" / "hostname").read_text() == "changed\n"
        assert open(os.path.join(m["upper"], "etc", "hostname")).read() == "changed\n"
        assert os.path.getsize(os.path.join(m["upper"], f"new{round_}")) == 10000
        rc, _ = obd("umount", str(mnt))
        assert rc == 0
        assert kernel_leftovers() == before
        assert not os.path.exists(m["device"])
        assert hashlib.sha256(open(img, "rb").read()).hexdigest() == img_sum
        assert os.listdir(mnt) == []


def test_device_is_read_only_with_sd_attributes(tree, mkext4, tmp_path, monkeypatch):
    img = mkext4(str(tree))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    monkeypatch.setenv("OBD_READ_AHEAD_KB", "1024")  # io.readAheadKb
    assert obd("mount", "--raw", img, str(mnt))[0] == 0
    try:
        dev = os.path.basename(obd_json_list()[0]["device"])
        sysblk = f"/sys/block/{dev}"
        assert open(f"{sysblk}/ro").read().strip() == "1"            # MODE SENSE WP
        assert int(open(f"{sysblk}/size").read()) * 512 == os.path.getsize(img)
        assert open(f"{sysblk}/queue/rotational").read().strip() == "0"  # VPD B1
        assert int(open(f"{sysblk}/queue/max_hw_sectors_kb").read()) >= 1024 or \
            int(open(f"{sysblk}/queue/max_sectors_kb").read()) >= 512
        assert open(f"{sysblk}/queue/read_ahead_kb").read().strip() == "1024"
        assert open(f"{sysblk}/device/vendor").read().strip() == "OBD"
        assert int(open(f"{sysblk}/device/timeout").read()) > 1000000
        # the unit serial is the mount id: udev/61-obd.rules names the disk /dev/obd/<id>
        m = obd_json_list()[0]
        assert open(f"{sysblk}/device/vpd_pg80", "rb").read()[-12:] == m["id"].encode()
        r = subprocess.run(["dd", "if=/dev/zero", f"of=/dev/{dev}", "bs=4096", "count=1",
                            "oflag=direct"], capture_output=True, text=True)
        assert r.returncode != 0
    finally:
        assert obd("umount", str(mnt))[0] == 0


def test_umount_of_unknown_mountpoint_is_one_line_error(tmp_path, capsys):
    rc, _ = obd("umount", str(tmp_path))
    assert rc == 9
    assert capsys.readouterr().err.strip() == f"obd: {tmp_path} is not an obd mount"


def test_foreground_mount_unmounts_on_ctrl_c(tree, mkext4, tmp_path):
    import signal

    from ..conftest import ROOT

    img = mkext4(str(tree))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    before = kernel_leftovers()
    proc = subprocess.Popen([str(ROOT / ".venv/bin/obd"), "mount", "-f", "--raw", img, str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == str(mnt)  # printed once usable
        assert (mnt / "etc" / "hostname").read_text() == "obd-test\n"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(120) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert kernel_leftovers() == before


def test_doctor_passes_on_a_tcmu_kernel():
    rc, out = obd("doctor")
    assert rc == 0 and "FAIL" not in out
    assert "ok   kernel module target_core_user" in out and "ok   kernel module tcm_loop" in out


def test_restarted_handler_serves_the_image_pinned_at_mount_time(vectors, tmp_path, monkeypatch):
    """The handler opens the image once and the mount pins its manifest digest: after the tag
    is gone from the layout, a handler killed and restarted still serves the same /hello."""
    import gzip
    import io
    import json
    import signal
    import tarfile
    import time

    from tcmu_overlaybd import config

    from ..helpers.layouts import layout_from_flat

    monkeypatch.setenv("OBD_CACHE_DIR", str(tmp_path / "cache"))
    layer = vectors / "aci-hello-world" / "sha256_719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6"
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer.read_bytes()))) as tf:
        want = tf.extractfile("hello").read()
    layout = layout_from_flat(vectors / "aci-hello-world", tmp_path / "hello")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    assert obd("mount", f"oci:{layout}:amd64-converted", str(mnt))[0] == 0
    try:
        [m] = obd_json_list()
        with open(os.path.join(config.load()["state.dir"], f"{m['id']}.json")) as f:
            pinned = json.load(f)["options"]["extra"]["manifest_digest"]
        index = json.loads((layout / "index.json").read_text())
        assert pinned in [d["digest"] for d in index["manifests"]]
        for d in index["manifests"]:  # the tag the mount named no longer resolves
            d.pop("annotations", None)
        (layout / "index.json").write_text(json.dumps(index))
        os.kill(m["handler_pid"], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while not (obd_json_list()[0]["restarts"] == 1 and obd_json_list()[0]["handler_alive"]):
            assert time.monotonic() < deadline, "handler not restarted"
            time.sleep(0.05)
        subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
        assert (mnt / "hello").read_bytes() == want
    finally:
        assert obd("umount", str(mnt))[0] == 0
