"""Registry endpoints from a containerd hosts directory (``hosts.toml`` or certs.d files).

A *hosts directory* (``registry.hostsDir``, default ``/etc/containerd/certs.d``) holds
one sub-directory per registry namespace, named like the registry in image
references: ``docker.io``, ``myregistry.io:5000`` (also spelled ``myregistry.io_5000_``),
and ``_default`` for every registry without its own.  containerd's docs/hosts.md
and ``core/remotes/docker/config/hosts.go`` define the format; obd follows them:

* ``hosts.toml``: every ``[host."URL"]`` table is an endpoint tried in file order,
  then the top-level ``server`` (default: the registry itself, ``registry-1.docker.io``
  for ``docker.io``).  Per endpoint: ``capabilities`` (``pull``, ``resolve``, ``push``;
  default all three), ``ca`` (a path or a list), ``client`` (a path, a list of
  paths, or a list of ``[cert, key]`` pairs), ``skip_verify``, ``override_path``
  (the URL path already is the API root, so no ``/v2`` is appended), ``[header]``
  (a string or a list of strings per name), ``dial_timeout`` (Go duration) and
  ``proxy`` (an http(s) proxy URL that overrides ``HTTP(S)_PROXY``/``NO_PROXY``).
  The top-level keys of the same names apply to ``server``.  Relative paths are
  relative to the directory of ``hosts.toml``.
* no ``hosts.toml``: docker's certs.d layout: every ``*.crt`` is a CA, every
  ``*.cert`` a client certificate with the ``.key`` of the same name.

``host_config(registry, dirs)`` gives the ``HostConfig`` of one namespace;
``HostConfig.endpoints_for(caps)`` the endpoints allowed to do an operation.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import tomllib
from dataclasses import dataclass
from urllib.parse import urlsplit

from ..errors import UsageError
from .reference import DOCKER_HUB, DOCKER_HUB_API

log = logging.getLogger(__name__)

#: capabilities of a host (containerd's HostCapabilities)
PULL, RESOLVE, PUSH = "pull", "resolve", "push"
ALL_CAPABILITIES = frozenset({PULL, RESOLVE, PUSH})
#: the namespace directory used when a registry has none of its own
DEFAULT_NAMESPACE = "_default"
HOSTS_FILE = "hosts.toml"
#: where containerd keeps the hosts directories; docker's certs.d (certificates only) after it
CONTAINERD_HOSTS_DIR = "/etc/containerd/certs.d"
DOCKER_CERTS_DIR = "/etc/docker/certs.d"
#: the per-endpoint keys of hosts.toml (containerd's hostFileConfig) obd understands
ENDPOINT_KEYS = frozenset({"capabilities", "ca", "client", "skip_verify", "header", "override_path",
                           "dial_timeout", "proxy"})
#: an HTTP header name (RFC 9110 token)
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
#: parsed hosts.toml files: (path, content, registry, default scheme) -> endpoints
_parsed: dict[tuple, tuple] = {}
_parsed_lock = threading.Lock()


@dataclass(frozen=True)
class Endpoint:
    """One place a registry namespace can be reached: a mirror (``[host."URL"]``) or its server."""

    scheme: str
    host: str  # host[:port]
    #: the API root: "/v2", "<prefix>/v2", or the URL's own path with override_path
    path: str
    capabilities: frozenset = ALL_CAPABILITIES
    #: extra CA files (added to the system's trusted roots)
    ca: tuple[str, ...] = ()
    #: client certificates: (cert, key) pairs; key None = the key is in the cert file
    client: tuple[tuple[str, str | None], ...] = ()
    skip_verify: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    #: connect timeout, seconds (None = registry.connectTimeout)
    dial_timeout: float | None = None
    #: proxy URL for this endpoint (None = the environment's HTTP(S)_PROXY/NO_PROXY)
    proxy: str | None = None
    #: a [host."URL"] entry rather than the namespace's server
    mirror: bool = False

    @property
    def label(self) -> str:
        """How messages name the endpoint: the URL, without the standard ``/v2`` root."""
        root = "" if self.path == "/v2" else self.path
        return f"{self.scheme}://{self.host}{root}"

    def api_url(self, api_path: str) -> str:
        """The URL of ``api_path`` (a path below the API root, e.g. ``/repo/manifests/tag``)."""
        return f"{self.scheme}://{self.host}{self.path.rstrip('/')}{api_path}"

    def can(self, caps) -> bool:
        return frozenset(caps) <= self.capabilities


@dataclass(frozen=True)
class HostConfig:
    """What a hosts directory says about one registry namespace."""

    registry: str  # as written in image references, e.g. docker.io or 127.0.0.1:5000
    #: mirrors in file order, then the server (always last)
    endpoints: tuple[Endpoint, ...]
    #: the hosts.toml or certificate directory that was used, None = built-in defaults
    source: str | None = None

    @property
    def server(self) -> Endpoint:
        return self.endpoints[-1]

    def endpoints_for(self, caps) -> list[Endpoint]:
        """The endpoints allowed to perform an operation needing ``caps``, in the order to try them."""
        return [e for e in self.endpoints if e.can(caps)]


def namespace_of(host: str) -> str:
    """The namespace directory name of an API host (``registry-1.docker.io`` is ``docker.io``)."""
    return DOCKER_HUB if host == DOCKER_HUB_API else host


def api_host_of(registry: str) -> str:
    """The host that serves ``registry`` when nothing else is configured (Docker Hub's API host)."""
    return DOCKER_HUB_API if registry == DOCKER_HUB else registry


def namespace_names(registry: str) -> list[str]:
    """Directory names that hold the settings of ``registry``, most specific first (containerd's order)."""
    names = []
    if ":" in registry:
        name, _, port = registry.rpartition(":")
        names.append(f"{name}_{port}_")
    return names + [registry]


def host_config(registry: str, hosts_dirs=(CONTAINERD_HOSTS_DIR, DOCKER_CERTS_DIR),
                default_scheme: str = "https") -> HostConfig:
    """The endpoints of ``registry`` (a reference's registry name) from its namespace directory
    in ``hosts_dirs`` (searched in order), else from a ``_default`` directory, else built in.

    ``default_scheme`` (``http`` with ``--plain-http``) is the scheme of the registry itself
    and of ``server``/host entries written without one.
    """
    registry = namespace_of(registry)
    candidates = [os.path.join(d, n) for n in namespace_names(registry) for d in hosts_dirs]
    candidates += [os.path.join(d, DEFAULT_NAMESPACE) for d in hosts_dirs]
    for d in candidates:
        if not os.path.isdir(d):
            continue
        path = os.path.join(d, HOSTS_FILE)
        if os.path.isfile(path):
            return HostConfig(registry, parse_hosts_file(path, registry, default_scheme), path)
        return HostConfig(registry, (_default_server(registry, default_scheme, _cert_files(d)),), d)
    return HostConfig(registry, (_default_server(registry, default_scheme),))


def _default_server(registry: str, scheme: str, tls: dict | None = None) -> Endpoint:
    """The registry itself as its own server (Docker Hub's API lives on registry-1.docker.io)."""
    host = api_host_of(registry)
    if registry == DOCKER_HUB:
        scheme = "https"
    return Endpoint(scheme, host, "/v2", **(tls or {}))


def _cert_files(d: str) -> dict:
    """docker's certs.d layout: ``*.crt`` CAs, ``*.cert`` client certificates with their ``.key``."""
    ca, client = [], []
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            continue
        if name.endswith(".crt"):
            ca.append(p)
        elif name.endswith(".cert"):
            key = p[: -len(".cert")] + ".key"
            client.append((p, key if os.path.isfile(key) else None))
    return {"ca": tuple(ca), "client": tuple(client)}


def parse_hosts_file(path: str, registry: str, default_scheme: str = "https") -> tuple[Endpoint, ...]:
    """Read and check one hosts.toml; any problem is a one-line UsageError naming the file.

    The file is read every time (an edit takes effect at the next store, no restart), but
    parsed once per content, so its warnings appear once, not once per store.
    """
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    key = (path, text, registry, default_scheme)
    with _parsed_lock:
        if key in _parsed:
            return _parsed[key]
    endpoints = _parse_text(text, path, registry, default_scheme)
    with _parsed_lock:
        _parsed[key] = endpoints
    return endpoints


def _parse_text(text: bytes, path: str, registry: str, default_scheme: str) -> tuple[Endpoint, ...]:
    try:
        doc = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"{path}: invalid TOML: {e}") from None
    return parse_hosts(doc, path, registry, default_scheme)


