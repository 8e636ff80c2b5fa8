"""obd inspect / export / ls / cat on real overlaybd images in OCI layouts (golden vectors)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.errors import UsageError
from tcmu_overlaybd.ext4.fs import Ext4
from tcmu_overlaybd.image.disk import open_disk
from tcmu_overlaybd.image.manifest import (
    ANN_ACCELERATION, ANN_BLOB_DIGEST, ANN_BLOB_SIZE, ANN_VERSION, OCI_LAYER_TAR,
)
from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image

from .helpers.layouts import add_blob, add_manifest, layout_from_flat, native_layout, turbo_layout

HELLO_SHA256 = "d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014"
HELLO_LAYER = "sha256_719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6"
HELLO_BLOB = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
GIB64 = 64 << 30


def run(capfdbinary, *args) -> tuple[int, bytes, str]:
    """Run the CLI in-process; return (exit code, stdout bytes, stderr text)."""
    rc = main(list(args))
    out, err = capfdbinary.readouterr()
    return rc, out, err.decode()


@pytest.fixture(scope="module")
def hello(vectors, tmp_path_factory) -> str:
    path = layout_from_flat(vectors / "aci-hello-world", tmp_path_factory.mktemp("hw") / "layout")
    return str(path)


@pytest.fixture(scope="module")
def small_turbo(vectors, tmp_path_factory) -> str:
    turbo = vectors / "upstream-small" / "turbooci"
    return str(turbo_layout(tmp_path_factory.mktemp("turbo") / "layout", vectors / "upstream-small" / "original",
                            [turbo / "layer0" / "turboOCIv1.tar.gz", turbo / "layer1" / "turboOCIv1.tar.gz"],
                            "small", "small_turbo"))


@pytest.fixture(scope="module")
def small(vectors, tmp_path_factory) -> str:
    base = vectors / "upstream-small" / "overlaybd"
    path = native_layout(tmp_path_factory.mktemp("small") / "layout",
                         [base / "layer0.commit", base / "layer1.commit"], "small_obd")
    return str(path)


def _hello_from_gzip_layer(vectors) -> bytes:
    with tarfile.open(fileobj=io.BytesIO((vectors / "aci-hello-world" / HELLO_LAYER).read_bytes())) as tar:
        return tar.extractfile("hello").read()


def test_cat_hello_matches_the_original_layer(hello, vectors, capfdbinary):
    rc, out, err = run(capfdbinary, "cat", f"oci:{hello}:amd64-converted", "/hello")
    assert (rc, err) == (0, "")
    assert len(out) == 13256
    assert hashlib.sha256(out).hexdigest() == HELLO_SHA256
    assert out == _hello_from_gzip_layer(vectors)


def test_inspect_json(hello, capfdbinary):
    rc, out, err = run(capfdbinary, "inspect", "--json", f"oci:{hello}:amd64-converted")
    assert rc == 0, err
    info = json.loads(out)
    assert info["mode"] == "overlaybd"
    assert info["platform"] == "linux/amd64"
    assert info["virtual_size"] == GIB64
    assert info["manifest"]["digest"] == "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"
    assert info["layers"] == [{"kind": "overlaybd", "mediaType": "application/vnd.oci.image.layer.v1.tar",
                               "digest": HELLO_BLOB, "size": 642560, "vsize": GIB64,
                               "uuid": "01BB4FCE-3EB1-B56B-05AD-F99504DAFD31"}]
    rc, out, _ = run(capfdbinary, "inspect", "--json", f"oci:{hello}:amd64")
    info = json.loads(out)
    assert (info["mode"], info["virtual_size"], info["layers"][0]["kind"]) == ("oci", None, "oci-gzip")


def test_inspect_text(hello, capfdbinary):
    rc, out, _ = run(capfdbinary, "inspect", f"oci:{hello}:amd64-converted")
    text = out.decode()
    assert rc == 0
    assert "mode:     overlaybd" in text
    assert "disk:     68719476736 bytes (64.0 GiB)" in text
    assert f"overlaybd    {HELLO_BLOB}" in text


def test_ls(hello, capfdbinary):
    ref = f"oci:{hello}:amd64-converted"
    rc, out, _ = run(capfdbinary, "ls", ref)
    assert (rc, out.decode().split()) == (0, ["hello", "lost+found"])
    rc, out, _ = run(capfdbinary, "ls", "-l", ref, "/")
    first = out.decode().splitlines()[0]
    assert first.startswith("-rwxrwxr-x   1     0     0      13256 ") and first.endswith(" hello")
    rc, out, _ = run(capfdbinary, "ls", "--json", ref, "/hello")
    [entry] = json.loads(out)
    assert {k: entry[k] for k in ("name", "type", "mode", "size")} == \
        {"name": "/hello", "type": "-", "mode": "0775", "size": 13256}


def test_export_is_sparse_and_fsck_clean(hello, tmp_path, capfdbinary):
    out = tmp_path / "hello.img"
    rc, _, err = run(capfdbinary, "export", "-q", f"oci:{hello}:amd64-converted", str(out))
    assert (rc, err) == (0, "")
    assert not (tmp_path / "hello.img.partial").exists()
    st = out.stat()
    assert st.st_size == GIB64
    assert st.st_blocks * 512 < 80 << 20  # ~70 MB of data in a 64 GiB file
    with open(out, "rb") as f:
        f.seek(6356992)
        assert hashlib.sha256(f.read(13256)).hexdigest() == HELLO_SHA256
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True)
    # The photon-made hello-world disk is NOT fully clean: like the upstream-small disks it has the
    # upstream mkfs artefact of an unreferenced HTREE block in /lost+found, and nothing else.
    problems = [line for line in fsck.stdout.splitlines()
                if line.strip() and not line.startswith(("Pass ", str(out)))]
    assert problems == ["Problem in HTREE directory inode 11: block #2 not referenced",
                        "Invalid HTREE directory inode 11 (/lost+found).  Clear HTree index? no"], fsck.stdout
    assert fsck.returncode == 4


def _tree_lines(fs: Ext4) -> list[str]:
    """The ``tree.txt`` format of upstream-small: ``type ./path [size sha256]`` / ``link ./p -> t``."""
    lines = []

    def walk(ino, prefix):
        for e in sorted(fs.listdir(ino), key=lambda e: e.raw_name):
            child = fs.inode(e.ino)
            path = f"{prefix}/{e.name}"
            if child.is_dir:
                lines.append(f"dir  {path}")
                walk(child, path)
            elif child.is_symlink:
                lines.append(f"link {path} -> {fs.readlink(child)}")
            else:
                data = fs.read(child)
                lines.append(f"file {path} {len(data)} {hashlib.sha256(data).hexdigest()}")

    walk(fs.root, ".")
    return lines


def test_upstream_small_native_stack_matches_tree(small, vectors):
    image = open_image(f"oci:{small}:small_obd", OpenOptions())
    assert [layer.kind for layer in image.layers] == ["overlaybd", "overlaybd"]
    disk = open_disk(image, OpenOptions())
    try:
        ours = _tree_lines(Ext4(disk))
    finally:
        disk.close()
    expected = (vectors / "upstream-small" / "tree.txt").read_text().splitlines()
    assert sorted(ours) == sorted(expected)


def test_upstream_small_turbooci_stack_matches_tree(small_turbo, vectors):
    """Meta layers (turboOCIv1.tar.gz) over the unmodified gzip layers of the original layout."""
    opts = OpenOptions(gzip_cache_enable=False)
    image = open_image(f"oci:{small_turbo}:small_turbo", opts)
    assert image.mode == "fastoci"
    disk = open_disk(image, opts)
    try:
        ours = _tree_lines(Ext4(disk))
    finally:
        disk.close()
    expected = (vectors / "upstream-small" / "tree.txt").read_text().splitlines()
    assert sorted(ours) == sorted(expected)


def test_turbooci_through_the_cli_with_gzip_cache(small_turbo, vectors, tmp_path, monkeypatch, capfdbinary):
    monkeypatch.setenv("OBD_GZIP_CACHE_DIR", str(tmp_path / "gz"))
    ref = f"oci:{small_turbo}:small_turbo"
    rc, out, err = run(capfdbinary, "inspect", "--json", ref)
    assert rc == 0, err
    info = json.loads(out)
    assert info["mode"] == "fastoci" and info["virtual_size"] == GIB64
    assert [layer["target"]["digest"] for layer in info["layers"]] == [
        "sha256:571e1a65fc028b27eef187aacb31f98c45aaec82a8f24b0e9bce1f658d7d94c1",
        "sha256:ed5169527c7317edecd662ed75cada0b65adc02a4431825bccc713dcb0dd6c07"]
    rc, out, err = run(capfdbinary, "cat", ref, "/etc/motd.link")
    assert (rc, hashlib.sha256(out).hexdigest()) == (
        0, "57e4f8eceba7601188ab4c6dc19b211eae89b70b8c883056ca07241fac20552c"), err
    assert os.listdir(tmp_path / "gz")  # decompressed gzip data went through the cache


def test_acceleration_layer_is_listed_but_not_stacked(hello, tmp_path, capfdbinary):
    """``ctr record-trace`` appends a tar holding ``trace`` (spec §7.2); it carries no disk data."""
    layout = native_layout(tmp_path / "layout", [pathlib.Path(hello) / "blobs" / "sha256" / HELLO_BLOB[7:]], "x")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("trace")
        info.size, info.mode = 6, 0o444
        tar.addfile(info, io.BytesIO(b"/hello"))
    digest, size = add_blob(layout, buf.getvalue())
    manifest = json.loads((layout / "blobs" / "sha256" / OciLayoutStore(layout).entries[0].digest[7:]).read_text())
    layers = manifest["layers"] + [{"mediaType": OCI_LAYER_TAR, "digest": digest, "size": size, "annotations": {
        ANN_BLOB_DIGEST: digest, ANN_BLOB_SIZE: str(size), ANN_VERSION: "0.1.0", ANN_ACCELERATION: "yes"}}]
    add_manifest(layout, {"os": "linux", "architecture": "amd64"}, layers, "traced")
    rc, out, err = run(capfdbinary, "inspect", "--json", f"oci:{layout}:traced")
    info = json.loads(out)
    assert [layer["kind"] for layer in info["layers"]] == ["overlaybd", "acceleration"]
    assert info["virtual_size"] == GIB64 and "uuid" not in info["layers"][1]
    rc, out, err = run(capfdbinary, "cat", f"oci:{layout}:traced", "/hello")
    assert (rc, hashlib.sha256(out).hexdigest()) == (0, HELLO_SHA256)


# -- errors: one line, an exit code, never a traceback ----------------------------------------

def _one_line(err: str) -> str:
    assert err.startswith("obd: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_plain_image_is_refused_for_ls(hello, capfdbinary):
    rc, _, err = run(capfdbinary, "ls", f"oci:{hello}:amd64")
    assert rc == UsageError.exit_code
    assert "image is not accelerated (run obd convert)" in _one_line(err)


def test_missing_tag_lists_tags(hello, capfdbinary):
    rc, _, err = run(capfdbinary, "inspect", f"oci:{hello}:nope")
    assert rc == 3
    assert "no tag 'nope' (tags: amd64-converted, arm64, docker-list, amd64)" in _one_line(err)


def test_missing_layout_and_missing_file(hello, tmp_path, capfdbinary):
    rc, _, err = run(capfdbinary, "ls", f"oci:{tmp_path}/absent:x")
    assert rc == 3 and "no such OCI layout directory" in _one_line(err)
    rc, _, err = run(capfdbinary, "cat", f"oci:{hello}:amd64-converted", "/etc/passwd")
    assert rc == 3 and err == "obd: /etc: no such file or directory\n"
    rc, _, err = run(capfdbinary, "cat", f"oci:{hello}:amd64-converted", "/lost+found")
    assert rc == 2 and err == "obd: /lost+found: is a directory\n"


def test_wrong_media_type_and_malformed_json(tmp_path, capfdbinary):
    layout = tmp_path / "layout"
    add_manifest(layout, {"os": "linux", "architecture": "amd64"}, [], "weird",
                 media_type="application/vnd.example.thing+json")
    rc, _, err = run(capfdbinary, "inspect", f"oci:{layout}:weird")
    assert rc == 7 and "is not an image manifest or index" in _one_line(err)
    (layout / "index.json").write_text('{"manifests": [')
    rc, _, err = run(capfdbinary, "inspect", f"oci:{layout}:weird")
    assert rc == 6 and "index.json at offset 15: malformed JSON" in _one_line(err)


def test_corrupt_blob_is_caught_by_its_digest(hello, tmp_path, capfdbinary):
    layout = tmp_path / "layout"
    shutil.copytree(hello, layout)
    blob = layout / "blobs" / "sha256" / HELLO_BLOB.split(":")[1]
    data = bytearray(blob.read_bytes())
    data[100_000] ^= 0xFF
    blob.write_bytes(bytes(data))
    rc, _, err = run(capfdbinary, "cat", f"oci:{layout}:amd64-converted", "/hello")
    assert rc == 6 and f"{HELLO_BLOB}: " in _one_line(err) and "does not match its digest" in err


def test_export_failure_leaves_nothing(hello, vectors, tmp_path, capfdbinary):
    # a damaged block whose blob digest is right (the layout was built over the damaged file):
    # the ZFile block CRC fails in the middle of the export
    blob = bytearray((pathlib.Path(hello) / "blobs" / "sha256" / HELLO_BLOB.split(":")[1]).read_bytes())
    blob[300_000] ^= 0xFF
    bad = tmp_path / "bad.commit"
    bad.write_bytes(bytes(blob))
    layout = native_layout(tmp_path / "layout", [bad], "bad")
    out = tmp_path / "out.img"
    rc, _, err = run(capfdbinary, "export", "-q", f"oci:{layout}:bad", str(out))
    assert rc == 6, err
    _one_line(err)
    assert set(os.listdir(tmp_path)) == {"bad.commit", "layout"}  # no out.img, no out.img.partial


def test_cli_subprocess_error_is_one_line(hello):
    proc = subprocess.run([sys.executable, "-m", "tcmu_overlaybd.cli.main", "cat",
                           f"oci:{hello}:amd64-converted", "/nope"], capture_output=True, text=True)
    assert proc.returncode == 3
    assert proc.stderr == "obd: /nope: no such file or directory\n"
    assert proc.stdout == ""


def test_cat_streams_through_a_pipe(hello):
    proc = subprocess.run([sys.executable, "-m", "tcmu_overlaybd.cli.main", "cat",
                           f"oci:{hello}:amd64-converted", "hello"], capture_output=True)
    assert proc.returncode == 0 and hashlib.sha256(proc.stdout).hexdigest() == HELLO_SHA256


def test_platform_flag_on_a_single_platform_image(hello, capfdbinary):
    ref = f"oci:{hello}:amd64-converted"
    rc, _, err = run(capfdbinary, "inspect", "--platform", "linux/arm64", ref)
    assert rc == 3 and _one_line(err).endswith("image is for linux/amd64, not linux/arm64\n")
    rc, _, err = run(capfdbinary, "ls", "--platform", "linux", ref)
    assert rc == 2 and "invalid platform 'linux'" in _one_line(err)
    rc, out, _ = run(capfdbinary, "ls", "--platform", "linux/amd64", ref)
    assert (rc, out) == (0, b"hello\nlost+found\n")
