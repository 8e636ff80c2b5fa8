"""TurboOCI (spec §4): upstream meta layers over the untouched original layers give the same tree."""

from __future__ import annotations

import gzip
import hashlib
import io
import pathlib
import tarfile

import pytest

from tcmu_overlaybd.block.source import BytesSource, CountingSource, FileSource
from tcmu_overlaybd.block.stack import StackedDisk
from tcmu_overlaybd.cache.gzipcache import GzipCache
from tcmu_overlaybd.errors import CorruptDataError, UnsupportedError
from tcmu_overlaybd.ext4.fs import Ext4
from tcmu_overlaybd.format.turbooci import open_turbo_layer, open_warp_layer, read_meta_tarball
from tcmu_overlaybd.image.manifest import (
    ANN_BLOB_DIGEST, ANN_BLOB_SIZE, ANN_TURBO_TARGET_DIGEST, ANN_TURBO_TARGET_MEDIA_TYPE, ANN_VERSION, OCI_LAYER_GZIP,
    VERSION_TURBO,
)

from .helpers.layouts import add_blob, add_manifest

ORIGINAL = {
    0: "571e1a65fc028b27eef187aacb31f98c45aaec82a8f24b0e9bce1f658d7d94c1",
    1: "ed5169527c7317edecd662ed75cada0b65adc02a4431825bccc713dcb0dd6c07",
}


@pytest.fixture(scope="module")
def small(vectors):
    return vectors / "upstream-small"


def _target(small, n) -> CountingSource:
    path = small / "original" / "blobs" / "sha256" / ORIGINAL[n]
    return CountingSource(FileSource(path, name="sha256:" + ORIGINAL[n]))


def _meta(small, n) -> FileSource:
    return FileSource(small / "turbooci" / f"layer{n}" / "turboOCIv1.tar.gz")


def _stack(small, gzip_cache=None):
    targets = [_target(small, n) for n in (0, 1)]
    layers = [open_turbo_layer(_meta(small, n), targets[n], target_is_gzip=True, gzip_cache=gzip_cache)
              for n in (0, 1)]
    return StackedDisk(layers), targets


def _tree(fs: Ext4) -> list[str]:
    """Lines like upstream's tree.txt: ``type path [size sha256]`` / ``link path -> target``."""
    out = []

    def walk(inode, prefix):
        for e in fs.listdir(inode):
            path = f"{prefix}/{e.name}"
            child = fs.inode(e.ino)
            if e.type == "d":
                out.append(f"dir  {path}")
                walk(child, path)
            elif e.type == "l":
                out.append(f"link {path} -> {fs.readlink(child)}")
            else:
                data = fs.read(child)
                out.append(f"file {path} {len(data)} {hashlib.sha256(data).hexdigest()}")

    walk(fs.root, ".")
    return sorted(out)


def _tar_member(small, n, name) -> bytes:
    blob = (small / "original" / "blobs" / "sha256" / ORIGINAL[n]).read_bytes()
    return tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))).extractfile(name).read()


def test_meta_tarball_members_are_the_upstream_files(small):
    for n in (0, 1):
        meta = read_meta_tarball(_meta(small, n))
        assert meta.fs_type == "ext4" and meta.has_marker
        assert meta.fs_meta == (small / "turbooci" / f"layer{n}" / "ext4.fs.meta").read_bytes()
        assert meta.gzip_index == (small / "turbooci" / f"layer{n}" / "gzip.meta").read_bytes()


def test_legacy_fastoci_meta_layer(small):
    l1 = small / "turbooci" / "layer1"
    legacy = _targz({"ext4.fs.meta": (l1 / "ext4.fs.meta").read_bytes(), ".fastoci.overlaybd": b"",
                     "gzip.meta": (l1 / "gzip.meta").read_bytes()})
    meta = read_meta_tarball(BytesSource(legacy, "foci.tar.gz"))
    assert meta.has_marker and meta.gzip_index == (l1 / "gzip.meta").read_bytes()
    assert not read_meta_tarball(BytesSource(_targz({"ext4.fs.meta": b"x"}), "bare.tgz")).has_marker


def test_whole_tree_matches_upstream_export(small):
    disk, targets = _stack(small)
    expected = sorted(line.rstrip("\n") for line in (small / "tree.txt").read_text().splitlines() if line.strip())
    assert _tree(Ext4(disk)) == expected
    # file data came from the original layers: every compressed byte of both was needed
    assert targets[0].bytes_read >= 2249143 * 0.9 and targets[1].bytes_read > 0


