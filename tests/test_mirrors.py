"""Mirrors from hosts.toml against real registries: order, failover, capabilities, TLS, credentials.

Two docker-registry processes live for the whole module: ``upstream`` (the registry the
references name) and ``mirror``, both holding the converted hello-world; only upstream has
``only/upstream:v1``.  Each test reaches them through fresh counting proxies, so stopping a
proxy is a registry going down, and names the upstream proxy in its references.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import shutil
import time
from urllib.parse import urlencode

import pytest

from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.errors import AuthError, NetworkError, NotFoundError
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.push import push_blob
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.registry import RegistryClient, RegistryStore

from .helpers.registry import (  # noqa: F401 - fixtures
    BASIC_USERS,
    HELLO_CONVERTED_MANIFEST,
    Proxy,
    RegistryServer,
    free_port,
    needs_registry,
    push_hello_world,
    sha256_digest,
    test_ca,
    vector_blob,
)

pytestmark = [needs_registry, pytest.mark.registry]

HELLO_SHA256 = "d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014"
HELLO_LAYER = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
BLOCK = 256 * 1024


class RewritingProxy(Proxy):
    """A Proxy that maps request paths starting with ``strip`` onto ``put`` (a registry served
    under another API root) and keeps every request's headers."""

    def __init__(self, upstream_host: str, strip: str = "", put: str = ""):
        self.strip, self.put = strip, put
        self.headers: list[dict] = []
        self.paths: list[str] = []  # as requested, before the mapping
        super().__init__(upstream_host)

    def _serve(self, h) -> None:
        self.headers.append({k.lower(): v for k, v in h.headers.items()})
        self.paths.append(h.path)
        if self.strip and h.path.startswith(self.strip + "/"):
            h.path = self.put + h.path[len(self.strip):]
        super()._serve(h)


def _push_hello(host: str, vectors, repo: str, tag: str, **kw) -> None:
    client = RegistryClient(host, OpenOptions(**kw), certs_dirs=())
    push_hello_world(client, vectors, repo, tag)
    client.close()


@pytest.fixture(scope="module")
def registries(tmp_path_factory, vectors):
    up = RegistryServer(str(tmp_path_factory.mktemp("upstream")))
    mirror = RegistryServer(str(tmp_path_factory.mktemp("mirror")))
    try:
        for reg in (up, mirror):
            _push_hello(reg.host, vectors, "library/hello", "obd", plain_http=True)
        _push_hello(up.host, vectors, "only/upstream", "v1", plain_http=True)
        yield up, mirror
    finally:
        up.stop()
        mirror.stop()


class Site:
    """Proxies in front of the module's registries and a hosts directory for the upstream one."""

    def __init__(self, registries, tmp_path):
        self.tmp = tmp_path
        self.up = Proxy(registries[0].host)
        self.mirror = RewritingProxy(registries[1].host)
        self.hosts = tmp_path / "hosts"
        self.proxies = [self.up, self.mirror]

    def hosts_toml(self, text: str):
        d = self.hosts / self.up.host
        d.mkdir(parents=True, exist_ok=True)
        (d / "hosts.toml").write_text(text)
        return d

    @property
    def ns(self) -> str:
        """The query that names the upstream registry on requests to mirrors."""
        return urlencode({"ns": self.up.host})

    def opts(self, **kw) -> OpenOptions:
        base = dict(plain_http=True, hosts_dir=str(self.hosts), cache_dir=str(self.tmp / "cache"),
                    cache_size=1 << 30, retries=2, connect_timeout=2.0, read_timeout=5.0, quiet=True,
                    extra={"backoff_base": 0.01})
        base.update(kw)
        return OpenOptions(**base)

    def store(self, name: str = "library/hello:obd", **kw) -> RegistryStore:
        return RegistryStore(parse_reference(f"{self.up.host}/{name}"), self.opts(**kw))

    def stop_upstream(self) -> None:
        self.up.stop()
        self.proxies.remove(self.up)


@pytest.fixture
def site(registries, tmp_path):
    s = Site(registries, tmp_path)
    yield s
    for p in s.proxies:
        p.stop()


def blob_gets(proxy, digest: str) -> list:
    return [r for r in proxy.log.requests if r[0] == "GET" and f"/blobs/{digest}" in r[1]]


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def read_hello(store) -> tuple[bytes, bytes]:
    """(manifest bytes, the whole layer read through the block cache)."""
    desc = store.resolve(store.ref)
    manifest = store.fetch_manifest(desc)
    layer = json.loads(manifest)["layers"][0]
    src = store.open_blob(layer["digest"], layer["size"])
    return manifest, src.read(0, layer["size"])


