"""The ways an image can be started, and which of them can run here and now.

``traditional`` pulls and unpacks (``traditional.cold_start``); ``overlaybd`` and
``fastoci`` mount the converted image lazily (``lazy.cold_start``, needs a kernel
with TCMU: the driver re-runs itself in the VM harness when the host has none);
the ``+prefetch`` modes replay a trace recorded by an untimed first run of the
same image and format (needs ``obd mount --record-trace/--prefetch``: until obd
has them those modes are listed as not available, never faked).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import lazy, traditional
from .registry import registry_options
from .result import ColdStart
from .service import AppConfig

#: the obd mount options the prefetch modes use
PREFETCH_FLAGS = ("--record-trace", "--prefetch")


@dataclass
class Trial:
    """Everything one cold start of one image needs."""

    image: str
    refs: dict[str, str]  # format (oci, overlaybd, fastoci) -> reference in the benchmark registry
    sizes: dict[str, int]  # format -> bytes the registry stores for it
    app: AppConfig
    work: str
    port: int
    timeout: float
    traces: dict[str, str] = field(default_factory=dict)  # format -> recorded trace file
    sample_stacks: bool = False  # the handler samples its threads' stacks (details["handler_stacks"])
    obd_env: dict[str, str] = field(default_factory=dict)  # extra environment of obd (config overrides)


@dataclass(frozen=True)
class Mode:
    """A start-up mode: ``fmt`` is the image format it starts, ``prefetch`` replays a recorded trace."""

    name: str
    fmt: str
    measures: str
    prefetch: bool = False

    @property
    def lazy(self) -> bool:
        return self.fmt != "oci"

    def run(self, t: Trial) -> ColdStart:
        """One cold start of ``t.image`` in this mode."""
        if not self.lazy:
            return traditional.cold_start(t.image, t.refs["oci"], t.work, registry_options(), t.port, t.timeout)
        return lazy.cold_start(t.image, self.name, t.refs[self.fmt], t.work, t.app, t.port, t.timeout,
                               t.sizes[self.fmt], prefetch=t.traces[self.fmt] if self.prefetch else None,
                               sample_stacks=t.sample_stacks, obd_env=t.obd_env)


_LAZY = ("pull s = `obd mount REF MNT` until the mountpoint is usable, service available s = until the app "
         "started from MNT answers GET /; bytes fetched = what the registry's access log shows it served, "
         "bytes read = sectors read from the device, handler RSS = VmHWM of the handler process")

MODES = (
    Mode("traditional", "oci",
         "download every layer in full, gunzip + untar with whiteouts, chroot the app: pull s = until the "
         "last layer is unpacked, service available s = until GET / answers"),
    Mode("overlaybd", "overlaybd", "image converted to native overlaybd (obd's converter); " + _LAZY),
    Mode("fastoci", "fastoci", "image converted to FastOCI (TurboOCI meta layers over the original gzip "
         "layers of the OCI image); " + _LAZY),
    Mode("overlaybd+prefetch", "overlaybd", "as overlaybd, mounted with --prefetch TRACE, the trace "
         "recorded by an untimed unshaped run with --record-trace", prefetch=True),
    Mode("fastoci+prefetch", "fastoci", "as fastoci, mounted with --prefetch TRACE, the trace recorded "
         "by an untimed unshaped run with --record-trace", prefetch=True),
)


def obd_mount_flags() -> set[str]:
    """The options ``obd mount`` accepts in this checkout."""
    from tcmu_overlaybd.cli.main import cli

    return {opt for p in cli.get_command(None, "mount").params for opt in p.opts}


def missing(mode: Mode, flags: set[str]) -> str:
    """What ``mode`` still needs from obd ("" when it can run)."""
    if mode.prefetch:
        absent = [f for f in PREFETCH_FLAGS if f not in flags]
        if absent:
            return f"obd mount {' and '.join(absent)} (not in this checkout yet)"
    return ""


def select(names: list[str], flags: set[str]) -> tuple[list[Mode], list[tuple[Mode, str]]]:
    """(modes that will run, [(mode asked for that cannot run yet, what it needs)])."""
    known = {m.name: m for m in MODES}
    wanted = [known[n] for n in names]
    return ([m for m in wanted if not missing(m, flags)],
            [(m, missing(m, flags)) for m in wanted if missing(m, flags)])


def record_trace(t: Trial, fmt: str, path: str) -> ColdStart:
    """The untimed run that records ``path``: the app started once from a ``--record-trace`` mount."""
    return lazy.cold_start(t.image, f"{fmt} recording", t.refs[fmt], t.work, t.app, t.port, t.timeout,
                           t.sizes[fmt], record_trace=path, sample_stacks=t.sample_stacks,
                           obd_env=t.obd_env)
