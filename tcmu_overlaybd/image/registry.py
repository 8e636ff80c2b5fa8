"""OCI distribution client and the registry BlobStore (issue 3).

``RegistryClient`` speaks HTTP to one registry endpoint (a registry, or a mirror
of one, see ``hosts.py``) over one ``requests.Session`` (connection reuse keeps
small Range GETs cheap): TLS options, split connect/read timeouts, the 401
challenge flow of ``auth.Authenticator``, and bounded retries with exponential
backoff on connection errors, timeouts, 5xx, 429 and truncated bodies.  Once
retries are spent it raises one ``NetworkError`` naming the registry, what was
being fetched and the cause.  401/403 become ``AuthError`` and 404 ``NotFoundError``.

``RegistryStore`` is the ``BlobStore`` of one repository: manifests by tag or
digest (OCI and Docker media types), small blobs verified against their digest,
and layer blobs opened lazily as byte sources that read through the shared
block cache with Range GETs.  Every read goes through the ``mirrors.EndpointPool``
of the registry's hosts.toml: mirrors first, then the registry.  ``referrers``
uses the OCI 1.1 referrers API and falls back to the ``sha256-<hex>`` tag schema
when the registry answers 404.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import replace
from urllib.parse import urlencode

import requests
import urllib3

from ..block.source import ByteSource, clamp_read
from ..cache.blockcache import DEFAULT_BLOCK_SIZE, CachedSource, shared_cache
from ..errors import AuthError, CorruptDataError, NetworkError, NotFoundError, ObdError, UsageError
from ..logs import register_secret
from ..progress import progress_bar
from .auth import Authenticator
from .hosts import (CONTAINERD_HOSTS_DIR, DOCKER_CERTS_DIR, PULL, PUSH, RESOLVE, Endpoint, api_host_of, host_config,
                    namespace_of)
from .mirrors import EndpointPool
from .options import OpenOptions
from .reference import Reference
from .store import BlobStore, Descriptor, verify_digest

log = logging.getLogger(__name__)

MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_ACCEPT = ", ".join((MT_OCI_MANIFEST, MT_OCI_INDEX, MT_DOCKER_MANIFEST, MT_DOCKER_LIST))
#: manifests larger than this are refused (the distribution spec suggests 4 MiB)
MAX_MANIFEST_SIZE = 4 << 20
USER_AGENT = "obd/0.1 (tcmu-overlaybd)"
#: downloads smaller than this get no progress bar (it would only flash)
PROGRESS_MIN_BYTES = 1 << 20
#: answers to GET /referrers/ (besides 404) from registries without the API: use the tag schema
NO_REFERRERS_API = (400, 405, 406, 501)
#: retryable HTTP statuses
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: first backoff pause, doubled on every retry and capped at MAX_BACKOFF
BACKOFF_BASE = 0.25
MAX_BACKOFF = 8.0
#: retries on a mirror before the next endpoint is tried (the next endpoint is the better retry)
MIRROR_RETRIES = 1
#: hosts.toml header names whose values are credentials (kept out of logs)
_SECRET_HEADER = re.compile(r"(?i)auth|token|secret|key|cookie|pass")


class _Retry(Exception):
    """A failure worth another attempt; ``cause`` is what the user reads if none is left."""

    def __init__(self, cause: str, retry_after: float | None = None):
        super().__init__(cause)
        self.cause = cause
        self.retry_after = retry_after


def repo_scope(repo: str, actions: str = "pull") -> str:
    return f"repository:{repo}:{actions}"


def hosts_dirs(opts: OpenOptions) -> tuple[str, ...]:
    """Where hosts.toml / certs.d directories are looked up: ``registry.hostsDir``, then docker's."""
    return tuple(dict.fromkeys((opts.hosts_dir or CONTAINERD_HOSTS_DIR, DOCKER_CERTS_DIR)))


def _read_pem(paths, what: str) -> str:
    out = []
    for p in paths:
        try:
            with open(p, encoding="ascii", errors="replace") as f:
                out.append(f.read())
        except OSError as e:
            raise UsageError(f"{p}: cannot read {what}: {e.strerror}") from None
    return "\n".join(out)


