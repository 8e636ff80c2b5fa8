"""The ext4 reader against filesystems made by real e2fsprogs (mke2fs -d), compared to the source tree."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
import subprocess

import pytest

from tcmu_overlaybd.block.source import BytesSource, CountingSource, FileSource
from tcmu_overlaybd.errors import CorruptDataError, NotFoundError, UnsupportedError
from tcmu_overlaybd.ext4.fs import Ext4
from tcmu_overlaybd.ext4.inode import FL_EXTENTS, FL_INDEX, FL_INLINE_DATA

pytestmark = pytest.mark.skipif(shutil.which("mke2fs") is None, reason="needs e2fsprogs")

FUTURE = 2_240_000_000  # after 2038: needs the epoch bits of the extra timestamp
LONG_TARGET = "/".join(["deep"] * 20) + "/target"  # > 60 bytes: a slow symlink


def _write_tree(root):
    """A small tree with every kind of inode and data layout the reader must handle."""
    (root / "dir" / "sub").mkdir(parents=True)
    (root / "empty").write_bytes(b"")
    (root / "small.txt").write_bytes(b"hello\n")
    (root / "dir" / "sub" / "nested.txt").write_bytes(b"n" * 100)
    big = hashlib.sha256(b"seed").digest() * (700_000 // 32)
    (root / "big.bin").write_bytes(big)  # > 12 + 256 blocks of 1 KiB: double indirect on ext3
    os.link(root / "big.bin", root / "dir" / "big.hard")
    with open(root / "sparse", "wb") as f:
        f.truncate(50 << 20)
        f.seek(20 << 20)
        f.write(b"island")
        f.seek((50 << 20) - 3)
        f.write(b"end")
    with open(root / "islands", "wb") as f:  # 20 separate extents: the tree needs depth > 0
        for i in range(20):
            f.seek(i * 65536)
            f.write(bytes([65 + i]) * 5000)
    os.symlink("small.txt", root / "fast.link")
    os.symlink(LONG_TARGET, root / "slow.link")
    os.symlink("dir/sub", root / "sub.link")
    os.symlink("/dir/sub/../sub", root / "abs.link")
    os.symlink("loop.b", root / "loop.a")
    os.symlink("loop.a", root / "loop.b")
    if os.geteuid() == 0:  # device nodes and foreign owners need root (CI runs as root)
        os.mknod(root / "chr", 0o620 | stat.S_IFCHR, os.makedev(4, 65))
        os.mknod(root / "blk", 0o660 | stat.S_IFBLK, os.makedev(259, 70000))
    os.mkfifo(root / "fifo")
    (root / "attrs").write_bytes(b"x")
    os.setxattr(root / "attrs", "user.small", b"v")
    os.setxattr(root / "attrs", "user.large", b"L" * 700)  # does not fit in the inode: xattr block
    (root / "script.sh").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "script.sh", 0o4755)
    if os.geteuid() == 0:
        os.chown(root / "script.sh", 1234, 5678)
    os.utime(root / "small.txt", ns=(FUTURE * 10**9, FUTURE * 10**9 + 123_456_789))
    (root / "caf\xe9-名前").write_bytes(b"utf8 name")
    with open(os.path.join(os.fsencode(root), b"not-utf8-\xff\xfe"), "wb") as f:  # names are bytes
        f.write(b"raw name")


def _mkfs(src, img, *args, size="64M"):
    subprocess.run(["mke2fs", "-q", "-F", *args, "-d", str(src), str(img), size], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return img


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    _write_tree(root)
    return root


VARIANTS = {
    "ext4-4k": ("-t", "ext4", "-b", "4096"),
    "ext4-1k": ("-t", "ext4", "-b", "1024"),
    "ext3-blockmap": ("-t", "ext3", "-b", "1024", "-O", "^extent"),
    "ext2": ("-t", "ext2", "-b", "2048"),
    "ext2-no-filetype": ("-t", "ext2", "-O", "^filetype"),
    "inline-data": ("-t", "ext4", "-O", "inline_data"),
    "meta-bg": ("-t", "ext4", "-b", "1024", "-O", "meta_bg,^resize_inode"),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def image(request, tree, tmp_path_factory):
    img = tmp_path_factory.mktemp("img") / f"{request.param}.img"
    _mkfs(tree, img, *VARIANTS[request.param])
    return request.param, img


def _walk(root):
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            yield "/" + os.path.relpath(full, root), os.lstat(full)


def test_tree_matches_source(tree, image):
    variant, img = image
    fs = Ext4(FileSource(img))
    seen = set()
    for path, st in _walk(tree):
        ino = fs.lookup(path, follow=False)
        got = fs.stat(ino)
        seen.add(path)
        assert got.mode == st.st_mode, path
        assert (got.uid, got.gid, got.nlink) == (st.st_uid, st.st_gid, st.st_nlink), path
        if st.st_mtime < 2**31:  # mke2fs -d stores 32-bit seconds only (see the debugfs test)
            assert got.mtime_ns // 10**9 == st.st_mtime_ns // 10**9, path
        if stat.S_ISREG(st.st_mode):
            data = open(os.path.join(tree, path[1:]), "rb").read()
            assert got.size == len(data)
            assert fs.read(ino) == data, path
        elif stat.S_ISLNK(st.st_mode):
            assert fs.readlink(ino) == os.readlink(os.path.join(tree, path[1:])), path
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            assert got.rdev == (os.major(st.st_rdev), os.minor(st.st_rdev)), path
        elif stat.S_ISDIR(st.st_mode):
            names = sorted(e.name for e in fs.listdir(ino))
            assert names == sorted(os.listdir(os.path.join(tree, path[1:]))), path
    root_names = {"/" + e.name for e in fs.listdir(fs.root)} - {"/lost+found"}
    assert root_names <= seen
    assert fs.xattrs(fs.lookup("/attrs")) == {"user.small": b"v", "user.large": b"L" * 700}
    # hard links share the inode
    assert fs.lookup("/big.bin").ino == fs.lookup("/dir/big.hard").ino
    assert fs.stat(fs.lookup("/big.bin")).nlink == 2
    if variant.startswith("ext4"):
        depth = struct.unpack_from("<HHHH", fs.lookup("/islands").block)[3]
        assert depth > 0
    if variant == "ext3-blockmap":
        assert not fs.lookup("/big.bin").flags & FL_EXTENTS
    if variant == "inline-data":
        assert fs.lookup("/small.txt").flags & FL_INLINE_DATA
        assert fs.lookup("/dir/sub").flags & FL_INLINE_DATA


def test_timestamps_with_nanoseconds_and_epoch_bits(tree, tmp_path):
    img = _mkfs(tree, tmp_path / "t.img", "-t", "ext4", "-I", "256")
    # mke2fs -d keeps whole seconds only: write an extra timestamp field with debugfs
    # the seconds field is signed: 2040 wraps negative and epoch 1 brings it back
    extra = (123_456_789 << 2) | 1
    for field, value in (("mtime", FUTURE & 0xFFFFFFFF), ("mtime_extra", extra)):
        subprocess.run(["debugfs", "-w", "-R", f"set_inode_field /small.txt {field} {value}", str(img)],
                       capture_output=True, check=True)
    fs = Ext4(FileSource(img))
    st = fs.stat(fs.lookup("/small.txt"))
    assert st.mtime_ns == FUTURE * 10**9 + 123_456_789  # after 2038: the epoch bits count


def test_symlink_resolution(tree, tmp_path):
    fs = Ext4(FileSource(_mkfs(tree, tmp_path / "t.img", "-t", "ext4")))
    assert fs.read(fs.lookup("/fast.link")) == b"hello\n"
    assert fs.read(fs.lookup("/sub.link/nested.txt")) == b"n" * 100
    assert fs.read(fs.lookup("/abs.link/nested.txt")) == b"n" * 100
    assert fs.read(fs.lookup("dir/sub/../../small.txt")) == b"hello\n"
    assert fs.lookup("/fast.link", follow=False).is_symlink
    assert fs.lookup("/sub.link/", follow=False).is_dir  # a trailing slash follows the link
    with pytest.raises(NotFoundError, match="/small.txt/: not a directory"):
        fs.lookup("/small.txt/")
    with pytest.raises(NotFoundError, match="too many levels of symbolic links"):
        fs.lookup("/loop.a")
    with pytest.raises(NotFoundError, match="/dir/missing: no such file"):
        fs.lookup("/dir/missing/x")
    with pytest.raises(NotFoundError, match="not a directory"):
        fs.lookup("/small.txt/x")


def test_htree_directory_with_thousands_of_entries(tmp_path):
    src = tmp_path / "src"
    (src / "many").mkdir(parents=True)
    names = [f"entry-{i:05d}-{'x' * (i % 40)}" for i in range(5000)]
    for n in names:
        (src / "many" / n).write_bytes(n.encode())
    img = _mkfs(src, tmp_path / "h.img", "-t", "ext4", "-b", "1024", size="128M")
    # e2fsck -D rebuilds every directory as a hashed (htree) directory
    subprocess.run(["e2fsck", "-fyD", str(img)], capture_output=True)
    src = CountingSource(FileSource(img))
    fs = Ext4(src)
    many = fs.lookup("/many")
    assert many.flags & FL_INDEX
    entries = fs.listdir(many)
    assert sorted(e.name for e in entries) == sorted(names)
    assert fs.read(fs.lookup("/many/" + names[4321])) == names[4321].encode()
    # stat'ing every entry reads each inode-table block once (4 inodes per 1 KiB block), not per inode
    before = src.calls
    assert {fs.stat(fs.inode(e.ino)).size for e in entries} == {len(n) for n in names}
    assert src.calls - before <= len(names) // 4 + 10


def test_second_opinion_from_debugfs(tree, tmp_path):
    img = _mkfs(tree, tmp_path / "t.img", "-t", "ext4")
    fs = Ext4(FileSource(img))
    out = subprocess.run(["debugfs", "-R", "ls -p /dir", str(img)], capture_output=True, check=True).stdout
    theirs = set()
    for line in out.decode("utf-8", "surrogateescape").splitlines():
        parts = line.strip().split("/")  # /ino/mode/uid/gid/name/size/
        if len(parts) >= 7 and parts[5] not in (".", ".."):
            theirs.add((int(parts[1]), int(parts[2], 8), parts[5]))
    ours = {(e.ino, fs.inode(e.ino).mode, e.name) for e in fs.listdir(fs.lookup("/dir"))}
    assert ours == theirs


def test_streaming_reads_and_extents(tree, tmp_path):
    img = _mkfs(tree, tmp_path / "t.img", "-t", "ext4")
    fs = Ext4(FileSource(img))
    ino = fs.lookup("/sparse")
    with fs.open(ino) as f:
        f.seek(20 << 20)
        assert f.read(6) == b"island"
        f.seek(-3, os.SEEK_END)
        assert f.read() == b"end"
    raw = img.read_bytes()
    extents = fs.file_extents(ino)
    # only the written blocks are listed, and they hold the file's bytes at those places
    assert sum(length for _, _, length in extents) <= 2 * 4096
    content = (tree / "sparse").read_bytes()
    for logical, physical, length in extents:
        assert raw[physical:physical + length] == content[logical:logical + length]
    big = fs.lookup("/big.bin")
    assert sum(length for _, _, length in fs.file_extents(big)) == big.size


def test_corrupt_and_unsupported_filesystems(tree, tmp_path):
    img = _mkfs(tree, tmp_path / "t.img", "-t", "ext4")
    good = bytearray(img.read_bytes())

    bad = bytearray(good)
    bad[1024 + 0x38:1024 + 0x3A] = b"\0\0"
    with pytest.raises(CorruptDataError, match="offset 1080: not an ext2/3/4 filesystem"):
        Ext4(BytesSource(bytes(bad), name="disk.img"))

    bad = bytearray(good)
    incompat = struct.unpack_from("<I", bad, 1024 + 0x60)[0]
    struct.pack_into("<I", bad, 1024 + 0x60, incompat | 0x10000)
    with pytest.raises(UnsupportedError, match="not supported: encrypt"):
        Ext4(BytesSource(bytes(bad), name="disk.img"))

    # with metadata_csum (mke2fs's default) the inode checksum notices the damage first ...
    fs = Ext4(BytesSource(bytes(good), name="disk.img"))
    inode_at = fs.lookup("/big.bin").offset
    bad = bytearray(good)
    bad[inode_at + 0x28:inode_at + 0x2A] = b"\0\0"
    fs = Ext4(BytesSource(bytes(bad), name="disk.img"))
    with pytest.raises(CorruptDataError, match=f"disk.img at offset {inode_at + 0x7C}: inode .*: checksum"):
        fs.lookup("/big.bin")
    bad = bytearray(good)
    bad[1024 + 0x78] ^= 1  # the volume name: only the superblock checksum can tell
    with pytest.raises(CorruptDataError, match=f"offset {1024 + 0x3FC}: superblock checksum"):
        Ext4(BytesSource(bytes(bad), name="disk.img"))

    # extent blocks and directory blocks carry their own checksums
    fs = Ext4(BytesSource(bytes(good), name="disk.img"))
    islands = fs.lookup("/islands")
    leaf = struct.unpack_from("<IIH", islands.block, 12)[1] * fs.block_size  # first index entry -> leaf
    bad = bytearray(good)
    bad[leaf + fs.block_size - 100] ^= 0xFF  # an unused slot: only the checksum covers it
    fs = Ext4(BytesSource(bytes(bad), name="disk.img"))
    with pytest.raises(CorruptDataError, match="extent block checksum does not match"):
        fs.read(fs.lookup("/islands"))
    fs = Ext4(BytesSource(bytes(good), name="disk.img"))
    [(_, dir_block, _)] = fs.file_extents(fs.lookup("/dir"))
    at = good.index(b"big.hard", dir_block)
    bad = bytearray(good)
    bad[at:at + 8] = b"big.HARD"  # a plausible name: only the checksum can tell
    fs = Ext4(BytesSource(bytes(bad), name="disk.img"))
    with pytest.raises(CorruptDataError, match=r"directory inode \d+: block checksum does not match"):
        fs.listdir(fs.lookup("/dir"))

    fs = Ext4(BytesSource(bytes(good), name="disk.img"))
    acl = fs.lookup("/attrs").file_acl * fs.block_size
    at = good.index(b"L" * 700, acl)
    bad = bytearray(good)
    bad[at] = ord("M")
    fs = Ext4(BytesSource(bytes(bad), name="disk.img"))
    with pytest.raises(CorruptDataError, match=f"offset {acl + 16}: inode .*xattr block checksum"):
        fs.xattrs(fs.lookup("/attrs"))

    # ... without checksums the extent tree's own sanity checks do
    good = _mkfs(tree, tmp_path / "nocsum.img", "-t", "ext4", "-O", "^metadata_csum").read_bytes()
    fs = Ext4(BytesSource(good, name="disk.img"))
    where = fs.lookup("/big.bin").offset + 0x28  # the extent header in i_block
    bad = bytearray(good)
    bad[where:where + 2] = b"\0\0"
    fs = Ext4(BytesSource(bytes(bad), name="disk.img"))
    with pytest.raises(CorruptDataError, match=f"disk.img at offset {where}: inode .*bad extent header"):
        fs.read(fs.lookup("/big.bin"))

    with pytest.raises(CorruptDataError, match="truncated"):
        Ext4(BytesSource(bytes(good[:1500]), name="disk.img"))


def _walk_everything(fs):
    """Touch every structure reachable from the root (names, stats, data, links, xattrs)."""
    seen = set()
    pending = [fs.root]
    while pending:
        ino = pending.pop()
        if ino.ino in seen:
            continue
        seen.add(ino.ino)
        fs.stat(ino)
        fs.xattrs(ino)
        if ino.is_dir:
            pending.extend(fs.inode(e.ino) for e in fs.listdir(ino))
        elif ino.is_symlink:
            fs.readlink(ino)
        elif ino.is_reg:
            fs.read(ino, 0, 1 << 20)
            fs.file_extents(ino)


def test_random_metadata_damage_never_leaks_a_python_error(tree, tmp_path):
    """Flip bytes in inodes and directory blocks: every failure must be a one-line ObdError."""
    import random

    from tcmu_overlaybd.errors import ObdError

    img = _mkfs(tree, tmp_path / "t.img", "-t", "ext4", "-b", "1024", "-O", "inline_data", size="8M")
    good = img.read_bytes()
    fs = Ext4(BytesSource(good))
    targets = []  # (start, length) of metadata the reader interprets
    for path, _ in _walk(tree):
        ino = fs.lookup(path, follow=False)
        targets.append((ino.offset, fs.sb.inode_size))
        if ino.is_dir and not ino.has_inline_data:
            targets += [(phys, length) for _, phys, length in fs.file_extents(ino)]
    targets.append((1024, 1024))
    rng = random.Random(1234)
    failures = 0
    for _ in range(300):
        bad = bytearray(good)
        start, length = rng.choice(targets)
        for _ in range(rng.randint(1, 8)):
            bad[start + rng.randrange(length)] = rng.randrange(256)
        try:
            _walk_everything(Ext4(BytesSource(bytes(bad), name="disk.img")))
        except ObdError as e:
            failures += 1
            assert "\n" not in str(e)
    assert failures > 0  # the damage was noticed at least sometimes


def test_kernel_made_base_layer(vectors):
    """The ext4_64 base layer (kernel mkfs, has_journal, 64bit, flex_bg) read through its LSMT layer."""
    from tcmu_overlaybd.format.layer import open_layer_blob

    layer = open_layer_blob(FileSource(vectors / "overlaybd" / "ext4_64.zfile"))
    try:
        fs = Ext4(layer)
        assert (fs.sb.block_size, fs.sb.inode_size, fs.sb.desc_size, fs.sb.blocks_count) == (4096, 256, 64, 1 << 24)
        assert [e.name for e in fs.listdir(fs.root)] == ["lost+found"]
        journal = fs.stat(fs.inode(8))
        assert (journal.type, journal.size) == ("-", 512 << 20)
        assert sum(length for _, _, length in fs.file_extents(fs.inode(8))) == 512 << 20
    finally:
        layer.close()


@pytest.mark.parametrize("variant", ["ext4-4k", "ext3-blockmap"])
def test_file_beyond_4_gib(tmp_path, variant):
    """i_size_high and logical blocks past 2^32 bytes (sparse, so the image stays small)."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "huge", "wb") as f:
        f.seek(5 << 30)
        f.write(b"tail!")
    fs = Ext4(FileSource(_mkfs(src, tmp_path / "t.img", *VARIANTS[variant])))
    ino = fs.lookup("/huge")
    assert ino.size == (5 << 30) + 5
    assert fs.read(ino, 5 << 30) == b"tail!"
    assert fs.read(ino, 3 << 30, 4096) == bytes(4096)
    [(logical, _, length)] = fs.file_extents(ino)
    assert (logical, length) == ((5 << 30) // fs.block_size * fs.block_size, (5 << 30) + 5 - logical)


def test_xattr_value_in_its_own_inode(tmp_path):
    """ea_inode: a large value lives in a separate inode; debugfs reads it back as the reference."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"x")
    img = _mkfs(src, tmp_path / "t.img", "-t", "ext4", "-b", "4096", "-O", "ea_inode", size="32M")
    (tmp_path / "val").write_bytes(bytes(range(256)) * 16)
    subprocess.run(["debugfs", "-w", "-R", f"ea_set -f {tmp_path / 'val'} /f user.big", str(img)],
                   capture_output=True, check=True)
    subprocess.run(["debugfs", "-R", f"ea_get -f {tmp_path / 'theirs'} /f user.big", str(img)],
                   capture_output=True, check=True)
    fs = Ext4(FileSource(img))
    [entry] = fs._xattr_entries(fs.lookup("/f"))
    assert entry.value_inum != 0  # really stored in an EA inode
    assert fs.xattrs(fs.lookup("/f")) == {"user.big": (tmp_path / "theirs").read_bytes()}
