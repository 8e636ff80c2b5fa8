"""The cold-start benchmark's image side, on small synthetic trees (no debootstrap).

Layer writer (determinism, whiteouts, owners, mtimes), image config, unpacking
with whiteouts, and one traditional cold start of a busybox image through a real
docker-registry.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile

import pytest

from benchmarks.startup.convert import convert
from benchmarks.startup.images import IMAGES, STAGES, BuiltImage, _mirror_in, debian_mirror, write_app_tree
from benchmarks.startup.layers import DEFAULT_MTIME_CLAMP, diff, snapshot, write_layer
from benchmarks.startup.oci import ImageConfig, write_image
from benchmarks.startup.registry import BenchRegistry, registry_options
from benchmarks.startup.shaping import LinkProfile, Namespace, apply_profile, parse_profiles
from benchmarks.startup.traditional import cold_start
from benchmarks.startup.unpack import apply_layer
from tcmu_overlaybd.errors import CorruptDataError, KernelError, UsageError
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image
from tests.helpers.registry import free_port, needs_registry

is_root = os.geteuid() == 0


def make_tree(root) -> None:
    """A small rootfs: dirs, files, a symlink, a hard link, a directory to remove later."""
    os.makedirs(root / "etc")
    (root / "etc" / "os-release").write_text("ID=synthetic\n")
    os.makedirs(root / "usr" / "bin")
    (root / "usr" / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 50)
    os.link(root / "usr" / "bin" / "tool", root / "usr" / "bin" / "tool-alias")
    os.symlink("usr/bin", root / "bin")
    os.makedirs(root / "var" / "lib" / "apt" / "lists" / "partial")
    (root / "var" / "lib" / "apt" / "lists" / "Packages").write_text("Package: x\n" * 100)
    os.makedirs(root / "old")
    (root / "old" / "a").write_text("a")
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + [""]:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.path.isdir(p) else 0o644)


def tar_members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:gz") as tar:
        return tar.getmembers()


def test_same_tree_gives_same_digests_whatever_the_inodes_and_time_of_creation(tmp_path):
    make_tree(tmp_path / "a")
    make_tree(tmp_path / "b")
    os.utime(tmp_path / "b" / "etc" / "os-release", (DEFAULT_MTIME_CLAMP + 999, DEFAULT_MTIME_CLAMP + 999))
    blobs = []
    for name in ("a", "b"):
        root = str(tmp_path / name)
        snap = snapshot(root)
        blobs.append(write_layer(root, diff({}, snap).changed, [], str(tmp_path / f"{name}.tgz")))
    assert blobs[0].digest == blobs[1].digest
    assert blobs[0].diff_id == blobs[1].diff_id
    assert (tmp_path / "a.tgz").read_bytes() == (tmp_path / "b.tgz").read_bytes()
    data = (tmp_path / "a.tgz").read_bytes()
    assert blobs[0].size == len(data)
    assert blobs[0].tar_size == len(gzip.decompress(data))
    assert data[4:8] == b"\0\0\0\0"  # gzip header without a timestamp


def test_layer_entries_are_pax_numeric_owners_clamped_mtimes_parents_first(tmp_path):
    root = tmp_path / "t"
    make_tree(root)
    if is_root:
        os.chown(root / "etc" / "os-release", 1234, 5678)
    snap = snapshot(str(root))
    write_layer(str(root), diff({}, snap).changed, [], str(tmp_path / "l.tgz"))
    raw = gzip.decompress((tmp_path / "l.tgz").read_bytes())
    assert raw[257:265] == b"ustar\x0000"  # POSIX (PAX/ustar) headers, not GNU's "ustar  \0"
    members = tar_members(tmp_path / "l.tgz")
    names = [m.name for m in members]
    for i, name in enumerate(names):  # every parent directory comes before its contents
        parent = name.rpartition("/")[0]
        assert not parent or parent in names[:i], name
    by_name = {m.name: m for m in members}
    assert all(m.uname == "" and m.gname == "" for m in members)
    assert all(m.mtime <= DEFAULT_MTIME_CLAMP for m in members)
    if is_root:
        assert (by_name["etc/os-release"].uid, by_name["etc/os-release"].gid) == (1234, 5678)
    assert by_name["bin"].issym() and by_name["bin"].linkname == "usr/bin"
    links = [m for m in members if m.name.startswith("usr/bin/tool")]
    assert [m.islnk() for m in links] == [False, True]
    assert links[1].linkname == "usr/bin/tool"


def test_diff_layer_has_changes_and_top_most_whiteouts(tmp_path):
    root = tmp_path / "t"
    make_tree(root)
    lower = snapshot(str(root))
    shutil.rmtree(root / "var" / "lib" / "apt" / "lists")
    os.makedirs(root / "var" / "lib" / "apt" / "lists")  # what `rm -rf lists && apt` leaves: a new dir
    shutil.rmtree(root / "old")
    (root / "etc" / "os-release").write_text("ID=changed\n")
    (root / "etc" / "new.conf").write_text("x=1\n")
    upper = snapshot(str(root))
    change = diff(lower, upper)
    blob = write_layer(str(root), change.changed, change.removed, str(tmp_path / "d.tgz"))
    names = [m.name for m in tar_members(tmp_path / "d.tgz")]
    assert ".wh.old" in names
    assert "old/.wh.a" not in names  # covered by the whiteout of its directory
    assert "var/lib/apt/lists/.wh.Packages" in names and "var/lib/apt/lists/.wh.partial" in names
    assert {"etc", "etc/os-release", "etc/new.conf", "var", "var/lib", "var/lib/apt"} <= set(names)
    assert "usr/bin/tool" not in names  # unchanged files stay in the lower layer
    assert blob.whiteouts == 3


def test_unpacking_base_and_diff_reproduces_the_upper_tree(tmp_path):
    root = tmp_path / "t"
    make_tree(root)
    lower = snapshot(str(root))
    write_layer(str(root), diff({}, lower).changed, [], str(tmp_path / "base.tgz"))
    shutil.rmtree(root / "old")
    os.unlink(root / "var" / "lib" / "apt" / "lists" / "Packages")
    (root / "etc" / "os-release").write_text("ID=changed\n")
    upper = snapshot(str(root))
    change = diff(lower, upper)
    write_layer(str(root), change.changed, change.removed, str(tmp_path / "diff.tgz"))
    out = tmp_path / "out"
    os.makedirs(out)
    for name in ("base.tgz", "diff.tgz"):
        with gzip.open(tmp_path / name) as f:
            apply_layer(f, str(out), name)
    got = snapshot(str(out))
    assert sorted(got) == sorted(upper)
    assert (out / "etc" / "os-release").read_text() == "ID=changed\n"
    assert (out / "usr" / "bin" / "tool").read_bytes() == (root / "usr" / "bin" / "tool").read_bytes()
    assert os.stat(out / "usr" / "bin" / "tool").st_ino == os.stat(out / "usr" / "bin" / "tool-alias").st_ino
    assert {p: (n.kind, n.mode) for p, n in got.items()} == {p: (n.kind, n.mode) for p, n in upper.items()}


def test_unpacking_refuses_entries_that_leave_the_root(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("ok"), io.BytesIO(b""))
        evil = tarfile.TarInfo("../evil")
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"x"))
    buf.seek(0)
    with pytest.raises(CorruptDataError) as e:
        apply_layer(buf, str(tmp_path), "sha256:feed")
    assert "sha256:feed" in str(e.value) and "offset 512" in str(e.value) and "'../evil'" in str(e.value)
    assert not (tmp_path.parent / "evil").exists()


def test_image_config_and_manifest_read_back_through_obd(tmp_path):
    layout = tmp_path / "layout"
    blobs_dir = layout / "blobs" / "sha256"
    os.makedirs(blobs_dir)
    write_app_tree(str(tmp_path / "app"), IMAGES["python-small"].app_source)
    blob = write_layer(str(tmp_path / "app"), ["app", "app/app.py"], [], str(tmp_path / "l.tgz"))
    os.replace(tmp_path / "l.tgz", blobs_dir / blob.digest[7:])
    spec = IMAGES["python-small"]
    write_image(str(layout), "small", [blob], spec.config(STAGES))
    write_image(str(layout), "again", [blob], ImageConfig(["true"], []))
    image = open_image(f"oci:{layout}:small", OpenOptions())
    cfg = image.config["config"]
    assert cfg["Cmd"] == ["python3", "/app/app.py"]
    assert cfg["WorkingDir"] == "/app"
    assert "PORT=8080" in cfg["Env"] and any(e.startswith("PATH=/usr/local/sbin:") for e in cfg["Env"])
    assert image.config["rootfs"]["diff_ids"] == [blob.diff_id]
    assert [h["created_by"] for h in image.config["history"]][-1] == "COPY app.py /app/app.py"
    assert [layer.descriptor.digest for layer in image.layers] == [blob.digest]
    assert image.layers[0].kind == "oci-gzip"
    assert {e["annotations"]["org.opencontainers.image.ref.name"]
            for e in json.loads((layout / "index.json").read_text())["manifests"]} == {"small", "again"}
    members = tar_members(blobs_dir / blob.digest[7:])
    assert [(m.name, m.mode, m.uid) for m in members] == [("app", 0o755, 0), ("app/app.py", 0o644, 0)]


def test_debian_mirror_from_deb822_and_one_line_sources(tmp_path):
    deb822 = ("Types: deb\n# comment\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
              "Components: main\n\nTypes: deb\nURIs: http://security.example/debian-security\n"
              "Suites: bookworm-security\n")
    assert _mirror_in(deb822, deb822=True) == "http://mirror.example/debian"
    assert _mirror_in("deb [arch=amd64] http://one.example/debian bookworm main\n", deb822=False) == \
        "http://one.example/debian"
    assert _mirror_in("deb http://x.example/debian bullseye main\n", deb822=False) is None
    os.makedirs(tmp_path / "sources.list.d")
    (tmp_path / "sources.list.d" / "other.sources.disabled").write_text(deb822)
    with pytest.raises(Exception) as e:
        debian_mirror(str(tmp_path))
    assert "no apt source for Debian bookworm" in str(e.value)


def test_link_profiles_and_shaping_refuses_any_other_namespace():
    assert [p.name for p in parse_profiles("unshaped,100mbit-20ms")] == ["unshaped", "100mbit-20ms"]
    assert parse_profiles("100mbit-20ms")[0].netem_args() == ["netem", "rate", "100mbit", "delay", "10ms",
                                                             "limit", "100000"]
    with pytest.raises(UsageError, match="unknown link profile 'dsl'"):
        parse_profiles("dsl")
    with pytest.raises(UsageError, match="refusing to shape lo outside the benchmark's network namespace"):
        apply_profile(LinkProfile("x", "1mbit", 5), "obd-bench-no-such-namespace")


@needs_registry
@pytest.mark.skipif(not is_root or not os.path.exists("/bin/busybox"), reason="needs root and busybox-static")
def test_traditional_cold_start_of_a_busybox_image_from_a_real_registry(tmp_path):
    """Two layers (the second whites out a file of the first), pushed, pulled, unpacked, served by httpd."""
    tree = tmp_path / "tree"
    for d in ("bin", "usr/bin", "www", "proc", "dev", "tmp"):
        os.makedirs(tree / d)
    shutil.copy("/bin/busybox", tree / "bin" / "busybox")
    for name, target in (("bin/sh", "busybox"), ("usr/bin/env", "../../bin/busybox")):
        os.symlink(target, tree / name)
    (tree / "www" / "index.html").write_text("not yet\n")
    (tree / "www" / "stale").write_text("removed by the second layer\n")
    layout = tmp_path / "layout"
    blobs_dir = layout / "blobs" / "sha256"
    os.makedirs(blobs_dir)
    lower = snapshot(str(tree))
    layers = []
    for snap_from, snap_to in ((None, lower), (lower, None)):
        if snap_to is None:
            (tree / "www" / "index.html").write_text("ok\n")
            os.unlink(tree / "www" / "stale")
            snap_to = snapshot(str(tree))
        change = diff(snap_from or {}, snap_to)
        blob = write_layer(str(tree), change.changed, change.removed, str(tmp_path / "l.tgz"))
        os.replace(tmp_path / "l.tgz", blobs_dir / blob.digest[7:])
        layers.append(blob)
    cmd = ["/bin/sh", "-c", 'exec /bin/busybox httpd -f -p "127.0.0.1:$PORT" -h /www']
    write_image(str(layout), "httpd", layers, ImageConfig(cmd, ["PATH=/bin", "PORT=1"], "/www"))
    registry = BenchRegistry(str(tmp_path / "registry"))
    try:
        pushed = registry.push_layout(f"oci:{layout}:httpd", "bench/httpd", "oci")
        mark = registry.mark()
        r = cold_start("httpd", pushed.ref(registry.host), str(tmp_path / "work"), registry_options(), free_port(),
                       30)
        served = registry.served_since(mark)
    finally:
        registry.stop()
    assert r.mode == "traditional"
    assert 0 < r.pull_s <= r.available_s < 30
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = (blobs_dir / manifest_digest[7:]).read_bytes()
    config_size = os.path.getsize(blobs_dir / json.loads(manifest)["config"]["digest"][7:])
    assert r.registry_size == pushed.registry_size == len(manifest) + config_size + sum(b.size for b in layers)
    assert r.bytes_fetched == r.registry_size  # every blob once, in full, and the manifest
    assert served.bytes == r.registry_size  # the registry's access log agrees with the client
    assert served.blob_bytes == r.registry_size - len(manifest) and served.range_requests == 0
    assert r.details["unpacked_entries"] > 10
    assert not (tmp_path / "work" / "rootfs").exists()


def test_traditional_pull_wants_a_registry_reference(tmp_path):
    layout = tmp_path / "layout"
    os.makedirs(layout / "blobs" / "sha256")
    write_app_tree(str(tmp_path / "app"), "print('hi')\n")
    blob = write_layer(str(tmp_path / "app"), ["app", "app/app.py"], [], str(layout / "blobs" / "sha256" / "x"))
    os.replace(layout / "blobs" / "sha256" / "x", layout / "blobs" / "sha256" / blob.digest[7:])
    write_image(str(layout), "t", [blob], ImageConfig(["true"], []))
    with pytest.raises(UsageError, match="needs a registry reference"):
        cold_start("t", f"oci:{layout}:t", str(tmp_path / "work"), OpenOptions(), free_port(), 5)


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_app_sources_compile_and_serve_ok_on_port_from_env(name):
    source = IMAGES[name].app_source
    compile(source, f"{name}/app.py", "exec")  # a syntax error would only show after a long build
    assert 'port=int(os.environ["PORT"])' in source and 'return "ok"' in source


@pytest.mark.skipif(not is_root or shutil.which("ip") is None, reason="needs root and iproute2")
def test_namespace_for_shaped_links_is_made_and_removed_or_refused_in_one_line():
    name = f"obd-bench-test-{os.getpid()}"
    try:
        ns = Namespace(name)
    except KernelError as e:  # host kernels without sch_netem (the build machines)
        assert str(e).startswith("tc netem is not available on this kernel")
        assert "run in the VM harness, or without --shape" in str(e)
    else:
        try:
            assert os.path.exists(f"/run/netns/{name}")
            assert ns.run(["tc", "qdisc", "show", "dev", "lo"]) == 0
        finally:
            ns.delete()
    assert not os.path.exists(f"/run/netns/{name}")


@pytest.mark.parametrize("fmt", ["overlaybd", "fastoci"])
def test_conversion_is_read_back_by_obd_and_reused_from_the_cache(tmp_path, fmt):
    layout = tmp_path / "layout"
    os.makedirs(layout / "blobs" / "sha256")
    write_app_tree(str(tmp_path / "app"), IMAGES["python-small"].app_source)
    blob = write_layer(str(tmp_path / "app"), ["app", "app/app.py"], [], str(tmp_path / "l.tgz"))
    os.replace(tmp_path / "l.tgz", layout / "blobs" / "sha256" / blob.digest[7:])
    desc = write_image(str(layout), "small", [blob], IMAGES["python-small"].config(STAGES))
    built = BuiltImage("python-small", str(layout), "small", desc.digest, [blob])
    said = []
    first = convert(built, fmt, str(tmp_path / "converted"), said.append)
    again = convert(built, fmt, str(tmp_path / "converted"), said.append)
    assert again == first
    assert len([line for line in said if line.startswith("converting")]) == 1
    image = open_image(first.ref, OpenOptions(discover_accelerated=False))
    try:
        assert image.mode == fmt
        assert image.config["config"]["Cmd"] == ["python3", "/app/app.py"]
        assert [layer.descriptor.size for layer in image.layers] == first.layer_sizes
    finally:
        image.store.close()