def parse_hosts(doc: dict, path: str, registry: str, default_scheme: str = "https") -> tuple[Endpoint, ...]:
    """The endpoints of a decoded hosts.toml: ``[host."URL"]`` tables in file order, then the server."""
    base = os.path.dirname(os.path.abspath(path))
    hosts = doc.get("host", {})
    if not isinstance(hosts, dict):
        raise UsageError(f"{path}: 'host' must be a table of [host.\"URL\"] tables")
    for key in doc:
        if key not in ENDPOINT_KEYS | {"server", "host"}:
            log.warning("%s: ignoring unknown key %r", path, key)
    endpoints = []
    for url, table in hosts.items():  # tomllib keeps the file's order
        where = f'[host."{url}"]'
        if not isinstance(table, dict):
            raise UsageError(f"{path}: {where} must be a table")
        if "host" in table:
            raise UsageError(f"{path}: {where}: nested host tables are not supported")
        for key in table:
            if key not in ENDPOINT_KEYS:
                log.warning("%s: %s: ignoring unknown key %r", path, where, key)
        endpoints.append(_endpoint(url, table, path, where, base, default_scheme, mirror=True))
    server = doc.get("server")
    if server is None:
        default = _default_server(registry, default_scheme)
        endpoints.append(_endpoint(f"{default.scheme}://{default.host}", doc, path, "server", base,
                                   default_scheme, mirror=False))
    else:
        if not isinstance(server, str) or not server:
            raise UsageError(f"{path}: server must be a URL string")
        endpoints.append(_endpoint(server, doc, path, "server", base, default_scheme, mirror=False))
    return tuple(endpoints)


