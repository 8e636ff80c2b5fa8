"""``obd convert`` end to end: a real registry (docker-registry), real e2fsprogs, ``oci:`` layouts."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shlex
import subprocess
import sys

import pytest

from tcmu_overlaybd.cli.main import main
from tcmu_overlaybd.convert.publish import publish, walk
from tcmu_overlaybd.errors import CorruptDataError
from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.store import Descriptor

from .helpers.ext4_tree import fsck_clean, read_tree
from .helpers.oci_build import Entry, write_oci_layout, write_oci_multiarch
from .helpers.reference_tree import reference_tree
from .helpers.registry import (  # noqa: F401 - fixtures
    needs_registry,
    plain_registry,
    proxied_registry,
    sha256_digest,
)
from .test_convert_apply import torture_entries

OBD = pathlib.Path(sys.executable).parent / "obd"
PUSH_OPTS = OpenOptions(plain_http=True, quiet=True, retries=0)


def obd(capfd, *args):
    rc = main([str(a) for a in args])
    out, err = capfd.readouterr()
    return rc, out, err


@pytest.fixture()
def source(tmp_path):
    """The torture image as a gzip'd OCI layout tagged v1, and its layer blobs."""
    layout = str(tmp_path / "src")
    manifest = write_oci_layout(layout, torture_entries(), "gzip", tag="v1")
    blobs = [open(os.path.join(layout, "blobs", "sha256", d["digest"][7:]), "rb").read() for d in manifest["layers"]]
    return layout, blobs


def _exported_tree(capfd, tmp_path, ref: str, *flags) -> dict:
    raw = tmp_path / f"export-{len(list(tmp_path.iterdir()))}.img"
    rc, _out, err = obd(capfd, "export", ref, raw, *flags)
    assert rc == 0, err
    rc, msg = fsck_clean(str(raw))
    assert rc == 0, msg
    tree = read_tree(str(raw))
    raw.unlink()
    return tree


def _uploads(proxy) -> int:
    return sum(1 for method, path, _rng, status in proxy.log.requests
               if method == "POST" and "/blobs/uploads/" in path and status == 202)


@needs_registry
@pytest.mark.registry
def test_registry_round_trip_with_referrer(capfd, tmp_path, source, proxied_registry):
    registry, proxy = proxied_registry
    layout, blobs = source
    base = f"{proxy.host}/app:v1"
    src = OciLayoutStore(layout)
    publish(layout, src.resolve(parse_reference(f"oci:{layout}:v1")), base, PUSH_OPTS)
    layer_digests = [sha256_digest(b) for b in blobs]
    flags = ["--plain-http", "-q", "--cache-dir", tmp_path / "cache"]
    work = tmp_path / "work"
    proxy.reset_counters()

    rc, out, err = obd(capfd, "convert", base, "--overlaybd", f"{proxy.host}/app:v1_obd",
                       "--fastoci", f"{proxy.host}/app:v1_turbo", "--referrer", "--vsize", "1",
                       "--workdir", work, "--json", *flags)
    assert rc == 0, err
    result = json.loads(out)
    assert set(result) == {"overlaybd", "fastoci"}
    assert os.listdir(work) == []  # the work directory is gone
    # each source layer was downloaded once for both formats
    layer_gets = [p.rsplit("/", 1)[1] for m, p, _r, _s in proxy.log.requests if m == "GET" and "/blobs/" in p]
    assert sorted(d for d in layer_gets if d in layer_digests) == sorted(layer_digests)
    # one upload per blob the results report as sent
    assert _uploads(proxy) == result["overlaybd"]["blobsSent"] + result["fastoci"]["blobsSent"] > len(blobs)
    # FastOCI data stays in the original layers, which the repository already had
    assert result["fastoci"]["blobsPresent"] >= len(blobs)

    # the plain reference finds the native image on its own and reads the original tree
    rc, out, err = obd(capfd, "inspect", base, "--json", *flags)
    assert rc == 0, err
    info = json.loads(out)
    assert info["mode"] == "overlaybd" and info["manifest"]["digest"] == result["overlaybd"]["digest"]
    expected = reference_tree(blobs)
    assert _exported_tree(capfd, tmp_path, base, *flags) == expected
    turbo = f"{proxy.host}/app@{result['fastoci']['digest']}"
    assert _exported_tree(capfd, tmp_path, turbo, *flags) == expected
    rc, out, err = obd(capfd, "ls", base, "/etc", *flags)
    assert rc == 0, err
    assert out.splitlines() == sorted(p[len("/etc/"):] for p in expected if p.count("/") == 2 and p.startswith("/etc/"))
    rc, out, err = obd(capfd, "cat", base, "/etc/passwd", *flags)
    assert rc == 0, err
    assert hashlib.sha256(out.encode()).hexdigest() == expected["/etc/passwd"].sha256

    # converting again pushes no blob: every one is there already (HEAD), only manifests go up
    proxy.reset_counters()
    rc, out, err = obd(capfd, "convert", base, "--overlaybd", f"{proxy.host}/app:v1_obd", "--referrer",
                       "--vsize", "1", "--json", *flags)
    assert rc == 0, err
    again = json.loads(out)["overlaybd"]
    assert again["digest"] == result["overlaybd"]["digest"]  # reproducible
    assert again["blobsSent"] == 0 and _uploads(proxy) == 0


