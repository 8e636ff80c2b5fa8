"""From a reference text to a resolved ``Image``: store, tag, index, platform, manifest, config.

``oci:PATH[:TAG]`` opens a local layout; anything else a registry (imported
lazily so local layouts work without the registry client).  A plain OCI image
is swapped for its accelerated counterpart when one is advertised (spec §3.4)
and ``opts.discover_accelerated`` is on.
"""

from __future__ import annotations

import logging

from .manifest import Image, load_manifest
from .oci_layout import OciLayoutStore
from .options import OpenOptions
from .reference import parse_reference
from .store import BlobStore

log = logging.getLogger(__name__)


def open_store(ref, opts: OpenOptions) -> BlobStore:
    """The BlobStore that holds ``ref``: a layout directory or a registry repository."""
    if ref.transport == "oci":
        return OciLayoutStore(ref.path)
    from .registry import RegistryStore

    return RegistryStore(ref, opts)


def open_image(ref_text: str, opts: OpenOptions) -> Image:
    """Resolve ``ref_text`` to one single-platform image (accelerated if one is found)."""
    ref = parse_reference(ref_text)
    store = open_store(ref, opts)
    try:
        desc = store.resolve(ref)
        image = load_manifest(store, ref, desc, opts.platform)
        if image.mode == "oci" and opts.discover_accelerated:
            from .discovery import find_accelerated

            # the subject of a converted image is the source index (all platforms converted)
            # or the platform's own manifest (one platform converted): try both
            subjects = [d for d in (image.index_descriptor, image.manifest_descriptor) if d is not None]
            found = None
            for subject in subjects:
                found = find_accelerated(store, ref, subject, opts)
                if found is not None:
                    break
            if found is not None:
                log.info("%s: using accelerated image %s", ref, found.digest)
                image = load_manifest(store, ref, found, opts.platform)
    except BaseException:
        store.close()
        raise
    return image
