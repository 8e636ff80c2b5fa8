"""Manifests, indexes and configs: media types, validation, platform choice, layer kinds.

Layer kinds (spec §3.3, §4.1, §7.2), decided from the descriptor alone:

* ``overlaybd``    native layer: ``…/overlaybd/blob-digest`` and ``…/blob-size`` annotations
* ``fastoci``      TurboOCI meta layer: ``…/turbo-oci/target-digest`` (or legacy ``…/fastoci/…``)
* ``acceleration`` the trace layer of ``ctr record-trace`` (``…/acceleration-layer: yes``)
* ``oci-tar``, ``oci-gzip``, ``oci-zstd``  plain OCI/Docker layers
"""

from __future__ import annotations

import json
import platform as _platform
from dataclasses import dataclass

from ..errors import CorruptDataError, NotFoundError, UnsupportedError, UsageError
from .reference import Reference
from .store import BlobStore, Descriptor

# -- media types ------------------------------------------------------------------------------
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND_TAR = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_FOREIGN_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"

INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
MANIFEST_TYPES = (OCI_MANIFEST, DOCKER_MANIFEST)
CONFIG_TYPES = (OCI_CONFIG, DOCKER_CONFIG)
_LAYER_KINDS = {
    OCI_LAYER_TAR: "oci-tar", OCI_LAYER_ND_TAR: "oci-tar", DOCKER_LAYER_TAR: "oci-tar",
    OCI_LAYER_GZIP: "oci-gzip", OCI_LAYER_ND_GZIP: "oci-gzip", DOCKER_LAYER_GZIP: "oci-gzip",
    DOCKER_FOREIGN_GZIP: "oci-gzip",
    OCI_LAYER_ZSTD: "oci-zstd", OCI_LAYER_ND_ZSTD: "oci-zstd",
}

# -- overlaybd annotations (spec §3.3, §4.1, §7.2) --------------------------------------------
_ANN = "containerd.io/snapshot/overlaybd/"
ANN_BLOB_DIGEST = _ANN + "blob-digest"
ANN_BLOB_SIZE = _ANN + "blob-size"
ANN_VERSION = _ANN + "version"
ANN_FS_TYPE = _ANN + "blob-fs-type"
ANN_ACCELERATION = _ANN + "acceleration-layer"
ANN_TURBO_TARGET_DIGEST = _ANN + "turbo-oci/target-digest"
ANN_TURBO_TARGET_MEDIA_TYPE = _ANN + "turbo-oci/target-media-type"
ANN_FASTOCI_TARGET_DIGEST = _ANN + "fastoci/target-digest"
ANN_FASTOCI_TARGET_MEDIA_TYPE = _ANN + "fastoci/target-media-type"
VERSION_NATIVE = "0.1.0"
VERSION_TURBO = "0.1.0-turbo.ociv1"
VERSION_FASTOCI = "0.1.0-fastoci"
REF_NAME = "org.opencontainers.image.ref.name"

#: size of a descriptor whose size nobody told us (TurboOCI targets: the store finds out)
UNKNOWN_SIZE = -1

# platform.machine() -> (GOARCH, variant)
_MACHINES = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"), "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
    "i386": ("386", None), "i686": ("386", None),
    "ppc64le": ("ppc64le", None), "s390x": ("s390x", None), "riscv64": ("riscv64", None),
    "mips64": ("mips64le", None), "loongarch64": ("loong64", None),
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")

    @classmethod
    def parse(cls, text: str) -> "Platform":
        """``os/arch[/variant]`` as given to ``--platform``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise UsageError(f"invalid platform {text!r} (expected os/arch[/variant], e.g. linux/arm64)")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> "Platform":
        machine = _platform.machine().lower()
        arch, variant = _MACHINES.get(machine, (machine, None))
        return cls("linux", arch, variant)

    @classmethod
    def from_json(cls, d: dict | None) -> "Platform | None":
        if not isinstance(d, dict) or "os" not in d or "architecture" not in d:
            return None
        return cls(str(d["os"]), str(d["architecture"]), d.get("variant") or None)

    def matches(self, other: "Platform", strict_variant: bool) -> bool:
        """Whether ``other`` (from an index) can run as ``self``; arm64's variant defaults to v8."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.variant is None or not strict_variant:
            return True
        default = "v8" if self.architecture == "arm64" else None
        return (other.variant or default) == self.variant


