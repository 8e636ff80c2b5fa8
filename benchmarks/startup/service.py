"""Starting an image's app from a root directory and waiting until it answers HTTP.

No container engine: ``unshare --mount --pid --fork --kill-child`` gives the app
private mount and PID namespaces; inside, ``/proc`` and the host's ``/dev`` are
mounted into the root (gone with the namespace) and ``chroot`` runs the image
config's ``Cmd`` with exactly its ``Env`` in its ``WorkingDir``.  The app shares
the caller's network namespace, so it listens on the caller's loopback.
"""

from __future__ import annotations

import http.client
import os
import shlex
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass

from tcmu_overlaybd.errors import ObdError

#: the poll interval is this share of the time waited so far, within the bounds below: the answer
#: is seen at most ~1 % late, and the poller (a fresh connection each time, which under TCG costs
#: milliseconds of the one emulated CPU) takes ~1 % of the CPU from the app it is waiting for,
#: not the ~17 % a fixed 20 ms interval took during a 270 s lazy start in the VM harness
POLL_SHARE = 0.01
POLL_MIN, POLL_MAX = 0.01, 0.5


def poll_interval(waited: float) -> float:
    return min(POLL_MAX, max(POLL_MIN, waited * POLL_SHARE))


@dataclass
class AppConfig:
    """What ``config`` of an OCI image config says about starting the app."""

    cmd: list[str]
    env: list[str]
    working_dir: str = "/"

    @classmethod
    def from_image_config(cls, doc: dict) -> "AppConfig":
        cfg = doc.get("config") or {}
        cmd = list(cfg.get("Entrypoint") or []) + list(cfg.get("Cmd") or [])
        if not cmd:
            raise ObdError("image config has neither Entrypoint nor Cmd: nothing to start")
        return cls(cmd, list(cfg.get("Env") or []), cfg.get("WorkingDir") or "/")

    def with_port(self, port: int) -> "AppConfig":
        env = [e for e in self.env if not e.startswith("PORT=")] + [f"PORT={port}"]
        return AppConfig(self.cmd, env, self.working_dir)


class RunningApp:
    """The app's process tree; ``stop()`` ends it (the PID namespace takes every child along)."""

    def __init__(self, root: str, app: AppConfig):
        self.root = root
        self.stderr = tempfile.TemporaryFile()
        r = shlex.quote(root)
        inner = shlex.join(["/usr/bin/env", "-i", *app.env, "/bin/sh", "-c", 'cd "$0" && exec "$@"',
                            app.working_dir, *app.cmd])
        outer = f"mount -t proc proc {r}/proc && mount --rbind /dev {r}/dev && exec chroot {r} {inner}"
        self.proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", outer],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.stderr,
                                     start_new_session=True)

    def error_tail(self, lines: int = 5) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "no output"

    def stop(self, timeout: float = 10.0) -> None:
        """Kill the whole process group and wait until none of it is left."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                os.killpg(self.proc.pid, 0)
                time.sleep(0.02)
        except ProcessLookupError:
            pass
        self.stderr.close()


def wait_http(app: RunningApp, port: int, timeout: float, expect: bytes = b"ok", since: float | None = None) -> float:
    """Poll ``GET http://127.0.0.1:<port>/`` until it answers 200 with ``expect``; returns the time of it.

    ``since`` is when the measured start began (the poll interval grows with the time since then)."""
    start = time.monotonic() if since is None else since
    deadline = time.monotonic() + timeout
    while True:
        now = time.monotonic()
        if app.proc.poll() is not None:
            raise ObdError(f"app in {app.root} exited with {app.proc.returncode} before answering: "
                           f"{app.error_tail()}")
        if now > deadline:
            raise ObdError(f"app in {app.root} did not answer on port {port} within {timeout:.0f} s: "
                           f"{app.error_tail()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        try:
            conn.request("GET", "/")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status == 200 and body.strip() == expect:
                return time.monotonic()
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(poll_interval(time.monotonic() - start))