def test_file_bytes_come_from_the_right_original_layer(small):
    disk, (t0, t1) = _stack(small)
    fs = Ext4(disk)
    before = (t0.bytes_read, t1.bytes_read)
    big = fs.read(fs.lookup("data/big.txt"))
    assert big == _tar_member(small, 0, "data/big.txt") and len(big) == 1572864
    assert t0.bytes_read - before[0] > 300_000  # inflated from layer 0's gzip blob
    assert t1.bytes_read == before[1]  # layer 1 untouched
    mid = t1.bytes_read
    assert fs.read(fs.lookup("data/b/new.txt")) == _tar_member(small, 1, "data/b/new.txt")
    assert t1.bytes_read > mid
    # layer 1 rewrote f000, whited out f002 and made data/b opaque
    assert fs.read(fs.lookup("data/a/f000.txt")) == _tar_member(small, 1, "data/a/f000.txt")
    names_a = {e.name for e in fs.listdir(fs.lookup("data/a"))}
    assert "f002.txt" not in names_a and "f004.txt" in names_a
    assert {e.name for e in fs.listdir(fs.lookup("data/b"))} == {"new.txt"}
    # the hardlink shares the inode
    assert fs.lookup("data/big.hard").ino == fs.lookup("data/big.txt").ino


def test_plain_tar_targets_and_direct_warp_layer(small):
    tar0 = gzip.decompress((small / "original" / "blobs" / "sha256" / ORIGINAL[0]).read_bytes())
    plain = CountingSource(BytesSource(tar0, "layer0.tar"))
    lf = open_turbo_layer(_meta(small, 0), plain, target_is_gzip=False)
    fs = Ext4(lf)
    assert fs.read(fs.lookup("etc/motd")) == _tar_member(small, 0, "etc/motd")
    # tag-1 segments point straight at tar offsets (moffset in sectors)
    motd_member = tarfile.open(fileobj=io.BytesIO(tar0)).getmember("etc/motd")
    assert motd_member.offset_data % 512 == 0
    assert any(tag == 1 and m * 512 == motd_member.offset_data for _, _, m, _, tag in lf.segments())
    warp = open_warp_layer(FileSource(small / "turbooci" / "layer0" / "ext4.fs.meta"), BytesSource(tar0, "t"))
    assert warp.read(0, 1 << 20) == lf.read(0, 1 << 20)


def test_through_the_gzip_cache(small, tmp_path):
    pool = GzipCache(tmp_path / "gzcache")
    disk, targets = _stack(small, gzip_cache=pool)
    fs = Ext4(disk)
    tree = _tree(fs)
    read_once = [t.bytes_read for t in targets]
    disk2, targets2 = _stack(small, gzip_cache=pool)  # a second mount of the same layers
    assert _tree(Ext4(disk2)) == tree
    # every data byte came from the cache: only the first block (the kind check at open) was read
    assert [t.bytes_read for t in targets2] == [512, 512]
    assert read_once[0] > 0
    assert sorted(name for name, _, _ in pool.files()) == sorted("sha256:" + d for d in ORIGINAL.values())


# --- bad input ------------------------------------------------------------------------------


def _one_line(err) -> str:
    assert "\n" not in str(err)
    return str(err)


def _targz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_damaged_fs_meta_names_blob_and_offset(small):
    raw = bytearray((small / "turbooci" / "layer0" / "ext4.fs.meta").read_bytes())
    raw[20000:20008] = b"\xde\xad\xbe\xef" * 2
    tar0 = BytesSource(gzip.decompress((small / "original" / "blobs" / "sha256" / ORIGINAL[0]).read_bytes()))
    warp = open_warp_layer(BytesSource(bytes(raw), "ext4.fs.meta"), tar0)
    with pytest.raises(CorruptDataError) as ei:
        for offset, length, _, _, tag in warp.segments():
            if tag == 0:  # all filesystem metadata held by the layer itself
                warp.read(offset * 512, length * 512)
    assert _one_line(ei.value) == "ext4.fs.meta at offset 19979: ZFile block 305 CRC mismatch"
    raw[-1000:-992] = b"\xde\xad\xbe\xef" * 2  # the jump table: refused at open
    with pytest.raises(CorruptDataError, match=r"^ext4\.fs\.meta at offset \d+: ZFile jump table CRC mismatch"):
        open_warp_layer(BytesSource(bytes(raw), "ext4.fs.meta"), tar0)


