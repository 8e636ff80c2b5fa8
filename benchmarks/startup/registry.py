"""The benchmark's registry: Debian's ``docker-registry`` on 127.0.0.1, and pushing layouts into it.

The server is the test suite's ``RegistryServer`` (plain HTTP, filesystem
storage in a directory of ours); images go up with obd's own push code, blobs a
repository already holds are skipped.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.push import push_blob, push_manifest
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.registry import RegistryClient
from tests.helpers.registry import RegistryServer

#: images are pushed to ``<host>/bench/<image>``
REPO_PREFIX = "bench"


def registry_options() -> OpenOptions:
    """Options for talking to the local plain-HTTP registry (no proxy, quiet)."""
    return OpenOptions(plain_http=True, quiet=True, discover_accelerated=False)


@dataclass
class PushedImage:
    """An image in the registry and its size there (manifest + config + layers as stored)."""

    ref: str
    manifest_digest: str
    registry_size: int
    layer_count: int


class BenchRegistry:
    """A docker-registry process with its storage under ``dir``."""

    def __init__(self, dir: str):
        os.makedirs(dir, exist_ok=True)
        self.server = RegistryServer(dir)
        self.host = self.server.host
        self.client = RegistryClient(self.host, registry_options())

    def push_layout(self, layout_ref: str, repo: str, tag: str) -> PushedImage:
        """Copy one image (``oci:DIR:TAG``) into ``<host>/<repo>:<tag>``."""
        ref = parse_reference(layout_ref)
        store = OciLayoutStore(ref.path)
        desc = store.resolve(ref)
        raw = store.fetch_manifest(desc)
        manifest = json.loads(raw)
        blobs = [manifest["config"], *manifest["layers"]]
        for b in blobs:
            push_blob(self.client, repo, store.blob_path(b["digest"]), b["digest"], b["size"])
        digest = push_manifest(self.client, repo, tag, raw, manifest.get("mediaType") or desc.media_type)
        size = len(raw) + sum(b["size"] for b in blobs)
        return PushedImage(f"{self.host}/{repo}:{tag}", digest, size, len(manifest["layers"]))

    def stop(self) -> None:
        self.client.close()
        self.server.stop()