def parse_json(data: bytes, what: str) -> dict:
    """JSON object from a manifest/config/index blob, or CorruptDataError naming ``what``."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        offset = getattr(e, "pos", None)
        raise CorruptDataError(f"malformed JSON: {getattr(e, 'msg', e)}", blob=what, offset=offset) from None
    if not isinstance(doc, dict):
        raise CorruptDataError("malformed JSON: expected an object", blob=what)
    return doc


def _descriptor(d, what: str) -> Descriptor:
    if not isinstance(d, dict) or not isinstance(d.get("digest"), str):
        raise CorruptDataError(f"descriptor without a digest: {json.dumps(d)[:80]}", blob=what)
    try:
        desc = Descriptor.from_json(d)
    except (TypeError, ValueError):
        raise CorruptDataError(f"descriptor with a bad size: {json.dumps(d)[:80]}", blob=what) from None
    if not isinstance(desc.media_type, str) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in desc.annotations.items()):
        raise CorruptDataError(f"descriptor {desc.digest}: media type and annotations must be strings",
                               blob=what)
    return desc


def manifest_kind(doc: dict, desc: Descriptor, what: str) -> str:
    """``"index"`` or ``"manifest"``; media type from the document, else from the descriptor."""
    media_type = doc.get("mediaType") or desc.media_type
    if not media_type:  # OCI allows omitting it: decide from the shape
        media_type = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    if media_type in INDEX_TYPES:
        if not isinstance(doc.get("manifests"), list):
            raise CorruptDataError("index without a 'manifests' list", blob=what)
        return "index"
    if media_type in MANIFEST_TYPES:
        if not isinstance(doc.get("layers"), list) or not isinstance(doc.get("config"), dict):
            raise CorruptDataError("manifest without 'config' and 'layers'", blob=what)
        return "manifest"
    raise UnsupportedError(f"{what}: media type {media_type!r} is not an image manifest or index")


def index_entries(doc: dict, what: str) -> list[Descriptor]:
    return [_descriptor(d, what) for d in doc["manifests"]]


def _is_attestation(desc: Descriptor) -> bool:
    return desc.annotations.get("vnd.docker.reference.type") == "attestation-manifest" or (
        desc.platform or {}).get("os") == "unknown"


def select_platform(doc: dict, wanted: Platform, what: str) -> Descriptor:
    """The index entry for ``wanted``; exact variant first, then any variant of that arch."""
    entries = [d for d in index_entries(doc, what) if not _is_attestation(d)]
    for strict in (True, False):
        for d in entries:
            plat = Platform.from_json(d.platform)
            if plat is not None and wanted.matches(plat, strict):
                return d
    available = sorted({str(p) for p in (Platform.from_json(d.platform) for d in entries) if p})
    raise NotFoundError(f"{what}: no image for platform {wanted} (available: {', '.join(available) or 'none'})")


@dataclass
class Layer:
    """One manifest layer and what it is."""

    descriptor: Descriptor
    kind: str
    #: for ``fastoci``: the original OCI layer the meta layer maps into (size may be UNKNOWN_SIZE)
    target: Descriptor | None = None

    @property
    def target_is_gzip(self) -> bool:
        return self.target is not None and self.target.media_type.endswith("gzip")


def classify_layer(desc: Descriptor, what: str) -> Layer:
    """Decide a layer's kind from its annotations and media type (see the module docstring)."""
    ann = desc.annotations
    if ann.get(ANN_ACCELERATION) == "yes":
        return Layer(desc, "acceleration")
    target_digest = ann.get(ANN_TURBO_TARGET_DIGEST) or ann.get(ANN_FASTOCI_TARGET_DIGEST)
    if target_digest:
        version = ann.get(ANN_VERSION)
        if version not in (None, VERSION_TURBO, VERSION_FASTOCI):
            raise UnsupportedError(f"{what}: layer {desc.digest} has TurboOCI version {version!r} "
                                   f"(supported: {VERSION_TURBO}, {VERSION_FASTOCI})")
        target_type = (ann.get(ANN_TURBO_TARGET_MEDIA_TYPE) or ann.get(ANN_FASTOCI_TARGET_MEDIA_TYPE)
                       or OCI_LAYER_GZIP)
        return Layer(desc, "fastoci", Descriptor(target_type, target_digest, UNKNOWN_SIZE))
    if ANN_BLOB_DIGEST in ann and ANN_BLOB_SIZE in ann:
        version = ann.get(ANN_VERSION, VERSION_NATIVE)
        if version != VERSION_NATIVE:
            raise UnsupportedError(f"{what}: layer {desc.digest} has overlaybd version {version!r} "
                                   f"(supported: {VERSION_NATIVE})")
        return Layer(desc, "overlaybd")
    kind = _LAYER_KINDS.get(desc.media_type)
    if kind is None:
        raise UnsupportedError(f"{what}: layer {desc.digest} has unsupported media type {desc.media_type!r}")
    return Layer(desc, kind)


