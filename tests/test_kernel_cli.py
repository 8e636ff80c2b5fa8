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


# ------------------------------------------------------------------ TCMU ownership (issue 7.7)


def fake_uio(sys_uio, entry: str, name: str) -> None:
    (sys_uio / entry).mkdir(parents=True)
    (sys_uio / entry / "name").write_text(name + "\n")  # sysfs ends it with a newline


@pytest.mark.parametrize("text, parsed", [
    ("tcm-user/3/obd-0123456789ab/obd/obd-0123456789ab\n", (3, "obd-0123456789ab", "obd", "obd-0123456789ab")),
    ("tcm-user/0/disk1/file//var/lib/img.raw", (0, "disk1", "file", "/var/lib/img.raw")),
    ("tcm-user/12/ovbd/overlaybd//etc/ovbd/config.v1.json;128",
     (12, "ovbd", "overlaybd", "/etc/ovbd/config.v1.json;128")),
    ("tcm-user/1/bare", (1, "bare", "", "")),
])
def test_tcmu_uio_name_parses_into_hba_name_subtype_and_cfgstring(text, parsed):
    from tcmu_overlaybd.tcmu.uio import TcmuName

    n = TcmuName.parse(text)
    assert (n.hba, n.dev_name, n.subtype, n.cfgstring) == parsed
    assert str(n) == text.rstrip("\n")
    assert n.configfs_path == f"/sys/kernel/config/target/core/user_{parsed[0]}/{parsed[1]}"


@pytest.mark.parametrize("text", ["uio_pdrv_genirq", "tcm-user", "tcm-user/x/name/obd/y", "tcm-user/1/", ""])
def test_names_of_other_uio_drivers_are_not_tcmu_devices(text):
    from tcmu_overlaybd.tcmu.uio import TcmuName

    assert TcmuName.parse(text) is None


def test_find_uio_returns_only_the_device_configured_for_this_mount(tmp_path):
    from tcmu_overlaybd.tcmu.uio import find_uio

    fake_uio(tmp_path, "uio0", "uio_pdrv_genirq")
    fake_uio(tmp_path, "uio1", "tcm-user/1/obd-aaaaaaaaaaaa/other/obd-aaaaaaaaaaaa")  # a namesake, other HBA
    fake_uio(tmp_path, "uio10", "tcm-user/4/obd-aaaaaaaaaaaa/obd/obd-aaaaaaaaaaaa")
    dev = find_uio("obd-aaaaaaaaaaaa", "obd/obd-aaaaaaaaaaaa", str(tmp_path))
    assert (dev.uio, dev.name.configfs_path) == ("uio10", "/sys/kernel/config/target/core/user_4/obd-aaaaaaaaaaaa")


@pytest.mark.parametrize("name, config_shown", [
    ("tcm-user/0/runner-disk/file//srv/disk.img", "file//srv/disk.img"),      # tcmu-runner's
    ("tcm-user/2/runner-disk/obd/obd-bbbbbbbbbbbb", "obd/obd-bbbbbbbbbbbb"),  # another mount's
    ("tcm-user/2/runner-disk/obdx/obd-aaaaaaaaaaaa", "obdx/obd-aaaaaaaaaaaa"),  # subtype prefix trap (§2.3)
    ("tcm-user/2/runner-disk", "no dev_config"),
])
def test_find_uio_refuses_a_device_whose_config_is_not_ours(tmp_path, name, config_shown):
    from tcmu_overlaybd.errors import KernelError
    from tcmu_overlaybd.tcmu.uio import find_uio

    fake_uio(tmp_path, "uio7", name)
    with pytest.raises(KernelError) as e:
        find_uio("runner-disk", "obd/obd-aaaaaaaaaaaa", str(tmp_path))
    assert str(e.value) == (f"refusing /dev/uio7 ({name}): its config is {config_shown}, "
                            f"not this mount's obd/obd-aaaaaaaaaaaa")
    assert e.value.exit_code == 8


def test_find_uio_of_a_missing_backstore_is_not_found(tmp_path):
    from tcmu_overlaybd.errors import NotFoundError
    from tcmu_overlaybd.tcmu.uio import find_uio

    fake_uio(tmp_path, "uio0", "tcm-user/0/other/obd/other")
    with pytest.raises(NotFoundError, match="^no TCMU uio device for backstore obd-aaaaaaaaaaaa$"):
        find_uio("obd-aaaaaaaaaaaa", "obd/obd-aaaaaaaaaaaa", str(tmp_path))


