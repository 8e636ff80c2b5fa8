"""The root-run helpers, systemd units and Vagrant files, checked without a TCMU kernel:
--dry-run output, idempotence, ownership rules of obd-cleanup on state files, unit syntax."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = os.path.join(REPO, "scripts", "obd-setup")
CLEANUP = os.path.join(REPO, "scripts", "obd-cleanup")
PROVISION = os.path.join(REPO, "vagrant", "provision.sh")
UNITS = [os.path.join(REPO, "systemd", u) for u in ("obd-recover.service", "obd-mount@.service")]
#: what obd-setup installs (relative to / or --destdir) -> its source in the checkout
SOURCES = {"etc/udev/rules.d/61-obd.rules": "udev/61-obd.rules",
           "etc/systemd/system/obd-recover.service": "systemd/obd-recover.service",
           "etc/systemd/system/obd-mount@.service": "systemd/obd-mount@.service",
           "etc/modules-load.d/obd.conf": "systemd/obd-modules.conf"}
INSTALLED = list(SOURCES)


def run(*argv: str, env: dict | None = None) -> tuple[int, str]:
    r = subprocess.run(list(argv), capture_output=True, text=True, timeout=60,
                       env=None if env is None else {**os.environ, **env})
    return r.returncode, r.stdout + r.stderr


@pytest.mark.parametrize("path", [SETUP, PROVISION])
def test_shell_scripts_parse(path):
    assert run("bash", "-n", path) == (0, "")


def test_cleanup_compiles_with_the_system_python():
    assert run(sys.executable, "-m", "py_compile", CLEANUP)[0] == 0


# ------------------------------------------------------------------ obd-setup


def test_setup_dry_run_lists_every_install_and_changes_nothing(tmp_path):
    rc, out = run(SETUP, "--dry-run", "--destdir", str(tmp_path))
    assert rc == 0, out
    for rel, src in SOURCES.items():
        assert f"would: install -D -m 0644 {REPO}/{src} {tmp_path}/{rel}\n" in out
    assert f"would: ln -s {REPO}/.venv/bin/obd {tmp_path}/usr/local/bin/obd" in out
    assert os.listdir(tmp_path) == []


def test_setup_dry_run_on_the_live_system_plans_the_kernel_steps():
    rc, out = run(SETUP, "--dry-run")
    assert rc == 0, out
    for line in out.splitlines():  # every action is announced, none is run
        assert line.startswith(("would: ", "obd-setup: ")), line
    if not os.path.isdir("/sys/module/target_core_user"):
        assert "would: modprobe -a target_core_user" in out
    if not os.path.exists("/etc/udev/rules.d/61-obd.rules"):
        assert "would: install -D -m 0644 " + os.path.join(REPO, "udev", "61-obd.rules") in out
        assert not os.path.exists("/etc/udev/rules.d/61-obd.rules")


def test_setup_installs_idempotently_and_uninstalls(tmp_path):
    rc, first = run(SETUP, "--destdir", str(tmp_path))
    assert rc == 0, first
    for rel, src in SOURCES.items():
        assert f"+ install -D -m 0644 {REPO}/{src} {tmp_path}/{rel}\n" in first
        with open(os.path.join(REPO, src), "rb") as f:
            assert (tmp_path / rel).read_bytes() == f.read()
        assert (tmp_path / rel).stat().st_mode & 0o777 == 0o644
    assert os.readlink(tmp_path / "usr/local/bin/obd") == f"{REPO}/.venv/bin/obd"

    rc, second = run(SETUP, "--destdir", str(tmp_path))
    assert rc == 0 and "+ " not in second, second
    assert second.count("obd-setup: unchanged ") == len(INSTALLED) + 1

    (tmp_path / INSTALLED[0]).write_text("# edited by hand\n")  # drift is repaired
    rc, third = run(SETUP, "--destdir", str(tmp_path))
    assert rc == 0 and third.count("+ install") == 1 and INSTALLED[0] in third

    rc, out = run(SETUP, "--destdir", str(tmp_path), "--uninstall")
    assert rc == 0, out
    assert [p for p in INSTALLED + ["usr/local/bin/obd"] if os.path.lexists(tmp_path / p)] == []
    rc, out = run(SETUP, "--destdir", str(tmp_path), "--uninstall")
    assert rc == 0 and "+ " not in out and out.count("obd-setup: absent ") == len(INSTALLED)


def test_setup_keeps_an_obd_command_that_is_not_its_link(tmp_path):
    (tmp_path / "usr/local/bin").mkdir(parents=True)
    (tmp_path / "usr/local/bin/obd").write_text("#!/bin/sh\n")
    rc, out = run(SETUP, "--destdir", str(tmp_path))
    assert rc == 0 and f"obd-setup: kept {tmp_path}/usr/local/bin/obd (not ours" in out
    run(SETUP, "--destdir", str(tmp_path), "--uninstall")
    assert (tmp_path / "usr/local/bin/obd").read_text() == "#!/bin/sh\n"


def test_setup_rejects_an_unknown_argument():
    assert run(SETUP, "--frobnicate") == (2, "obd-setup: unknown argument --frobnicate (see --help)\n")


# ------------------------------------------------------------------ obd-cleanup


def write_state(state_dir, mid: str, pids: dict | None, phase: str = "mounted", **extra) -> None:
    st = {"id": mid, "mountpoint": f"/nonexistent/mnt-{mid}", "image": "x", "raw": True, "options": {},
          "size": 1, "backstore": f"obd-{mid}", "wwn": "naa.5" + mid + "abc",
          "lower": str(state_dir / f"{mid}.lower"), "upper": f"/nonexistent/{mid}/upper",
          "work": f"/nonexistent/{mid}/work", "own_upper": True, "phase": phase, **extra}
    (state_dir / f"{mid}.json").write_text(json.dumps(st))
    if pids is not None:
        (state_dir / f"{mid}.pids").write_text(json.dumps(pids))
    (state_dir / f"{mid}.log").write_text("handler log\n")


@pytest.fixture
def fake_supervisor():
    """A live process whose command line is an obd supervisor's."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)",
                          "-m", "tcmu_overlaybd.mount.supervisor"])
    yield p.pid
    p.kill()
    p.wait()


