"""The registry client against a real docker-registry: push, pull, laziness, failures."""

from __future__ import annotations

import hashlib
import json
import random

import pytest

from tcmu_overlaybd.cache.blockcache import BlockCache
from tcmu_overlaybd.errors import CorruptDataError, NetworkError, NotFoundError
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.push import blob_exists, push_blob, push_manifest, tag_manifest
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.registry import MT_DOCKER_LIST, MT_DOCKER_MANIFEST, RegistryClient, RegistryStore

from .helpers.registry import (  # noqa: F401 - fixtures
    HELLO_CONVERTED_MANIFEST,
    needs_registry,
    plain_registry,
    proxied_registry,
    push_hello_world,
    push_image,
    sha256_digest,
    vector_blob,
)

pytestmark = [needs_registry, pytest.mark.registry]


def options(tmp_path, **kw) -> OpenOptions:
    base = dict(plain_http=True, cache_dir=str(tmp_path / "cache"), cache_size=1 << 30, retries=2,
                connect_timeout=2.0, read_timeout=5.0, quiet=True, extra={"backoff_base": 0.01})
    base.update(kw)
    return OpenOptions(**base)


def store_for(host: str, name: str, opts: OpenOptions) -> RegistryStore:
    return RegistryStore(parse_reference(f"{host}/{name}"), opts)


def test_push_then_read_the_hello_world_overlaybd_image(plain_registry, tmp_path, vectors):
    opts = options(tmp_path)
    client = RegistryClient(plain_registry.host, opts)
    manifest = push_hello_world(client, vectors, "library/hello", "obd")
    layer = manifest["layers"][0]

    store = store_for(plain_registry.host, "library/hello:obd", opts)
    desc = store.resolve(store.ref)
    assert desc.digest == HELLO_CONVERTED_MANIFEST
    assert desc.media_type == "application/vnd.oci.image.manifest.v1+json" and desc.size == 641
    assert store.fetch_manifest(desc) == vector_blob(vectors, HELLO_CONVERTED_MANIFEST)
    config = manifest["config"]
    assert store.fetch_blob(config["digest"], config["size"]) == vector_blob(vectors, config["digest"])

    src = store.open_blob(layer["digest"], layer["size"])
    expected = vector_blob(vectors, layer["digest"])
    assert src.size == 642560
    assert src.read(0, 13) == b"overlaybd.pax"
    assert src.read(1536, 4096) == expected[1536:5632]  # the ZFile header
    assert src.read(642000, 4096) == expected[642000:]  # the tail, clamped
    # a blob opened without a size asks the registry (HEAD)
    assert store.open_blob(layer["digest"], -1).size == 642560
    # by digest too
    by_digest = store.resolve(parse_reference(f"{plain_registry.host}/library/hello@{HELLO_CONVERTED_MANIFEST}"))
    assert by_digest.digest == HELLO_CONVERTED_MANIFEST


def test_existing_blobs_are_not_uploaded_again(proxied_registry, tmp_path):
    _registry, proxy = proxied_registry
    client = RegistryClient(proxy.host, options(tmp_path))
    data = random.Random(1).randbytes(3000)
    assert push_blob(client, "r", data, sha256_digest(data), len(data)) is True
    proxy.reset_counters()
    assert push_blob(client, "r", data, sha256_digest(data), len(data)) is False
    assert [r[0] for r in proxy.log.requests] == ["HEAD"]
    assert blob_exists(client, "r", sha256_digest(data))
    assert not blob_exists(client, "r", sha256_digest(b"other"))


def test_chunked_upload_and_wrong_digest(plain_registry, tmp_path):
    opts = options(tmp_path)
    client = RegistryClient(plain_registry.host, opts)
    data = random.Random(2).randbytes(3 * 1024 * 1024 + 17)
    path = tmp_path / "blob"
    path.write_bytes(data)
    from tcmu_overlaybd.progress import progress_bar

    with progress_bar(len(data), "push", quiet=True) as bar:
        assert push_blob(client, "r", str(path), sha256_digest(data), len(data), progress=bar, chunk_size=1 << 20)
    assert bar.n == len(data)
    store = store_for(plain_registry.host, "r:x", opts)
    assert store.fetch_blob(sha256_digest(data)) == data
    with pytest.raises(CorruptDataError, match="content hashes to sha256:"):
        push_blob(client, "r", b"abc", sha256_digest(b"abd"), 3)