# ------------------------------------------------------------------ mount records (reboot persistence)


@pytest.fixture
def dirs(tmp_path):
    """Private state, record and upper directories; the environment that points obd at them."""
    d = {"state": tmp_path / "run", "records": tmp_path / "records", "upper": tmp_path / "upper"}
    env = {"OBD_STATE_DIR": str(d["state"]), "OBD_PERSIST_DIR": str(d["records"]),
           "OBD_UPPER_DIR": str(d["upper"])}
    return d, env


def record(dirs, mnt, upper_exists=True, **fields):
    """A mount record as obd mount leaves it, of a raw image mounted on ``mnt`` with an obd-made upper."""
    from tcmu_overlaybd.mount.state import MountRecord, RecordDir, mount_id

    d, _ = dirs
    mid = mount_id(str(mnt))
    base = d["upper"] / mid
    if upper_exists:
        (base / "upper").mkdir(parents=True)
        (base / "upper" / "written-before-reboot").write_text("keep me\n")
    rec = MountRecord(id=mid, mountpoint=str(mnt), image="/srv/disk.img", raw=True,
                      options={"plain_http": True, "authfile": "/root/auth.json"},
                      upper=str(base / "upper"), work=str(base / "work"), own_upper=True, size=1 << 20)
    for k, v in fields.items():
        setattr(rec, k, v)
    RecordDir(str(d["records"])).save(rec)
    return rec


def test_record_is_root_only_and_never_holds_credentials(dirs, tmp_path):
    from tcmu_overlaybd.mount.state import RecordDir

    d, _ = dirs
    rec = record(dirs, tmp_path, options={"username": "alice", "password": "s3cret", "plain_http": True})
    path = d["records"] / f"{rec.id}.json"
    assert path.stat().st_mode & 0o777 == 0o600 and d["records"].stat().st_mode & 0o777 == 0o700
    text = path.read_text()
    assert "s3cret" not in text and "alice" not in text
    assert RecordDir(str(d["records"])).load(rec.id).options == {"plain_http": True}


def test_list_shows_a_recorded_mount_that_is_not_active(dirs, tmp_path):
    _, env = dirs
    mnt = tmp_path / "mnt"
    rec = record(dirs, mnt)
    r = obd("list", "--json", env=env)
    assert r.returncode == 0, r.stderr
    [m] = json.loads(r.stdout)
    assert (m["mountpoint"], m["status"], m["persisted"], m["handler_alive"], m["device"]) == \
        (str(mnt), "not active", True, False, "")
    assert "options" not in m and m["id"] == rec.id
    r = obd("list", env=env)
    assert r.stdout.splitlines()[1].split() == [str(mnt), "-", "-", "0", "not", "active", "/srv/disk.img"]


def test_mount_over_a_recorded_mount_is_refused(dirs, tmp_path):
    _, env = dirs
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    record(dirs, mnt)
    r = obd("mount", "--raw", "/srv/disk.img", str(mnt), env=env)
    assert r.returncode == 9
    assert r.stderr == (f"obd: {mnt} has an obd mount record from before a restart "
                        f"(obd recover brings it back, obd umount {mnt} drops it)\n")


def test_umount_of_a_recorded_mount_drops_its_record_and_upper(dirs, tmp_path):
    d, env = dirs
    mnt = tmp_path / "mnt"
    rec = record(dirs, mnt)
    r = obd("umount", str(mnt), env=env)
    assert (r.returncode, r.stderr) == (0, "")
    assert os.listdir(d["records"]) == [] and not os.path.exists(os.path.dirname(rec.upper))
    assert obd("umount", str(mnt), env=env).returncode == 9


def test_recover_refuses_a_record_whose_upper_is_gone_and_keeps_it(dirs, tmp_path):
    d, env = dirs
    mnt = tmp_path / "mnt"
    rec = record(dirs, mnt, upper_exists=False)
    r = obd("recover", env=env)
    assert r.returncode == 8
    assert r.stdout == f"{mnt}: failed: its upper directory {rec.upper} is gone\n"
    assert r.stderr == "obd: 1 mount(s) could not be recovered\n"
    assert os.listdir(d["records"]) == [f"{rec.id}.json"] and not mnt.exists()


