"""An OCI image layout directory as a BlobStore (``oci:PATH[:TAG]``, skopeo's naming).

Layout: ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json``
and ``blobs/<algorithm>/<hex>``.  Tags are the
``org.opencontainers.image.ref.name`` annotations of ``index.json`` entries;
without a tag the layout must hold exactly one manifest.  Referrers are the
manifests listed in ``index.json`` whose ``subject`` names the digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

from ..block.source import ByteSource, FileSource
from ..errors import CorruptDataError, NotFoundError, UsageError
from .manifest import REF_NAME, index_entries, parse_json
from .reference import Reference
from .store import BlobStore, Descriptor, verify_digest

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
_DIGEST = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_HASH_CHUNK = 1 << 20


class OciLayoutStore(BlobStore):
    """Blobs, tags and referrers of one OCI image layout directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        self.name = f"oci:{self.path}"
        if not os.path.isdir(self.path):
            raise NotFoundError(f"{self.path}: no such OCI layout directory")
        self._check_layout_file()
        index_path = os.path.join(self.path, INDEX_FILE)
        try:
            with open(index_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise NotFoundError(f"{self.path}: not an OCI layout (no {INDEX_FILE})") from None
        doc = parse_json(raw, index_path)
        if not isinstance(doc.get("manifests"), list):
            raise CorruptDataError("index without a 'manifests' list", blob=index_path)
        self.entries: list[Descriptor] = index_entries(doc, index_path)
        self._verified: set[str] = set()

    def _check_layout_file(self) -> None:
        path = os.path.join(self.path, LAYOUT_FILE)
        if not os.path.exists(path):
            return  # some tools omit it; index.json decides
        with open(path, "rb") as f:
            doc = parse_json(f.read(), path)
        version = doc.get("imageLayoutVersion")
        if not isinstance(version, str) or not version.startswith("1."):
            raise CorruptDataError(f"unsupported imageLayoutVersion {version!r}", blob=path)

    # -- tags -------------------------------------------------------------------------------

    @property
    def tags(self) -> list[str]:
        return [d.annotations[REF_NAME] for d in self.entries if REF_NAME in d.annotations]

    def resolve(self, ref: Reference) -> Descriptor:
        if ref.digest:
            for d in self.entries:
                if d.digest == ref.digest:
                    return d
            data = self.fetch_blob(ref.digest)  # a manifest reachable only through an index
            doc = parse_json(data, ref.digest)
            return Descriptor(doc.get("mediaType", ""), ref.digest, len(data),
                              artifact_type=doc.get("artifactType"))
        if ref.tag:
            for d in self.entries:
                if d.annotations.get(REF_NAME) == ref.tag:
                    return d
            raise NotFoundError(f"{self.name}: no tag {ref.tag!r} (tags: {', '.join(self.tags) or 'none'})")
        if len(self.entries) == 1:
            return self.entries[0]
        raise UsageError(f"{self.name} holds {len(self.entries)} manifests; name one as "
                         f"oci:{self.path}:TAG (tags: {', '.join(self.tags) or 'none'})")

    # -- blobs ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> str:
        m = _DIGEST.match(digest)
        if not m:
            raise UsageError(f"invalid digest {digest!r}")
        return os.path.join(self.path, "blobs", m.group(1), m.group(2))

    def _open(self, digest: str, size: int | None) -> FileSource:
        path = self.blob_path(digest)
        try:
            src = FileSource(path, name=digest)
        except NotFoundError:
            raise NotFoundError(f"{self.name}: blob {digest} is missing ({path})") from None
        if size is not None and size >= 0 and src.size != size:
            src.close()
            raise CorruptDataError(f"blob is {src.size} bytes, its descriptor says {size}", blob=digest)
        return src

    def fetch_manifest(self, desc: Descriptor) -> bytes:
        return self.fetch_blob(desc.digest, desc.size)

    def fetch_blob(self, digest: str, size: int | None = None) -> bytes:
        with self._open(digest, size) as src:
            data = src.read(0, src.size)
        return verify_digest(data, digest, f"{self.name} blob {digest}")

    def open_blob(self, digest: str, size: int | None) -> ByteSource:
        """The blob file, its digest verified once per store (a layout is local: one pass is cheap)."""
        src = self._open(digest, size)
        if digest not in self._verified:
            try:
                self._verify_file(src, digest)
            except BaseException:
                src.close()
                raise
            self._verified.add(digest)
        return src

    def _verify_file(self, src: FileSource, digest: str) -> None:
        algo, _, expected = digest.partition(":")
        try:
            h = hashlib.new(algo)
        except ValueError:
            raise CorruptDataError(f"unsupported digest algorithm {algo!r}", blob=digest) from None
        for off in range(0, src.size, _HASH_CHUNK):
            h.update(src.read(off, _HASH_CHUNK))
        if h.hexdigest() != expected:
            raise CorruptDataError(f"{self.name}: blob content does not match its digest "
                                   f"(got {algo}:{h.hexdigest()})", blob=digest)

    # -- referrers --------------------------------------------------------------------------

    def referrers(self, digest: str, artifact_type: str | None = None) -> list[Descriptor]:
        found = []
        for d in self.entries:
            try:
                doc = parse_json(self.fetch_blob(d.digest, d.size), d.digest)
            except NotFoundError:
                continue  # index entries whose blobs were not copied (partial layouts)
            subject = doc.get("subject")
            if not isinstance(subject, dict) or subject.get("digest") != digest:
                continue
            kind = doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")
            if artifact_type and kind != artifact_type:
                continue
            found.append(Descriptor(d.media_type or doc.get("mediaType", ""), d.digest, d.size,
                                    annotations=dict(doc.get("annotations") or d.annotations),
                                    platform=d.platform, artifact_type=kind))
        return found


def write_index(path: str, entries: list[Descriptor]) -> None:
    """Write ``oci-layout`` and ``index.json`` for ``entries`` (used by tools that build layouts)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, LAYOUT_FILE), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(path, INDEX_FILE), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": [e.to_json() for e in entries]}, f, indent=2)