@needs_registry
@pytest.mark.registry
def test_referrers_tag_lists_both_results(capfd, tmp_path, source, plain_registry):
    """docker-registry 2.8 has no referrers API: the sha256-<hex> tag index carries the results."""
    layout, _blobs = source
    base = f"{plain_registry.host}/app:v1"
    desc = OciLayoutStore(layout).resolve(parse_reference(f"oci:{layout}:v1"))
    publish(layout, desc, base, PUSH_OPTS)
    rc, out, err = obd(capfd, "convert", base, "--overlaybd", f"{plain_registry.host}/app:obd",
                       "--fastoci", f"{plain_registry.host}/app:turbo", "--referrer", "--vsize", "1",
                       "--json", "--plain-http", "-q")
    assert rc == 0, err
    result = json.loads(out)
    from tcmu_overlaybd.image.registry import RegistryStore

    store = RegistryStore(parse_reference(base), PUSH_OPTS)
    try:
        found = {d.digest: d.artifact_type for d in store.referrers(desc.digest)}
    finally:
        store.close()
    assert found == {
        result["overlaybd"]["digest"]: "application/vnd.containerd.overlaybd.native.v1+json",
        result["fastoci"]["digest"]: "application/vnd.containerd.overlaybd.turbo.v1+json",
    }


