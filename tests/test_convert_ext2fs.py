"""The libext2fs binding on real images, checked with e2fsck and debugfs."""

from __future__ import annotations

import stat

import pytest

from tcmu_overlaybd.convert.ext2fs import ROOT_INO, Ext2fsError, Filesystem
from tcmu_overlaybd.convert.inode import Inode, decode_rdev
from tcmu_overlaybd.convert.mkfs import make_ext4
from tcmu_overlaybd.errors import ObdError

from .helpers.ext4_tree import debugfs_batch, fsck_clean, stat_fields


@pytest.fixture()
def image(tmp_path):
    path = str(tmp_path / "img")
    make_ext4(path, 256 << 20)
    return path


def _file(fs: Filesystem, dir_ino: int, name: bytes, seconds: int = 0, nsec: int = 0) -> int:
    inode = Inode.new(stat.S_IFREG | 0o644, 0, 0, seconds, nsec)
    inode.init_extents()
    return fs.create(dir_ino, name, inode)


def test_thousands_of_entries_in_one_directory(image):
    with Filesystem(image) as fs:
        d = fs.mkdir(ROOT_INO, b"big")
        inos = {b"%04d-" % i + b"x" * 150: _file(fs, d, b"%04d-" % i + b"x" * 150) for i in range(3000)}
        for name in list(inos)[::3]:
            assert fs.remove(d, name, inos.pop(name)) != []
        _file(fs, d, b"last")
    rc, out = fsck_clean(image)
    assert rc == 0, out
    listing = debugfs_batch(image, ["ls -p -r /big"])[0]
    names = {line.split("/")[5] for line in listing.splitlines() if line.startswith("/") and line.split("/")[1] != "0"}
    assert names - {".", ".."} == {n.decode() for n in inos} | {"last"}


def test_names_are_unique_per_directory(image):
    with Filesystem(image) as fs:
        _file(fs, ROOT_INO, b"same")
        with pytest.raises(ObdError, match="already exists"):
            _file(fs, ROOT_INO, b"same")


@pytest.mark.slow
def test_directory_link_count_saturates_at_one(tmp_path):
    """dir_nlink: more than 65000 subdirectories leave the parent with i_links_count 1."""
    image = str(tmp_path / "img")
    make_ext4(image, 1 << 30)  # 65536 inodes
    with Filesystem(image) as fs:
        d = fs.mkdir(ROOT_INO, b"many")
        for i in range(65010):
            fs.mkdir(d, b"%05d" % i)
        assert fs.read_inode(d).links == 1
    rc, out = fsck_clean(image)
    assert rc == 0, out


@pytest.mark.parametrize(
    "seconds, nsec, raw",
    [
        (1_700_000_000, 999_999_999, (1_700_000_000, 999_999_999 << 2)),
        (-1, 0, (0xFFFFFFFF, 0)),  # 1969
        (1 << 31, 5, (0x80000000, 1 | 5 << 2)),  # 2038 + epoch bit
    ],
)
def test_timestamps_use_the_ext4_extra_encoding(image, seconds, nsec, raw):
    with Filesystem(image) as fs:
        _file(fs, ROOT_INO, b"t", seconds, nsec)
    st = stat_fields(debugfs_batch(image, ["stat /t"])[0])
    assert (st["mtime"], st["mtime_extra"]) == raw


@pytest.mark.parametrize("dev", [(1, 3), (8, 0), (300, 70000), (4095, (1 << 20) - 1)])
def test_device_numbers_round_trip(image, dev):
    inode = Inode.new(stat.S_IFCHR | 0o600, 0, 0, 0, 0)
    inode.set_rdev(*dev)
    assert decode_rdev(inode.get("i_block0"), inode.get("i_block1")) == dev
    with Filesystem(image) as fs:
        fs.create(ROOT_INO, b"dev", inode)
    assert stat_fields(debugfs_batch(image, ["stat /dev"])[0])["rdev"] == dev


def test_a_full_filesystem_is_a_one_line_error(image):
    with Filesystem(image) as fs:
        ino = _file(fs, ROOT_INO, b"huge")
        with pytest.raises(Ext2fsError) as e:
            fs.write_file(ino, ((off, bytes(1 << 20)) for off in range(0, 512 << 20, 1 << 20)), 512 << 20)
    assert str(e.value).startswith(image) and "\n" not in str(e.value)
