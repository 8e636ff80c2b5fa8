"""Credentials lookup, challenges, TLS options and the three auth variants of a real registry."""

from __future__ import annotations

import base64
import json
import logging
import os
import stat
import time

import pytest

from tcmu_overlaybd.errors import AuthError, NetworkError, ObdError, UsageError
from tcmu_overlaybd.image.auth import Credentials, lookup_credentials, parse_challenge
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.push import push_blob
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.registry import RegistryClient, RegistryStore

from .helpers.registry import (  # noqa: F401 - fixtures
    BASIC_USERS,
    Proxy,
    RegistryServer,
    basic_registry,
    needs_registry,
    push_image,
    sha256_digest,
    test_ca,
    tls_registry,
    token_registry,
)

PASSWORD = BASIC_USERS["alice"]


# ---- challenges -------------------------------------------------------------------------
def test_parse_bearer_and_basic_challenges():
    scheme, p = parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                                'scope="repository:library/ubuntu:pull,push"')
    assert scheme == "bearer"
    assert p == {"realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                 "scope": "repository:library/ubuntu:pull,push"}
    assert parse_challenge('Basic realm="Registry Realm"') == ("basic", {"realm": "Registry Realm"})
    assert parse_challenge('Bearer realm=http://x/t, error="insufficient_scope"')[1]["error"] == "insufficient_scope"


# ---- credential sources ---------------------------------------------------------------
def _auth(user, pw):
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


def write_config(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return str(path)


def test_flag_credentials_win(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    write_config(tmp_path / "config.json", {"auths": {"r.example": {"auth": _auth("file", "x")}}})
    assert lookup_credentials("r.example", "flag", "pw") == Credentials("flag", "pw")


def test_authfile_keys_with_scheme_path_and_docker_hub_aliases(tmp_path):
    path = write_config(tmp_path / "auth.json", {"auths": {
        "https://r.example:5000/v2/": {"auth": _auth("bob", "s3:cret")},
        "https://index.docker.io/v1/": {"username": "hubuser", "password": "hubpw"},
    }})
    assert lookup_credentials("r.example:5000", authfile=path) == Credentials("bob", "s3:cret")
    assert lookup_credentials("registry-1.docker.io", authfile=path) == Credentials("hubuser", "hubpw")
    assert lookup_credentials("docker.io", authfile=path) == Credentials("hubuser", "hubpw")
    assert lookup_credentials("other.example", authfile=path) is None


def test_docker_config_dir_and_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "dc"))
    write_config(tmp_path / "dc" / "config.json", {"auths": {"r.example": {"auth": _auth("a", "b")}}})
    assert lookup_credentials("r.example") == Credentials("a", "b")
    monkeypatch.delenv("DOCKER_CONFIG")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_config(tmp_path / "home" / ".docker" / "config.json", {"auths": {"r.example": {"auth": _auth("c", "d")}}})
    assert lookup_credentials("r.example") == Credentials("c", "d")


def _helper(tmp_path, name, script):
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    prog = bindir / f"docker-credential-{name}"
    prog.write_text("#!/bin/sh\n" + script)
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
    return str(bindir)


def test_cred_helpers_and_creds_store(tmp_path, monkeypatch):
    bindir = _helper(tmp_path, "pass", 'read server; [ "$1" = get ] || exit 9\n'
                     'if [ "$server" = "r.example" ]; then echo \'{"ServerURL":"r.example","Username":"helped","Secret":"hs"}\';'
                     ' else echo "credentials not found in native keychain"; exit 1; fi\n')
    _helper(tmp_path, "store", 'read server; echo "{\\"Username\\":\\"stored\\",\\"Secret\\":\\"$server\\"}"\n')
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    path = write_config(tmp_path / "c.json", {"credHelpers": {"r.example": "pass", "q.example": "pass"},
                                              "credsStore": "store",
                                              "auths": {"z.example": {"auth": _auth("inline", "i")}}})
    assert lookup_credentials("r.example", authfile=path) == Credentials("helped", "hs")
    assert lookup_credentials("q.example", authfile=path) is None  # helper has no entry
    assert lookup_credentials("z.example", authfile=path) == Credentials("inline", "i")
    assert lookup_credentials("s.example", authfile=path) == Credentials("stored", "s.example")
    assert lookup_credentials("docker.io", authfile=path) == Credentials("stored", "https://index.docker.io/v1/")


def test_credential_problems_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match=r"nope\.json: authfile not found"):
        lookup_credentials("r", authfile=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"auths": {')
    with pytest.raises(UsageError, match=r"bad\.json: invalid JSON at line 1 column 12"):
        lookup_credentials("r", authfile=str(bad))
    path = write_config(tmp_path / "h.json", {"credHelpers": {"r": "absent-helper"}})
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(AuthError, match="credential helper docker-credential-absent-helper not found on PATH"):
        lookup_credentials("r", authfile=path)


# ---- TLS ------------------------------------------------------------------------------
def opts(tmp_path, **kw):
    base = dict(cache_dir=str(tmp_path / "cache"), cache_size=1 << 30, retries=1, connect_timeout=2.0,
                read_timeout=5.0, quiet=True, extra={"backoff_base": 0.01})
    base.update(kw)
    return OpenOptions(**base)


def _roundtrip(host, o, repo="t/img"):
    """Push a small image and read it back through a RegistryStore; returns the layer bytes."""
    client = RegistryClient(host, o)
    layer = b"hello over " + host.encode()
    push_image(client, repo, "v1", [layer])
    store = RegistryStore(parse_reference(f"{host}/{repo}:v1"), o)
    desc = store.resolve(store.ref)
    manifest = json.loads(store.fetch_manifest(desc))
    l0 = manifest["layers"][0]
    return store.open_blob(l0["digest"], l0["size"]).read(0, l0["size"])




@needs_registry
@pytest.mark.registry
def test_tls_needs_the_ca(tls_registry, test_ca, tmp_path):
    with pytest.raises(NetworkError) as e:
        _roundtrip(tls_registry.host, opts(tmp_path))
    assert str(e.value).endswith("TLS error: certificate verify failed: unable to get local issuer certificate "
                                 "(see --tlscacert, --tlscert/--tlskey, -k, --plain-http)")
    assert _roundtrip(tls_registry.host, opts(tmp_path, tls_ca_cert=test_ca.ca_cert)) == \
        b"hello over " + tls_registry.host.encode()
    assert _roundtrip(tls_registry.host, opts(tmp_path, skip_verify=True), "t/k").startswith(b"hello")
    with pytest.raises(ObdError, match="unexpected HTTP 400"):
        _roundtrip(tls_registry.host, opts(tmp_path, plain_http=True))


@needs_registry
@pytest.mark.registry
def test_client_certificates(tmp_path, test_ca):
    reg = RegistryServer(str(tmp_path / "mtls"), ca=test_ca, client_certs=True)
    try:
        with pytest.raises(NetworkError, match="TLS error: alert bad certificate"):
            _roundtrip(reg.host, opts(tmp_path, tls_ca_cert=test_ca.ca_cert))
        o = opts(tmp_path, tls_ca_cert=test_ca.ca_cert, client_cert=test_ca.client_cert,
                 client_key=test_ca.client_key)
        assert _roundtrip(reg.host, o).startswith(b"hello over")
    finally:
        reg.stop()


# ---- basic auth -----------------------------------------------------------------------
@needs_registry
@pytest.mark.registry
def test_basic_auth(basic_registry, test_ca, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    base = dict(tls_ca_cert=test_ca.ca_cert)
    with pytest.raises(AuthError) as e:
        _roundtrip(basic_registry.host, opts(tmp_path, **base))
    assert str(e.value) == (f"registry {basic_registry.host} requires a login "
                            "(no credentials found; use -u or --authfile)")
    with pytest.raises(AuthError) as e:
        _roundtrip(basic_registry.host, opts(tmp_path, username="alice", password="wrong-pw", **base))
    assert str(e.value) == f"registry {basic_registry.host} refused the credentials of user 'alice'"
    assert e.value.exit_code == 4
    good = opts(tmp_path, username="alice", password=PASSWORD, **base)
    assert _roundtrip(basic_registry.host, good).startswith(b"hello over")
    authfile = write_config(tmp_path / "auth.json",
                            {"auths": {f"https://{basic_registry.host}": {"auth": _auth("alice", PASSWORD)}}})
    assert _roundtrip(basic_registry.host, opts(tmp_path, authfile=authfile, **base), "t/f").startswith(b"hello")
    assert PASSWORD not in caplog.text


# ---- token auth -----------------------------------------------------------------------
@needs_registry
@pytest.mark.registry
def test_token_auth_flow(token_registry, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    registry, tokens = token_registry
    good = opts(tmp_path, plain_http=True, username="alice", password=PASSWORD)
    assert _roundtrip(registry.host, good) == b"hello over " + registry.host.encode()
    assert tokens.requests[0]["user"] == "alice"
    assert tokens.requests[0]["scope"] == ["repository:t/img:pull,push"]

    # one token per scope, reused for every request of that scope
    store = RegistryStore(parse_reference(f"{registry.host}/t/img:v1"), good)
    before = tokens.issued
    for _ in range(5):
        store.resolve(store.ref)
    assert tokens.issued == before + 1

    with pytest.raises(AuthError) as e:
        _roundtrip(registry.host, opts(tmp_path, plain_http=True, username="alice", password="bad"))
    assert str(e.value) == f"registry {registry.host}: token server refused the credentials of user 'alice'"
    anon = RegistryStore(parse_reference(f"{registry.host}/t/img:v1"), opts(tmp_path, plain_http=True))
    with pytest.raises(AuthError, match="requires a login for repository:t/img:pull"):
        anon.resolve(anon.ref)

    reader = opts(tmp_path, plain_http=True, username="reader", password="read-only-pw")
    store = RegistryStore(parse_reference(f"{registry.host}/t/img:v1"), reader)
    assert store.resolve(store.ref).media_type == "application/vnd.oci.image.manifest.v1+json"
    with pytest.raises(AuthError) as e:
        push_blob(RegistryClient(registry.host, reader), "t/img", b"z", sha256_digest(b"z"), 1)
    assert str(e.value) == (f"registry {registry.host}: user 'reader' is not allowed "
                            "repository:t/img:pull,push (insufficient_scope)")
    assert "urllib3" in caplog.text  # debug logging was on
    for secret in [PASSWORD, "read-only-pw", *tokens.tokens]:
        assert secret not in caplog.text


@needs_registry
@pytest.mark.registry
def test_expired_token_is_refreshed(token_registry, tmp_path):
    registry, tokens = token_registry
    good = opts(tmp_path, plain_http=True, username="alice", password=PASSWORD)
    client = RegistryClient(registry.host, good)
    push_blob(client, "t/e", b"x", sha256_digest(b"x"), 1)
    tokens.expires_in = 6  # usable for 1 s after the client's 5 s safety margin
    store = RegistryStore(parse_reference(f"{registry.host}/t/e:v1"), good)
    assert store.fetch_blob(sha256_digest(b"x")) == b"x"
    issued = tokens.issued
    assert store.fetch_blob(sha256_digest(b"x")) == b"x"
    assert tokens.issued == issued
    time.sleep(1.2)
    assert store.fetch_blob(sha256_digest(b"x")) == b"x"
    assert tokens.issued == issued + 1


@needs_registry
@pytest.mark.registry
def test_token_rejected_before_expiry_is_fetched_again(token_registry, tmp_path):
    registry, tokens = token_registry
    good = opts(tmp_path, plain_http=True, username="alice", password=PASSWORD)
    push_blob(RegistryClient(registry.host, good), "t/r", b"y", sha256_digest(b"y"), 1)
    proxy = Proxy(registry.host)
    try:
        store = RegistryStore(parse_reference(f"{proxy.host}/t/r:v1"), good)
        assert store.fetch_blob(sha256_digest(b"y")) == b"y"
        issued = tokens.issued
        proxy.add_fault("strip-auth", "/blobs/", "GET")
        assert store.fetch_blob(sha256_digest(b"y")) == b"y"
        assert tokens.issued == issued + 1
        assert [s for m, _p, _r, s in proxy.log.requests if m == "GET"][-2:] == [401, 200]
    finally:
        proxy.stop()


@needs_registry
@pytest.mark.registry
def test_ca_and_client_cert_from_a_certs_d_directory(tmp_path, test_ca):
    import shutil

    reg = RegistryServer(str(tmp_path / "mtls"), ca=test_ca, client_certs=True)
    try:
        host_dir = tmp_path / "certs.d" / reg.host
        host_dir.mkdir(parents=True)
        shutil.copy(test_ca.ca_cert, host_dir / "ca.crt")
        shutil.copy(test_ca.client_cert, host_dir / "client.cert")
        shutil.copy(test_ca.client_key, host_dir / "client.key")
        # registry.hostsDir / OpenOptions.hosts_dir names the certs.d directory
        client = RegistryClient(reg.host, opts(tmp_path, hosts_dir=str(tmp_path / "certs.d")))
        assert client.head_manifest("a/b", "v1") is None  # TLS and client auth worked: a clean 404
        with pytest.raises(NetworkError, match="certificate verify failed"):
            RegistryClient(reg.host, opts(tmp_path), certs_dirs=()).head_manifest("a/b", "v1")
    finally:
        reg.stop()
