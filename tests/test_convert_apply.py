"""Applying OCI layers to ext4 in userspace: the torture image, both modes.

The ext4 produced by ``convert.apply`` is read back with debugfs and compared
with an independent reference extraction; ``e2fsck -fn`` must be clean.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import random
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile

import pytest

from tcmu_overlaybd.convert.apply import MODE_DATA, MODE_MAP, apply_layer_file, clean_path
from tcmu_overlaybd.convert.tarstream import decompressed, pax_time
from tcmu_overlaybd.convert.ext2fs import Ext2fsError, Filesystem
from tcmu_overlaybd.convert.mkfs import make_ext4
from tcmu_overlaybd.errors import CorruptDataError

from .helpers.ext4_tree import debugfs_batch, fsck_clean, read_tree, stat_fields
from .helpers.oci_build import Entry, build_tar, compress
from .helpers.reference_tree import reference_tree

VSIZE = 1 << 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


CAP = bytes.fromhex("0100000200200000000000000000000000000000")  # security.capability v2
LONG = "L" * 255
UNI = "données/ünïcödé-文件.txt"


def torture_entries() -> list[list[Entry]]:
    """The torture image's layers as entry lists, bottom layer first."""
    l1 = [
        Entry("etc", "dir"),
        Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
        Entry("etc/shadow", data=b"root:*:1::::::\n", mode=0o640, gid=42),
        Entry("usr/bin/su", data=_rand(7000, 1), mode=0o4755),
        Entry("usr/bin/wall", data=b"#!wall", mode=0o2755, gid=5),
        Entry("tmp", "dir", mode=0o1777),
        Entry("usr/lib", "dir"),
        Entry("lib", "symlink", link="usr/lib"),
        Entry("lib/libfoo.so", data=_rand(5000, 2)),  # written through the parent symlink
        Entry("data/file.bin", data=_rand(300_000, 3), uid=1000, gid=1000,
              xattrs={"user.comment": b"hello", "security.capability": CAP}),
        Entry("data/hl", "hardlink", link="data/file.bin"),
        Entry("data/orig", data=b"A" * 10000),
        Entry("data/link-to-orig", "hardlink", link="data/orig"),
        Entry("data/empty", data=b""),
        Entry("data/bigid", data=b"32-bit ids", uid=100000, gid=200000),
        Entry("data/bigxattr", data=b"x", xattrs={"user.big": _rand(2000, 4)}),  # in an xattr block
        Entry("xdir", "dir", xattrs={"user.big": _rand(1500, 6), "user.small": b"s"}),
        Entry("data/ns", data=b"nanoseconds", mtime=1_700_000_000, mtime_ns=123_456_789),
        Entry("long-symlink", "symlink", link="/" + "x" * 100),
        Entry("dev", "dir"),
        Entry("dev/null", "char", mode=0o666, rdev=(1, 3)),
        Entry("dev/sda", "block", mode=0o660, gid=6, rdev=(8, 0)),
        Entry("dev/big", "char", rdev=(300, 70000)),
        Entry("run/fifo", "fifo", mode=0o600),
        Entry(LONG, data=b"long name"),
        Entry("deep/" + "/".join(["sub%02d" % i for i in range(20)]) + "/leaf", data=b"deep path"),
        Entry(UNI, data="unicode ✓".encode()),
        Entry("opq", "dir", xattrs={"trusted.overlay.test": b"x"}),
        Entry("opq/a", data=b"a"),
        Entry("opq/sub/b", data=b"b"),
        Entry("p", data=b"p is a file first"),
        Entry("q/x", data=b"q is a dir first"),
        Entry("wh/gone", data=b"gone"),
        Entry("wh/dir/child", data=b"child"),
        Entry("wh/dir/sub/child2", "hardlink", link="wh/dir/child"),  # removed with the tree...
        Entry("keep-hl", "hardlink", link="wh/dir/child"),  # ...while this name keeps the inode
        Entry("sparse/gnu", "sparse", size=3 * 4096 * 4,
              pieces=[(0, _rand(4096, 10)), (8 * 4096, _rand(8192, 11))], sparse_format="gnu"),
        Entry("sparse/p00", "sparse", size=1 << 20,
              pieces=[(4096, _rand(4096, 12)), ((1 << 20) - 4096, _rand(4096, 13))], sparse_format="pax0.0"),
        Entry("sparse/p01", "sparse", size=40000,
              pieces=[(0, _rand(4096, 14)), (32768, _rand(7232, 15))], sparse_format="pax0.1"),
        Entry("sparse/p10", "sparse", size=10 << 20,
              pieces=[(1 << 20, _rand(12288, 16)), ((10 << 20) - 100, _rand(100, 17))], sparse_format="pax1.0"),
        Entry("sparse/odd", "sparse", size=20000,
              pieces=[(1000, _rand(3000, 18)), (9000, _rand(11000, 19))], sparse_format="pax1.0"),
        Entry("../../etc/escape", data=b"dotdot"),
        Entry("/abs/file", data=b"absolute"),
    ]
    l2 = [
        Entry("wh/gone", "whiteout"),
        Entry("wh/dir", "whiteout"),
        Entry("data/bigxattr", "whiteout"),
        Entry("nonexistent", "whiteout"),
        Entry("opq/new", data=b"same layer, kept"),
        Entry("opq", "opaque"),
        Entry("data/orig", data=b"B" * 5000),
        Entry("p/child", data=b"p is a dir now"),
        Entry("q", data=b"q is a file now"),
        Entry("data/hl3", "hardlink", link="data/file.bin"),
        Entry("etc", "dir", mode=0o700, mtime=1_650_000_000),
        Entry("big/file", data=_rand(3 << 20, 20), mode=0o600),
        Entry("dup", data=_rand(40000, 21)),
        Entry("dup", data=b"replaced within the same layer"),
    ]
    l3 = [
        Entry("etc/passwd", data=b"root:x:0:0::/root:/bin/bash\n"),
        Entry("data/file.bin", "whiteout"),
        Entry("gnu/" + "n" * 150 + "/file", data=b"gnu long name"),
        Entry("gnu/caf\udce9-latin1", data=b"a name that is not UTF-8"),
        Entry("gnu/" + "t" * 120, "symlink", link="../" + "y" * 150),
    ]
    return [l1, l2, l3]


