"""obd's private files (mount records, traces, hash records) are replaced whole or not at all."""

from __future__ import annotations

import os
import threading

import pytest

from tcmu_overlaybd.atomic import write_private_file


def test_replaces_the_file_whole_and_private_whatever_the_umask(tmp_path):
    path = tmp_path / "state.json"
    path.write_text("old")
    old = os.umask(0)
    try:
        write_private_file(str(path), b"new", fsync=True)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    path = tmp_path / "state.json"
    path.mkdir()  # the rename over it fails
    (path / "inside").write_text("old")
    with pytest.raises(OSError):
        write_private_file(str(path), b"new")
    assert (path / "inside").read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_symlink_planted_at_the_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep")
    path = tmp_path / "state.json"
    os.symlink(victim, f"{path}.{os.getpid()}.{threading.get_ident()}.tmp")
    write_private_file(str(path), b"new")
    assert victim.read_text() == "keep" and path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["state.json", "victim"]