def _endpoint(url: str, table: dict, path: str, where: str, base: str, default_scheme: str,
              mirror: bool) -> Endpoint:
    def bad(problem: str) -> UsageError:
        return UsageError(f"{path}: {where}: {problem}")

    if "://" not in url:
        url = f"{default_scheme}://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise bad(f"unsupported scheme {parts.scheme!r} (http or https)")
    if not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        raise bad(f"{url!r} is not a registry URL (scheme://host[:port][/path])")
    override = _bool(table, "override_path", bad)
    root = os.path.normpath(parts.path) if parts.path not in ("", "/") else ""
    if not override and not root.endswith("/v2"):
        root += "/v2"
    return Endpoint(
        scheme=parts.scheme,
        host=parts.netloc,
        path=root or "/",
        capabilities=_capabilities(table, bad),
        ca=tuple(_abs(p, base, bad, "ca") for p in _paths(table.get("ca"), bad, "ca")),
        client=_client(table.get("client"), base, bad),
        skip_verify=_bool(table, "skip_verify", bad),
        headers=_headers(table.get("header"), bad),
        dial_timeout=_duration(table.get("dial_timeout"), bad),
        proxy=_proxy(table.get("proxy"), bad),
        mirror=mirror,
    )


def _bool(table: dict, key: str, bad) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise bad(f"{key} must be true or false, not {value!r}")
    return value


def _capabilities(table: dict, bad) -> frozenset:
    caps = table.get("capabilities")
    if caps is None or caps == []:
        return ALL_CAPABILITIES
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise bad("capabilities must be a list of strings")
    out = frozenset(c.lower() for c in caps)
    unknown = sorted(out - ALL_CAPABILITIES)
    if unknown:
        raise bad(f"unknown capability {unknown[0]!r} (pull, resolve, push)")
    return out


def _paths(value, bad, key: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise bad(f"{key} must be a path or a list of paths")


def _abs(p: str, base: str, bad, key: str) -> str:
    full = p if os.path.isabs(p) else os.path.join(base, p)
    if not os.path.isfile(full):
        raise bad(f"{key} file {full} not found")
    return full


def _client(value, base: str, bad) -> tuple[tuple[str, str | None], ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise bad("client must be a path, a list of paths or a list of [cert, key] pairs")
    pairs = []
    for item in items:
        if isinstance(item, str):
            pairs.append((_abs(item, base, bad, "client"), None))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item):
            cert, key = item
            pairs.append((_abs(cert, base, bad, "client"), _abs(key, base, bad, "client") if key else None))
        else:
            raise bad(f"client entry {item!r} is neither a path nor a [cert, key] pair")
    return tuple(pairs)


def _headers(value, bad) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise bad("header must be a table of name = value")
    out = []
    for name, v in value.items():
        if isinstance(v, str):
            text = v
        elif isinstance(v, list) and all(isinstance(x, str) for x in v):
            text = ", ".join(v)  # a list-valued header, as HTTP folds repeated fields
        else:
            raise bad(f"header {name!r} must be a string or a list of strings")
        if not _TOKEN_RE.fullmatch(name) or "\r" in text or "\n" in text:
            raise bad(f"header {name!r}: not a valid HTTP header name and one-line value")
        out.append((name, text))
    return tuple(out)


def _proxy(value, bad) -> str | None:
    """containerd's rule: an absolute URL with a host and no path, query or fragment (obd: http/https)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad(f"proxy must be a URL string, not {value!r}")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise bad(f"proxy {value!r}: unsupported scheme (http or https)")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise bad(f"proxy {value!r} must be scheme://host[:port] with no path")
    return value


def _duration(value, bad) -> float | None:
    """A Go duration string (``"1s"``, ``"500ms"``, ``"1m30s"``) in seconds."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad(f"dial_timeout must be a duration string like \"2s\", not {value!r}")
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _DURATION_UNITS[m.group(2)]
        pos = m.end()
    if pos != len(value) or total <= 0:
        raise bad(f"dial_timeout {value!r} is not a positive duration like \"2s\" or \"500ms\"")
    return total