def torture_layers() -> list[tuple[bytes, bytes]]:
    """[(blob, uncompressed tar)] of the torture image: gzip, zstd and plain GNU tar layers."""
    l1, l2, l3 = torture_entries()
    return [
        (compress(build_tar(l1), "gzip"), build_tar(l1)),
        (compress(build_tar(l2), "zstd"), build_tar(l2)),
        (build_tar(l3, fmt=tarfile.GNU_FORMAT), build_tar(l3, fmt=tarfile.GNU_FORMAT)),
    ]


@pytest.fixture(scope="module")
def layers():
    return torture_layers()


@pytest.fixture(scope="module")
def expected(layers):
    return reference_tree([blob for blob, _ in layers])


def _apply_all(tmp, layers, mode):
    image = os.path.join(tmp, "image.ext4")
    make_ext4(image, VSIZE)
    results = []
    for i, (blob, tar) in enumerate(layers):
        path = os.path.join(tmp, f"layer{i}")
        with open(path, "wb") as f:
            f.write(blob)
        res = apply_layer_file(image, path, mode)
        results.append((res, tar, _image_bytes_at(image, res)))
    return image, results


def _image_bytes_at(image, res):
    with open(image, "rb") as f:
        return [os.pread(f.fileno(), m.length, m.physical) for m in res.mappings]


def _compare(actual, expected):
    assert sorted(actual) == sorted(expected)
    diffs = {p: (actual[p], expected[p]) for p in expected if actual[p] != expected[p]}
    assert not diffs


@pytest.mark.parametrize("mode", [MODE_DATA, MODE_MAP])
def test_torture_image_matches_reference_and_fsck_is_clean(tmp_path, layers, expected, mode):
    image, results = _apply_all(str(tmp_path), layers, mode)
    rc, out = fsck_clean(image)
    assert rc == 0, out
    _compare(read_tree(image), expected)
    if mode == MODE_DATA:
        assert all(not r.mappings for r, _, _ in results)


