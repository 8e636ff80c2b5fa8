"""The benchmark's registry: Debian's ``docker-registry`` on 127.0.0.1, pushing into it, and its access log.

Images are pushed once into a *seed* storage directory with obd's own push
code (blobs a repository already holds are skipped, so a later run only pushes
what changed).  Each measurement copies the seed into scratch space and serves
that copy, so nothing a run does can touch the seed, and in the VM harness the
copy lands on the guest's own memory instead of the host share.

Bytes fetched are counted by the server, not by the clients: its access log
(Apache combined format, one line per response with the body bytes written) is
read between two marks, so a client's own counters are never the only source.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass

from tcmu_overlaybd.errors import NetworkError, NotFoundError
from tcmu_overlaybd.image.oci_layout import OciLayoutStore
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.push import push_blob, push_manifest
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.registry import RegistryClient

#: images are pushed to ``<host>/bench/<image>``
REPO_PREFIX = "bench"
REGISTRY_BIN = "/usr/bin/docker-registry"

#: one access log line: ``HOST - USER [TIME] "METHOD PATH PROTO" STATUS BYTES "REFERER" "UA"``
_ACCESS_LINE = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(?P<method>[A-Z]+) (?P<path>\S+) [^"]*" '
                          r'(?P<status>\d{3}) (?P<bytes>\d+|-)')


def registry_options() -> OpenOptions:
    """Options for talking to the local plain-HTTP registry (no proxy, quiet)."""
    return OpenOptions(plain_http=True, quiet=True, discover_accelerated=False)


@dataclass
class Served:
    """What the registry served between two marks of its access log."""

    bytes: int = 0  # body bytes of GET responses (blobs, manifests, tokens: all of it)
    blob_bytes: int = 0  # of which GET /v2/<repo>/blobs/...
    requests: int = 0  # GET and HEAD requests
    range_requests: int = 0  # blob GETs answered 206


def parse_access_log(text: str) -> Served:
    """Totals of the combined-format access log lines in ``text`` (other lines are skipped)."""
    out = Served()
    for line in text.splitlines():
        m = _ACCESS_LINE.match(line)
        if m is None or m["method"] not in ("GET", "HEAD"):
            continue
        out.requests += 1
        if m["method"] != "GET" or m["bytes"] == "-":
            continue
        n = int(m["bytes"])
        out.bytes += n
        if "/blobs/" in m["path"]:
            out.blob_bytes += n
            out.range_requests += m["status"] == "206"
    return out


@dataclass
class PushedImage:
    """An image in the registry and its size there (manifest + config + layers as stored)."""

    repo: str
    tag: str
    manifest_digest: str
    registry_size: int
    layer_count: int

    def ref(self, host: str) -> str:
        return f"{host}/{self.repo}:{self.tag}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BenchRegistry:
    """A docker-registry process serving the storage under ``dir`` (created if missing), access log on."""

    def __init__(self, dir: str):
        if not os.access(REGISTRY_BIN, os.X_OK):
            raise NotFoundError(f"{REGISTRY_BIN}: not installed (scripts/install-deps installs docker-registry)")
        self.dir = dir
        self.storage = os.path.join(dir, "storage")
        os.makedirs(self.storage, exist_ok=True)
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.access_log = os.path.join(dir, "access.log")
        config = os.path.join(dir, "config.yml")
        with open(config, "w") as f:
            f.write("\n".join([
                "version: 0.1",
                "log:", "  level: error", "  accesslog:", "    disabled: false",
                "storage:", "  filesystem:", f"    rootdirectory: {self.storage}",
                "http:", f"  addr: {self.host}", "  secret: obd-bench",
            ]) + "\n")
        with open(self.access_log, "ab") as out, open(os.path.join(dir, "registry.log"), "ab") as err:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", config], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL)
        self._wait_listening(30.0)
        self.client = RegistryClient(self.host, registry_options())

    @classmethod
    def from_seed(cls, seed: str, dir: str) -> "BenchRegistry":
        """A registry serving a fresh copy of the seed storage ``seed`` (a ``BenchRegistry`` dir)."""
        shutil.rmtree(dir, ignore_errors=True)
        os.makedirs(dir)
        shutil.copytree(os.path.join(seed, "storage"), os.path.join(dir, "storage"))
        return cls(dir)

    def _wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise NetworkError(f"docker-registry exited with {self.proc.returncode} "
                                   f"(log: {os.path.join(self.dir, 'registry.log')})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise NetworkError(f"docker-registry does not listen on {self.host} after {timeout:.0f} s")

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
        return PushedImage(repo, tag, digest, size, len(manifest["layers"]))

    def mark(self) -> int:
        """A position in the access log: ``served_since(mark)`` counts what came after it."""
        return os.path.getsize(self.access_log)

    def served_since(self, mark: int) -> Served:
        """What the registry served after ``mark`` (every response it finished logging)."""
        with open(self.access_log, "rb") as f:
            f.seek(mark)
            return parse_access_log(f.read().decode(errors="replace"))

    def stop(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