def test_a_mirror_serves_everything_while_the_registry_is_down(site, vectors, caplog):
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n'
                    f'  [host."http://{site.mirror.host}".header]\n    x-obd-tenant = ["blue", "green"]\n')
    site.stop_upstream()
    store = site.store()
    with caplog.at_level(logging.WARNING):
        manifest, layer = read_hello(store)
    assert manifest == vector_blob(vectors, HELLO_CONVERTED_MANIFEST)
    assert layer == vector_blob(vectors, HELLO_LAYER)
    assert warnings(caplog) == []
    # every request says which registry it is for, and carries the configured header
    assert all(r[1].endswith(f"?{site.ns}") for r in site.mirror.log.requests)
    assert {h.get("x-obd-tenant") for h in site.mirror.headers} == {"blue, green"}
    store.close()


def test_a_dead_mirror_costs_one_warning_then_the_registry_serves(site, vectors, caplog):
    dead = f"127.0.0.1:{free_port()}"
    site.hosts_toml(f'[host."http://{dead}"]\n  capabilities = ["pull", "resolve"]\n')
    store = site.store()
    with caplog.at_level(logging.WARNING):
        manifest, layer = read_hello(store)
        config = json.loads(manifest)["config"]
        assert store.fetch_blob(config["digest"], config["size"]) == vector_blob(vectors, config["digest"])
    assert layer == vector_blob(vectors, HELLO_LAYER)
    (warning,) = warnings(caplog)  # later reads skip the mirror that just failed
    assert re.fullmatch(rf"mirror http://{dead}: manifest {site.up.host}/library/hello:obd: ConnectionError: "
                        rf".*Connection refused \(gave up after 2 attempts\); served by http://{site.up.host}", warning)
    store.close()


def test_a_slow_mirror_and_a_failing_one_fall_through(site, vectors, caplog):
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    store = site.store(read_timeout=0.5)
    site.mirror.add_fault("delay:1.5", "/manifests/", "HEAD", times=2)
    with caplog.at_level(logging.WARNING):
        assert store.resolve(store.ref).digest == HELLO_CONVERTED_MANIFEST
    (slow,) = warnings(caplog)
    assert slow == (f"mirror http://{site.mirror.host}: manifest {site.up.host}/library/hello:obd: ReadTimeout: "
                    f"Read timed out (gave up after 2 attempts); served by http://{site.up.host}")
    caplog.clear()
    site.mirror.add_fault("status:502", "/blobs/", "GET", times=2)
    with caplog.at_level(logging.WARNING):
        assert read_hello(site.store(cache_dir=str(site.tmp / "c2")))[1] == vector_blob(vectors, HELLO_LAYER)
    (failing,) = warnings(caplog)
    assert re.fullmatch(rf"mirror http://{site.mirror.host}: blob {HELLO_LAYER} bytes \d+-\d+: HTTP 502 Bad Gateway "
                        rf"\(gave up after 2 attempts\); served by http://{site.up.host}", failing)
    store.close()


class SkewedClock:
    """``time`` for mirrors.py, whose monotonic clock a test can move forward."""

    def __init__(self):
        self.skew = 0.0
        self.sleep = time.sleep

    def monotonic(self) -> float:
        return time.monotonic() + self.skew


def test_a_mirror_back_from_an_outage_is_used_again_after_the_holdoff(site, vectors, caplog, monkeypatch):
    from tcmu_overlaybd.image import mirrors

    clock = SkewedClock()
    monkeypatch.setattr(mirrors, "time", clock)
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    store = site.store()
    site.mirror.add_fault("drop", "/manifests/", times=2)  # both attempts of the first request
    with caplog.at_level(logging.WARNING):
        desc = store.resolve(store.ref)
    assert warnings(caplog)[0].startswith(f"mirror http://{site.mirror.host}: manifest ")
    assert [m for m, _p, _r, _s in site.up.log.requests] == ["HEAD"]
    clock.skew = mirrors.HOLDOFF - 1
    assert store.fetch_manifest(desc) == vector_blob(vectors, HELLO_CONVERTED_MANIFEST)  # still held off
    assert [m for m, _p, _r, _s in site.up.log.requests] == ["HEAD", "GET"]
    clock.skew = mirrors.HOLDOFF + 1
    assert store.fetch_manifest(desc) == vector_blob(vectors, HELLO_CONVERTED_MANIFEST)
    assert len(site.up.log.requests) == 2 and site.mirror.log.requests[-1][0:4:3] == ("GET", 200)
    store.close()