@pytest.fixture
def state_dir(tmp_path, fake_supervisor):
    sd = tmp_path / "run-obd"
    sd.mkdir()
    write_state(sd, "aaaaaaaaaaaa", {"supervisor_pid": 999999999, "handler_pid": 0, "restarts": 0})
    (sd / "aaaaaaaaaaaa.lower").mkdir()
    (sd / "aaaaaaaaaaaa.metrics").write_text("127.0.0.1:9100\n")  # left by its killed handler
    write_state(sd, "bbbbbbbbbbbb", {"supervisor_pid": fake_supervisor, "handler_pid": 0, "restarts": 0})
    (sd / "bbbbbbbbbbbb.stats.sock").write_text("")  # a live handler's: kept
    (sd / "ffffffffffff.stats.sock").write_text("")  # of a mount whose state file is gone
    write_state(sd, "cccccccccccc", None, phase="starting")  # obd mount still running
    (sd / "dddddddddddd.log").write_text("log of a mount whose state file is gone\n")
    (sd / "eeeeeeeeeeee.json").write_text("{not json")
    (sd / "README").write_text("not obd's naming: never touched\n")
    return sd


def test_cleanup_dry_run_proposes_only_dead_obd_state(state_dir):
    before = sorted(os.listdir(state_dir))
    rc, out = run(CLEANUP, "--dry-run", "--state-dir", str(state_dir))
    assert rc == 0, out
    actions = [line for line in out.splitlines() if line.startswith("would: ")]
    assert actions == [f"would: rm {state_dir}/aaaaaaaaaaaa.json", f"would: rm {state_dir}/aaaaaaaaaaaa.pids",
                       f"would: rm {state_dir}/aaaaaaaaaaaa.log", f"would: rm {state_dir}/aaaaaaaaaaaa.metrics",
                       f"would: rmdir {state_dir}/aaaaaaaaaaaa.lower",
                       f"would: rm {state_dir}/dddddddddddd.log", f"would: rm {state_dir}/ffffffffffff.stats.sock"]
    assert "obd-cleanup: kept /nonexistent/mnt-cccccccccccc: obd mount in progress" in out
    assert f"obd-cleanup: kept {state_dir}/eeeeeeeeeeee.json: unreadable state file" in out
    assert "obd-cleanup: kept upper directory /nonexistent/aaaaaaaaaaaa of /nonexistent/mnt-aaaaaaaaaaaa" in out
    assert sorted(os.listdir(state_dir)) == before


