"""Where blobs come from: the interface shared by OCI layouts and registries.

A ``BlobStore`` knows one repository (a registry repository or a layout
directory).  It resolves tags to manifest descriptors, returns small blobs
(manifests, configs) verified against their digest, and opens large blobs as
random-access byte sources (lazy for registries).
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from ..block.source import ByteSource
from ..errors import CorruptDataError
from .reference import Reference


@dataclass
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict = field(default_factory=dict)
    platform: dict | None = None
    artifact_type: str | None = None

    @classmethod
    def from_json(cls, d: dict) -> "Descriptor":
        return cls(
            media_type=d.get("mediaType", ""),
            digest=d["digest"],
            size=int(d.get("size", 0)),
            annotations=dict(d.get("annotations") or {}),
            platform=d.get("platform"),
            artifact_type=d.get("artifactType"),
        )

    def to_json(self) -> dict:
        d = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            d["platform"] = dict(self.platform)
        if self.artifact_type:
            d["artifactType"] = self.artifact_type
        return d


def file_digest(path: str) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def verify_digest(data: bytes, digest: str, what: str) -> bytes:
    """Raise CorruptDataError unless ``data`` hashes to ``digest``."""
    algo, _, expected = digest.partition(":")
    try:
        h = hashlib.new(algo)
    except ValueError:
        raise CorruptDataError(f"unsupported digest algorithm {algo!r}", blob=what) from None
    h.update(data)
    if h.hexdigest() != expected:
        raise CorruptDataError(f"content does not match digest {digest} (got {algo}:{h.hexdigest()})", blob=what)
    return data


class BlobStore(ABC):
    #: human-readable location, used in messages
    name: str

    @abstractmethod
    def resolve(self, ref: Reference) -> Descriptor:
        """Descriptor of the manifest or index that ``ref`` (tag or digest) names."""

    @abstractmethod
    def fetch_manifest(self, desc: Descriptor) -> bytes:
        """Manifest/index bytes, verified against ``desc.digest``."""

    @abstractmethod
    def fetch_blob(self, digest: str, size: int | None = None) -> bytes:
        """A small blob (config, meta layer) in full, verified against its digest."""

    @abstractmethod
    def open_blob(self, digest: str, size: int) -> ByteSource:
        """A layer blob as a random-access byte source."""

    def referrers(self, digest: str, artifact_type: str | None = None) -> list[Descriptor]:
        """Manifests whose ``subject`` is ``digest`` (OCI 1.1 referrers); [] if unknown."""
        return []

    def close(self) -> None:
        pass