def test_map_mode_points_every_file_at_its_tar_bytes(tmp_path, layers):
    _image, results = _apply_all(str(tmp_path), layers, MODE_MAP)
    for res, tar, image_bytes in results:
        assert res.tar_size == len(tar) and res.diff_id == "sha256:" + hashlib.sha256(tar).hexdigest()
        for m, in_image in zip(res.mappings, image_bytes):
            assert m.physical % 512 == 0 and m.tar_offset % 512 == 0 and m.length % 512 == 0
            assert tar[m.tar_offset : m.tar_offset + m.length] == in_image.ljust(m.length, b"\0")
        # every regular file still present after the layer is covered, each stored piece
        # rounded up to sectors (spec §4.2), except the sparse files with pieces off the
        # 4 KiB grid, which are carried as data
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            last = {m.name: m for m in t}  # "dup" is replaced within its layer
        want = 0
        for m in last.values():
            if m.isreg() and not m.name.endswith(("sparse/odd", "sparse/p10")):
                pieces = [n for _o, n in m.sparse] if m.sparse else [m.size]
                want += sum(-(-n // 512) * 512 for n in pieces)
        assert sum(m.length for m in res.mappings) == want


def test_mode_bits_times_and_devices_survive(tmp_path, layers):
    image, _ = _apply_all(str(tmp_path), layers, MODE_DATA)
    outs = debugfs_batch(image, ['stat "/data/ns"', 'stat "/usr/bin/su"', 'stat "/dev/big"', 'stat "/etc"'])
    ns, su, big, etc = (stat_fields(o) for o in outs)
    assert (ns["mtime"], ns["mtime_extra"] >> 2) == (1_700_000_000, 123_456_789)
    assert etc["mtime"] == 1_650_000_000  # directory times are set after their contents changed
    assert big["rdev"] == (300, 70000)
    tree = read_tree(image)
    assert tree["/usr/bin/su"].mode == 0o4755 and tree["/tmp"].mode == 0o1777
    assert tree["/data/hl"].sha256 == tree["/data/hl3"].sha256  # hardlinks outlive the whited-out name
    assert "/data/file.bin" not in tree


def _blob_file(tmp_path, entries_or_bytes, name="bad"):
    path = tmp_path / name
    path.write_bytes(entries_or_bytes if isinstance(entries_or_bytes, bytes) else build_tar(entries_or_bytes))
    return str(path)


@pytest.mark.parametrize(
    "layer, message",
    [
        ([Entry("a", "hardlink", link="missing")], "hard link 'a' points at missing"),
        ([Entry("loop", "symlink", link="loop"), Entry("loop/x", data=b"")], "too many levels of symbolic links"),
    ],
)
def test_bad_entries_are_one_line_errors(tmp_path, layer, message):
    image = str(tmp_path / "img")
    make_ext4(image, 256 << 20)
    with pytest.raises(CorruptDataError) as e:
        apply_layer_file(image, _blob_file(tmp_path, layer))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("corrupt", ["truncated-gzip", "garbage"])
def test_corrupt_layer_names_the_blob(tmp_path, corrupt):
    image = str(tmp_path / "img")
    make_ext4(image, 256 << 20)
    good = compress(build_tar([Entry("f", data=_rand(100_000, 5))]), "gzip")
    data = good[: len(good) // 2] if corrupt == "truncated-gzip" else b"\x1f\x8b" + b"\x07" * 2000
    path = _blob_file(tmp_path, data, "layer.tgz")
    with pytest.raises(CorruptDataError) as e:
        apply_layer_file(image, path)
    assert str(e.value).startswith(path)


def test_hostile_paths_stay_inside_the_root(tmp_path):
    image = str(tmp_path / "img")
    make_ext4(image, 256 << 20)
    layer = [
        Entry("escape", "symlink", link="../../../../outside"),
        Entry("escape/x", data=b"through a symlink pointing above /"),
        Entry("abs", "symlink", link="/etc"),
        Entry("abs/y", data=b"through an absolute symlink"),
        Entry("slow", "symlink", link="a" * 70 + "/../target"),  # > 60 bytes: stored in a block
        Entry("slow/z", data=b"through a slow symlink made in the same layer"),
    ]
    apply_layer_file(image, _blob_file(tmp_path, layer))
    tree = read_tree(image)
    assert tree["/outside/x"].type == "reg" and tree["/etc/y"].type == "reg" and tree["/target/z"].type == "reg"
    assert tree["/escape"].type == "sym"


def test_apply_needs_no_root(tmp_path, layers):
    """The whole conversion core runs as nobody (uid 65534)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root to drop to nobody with setpriv")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*nobody, sys.executable, "-c", "import tcmu_overlaybd.convert.apply"],
                           cwd="/", env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run this checkout's python: {probe.stderr.strip().splitlines()[-1:]}")
    work = tempfile.mkdtemp(prefix="obd-nobody-")
    try:
        os.chmod(work, 0o777)
        paths = []
        for i, (blob, _tar) in enumerate(layers):
            p = os.path.join(work, f"layer{i}")
            with open(p, "wb") as f:
                f.write(blob)
            paths.append(p)
        image = os.path.join(work, "image.ext4")
        script = (
            "import sys\n"
            "from tcmu_overlaybd.convert.mkfs import make_ext4\n"
            "from tcmu_overlaybd.convert.apply import apply_layer_file\n"
            f"make_ext4({image!r}, {VSIZE})\n"
            f"for p in {paths!r}: apply_layer_file({image!r}, p)\n"
        )
        res = subprocess.run(
            [*nobody, sys.executable, "-c", script],
            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, HOME=work), capture_output=True, text=True,
        )
        assert res.returncode == 0, res.stderr
        assert os.stat(image).st_uid == 65534
        assert read_tree(image) == reference_tree([blob for blob, _ in layers])
    finally:
        shutil.rmtree(work)


def test_decompressed_detects_plain_gzip_and_zstd():
    tar = build_tar([Entry("f", data=b"x" * 1000)])
    for how in ("tar", "gzip", "zstd"):
        assert decompressed(io.BytesIO(compress(tar, how))).read() == tar


def test_gzip_members_are_all_read_and_the_first_one_is_measured():
    tar = build_tar([Entry("f", data=_rand(300_000, 7))])
    two = gzip.compress(tar[:100_000], mtime=0) + gzip.compress(tar[100_000:], mtime=0) + bytes(512)
    reader = decompressed(io.BytesIO(two))
    assert reader.first_member_end is None
    assert reader.read(-1) == tar and reader.first_member_end == 100_000


def test_a_missing_image_is_a_one_line_error(tmp_path):
    with pytest.raises(Ext2fsError) as e:
        Filesystem(str(tmp_path / "nope"))
    assert str(e.value).startswith(str(tmp_path / "nope") + ": open: ") and "\n" not in str(e.value)


def test_large_directories_grow_and_shrink_cleanly(tmp_path):
    """Thousands of long names: directories expand past one block; whiteouts in a lower one."""
    names = [f"{i:05d}-" + "n" * 100 for i in range(1500)]
    l1 = [Entry("big", "dir")] + [Entry(f"big/{n}", data=n.encode()) for n in names]
    l2 = [Entry(f"big/{n}", "whiteout") for n in names[::2]] + [Entry("big/added", data=b"new")]
    blobs = [compress(build_tar(l1), "gzip"), build_tar(l2)]
    image = str(tmp_path / "img")
    make_ext4(image, 256 << 20)
    for i, blob in enumerate(blobs):
        apply_layer_file(image, _blob_file(tmp_path, blob, f"l{i}"), MODE_MAP)
    rc, out = fsck_clean(image)
    assert rc == 0, out
    tree = read_tree(image)
    assert tree == reference_tree(blobs)
    assert len([p for p in tree if p.startswith("/big/")]) == 751


@pytest.mark.parametrize(
    "name, parts",
    [("a/b/../c", (b"a", b"c")), ("../../x", (b"x",)), ("/abs//y/./z/", (b"abs", b"y", b"z")), ("./", ())],
)
def test_paths_are_cleaned_inside_the_root(name, parts):
    assert clean_path(name) == parts


@pytest.mark.parametrize(
    "text, want",
    [("1700000000.5", (1_700_000_000, 500_000_000)), ("-1.25", (-2, 750_000_000)), ("42", (42, 0)),
     ("1.123456789123", (1, 123_456_789))],
)
def test_pax_mtime_keeps_nanoseconds(text, want):
    info = tarfile.TarInfo("f")
    info.pax_headers = {"mtime": text}
    assert pax_time(info) == want


def test_opaque_directory_over_a_big_lower_directory(tmp_path):
    """An opaque marker with nothing of its layer below empties the directory at once."""
    l1 = [Entry("big/sub/deep", data=b"deep"), Entry("keep", data=b"outside")]
    l1 += [Entry(f"big/f{i:04d}-" + "n" * 60, data=b"%d" % i) for i in range(2000)]
    l1 += [Entry("big/hl", "hardlink", link="keep"), Entry("big/sub2", "dir")]
    l2 = [Entry("big", "dir", mode=0o750), Entry("big", "opaque"), Entry("big/new", data=b"new")]
    blobs = [build_tar(l1), build_tar(l2)]
    image = str(tmp_path / "img")
    make_ext4(image, 256 << 20)
    for i, blob in enumerate(blobs):
        apply_layer_file(image, _blob_file(tmp_path, blob, f"l{i}"))
    rc, out = fsck_clean(image)
    assert rc == 0, out
    tree = read_tree(image)
    assert tree == reference_tree(blobs)
    assert sorted(p for p in tree if p.startswith("/big")) == ["/big", "/big/new"]


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A POSIX ACL in the VFS xattr format (version 2, then tag/perm/id entries)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_posix_acls_are_stored_as_acls(tmp_path):
    """system.posix_acl_* from PAX are converted to ext4's on-disk ACL format."""
    undefined = 0xFFFFFFFF
    acl = _acl((1, 6, undefined), (2, 6, 1000), (4, 4, undefined), (0x10, 6, undefined), (0x20, 4, undefined))
    image = str(tmp_path / "img")
    make_ext4(image, 256 << 20)
    apply_layer_file(image, _blob_file(tmp_path, [Entry("f", data=b"x", xattrs={"system.posix_acl_access": acl})]))
    rc, out = fsck_clean(image)
    assert rc == 0, out
    (name, value), = read_tree(image)["/f"].xattrs
    # debugfs translates back with id 0 where the VFS format has "undefined"
    assert name == "system.posix_acl_access"
    assert value == _acl((1, 6, 0), (2, 6, 1000), (4, 4, 0), (0x10, 6, 0), (0x20, 4, 0))
