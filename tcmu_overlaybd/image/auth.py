"""Registry credentials and the authentication challenge flow.

Credentials for a registry host are looked up in this order (first hit wins):

1. ``-u user[:pass]`` (``OpenOptions.username/password``);
2. ``--authfile FILE`` (docker ``config.json`` format), else
   ``$DOCKER_CONFIG/config.json``, else ``~/.docker/config.json``; within a file:
   ``credHelpers[host]``, then ``auths`` (``auth`` = base64 ``user:pass`` or
   ``username``/``password``; keys with or without scheme and path; Docker Hub
   aliases), then ``credsStore``.  A helper is ``docker-credential-<name> get`` with
   the server name on stdin, answering ``{"Username", "Secret"}``.

The challenge flow follows the distribution token spec: a 401 carries
``WWW-Authenticate: Bearer realm=...,service=...,scope=...`` (ask the realm for a
token, with basic credentials when known, cache it per scope until it expires) or
``Basic realm=...`` (send the credentials on every request).  Secrets are
registered with ``logs.register_secret`` so they never reach a log line.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import dataclass

import requests

from ..errors import AuthError, NetworkError, UsageError
from ..logs import register_secret
from .reference import DOCKER_HUB, DOCKER_HUB_API

#: names under which Docker Hub credentials are stored in config.json
DOCKER_HUB_ALIASES = (DOCKER_HUB, DOCKER_HUB_API, "index.docker.io", "https://index.docker.io/v1/")
#: refresh a token this many seconds before the registry would reject it
TOKEN_EXPIRY_MARGIN = 5.0
#: lifetime assumed when a token server omits expires_in (distribution spec: 60 s)
DEFAULT_TOKEN_LIFETIME = 60.0


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def __repr__(self) -> str:  # never print the password
        return f"Credentials(username={self.username!r}, password=***)"


def normalize_host(key: str) -> str:
    """``https://index.docker.io/v1/`` -> ``index.docker.io``; ``host:5000/`` -> ``host:5000``."""
    key = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", key.strip())
    return key.split("/", 1)[0].lower()


def _host_aliases(host: str) -> set[str]:
    h = normalize_host(host)
    if h in {normalize_host(a) for a in DOCKER_HUB_ALIASES}:
        return {normalize_host(a) for a in DOCKER_HUB_ALIASES}
    return {h}


def default_config_paths() -> list[str]:
    """Where docker keeps config.json: ``$DOCKER_CONFIG`` or ``~/.docker``."""
    d = os.environ.get("DOCKER_CONFIG")
    if d:
        return [os.path.join(d, "config.json")]
    return [os.path.join(os.path.expanduser("~"), ".docker", "config.json")]


def _load_config(path: str, explicit: bool) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"{path}: authfile not found") from None
        return None
    except OSError as e:
        raise UsageError(f"{path}: cannot read authfile: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: an authfile must be a JSON object")
    return doc


def _decode_auth_entry(entry: dict, path: str, key: str) -> Credentials | None:
    if not isinstance(entry, dict):
        raise UsageError(f"{path}: auths[{key!r}] must be an object")
    if entry.get("auth"):
        try:
            raw = base64.b64decode(entry["auth"], validate=False).decode()
        except (ValueError, UnicodeDecodeError):
            raise UsageError(f"{path}: auths[{key!r}].auth is not base64 of user:password") from None
        user, sep, pw = raw.partition(":")
        if not sep:
            raise UsageError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
        return Credentials(user, pw)
    if entry.get("username"):
        return Credentials(entry["username"], entry.get("password", ""))
    return None


