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
import shutil
from dataclasses import dataclass, field

from ..errors import UsageError
from ..image.manifest import REF_NAME, classify_layer, index_entries, manifest_kind, parse_json
from ..image.oci_layout import INDEX_FILE, OciLayoutStore, write_index
from ..image.options import OpenOptions
from ..image.reference import Reference, parse_reference
from ..image.store import BlobStore, Descriptor
from ..progress import progress_bar


@dataclass
class ImageTree:
    """The blobs of one image (manifest or index), children before the manifests that list them."""

    blobs: list[Descriptor] = field(default_factory=list)  # configs and layers, each digest once
    manifests: list[tuple[Descriptor, bytes]] = field(default_factory=list)  # the root is last

    def _add_blob(self, desc: Descriptor) -> None:
        if all(b.digest != desc.digest for b in self.blobs):
            self.blobs.append(desc)


def walk(store: BlobStore, desc: Descriptor, blob_size=None) -> ImageTree:
    """Every blob reachable from the manifest or index ``desc`` in ``store``.

    With ``blob_size(digest) -> int`` given, the original layers that FastOCI
    meta layers point into (§4.1 target annotations, listed in no descriptor of
    their own) are included too.
    """
    tree = ImageTree()

    def visit(d: Descriptor) -> None:
        raw = store.fetch_manifest(d)
        doc = parse_json(raw, d.digest)
        if manifest_kind(doc, d, d.digest) == "index":
            for child in index_entries(doc, d.digest):
                visit(child)
        else:
            for blob in [doc["config"], *doc["layers"]]:
                tree._add_blob(Descriptor.from_json(blob))
            for layer in doc["layers"] if blob_size else ():
                target = classify_layer(Descriptor.from_json(layer), d.digest).target
                if target is not None:
                    tree._add_blob(Descriptor(target.media_type, target.digest, blob_size(target.digest)))
        media_type = doc.get("mediaType") or d.media_type
        if all(m.digest != d.digest for m, _ in tree.manifests):
            tree.manifests.append((Descriptor(media_type, d.digest, len(raw)), raw))

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
    """Copy the image ``desc`` from a registry store into ``layout`` under ``tag`` (digests unchanged)."""
    tree = walk(store, desc)
    for blob in tree.blobs:
        path = _blob_path(layout, blob.digest)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        store.download_blob(blob.digest, blob.size, path)  # verified, with its own progress bar
    for mdesc, raw in tree.manifests:
        _write_blob(layout, mdesc.digest, raw)
    _set_index_entry(layout, Descriptor(tree.manifests[-1][0].media_type, desc.digest, desc.size,
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
    root = tree.manifests[-1][0]
    if ref.transport == "oci":
        sent, present = _publish_layout(store, tree, desc, ref)
    else:
        sent, present = _publish_registry(store, tree, ref, opts)
    return Published(str(ref), root.digest, root.media_type, sent, present)


def _publish_layout(store: OciLayoutStore, tree: ImageTree, desc: Descriptor, ref: Reference) -> tuple[int, int]:
    os.makedirs(ref.path, exist_ok=True)
    sent = present = 0
    for blob in tree.blobs:
        if _link_blob(store.blob_path(blob.digest), ref.path, blob.digest):
            sent += 1
        else:
            present += 1
    for mdesc, raw in tree.manifests:
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
        for blob in tree.blobs:
            with progress_bar(blob.size, f"push {blob.digest[7:19]}", opts.quiet) as bar:
                if push_blob(client, ref.repository, store.blob_path(blob.digest), blob.digest, blob.size,
                             progress=bar):
                    sent += 1
                else:
                    present += 1
        *children, (root, raw) = tree.manifests
        for mdesc, data in children:
            push_manifest(client, ref.repository, mdesc.digest, data, mdesc.media_type)
        push_manifest(client, ref.repository, ref.tag, raw, root.media_type)
    finally:
        client.close()
    return sent, present
