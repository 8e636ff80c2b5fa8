"""Finding the accelerated (overlaybd / TurboOCI) counterpart of a plain OCI image (spec §3.4).

``convertor --referrer`` pushes the converted manifest with ``artifactType`` set to
the native or turbo type and ``subject`` = the source manifest, so the source's
referrers list it.  ``BlobStore.referrers`` asks the OCI 1.1 referrers API and
falls back to the ``sha256-<hex>`` referrers tag when the registry answers 404.

Tags that name an accelerated image directly (``<tag>_obd``, ACR's
``<tag>_accelerated`` / ``<tag>_containerd_accelerated``, spec §3.5) need no
discovery: they resolve to an overlaybd manifest like any other tag.
"""

from __future__ import annotations

import logging

from .options import OpenOptions
from .reference import Reference
from .store import BlobStore, Descriptor

log = logging.getLogger(__name__)

ARTIFACT_NATIVE = "application/vnd.containerd.overlaybd.native.v1+json"
ARTIFACT_TURBO = "application/vnd.containerd.overlaybd.turbo.v1+json"
#: preference order when both kinds exist: native blobs need no gzip index
ACCELERATED_TYPES = (ARTIFACT_NATIVE, ARTIFACT_TURBO)
CREATED = "org.opencontainers.image.created"


def find_accelerated(store: BlobStore, ref: Reference, desc: Descriptor,
                     opts: OpenOptions) -> Descriptor | None:
    """The accelerated manifest/index whose subject is ``desc``, or None.

    Native wins over TurboOCI; among several of one kind the newest by the
    ``org.opencontainers.image.created`` annotation (then the last listed) wins.
    """
    if not opts.discover_accelerated or desc.artifact_type in ACCELERATED_TYPES:
        return None
    found = [d for d in store.referrers(desc.digest) if d.artifact_type in ACCELERATED_TYPES]
    if not found:
        log.debug("no accelerated referrer of %s (%s)", ref, desc.digest)
        return None
    ranked = sorted(enumerate(found), key=lambda p: (
        ACCELERATED_TYPES.index(p[1].artifact_type) * -1, p[1].annotations.get(CREATED, ""), p[0]))
    best = ranked[-1][1]
    log.debug("accelerated referrer of %s: %s (%s)", ref, best.digest, best.artifact_type)
    return best
