"""Secrets never reach a log line; every line carries the mount id."""

import json
import logging

from tcmu_overlaybd import logs


def _capture(tmp_path, **kw):
    path = tmp_path / "obd.log"
    logs.setup_logging("debug", str(path), **kw)
    return path


def test_registered_secret_and_credential_shapes_are_redacted(tmp_path):
    path = _capture(tmp_path, mount_id="m-1")
    logs.register_secret("s3cr3t-pass")
    log = logging.getLogger("obd.test")
    log.info("login with %s", "s3cr3t-pass")
    log.info("headers %s", {"Authorization": "Bearer eyJhbGciOi.abc.def"})
    log.info("GET https://bob:hunter22@reg.example/v2/ token=abcd1234 password: qwerty99")
    log.warning("slow read", extra=logs.log_fields(blob="sha256:aa", offset=4096, auth="Basic Ym9iOmh1bnRlcg=="))
    logging.getLogger().handlers[0].flush()
    text = path.read_text()
    for secret in ("s3cr3t-pass", "eyJhbGciOi", "hunter22", "abcd1234", "qwerty99", "Ym9iOmh1bnRlcg=="):
        assert secret not in text
    assert text.count("[mount=m-1]") == 4
    assert "blob=sha256:aa offset=4096" in text


def test_json_lines(tmp_path):
    path = _capture(tmp_path, mount_id="m-2", as_json=True)
    logging.getLogger("obd.x").error("read failed", extra=logs.log_fields(offset=512))
    logging.getLogger().handlers[0].flush()
    doc = json.loads(path.read_text().splitlines()[-1])
    assert doc["mount"] == "m-2" and doc["offset"] == "512" and doc["level"] == "error"


def teardown_module():
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()


def test_supervisor_logs_to_log_file_with_the_mount_id(tmp_path):
    """A supervisor (here: recovering a mount whose device does not exist on this host) writes
    its lines to ``log.file``, each tagged with the mount's id."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tcmu_overlaybd.mount.state import MountState, StateDir

    state = tmp_path / "state"
    state.mkdir()
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    st = MountState(id="5eed1d", mountpoint=str(tmp_path / "mnt"), image=str(disk), raw=True, options={},
                    size=4096, backstore="obd-5eed1d", wwn="naa.0", lower="", upper="", work="",
                    own_upper=False)
    StateDir(str(state)).save(st)
    log_file = tmp_path / "obd.log"
    env = {**os.environ, "OBD_CONFIG": "", "OBD_STATE_DIR": str(state), "OBD_LOG_FILE": str(log_file),
           "OBD_LOG_LEVEL": "warning"}
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "tcmu_overlaybd.mount.supervisor",
                             str(state / "5eed1d.json"), str(w), "--recover"],
                            pass_fds=(w,), env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(w)
    try:
        assert os.read(r, 512).decode().startswith("error ")  # the first start fails: no uio device here
        deadline = time.monotonic() + 30
        while "handler failed to start" not in (log_file.read_text() if log_file.exists() else ""):
            assert time.monotonic() < deadline, "no retry line in the log file"
            time.sleep(0.1)
    finally:
        os.close(r)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    line = next(ln for ln in log_file.read_text().splitlines() if "handler failed to start" in ln)
    assert "[mount=5eed1d]" in line and "uio" in line
    assert b"handler failed to start" not in err  # the file, not stderr, got it