def test_truncated_target_names_the_target(small):
    tar0 = gzip.decompress((small / "original" / "blobs" / "sha256" / ORIGINAL[0]).read_bytes())
    cut = BytesSource(tar0[:3_000_000], "sha256:short")
    fs = Ext4(open_turbo_layer(_meta(small, 0), cut, target_is_gzip=False))
    with pytest.raises(CorruptDataError) as ei:
        fs.read(fs.lookup("data/big.txt"))
    assert _one_line(ei.value) == (
        "sha256:short at offset 3000000: truncated: the layer's tar has 3000000 bytes, "
        "TurboOCI metadata maps [3813888, 5386752)"
    )
    blob = (small / "original" / "blobs" / "sha256" / ORIGINAL[0]).read_bytes()
    with pytest.raises(CorruptDataError, match=r"^sha256:cutgz at offset 2000000: gzip blob is 2000000 bytes"):
        open_turbo_layer(_meta(small, 0), BytesSource(blob[:2_000_000], "sha256:cutgz"), target_is_gzip=True)


def test_media_type_must_match_the_original_layer(small):
    with pytest.raises(CorruptDataError, match=r"^sha256:\w+ at offset 0: the original layer is gzip but its media "
                                               r"type says plain tar$"):
        open_turbo_layer(_meta(small, 0), _target(small, 0), target_is_gzip=False)
    tar0 = gzip.decompress((small / "original" / "blobs" / "sha256" / ORIGINAL[0]).read_bytes())
    with pytest.raises(CorruptDataError, match=r"^l0\.tar at offset 0: the original layer is plain tar but its media "
                                               r"type says gzip$"):
        open_turbo_layer(_meta(small, 0), BytesSource(tar0, "l0.tar"), target_is_gzip=True)
    with pytest.raises(CorruptDataError, match=r"^junk at offset 0: the original layer is neither gzip nor a tar$"):
        open_turbo_layer(_meta(small, 0), BytesSource(b"junk" * 200, "junk"), target_is_gzip=False)
    import zstandard

    with pytest.raises(UnsupportedError, match=r"^z: TurboOCI over a zstd-compressed layer is not supported$"):
        open_turbo_layer(_meta(small, 0), BytesSource(zstandard.compress(tar0[:10000]), "z"), target_is_gzip=False)


def test_bad_meta_tarballs(small):
    target = BytesSource(b"", "t")
    with pytest.raises(CorruptDataError, match=r"^m\.tgz at offset 0: meta layer does not gunzip"):
        read_meta_tarball(BytesSource(b"\x1f\x8b" + b"\x00" * 50, "m.tgz"))
    good = (small / "turbooci" / "layer0" / "turboOCIv1.tar.gz").read_bytes()
    with pytest.raises(CorruptDataError, match=r"^m\.tgz at offset 50000: truncated gzip stream"):
        read_meta_tarball(BytesSource(good[:50000], "m.tgz"))
    many = {f"f{i:02}.txt": b"hi" for i in range(12)}
    with pytest.raises(CorruptDataError) as ei:
        read_meta_tarball(BytesSource(_targz(many), "x.tgz"))
    assert str(ei.value) == ("x.tgz at offset 0: not a TurboOCI meta layer: no ext4.fs.meta among its files "
                             "(f00.txt, f01.txt, f02.txt, f03.txt, f04.txt and 7 more)")
    with pytest.raises(UnsupportedError, match="erofs TurboOCI layers are not supported"):
        open_turbo_layer(BytesSource(_targz({"erofs.fs.meta": b"E" * 10, ".turbo.ociv1": b""}), "e.tgz"), target,
                         target_is_gzip=False)
    fs_meta = (small / "turbooci" / "layer0" / "ext4.fs.meta").read_bytes()
    no_index = BytesSource(_targz({"ext4.fs.meta": fs_meta, ".turbo.ociv1": b""}), "n.tgz")
    with pytest.raises(CorruptDataError, match=r"^n\.tgz at offset 0: the original layer is gzip but .*no gzip\.meta"):
        open_turbo_layer(no_index, _target(small, 0), target_is_gzip=True)


# --- writing the meta layer -----------------------------------------------------------------

#: sha256 of the uncompressed meta tar that Go's archive/tar (go1.19, the convertor's
#: tar.Header{Name, Mode, Size, Typeflag} of 0644 files) wrote for these members: the diff_id
GO_META_TAR_SHA256 = {
    "layer0 with gzip.meta": "fe677718470a510d0c71904241d8158774e11c9e0f8edda3bd7dbe26ecb54117",
    "layer1 without gzip.meta": "8f001f91d184582c68dd137fb679f9e004e5a4e57a23f83909a31f4c255bf542",
}


