"""An OCI image layout directory as a BlobStore (``oci:PATH[:TAG]``, skopeo's naming).

Layout: ``oci-layout`` (``{"imageLayoutVersion": "1.0.0"}``), ``index.json``
and ``blobs/<algorithm>/<hex>``.  Tags are the
``org.opencontainers.image.ref.name`` annotations of ``index.json`` entries;
without a tag the layout must hold exactly one manifest.  Referrers are the
manifests listed in ``index.json`` whose ``subject`` names the digest.

Layer blobs are hashed in full before they are served, and a hash is not paid
twice for an unchanged file: ``VerifiedFiles`` records, in one small file of the
obd cache area, each blob file that matched its digest together with what proves
it unchanged since (see its docstring for the threat model).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass

from ..atomic import write_private_file
from ..block.source import ByteSource, FileSource
from ..errors import CorruptDataError, NotFoundError, UsageError
from .manifest import REF_NAME, index_entries, parse_json
from .reference import Reference
from .store import BlobStore, Descriptor, verify_digest

LAYOUT_FILE = "oci-layout"
INDEX_FILE = "index.json"
_DIGEST = re.compile(r"^([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)$")
_HASH_CHUNK = 4 << 20

log = logging.getLogger(__name__)

#: file name of the record of verified blob files, in the block cache directory
#: (``cache.dir``; the block cache itself only touches its ``v1-*``, ``tmp``, ``.lock``, ``.usage``)
VERIFIED_RECORD = "layout-verified.json"
VERIFIED_RECORD_VERSION = 1
#: files kept in the record, least recently verified dropped first
VERIFIED_RECORD_MAX = 4096
#: a file whose ctime is less than this before its hash began is not recorded: file
#: timestamps advance in steps (a clock tick; 2 s on FAT), so a write in the same step
#: could go unseen
SETTLE_NS = 2_000_000_000


@dataclass(frozen=True)
class FileIdentity:
    """What tells one version of a file from any other: inode, size and change times."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    @property
    def key(self) -> str:
        """The record's key: the inode (its other fields are checked against the entry)."""
        return f"{self.dev}:{self.ino}"


class VerifiedFiles:
    """The persistent record of blob files that matched their digest (a JSON file, 0600).

    ``{"version": 1, "files": {"<st_dev>:<st_ino>": [size, mtime_ns, ctime_ns, digest]}}``,
    least recently verified first.  A file counts as verified when its inode is
    in the record with the same size, mtime and ctime and the digest asked for.

    Threat model: the record protects against a blob file changed after it was
    verified by accident or by anyone who cannot change the system clock.  Any
    write, truncation or ``os.utime`` (which restores mtime, never ctime) sets
    the inode's ctime to the current time, and no system call sets ctime to a
    chosen value; a file replaced by another (rename, delete and recreate) has
    another inode or a new ctime.  A file changed within ``SETTLE_NS`` of its
    hash is not recorded, since coarse timestamps could hide a second write.  Not
    covered: root changing the clock back or writing the block device under the
    file system, which can also rewrite the record.  The record is read only
    when it belongs to the effective user and nobody else may write it; one that
    is unreadable, corrupt or of another version is ignored (files are hashed
    again) and rewritten.  Concurrent writers (several mounts) each merge into
    the latest record and replace it atomically; an entry lost to a race only
    costs one more hash.
    """

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._files: dict[str, list] | None = None

    @classmethod
    def in_dir(cls, directory: str) -> "VerifiedFiles":
        return cls(os.path.join(directory, VERIFIED_RECORD))

    def holds(self, ident: FileIdentity, digest: str) -> bool:
        """Whether the file ``ident`` was verified against ``digest`` and is unchanged since."""
        with self._lock:
            if self._files is None:
                self._files = self._load()
            entry = self._files.get(ident.key)
        return entry == [ident.size, ident.mtime_ns, ident.ctime_ns, digest]

    def add(self, ident: FileIdentity, digest: str) -> None:
        """Record that the file ``ident`` matched ``digest`` (best effort: errors only logged)."""
        with self._lock:
            files = self._load()  # merge with what other processes recorded meanwhile
            files.pop(ident.key, None)
            files[ident.key] = [ident.size, ident.mtime_ns, ident.ctime_ns, digest]
            for stale in list(files)[: max(0, len(files) - VERIFIED_RECORD_MAX)]:
                del files[stale]
            self._files = files
            try:
                self._write(files)
            except OSError as e:
                log.debug("%s: not recorded: %s", self.path, e.strerror or e)

    def _load(self) -> dict[str, list]:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return {}  # none yet, or unreadable: every file is hashed
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                log.debug("%s: ignored (owned by uid %d, not by us)", self.path, st.st_uid)
                return {}
            if st.st_mode & 0o022:
                log.warning("%s: ignored (writable by group or others)", self.path)
                return {}
            with os.fdopen(fd, "rb", closefd=False) as f:
                doc = json.loads(f.read())
        except (OSError, ValueError) as e:
            log.debug("%s: ignored: %s", self.path, e)
            return {}
        finally:
            os.close(fd)
        files = doc.get("files") if isinstance(doc, dict) and doc.get("version") == VERIFIED_RECORD_VERSION else None
        if not isinstance(files, dict):
            return {}
        return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 4}

    def _write(self, files: dict[str, list]) -> None:
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        write_private_file(self.path, json.dumps({"version": VERIFIED_RECORD_VERSION, "files": files},
                                                 separators=(",", ":")).encode())


class _BlobFile(FileSource):
    """A layout's blob file, whose identity is taken from the open descriptor (not the path)."""

    def identity(self) -> FileIdentity:
        return FileIdentity.of(os.fstat(self._fd))


class OciLayoutStore(BlobStore):
    """Blobs, tags and referrers of one OCI image layout directory.

    ``verified``: the record of blob files verified by earlier stores and
    processes (None: each store hashes every layer blob it opens once).
    """

    def __init__(self, path: str | os.PathLike, verified: VerifiedFiles | None = None):
        self.path = os.fspath(path)
        self.verified = verified
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
        #: blob files this store verified, by digest, as they were when hashed
        self._verified: dict[str, FileIdentity] = {}

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

    def _open(self, digest: str, size: int | None) -> _BlobFile:
        path = self.blob_path(digest)
        try:
            src = _BlobFile(path, name=digest)
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
        """The blob file, hashed unless this store or the ``verified`` record saw it unchanged."""
        src = self._open(digest, size)
        try:
            ident = src.identity()
            if self._verified.get(digest) != ident and not (self.verified and self.verified.holds(ident, digest)):
                started = time.time_ns()
                self._verify_file(src, digest)
                if self.verified and started - ident.ctime_ns >= SETTLE_NS:
                    self.verified.add(ident, digest)
            self._verified[digest] = ident
        except BaseException:
            src.close()
            raise
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
