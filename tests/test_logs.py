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
