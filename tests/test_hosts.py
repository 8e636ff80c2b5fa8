"""hosts.toml and certs.d directories: which endpoints a registry has, in which order, with what."""

from __future__ import annotations

import logging

import pytest

from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.errors import UsageError
from tcmu_overlaybd.image.hosts import PULL, PUSH, RESOLVE, host_config
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.registry import RegistryClient, RegistryStore, push_endpoint


def write_hosts(root, namespace: str, text: str, files=()):
    d = root / namespace
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    for name in files:
        (d / name).write_text("-----BEGIN CERTIFICATE-----\n")
    return d


def urls(config):
    return [(e.scheme, e.host, e.path) for e in config.endpoints]


def test_mirrors_in_file_order_then_the_server(tmp_path):
    d = write_hosts(tmp_path, "registry.example:5000", """
server = "https://registry.example:5000"

[host."https://zeta.mirror"]
  capabilities = ["pull"]
[host."http://alpha.mirror:8080/prefix"]
  capabilities = ["pull", "resolve"]
[host."https://raw.mirror/api/registry"]
  capabilities = ["pull", "resolve"]
  override_path = true
[host."mirror-without-scheme:5001"]
""")
    config = host_config("registry.example:5000", [str(tmp_path)])
    assert config.source == str(d / "hosts.toml")
    assert urls(config) == [
        ("https", "zeta.mirror", "/v2"),
        ("http", "alpha.mirror:8080", "/prefix/v2"),
        ("https", "raw.mirror", "/api/registry"),
        ("https", "mirror-without-scheme:5001", "/v2"),
        ("https", "registry.example:5000", "/v2"),
    ]
    assert [e.mirror for e in config.endpoints] == [True, True, True, True, False]
    # a tag needs pull and resolve; a digest only pull; a push only hosts that may push
    assert [e.host for e in config.endpoints_for({PULL, RESOLVE})] == [
        "alpha.mirror:8080", "raw.mirror", "mirror-without-scheme:5001", "registry.example:5000"]
    assert len(config.endpoints_for({PULL})) == 5
    assert [e.host for e in config.endpoints_for({PUSH})] == ["mirror-without-scheme:5001", "registry.example:5000"]
    assert config.endpoints[2].api_url("/library/x/manifests/v1") == "https://raw.mirror/api/registry/library/x/manifests/v1"
    assert config.endpoints[1].label == "http://alpha.mirror:8080/prefix/v2"
    assert config.endpoints[0].label == "https://zeta.mirror"


def test_without_server_line_the_registry_itself_is_last(tmp_path):
    write_hosts(tmp_path, "docker.io", '[host."https://hub.mirror"]\n  capabilities = ["pull", "resolve"]\n')
    write_hosts(tmp_path, "127.0.0.1:5000", '[host."http://127.0.0.1:6000"]\n')
    assert urls(host_config("docker.io", [str(tmp_path)])) == [
        ("https", "hub.mirror", "/v2"), ("https", "registry-1.docker.io", "/v2")]
    # the API host of Docker Hub finds the docker.io directory too
    assert host_config("registry-1.docker.io", [str(tmp_path)]).endpoints[0].host == "hub.mirror"
    # --plain-http: the registry itself over http
    assert urls(host_config("127.0.0.1:5000", [str(tmp_path)], default_scheme="http"))[-1] == (
        "http", "127.0.0.1:5000", "/v2")


def test_namespace_directories_and_the_default(tmp_path):
    write_hosts(tmp_path, "reg.example_5000_", 'server = "https://underscored"\n')
    write_hosts(tmp_path, "reg.example:5000", 'server = "https://coloned"\n')
    write_hosts(tmp_path, "_default", '[host."https://everything.mirror"]\n')
    assert host_config("reg.example:5000", [str(tmp_path)]).server.host == "underscored"
    other = host_config("other.example", [str(tmp_path)])
    assert urls(other) == [("https", "everything.mirror", "/v2"), ("https", "other.example", "/v2")]
    # nothing configured anywhere: the registry alone, no source
    empty = host_config("other.example", [str(tmp_path / "none")])
    assert (urls(empty), empty.source) == ([("https", "other.example", "/v2")], None)


def test_certs_d_files_without_hosts_toml(tmp_path):
    d = tmp_path / "reg.example"
    d.mkdir()
    for name in ("ca.crt", "extra.crt", "client.cert", "client.key", "lonely.cert", "notes.txt"):
        (d / name).write_text("x")
    config = host_config("reg.example", [str(tmp_path)])
    (server,) = config.endpoints
    assert config.source == str(d)
    assert server.ca == (str(d / "ca.crt"), str(d / "extra.crt"))
    assert server.client == ((str(d / "client.cert"), str(d / "client.key")), (str(d / "lonely.cert"), None))


