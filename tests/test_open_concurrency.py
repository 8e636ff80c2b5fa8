"""The layers of an image open concurrently (``image.disk.open_layers``), for native and TurboOCI images.

Upstream's two-layer commit of the small tree (native overlaybd) and its two
TurboOCI meta layers over the original gzip layers are published to Debian's
docker-registry and read through the test proxy, which delays every blob
request by ``RTT`` (a WAN round trip).  ``OPEN_CONCURRENCY = 1`` is the serial
open of before: one layer after the other, the original layer's head after
its meta tarball.
"""

from __future__ import annotations

import os
import time

import pytest

from tcmu_overlaybd.errors import CorruptDataError, NotFoundError
from tcmu_overlaybd.image import disk as disk_mod
from tcmu_overlaybd.image.disk import open_disk
from tcmu_overlaybd.image.manifest import REF_NAME
from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image
from tcmu_overlaybd.convert.publish import publish

from .helpers.layouts import native_layout, turbo_layout
from .helpers.registry import needs_registry, plain_registry, proxied_registry  # noqa: F401 - fixtures

SMALL = "upstream-small"
RTT = 0.15


@pytest.fixture
def images(proxied_registry, vectors, tmp_path):
    """{"overlaybd": ref, "fastoci": ref} through the proxy, and the proxy."""
    registry, proxy = proxied_registry
    commits = [vectors / SMALL / "overlaybd" / f"layer{i}.commit" for i in (0, 1)]
    metas = [vectors / SMALL / "turbooci" / f"layer{i}" / "turboOCIv1.tar.gz" for i in (0, 1)]
    layouts = {"overlaybd": (native_layout(tmp_path / "native", commits, "obd"), "obd"),
               "fastoci": (turbo_layout(tmp_path / "turbo", vectors / SMALL / "original", metas, "small", "turbo"),
                           "turbo")}
    refs = {}
    for fmt, (layout, tag) in layouts.items():
        [desc] = [d for d in OciLayoutStore(layout).entries if d.annotations.get(REF_NAME) == tag]
        publish(str(layout), desc, f"{registry.host}/small:{tag}", OpenOptions(plain_http=True, quiet=True))
        refs[fmt] = f"{proxy.host}/small:{tag}"
    return refs, proxy


def _timed_open(ref, proxy, cache_dir):
    """(seconds of open_disk with every blob request delayed by RTT, first MiB of the disk, blob requests)."""
    opts = OpenOptions(plain_http=True, quiet=True, cache_dir=str(cache_dir), gzip_cache_dir=str(cache_dir / "gz"))
    image = open_image(ref, opts)
    proxy.faults.clear()
    proxy.add_fault(f"delay:{RTT}", "/blobs/", times=10_000)
    proxy.reset_counters()
    t0 = time.perf_counter()
    disk = open_disk(image, opts)
    seconds = time.perf_counter() - t0
    requests = sorted((m, p, r) for m, p, r, _ in proxy.log.requests)
    proxy.faults.clear()
    # the blobs stay bottom first, each layer's meta before its original, whatever finished first
    expected = [d.digest for la in image.layers for d in (la.descriptor, la.target) if d is not None]
    assert [b.name.rpartition("@")[2] for b in disk.blobs] == expected
    try:
        return seconds, disk.read(0, 1 << 20), requests
    finally:
        disk.close()


@pytest.mark.registry
@needs_registry
@pytest.mark.parametrize("fmt", ["overlaybd", "fastoci"])
def test_layers_open_concurrently(images, tmp_path, monkeypatch, fmt):
    refs, proxy = images
    monkeypatch.setattr(disk_mod, "OPEN_CONCURRENCY", 1)
    serial, serial_data, serial_requests = _timed_open(refs[fmt], proxy, tmp_path / "serial")
    monkeypatch.setattr(disk_mod, "OPEN_CONCURRENCY", 8)
    now, data, requests = _timed_open(refs[fmt], proxy, tmp_path / "concurrent")
    assert data == serial_data and data.strip(b"\0")  # the same disk (the superblock is in the first MiB)
    assert requests == serial_requests  # the same requests, only overlapped
    rounds = len(requests)
    assert serial >= rounds * RTT  # one after the other
    assert now <= serial * 0.6, f"open {now:.3f} s concurrent vs {serial:.3f} s serial ({rounds} requests)"


def test_first_broken_layer_is_reported_whatever_the_timing(vectors, tmp_path):
    """Both layers of a local layout broken: the error names the lower one, although the upper
    one (8x smaller, so hashed sooner) fails first."""
    commits = [vectors / SMALL / "overlaybd" / f"layer{i}.commit" for i in (0, 1)]
    layout = native_layout(tmp_path / "native", commits, "obd")
    image = open_image(f"oci:{layout}:obd", OpenOptions())
    lower, upper = (la.descriptor.digest for la in image.layers)
    for digest in (lower, upper):
        with open(layout / "blobs" / "sha256" / digest[7:], "r+b") as f:
            f.seek(100_000)
            f.write(b"X")
    for _ in range(3):
        with pytest.raises(CorruptDataError) as err:
            open_disk(image, OpenOptions())
        assert str(err.value).startswith(f"{lower}: oci:{layout}: blob content does not match its digest")


def test_fastoci_missing_originals_report_the_lowest_and_close_what_was_opened(vectors, tmp_path):
    """TurboOCI, local layout, both original layers gone: the lower one is named (one line), and
    the meta blobs opened meanwhile are closed again."""
    metas = [vectors / SMALL / "turbooci" / f"layer{i}" / "turboOCIv1.tar.gz" for i in (0, 1)]
    layout = turbo_layout(tmp_path / "turbo", vectors / SMALL / "original", metas, "small", "turbo")
    image = open_image(f"oci:{layout}:turbo", OpenOptions())
    lower, upper = (la.target.digest for la in image.layers)
    for digest in (lower, upper):
        (layout / "blobs" / "sha256" / digest[7:]).unlink()
    with pytest.raises(NotFoundError) as err:
        open_disk(image, OpenOptions())
    assert str(err.value) == (f"oci:{layout}: blob {lower} is missing "
                              f"({layout / 'blobs' / 'sha256' / lower[7:]})")
    assert _open_files_under(layout) == []


def _open_files_under(path) -> list[str]:
    """Files under ``path`` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed meanwhile (the listing's own fd)
        if target.startswith(f"{path}/"):
            found.append(target)
    return found
