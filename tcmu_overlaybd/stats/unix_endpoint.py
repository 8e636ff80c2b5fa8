"""The stats socket of one handler: ``<state.dir>/<id>.stats.sock`` (0600, root).

Protocol: a client connects and reads to EOF; the server writes one JSON
document (UTF-8, newline-terminated) and closes.  Nothing is read from the
client, so a client cannot make the handler do more than build one document.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
from typing import Callable

from ..errors import StateError

log = logging.getLogger(__name__)

#: seconds a client may take to read the document before the server gives up on it
SEND_TIMEOUT_S = 5.0


class StatsSocketServer:
    """Serve ``document()`` on a unix stream socket from a daemon thread."""

    def __init__(self, path: str, document: Callable[[], dict]):
        self.path = path
        self.document = document
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind (replacing a stale socket of a previous handler) and start answering."""
        tmp = f"{self.path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            sock.bind(tmp)
            os.chmod(tmp, 0o600)  # the state dir is 0700 too: nobody else can race the chmod
            sock.listen(8)
            os.replace(tmp, self.path)
        except OSError as e:
            sock.close()
            raise StateError(f"{self.path}: cannot create the stats socket: {e.strerror or e}") from None
        self._sock = sock
        self._ino = os.stat(self.path).st_ino
        self._thread = threading.Thread(target=self._serve, name="obd-stats-socket", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        sock = self._sock
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed by stop()
                return
            with conn:
                try:
                    body = (json.dumps(self.document()) + "\n").encode()
                    conn.settimeout(SEND_TIMEOUT_S)
                    conn.sendall(body)
                except OSError as e:
                    log.debug("stats socket: client went away (%s)", e.strerror)
                except Exception:  # a bug in a counter reader must not kill the endpoint
                    log.exception("stats socket: building the document")

    def stop(self) -> None:
        """Stop answering and remove the socket file if it is still ours."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        try:
            sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        sock.close()
        if self._thread is not None:
            self._thread.join(timeout=SEND_TIMEOUT_S)
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


def query(path: str, timeout: float = 10.0) -> dict:
    """The document the handler at socket ``path`` serves; StateError when none answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    chunks = []
    try:
        sock.connect(path)
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except FileNotFoundError:
        raise StateError(f"{path}: no stats socket (the handler has not started it)") from None
    except socket.timeout:
        raise StateError(f"{path}: the handler did not answer within {timeout:g} s") from None
    except OSError as e:
        why = "nobody listens" if e.errno == errno.ECONNREFUSED else e.strerror
        raise StateError(f"{path}: cannot query the handler: {why}") from None
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        raise StateError(f"{path}: the handler answered something that is not JSON") from None
    if not isinstance(doc, dict):
        raise StateError(f"{path}: the handler answered something that is not a stats document")
    return doc