def test_the_default_namespace_and_the_port_spelling(site, vectors):
    site.stop_upstream()
    default = site.hosts / "_default"
    default.mkdir(parents=True)
    (default / "hosts.toml").write_text(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    assert read_hello(site.store())[1] == vector_blob(vectors, HELLO_LAYER)
    # a server line sends everything there: the registry's own host is never asked, the server hears ns
    (default / "hosts.toml").write_text(f'server = "http://{site.mirror.host}"\n')
    assert read_hello(site.store(cache_dir=str(site.tmp / "c1")))[1] == vector_blob(vectors, HELLO_LAYER)
    assert site.mirror.log.requests[-1][1].endswith(f"?{site.ns}")
    # a directory of the registry's own wins over _default; host_port_ is how containerd spells host:port too
    host, port = site.up.host.rsplit(":", 1)
    own = site.hosts / f"{host}_{port}_"
    own.mkdir()
    (own / "hosts.toml").write_text(f'[host."http://127.0.0.1:{free_port()}"]\n')
    with pytest.raises(NetworkError, match=r"every endpoint failed: mirror http://127.0.0.1:\d+: ConnectionError"):
        site.store(cache_dir=str(site.tmp / "c2")).resolve(parse_reference(f"{site.up.host}/library/hello:obd"))


def test_a_mirror_404_falls_through_and_range_reads_stick_to_who_served_the_blob(site, vectors, caplog):
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    store = site.store("only/upstream:v1")
    with caplog.at_level(logging.WARNING):
        manifest, layer = read_hello(store)
    assert layer == vector_blob(vectors, HELLO_LAYER)
    first, second, third = warnings(caplog)
    assert first == (f"mirror http://{site.mirror.host}: manifest {site.up.host}/only/upstream:v1: manifest unknown; "
                     f"served by http://{site.up.host}")
    assert second == (f"mirror http://{site.mirror.host}: manifest {site.up.host}/only/upstream@"
                      f"{HELLO_CONVERTED_MANIFEST}: not found; served by http://{site.up.host}")
    # the layer's blocks are fetched in parallel; whichever went first found the blob upstream
    assert re.fullmatch(rf"mirror http://{site.mirror.host}: blob {HELLO_LAYER} bytes \d+-\d+: not found; "
                        rf"served by http://{site.up.host}", third)
    # and the other blocks went straight there
    assert [(r[1], r[3]) for r in blob_gets(site.mirror, HELLO_LAYER)] == [
        (f"/v2/only/upstream/blobs/{HELLO_LAYER}?{site.ns}", 404)]
    assert sorted(r[2] for r in blob_gets(site.up, HELLO_LAYER)) == [
        f"bytes=0-{BLOCK - 1}", f"bytes={BLOCK}-{2 * BLOCK - 1}", f"bytes={2 * BLOCK}-642559"]
    store.close()


def test_a_mirror_dying_mid_blob_hands_the_rest_to_the_registry(site, vectors, caplog):
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    store = site.store()
    src = store.open_blob(HELLO_LAYER, 642560)
    expected = vector_blob(vectors, HELLO_LAYER)
    assert src.read(100, 4096) == expected[100:4196]
    site.mirror.add_fault("drop", "/blobs/", times=10**6)  # it closes every connection from now on
    with caplog.at_level(logging.WARNING):
        assert src.read(BLOCK + 5, 4096) == expected[BLOCK + 5 : BLOCK + 4101]
        assert src.read(2 * BLOCK, 4096) == expected[2 * BLOCK : 2 * BLOCK + 4096]
    (warning,) = warnings(caplog)
    assert warning.startswith(f"mirror http://{site.mirror.host}: blob {HELLO_LAYER} bytes {BLOCK}-{2 * BLOCK - 1}: "
                              "ConnectionError")
    assert [r[2] for r in blob_gets(site.up, HELLO_LAYER)] == [f"bytes={BLOCK}-{2 * BLOCK - 1}",
                                                              f"bytes={2 * BLOCK}-642559"]
    store.close()


def test_a_device_read_goes_round_the_endpoints_until_io_timeout(site, vectors, caplog):
    """A handler's read outlives a short outage of every endpoint, and fails once io.timeout is spent."""
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    site.stop_upstream()
    store = site.store(device_reads=True, io_timeout=5, retries=1)  # two rounds fit even on a loaded host
    src = store.open_blob(HELLO_LAYER, 642560)
    outage = site.mirror.add_fault("status:503", "/blobs/", "GET", times=4)  # two rounds of two attempts
    with caplog.at_level(logging.WARNING):
        assert src.read(0, 4096) == vector_blob(vectors, HELLO_LAYER)[:4096]
    assert outage.hits == 4
    stalls = [w for w in warnings(caplog) if "left of io.timeout" in w]
    assert len(stalls) == 2 and all(w.startswith(f"blob {HELLO_LAYER} bytes 0-{BLOCK - 1}: every endpoint failed: "
                                                 f"mirror http://{site.mirror.host}: HTTP 503") for w in stalls)
    site.mirror.add_fault("status:503", "/blobs/", "GET", times=10**6)
    t0 = time.monotonic()
    with pytest.raises(NetworkError) as e:
        src.read(BLOCK, 10)
    assert 4.9 < time.monotonic() - t0 < 30
    assert str(e.value).startswith(f"blob {HELLO_LAYER} bytes {BLOCK}-{2 * BLOCK - 1}: every endpoint failed: ")
    assert re.search(r"\(gave up after \d+ rounds in 5 s, io.timeout\)$", str(e.value))
    store.close()


def test_tags_resolve_only_on_trusted_endpoints_and_pushes_skip_pull_only_mirrors(site, vectors):
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull"]\n')
    store = site.store()
    manifest, layer = read_hello(store)
    assert layer == vector_blob(vectors, HELLO_LAYER)
    # the tag was resolved upstream; the content, named by digest, came from the mirror
    assert [(m, p) for m, p, _r, _s in site.up.log.requests] == [("HEAD", "/v2/library/hello/manifests/obd")]
    assert ("GET", f"/v2/library/hello/manifests/{HELLO_CONVERTED_MANIFEST}?{site.ns}") in [
        (m, p) for m, p, _r, _s in site.mirror.log.requests]
    assert len(blob_gets(site.mirror, HELLO_LAYER)) == 3
    store.close()

    data = b"pushed through the hosts.toml"
    push_blob(RegistryClient(site.up.host, site.opts()), "pushed", data, sha256_digest(data), len(data))
    assert [m for m, p, _r, _s in site.mirror.log.requests if "/pushed/" in p] == []
    assert [m for m, p, _r, _s in site.up.log.requests if "/pushed/" in p] == ["HEAD", "POST", "PUT"]
    # a mirror that may push gets the push
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "push"]\n')
    push_blob(RegistryClient(site.up.host, site.opts()), "pushed", data, sha256_digest(data), len(data))
    assert [m for m, p, _r, _s in site.mirror.log.requests if "/pushed/" in p] == ["HEAD", "POST", "PUT"]


