"""obd mount of real overlaybd images: the upstream hello-world vector from an OCI layout and
from a registry running inside the guest."""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import tarfile

import pytest

from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.registry import RegistryClient

from ..helpers.layouts import layout_from_flat
from ..helpers.registry import RegistryServer, needs_registry, push_hello_world
from ..conftest import ROOT
from .conftest import kernel_leftovers, obd, obd_json_list

pytestmark = pytest.mark.kernel

ORIGINAL_LAYER = "sha256_719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6"


@pytest.fixture(scope="module")
def hello_bytes(vectors) -> bytes:
    """/hello as the original docker layer (gzip tar) holds it."""
    raw = gzip.decompress((vectors / "aci-hello-world" / ORIGINAL_LAYER).read_bytes())
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        return tf.extractfile("hello").read()


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OBD_GZIP_CACHE_DIR", str(tmp_path / "gzcache"))


def obd_cat(ref: str, path: str, *extra: str) -> bytes:
    r = subprocess.run([str(ROOT / ".venv/bin/obd"), "cat", *extra, ref, path], capture_output=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def check_hello_rootfs(mnt, hello: bytes) -> None:
    assert (mnt / "hello").read_bytes() == hello
    r = subprocess.run(["chroot", str(mnt), "/hello"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "Hello from Docker!" in r.stdout
    (mnt / "written-by-test").write_text("upper only\n")
    assert (mnt / "written-by-test").read_text() == "upper only\n"


def test_hello_world_from_oci_layout(vectors, tmp_path, hello_bytes):
    layout = layout_from_flat(vectors / "aci-hello-world", tmp_path / "hello")
    ref = f"oci:{layout}:amd64-converted"
    before = kernel_leftovers()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rc, out = obd("mount", ref, str(mnt))
    assert rc == 0 and out.strip() == str(mnt)
    try:
        assert (mnt / "hello").read_bytes() == obd_cat(ref, "/hello")
        check_hello_rootfs(mnt, hello_bytes)
        [m] = obd_json_list()
        assert m["image"] == ref and os.path.exists(os.path.join(m["upper"], "written-by-test"))
    finally:
        assert obd("umount", str(mnt))[0] == 0
    assert kernel_leftovers() == before
    # the layout is untouched by the write
    assert not any("written-by-test" in f for _, _, fs in os.walk(layout) for f in fs)


@needs_registry
def test_hello_world_from_registry_in_guest(vectors, tmp_path, hello_bytes):
    reg = RegistryServer(str(tmp_path / "registry"))
    try:
        opts = OpenOptions(plain_http=True)
        push_hello_world(RegistryClient(reg.host, opts), vectors, "library/hello", "converted")
        ref = f"{reg.host}/library/hello:converted"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        assert obd("mount", "--plain-http", ref, str(mnt))[0] == 0
        try:
            check_hello_rootfs(mnt, hello_bytes)
            assert (mnt / "hello").read_bytes() == obd_cat(ref, "/hello", "--plain-http")
        finally:
            assert obd("umount", str(mnt))[0] == 0
    finally:
        reg.stop()


@needs_registry
def test_credentials_reach_the_handler_but_no_file_or_process_title(vectors, tmp_path, hello_bytes):
    """obd mount -u over TLS + basic auth: the handler reads, and the password is nowhere on disk,
    in no command line or environment of obd's processes, and in no log."""
    from ..helpers.registry import BASIC_USERS, SelfSignedCA

    ca = SelfSignedCA(str(tmp_path / "ca")).make()
    reg = RegistryServer(str(tmp_path / "registry"), ca=ca, htpasswd_users=BASIC_USERS)
    (user, password), = BASIC_USERS.items()
    try:
        opts = OpenOptions(tls_ca_cert=ca.ca_cert, username=user, password=password)
        push_hello_world(RegistryClient(reg.host, opts), vectors, "private/hello", "v1")
        ref = f"{reg.host}/private/hello:v1"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        rc, out = obd("mount", "--tlscacert", ca.ca_cert, "-u", f"{user}:{password}", ref, str(mnt))
        assert rc == 0, out
        try:
            check_hello_rootfs(mnt, hello_bytes)
            [m] = obd_json_list()
            secret = password.encode()
            for root in ("/run/obd", os.path.dirname(m["upper"])):
                for d, _, files in os.walk(root):
                    for f in files:
                        if not os.path.isfile(os.path.join(d, f)):
                            continue  # the handler's stats socket
                        with open(os.path.join(d, f), "rb") as fh:
                            assert secret not in fh.read(), os.path.join(d, f)
            for pid in (m["supervisor_pid"], m["handler_pid"]):
                for what in ("cmdline", "environ"):
                    with open(f"/proc/{pid}/{what}", "rb") as fh:
                        assert secret not in fh.read()
        finally:
            assert obd("umount", str(mnt))[0] == 0
    finally:
        reg.stop()
