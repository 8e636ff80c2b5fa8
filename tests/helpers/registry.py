"""A real registry for the tests: Debian's ``docker-registry`` on 127.0.0.1.

``RegistryServer`` runs ``/usr/bin/docker-registry serve`` with a temp storage
directory in one of four variants: plain HTTP, TLS with a self-signed CA made by
``openssl``, TLS + htpasswd basic auth (``htpasswd -Bbn``), and token auth backed
by ``TokenServer`` (a tiny token endpoint that signs RS256 JWTs with ``openssl``).
``Proxy`` sits in front of a registry: it counts the blob bytes the registry
served, injects faults (5xx, truncated or corrupted bodies, dropped
connections) and can answer the OCI 1.1 referrers API, which docker-registry
2.8 lacks.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

REGISTRY_BIN = "/usr/bin/docker-registry"

# the test registries live on loopback: never send them through a proxy from the environment
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))
TEST_SERVICE = "obd-test-registry"
TEST_ISSUER = "obd-test-token-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"registry exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _run(*cmd: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, capture_output=True, **kw)


@dataclass
class SelfSignedCA:
    """A self-signed CA and a server certificate for 127.0.0.1/localhost, plus a client cert."""

    dir: str
    ca_cert: str = ""
    server_cert: str = ""
    server_key: str = ""
    client_cert: str = ""
    client_key: str = ""

    def make(self) -> "SelfSignedCA":
        d = self.dir
        os.makedirs(d, exist_ok=True)
        self.ca_cert, ca_key = f"{d}/ca.crt", f"{d}/ca.key"
        _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out",
             self.ca_cert, "-days", "2", "-subj", "/CN=obd test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.server_cert, self.server_key = self._leaf("server", "127.0.0.1",
                                                       "subjectAltName=IP:127.0.0.1,DNS:localhost", ca_key)
        self.client_cert, self.client_key = self._leaf("client", "obd test client",
                                                       "extendedKeyUsage=clientAuth", ca_key)
        return self

    def _leaf(self, name: str, cn: str, ext: str, ca_key: str) -> tuple[str, str]:
        d = self.dir
        key, csr, crt, extfile = f"{d}/{name}.key", f"{d}/{name}.csr", f"{d}/{name}.crt", f"{d}/{name}.ext"
        _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        with open(extfile, "w") as f:
            f.write(ext + "\n")
        _run("openssl", "x509", "-req", "-in", csr, "-CA", self.ca_cert, "-CAkey", ca_key, "-CAcreateserial",
             "-out", crt, "-days", "2", "-extfile", extfile)
        return crt, key


class TokenServer:
    """Issues registry tokens (RS256 JWT with an x5c chain) to users it knows.

    ``users`` maps name -> password; anonymous requests get pull-only tokens when
    ``anonymous_pull``.  ``issued`` counts tokens handed out; ``expires_in`` is
    what it tells clients.
    """

    def __init__(self, dir: str, users: dict[str, str], anonymous_pull: bool = False, expires_in: int = 300,
                 readonly: frozenset[str] = frozenset()):
        self.dir = dir
        self.users = users
        self.readonly = readonly  # users granted only "pull"
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.issued = 0
        self.tokens: list[str] = []  # every token handed out (tests check none is logged)
        self.requests: list[dict] = []
        os.makedirs(dir, exist_ok=True)
        self.key, self.cert = f"{dir}/token.key", f"{dir}/token.crt"
        _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.cert,
             "-days", "2", "-subj", "/CN=obd test token signer")
        der = _run("openssl", "x509", "-in", self.cert, "-outform", "DER").stdout
        self._x5c = base64.b64encode(der).decode()
        self.port = free_port()
        self.realm = f"http://127.0.0.1:{self.port}/token"
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def _b64(self, data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def sign(self, claims: dict) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{self._b64(json.dumps(header).encode())}.{self._b64(json.dumps(claims).encode())}"
        sig = _run("openssl", "dgst", "-sha256", "-sign", self.key, input=signing_input.encode()).stdout
        return f"{signing_input}.{self._b64(sig)}"

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        q = urllib.parse.parse_qs(urllib.parse.urlparse(h.path).query)
        user = None
        auth = h.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            name, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            if self.users.get(name) != pw:
                h.send_response(401)
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
            user = name
        elif not self.anonymous_pull:
            h.send_response(401)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        access = []
        for scope in q.get("scope", []):
            for one in scope.split(" "):
                typ, _, rest = one.partition(":")
                name, _, actions = rest.rpartition(":")
                full = user is not None and user not in self.readonly
                allowed = actions.split(",") if full else [a for a in actions.split(",") if a == "pull"]
                access.append({"type": typ, "name": name, "actions": allowed})
        now = int(time.time())
        claims = {"iss": TEST_ISSUER, "sub": user or "", "aud": q.get("service", [""])[0], "exp": now + self.expires_in,
                  "nbf": now - 10, "iat": now, "jti": os.urandom(8).hex(), "access": access}
        token = self.sign(claims)
        self.issued += 1
        self.tokens.append(token)
        self.requests.append({"user": user, "scope": q.get("scope", [])})
        body = json.dumps({"token": token, "expires_in": self.expires_in}).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class RegistryServer:
    """One docker-registry process; ``host`` is ``127.0.0.1:<port>``."""

    def __init__(self, dir: str, ca: SelfSignedCA | None = None, htpasswd_users: dict[str, str] | None = None,
                 token: TokenServer | None = None, client_certs: bool = False):
        self.dir = dir
        self.ca = ca
        self.token = token
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = os.path.join(dir, "storage")
        os.makedirs(self.storage, exist_ok=True)
        lines = [
            "version: 0.1",
            "log:", "  level: error", "  accesslog:", "    disabled: true",
            "storage:", "  filesystem:", f"    rootdirectory: {self.storage}",
            "  delete:", "    enabled: true",
            "http:", f"  addr: 127.0.0.1:{self.port}", "  secret: obd-test-secret",
        ]
        if ca:
            lines += ["  tls:", f"    certificate: {ca.server_cert}", f"    key: {ca.server_key}"]
            if client_certs:
                lines += ["    clientcas:", f"      - {ca.ca_cert}"]
        if htpasswd_users:
            htfile = os.path.join(dir, "htpasswd")
            with open(htfile, "w") as f:
                for user, pw in htpasswd_users.items():
                    f.write(_run("htpasswd", "-Bbn", user, pw).stdout.decode().strip() + "\n")
            lines += ["auth:", "  htpasswd:", "    realm: obd-test", f"    path: {htfile}"]
        if token:
            lines += ["auth:", "  token:", f"    realm: {token.realm}", f"    service: {TEST_SERVICE}",
                      f"    issuer: {TEST_ISSUER}", f"    rootcertbundle: {token.cert}"]
        self.config = os.path.join(dir, "config.yml")
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        with open(os.path.join(self.dir, "registry.log"), "ab") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", self.config], stdout=subprocess.DEVNULL,
                                         stderr=log)
        _wait_port(self.port, self.proc)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class _QuietServer(ThreadingHTTPServer):
    """Counts accepted connections; clients that give up (timeouts, faults) are expected,
    so no tracebacks on stderr."""

    connections = 0

    def process_request(self, request, client_address):
        self.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request, client_address):
        pass


@dataclass
class Fault:
    """Do ``action`` to the next ``times`` requests whose method and path match.

    ``action``: ``"status:<code>"``, ``"truncate:<n>"`` (send n body bytes then close),
    ``"corrupt"`` (flip a byte of the body), ``"drop"`` (close without answering),
    ``"delay:<seconds>"``, ``"strip-auth"`` (forward without the Authorization header, so
    the registry answers with its own 401 challenge, as it does when a token is revoked),
    ``"strip-range"`` (forward without Range: a server that answers 200 with the whole blob).
    """

    action: str
    path_contains: str = ""
    method: str | None = None
    times: int = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.times > self.hits and self.path_contains in path
                and (self.method is None or self.method == method))


@dataclass
class ProxyLog:
    blob_bytes: int = 0  # body bytes of GET .../blobs/... responses
    requests: list = field(default_factory=list)  # (method, path, range, status)


class Proxy:
    """An HTTP proxy in front of a registry: counts, breaks and extends it."""

    def __init__(self, upstream_host: str, upstream_tls_ca: str | None = None):
        self.upstream_host = upstream_host
        self.upstream_ctx = ssl.create_default_context(cafile=upstream_tls_ca) if upstream_tls_ca else None
        self.faults: list[Fault] = []
        self.log = ProxyLog()
        #: digest -> list of descriptor dicts: answered on /v2/<repo>/referrers/<digest>
        self.referrers: dict[str, list[dict]] | None = None
        #: answer blob GETs with a 307 to ``http://localhost:<port>/storage/...`` (another host name),
        #: as registries backed by object storage do
        self.redirect_blobs = False
        self._lock = threading.Lock()
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def handle_one(self):
                proxy._serve(self)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = handle_one

        self.httpd = _QuietServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_fault(self, action: str, path_contains: str = "", method: str | None = None, times: int = 1) -> Fault:
        f = Fault(action, path_contains, method, times)
        with self._lock:
            self.faults.append(f)
        return f

    def reset_counters(self) -> None:
        with self._lock:
            self.log = ProxyLog()

    def _fault_for(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(method, path):
                    f.hits += 1
                    return f
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        method, path = h.command, h.path
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else None
        fault = self._fault_for(method, path)
        if fault and fault.action == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault and fault.action.startswith("status:"):
            code = int(fault.action.split(":")[1])
            msg = json.dumps({"errors": [{"code": "INJECTED", "message": "injected failure"}]}).encode()
            self._record(method, path, h, code)
            self._reply(h, code, {"Content-Type": "application/json"}, msg, method)
            return
        if fault and fault.action.startswith("delay:"):
            time.sleep(float(fault.action.split(":")[1]))
        if self.referrers is not None and "/referrers/" in path and method == "GET":
            digest = urllib.parse.urlparse(path).path.rsplit("/", 1)[1]
            doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": self.referrers.get(digest, [])}
            self._record(method, path, h, 200)
            self._reply(h, 200, {"Content-Type": "application/vnd.oci.image.index.v1+json"},
                        json.dumps(doc).encode(), method)
            return
        if self.redirect_blobs and method == "GET" and path.startswith("/v2/") and "/blobs/sha256:" in path:
            self._record(method, path, h, 307)
            self._reply(h, 307, {"Location": f"http://localhost:{self.port}/storage{path}"}, b"", method)
            return
        if path.startswith("/storage/"):
            path = path[len("/storage"):]
        dropped = ("connection", "keep-alive")
        stripped = {"strip-auth": "authorization", "strip-range": "range"}
        if fault and fault.action in stripped:
            dropped += (stripped[fault.action],)
        headers = {k: v for k, v in h.headers.items() if k.lower() not in dropped}
        conn = (http.client.HTTPSConnection(self.upstream_host, context=self.upstream_ctx, timeout=30)
                if self.upstream_ctx else http.client.HTTPConnection(self.upstream_host, timeout=30))
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError:
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        finally:
            conn.close()
        out_headers = {k: v for k, v in resp.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length", "keep-alive")}
        if method == "HEAD":
            out_headers["Content-Length"] = resp.getheader("Content-Length") or "0"
        if fault and fault.action == "corrupt" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if fault and fault.action.startswith("truncate:"):
            keep = int(fault.action.split(":")[1])
            self._count(method, path, keep)
            self._record(method, path, h, resp.status)
            h.send_response(resp.status)
            for k, v in out_headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[:keep])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return
        # counted before the reply leaves, so a client that saw the bytes sees the count
        self._count(method, path, len(data))
        self._record(method, path, h, resp.status)
        self._reply(h, resp.status, out_headers, data, method)

    def _reply(self, h, code: int, headers: dict, data: bytes, method: str) -> None:
        h.send_response(code)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if method != "HEAD":
            h.wfile.write(data)

    def _count(self, method: str, path: str, n: int) -> None:
        if "/blobs/" in path and method == "GET":
            with self._lock:
                self.log.blob_bytes += n

    def _record(self, method: str, path: str, h, status: int) -> None:
        with self._lock:
            self.log.requests.append((method, h.path, h.headers.get("Range"), status))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def registry_available() -> bool:
    return os.access(REGISTRY_BIN, os.X_OK) and shutil.which("openssl") is not None


needs_registry = pytest.mark.skipif(not registry_available(), reason="needs Debian's docker-registry")


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
def plain_registry(tmp_path):
    """docker-registry over plain HTTP."""
    reg = RegistryServer(str(tmp_path / "registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory):
    return SelfSignedCA(str(tmp_path_factory.mktemp("ca"))).make()


@pytest.fixture
def tls_registry(tmp_path, test_ca):
    """docker-registry over TLS with a certificate from ``test_ca``."""
    reg = RegistryServer(str(tmp_path / "registry"), ca=test_ca)
    yield reg
    reg.stop()


BASIC_USERS = {"alice": "wonderland-42"}


@pytest.fixture
def basic_registry(tmp_path, test_ca):
    """docker-registry over TLS with htpasswd basic auth (user alice)."""
    reg = RegistryServer(str(tmp_path / "registry"), ca=test_ca, htpasswd_users=BASIC_USERS)
    yield reg
    reg.stop()


@pytest.fixture
def token_registry(tmp_path):
    """docker-registry (plain HTTP) with token auth; yields (registry, token_server)."""
    tok = TokenServer(str(tmp_path / "token"), users=dict(BASIC_USERS, reader="read-only-pw"),
                      readonly=frozenset({"reader"}))
    reg = RegistryServer(str(tmp_path / "registry"), token=tok)
    yield reg, tok
    reg.stop()
    tok.stop()


@pytest.fixture
def proxied_registry(plain_registry):
    """(registry, proxy): a plain registry reached through a counting, fault-injecting proxy."""
    proxy = Proxy(plain_registry.host)
    yield plain_registry, proxy
    proxy.stop()


# ---- images the tests push ------------------------------------------------------------
HELLO_CONVERTED_MANIFEST = "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def vector_blob(vectors, digest: str) -> bytes:
    return (vectors / "aci-hello-world" / digest.replace(":", "_")).read_bytes()


def push_hello_world(client, vectors, repo: str, tag: str) -> dict:
    """Push the converted hello-world overlaybd image of the vectors; returns its manifest."""
    from tcmu_overlaybd.image.push import push_blob, push_manifest

    raw = vector_blob(vectors, HELLO_CONVERTED_MANIFEST)
    manifest = json.loads(raw)
    for desc in [manifest["config"], *manifest["layers"]]:
        path = vectors / "aci-hello-world" / desc["digest"].replace(":", "_")
        push_blob(client, repo, str(path), desc["digest"], desc["size"])
    push_manifest(client, repo, tag, raw, manifest["mediaType"])
    return manifest


def push_image(client, repo: str, tag: str, layers: list[bytes], *, artifact_type: str | None = None,
               subject: dict | None = None, annotations: dict | None = None, chunk_size: int = 16 << 20):
    """Push an OCI image of raw tar-typed layers; returns (manifest digest, manifest dict)."""
    from tcmu_overlaybd.image.push import push_blob, push_manifest

    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256_digest(b) for b in layers]}}).encode()
    push_blob(client, repo, config, sha256_digest(config), len(config))
    descs = []
    for layer in layers:
        push_blob(client, repo, layer, sha256_digest(layer), len(layer), chunk_size=chunk_size)
        descs.append({"mediaType": OCI_LAYER_TAR, "digest": sha256_digest(layer), "size": len(layer)})
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
                "layers": descs}
    if artifact_type:
        manifest["artifactType"] = artifact_type
    if subject:
        manifest["subject"] = subject
    if annotations:
        manifest["annotations"] = annotations
    raw = json.dumps(manifest).encode()
    return push_manifest(client, repo, tag, raw, OCI_MANIFEST), manifest