def test_tls_paths_relative_to_the_file_headers_and_timeouts(tmp_path):
    d = write_hosts(tmp_path, "reg.example", """
ca = ["upstream.crt", "/ABS/other.crt"]
skip_verify = false
dial_timeout = "1m30s"
[header]
  x-one = "1"

[host."https://m1"]
  ca = "m1.crt"
  client = [["m1.cert", "m1.key"], ["both.pem", ""]]
  skip_verify = true
  dial_timeout = "250ms"
  [host."https://m1".header]
    x-tenant = ["a", "b"]
    x-single = "s"
[host."https://m2"]
  client = ["both.pem"]
  proxy = "http://squid.internal:3128"
""".replace("/ABS", str(tmp_path / "abs")), files=("upstream.crt", "m1.crt", "m1.cert", "m1.key", "both.pem"))
    (tmp_path / "abs").mkdir()
    (tmp_path / "abs" / "other.crt").write_text("x")
    m1, m2, server = host_config("reg.example", [str(tmp_path)]).endpoints
    assert m1.ca == (str(d / "m1.crt"),)
    assert m1.client == ((str(d / "m1.cert"), str(d / "m1.key")), (str(d / "both.pem"), None))
    assert (m1.skip_verify, m1.dial_timeout) == (True, 0.25)
    assert m1.headers == (("x-tenant", "a, b"), ("x-single", "s"))
    assert m2.client == ((str(d / "both.pem"), None),) and m2.headers == () and m2.dial_timeout is None
    assert (m1.proxy, m2.proxy, server.proxy) == (None, "http://squid.internal:3128", None)
    assert server.ca == (str(d / "upstream.crt"), str(tmp_path / "abs" / "other.crt"))
    assert (server.skip_verify, server.dial_timeout, server.headers) == (False, 90.0, (("x-one", "1"),))


@pytest.mark.parametrize("text, problem", [
    ('server = "https://a"\n[host."https://m"\n', "invalid TOML: Expected ']' at the end of a table declaration (at line 2, column 18)"),
    ('[host."https://m"]\n  capabilities = ["pull", "fetch"]\n', '[host."https://m"]: unknown capability \'fetch\' (pull, resolve, push)'),
    ('[host."https://m"]\n  capabilities = "pull"\n', '[host."https://m"]: capabilities must be a list of strings'),
    ('[host."https://m"]\n  skip_verify = "yes"\n', "[host.\"https://m\"]: skip_verify must be true or false, not 'yes'"),
    ('[host."https://m"]\n  ca = "missing.crt"\n', '[host."https://m"]: ca file {dir}/missing.crt not found'),
    ('[host."https://m"]\n  client = [["a", "b", "c"]]\n', "[host.\"https://m\"]: client entry ['a', 'b', 'c'] is neither a path nor a [cert, key] pair"),
    ('[host."https://m"]\n  [host."https://m".header]\n    x = 1\n', "[host.\"https://m\"]: header 'x' must be a string or a list of strings"),
    ('[host."https://m"]\n  [host."https://m".header]\n    x = "a\\r\\nInjected: 1"\n', "[host.\"https://m\"]: header 'x': not a valid HTTP header name and one-line value"),
    ('[host."https://m"]\n  dial_timeout = "soon"\n', "[host.\"https://m\"]: dial_timeout 'soon' is not a positive duration like \"2s\" or \"500ms\""),
    ('[host."https://m"]\n  proxy = "socks5://p:1080"\n', "[host.\"https://m\"]: proxy 'socks5://p:1080': unsupported scheme (http or https)"),
    ('proxy = "http://p:3128/path"\n', "server: proxy 'http://p:3128/path' must be scheme://host[:port] with no path"),
    ('[host."ftp://m"]\n', "[host.\"ftp://m\"]: unsupported scheme 'ftp' (http or https)"),
    ('[host."https://m"]\n  [host."https://m".host."https://n"]\n', '[host."https://m"]: nested host tables are not supported'),
    ('server = 5\n', "server must be a URL string"),
    ('skip_verify = 1\n', "server: skip_verify must be true or false, not 1"),
    ('host = "https://m"\n', "'host' must be a table of [host.\"URL\"] tables"),
])
def test_a_malformed_hosts_toml_is_one_usage_error_naming_the_file(tmp_path, text, problem):
    d = write_hosts(tmp_path, "reg.example", text)
    with pytest.raises(UsageError) as e:
        host_config("reg.example", [str(tmp_path)])
    assert str(e.value) == f"{d}/hosts.toml: " + problem.replace("{dir}", str(d))
    assert e.value.exit_code == 2