def test_meta_tar_is_byte_identical_to_the_go_convertor(small):
    from tcmu_overlaybd.format.turbooci import build_meta_tar

    l0 = small / "turbooci" / "layer0"
    tar0 = build_meta_tar((l0 / "ext4.fs.meta").read_bytes(), (l0 / "gzip.meta").read_bytes())
    assert hashlib.sha256(tar0).hexdigest() == GO_META_TAR_SHA256["layer0 with gzip.meta"]
    tar1 = build_meta_tar((small / "turbooci" / "layer1" / "ext4.fs.meta").read_bytes())
    assert hashlib.sha256(tar1).hexdigest() == GO_META_TAR_SHA256["layer1 without gzip.meta"]
    assert tar1.endswith(bytes(1024)) and len(tar1) % 512 == 0


def test_built_tarball_opens_like_the_upstream_one(small):
    from tcmu_overlaybd.format.turbooci import build_meta_tarball

    l0 = small / "turbooci" / "layer0"
    blob = build_meta_tarball((l0 / "ext4.fs.meta").read_bytes(), (l0 / "gzip.meta").read_bytes())
    meta = read_meta_tarball(BytesSource(blob, "built.tgz"))
    assert meta.has_marker and meta.fs_meta == (l0 / "ext4.fs.meta").read_bytes()
    fs = Ext4(open_turbo_layer(BytesSource(blob, "built.tgz"), _target(small, 0), target_is_gzip=True))
    assert fs.read(fs.lookup("etc/motd")) == _tar_member(small, 0, "etc/motd")


# --- end to end: a TurboOCI image in an OCI layout, read with the obd CLI --------------------


def _turbo_layout(small, dst, meta_blobs: dict[int, bytes] | None = None):
    """An OCI layout of the TurboOCI image: meta layers referencing the untouched originals."""
    layers, diff_ids = [], []
    for n in (0, 1):
        add_blob(dst, (small / "original" / "blobs" / "sha256" / ORIGINAL[n]).read_bytes())
        meta = (meta_blobs or {}).get(n) or (small / "turbooci" / f"layer{n}" / "turboOCIv1.tar.gz").read_bytes()
        digest, size = add_blob(dst, meta)
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(meta)).hexdigest())
        layers.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size, "annotations": {
            ANN_VERSION: VERSION_TURBO, ANN_BLOB_DIGEST: digest, ANN_BLOB_SIZE: str(size),
            ANN_TURBO_TARGET_DIGEST: "sha256:" + ORIGINAL[n], ANN_TURBO_TARGET_MEDIA_TYPE: OCI_LAYER_GZIP}})
    config = {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    add_manifest(dst, config, layers, "turbo")
    return dst


def _obd(tmp_path, *args):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OBD_GZIP_CACHE_DIR=str(tmp_path / "gzcache"), OBD_CACHE_DIR=str(tmp_path / "blocks"),
               OBD_CONFIG=str(tmp_path / "no-config.json"))
    (tmp_path / "no-config.json").write_text("{}")
    obd = pathlib.Path(sys.executable).with_name("obd")
    return subprocess.run([str(obd), *args], capture_output=True, env=env, timeout=120)


def test_obd_cat_and_ls_read_a_turbooci_image(small, tmp_path):
    layout = _turbo_layout(small, tmp_path / "layout")
    ref = f"oci:{layout}:turbo"
    res = _obd(tmp_path, "cat", ref, "/data/big.txt")
    assert res.returncode == 0, res.stderr
    assert res.stdout == _tar_member(small, 0, "data/big.txt")
    res = _obd(tmp_path, "ls", ref, "/data/b")
    assert (res.returncode, res.stdout) == (0, b"new.txt\n")
    # the decompressed view of layer 0 landed in the gzip cache, named by the original's digest
    assert (tmp_path / "gzcache" / ("sha256:" + ORIGINAL[0])).stat().st_size > 1_000_000


def test_obd_reports_a_damaged_meta_layer_in_one_line(small, tmp_path):
    from tcmu_overlaybd.format.turbooci import build_meta_tarball

    l0 = small / "turbooci" / "layer0"
    fs_meta = bytearray((l0 / "ext4.fs.meta").read_bytes())
    fs_meta[-1000:-992] = b"\xde\xad\xbe\xef" * 2  # the ZFile jump table
    layout = _turbo_layout(small, tmp_path / "layout",
                           {0: build_meta_tarball(bytes(fs_meta), (l0 / "gzip.meta").read_bytes())})
    res = _obd(tmp_path, "cat", f"oci:{layout}:turbo", "/etc/motd")
    assert res.returncode == 6 and res.stdout == b""
    err = res.stderr.decode().strip()
    assert "\n" not in err and err.startswith("obd: ") and "ext4.fs.meta at offset" in err
    assert "ZFile jump table CRC mismatch" in err
