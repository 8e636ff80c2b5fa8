"""The baseline: pull an image the traditional way, then start its app.

What ``docker pull`` + ``docker run`` do, without an engine: resolve the image
with obd's registry client, download every layer blob in full (up to
``DOWNLOADS`` at a time, like dockerd's ``max-concurrent-downloads``) into
files, verifying each digest, and unpack them in order (gunzip + untar with
whiteouts) as soon as each one and its predecessors are in.  The pull is done
when the last layer is unpacked; the service is available when the app started
from the unpacked root answers ``GET /``.  Both are timed from the same start.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

from tcmu_overlaybd.errors import CorruptDataError, UnsupportedError, UsageError
from tcmu_overlaybd.image.manifest import Layer
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.registry import RegistryClient, RegistryStore, repo_scope
from tcmu_overlaybd.image.resolve import open_image

from . import cpu
from .result import ColdStart
from .service import AppConfig, RunningApp, wait_http
from .unpack import apply_layer

DOWNLOADS = 3
_CHUNK = 1 << 20


def download_blob(client: RegistryClient, repo: str, digest: str, size: int, path: str) -> None:
    """Stream one blob into ``path``, verified against ``digest`` (retried from scratch by the client)."""

    def read(resp):
        h = hashlib.sha256()
        got = 0
        with open(path, "wb") as f:
            for chunk in resp.iter_content(_CHUNK):
                h.update(chunk)
                f.write(chunk)
                got += len(chunk)
        client.count_bytes(got)
        if got != size:
            raise CorruptDataError(f"registry sent {got} of {size} bytes", blob=digest)
        if "sha256:" + h.hexdigest() != digest:
            raise CorruptDataError(f"downloaded content hashes to sha256:{h.hexdigest()}", blob=digest)

    client.call("GET", f"/v2/{repo}/blobs/{digest}", what=f"blob {digest}", scope=repo_scope(repo), read=read)


def _open_layer(layer: Layer, path: str):
    if layer.kind == "oci-gzip":
        return gzip.open(path, "rb")
    if layer.kind == "oci-tar":
        return open(path, "rb")
    raise UnsupportedError(f"traditional pull: layer {layer.descriptor.digest} is {layer.kind}, "
                           "not a gzip or plain tar layer")


def pull(ref: str, rootfs: str, work: str, opts: OpenOptions) -> tuple[dict, dict]:
    """Download and unpack ``ref`` into ``rootfs`` (which must not exist).

    Returns (image config, figures: ``bytes_fetched``, ``requests``, ``unpacked_entries``,
    ``registry_size``).
    """
    os.makedirs(rootfs)
    os.makedirs(work, exist_ok=True)
    image = open_image(ref, opts)
    try:
        if not isinstance(image.store, RegistryStore):
            raise UsageError(f"{ref}: the traditional pull needs a registry reference")
        client = image.store.client
        repo = image.reference.repository
        layers = image.layers
        for layer in layers:
            if layer.kind not in ("oci-gzip", "oci-tar"):
                _open_layer(layer, "")  # raises the UnsupportedError
        paths = [os.path.join(work, layer.descriptor.digest.replace(":", "_")) for layer in layers]
        entries = 0
        with ThreadPoolExecutor(DOWNLOADS) as pool:
            futures = [pool.submit(download_blob, client, repo, layer.descriptor.digest, layer.descriptor.size, p)
                       for layer, p in zip(layers, paths)]
            for layer, path, fut in zip(layers, paths, futures):
                fut.result()
                with _open_layer(layer, path) as f:
                    entries += apply_layer(f, rootfs, layer.descriptor.digest)
                os.unlink(path)
        figures = {"bytes_fetched": client.bytes_received, "requests": client.requests_sent,
                   "unpacked_entries": entries,
                   "registry_size": image.manifest_descriptor.size + image.config_descriptor.size
                   + sum(layer.descriptor.size for layer in layers)}
        return image.config, figures
    finally:
        image.store.close()


def cold_start(image_name: str, ref: str, work: str, opts: OpenOptions, port: int,
               timeout: float = 600.0) -> ColdStart:
    """Measure one traditional cold start of ``ref`` with a fresh root under ``work``."""
    rootfs = os.path.join(work, "rootfs")
    remove_rootfs(rootfs)
    c0 = cpu.Snapshot.take()
    t0 = time.monotonic()
    config, figures = pull(ref, rootfs, os.path.join(work, "blobs"), opts)
    t_pull = time.monotonic()
    c_pull = cpu.Snapshot.take()
    app = RunningApp(rootfs, AppConfig.from_image_config(config).with_port(port))
    try:
        t_up = wait_http(app, port, timeout, since=t0)
        c_up = cpu.Snapshot.take()
    finally:
        app.stop()
    remove_rootfs(rootfs)
    return ColdStart(image_name, "traditional", t_pull - t0, t_up - t0, figures["bytes_fetched"],
                     figures["registry_size"], figures["requests"],
                     details={"unpacked_entries": figures["unpacked_entries"],
                              "cpu_s": cpu.phases(c0, c_pull, c_up, {os.getpid(): "benchmark driver"})})


def remove_rootfs(rootfs: str) -> None:
    """Delete an unpacked root.

    Safe while an app namespace still exists: its /proc and /dev mounts live in
    that private mount namespace, never in ours, so this never reaches the host's /dev.
    """
    if os.path.lexists(rootfs):
        shutil.rmtree(rootfs)