def test_docker_media_types_and_tags(plain_registry, tmp_path):
    opts = options(tmp_path)
    client = RegistryClient(plain_registry.host, opts)
    layer = b"layer-bytes"
    config = b'{"architecture":"arm64","os":"linux"}'
    for blob in (layer, config):
        push_blob(client, "d", blob, sha256_digest(blob), len(blob))
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MT_DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                   "digest": sha256_digest(config), "size": len(config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "digest": sha256_digest(layer), "size": len(layer)}]}).encode()
    mdigest = push_manifest(client, "d", "arm", manifest, MT_DOCKER_MANIFEST)
    mlist = json.dumps({"schemaVersion": 2, "mediaType": MT_DOCKER_LIST, "manifests": [
        {"mediaType": MT_DOCKER_MANIFEST, "digest": mdigest, "size": len(manifest),
         "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}}]}).encode()
    push_manifest(client, "d", "multi", mlist, MT_DOCKER_LIST)
    tag_manifest(client, "d", mdigest, "again")

    store = store_for(plain_registry.host, "d:multi", opts)
    desc = store.resolve(store.ref)
    assert desc.media_type == MT_DOCKER_LIST and desc.digest == sha256_digest(mlist)
    assert json.loads(store.fetch_manifest(desc))["manifests"][0]["platform"]["variant"] == "v8"
    again = store.resolve(parse_reference(f"{plain_registry.host}/d:again"))
    assert again.digest == mdigest and again.media_type == MT_DOCKER_MANIFEST


def test_missing_manifest_is_not_found(plain_registry, tmp_path):
    store = store_for(plain_registry.host, "nothing/here:v1", options(tmp_path))
    with pytest.raises(NotFoundError) as e:
        store.resolve(store.ref)
    assert str(e.value) == f"{plain_registry.host}/nothing/here:v1: manifest unknown to registry {plain_registry.host}"
    assert e.value.exit_code == 3


@pytest.mark.slow
def test_reading_4k_of_a_100mb_blob_moves_under_one_percent(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    opts = options(tmp_path)
    size = 100 * 1024 * 1024
    big = random.Random(3).randbytes(size)
    push_image(RegistryClient(registry.host, opts), "big", "v1", [big], chunk_size=32 << 20)
    proxy.reset_counters()

    store = store_for(proxy.host, "big:v1", opts)
    raw_manifest = store.fetch_manifest(store.resolve(store.ref))
    manifest = json.loads(raw_manifest)
    layer = manifest["layers"][0]
    src = store.open_blob(layer["digest"], layer["size"])
    for off in (0, 77 * 1024 * 1024 + 123, size - 4096):
        assert src.read(off, 4096) == big[off : off + 4096]
    assert proxy.log.blob_bytes < size // 100
    assert proxy.log.blob_bytes == 3 * 256 * 1024  # three cache blocks
    assert store.client.bytes_received == proxy.log.blob_bytes + len(raw_manifest)
    assert store.client.requests_sent == 5  # HEAD and GET of the manifest, three Range GETs


def _layer(proxy, registry, tmp_path, size=600 * 1024, **kw):
    """Push one random layer directly, return (data, blob source through the proxy, cache)."""
    opts = options(tmp_path, **kw)
    data = random.Random(size).randbytes(size)
    push_blob(RegistryClient(registry.host, opts), "f", data, sha256_digest(data), size)
    store = store_for(proxy.host, "f:x", opts)
    return data, store.open_blob(sha256_digest(data), size), store


def test_server_errors_are_retried(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, src, _store = _layer(proxy, registry, tmp_path)
    proxy.add_fault("status:503", "/blobs/", "GET", times=2)
    assert src.read(1000, 5000) == data[1000:6000]
    statuses = [r[3] for r in proxy.log.requests if r[0] == "GET"]
    assert statuses[-3:] == [503, 503, 206]


def test_persistent_500_gives_one_clear_error_and_caches_nothing(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, src, store = _layer(proxy, registry, tmp_path)
    proxy.add_fault("status:500", "/blobs/", "GET", times=100)
    digest = sha256_digest(data)
    with pytest.raises(NetworkError) as e:
        src.read(0, 4096)
    assert str(e.value) == (f"registry {proxy.host}: blob {digest} bytes 0-262143: "
                            "HTTP 500 Internal Server Error (gave up after 3 attempts)")
    assert store.cache.scan() == []


def test_truncated_response_is_retried_and_never_cached_short(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, src, store = _layer(proxy, registry, tmp_path)
    proxy.add_fault("truncate:1000", "/blobs/", "GET", times=1)
    assert src.read(300 * 1024, 4096) == data[300 * 1024 : 304 * 1024]
    proxy.add_fault("truncate:1000", "/blobs/", "GET", times=100)
    with pytest.raises(NetworkError, match=r"truncated response \(1000 of 262144 bytes\) \(gave up after 3 attempts\)"):
        src.read(0, 10)
    cache = BlockCache(store.cache.dir, 1 << 30)
    for e in cache.scan():
        with open(e.path, "rb") as f:
            assert f.read() == data[e.index * 262144 : (e.index + 1) * 262144]


def test_dropped_connection_and_429_are_retried(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, src, _store = _layer(proxy, registry, tmp_path)
    proxy.add_fault("drop", "/blobs/", "GET", times=1)
    proxy.add_fault("status:429", "/blobs/", "GET", times=1)
    assert src.read(0, 100) == data[:100]


def test_corrupt_blob_is_rejected_by_digest(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, _src, store = _layer(proxy, registry, tmp_path, size=5000)
    proxy.add_fault("corrupt", "/blobs/", "GET", times=1)
    digest = sha256_digest(data)
    with pytest.raises(CorruptDataError) as e:
        store.fetch_blob(digest, len(data))
    assert str(e.value).startswith(f"{proxy.host}/f@{digest}: content does not match digest {digest}")
    assert e.value.exit_code == 6
    assert store.fetch_blob(digest, len(data)) == data  # the next fetch is clean


def test_registry_stopped_mid_read(plain_registry, tmp_path):
    opts = options(tmp_path, retries=1)
    data = random.Random(4).randbytes(1024 * 1024)
    digest = sha256_digest(data)
    push_blob(RegistryClient(plain_registry.host, opts), "s", data, digest, len(data))
    store = store_for(plain_registry.host, "s:x", opts)
    src = store.open_blob(digest, len(data))
    assert src.read(0, 4096) == data[:4096]
    plain_registry.stop()
    assert src.read(10, 4096) == data[10:4106]  # cached block: no registry needed
    with pytest.raises(NetworkError) as e:
        src.read(512 * 1024, 4096)
    msg = str(e.value)
    assert msg.startswith(f"registry {plain_registry.host}: blob {digest} bytes 524288-786431: ConnectionError")
    assert "Connection refused" in msg and msg.endswith("(gave up after 2 attempts)")
    plain_registry.start()
    assert src.read(512 * 1024, 4096) == data[512 * 1024 : 516 * 1024]


def test_concurrent_readers_share_connections(proxied_registry, tmp_path):
    import threading

    registry, proxy = proxied_registry
    data, src, store = _layer(proxy, registry, tmp_path, size=4 * 1024 * 1024)
    bad = []

    def worker(seed):
        rng = random.Random(seed)
        for _ in range(20):
            off = rng.randrange(0, len(data))
            if src.read(off, 8192) != data[off : off + 8192]:
                bad.append(off)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []
    assert hashlib.sha256(src.read(0, len(data))).hexdigest() == sha256_digest(data)[7:]


def test_blob_redirects_to_storage_keep_the_range(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, src, _store = _layer(proxy, registry, tmp_path)
    proxy.redirect_blobs = True
    assert src.read(270 * 1024, 4096) == data[270 * 1024 : 274 * 1024]
    gets = [(p.split("/v2/")[0], r, s) for m, p, r, s in proxy.log.requests if m == "GET"]
    assert gets[-2:] == [("", "bytes=262144-524287", 307), ("/storage", "bytes=262144-524287", 206)]


def test_download_progress_only_on_a_terminal(proxied_registry, tmp_path, capfd):
    import fcntl
    import os
    import struct
    import sys
    import termios
    import threading
    import time

    from tcmu_overlaybd.progress import bars_visible, progress_bar

    registry, proxy = proxied_registry
    data, _src, store = _layer(proxy, registry, tmp_path, size=3 << 20, quiet=False)
    assert store.fetch_blob(sha256_digest(data), len(data)) == data
    assert capfd.readouterr().err == ""  # not a terminal: no bar

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a terminal has a size
    drawn = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # slave closed
                return
            if not chunk:
                return
            drawn.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    tty = os.fdopen(slave, "w")
    saved, sys.stderr = sys.stderr, tty
    try:
        assert bars_visible(False) and not bars_visible(True)
        assert store.fetch_blob(sha256_digest(data), len(data)) == data
        tty.flush()
        deadline = time.monotonic() + 5
        while b"3.00M" not in drawn and time.monotonic() < deadline:
            time.sleep(0.05)  # pty output reaches the master side asynchronously
    finally:
        sys.stderr = saved
        tty.close()
    reader.join(5)
    os.close(master)
    assert b"/3.00M [" in drawn  # a byte-counting bar on the terminal

    with progress_bar(10, "x", quiet=True) as bar:
        bar.update(4)
        assert bar.n == 4


def test_slow_registry_times_out_then_retries(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, src, _store = _layer(proxy, registry, tmp_path, read_timeout=0.5)
    proxy.add_fault("delay:1.5", "/blobs/", "GET", times=1)
    assert src.read(5, 10) == data[5:15]
    proxy.add_fault("delay:1.5", "/blobs/", "GET", times=3)
    with pytest.raises(NetworkError, match=r"bytes 262144-524287: ReadTimeout: Read timed out \(gave up after 3 attempts\)$"):
        src.read(300 * 1024, 10)


def test_reads_reuse_one_connection(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, src, store = _layer(proxy, registry, tmp_path, size=8 << 20)
    before = proxy.httpd.connections
    for i in range(20):
        off = i * 400 * 1024
        assert src.read(off, 100) == data[off : off + 100]
        assert store.client.head_manifest("f", f"absent{i}") is None  # a 404 must not cost the connection
    assert store.client.requests_sent == 40
    assert proxy.httpd.connections - before <= 1


def test_registry_without_manifest_head_falls_back_to_get(proxied_registry, tmp_path, vectors):
    registry, proxy = proxied_registry
    push_hello_world(RegistryClient(registry.host, options(tmp_path)), vectors, "h", "obd")
    proxy.add_fault("status:405", "/manifests/", "HEAD", times=10)
    store = store_for(proxy.host, "h:obd", options(tmp_path))
    desc = store.resolve(store.ref)
    assert (desc.digest, desc.size) == (HELLO_CONVERTED_MANIFEST, 641)
    assert desc.media_type == "application/vnd.oci.image.manifest.v1+json"


def test_server_ignoring_range_still_gives_the_right_bytes(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, src, _store = _layer(proxy, registry, tmp_path)
    proxy.add_fault("strip-range", "/blobs/", "GET")
    assert src.read(300 * 1024 + 7, 1000) == data[300 * 1024 + 7 : 300 * 1024 + 1007]
    assert proxy.log.requests[-1][3] == 200


def test_download_blob_to_a_file_is_verified_before_it_appears(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    data, _src, store = _layer(proxy, registry, tmp_path, size=3 << 20)
    digest = sha256_digest(data)
    dest = tmp_path / "layer.tar"
    proxy.add_fault("truncate:5000", "/blobs/", "GET")
    assert store.download_blob(digest, len(data), dest) == len(data)
    assert dest.read_bytes() == data
    bad = tmp_path / "bad.tar"
    proxy.add_fault("corrupt", "/blobs/", "GET")
    with pytest.raises(CorruptDataError, match=f"{proxy.host}/f@{digest}: content does not match digest"):
        store.download_blob(digest, len(data), bad)
    assert not bad.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("bad")) == []


def test_device_reads_retry_until_io_timeout_then_fail(proxied_registry, tmp_path, caplog):
    """A handler's read waits out an outage up to io.timeout (not retries), warning with the blob."""
    import logging
    import time

    from tcmu_overlaybd.errors import NetworkError

    registry, proxy = proxied_registry
    data, src, _store = _layer(proxy, registry, tmp_path, device_reads=True, io_timeout=2.0, retries=1)
    outage = proxy.add_fault("status:503", "/blobs/", "GET", times=10**6)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING), pytest.raises(NetworkError, match="io.timeout"):
        src.read(0, 4096)
    waited = time.monotonic() - t0
    assert 1.8 <= waited < 10 and outage.hits > 2  # more attempts than retries=1 allows
    assert any("left of io.timeout" in r.getMessage() and "bytes 0-" in r.getMessage() for r in caplog.records)
    outage.times = 0
    assert src.read(0, 4096) == data[:4096]
