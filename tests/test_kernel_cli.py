"""The kernel-path commands on a host whose kernel has no TCMU (the build machines):
one-line errors that say what to do, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from .conftest import ROOT

OBD = str(ROOT / ".venv" / "bin" / "obd")

no_tcmu = pytest.mark.skipif(
    os.path.isdir("/sys/module/target_core_user")
    or subprocess.run(["modprobe", "-n", "target_core_user"], capture_output=True).returncode == 0,
    reason="this host has TCMU (the kernel tests cover it)")


def obd(*args, env=None):
    return subprocess.run([OBD, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@no_tcmu
def test_doctor_names_what_is_missing_and_fails():
    r = obd("doctor")
    assert r.returncode == 8
    assert "FAIL kernel module target_core_user: this kernel lacks target_core_user" in r.stdout
    assert r.stderr.strip().startswith("obd: ") and "check(s) failed" in r.stderr


@no_tcmu
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to get past the root check")
def test_mount_without_tcmu_is_one_line_kernel_error(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    (tmp_path / "mnt").mkdir()
    r = obd("mount", "--raw", str(img), str(tmp_path / "mnt"), env={"OBD_STATE_DIR": str(tmp_path / "run")})
    assert r.returncode == 8
    [line] = r.stderr.strip().splitlines()
    assert line.startswith("obd: cannot load target_core_user tcm_loop") and "scripts/vm-run" in line
    assert not (tmp_path / "run").exists() or os.listdir(tmp_path / "run") == []


def test_mount_onto_missing_directory_is_usage_error(tmp_path):
    r = obd("mount", "--raw", "/nonexistent.img", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip() == f"obd: {tmp_path / 'nope'}: mountpoint is not a directory"


def test_list_and_umount_with_no_mounts(tmp_path):
    env = {"OBD_STATE_DIR": str(tmp_path / "run")}
    r = obd("list", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout) == []
    r = obd("umount", str(tmp_path), env=env)
    assert r.returncode == 9 and r.stderr.strip() == f"obd: {tmp_path} is not an obd mount"
