"""Moving whole images between stores for ``obd convert``: fetch the source once, publish results.

``mirror_source`` copies an image (a manifest, or an index and every image it
lists) from a registry into a local OCI layout, byte for byte, so that both
output formats of one run read the same local copy and the digests (and so the
``subject`` of a ``--referrer`` result) stay those of the original.

``publish`` copies a converted image out of the work layout to its destination,
``oci:DIR[:TAG]`` or a registry reference.  Order is what makes a failure
harmless: blobs first (each skipped if the destination has it: a ``HEAD`` for
registries, the file for layouts), then child manifests by digest, and the
tagged manifest or index last, so a half-finished run leaves no tag a user
could mistake for a result.  A manifest with a ``subject`` is also indexed
under the referrers tag ``sha256-<hex>`` when the registry does not answer with
``OCI-Subject`` (docker-registry 2.8 has no referrers API); see
:func:`~tcmu_overlaybd.image.push.push_manifest`.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

from ..errors import CorruptDataError, UsageError
from ..image.manifest import REF_NAME, classify_layer, index_entries, manifest_kind, parse_json
from ..image.oci_layout import INDEX_FILE, OciLayoutStore, write_index
from ..image.options import OpenOptions
from ..image.reference import Reference, parse_reference
from ..image.store import BlobStore, Descriptor
from ..progress import progress_bar


#: the digests blobs are stored under; anything else could name a path outside the layout
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}")


@dataclass
class ImageTree:
    """The blobs of one image (manifest or index), children before the manifests that list them."""

    blobs: dict[str, Descriptor] = field(default_factory=dict)  # configs and layers by digest
    manifests: dict[str, tuple[Descriptor, bytes]] = field(default_factory=dict)  # insertion order: root last

    @property
    def root(self) -> Descriptor:
        return next(reversed(self.manifests.values()))[0]


def _checked(desc: Descriptor, where: str) -> Descriptor:
    if not _DIGEST.fullmatch(desc.digest):
        raise CorruptDataError(f"invalid blob digest {desc.digest[:80]!r}", blob=where)
    return desc


def _blob_descriptor(d, where: str) -> Descriptor:
    """A config or layer descriptor of the manifest ``where``, its digest safe to use as a file name."""
    try:
        return _checked(Descriptor.from_json(d), where)
    except (AttributeError, KeyError, TypeError, ValueError):
        raise CorruptDataError(f"malformed blob descriptor {str(d)[:80]}", blob=where) from None


def walk(store: BlobStore, desc: Descriptor, blob_size=None) -> ImageTree:
    """Every blob reachable from the manifest or index ``desc`` in ``store``.

    With ``blob_size(digest) -> int`` given, the original layers that FastOCI
    meta layers point into (§4.1 target annotations, listed in no descriptor of
    their own) are included too.
    """
    tree = ImageTree()

    def visit(d: Descriptor) -> None:
        if d.digest in tree.manifests:
            return
        raw = store.fetch_manifest(_checked(d, store.name))
        doc = parse_json(raw, d.digest)
        if manifest_kind(doc, d, d.digest) == "index":
            for child in index_entries(doc, d.digest):
                visit(child)
        else:
            layers = [_blob_descriptor(blob, d.digest) for blob in [doc["config"], *doc["layers"]]]
            if blob_size:
                targets = [classify_layer(layer, d.digest).target for layer in layers[1:]]
                layers += [_checked(Descriptor(t.media_type, t.digest, blob_size(t.digest)), d.digest)
                           for t in targets if t is not None]
            for blob in layers:
                tree.blobs.setdefault(blob.digest, blob)
        tree.manifests[d.digest] = (Descriptor(doc.get("mediaType") or d.media_type, d.digest, len(raw)), raw)

    visit(desc)
    return tree


def _blob_path(layout: str, digest: str) -> str:
    algo, _, hexd = digest.partition(":")
    return os.path.join(layout, "blobs", algo, hexd)


def _write_blob(layout: str, digest: str, data: bytes) -> None:
    path = _blob_path(layout, digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _link_blob(src: str, layout: str, digest: str) -> bool:
    """Hard link (or copy) ``src`` into ``layout``; False if it was there already."""
    path = _blob_path(layout, digest)
    if os.path.exists(path):
        return False
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".part"
    if os.path.exists(tmp):
        os.unlink(tmp)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, path)
    return True


def _set_index_entry(layout: str, desc: Descriptor, tag: str | None) -> None:
    """List ``desc`` in the layout's index.json (replacing the entry of ``tag`` or of the same digest)."""
    entries: list[Descriptor] = []
    path = os.path.join(layout, INDEX_FILE)
    if os.path.exists(path):
        with open(path, "rb") as f:
            entries = index_entries(parse_json(f.read(), path), path)
    entries = [e for e in entries if not (tag and e.annotations.get(REF_NAME) == tag)
               and not (e.digest == desc.digest and REF_NAME not in e.annotations)]
    write_index(layout, entries + [desc])