def test_unknown_keys_are_warned_about_not_fatal(tmp_path, caplog):
    d = write_hosts(tmp_path, "reg.example", 'mirrors = ["https://m"]\n[host."https://m"]\n  capabilites = ["pull"]\n')
    with caplog.at_level(logging.WARNING):
        config = host_config("reg.example", [str(tmp_path)])
        assert host_config("reg.example", [str(tmp_path)]) == config  # said once per file content
    assert config.endpoints[0].capabilities == {PULL, RESOLVE, PUSH}  # the misspelt key did nothing
    assert [r.getMessage() for r in caplog.records] == [
        f"{d}/hosts.toml: ignoring unknown key 'mirrors'",
        f"{d}/hosts.toml: [host.\"https://m\"]: ignoring unknown key 'capabilites'"]


def test_pushes_go_to_the_first_endpoint_with_the_push_capability(tmp_path):
    write_hosts(tmp_path, "a.example", '[host."https://ro.mirror"]\n  capabilities = ["pull", "resolve"]\n'
                                       '[host."https://rw.mirror"]\n  capabilities = ["pull", "push"]\n')
    write_hosts(tmp_path, "b.example", '[host."https://ro.mirror"]\n  capabilities = ["pull", "resolve"]\n')
    write_hosts(tmp_path, "c.example", 'capabilities = ["pull"]\n')
    opts = OpenOptions(hosts_dir=str(tmp_path))
    assert push_endpoint("a.example", opts).host == "rw.mirror"
    assert push_endpoint("b.example", opts).host == "b.example"
    # RegistryClient(host, opts), as obd convert builds it, pushes there too
    assert RegistryClient("b.example", opts).url("/v2/r/blobs/uploads/") == "https://b.example/v2/r/blobs/uploads/"
    with pytest.raises(UsageError, match=r"c.example/hosts.toml: no endpoint of c.example has the push capability$"):
        push_endpoint("c.example", opts)


def test_an_operation_no_endpoint_may_do_is_a_usage_error(tmp_path):
    d = write_hosts(tmp_path, "a.example", 'capabilities = ["push"]\n[host."https://m"]\n  capabilities = ["pull"]\n')
    store = RegistryStore(parse_reference("a.example/r:tag"), OpenOptions(hosts_dir=str(tmp_path)))
    with pytest.raises(UsageError) as e:  # before any request: a tag needs an endpoint that may resolve
        store.resolve(store.ref)
    assert str(e.value) == f"{d}/hosts.toml: no endpoint of a.example has the pull and resolve capability"
    # edited, the file takes effect at the next store
    write_hosts(tmp_path, "a.example", '[host."https://m"]\n  capabilities = ["pull"]\n')
    endpoints = RegistryStore(parse_reference("a.example/r:tag"), OpenOptions(hosts_dir=str(tmp_path))).pool.order(
        {PULL, RESOLVE})
    assert endpoints == [1]


def test_credential_headers_of_hosts_toml_never_reach_a_log(tmp_path):
    from tcmu_overlaybd.logs import redact

    write_hosts(tmp_path, "reg.example", '[host."https://m"]\n  [host."https://m".header]\n'
                                         '    Authorization = "Bearer mirror-static-credential"\n'
                                         '    X-Api-Key = "k-0123456789"\n    X-Tenant = "blue"\n')
    endpoint = host_config("reg.example", [str(tmp_path)]).endpoints[0]
    RegistryClient("m", OpenOptions(), endpoint=endpoint)
    assert redact("sent mirror-static-credential and k-0123456789 for blue") == "sent *** and *** for blue"


def test_mirror_requests_name_the_registry_in_ns(tmp_path):
    write_hosts(tmp_path, "reg.example", '[host."https://m/base"]\n')
    config = host_config("reg.example", [str(tmp_path)])
    mirror = RegistryClient("m", OpenOptions(), endpoint=config.endpoints[0], ns="reg.example")
    assert mirror.url("/v2/r/referrers/sha256:ab?artifactType=x") == (
        "https://m/base/v2/r/referrers/sha256:ab?artifactType=x&ns=reg.example")
    assert mirror.url("https://elsewhere/upload?_state=1") == "https://elsewhere/upload?_state=1"


def test_obd_names_the_malformed_file_on_one_line(tmp_path, capfd, monkeypatch):
    d = write_hosts(tmp_path / "hosts", "127.0.0.1:9", '[host."http://m"]\n  capabilities = ["pull", 7]\n')
    monkeypatch.setenv("OBD_HOSTS_DIR", str(tmp_path / "hosts"))
    rc = main(["inspect", "127.0.0.1:9/x:y", "--plain-http", "--cache-dir", str(tmp_path / "c"), "-q"])
    out, err = capfd.readouterr()
    assert (rc, out) == (2, "")
    assert err == f'obd: {d}/hosts.toml: [host."http://m"]: capabilities must be a list of strings\n'