class _TrustAdapter(requests.adapters.HTTPAdapter):
    """An HTTPAdapter whose TLS connections also trust ``ca_data`` (PEM), like containerd's
    ``ca`` files that are added to the system roots."""

    def __init__(self, ca_data: str | None = None, **kw):
        self._ca_data = ca_data
        super().__init__(**kw)

    def init_poolmanager(self, *args, **kw):
        if self._ca_data:
            kw["ca_cert_data"] = self._ca_data
        super().init_poolmanager(*args, **kw)


class RegistryClient:
    """HTTP access to one registry endpoint (auth, TLS, timeouts, retries).

    ``endpoint`` (a ``hosts.Endpoint``) says where and how: URL and API root, TLS
    files, extra headers, connect timeout.  Without one, the client talks to the
    endpoint of ``host`` that receives pushes: the first in its hosts.toml with the
    ``push`` capability, normally the registry itself (``certs_dirs`` overrides
    where hosts.toml / certs.d directories are looked up; ``()`` = none).
    TLS trust: the system store plus ``--tlscacert`` and the endpoint's ``ca`` files;
    ``-k`` or the endpoint's ``skip_verify`` turn verification off; the client
    certificate comes from ``--tlscert/--tlskey``, else the endpoint's first ``client``.
    An endpoint's ``proxy`` carries all its requests (token requests too).
    Credentials: ``-u`` applies to the registry's own server, a mirror gets those the
    authfile has for the mirror's host.  ``ns`` (for hosts other than the registry's own) is
    sent as the ``ns`` query parameter naming the registry the request is for, as containerd does.
    Retries: ``opts.retries`` more attempts, pausing ``opts.extra["backoff_base"]``
    (default ``BACKOFF_BASE``) seconds, doubled each time, capped at ``MAX_BACKOFF``.
    """

    def __init__(self, host: str, opts: OpenOptions, certs_dirs=None, *, endpoint: Endpoint | None = None,
                 ns: str | None = None):
        if endpoint is None:
            endpoint = push_endpoint(host, opts, certs_dirs)
        self.endpoint = endpoint
        self.host = endpoint.host
        self.base_url = f"{endpoint.scheme}://{endpoint.host}"
        self.ns = ns
        self.timeout = (endpoint.dial_timeout or opts.connect_timeout, opts.read_timeout)
        #: handlers bound blob reads by time (io.timeout), not by the retry count
        self.io_timeout = opts.io_timeout if opts.device_reads else None
        self.retries = max(0, int(opts.retries))
        self.backoff_base = float(opts.extra.get("backoff_base", BACKOFF_BASE))
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.headers.update(dict(endpoint.headers))
        for name, value in endpoint.headers:
            if _SECRET_HEADER.search(name):  # e.g. a mirror's static Authorization header
                register_secret(value)
                register_secret(value.partition(" ")[2])  # the credential of "<scheme> <credential>"
        extra_ca = ([opts.tls_ca_cert] if opts.tls_ca_cert else []) + list(endpoint.ca)
        adapter = _TrustAdapter(_read_pem(extra_ca, "CA certificates") if extra_ca else None,
                                pool_connections=4, pool_maxsize=64, max_retries=0)
        self.session.mount("https://", adapter)
        self.session.mount("http://", adapter)
        # passed on every request: requests lets $REQUESTS_CA_BUNDLE override a session's verify
        self.tls: dict = {"verify": True}
        if opts.skip_verify or endpoint.skip_verify:
            self.tls["verify"] = False
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        if opts.client_cert:
            self.tls["cert"] = (opts.client_cert, opts.client_key) if opts.client_key else opts.client_cert
        elif opts.client_key:
            raise UsageError("--tlskey needs --tlscert")
        elif endpoint.client:
            cert, key = endpoint.client[0]
            self.tls["cert"] = (cert, key) if key else cert
        #: per request, so the endpoint's proxy wins over the environment's (containerd's rule)
        self.proxies = {"http": endpoint.proxy, "https": endpoint.proxy} if endpoint.proxy else None
        if endpoint.mirror:
            self.auth = Authenticator(endpoint.host, None, None, opts.authfile)
        else:
            self.auth = Authenticator(endpoint.host, opts.username, opts.password, opts.authfile)
        self._lock = threading.Lock()
        self.bytes_received = 0
        self.requests_sent = 0

    def url(self, path: str) -> str:
        """The URL of an API path (``/v2/...``, mapped onto the endpoint's API root) or of an absolute URL."""
        if path.startswith(("http://", "https://")):
            return path
        url = self.endpoint.api_url(path[3:]) if path.startswith("/v2/") else self.base_url + path
        if self.ns:
            url += ("&" if "?" in url else "?") + urlencode({"ns": self.ns})
        return url

    # ---- the one request loop --------------------------------------------------------
    def call(self, method: str, path: str, *, what: str, scope: str, headers: dict | None = None,
             data=None, ok: tuple[int, ...] = (200,), read=None, not_found_ok: bool = False,
             deadline: float | None = None):
        """Send a request until it succeeds, retrying what is retryable.

        ``read(response)`` consumes the body inside the retry loop (so a truncated
        body is retried) and its result is returned; without it the response is
        returned with its body read.  ``data`` may be bytes or a zero-argument
        callable returning a fresh body per attempt.  ``not_found_ok`` returns None
        on 404 instead of raising.  With a ``deadline`` (``time.monotonic()`` value)
        retryable failures are retried until it passes, however many attempts that takes.
        """
        url = self.url(path)
        attempts = self.retries + 1
        auth_rounds = 0
        attempt = 0
        last = ""
        while attempt < attempts or (deadline is not None and time.monotonic() < deadline):
            hdrs = dict(headers or {})
            sent_auth = self.auth.header(scope)
            if sent_auth:
                hdrs["Authorization"] = sent_auth
            body = data() if callable(data) else data
            try:
                timeout = self.timeout
                if deadline is not None:  # one request may not outlive the whole budget
                    left = max(0.5, deadline - time.monotonic())
                    timeout = (min(timeout[0], left), min(timeout[1], left))
                resp = self.session.request(method, url, headers=hdrs, data=body, timeout=timeout,
                                            stream=True, allow_redirects=True, proxies=self.proxies, **self.tls)
            except requests.exceptions.SSLError as e:
                raise _fail(NetworkError, self.host, what, f"TLS error: {_short(e)} "
                            "(see --tlscacert, --tlscert/--tlskey, -k, --plain-http)") from None
            except (requests.TooManyRedirects, requests.exceptions.InvalidURL) as e:
                raise _fail(NetworkError, self.host, what, f"{type(e).__name__}: {_short(e)}") from None
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {_short(e)}"
                attempt += 1
                self._pause(attempt, attempts, None, what, last, deadline)
                continue
            with self._lock:
                self.requests_sent += 1
            try:
                status = resp.status_code
                if status == 401 and auth_rounds < 2:
                    auth_rounds += 1
                    challenge = resp.headers.get("WWW-Authenticate")
                    resp.content  # noqa: B018 - drain, so the connection is reused for the retry
                    self.auth.challenge(challenge, scope, sent_auth, self._token_get)
                    continue
                if status in (401, 403):
                    who = self.auth.credentials
                    user = f"user {who.username!r}" if who else "anonymous access"
                    raise _fail(AuthError, self.host, what, f"access denied for {user} (HTTP {status})")
                if status == 404:
                    if not_found_ok:
                        resp.content  # noqa: B018 - drain, so the connection goes back to the pool
                        return None
                    raise _fail(NotFoundError, self.host, what, "not found")
                if status in RETRY_STATUSES:
                    raise _Retry(f"HTTP {status} {resp.reason}", _retry_after(resp))
                if status not in ok:
                    raise _fail(ObdError, self.host, what,
                                f"unexpected HTTP {status} {resp.reason}{_error_detail(resp)}")
                self.auth.mark_used(scope)
                if read is not None:
                    return read(resp)
                resp.content  # noqa: B018 - read the body inside the retry loop
                return resp
            except _Retry as r:
                last = r.cause
                attempt += 1
                self._pause(attempt, attempts, r.retry_after, what, last, deadline)
            except (requests.RequestException, urllib3.exceptions.HTTPError, ConnectionError) as e:
                last = f"connection lost while reading the body ({type(e).__name__})"
                attempt += 1
                self._pause(attempt, attempts, None, what, last, deadline)
            finally:
                resp.close()
        if deadline is not None:
            raise _fail(NetworkError, self.host, what, f"{last} (gave up after {attempt} attempts "
                        f"in {self.io_timeout:g} s, io.timeout)")
        raise _fail(NetworkError, self.host, what, f"{last} (gave up after {attempts} attempts)")

    def _token_get(self, url: str, params: dict, headers: dict):
        """GET on a token server with this registry's TLS settings and timeouts."""
        return self.session.get(url, params=params, headers=headers, timeout=self.timeout, proxies=self.proxies,
                                **self.tls)

    def _pause(self, attempt: int, attempts: int, retry_after: float | None, what: str, cause: str,
               deadline: float | None = None) -> None:
        """Exponential backoff (or the server's Retry-After) before attempt ``attempt + 1``.

        With a ``deadline`` the attempts are bounded by time, and the pause by what is left.
        """
        if deadline is None and attempt >= attempts:
            return
        delay = min(MAX_BACKOFF, self.backoff_base * (2 ** (attempt - 1)))
        if retry_after is not None:
            delay = min(MAX_BACKOFF, max(delay, retry_after))
        if deadline is not None:
            delay = max(0.0, min(delay, deadline - time.monotonic()))
        if deadline is not None:  # a device read is stalled: say so, with the blob and offset
            log.warning("registry %s: %s: %s; retry %d in %.2f s, %.0f s left of io.timeout", self.host, what,
                        cause, attempt, delay, deadline - time.monotonic())
        else:
            log.info("registry %s: %s: %s; retry %d of %d in %.2f s", self.host, what, cause, attempt,
                     attempts - 1, delay)
        time.sleep(delay)

    def count_bytes(self, n: int) -> None:
        with self._lock:
            self.bytes_received += n

    # ---- blobs ------------------------------------------------------------------
    def get_range(self, repo: str, digest: str, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes of a blob from ``offset`` (one Range GET, retried)."""
        what = f"blob {digest} bytes {offset}-{offset + length - 1}"

        def read(resp):
            if resp.status_code == 206:
                m = re.match(r"bytes (\d+)-(\d+)/", resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != offset:
                    raise _fail(ObdError, self.host, what,
                                f"answered Content-Range {resp.headers.get('Content-Range')!r}")
                data = resp.raw.read(length, decode_content=False)
            else:  # 200: the server ignored Range; skip to the offset
                data = _read_window(resp, offset, length)
            self.count_bytes(len(data))
            if len(data) != length:
                raise _Retry(f"truncated response ({len(data)} of {length} bytes)")
            return data

        deadline = time.monotonic() + self.io_timeout if self.io_timeout is not None else None
        return self.call("GET", f"/v2/{repo}/blobs/{digest}", what=what, scope=repo_scope(repo),
                         headers={"Range": f"bytes={offset}-{offset + length - 1}"}, ok=(200, 206), read=read,
                         deadline=deadline)

    def blob_size(self, repo: str, digest: str) -> int:
        resp = self.call("HEAD", f"/v2/{repo}/blobs/{digest}", what=f"blob {digest}", scope=repo_scope(repo))
        try:
            return int(resp.headers["Content-Length"])
        except (KeyError, ValueError):
            raise _fail(ObdError, self.host, f"blob {digest}", "HEAD without Content-Length") from None

    def get_blob(self, repo: str, digest: str, size: int | None = None, quiet: bool = True) -> bytes:
        """A whole blob in memory, verified against its digest before it is returned."""
        buf = bytearray()

        def sink():
            buf.clear()
            return buf.extend

        self._stream_blob(repo, digest, size, quiet, sink)
        return bytes(buf)

    def download_blob(self, repo: str, digest: str, dest: str | os.PathLike, size: int | None = None,
                      quiet: bool = True) -> int:
        """Stream a blob to ``dest`` (via a temp file renamed only once the digest matched)."""
        dest = os.fspath(dest)
        tmp = f"{dest}.part-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                def sink():
                    f.seek(0)
                    f.truncate()
                    return f.write

                got = self._stream_blob(repo, digest, size, quiet, sink)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return got

    def _stream_blob(self, repo: str, digest: str, size: int | None, quiet: bool, sink) -> int:
        """GET a whole blob into ``sink()`` (called once per attempt, returns a write function),
        hashing as it arrives; raise CorruptDataError unless it matches ``digest``."""
        algo, _, expected = digest.partition(":")
        if algo not in hashlib.algorithms_available:
            raise CorruptDataError(f"unsupported digest algorithm {algo!r}", blob=digest)

        def read(resp):
            total = size if size is not None else _content_length(resp)
            hasher, got, write = hashlib.new(algo), 0, sink()
            small = total is not None and total < PROGRESS_MIN_BYTES
            with progress_bar(total, digest[7:19], quiet or small) as bar:
                for chunk in resp.iter_content(1 << 20):
                    hasher.update(chunk)
                    write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
            self.count_bytes(got)
            if total is not None and got != total:
                raise _Retry(f"truncated response ({got} of {total} bytes)")
            return got, hasher.hexdigest()

        got, actual = self.call("GET", f"/v2/{repo}/blobs/{digest}", what=f"blob {digest}",
                                scope=repo_scope(repo), read=read)
        if actual != expected:
            raise CorruptDataError(f"content does not match digest {digest} (got {algo}:{actual})",
                                   blob=f"{self.host}/{repo}@{digest}")
        return got

    # ---- manifests ------------------------------------------------------------------
    def head_manifest(self, repo: str, reference: str) -> Descriptor | None:
        """Descriptor of a manifest by tag or digest; None if the registry has none.

        Registries that refuse HEAD (405) or omit the digest header get a GET instead.
        """
        resp = self.call("HEAD", f"/v2/{repo}/manifests/{reference}", what=f"manifest {repo}:{reference}",
                         scope=repo_scope(repo), headers={"Accept": MANIFEST_ACCEPT}, not_found_ok=True,
                         ok=(200, 405))
        if resp is None:
            return None
        digest = resp.headers.get("Docker-Content-Digest")
        mt = resp.headers.get("Content-Type", "").split(";")[0].strip()
        length = _content_length(resp)
        if resp.status_code == 405 or not digest or length is None:
            data, mt = self.get_manifest(repo, reference)
            return Descriptor(mt, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
        return Descriptor(mt, digest, length)

    def get_manifest(self, repo: str, reference: str, digest: str | None = None) -> tuple[bytes, str]:
        """Manifest bytes and media type; verified when a digest is known."""
        what = f"manifest {repo}@{reference}" if reference.startswith("sha256:") else f"manifest {repo}:{reference}"

        def read(resp):
            declared = _content_length(resp)
            if declared is not None and declared > MAX_MANIFEST_SIZE:
                raise CorruptDataError(f"manifest of {declared} bytes exceeds {MAX_MANIFEST_SIZE}", blob=what)
            data = resp.raw.read(MAX_MANIFEST_SIZE + 1, decode_content=True)
            if len(data) > MAX_MANIFEST_SIZE:
                raise CorruptDataError(f"manifest exceeds {MAX_MANIFEST_SIZE} bytes", blob=what)
            if declared is not None and len(data) != declared:
                raise _Retry(f"truncated response ({len(data)} of {declared} bytes)")
            self.count_bytes(len(data))
            return data, resp.headers.get("Content-Type", "").split(";")[0].strip()

        data, mt = self.call("GET", f"/v2/{repo}/manifests/{reference}", what=what, scope=repo_scope(repo),
                             headers={"Accept": MANIFEST_ACCEPT}, read=read)
        want = digest or (reference if reference.startswith("sha256:") else None)
        if want:
            verify_digest(data, want, f"{self.host}/{repo}@{want}")
        return data, mt

    def close(self) -> None:
        self.session.close()


def _fail(cls, host: str, what: str, cause: str) -> ObdError:
    """``cls("registry HOST: WHAT: CAUSE")`` that also keeps ``cause`` (the failover error lists causes)."""
    err = cls(f"registry {host}: {what}: {cause}")
    err.cause = cause
    return err


def _short(e: Exception) -> str:
    text = str(e)
    m = re.search(r"certificate verify failed: [^'\")(]*|alert [a-z ]+|wrong version number|"
                  r"\[Errno -?\d+\] [^'\")]*|Read timed out|timed out|Connection refused|"
                  r"Connection reset by peer|Remote end closed connection without response", text)
    return m.group(0).strip() if m else (text if len(text) <= 160 else text[:157] + "...")


def _content_length(resp) -> int | None:
    try:
        return int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _retry_after(resp) -> float | None:
    try:
        return float(resp.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _error_detail(resp) -> str:
    """The first message of an OCI error body, if any: ``: <code>: <message>``."""
    try:
        errs = resp.json().get("errors") or []
        e = errs[0]
        return f": {e.get('code')}: {e.get('message')}"
    except (ValueError, AttributeError, IndexError, TypeError, requests.RequestException):
        return ""


def _read_window(resp, offset: int, length: int) -> bytes:
    """Bytes ``[offset, offset+length)`` of a full-body response (a server that ignores Range)."""
    skipped = 0
    out = bytearray()
    for chunk in resp.iter_content(1 << 20):
        if skipped + len(chunk) <= offset:
            skipped += len(chunk)
            continue
        start = max(0, offset - skipped)
        out += chunk[start : start + length - len(out)]
        skipped += len(chunk)
        if len(out) >= length:
            break
    return bytes(out)


def _host_config(host: str, opts: OpenOptions, certs_dirs=None):
    dirs = hosts_dirs(opts) if certs_dirs is None else tuple(certs_dirs)
    return host_config(namespace_of(host), dirs, "http" if opts.plain_http else "https")


def push_endpoint(host: str, opts: OpenOptions, certs_dirs=None) -> Endpoint:
    """Where pushes to ``host`` go: the first endpoint of its hosts.toml with the push capability."""
    config = _host_config(host, opts, certs_dirs)
    for endpoint in config.endpoints:
        if endpoint.can({PUSH}):
            return endpoint
    raise UsageError(f"{config.source}: no endpoint of {config.registry} has the push capability")


def endpoint_pool(registry: str, opts: OpenOptions) -> EndpointPool:
    """Clients for every endpoint of ``registry`` (a reference's registry name), mirrors first.

    A mirror gets at most ``MIRROR_RETRIES`` retries (the next endpoint is its retry) and not
    the ``-u`` credentials (those are for the registry itself).  With several endpoints, a
    handler's ``io.timeout`` budget belongs to the pool, which goes round all of them until it
    is spent, instead of to one client that would wait it out alone.
    """
    config = _host_config(registry, opts)
    single = len(config.endpoints) == 1
    server_opts = opts if single else replace(opts, device_reads=False)
    mirror_opts = replace(opts, retries=min(opts.retries, MIRROR_RETRIES), device_reads=False,
                          username=None, password=None)
    own = api_host_of(config.registry)  # any other host is told which registry a request is for
    clients = [RegistryClient(e.host, mirror_opts if e.mirror else server_opts, endpoint=e,
                              ns=config.registry if e.host != own else None) for e in config.endpoints]
    io_timeout = opts.io_timeout if opts.device_reads and not single else None
    return EndpointPool(config, clients, io_timeout=io_timeout,
                        backoff_base=float(opts.extra.get("backoff_base", BACKOFF_BASE)), max_backoff=MAX_BACKOFF)


class RemoteBlob:
    """A registry blob as a ByteSource: every read is one Range GET (use through the cache).

    ``client`` is a ``RegistryClient`` (one endpoint) or an ``EndpointPool`` (failover).
    """

    def __init__(self, client: RegistryClient | EndpointPool, repo: str, digest: str, size: int):
        self.client = client
        self.repo = repo
        self.digest = digest
        self.size = size
        self.name = f"{client.host}/{repo}@{digest}"

    def read(self, offset: int, length: int) -> bytes:
        n = clamp_read(self.size, offset, length)
        if n == 0:
            return b""
        return self.client.get_range(self.repo, self.digest, offset, n)

    def close(self) -> None:
        pass


class RegistryStore(BlobStore):
    """The BlobStore of one registry repository, read through its mirrors (``endpoint_pool``).

    ``client`` is the client of the registry itself (its server endpoint).
    """

    def __init__(self, ref: Reference, opts: OpenOptions):
        if ref.transport != "docker":
            raise UsageError(f"{ref} is not a registry reference")
        self.ref = ref
        self.opts = opts
        self.repo = ref.repository
        self.pool = endpoint_pool(ref.registry, opts)
        self.client = self.pool.clients[-1]
        self.name = f"{ref.registry}/{ref.repository}"
        self._cache = None

    def resolve(self, ref: Reference) -> Descriptor:
        caps = {PULL} if ref.digest else {PULL, RESOLVE}  # a digest is checked, a tag must be trusted

        def head(client: RegistryClient) -> Descriptor:
            desc = client.head_manifest(ref.repository, ref.reference)
            if desc is None:
                err = NotFoundError(f"{ref}: manifest unknown to registry {client.host}")
                err.cause = "manifest unknown"
                raise err
            if ref.digest and desc.digest != ref.digest:
                raise CorruptDataError(f"registry answered digest {desc.digest}", blob=str(ref))
            return desc

        return self.pool.run(caps, f"manifest {ref}", head)[1]

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        return self.pool.run({PULL}, f"manifest {self.name}@{desc.digest}",
                             lambda c: c.get_manifest(self.repo, desc.digest, desc.digest)[0])[1]

    def fetch_blob(self, digest: str, size: int | None = None) -> bytes:
        return self.pool.run({PULL}, f"blob {self.name}@{digest}",
                             lambda c: c.get_blob(self.repo, digest, size, quiet=self.opts.quiet))[1]

    def download_blob(self, digest: str, size: int | None, dest: str | os.PathLike) -> int:
        """A large blob streamed to ``dest`` with a progress bar, verified before it appears."""
        return self.pool.run({PULL}, f"blob {self.name}@{digest}",
                             lambda c: c.download_blob(self.repo, digest, dest, size, quiet=self.opts.quiet))[1]

    @property
    def cache(self):
        """The process-wide block cache of ``opts.cache_dir`` (created on first use)."""
        if self._cache is None:
            block_size = self.opts.cache_block_size or DEFAULT_BLOCK_SIZE
            self._cache = shared_cache(self.opts.cache_dir, self.opts.cache_size, block_size)
        return self._cache

    def open_blob(self, digest: str, size: int) -> ByteSource:
        if size is None or size < 0:
            size = self.pool.run({PULL}, f"blob {self.name}@{digest}", lambda c: c.blob_size(self.repo, digest))[1]
        return CachedSource(RemoteBlob(self.pool, self.repo, digest, size), self.cache, key=digest)

    def referrers(self, digest: str, artifact_type: str | None = None) -> list[Descriptor]:
        def listing(client: RegistryClient) -> list[Descriptor]:
            found = self._referrers_api(client, digest, artifact_type)
            return self._referrers_tag(client, digest) if found is None else found

        # which manifests refer to a digest is mutable, like a tag: only endpoints trusted to resolve
        found = self.pool.run({PULL, RESOLVE}, f"referrers of {self.name}@{digest}", listing)[1]
        if artifact_type:
            found = [d for d in found if d.artifact_type == artifact_type]
        return found

    def _referrers_api(self, client: RegistryClient, digest: str, artifact_type: str | None) -> list[Descriptor] | None:
        """GET /v2/<repo>/referrers/<digest> (following Link pages); None on 404."""
        path = f"/v2/{self.repo}/referrers/{digest}"
        if artifact_type:
            path += "?" + urlencode({"artifactType": artifact_type})
        out: list[Descriptor] = []
        while path:
            resp = client.call("GET", path, what=f"referrers of {digest}", scope=repo_scope(self.repo),
                               headers={"Accept": MT_OCI_INDEX}, not_found_ok=True, ok=(200,) + NO_REFERRERS_API)
            if resp is None or resp.status_code in NO_REFERRERS_API:
                return None
            if not resp.headers.get("Content-Type", "").startswith(MT_OCI_INDEX):
                return None  # a registry that routes unknown paths somewhere else
            out.extend(_index_descriptors(resp.content, f"referrers of {digest}"))
            path = _next_link(resp.headers.get("Link"))
        return out

    def _referrers_tag(self, client: RegistryClient, digest: str) -> list[Descriptor]:
        """The referrers tag schema: an index tagged ``<algo>-<hex>``."""
        tag = digest.replace(":", "-")
        desc = client.head_manifest(self.repo, tag)
        if desc is None:
            return []
        data, _ = client.get_manifest(self.repo, desc.digest, desc.digest)
        return _index_descriptors(data, f"{self.name}:{tag}")

    def close(self) -> None:
        self.pool.close()


def _index_descriptors(data: bytes, what: str) -> list[Descriptor]:
    try:
        doc = json.loads(data)
        return [Descriptor.from_json(m) for m in doc.get("manifests") or []]
    except (ValueError, AttributeError, KeyError, TypeError):
        raise CorruptDataError("not an OCI image index", blob=what) from None


def _next_link(link: str | None) -> str | None:
    if not link:
        return None
    m = re.search(r'<([^>]+)>\s*;\s*rel="?next"?', link)
    return m.group(1) if m else None
