"""The base ext4 of a conversion (spec §6.2)."""

from __future__ import annotations

import hashlib
import re
import subprocess

import pytest

from tcmu_overlaybd.convert.diff import changed_extents
from tcmu_overlaybd.convert.mkfs import make_ext4
from tcmu_overlaybd.errors import UsageError

from .helpers.ext4_tree import fsck_clean

SPEC_FEATURES = {
    "64bit", "sparse_super", "sparse_super2", "filetype", "resize_inode", "dir_index", "ext_attr",
    "dir_nlink", "large_file", "huge_file", "flex_bg", "extent", "extra_isize",
}  # fmt: skip


def _header(image: str) -> str:
    return subprocess.run(["dumpe2fs", "-h", image], capture_output=True, text=True, check=True).stdout


def test_spec_parameters_and_a_small_sparse_file(tmp_path):
    image = str(tmp_path / "img")
    make_ext4(image)  # the default 64 GiB
    rc, out = fsck_clean(image)
    assert rc == 0, out
    h = _header(image)
    field = lambda name: re.search(rf"^{name}:\s+(.*)$", h, re.M).group(1).strip()  # noqa: E731
    assert set(field("Filesystem features").split()) == SPEC_FEATURES  # no journal, no checksums
    assert (field("Block size"), field("Inode size"), field("Block count"), field("Inode count")) == (
        "4096", "256", "16777216", "4194304")
    assert field("Default directory hash") == "half_md4" and field("Maximum mount count") == "-1"
    assert "Directory Hash Seed" not in h and field("Filesystem UUID") == "<none>"  # all zero
    assert "Filesystem created" not in h  # s_mkfs_time 0
    assert field("Backup block groups") == "1 511"
    # the 1 GiB of inode tables mke2fs zero-fills are holes again
    assert sum(c.length for c in changed_extents(None, image)) < 16 << 20


def test_mkfs_is_reproducible(tmp_path):
    digests = set()
    for name in ("a", "b"):
        make_ext4(str(tmp_path / name), 256 << 20)
        digests.add(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize("vsize", [1 << 20, (64 << 20) + 1])
def test_bad_virtual_sizes_are_usage_errors(tmp_path, vsize):
    with pytest.raises(UsageError, match="--vsize"):
        make_ext4(str(tmp_path / "img"), vsize)