@no_tcmu
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to get past the root check")
def test_recover_without_tcmu_reports_each_mount_and_keeps_records_and_uppers(dirs, tmp_path):
    d, env = dirs
    recs = [record(dirs, tmp_path / name) for name in ("a", "b")]
    for _ in range(2):  # a failed recovery changes nothing: the next run finds the same
        r = obd("recover", env=env)
        assert r.returncode == 8 and r.stderr == "obd: 2 mount(s) could not be recovered\n"
        lines = sorted(r.stdout.splitlines())
        assert [line.split(": failed: cannot load target_core_user")[0] for line in lines] == \
            sorted(rec.mountpoint for rec in recs)
        assert sorted(os.listdir(d["records"])) == sorted(f"{rec.id}.json" for rec in recs)
        for rec in recs:
            assert open(os.path.join(rec.upper, "written-before-reboot")).read() == "keep me\n"
        assert not d["state"].exists() or os.listdir(d["state"]) == []


def test_recover_reports_an_unreadable_state_file_and_leaves_its_mount_alone(dirs, tmp_path):
    d, env = dirs
    mnt = tmp_path / "mnt"
    rec = record(dirs, mnt)
    d["state"].mkdir()
    (d["state"] / f"{rec.id}.json").write_text("{truncated")
    r = obd("recover", env=env)
    assert r.returncode == 8
    [line] = r.stdout.splitlines()
    assert line.startswith(f"{d['state']}/{rec.id}.json: failed: {d['state']}/{rec.id}.json: unreadable mount state")
    assert os.listdir(d["records"]) == [f"{rec.id}.json"] and not mnt.exists()


def test_a_target_whose_lun_serves_another_backstore_is_refused_untouched(tmp_path, monkeypatch):
    """configfs as LIO lays it out (LUN = symlink to a backstore directory), in a temp dir."""
    from tcmu_overlaybd.errors import KernelError
    from tcmu_overlaybd.lio import backstore, loopback

    ours = tmp_path / "core" / "user_1" / "obd-aaaaaaaaaaaa"
    foreign = tmp_path / "core" / "rd_mcp_0" / "foreign-disk"
    for d in (ours, foreign):
        d.mkdir(parents=True)
    lun = tmp_path / "loopback" / "naa.5001405deadbeef0" / "tpgt_1" / "lun" / "lun_0"
    lun.mkdir(parents=True)
    (lun / "link").symlink_to(foreign)
    monkeypatch.setattr(loopback, "LOOPBACK_ROOT", str(tmp_path / "loopback"))
    monkeypatch.setattr(backstore, "path_of", lambda name: str(ours) if name == ours.name else None)
    with pytest.raises(KernelError) as e:
        loopback.unexport("naa.5001405deadbeef0", "obd-aaaaaaaaaaaa")
    assert str(e.value) == (f"refusing to remove loopback target naa.5001405deadbeef0: it serves {foreign}, "
                            f"not obd backstore obd-aaaaaaaaaaaa")
    assert loopback.device_of("naa.5001405deadbeef0", "obd-aaaaaaaaaaaa") is None
    assert (lun / "link").is_symlink()
    (lun / "link").unlink()
    (lun / "link").symlink_to(ours)
    assert loopback._foreign_luns("naa.5001405deadbeef0", "obd-aaaaaaaaaaaa") == []


def test_list_warns_about_an_unreadable_state_file_and_shows_the_rest(dirs, tmp_path):
    d, env = dirs
    rec = record(dirs, tmp_path / "mnt")
    d["state"].mkdir()
    (d["state"] / "bbbbbbbbbbbb.json").write_text("{truncated")
    r = obd("list", "--json", env=env)
    assert r.returncode == 0
    assert [m["id"] for m in json.loads(r.stdout)] == [rec.id]
    assert f"{d['state']}/bbbbbbbbbbbb.json: unreadable mount state" in r.stderr


# ------------------------------------------------------------------ one open per mount (issue 6)


def test_obd_mount_imports_only_the_kernel_commands():
    """`obd mount` starts without importing the converter, the stats server or the user-space
    commands (its start-up time under QEMU was mostly imports); `obd --help` still lists all."""
    code = ("import sys; from tcmu_overlaybd.cli.main import main; main(['mount', '--help']); "
            "print(sorted(m for m in sys.modules if m.startswith('tcmu_overlaybd.cli.')))")
    r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == "['tcmu_overlaybd.cli.kernel', 'tcmu_overlaybd.cli.main', 'tcmu_overlaybd.cli.options']"
    listed = obd("--help").stdout
    for name in ("cat", "convert", "export", "inspect", "ls", "mount", "recover", "stats", "trace", "umount"):
        assert f"\n  {name} " in listed


def hello_layout(vectors, tmp_path):
    from .helpers.layouts import layout_from_flat

    return layout_from_flat(vectors / "aci-hello-world", tmp_path / "hello")


