"""Failover across the endpoints of one registry: its mirrors in hosts.toml order, then itself.

An ``EndpointPool`` holds one ``RegistryClient`` per ``hosts.Endpoint`` and runs each
read on the endpoints allowed to do it (capabilities: tags need ``pull`` and
``resolve``, digests only ``pull``), in order.  An endpoint that fails (down,
timing out, 5xx once its retries are spent, 401/403, 404, content that does not
match its digest) hands the read to the next one with one warning line naming
it (logged once another endpoint served the read); when every endpoint failed,
one error lists all of them, of the kind the registry itself gave.  Content is
verified against digests whatever endpoint served it.

An endpoint that failed at the network level is tried after the others for
``HOLDOFF`` seconds, so a dead mirror costs its timeout once, not once per read.
Range reads of a blob stay on the endpoint that last served that blob (no
ping-pong between mirrors per cache block) and move on only when it fails.  In a
handler (``io_timeout``), a range read that every endpoint failed at the network
level goes round them again, with a warning naming the blob and range each time,
until ``io.timeout`` has passed.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import CorruptDataError, NetworkError, ObdError, UsageError
from .hosts import PULL, HostConfig

log = logging.getLogger(__name__)

#: seconds an endpoint that failed at the network level is tried only after the healthy ones
HOLDOFF = 30.0


def failure_reason(err: ObdError, host: str) -> str:
    """What went wrong at one endpoint, without the ``registry HOST: WHAT:`` prefix."""
    if getattr(err, "cause", None):
        return err.cause
    if isinstance(err, CorruptDataError):
        return err.detail
    text = str(err)
    for prefix in (f"registry {host}: ", f"registry {host} "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


class EndpointPool:
    """The clients of a registry's endpoints (``clients[i]`` talks to ``config.endpoints[i]``)."""

    def __init__(self, config: HostConfig, clients: list, io_timeout: float | None = None,
                 backoff_base: float = 0.25, max_backoff: float = 8.0):
        if len(clients) != len(config.endpoints):
            raise ValueError("one client per endpoint")
        self.config = config
        self.clients = clients
        #: handlers: range reads go round the endpoints until this many seconds have passed
        self.io_timeout = io_timeout
        self.backoff_base = backoff_base
        self.max_backoff = max_backoff
        self._down_until = [0.0] * len(clients)
        #: blob digest -> index of the endpoint its range reads go to
        self._sticky: dict[str, int] = {}
        #: blob digest -> lock held by the first read of a blob while it finds an endpoint
        self._probes: dict[str, threading.Lock] = {}
        #: capabilities -> indexes of the endpoints that have them
        self._able: dict[frozenset, list[int]] = {}
        self._lock = threading.Lock()

    @property
    def host(self) -> str:
        """The registry's own host (its server endpoint): what blob names carry."""
        return self.clients[-1].host

    @property
    def bytes_received(self) -> int:
        return sum(c.bytes_received for c in self.clients)

    @property
    def requests_sent(self) -> int:
        return sum(c.requests_sent for c in self.clients)

    def order(self, caps, prefer: int | None = None) -> list[int]:
        """Indexes of the endpoints to try for ``caps``: ``prefer`` first, then healthy ones, then
        those in holdoff, each group in file order."""
        caps = frozenset(caps)
        able = self._able.get(caps)
        if able is None:
            able = self._able[caps] = [i for i, e in enumerate(self.config.endpoints) if e.can(caps)]
        if not able:
            where = self.config.source or "hosts.toml"
            raise UsageError(f"{where}: no endpoint of {self.config.registry} has the "
                             f"{' and '.join(sorted(caps))} capability")
        if len(able) == 1:
            return able
        now = time.monotonic()
        down = self._down_until
        out = [i for i in able if down[i] <= now] + [i for i in able if down[i] > now]
        if prefer is not None and prefer in out and down[prefer] <= now:
            out.remove(prefer)
            out.insert(0, prefer)
        return out

    def run(self, caps, what: str, fn, prefer: int | None = None):
        """``fn(client)`` on the first endpoint for ``caps`` that succeeds; returns (index, result).

        Endpoints that failed before one succeeded get one warning line each (naming who served
        instead); when none succeeds, the error names them all and nothing else is logged.
        """
        order = self.order(caps, prefer)
        if len(order) == 1:  # nothing to fail over to: the endpoint's own error, unchanged
            return order[0], fn(self.clients[order[0]])
        failures: list[tuple[int, ObdError]] = []
        for i in order:
            client = self.clients[i]
            try:
                result = fn(client)
            except UsageError:
                raise
            except ObdError as e:
                failures.append((i, e))
                if isinstance(e, NetworkError):
                    with self._lock:
                        self._down_until[i] = time.monotonic() + HOLDOFF
                continue
            if self._down_until[i]:
                with self._lock:
                    self._down_until[i] = 0.0
            for j, e in failures:
                log.warning("%s: %s: %s; served by %s", self._name(j), what, failure_reason(e, self.clients[j].host),
                            self.config.endpoints[i].label)
            return i, result
        raise self._every_endpoint_failed(what, failures)

    def _name(self, i: int) -> str:
        e = self.config.endpoints[i]
        return f"{'mirror' if e.mirror else 'registry'} {e.label}"

    def _every_endpoint_failed(self, what: str, failures: list[tuple[int, ObdError]]) -> ObdError:
        """One error naming every endpoint and its cause, of the kind the registry itself gave
        (else the last endpoint tried)."""
        server = len(self.clients) - 1
        kind = next((e for i, e in failures if i == server), failures[-1][1])
        causes = "; ".join(f"{self._name(i)}: {failure_reason(e, self.clients[i].host)}" for i, e in failures)
        return type(kind)(f"{what}: every endpoint failed: {causes}")

    def get_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of a blob, from the endpoint that served it last if it still can.

        Until some endpoint has served the blob, its reads go one at a time (concurrent first
        reads of a cold blob would otherwise each probe the mirrors)."""
        prefer = self._sticky.get(digest)
        if prefer is None:
            with self._lock:
                probe = self._probes.setdefault(digest, threading.Lock())
            with probe:
                prefer = self._sticky.get(digest)
                if prefer is None:
                    return self._range(repo, digest, offset, length, None)
        return self._range(repo, digest, offset, length, prefer)

    def _range(self, repo: str, digest: str, offset: int, length: int, prefer: int | None) -> bytes:
        what = f"blob {digest} bytes {offset}-{offset + length - 1}"
        deadline = time.monotonic() + self.io_timeout if self.io_timeout is not None else None
        rounds = 0
        while True:
            try:
                i, data = self.run({PULL}, what, lambda c: c.get_range(repo, digest, offset, length), prefer=prefer)
                break
            except NetworkError as e:  # not 404 or 401: those do not get better by waiting
                left = deadline - time.monotonic() if deadline is not None else 0.0
                if left <= 0:
                    if deadline is not None:
                        raise NetworkError(f"{e} (gave up after {rounds + 1} rounds in {self.io_timeout:g} s, "
                                           "io.timeout)") from None
                    raise
                rounds += 1
                delay = min(self.max_backoff, self.backoff_base * 2 ** (rounds - 1), left)
                # a stalled device read: say so, with the blob and the range
                log.warning("%s; round %d in %.2f s, %.0f s left of io.timeout", e, rounds + 1, delay, left)
                time.sleep(delay)
        self._sticky[digest] = i
        return data

    def close(self) -> None:
        for c in self.clients:
            c.close()
