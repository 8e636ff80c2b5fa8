"""obd inspect / ls / cat / export on images in a real registry, fetching only what they read."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import pathlib
import random
import subprocess

import pytest

from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.format.lsmt import SealedLayerBuilder
from tcmu_overlaybd.format.tarwrap import wrap
from tcmu_overlaybd.format.zfile import ZFileWriter
from tcmu_overlaybd.image.discovery import ARTIFACT_NATIVE
from tcmu_overlaybd.image.manifest import ANN_BLOB_DIGEST, ANN_BLOB_SIZE, ANN_VERSION
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.push import push_blob, push_manifest
from tcmu_overlaybd.image.registry import RegistryClient

from .helpers.registry import (  # noqa: F401 - fixtures
    BASIC_USERS,
    HELLO_CONVERTED_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    basic_registry,
    needs_registry,
    plain_registry,
    proxied_registry,
    push_hello_world,
    sha256_digest,
    test_ca,
    vector_blob,
)

pytestmark = [needs_registry, pytest.mark.registry]

HELLO_SHA256 = "d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014"
HELLO_BLOB = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
HELLO_ORIGINAL_MANIFEST = "sha256:7e9b6e7ba2842c91cf49f3e214d04a7a496f8214356f41d81a6e6dcad11f11e3"


def obd(capfdbinary, *args):
    rc = main(list(args))
    out, err = capfdbinary.readouterr()
    return rc, out, err.decode()


def flags(tmp_path):
    return ["--plain-http", "--cache-dir", str(tmp_path / "cache"), "-q"]


@pytest.fixture
def hello_registry(proxied_registry, vectors, tmp_path):
    """The converted hello-world pushed as ``library/hello:obd``; yields (registry, proxy)."""
    registry, proxy = proxied_registry
    push_hello_world(RegistryClient(registry.host, OpenOptions(plain_http=True)), vectors, "library/hello", "obd")
    return registry, proxy


def test_cat_and_ls_read_from_the_registry(hello_registry, tmp_path, capfdbinary):
    _registry, proxy = hello_registry
    rc, out, err = obd(capfdbinary, "cat", f"{proxy.host}/library/hello:obd", "/hello", *flags(tmp_path))
    assert (rc, err) == (0, "")
    assert hashlib.sha256(out).hexdigest() == HELLO_SHA256
    fetched = proxy.log.blob_bytes
    assert 0 < fetched <= 642560 + 584  # never more than the layer and the config
    rc, out, err = obd(capfdbinary, "ls", f"{proxy.host}/library/hello:obd", "/", *flags(tmp_path))
    assert rc == 0 and b"hello\n" in out.splitlines(keepends=True)
    assert proxy.log.blob_bytes - fetched <= 584 + 4096  # the second command reads the block cache
    rc, out, _ = obd(capfdbinary, "cache", "ls", "--json", "--cache-dir", str(tmp_path / "cache"))
    cached = {b["digest"]: b["bytes"] for b in json.loads(out)["blobs"]}
    assert rc == 0 and 0 < cached[HELLO_BLOB] <= 642560


def test_inspect_json(hello_registry, tmp_path, capfdbinary):
    _registry, proxy = hello_registry
    rc, out, _ = obd(capfdbinary, "inspect", "--json", f"{proxy.host}/library/hello:obd", *flags(tmp_path))
    assert rc == 0
    doc = json.loads(out)
    assert doc["mode"] == "overlaybd"
    assert doc["manifest"]["digest"] == HELLO_CONVERTED_MANIFEST


def test_export_matches_the_local_layout(hello_registry, vectors, tmp_path, capfdbinary):
    from .helpers.layouts import layout_from_flat

    _registry, proxy = hello_registry
    layout = layout_from_flat(vectors / "aci-hello-world", tmp_path / "layout")
    remote, local = tmp_path / "remote.img", tmp_path / "local.img"
    assert obd(capfdbinary, "export", f"{proxy.host}/library/hello:obd", str(remote), *flags(tmp_path))[0] == 0
    assert obd(capfdbinary, "export", f"oci:{layout}:amd64-converted", str(local), "-q")[0] == 0
    assert remote.stat().st_size == local.stat().st_size == 64 << 30
    extents = _data_extents(remote)
    assert extents and extents == _data_extents(local)


def _data_extents(path) -> list[tuple[int, str]]:
    """(offset, sha256) of every data extent of a sparse file (SEEK_DATA/SEEK_HOLE)."""
    out = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            stop = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, hashlib.sha256(os.pread(fd, stop - start, start)).hexdigest()))
            pos = stop
    return out


def test_plain_image_is_swapped_for_its_accelerated_referrer(plain_registry, vectors, tmp_path, capfdbinary):
    """The original hello-world plus a converted copy whose subject is it (tag-schema fallback)."""
    client = RegistryClient(plain_registry.host, OpenOptions(plain_http=True))
    original = json.loads(vector_blob(vectors, HELLO_ORIGINAL_MANIFEST))
    for desc in [original["config"], *original["layers"]]:
        push_blob(client, "hw", vector_blob(vectors, desc["digest"]), desc["digest"], desc["size"])
    push_manifest(client, "hw", "latest", vector_blob(vectors, HELLO_ORIGINAL_MANIFEST), original["mediaType"])
    push_hello_world(client, vectors, "hw", "obd-plain-copy")
    converted = json.loads(vector_blob(vectors, HELLO_CONVERTED_MANIFEST))
    converted["artifactType"] = ARTIFACT_NATIVE
    converted["subject"] = {"mediaType": original["mediaType"], "digest": HELLO_ORIGINAL_MANIFEST, "size": 525}
    push_manifest(client, "hw", "latest_obd", json.dumps(converted).encode(), OCI_MANIFEST)

    rc, out, err = obd(capfdbinary, "cat", f"{plain_registry.host}/hw:latest", "/hello", *flags(tmp_path))
    assert (rc, err) == (0, "")
    assert hashlib.sha256(out).hexdigest() == HELLO_SHA256


def test_errors_are_one_line(basic_registry, plain_registry, test_ca, tmp_path, capfdbinary):
    rc, out, err = obd(capfdbinary, "inspect", f"{plain_registry.host}/nothing:v1", *flags(tmp_path))
    assert rc == 3 and out == b""
    assert err == f"obd: {plain_registry.host}/nothing:v1: manifest unknown to registry {plain_registry.host}\n"
    rc, _, err = obd(capfdbinary, "inspect", f"{basic_registry.host}/x:v1", "--tlscacert", test_ca.ca_cert,
                     "-u", "alice:not-her-password", "--cache-dir", str(tmp_path / "c"))
    assert rc == 4
    assert err == f"obd: registry {basic_registry.host} refused the credentials of user 'alice'\n"
    rc, _, err = obd(capfdbinary, "inspect", f"{basic_registry.host}/x:v1", "--cache-dir", str(tmp_path / "c"))
    assert rc == 5 and err.startswith("obd: registry 127.0.0.1:") and "certificate verify failed" in err
    assert err.count("\n") == 1


# ---- a 100 MB image: one small file moves a few blocks, not the layer -------------------
def _native_layer(tmp_path) -> pathlib.Path:
    """An ext4 with a 100 MiB random file and a small one, as a native overlaybd layer blob."""
    src = tmp_path / "tree"
    src.mkdir()
    (src / "big.bin").write_bytes(random.Random(5).randbytes(100 << 20))
    (src / "etc").mkdir()
    (src / "etc" / "motd").write_bytes(b"lazy images move only the bytes they read\n")
    img = tmp_path / "fs.img"
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", str(src), str(img), "160M"],
                   check=True, capture_output=True)
    size = img.stat().st_size
    builder = SealedLayerBuilder(size)
    lsmt = io.BytesIO()
    builder.bind(lsmt)
    chunk = 1 << 20
    with open(img, "rb") as f:
        for off in range(0, size, chunk):
            data = f.read(chunk)
            if data.count(0) != len(data):
                builder.add_data(off, data)
    builder.finish()
    zf = io.BytesIO()
    w = ZFileWriter(zf)
    w.write(lsmt.getvalue())
    w.close()
    blob = tmp_path / "layer.tar"
    with open(blob, "wb") as out:
        wrap(io.BytesIO(zf.getvalue()), out, len(zf.getvalue()))
    return blob




@pytest.mark.slow
def test_cat_of_a_small_file_from_a_100mb_image_moves_under_one_percent(proxied_registry, tmp_path, capfdbinary):
    registry, proxy = proxied_registry
    blob = _native_layer(tmp_path)
    data = blob.read_bytes()
    digest, size = sha256_digest(data), len(data)
    assert size > 100 << 20
    client = RegistryClient(registry.host, OpenOptions(plain_http=True))
    push_blob(client, "big", str(blob), digest, size)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    push_blob(client, "big", config, sha256_digest(config), len(config))
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": sha256_digest(config), "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER_TAR, "digest": digest, "size": size, "annotations": {
                    ANN_BLOB_DIGEST: digest, ANN_BLOB_SIZE: str(size), ANN_VERSION: "0.1.0"}}]}
    push_manifest(client, "big", "obd", json.dumps(manifest).encode(), OCI_MANIFEST)
    proxy.reset_counters()

    rc, out, err = obd(capfdbinary, "cat", f"{proxy.host}/big:obd", "/etc/motd", *flags(tmp_path))
    assert (rc, err) == (0, "")
    assert out == b"lazy images move only the bytes they read\n"
    moved = proxy.log.blob_bytes
    assert moved < size // 100, f"{moved} bytes of {size} moved"
    print(f"cat of a 43-byte file from a {size}-byte layer moved {moved} bytes")


def test_cat_from_a_tls_registry_with_a_login(basic_registry, test_ca, vectors, tmp_path, capfdbinary):
    password = BASIC_USERS["alice"]
    client = RegistryClient(basic_registry.host, OpenOptions(tls_ca_cert=test_ca.ca_cert, username="alice",
                                                             password=password))
    push_hello_world(client, vectors, "private/hello", "obd")
    ref = f"{basic_registry.host}/private/hello:obd"
    common = ["--tlscacert", test_ca.ca_cert, "--cache-dir", str(tmp_path / "cache"), "-q"]
    rc, out, err = obd(capfdbinary, "cat", ref, "/hello", "-u", f"alice:{password}", *common)
    assert (rc, err) == (0, "")
    assert hashlib.sha256(out).hexdigest() == HELLO_SHA256
    authfile = tmp_path / "auth.json"
    token = base64.b64encode(f"alice:{password}".encode()).decode()
    authfile.write_text(json.dumps({"auths": {basic_registry.host: {"auth": token}}}))
    rc, out, err = obd(capfdbinary, "ls", ref, "/", "--authfile", str(authfile), *common)
    assert (rc, err) == (0, "") and b"hello" in out


def test_platform_is_picked_from_a_remote_index(plain_registry, vectors, tmp_path, capfdbinary):
    client = RegistryClient(plain_registry.host, OpenOptions(plain_http=True))
    push_hello_world(client, vectors, "multi", "amd64-only")
    other = b'{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":' \
            b'{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"' + \
            sha256_digest(b"{}").encode() + b'","size":2},"layers":[]}'
    push_blob(client, "multi", b"{}", sha256_digest(b"{}"), 2)
    other_digest = push_manifest(client, "multi", "arm", other, OCI_MANIFEST)
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": other_digest, "size": len(other),
         "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
        {"mediaType": OCI_MANIFEST, "digest": HELLO_CONVERTED_MANIFEST, "size": 641,
         "platform": {"os": "linux", "architecture": "amd64"}}]}
    push_manifest(client, "multi", "latest", json.dumps(index).encode(), "application/vnd.oci.image.index.v1+json")
    ref = f"{plain_registry.host}/multi:latest"
    rc, out, err = obd(capfdbinary, "cat", ref, "/hello", "--platform", "linux/amd64", *flags(tmp_path))
    assert (rc, err) == (0, "")
    assert hashlib.sha256(out).hexdigest() == HELLO_SHA256
    rc, out, _ = obd(capfdbinary, "inspect", "--json", ref, "--platform", "linux/arm64/v8", *flags(tmp_path))
    assert rc == 0 and json.loads(out)["manifest"]["digest"] == other_digest