def test_override_path_and_a_path_prefix(registries, site, vectors):
    raw = RewritingProxy(registries[1].host, strip="/api/registry", put="/v2")
    prefixed = RewritingProxy(registries[1].host, strip="/prefix", put="")
    site.proxies += [raw, prefixed]
    site.stop_upstream()
    for proxy, url in ((raw, f"http://{raw.host}/api/registry\"]\n  override_path = true"),
                       (prefixed, f"http://{prefixed.host}/prefix\"]")):
        site.hosts_toml(f'[host."{url}\n  capabilities = ["pull", "resolve"]\n')
        store = site.store(cache_dir=str(site.tmp / proxy.host))
        assert read_hello(store)[1] == vector_blob(vectors, HELLO_LAYER)
        store.close()
    assert raw.paths[0] == f"/api/registry/library/hello/manifests/obd?{site.ns}"
    assert prefixed.paths[0] == f"/prefix/v2/library/hello/manifests/obd?{site.ns}"


def test_a_mirror_reached_through_its_proxy(registries, site, vectors):
    forward = RewritingProxy(registries[1].host)  # whatever it is asked for, it fetches from the mirror registry
    site.proxies.append(forward)
    site.stop_upstream()
    site.hosts_toml('[host."http://mirror.invalid:5000"]\n  capabilities = ["pull", "resolve"]\n'
                    f'  proxy = "http://{forward.host}"\n')
    assert read_hello(site.store())[1] == vector_blob(vectors, HELLO_LAYER)
    # absolute-form requests: the name of the mirror only the proxy resolves
    assert forward.paths[0] == f"http://mirror.invalid:5000/v2/library/hello/manifests/obd?{site.ns}"
    assert len(forward.paths) == 5  # HEAD and GET of the manifest, three Range GETs of the layer


