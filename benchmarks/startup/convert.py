"""The benchmark images converted to native overlaybd and FastOCI, as ``obd convert`` makes them.

Conversion uses obd's own converter (``tcmu_overlaybd.convert.image``) on the
built OCI layout and writes one layout per image and format under
``<chain>/converted/<format>-<key>/``.  The key hashes the source manifest
digest and the converter's source code, so a converter change converts again
and an unchanged one is reused.  A FastOCI layout also holds the original gzip
layers its meta layers point into; in the registry those are the OCI image's
own blobs (same repository), so only the meta layers are new bytes.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass

import tcmu_overlaybd
from tcmu_overlaybd.convert.image import ConvertOptions, convert_image
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image

from .images import BuiltImage

FORMATS = ("overlaybd", "fastoci")
_DONE = "converted.json"


@dataclass
class Converted:
    """One converted image: its layout reference and layer sizes (meta layers for FastOCI)."""

    name: str
    fmt: str
    layout: str
    tag: str
    manifest_digest: str
    layer_sizes: list[int]
    convert_seconds: float

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"


def converter_fingerprint() -> str:
    """A hash of the converter's and formats' source files: a different converter, a different cache key."""
    pkg = os.path.dirname(tcmu_overlaybd.__file__)
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(pkg, "convert", "*.py")) + glob.glob(os.path.join(pkg, "format", "*.py"))):
        with open(path, "rb") as f:
            h.update(os.path.relpath(path, pkg).encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def convert(image: BuiltImage, fmt: str, out_root: str, say=print) -> Converted:
    """``image`` in format ``fmt`` (``overlaybd`` or ``fastoci``), converted unless cached."""
    key = hashlib.sha256(f"{image.manifest_digest} {converter_fingerprint()}".encode()).hexdigest()[:16]
    layout = os.path.join(out_root, f"{fmt}-{image.name}-{key}")
    done = os.path.join(layout, _DONE)
    if os.path.exists(done):
        with open(done) as f:
            return Converted(**json.load(f))
    tmp, work = layout + ".part", layout + ".work"
    for d in (tmp, work):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.monotonic()
    say(f"converting {image.ref} to {fmt}")
    source = open_image(image.ref, OpenOptions(quiet=True, discover_accelerated=False))
    try:
        res = convert_image(source, tmp, work, ConvertOptions(fmt=fmt, tag=image.tag))
    finally:
        source.store.close()
        shutil.rmtree(work, ignore_errors=True)
    converted = Converted(image.name, fmt, layout, image.tag, res.manifest_descriptor.digest,
                          [layer["size"] for layer in res.manifest["layers"]], time.monotonic() - t0)
    with open(os.path.join(tmp, _DONE), "w") as f:
        json.dump(asdict(converted), f)
    shutil.rmtree(layout, ignore_errors=True)
    os.replace(tmp, layout)
    say(f"  {fmt} {image.name}: {len(converted.layer_sizes)} layers, {sum(converted.layer_sizes) / 1e6:.1f} MB "
        f"({converted.convert_seconds:.0f} s)")
    return converted
