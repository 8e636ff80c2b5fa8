"""The ways an image can be started, and which of them this driver can run now.

``traditional`` runs (``traditional.cold_start``).  The lazy modes are listed
with what they will measure and what they still need; the driver prints them as
"not yet available" and records them so in the JSON file, instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .traditional import cold_start


@dataclass(frozen=True)
class Mode:
    """A start-up mode: ``run`` measures one cold start; None while the mode cannot run yet."""

    name: str
    measures: str
    run: Callable | None = None
    missing: str = ""

    @property
    def available(self) -> bool:
        return self.run is not None


_LAZY_NEEDS = ("its measuring step: `obd mount` of <registry>/bench/<image>:<mode> (already converted and "
               "pushed by this driver) on a kernel with target_core_user + tcm_loop, i.e. in the VM harness")

MODES = (
    Mode("traditional",
         "download every layer in full, gunzip + untar with whiteouts, chroot the app: pull s = until the "
         "last layer is unpacked, service available s = until GET / answers; bytes counted by the client",
         run=cold_start),
    Mode("overlaybd",
         "image converted to native overlaybd (obd's converter) and pushed beside the OCI one; pull s = "
         "`obd mount REF MNT` until the mountpoint is usable, service available s = until the app started "
         "from MNT answers GET /; bytes = blob bytes the registry served for the mount (lazy range reads)",
         missing=_LAZY_NEEDS),
    Mode("fastoci",
         "image converted to FastOCI (TurboOCI meta layers over the original gzip layers of the OCI "
         "image); same timings and byte count as overlaybd",
         missing=_LAZY_NEEDS),
)


def select(names: list[str]) -> tuple[list[Mode], list[Mode]]:
    """(modes that will run, modes asked for that cannot run yet)."""
    known = {m.name: m for m in MODES}
    wanted = [known[n] for n in names]
    return [m for m in wanted if m.available], [m for m in wanted if not m.available]