def test_mirror_tls_from_hosts_toml_and_one_error_naming_every_endpoint(site, vectors, test_ca, tmp_path):
    tls = RegistryServer(str(tmp_path / "tls"), ca=test_ca)
    try:
        _push_hello(tls.host, vectors, "library/hello", "obd", tls_ca_cert=test_ca.ca_cert)
        d = site.hosts_toml("")
        shutil.copy(test_ca.ca_cert, d / "mirror-ca.crt")
        site.stop_upstream()
        mirror = f'[host."https://{tls.host}"]\n  capabilities = ["pull", "resolve"]\n'
        site.hosts_toml(mirror + '  ca = "mirror-ca.crt"\n')
        assert read_hello(site.store())[1] == vector_blob(vectors, HELLO_LAYER)
        site.hosts_toml(mirror + "  skip_verify = true\n")
        assert read_hello(site.store(cache_dir=str(tmp_path / "c2")))[1] == vector_blob(vectors, HELLO_LAYER)

        site.hosts_toml(mirror)  # no CA: the mirror fails TLS, the registry is down
        with pytest.raises(NetworkError) as e:
            site.store(cache_dir=str(tmp_path / "c3")).resolve(parse_reference(f"{site.up.host}/library/hello:obd"))
        assert re.fullmatch(
            rf"manifest {site.up.host}/library/hello:obd: every endpoint failed: "
            rf"mirror https://{tls.host}: TLS error: certificate verify failed: [^;]*; "
            rf"registry http://{site.up.host}: ConnectionError: .*Connection refused \(gave up after 3 attempts\)",
            str(e.value))
        assert "\n" not in str(e.value) and e.value.exit_code == 5
    finally:
        tls.stop()


def test_a_mirror_that_wants_a_client_certificate_gets_the_pair_of_hosts_toml(site, vectors, test_ca, tmp_path):
    mtls = RegistryServer(str(tmp_path / "mtls"), ca=test_ca, client_certs=True)
    try:
        _push_hello(mtls.host, vectors, "library/hello", "obd", tls_ca_cert=test_ca.ca_cert,
                    client_cert=test_ca.client_cert, client_key=test_ca.client_key)
        d = site.hosts_toml("")
        for src, name in ((test_ca.ca_cert, "ca.pem"), (test_ca.client_cert, "me.cert"), (test_ca.client_key, "me.key")):
            shutil.copy(src, d / name)
        site.stop_upstream()
        mirror = f'[host."https://{mtls.host}"]\n  capabilities = ["pull", "resolve"]\n  ca = "ca.pem"\n'
        site.hosts_toml(mirror + '  client = [["me.cert", "me.key"]]\n')
        assert read_hello(site.store())[1] == vector_blob(vectors, HELLO_LAYER)
        site.hosts_toml(mirror)  # no client certificate: the mirror refuses the handshake
        with pytest.raises(NetworkError, match=rf"mirror https://{mtls.host}: (TLS error|ConnectionError)"):
            site.store(cache_dir=str(tmp_path / "c2")).resolve(parse_reference(f"{site.up.host}/library/hello:obd"))
    finally:
        mtls.stop()


def test_not_found_anywhere_and_corrupt_mirror_content(site, vectors, caplog):
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    store = site.store()
    ref = parse_reference(f"{site.up.host}/nothing/here:v1")
    with pytest.raises(NotFoundError) as e:
        store.resolve(ref)
    assert str(e.value) == (f"manifest {ref}: every endpoint failed: mirror http://{site.mirror.host}: "
                            f"manifest unknown; registry http://{site.up.host}: manifest unknown")
    assert e.value.exit_code == 3
    # a mirror is not trusted for content: bytes that miss their digest are fetched again upstream
    site.mirror.add_fault("corrupt", "/manifests/sha256:", "GET")
    desc = store.resolve(store.ref)
    with caplog.at_level(logging.WARNING):
        assert store.fetch_manifest(desc) == vector_blob(vectors, HELLO_CONVERTED_MANIFEST)
    (warning,) = warnings(caplog)
    assert warning.startswith(f"mirror http://{site.mirror.host}: manifest {site.up.host}/library/hello@"
                              f"{HELLO_CONVERTED_MANIFEST}: content does not match digest {HELLO_CONVERTED_MANIFEST}")
    store.close()