def mirror_source(store, desc: Descriptor, layout: str, tag: str) -> None:
    """Copy the image ``desc`` from a ``RegistryStore`` into ``layout`` under ``tag`` (digests unchanged)."""
    tree = walk(store, desc)
    for blob in tree.blobs.values():
        path = _blob_path(layout, blob.digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        store.download_blob(blob.digest, blob.size, path)  # verified, with its own progress bar
    for mdesc, raw in tree.manifests.values():
        _write_blob(layout, mdesc.digest, raw)
    _set_index_entry(layout, Descriptor(tree.root.media_type, desc.digest, desc.size,
                                        annotations={REF_NAME: tag}, platform=desc.platform), tag)


@dataclass(frozen=True)
class Published:
    """Where a converted image went."""

    reference: str  # the destination as the user can name it, with its tag
    digest: str  # of the tagged manifest or index
    media_type: str
    blobs_sent: int  # blobs copied or uploaded
    blobs_present: int  # blobs the destination already had

    def to_json(self) -> dict:
        """The form ``obd convert --json`` prints."""
        return {"reference": self.reference, "digest": self.digest, "mediaType": self.media_type,
                "blobsSent": self.blobs_sent, "blobsPresent": self.blobs_present}


def publish(layout: str, desc: Descriptor, dest: str, opts: OpenOptions) -> Published:
    """Copy the image ``desc`` of the work layout ``layout`` to ``dest`` (``oci:DIR[:TAG]`` or registry ref)."""
    ref = parse_reference(dest)
    if ref.digest:
        raise UsageError(f"{dest}: a destination names a tag, not a digest")
    store = OciLayoutStore(layout)
    tree = walk(store, desc, blob_size=lambda digest: os.path.getsize(store.blob_path(digest)))
    root = tree.root
    if ref.transport == "oci":
        sent, present = _publish_layout(store, tree, desc, ref)
    else:
        sent, present = _publish_registry(store, tree, ref, opts)
    return Published(str(ref), root.digest, root.media_type, sent, present)


def _publish_layout(store: OciLayoutStore, tree: ImageTree, desc: Descriptor, ref: Reference) -> tuple[int, int]:
    os.makedirs(ref.path, exist_ok=True)
    sent = present = 0
    for blob in tree.blobs.values():
        if _link_blob(store.blob_path(blob.digest), ref.path, blob.digest):
            sent += 1
        else:
            present += 1
    for mdesc, raw in tree.manifests.values():
        _write_blob(ref.path, mdesc.digest, raw)
    entry = Descriptor(desc.media_type, desc.digest, desc.size, platform=desc.platform,
                       artifact_type=desc.artifact_type, annotations={REF_NAME: ref.tag} if ref.tag else {})
    _set_index_entry(ref.path, entry, ref.tag)
    return sent, present


def _publish_registry(store: OciLayoutStore, tree: ImageTree, ref: Reference, opts: OpenOptions) -> tuple[int, int]:
    from ..image.push import push_blob, push_manifest
    from ..image.registry import RegistryClient

    client = RegistryClient(ref.api_host, opts)
    sent = present = 0
    try:
        for blob in tree.blobs.values():
            with progress_bar(blob.size, f"push {blob.digest[7:19]}", opts.quiet) as bar:
                if push_blob(client, ref.repository, store.blob_path(blob.digest), blob.digest, blob.size,
                             progress=bar):
                    sent += 1
                else:
                    present += 1
        *children, (root, raw) = tree.manifests.values()
        for mdesc, data in children:
            push_manifest(client, ref.repository, mdesc.digest, data, mdesc.media_type)
        push_manifest(client, ref.repository, ref.tag, raw, root.media_type)
    finally:
        client.close()
    return sent, present
