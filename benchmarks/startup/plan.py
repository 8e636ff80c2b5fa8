"""What the measuring part needs from the building part, as a file: the plan.

The driver builds and converts on the host (the Debian mirror is reachable
there, the disk is fast) and pushes every image into a seed registry storage.
The measuring part may run elsewhere: in a private network namespace (shaped
links) or in the VM harness (the lazy modes need TCMU), where the host's
files are visible read-only at the same paths.  The plan names the built images,
their conversions and the seed, so the measuring part builds nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from tcmu_overlaybd.errors import CorruptDataError

from .convert import Converted
from .images import BuiltImage
from .layers import LayerBlob
from .registry import PushedImage

VERSION = 1


@dataclass
class Plan:
    """Built images (by name), their conversions, the seed registry dir and what was pushed into it."""

    built: dict[str, BuiltImage]
    converted: dict[str, list[Converted]]
    seed: str
    pushed: dict[str, dict[str, PushedImage]]  # image -> format (oci, overlaybd, fastoci) -> pushed image

    def to_json(self) -> dict:
        return {"version": VERSION, "seed": self.seed,
                "built": {n: asdict(b) for n, b in self.built.items()},
                "converted": {n: [asdict(c) for c in cs] for n, cs in self.converted.items()},
                "pushed": {n: {f: asdict(p) for f, p in fs.items()} for n, fs in self.pushed.items()}}

    @classmethod
    def from_json(cls, doc: dict) -> "Plan":
        if doc.get("version") != VERSION:
            raise CorruptDataError(f"plan version {doc.get('version')!r}, this driver reads {VERSION}")
        built = {}
        for name, b in doc["built"].items():
            layers = [LayerBlob(**layer) for layer in b["layers"]]
            built[name] = BuiltImage(**{**b, "layers": layers})
        return cls(built, {n: [Converted(**c) for c in cs] for n, cs in doc["converted"].items()}, doc["seed"],
                   {n: {f: PushedImage(**p) for f, p in fs.items()} for n, fs in doc["pushed"].items()})

    def save(self, path: str) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def load(cls, path: str) -> "Plan":
        with open(path) as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise CorruptDataError(f"plan is not JSON ({e.msg})", blob=path, offset=e.pos) from None
        try:
            return cls.from_json(doc)
        except (KeyError, TypeError) as e:
            raise CorruptDataError(f"plan has a missing or unexpected field {e}", blob=path) from None