def run_credential_helper(name: str, host: str) -> Credentials | None:
    """``docker-credential-<name> get`` for ``host``; None when it has no entry."""
    prog = f"docker-credential-{name}"
    try:
        proc = subprocess.run([prog, "get"], input=host.encode(), capture_output=True, timeout=30)
    except FileNotFoundError:
        raise AuthError(f"credential helper {prog} not found on PATH (configured for {host})") from None
    except subprocess.TimeoutExpired:
        raise AuthError(f"credential helper {prog} did not answer within 30 s for {host}") from None
    out = proc.stdout.decode(errors="replace").strip()
    if proc.returncode != 0:
        if "credentials not found" in out.lower() or "credentials not found" in proc.stderr.decode(errors="replace").lower():
            return None
        raise AuthError(f"credential helper {prog} failed for {host}: exit status {proc.returncode}")
    try:
        doc = json.loads(out)
        user, secret = doc["Username"], doc["Secret"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise AuthError(f"credential helper {prog} gave an unreadable answer for {host}") from None
    return Credentials(user, secret)


def lookup_credentials(host: str, username: str | None = None, password: str | None = None,
                       authfile: str | None = None) -> Credentials | None:
    """Credentials for registry ``host`` (see module docstring for the order)."""
    if username:
        creds = Credentials(username, password or "")
        register_secret(creds.password)
        return creds
    paths = [authfile] if authfile else default_config_paths()
    aliases = _host_aliases(host)
    for path in paths:
        doc = _load_config(path, explicit=bool(authfile))
        if not doc:
            continue
        creds = None
        for key, helper in (doc.get("credHelpers") or {}).items():
            if normalize_host(key) in aliases:
                # the helper is asked with the key as written (docker passes the server URL)
                creds = run_credential_helper(helper, key)
                break
        else:
            for key, entry in (doc.get("auths") or {}).items():
                if normalize_host(key) in aliases:
                    creds = _decode_auth_entry(entry, path, key)
                    if creds:
                        break
            if creds is None and doc.get("credsStore"):
                server = "https://index.docker.io/v1/" if DOCKER_HUB in aliases else host
                creds = run_credential_helper(doc["credsStore"], server)
        if creds:
            register_secret(creds.password)
            return creds
    return None


# ---- WWW-Authenticate -----------------------------------------------------------------
_PARAM_RE = re.compile(r'\s*([a-zA-Z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*,?')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="x",service="y"`` -> ("bearer", {"realm": "x", "service": "y"})."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    pos = 0
    while pos < len(rest):
        m = _PARAM_RE.match(rest, pos)
        if not m or m.end() == pos:
            break
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        pos = m.end()
    return scheme.lower(), params


@dataclass
class _Token:
    value: str
    expires: float  # time.monotonic()
    #: not yet accepted by the registry: a 401 now means "no access", not "expired"
    fresh: bool = True


class Authenticator:
    """Answers a registry's challenges and remembers the result per scope.

    ``header(scope)`` gives the Authorization header to send (or None);
    ``challenge(response_header, scope, sent, http_get)`` handles a 401 and says
    whether retrying is worthwhile; ``http_get(url, params, headers)`` is how the
    token server is reached (the registry client's session and TLS settings).
    """

    def __init__(self, host: str, username: str | None = None, password: str | None = None,
                 authfile: str | None = None):
        self.host = host
        self._user, self._pass, self._authfile = username, password, authfile
        self._creds: Credentials | None = None
        self._looked_up = False
        self._scheme: str | None = None  # "basic" or "bearer" once the registry told us
        self._tokens: dict[str, _Token] = {}
        self._lock = threading.Lock()

    @property
    def credentials(self) -> Credentials | None:
        if not self._looked_up:
            self._creds = lookup_credentials(self.host, self._user, self._pass, self._authfile)
            self._looked_up = True
        return self._creds

    def header(self, scope: str) -> str | None:
        with self._lock:
            if self._scheme == "basic":
                return self.credentials.basic_header() if self.credentials else None
            tok = self._tokens.get(scope)
            if tok and tok.expires > time.monotonic():
                return f"Bearer {tok.value}"
        return None

    def challenge(self, www_authenticate: str | None, scope: str, sent: str | None, http_get) -> bool:
        """React to a 401.  ``sent`` is the Authorization header that was refused."""
        if not www_authenticate:
            raise AuthError(f"registry {self.host}: 401 Unauthorized without a WWW-Authenticate challenge")
        scheme, params = parse_challenge(www_authenticate)
        if scheme == "basic":
            creds = self.credentials
            if creds is None:
                raise AuthError(f"registry {self.host} requires a login (no credentials found; use -u or --authfile)")
            if sent and sent.lower().startswith("basic"):
                raise AuthError(f"registry {self.host} refused the credentials of user {creds.username!r}")
            self._scheme = "basic"
            return True
        if scheme == "bearer":
            refused_token = bool(sent and sent.lower().startswith("bearer"))
            if refused_token and (params.get("error", "invalid_token") != "invalid_token" or self._just_issued(scope)):
                reason = f" ({params['error']})" if "error" in params else ""
                raise AuthError(f"registry {self.host}: {self._who()} is not allowed {scope}{reason}")
            self._fetch_token(params, scope, http_get)
            self._scheme = "bearer"
            return True
        raise AuthError(f"registry {self.host}: unsupported authentication scheme {scheme!r}")

    def _who(self) -> str:
        c = self.credentials
        return f"user {c.username!r}" if c else "anonymous access"

    def _just_issued(self, scope: str) -> bool:
        tok = self._tokens.get(scope)
        return bool(tok and tok.expires > time.monotonic() and tok.fresh)

    def _fetch_token(self, params: dict, scope: str, http_get) -> None:
        realm = params.get("realm")
        if not realm:
            raise AuthError(f"registry {self.host}: Bearer challenge without a realm")
        query = {}
        if params.get("service"):
            query["service"] = params["service"]
        query["scope"] = scope or params.get("scope", "")
        headers = {}
        creds = self.credentials
        if creds:
            headers["Authorization"] = creds.basic_header()
        try:
            resp = http_get(realm, query, headers)
        except requests.RequestException as e:
            raise NetworkError(f"token server {realm} for {self.host}: {type(e).__name__}: {e}") from None
        if resp.status_code in (401, 403):
            if creds:
                raise AuthError(f"registry {self.host}: token server refused the credentials of user {creds.username!r}")
            raise AuthError(f"registry {self.host} requires a login for {scope} (no credentials found; use -u or --authfile)")
        if resp.status_code != 200:
            raise AuthError(f"registry {self.host}: token server {realm} answered HTTP {resp.status_code}")
        try:
            doc = resp.json()
            value = doc.get("token") or doc.get("access_token")
            lifetime = float(doc.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise AuthError(f"registry {self.host}: token server {realm} sent no token") from None
        if not value:
            raise AuthError(f"registry {self.host}: token server {realm} sent no token")
        register_secret(value)
        with self._lock:
            self._tokens[scope] = _Token(value, time.monotonic() + max(0.0, lifetime - TOKEN_EXPIRY_MARGIN))

    def mark_used(self, scope: str) -> None:
        """A request with the scope's token succeeded: a later 401 means it expired."""
        tok = self._tokens.get(scope)
        if tok is not None:
            tok.fresh = False