def test_cleanup_removes_dead_state_once_and_keeps_the_rest(state_dir):
    if os.geteuid() != 0:
        pytest.skip("obd-cleanup acts only as root")
    rc, out = run(CLEANUP, "--state-dir", str(state_dir))
    assert rc == 0, out
    assert sorted(os.listdir(state_dir)) == [
        "README", "bbbbbbbbbbbb.json", "bbbbbbbbbbbb.log", "bbbbbbbbbbbb.pids", "bbbbbbbbbbbb.stats.sock",
        "cccccccccccc.json", "cccccccccccc.log", "eeeeeeeeeeee.json"]
    rc, again = run(CLEANUP, "--state-dir", str(state_dir))
    assert rc == 0 and "obd-cleanup: nothing to clean" in again and "rm " not in again


def test_cleanup_treats_a_stale_starting_state_as_dead(tmp_path):
    sd = tmp_path / "run-obd"
    sd.mkdir()
    write_state(sd, "cccccccccccc", None, phase="starting")
    old = time.time() - 3600
    os.utime(sd / "cccccccccccc.json", (old, old))
    rc, out = run(CLEANUP, "--dry-run", "--state-dir", str(sd))
    assert rc == 0 and f"would: rm {sd}/cccccccccccc.json" in out


def test_cleanup_reads_state_dir_from_the_config_file(tmp_path):
    sd = tmp_path / "elsewhere"
    sd.mkdir()
    (sd / "ffffffffffff.log").write_text("x")
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"state": {"dir": str(sd)}}))
    env = {"OBD_CONFIG": str(cfg), "OBD_STATE_DIR": ""}
    rc, out = run(CLEANUP, "--dry-run", env=env)
    assert (rc, out) == (0, f"would: rm {sd}/ffffffffffff.log\n")
    cfg.write_text("{broken")
    rc, out = run(CLEANUP, "--dry-run", env=env)
    assert rc == 1 and out.startswith(f"obd-cleanup: {cfg}: unreadable configuration") and out.count("\n") == 1


# ------------------------------------------------------------------ systemd, Vagrant


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_pass_systemd_analyze_verify():
    rc, out = run("systemd-analyze", "verify", *UNITS)
    # the only complaint allowed: obd-setup has not linked /usr/local/bin/obd on this machine
    problems = [line for line in out.splitlines()
                if line.strip() and "Command /usr/local/bin/obd is not executable" not in line]
    assert problems == []


@pytest.mark.parametrize("unit", UNITS, ids=os.path.basename)
def test_units_start_after_the_network_and_before_container_runtimes(unit):
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str
    cp.read(unit)
    assert "network-online.target" in cp["Unit"]["After"].split()
    assert {"containerd.service", "docker.service"} <= set(cp["Unit"]["Before"].split())
    assert cp["Service"]["Restart"] == "on-failure"
    assert cp["Service"]["ExecStart"].startswith("/usr/local/bin/obd ")


@pytest.mark.skipif(shutil.which("vagrant") is None,
                    reason="vagrant not installed: Debian's package pulls ~260 Ruby packages, "
                           "too heavy for scripts/install-deps")
def test_vagrantfile_validates():
    r = subprocess.run(["vagrant", "validate"], cwd=os.path.join(REPO, "vagrant"),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_provision_rejects_an_unknown_option():
    assert run(PROVISION, "--bogus") == (2, "provision: unknown option --bogus\n")


def test_cleanup_reports_and_keeps_the_mount_record_of_what_it_tears_down(tmp_path):
    sd, records = tmp_path / "run-obd", tmp_path / "records"
    sd.mkdir()
    records.mkdir()
    write_state(sd, "aaaaaaaaaaaa", {"supervisor_pid": 999999999, "handler_pid": 0, "restarts": 0})
    (records / "aaaaaaaaaaaa.json").write_text('{"id": "aaaaaaaaaaaa"}')
    rc, out = run(CLEANUP, "--dry-run", "--state-dir", str(sd), env={"OBD_PERSIST_DIR": str(records)})
    assert rc == 0 and f"would: rm {sd}/aaaaaaaaaaaa.json" in out
    assert ("obd-cleanup: kept the mount record of /nonexistent/mnt-aaaaaaaaaaaa "
            "(obd recover mounts it again, obd umount drops it)") in out.splitlines()
    if os.geteuid() == 0:
        assert run(CLEANUP, "--state-dir", str(sd), env={"OBD_PERSIST_DIR": str(records)})[0] == 0
        assert os.listdir(sd) == [] and os.listdir(records) == ["aaaaaaaaaaaa.json"]