def test_a_mirror_uses_the_credentials_of_its_own_host(site, vectors, test_ca, tmp_path, caplog):
    basic = RegistryServer(str(tmp_path / "basic"), ca=test_ca, htpasswd_users=BASIC_USERS)
    try:
        user, pw = next(iter(BASIC_USERS.items()))
        _push_hello(basic.host, vectors, "library/hello", "obd", tls_ca_cert=test_ca.ca_cert, username=user,
                    password=pw)
        d = site.hosts_toml("")
        shutil.copy(test_ca.ca_cert, d / "ca.pem")
        site.hosts_toml(f'[host."https://{basic.host}"]\n  capabilities = ["pull", "resolve"]\n  ca = "ca.pem"\n')
        authfile = tmp_path / "auth.json"
        authfile.write_text(json.dumps({"auths": {basic.host: {"auth": base64.b64encode(f"{user}:{pw}".encode()).decode()}}}))
        # -u is for the registry itself (which needs none): the mirror logs in with the authfile's entry
        store = site.store(username="someone-else", password="not-for-the-mirror", authfile=str(authfile))
        with caplog.at_level(logging.WARNING):
            assert read_hello(store)[1] == vector_blob(vectors, HELLO_LAYER)
        assert warnings(caplog) == [] and site.up.log.requests == []
        # no credentials for the mirror: it refuses, the registry serves
        authfile.write_text("{}")
        store = site.store(authfile=str(authfile), cache_dir=str(tmp_path / "c2"))
        with caplog.at_level(logging.WARNING):
            assert read_hello(store)[1] == vector_blob(vectors, HELLO_LAYER)
        assert warnings(caplog)[0] == (
            f"mirror https://{basic.host}: manifest {site.up.host}/library/hello:obd: requires a login "
            f"(no credentials found; use -u or --authfile); served by http://{site.up.host}")
        with pytest.raises(AuthError):  # alone (no failover) the mirror's refusal is the error
            RegistryStore(parse_reference(f"{basic.host}/library/hello:obd"),
                          site.opts(authfile=str(authfile), tls_ca_cert=test_ca.ca_cert, plain_http=False)).resolve(
                parse_reference(f"{basic.host}/library/hello:obd"))
    finally:
        basic.stop()


def test_obd_inspect_and_cat_through_a_mirror(site, tmp_path, capfdbinary, monkeypatch):
    site.hosts_toml(f'[host."http://{site.mirror.host}"]\n  capabilities = ["pull", "resolve"]\n')
    site.stop_upstream()
    monkeypatch.setenv("OBD_HOSTS_DIR", str(site.hosts))
    ref = f"{site.up.host}/library/hello:obd"
    flags = ["--plain-http", "--cache-dir", str(tmp_path / "cache"), "-q"]
    rc = main(["inspect", "--json", ref, *flags])
    out, err = capfdbinary.readouterr()
    assert (rc, err) == (0, b"")
    assert json.loads(out)["manifest"]["digest"] == HELLO_CONVERTED_MANIFEST
    rc = main(["cat", ref, "/hello", *flags])
    out, err = capfdbinary.readouterr()
    assert (rc, err) == (0, b"")
    assert hashlib.sha256(out).hexdigest() == HELLO_SHA256
    assert site.mirror.log.blob_bytes > 0
    # the mirror goes down too: one line naming both
    site.mirror.stop()
    site.proxies.remove(site.mirror)
    monkeypatch.setenv("OBD_REGISTRY_RETRIES", "1")
    rc = main(["inspect", ref, "--plain-http", "--cache-dir", str(tmp_path / "other"), "-q"])
    out, err = capfdbinary.readouterr()
    assert (rc, out) == (5, b"")
    assert err.count(b"\n") == 1 and err.startswith(f"obd: manifest {ref}: every endpoint failed: mirror http://"
                                                   f"{site.mirror.host}: ConnectionError".encode())
    assert f"; registry http://{site.up.host}: ConnectionError".encode() in err
    assert err.endswith(b"(gave up after 2 attempts)\n")