def hello_state(ref: str, tmp_path, **extra):
    from tcmu_overlaybd.mount.state import MountState

    opts = {"cache_dir": str(tmp_path / "cache"), "extra": extra}
    return MountState(id="0123456789ab", mountpoint=str(tmp_path / "mnt"), image=ref, raw=False, options=opts,
                      size=0, backstore="obd-0123456789ab", wwn="", lower="", upper="", work="", own_upper=True)


def test_a_pinned_mount_opens_the_manifest_it_resolved_even_after_the_tag_is_gone(vectors, tmp_path):
    from tcmu_overlaybd.mount.supervisor import PIN_KEY, open_source

    layout = hello_layout(vectors, tmp_path)
    ref = f"oci:{layout}:amd64-converted"
    first = open_source(hello_state(ref, tmp_path))
    size, digest, head = first.size, first.manifest_digest, first.read(0, 4096)
    first.close()
    index = json.loads((layout / "index.json").read_text())
    assert digest in [d["digest"] for d in index["manifests"]]
    for d in index["manifests"]:
        d.pop("annotations", None)
    (layout / "index.json").write_text(json.dumps(index))
    again = open_source(hello_state(ref, tmp_path, **{PIN_KEY: digest}))
    try:
        assert (again.size, again.manifest_digest, again.read(0, 4096)) == (size, digest, head)
    finally:
        again.close()


def test_a_pin_to_a_manifest_the_layout_lacks_is_a_one_line_error(vectors, tmp_path):
    from tcmu_overlaybd.errors import ObdError
    from tcmu_overlaybd.mount.supervisor import PIN_KEY, open_source

    layout = hello_layout(vectors, tmp_path)
    missing = "sha256:" + "ab" * 32
    with pytest.raises(ObdError) as e:
        open_source(hello_state(f"oci:{layout}:amd64-converted", tmp_path, **{PIN_KEY: missing}))
    assert missing in str(e.value) and "\n" not in str(e.value)


def test_the_handler_reports_size_and_manifest_before_the_backstore_exists(vectors, tmp_path, monkeypatch):
    """The supervisor --probe handshake: the handler's one open of the image gives obd mount the
    size and manifest digest; a failure of obd mount's side (here: the backstore) stops the
    handler and its supervisor, and the error is obd mount's own."""
    from tcmu_overlaybd.errors import KernelError
    from tcmu_overlaybd.mount import mounter
    from tcmu_overlaybd.mount.state import StateDir

    monkeypatch.setenv("OBD_STATE_DIR", str(tmp_path / "run"))
    layout = hello_layout(vectors, tmp_path)
    st = hello_state(f"oci:{layout}:amd64-converted", tmp_path)
    sd = StateDir(str(tmp_path / "run"))
    sd.save(st)
    seen = []

    def on_size(size, digest):
        seen.append((size, digest))
        raise KernelError("cannot create the backstore")

    with pytest.raises(KernelError, match="cannot create the backstore"):
        mounter._spawn_supervisor(sd, st, recover=False, on_size=on_size)
    index = json.loads((layout / "index.json").read_text())
    [want] = [d["digest"] for d in index["manifests"]
              if d.get("annotations", {}).get("org.opencontainers.image.ref.name") == "amd64-converted"]
    from tcmu_overlaybd.mount.supervisor import open_source

    disk = open_source(st)
    disk.close()
    assert seen == [(disk.size, want)]
    pids = sd.read_pids(st.id)
    assert pids["handler_pid"] == 0 and not os.path.exists(f"/proc/{pids['supervisor_pid']}")


@no_tcmu
def test_after_the_handshake_a_missing_device_is_the_handlers_one_line_error(vectors, tmp_path, monkeypatch):
    from tcmu_overlaybd.errors import ObdError
    from tcmu_overlaybd.mount import mounter
    from tcmu_overlaybd.mount.state import StateDir

    monkeypatch.setenv("OBD_STATE_DIR", str(tmp_path / "run"))
    st = hello_state(f"oci:{hello_layout(vectors, tmp_path)}:amd64-converted", tmp_path)
    sd = StateDir(str(tmp_path / "run"))
    sd.save(st)
    with pytest.raises(ObdError) as e:
        mounter._spawn_supervisor(sd, st, recover=False, on_size=lambda size, digest: None)
    assert str(e.value) == "/sys/class/uio does not exist: no UIO support in this kernel"
    assert e.value.exit_code == 8