def image_mode(layers: list[Layer], what: str) -> str:
    """``overlaybd``, ``fastoci`` or ``oci``; a mix of plain and accelerated layers is refused."""
    kinds = {layer.kind for layer in layers} - {"acceleration"}
    plain = {k for k in kinds if k.startswith("oci-")}
    if plain and kinds - plain:
        raise UnsupportedError(f"{what}: image mixes plain OCI and accelerated layers")
    if "fastoci" in kinds:
        return "fastoci"  # a native base layer (--mkfs=false) may sit under TurboOCI layers
    if "overlaybd" in kinds:
        return "overlaybd"
    return "oci"


@dataclass
class Image:
    """A resolved single-platform image."""

    reference: Reference
    store: BlobStore
    manifest_descriptor: Descriptor
    manifest: dict
    config: dict
    layers: list[Layer]
    mode: str
    platform: str
    #: the index the manifest was chosen from, if any
    index_descriptor: Descriptor | None = None
    config_descriptor: Descriptor | None = None


def load_manifest(store: BlobStore, ref: Reference, desc: Descriptor, platform: str | None) -> Image:
    """Fetch ``desc`` (index or manifest), pick the platform, fetch the config, classify layers."""
    what = f"{ref} ({desc.digest})"
    doc = parse_json(store.fetch_manifest(desc), what)
    index_desc = None
    if manifest_kind(doc, desc, what) == "index":
        wanted = Platform.parse(platform) if platform else Platform.host()
        index_desc, desc = desc, select_platform(doc, wanted, what)
        what = f"{ref} ({desc.digest})"
        doc = parse_json(store.fetch_manifest(desc), what)
        if manifest_kind(doc, desc, what) != "manifest":
            raise UnsupportedError(f"{what}: nested index inside an index")
    config_desc = _descriptor(doc["config"], what)
    if config_desc.media_type and config_desc.media_type not in CONFIG_TYPES:
        raise UnsupportedError(f"{what}: config media type {config_desc.media_type!r} is not a container image")
    config = parse_json(store.fetch_blob(config_desc.digest, config_desc.size), f"config {config_desc.digest}")
    layers = [classify_layer(_descriptor(d, what), what) for d in doc["layers"]]
    plat = Platform(str(config.get("os", "linux")), str(config.get("architecture", "unknown")),
                    config.get("variant") or None)
    if platform and index_desc is None and not Platform.parse(platform).matches(plat, strict_variant=False):
        raise NotFoundError(f"{what}: image is for {plat}, not {platform}")
    return Image(reference=ref, store=store, manifest_descriptor=desc, manifest=doc, config=config,
                 layers=layers, mode=image_mode(layers, what), platform=str(plat),
                 index_descriptor=index_desc, config_descriptor=config_desc)
