"""Pushing blobs, manifests and tags to a registry (OCI distribution spec, "push").

Blobs already present (``HEAD`` answers 200) are skipped.  Small blobs go up in
one ``POST`` + ``PUT ?digest=``; blobs larger than ``chunk_size`` are streamed in
``PATCH`` chunks with ``Content-Range`` and closed with ``PUT ?digest=``, so a
multi-GiB layer never sits in memory.  Every request goes through
``RegistryClient.call`` (auth with push scope, retries, clear errors).
"""

from __future__ import annotations

import hashlib
import json
import os
from urllib.parse import urlencode

from ..errors import CorruptDataError, NotFoundError, ObdError
from .registry import MT_OCI_INDEX, RegistryClient, repo_scope

#: blobs up to this size are uploaded in one request
DEFAULT_CHUNK_SIZE = 16 << 20


def _scope(repo: str) -> str:
    return repo_scope(repo, "pull,push")


def blob_exists(client: RegistryClient, repo: str, digest: str) -> bool:
    """True if the repository already has the blob (``HEAD /v2/<repo>/blobs/<digest>``)."""
    resp = client.call("HEAD", f"/v2/{repo}/blobs/{digest}", what=f"blob {digest}", scope=_scope(repo),
                       not_found_ok=True)
    return resp is not None


def _with_query(location: str, **params) -> str:
    sep = "&" if "?" in location else "?"
    return location + sep + urlencode(params)


def _location(resp, what: str) -> str:
    loc = resp.headers.get("Location")
    if not loc:
        raise ObdError(f"{what}: registry gave no upload Location")
    return loc


def push_blob(client: RegistryClient, repo: str, path_or_bytes: str | os.PathLike | bytes, digest: str,
              size: int, progress=None, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bool:
    """Upload a blob unless present; returns True if bytes were sent.

    ``progress`` (optional) is anything with ``update(n)``, e.g. a ``progress_bar``.
    The content is checked against ``digest`` and ``size`` before the upload is
    committed, so a wrong digest is a local error, not a registry rejection.
    """
    what = f"push blob {digest} to {client.host}/{repo}"
    if blob_exists(client, repo, digest):
        if progress is not None:
            progress.update(size)
        return False
    is_bytes = isinstance(path_or_bytes, (bytes, bytearray, memoryview))
    actual = len(path_or_bytes) if is_bytes else os.path.getsize(path_or_bytes)
    if actual != size:
        raise CorruptDataError(f"{what}: content is {actual} bytes, descriptor says {size}")
    start = client.call("POST", f"/v2/{repo}/blobs/uploads/", what=what, scope=_scope(repo), ok=(202,),
                        headers={"Content-Length": "0"})
    location = _location(start, what)
    hasher = hashlib.new(digest.split(":", 1)[0])

    def chunks():
        if is_bytes:
            view = memoryview(path_or_bytes)
            for off in range(0, len(view), chunk_size):
                yield off, bytes(view[off : off + chunk_size])
            return
        with open(path_or_bytes, "rb") as f:
            off = 0
            while True:
                data = f.read(chunk_size)
                if not data:
                    return
                yield off, data
                off += len(data)

    if size <= chunk_size:
        body = b"".join(data for _off, data in chunks())
        hasher.update(body)
        _check_digest(hasher, digest, what)
        client.call("PUT", _with_query(location, digest=digest), what=what, scope=_scope(repo), ok=(201,),
                    data=body, headers={"Content-Type": "application/octet-stream"})
        if progress is not None:
            progress.update(size)
    else:
        for off, data in chunks():
            hasher.update(data)
            resp = client.call("PATCH", location, what=what, scope=_scope(repo), ok=(202,), data=data,
                               headers={"Content-Type": "application/octet-stream",
                                        "Content-Range": f"{off}-{off + len(data) - 1}"})
            location = _location(resp, what)
            if progress is not None:
                progress.update(len(data))
        _check_digest(hasher, digest, what)
        client.call("PUT", _with_query(location, digest=digest), what=what, scope=_scope(repo), ok=(201,),
                    data=b"", headers={"Content-Length": "0"})
    return True


def _check_digest(hasher, digest: str, what: str) -> None:
    got = f"{hasher.name}:{hasher.hexdigest()}"
    if got != digest:
        raise CorruptDataError(f"{what}: content hashes to {got}")


def push_manifest(client: RegistryClient, repo: str, ref: str, data: bytes, media_type: str) -> str:
    """PUT a manifest under a tag or digest; returns its digest (checked against the registry's).

    A manifest with a ``subject`` is also listed in the subject's referrers tag
    (``sha256-<hex>``) unless the registry confirms with ``OCI-Subject`` that it
    indexes referrers itself (OCI distribution spec 1.1, "pushing manifests with
    subject").
    """
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    what = f"push manifest {client.host}/{repo}:{ref}"
    resp = client.call("PUT", f"/v2/{repo}/manifests/{ref}", what=what, scope=_scope(repo), ok=(201,),
                       data=bytes(data), headers={"Content-Type": media_type})
    answered = resp.headers.get("Docker-Content-Digest")
    if answered and answered != digest:
        raise CorruptDataError(f"{what}: registry stored digest {answered}, expected {digest}")
    try:
        doc = json.loads(data)
    except ValueError:
        raise CorruptDataError(f"{what}: manifest is not JSON") from None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    if subject and not resp.headers.get("OCI-Subject"):
        desc = {"mediaType": media_type, "digest": digest, "size": len(data),
                "artifactType": doc.get("artifactType") or (doc.get("config") or {}).get("mediaType")}
        if doc.get("annotations"):
            desc["annotations"] = doc["annotations"]
        _add_to_referrers_tag(client, repo, subject["digest"], desc)
    return digest


def _add_to_referrers_tag(client: RegistryClient, repo: str, subject: str, desc: dict) -> None:
    """Append ``desc`` to the index tagged ``<algo>-<hex>`` of ``subject`` (created if missing)."""
    tag = subject.replace(":", "-")
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": []}
    current = client.head_manifest(repo, tag)
    if current is not None:
        raw, _mt = client.get_manifest(repo, current.digest, current.digest)
        try:
            index = json.loads(raw)
            entries = index["manifests"]
        except (ValueError, KeyError, TypeError):
            raise CorruptDataError("referrers tag is not an OCI index", blob=f"{client.host}/{repo}:{tag}") from None
        if any(m.get("digest") == desc["digest"] for m in entries):
            return
    index["manifests"].append(desc)
    push_manifest(client, repo, tag, json.dumps(index).encode(), MT_OCI_INDEX)


def tag_manifest(client: RegistryClient, repo: str, digest: str, tag: str) -> str:
    """Give an existing manifest another tag (fetch it by digest, PUT it under ``tag``)."""
    data, media_type = client.get_manifest(repo, digest, digest)
    if not media_type:
        raise NotFoundError(f"{client.host}/{repo}@{digest}: registry gave no manifest media type")
    return push_manifest(client, repo, tag, data, media_type)