def test_oci_destinations(capfd, tmp_path, source):
    layout, blobs = source
    out_dir = tmp_path / "out"
    rc, out, err = obd(capfd, "convert", f"oci:{layout}:v1", "--overlaybd", f"oci:{out_dir}:obd",
                       "--fastoci", f"oci:{out_dir}:turbo", "--vsize", "1", "--docker", "--bs", "16K",
                       "--algorithm", "zstd", "--workdir", tmp_path / "work", "-q")
    assert rc == 0, err
    lines = out.splitlines()
    assert [line.split("@")[0] for line in lines] == [f"overlaybd: oci:{out_dir}:obd", f"fastoci: oci:{out_dir}:turbo"]
    assert OciLayoutStore(str(out_dir)).tags == ["obd", "turbo"]
    expected = reference_tree(blobs)
    for tag in ("obd", "turbo"):
        assert _exported_tree(capfd, tmp_path, f"oci:{out_dir}:{tag}") == expected
    rc, out, err = obd(capfd, "inspect", f"oci:{out_dir}:obd", "--json")
    info = json.loads(out)
    assert info["manifest"]["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert os.listdir(tmp_path / "work") == []


@needs_registry
@pytest.mark.registry
def test_failed_push_leaves_no_tag(capfd, tmp_path, source, proxied_registry):
    """A blob upload the registry rejects: one-line error, no result tag, work directory removed."""
    _registry, proxy = proxied_registry
    layout, _blobs = source
    base = f"{proxy.host}/app:v1"
    publish(layout, OciLayoutStore(layout).resolve(parse_reference(f"oci:{layout}:v1")), base, PUSH_OPTS)
    proxy.add_fault("status:400", "/blobs/uploads/", "PUT", times=100)
    work = tmp_path / "work"
    rc, out, err = obd(capfd, "convert", base, "--overlaybd", f"{proxy.host}/app:obd", "--vsize", "1",
                       "--plain-http", "-q", "--workdir", work)
    assert rc == 1 and out == "" and err.startswith("obd: registry ") and "HTTP 400" in err
    assert err.count("\n") == 1
    assert os.listdir(work) == []
    rc, _out, err = obd(capfd, "inspect", f"{proxy.host}/app:obd", "--plain-http", "-q")
    assert rc == 3 and "manifest unknown" in err


def test_all_platforms_with_referrer_in_a_layout(capfd, tmp_path):
    """Every platform converted; each platform's plain reference then finds its own overlaybd image."""
    layout = str(tmp_path / "multi")
    images = {arch: [[Entry("etc", "dir"), Entry("etc/arch", data=arch.encode()), Entry("etc/gone", data=b"x")],
                     [Entry("etc/gone", "whiteout"), Entry("bin/tool", data=arch.encode() * 1000, mode=0o755)]]
              for arch in ("amd64", "arm64")}
    write_oci_multiarch(layout, images, tag="v1")
    rc, out, err = obd(capfd, "convert", f"oci:{layout}:v1", "--overlaybd", f"oci:{layout}:obd", "--all-platforms",
                       "--referrer", "--vsize", "1", "--json", "-q")
    assert rc == 0, err
    result = json.loads(out)["overlaybd"]
    assert result["mediaType"] == "application/vnd.oci.image.index.v1+json"
    converted = json.loads(OciLayoutStore(layout).fetch_blob(result["digest"]))
    assert [m["platform"]["architecture"] for m in converted["manifests"]] == ["amd64", "arm64"]
    assert converted["subject"]["digest"] == OciLayoutStore(layout).resolve(parse_reference(f"oci:{layout}:v1")).digest
    for arch in ("amd64", "arm64"):
        rc, out, err = obd(capfd, "inspect", f"oci:{layout}:v1", "--platform", f"linux/{arch}", "--json")
        assert rc == 0, err
        assert json.loads(out)["mode"] == "overlaybd"
        rc, out, err = obd(capfd, "cat", f"oci:{layout}:v1", "/etc/arch", "--platform", f"linux/{arch}")
        assert (rc, out) == (0, arch), err
        rc, out, err = obd(capfd, "cat", f"oci:{layout}:v1", "/etc/gone", "--platform", f"linux/{arch}")
        assert rc == 3 and out == "" and err.startswith("obd: ")


@needs_registry
@pytest.mark.registry
def test_all_platforms_from_a_registry(capfd, tmp_path, plain_registry):
    """A multi-platform source in a registry: its index is mirrored once, each platform converted."""
    layout = str(tmp_path / "multi")
    write_oci_multiarch(layout, {arch: [[Entry("etc/arch", data=arch.encode())]] for arch in ("amd64", "arm64")},
                        tag="v1")
    base = f"{plain_registry.host}/multi:v1"
    publish(layout, OciLayoutStore(layout).resolve(parse_reference(f"oci:{layout}:v1")), base, PUSH_OPTS)
    flags = ["--plain-http", "-q", "--cache-dir", tmp_path / "cache"]
    rc, out, err = obd(capfd, "convert", base, "--fastoci", f"{plain_registry.host}/multi:turbo", "--all-platforms",
                       "--referrer", "--vsize", "1", *flags)
    assert rc == 0, err
    assert out.startswith(f"fastoci: {plain_registry.host}/multi:turbo@sha256:")
    for arch in ("amd64", "arm64"):
        rc, out, err = obd(capfd, "inspect", base, "--platform", f"linux/{arch}", "--json", *flags)
        assert rc == 0, err
        assert json.loads(out)["mode"] == "fastoci"
        rc, out, err = obd(capfd, "cat", base, "/etc/arch", "--platform", f"linux/{arch}", *flags)
        assert (rc, out) == (0, arch), err


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_per_layer_on_a_terminal(tmp_path, source, quiet):
    """On a TTY each layer gets its own bar (named by format and layer); -q draws none."""
    layout, blobs = source
    cmd = [str(OBD), "convert", f"oci:{layout}:v1", "--overlaybd", f"oci:{tmp_path}/out:obd", "--vsize", "1"]
    if quiet:
        cmd.append("-q")
    # a pseudo-terminal as script(1) makes it: 0 columns wide, where bars fall back to 80
    proc = subprocess.run(["script", "-qec", shlex.join(cmd), "/dev/null"],
                          capture_output=True, timeout=300)
    text = proc.stdout.decode(errors="replace")
    assert proc.returncode == 0, text
    shown = [i for i in range(1, len(blobs) + 1) if f"overlaybd layer {i}" in text]
    assert shown == ([] if quiet else list(range(1, len(blobs) + 1)))
    assert f"overlaybd: oci:{tmp_path}/out:obd@sha256:" in text


@pytest.mark.parametrize("args, message", [
    ([], "nothing to do: give --overlaybd DST and/or --fastoci DST"),
    (["--overlaybd", "oci:/x:a", "--bs", "3K"], "--bs 3K: block size must be one of 4K, 8K, 16K, 32K, 64K"),
    (["--overlaybd", "oci:/x:a", "--platform", "linux/amd64", "--all-platforms"],
     "--platform and --all-platforms exclude each other"),
    (["--overlaybd", "oci:/x:a", "--fastoci", "oci:/x:a"],
     "--overlaybd and --fastoci both name oci:/x:a; give each its own tag"),
    (["--overlaybd", "reg.example/app@sha256:" + "0" * 64],
     "--overlaybd reg.example/app@sha256:" + "0" * 64 + ": a destination names a tag, not a digest"),
])
def test_usage_errors(capfd, tmp_path, source, args, message):
    layout, _ = source
    rc, out, err = obd(capfd, "convert", f"oci:{layout}:v1", *args, "--workdir", tmp_path / "work")
    assert (rc, out, err) == (2, "", f"obd: {message}\n")
    assert not (tmp_path / "work").exists()  # refused before any work


def test_already_accelerated_source_is_refused(capfd, tmp_path, source):
    layout, _ = source
    rc, _out, err = obd(capfd, "convert", f"oci:{layout}:v1", "--overlaybd", f"oci:{layout}:obd", "--vsize", "1", "-q")
    assert rc == 0, err
    rc, out, err = obd(capfd, "convert", f"oci:{layout}:obd", "--fastoci", f"oci:{layout}:t", "-q")
    assert rc == 7 and err.startswith("obd: ") and "already overlaybd" in err and err.count("\n") == 1
    assert "t" not in OciLayoutStore(layout).tags  # nothing published


@needs_registry
@pytest.mark.registry
def test_missing_source(capfd, tmp_path, plain_registry):
    work = tmp_path / "work"
    rc, out, err = obd(capfd, "convert", f"{plain_registry.host}/nope:v1", "--overlaybd",
                       f"{plain_registry.host}/nope:obd", "--plain-http", "-q", "--workdir", work)
    assert rc == 3 and out == ""
    assert err.startswith("obd: ") and "nope:v1" in err and err.count("\n") == 1
    assert os.listdir(work) == []


def test_hostile_blob_digest_is_refused_before_any_file_is_written(tmp_path):
    """A manifest naming a blob ``sha256:../..`` must not reach a file name (mirror and publish walk it)."""
    layout = tmp_path / "evil"
    write_oci_layout(str(layout), [[Entry("f", data=b"x")]], "gzip", tag="v1")
    store = OciLayoutStore(str(layout))
    desc = store.resolve(parse_reference(f"oci:{layout}:v1"))
    manifest = json.loads(store.fetch_blob(desc.digest))
    manifest["layers"][0]["digest"] = "sha256:../../../../etc/obd-evil"
    raw = json.dumps(manifest).encode()
    digest = sha256_digest(raw)
    (layout / "blobs" / "sha256" / digest[7:]).write_bytes(raw)
    evil = Descriptor(desc.media_type, digest, len(raw))
    with pytest.raises(CorruptDataError) as e:
        walk(OciLayoutStore(str(layout)), evil)
    assert str(e.value) == f"{digest}: invalid blob digest 'sha256:../../../../etc/obd-evil'"
    with pytest.raises(CorruptDataError):
        publish(str(layout), evil, f"oci:{tmp_path}/out:x", PUSH_OPTS)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs")
def test_full_workdir_is_one_line_and_cleaned_up(capfd, tmp_path, source):
    layout, _ = source
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        rc, out, err = obd(capfd, "convert", f"oci:{layout}:v1", "--overlaybd", f"oci:{tmp_path}/out:x",
                           "--vsize", "1", "-q", "--workdir", small)
        assert rc == 9 and out == "" and err.startswith(f"obd: {small}/obd-convert-")
        assert err.endswith(": No space left on device\n") and err.count("\n") == 1
        assert os.listdir(small) == [] and not (tmp_path / "out").exists()
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_unusable_workdir(capfd, tmp_path, source):
    layout, _ = source
    (tmp_path / "file").write_text("")
    rc, out, err = obd(capfd, "convert", f"oci:{layout}:v1", "--overlaybd", f"oci:{tmp_path}/out:x",
                       "--workdir", tmp_path / "file" / "sub")
    assert (rc, out, err) == (2, "", f"obd: --workdir {tmp_path}/file/sub: Not a directory\n")


def test_referrer_elsewhere_warns(capfd, tmp_path, source):
    """A --referrer result outside the source's layout/repository is still written, with a warning."""
    layout, _ = source
    rc, out, err = obd(capfd, "convert", f"oci:{layout}:v1", "--overlaybd", f"oci:{tmp_path}/other:x", "--referrer",
                       "--vsize", "1", "-q")
    assert rc == 0 and out.startswith(f"overlaybd: oci:{tmp_path}/other:x@sha256:")
    assert f"--overlaybd oci:{tmp_path}/other:x: not in the repository of oci:{layout}:v1" in err
    rc, out, err = obd(capfd, "convert", f"oci:{layout}:v1", "--overlaybd", f"oci:{layout}:x", "--referrer",
                       "--vsize", "1", "-q")
    assert rc == 0 and "warning" not in err


def test_one_platform_of_an_index_with_referrer_is_found_from_the_index(capfd, tmp_path):
    """Only arm64 converted: the plain multi-platform reference finds it for arm64, not for amd64."""
    layout = str(tmp_path / "multi")
    write_oci_multiarch(layout, {arch: [[Entry("etc/arch", data=arch.encode())]] for arch in ("amd64", "arm64")},
                        tag="v1")
    rc, out, err = obd(capfd, "convert", f"oci:{layout}:v1", "--platform", "linux/arm64", "--overlaybd",
                       f"oci:{layout}:obd", "--referrer", "--vsize", "1", "-q")
    assert rc == 0, err
    assert "warning" not in err
    rc, out, err = obd(capfd, "cat", f"oci:{layout}:obd", "/etc/arch")
    assert (rc, out) == (0, "arm64"), err
    rc, out, err = obd(capfd, "inspect", f"oci:{layout}:v1", "--platform", "linux/arm64", "--json")
    assert rc == 0 and json.loads(out)["mode"] == "overlaybd", err
    rc, out, err = obd(capfd, "inspect", f"oci:{layout}:v1", "--platform", "linux/amd64", "--json")
    assert rc == 0 and json.loads(out)["mode"] == "oci", err
