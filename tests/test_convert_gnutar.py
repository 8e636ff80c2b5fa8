"""Layers written by real GNU tar (sparse 0.0 / 0.1 / 1.0, xattrs, hard links, FIFOs)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tcmu_overlaybd.convert.apply import MODE_DATA, MODE_MAP, apply_layer_file
from tcmu_overlaybd.convert.mkfs import make_ext4

from .helpers.ext4_tree import debugfs_batch, fsck_clean, read_tree
from .helpers.reference_tree import reference_tree

pytestmark = pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")

SPARSE_SIZE = 10 * (1 << 20) + 3


def _tree(root):
    os.makedirs(os.path.join(root, "dir/sub"))
    with open(os.path.join(root, "sparse"), "wb") as f:  # two data runs in 10 MiB of holes
        f.truncate(SPARSE_SIZE - 3)
        f.seek(5_000_000)
        f.write(b"hello")
        f.seek(SPARSE_SIZE - 3)
        f.write(b"end")
    with open(os.path.join(root, "dir/ünïcode.txt"), "wb") as f:
        f.write(os.urandom(70_000))
    os.link(os.path.join(root, "dir/ünïcode.txt"), os.path.join(root, "dir/sub/hardlink"))
    os.symlink("../sparse", os.path.join(root, "dir/link"))
    os.mkfifo(os.path.join(root, "dir/fifo"))
    with open(os.path.join(root, "suid"), "wb") as f:
        f.write(b"#!/bin/true\n")
    os.chmod(os.path.join(root, "suid"), 0o4755)
    os.setxattr(os.path.join(root, "dir/ünïcode.txt"), "user.origin", b"gnu tar")


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0"])
@pytest.mark.parametrize("mode", [MODE_DATA, MODE_MAP])
def test_gnu_tar_sparse_layers_are_expanded(tmp_path, version, mode):
    src = tmp_path / "src"
    src.mkdir()
    _tree(str(src))
    layer = tmp_path / "layer.tar"
    subprocess.run(
        ["tar", "--format=pax", "--sparse", f"--sparse-version={version}", "--xattrs", "--numeric-owner",
         "-cf", str(layer), "-C", str(src), "."],
        check=True,
    )
    image = str(tmp_path / "img")
    make_ext4(image, 256 << 20)
    apply_layer_file(image, str(layer), mode)
    rc, out = fsck_clean(image)
    assert rc == 0, out
    tree = read_tree(image)
    assert tree == reference_tree([layer.read_bytes()])
    assert tree["/sparse"].size == SPARSE_SIZE and not [p for p in tree if "GNUSparseFile" in p]
    assert dict(tree["/dir/ünïcode.txt"].xattrs) == {"user.origin": b"gnu tar"}
    assert tree["/dir/fifo"].type == "fifo" and tree["/suid"].mode == 0o4755
    # the holes stay holes: two 4 KiB blocks (+ at most one extent block), in 512-byte units
    blockcount = int(re.search(r"Blockcount: (\d+)", debugfs_batch(image, ["stat /sparse"])[0]).group(1))
    assert blockcount <= 24
