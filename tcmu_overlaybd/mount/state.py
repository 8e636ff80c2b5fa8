"""What obd keeps about its mounts: run-time state files and persistent mount records.

State files live under ``/run/obd`` (config ``state.dir``), one JSON file per
mount: the handler process's only input (image reference and open options,
never on a command line) and what ``obd list``/``umount``/``recover`` read.

Mount records live under ``/var/lib/obd/mounts`` (config ``state.persistDir``)
and survive a reboot: what ``obd recover`` needs to re-create a mount whose
state file, kernel objects and processes are all gone.

Both are written 0600 in 0700 directories by root and never hold credentials
(``SECRET_OPTIONS`` are kept out of them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field

from ..atomic import write_private_file
from ..errors import StateError

#: OpenOptions fields that are credentials: never written to a state file
SECRET_OPTIONS = ("username", "password")
#: files a handler creates beside the state file (scripts/obd-cleanup knows them too)
HANDLER_FILE_SUFFIXES = (".stats.sock", ".metrics")


@dataclass
class MountState:
    id: str
    mountpoint: str
    #: image reference, or the path of a raw disk image when ``raw``
    image: str
    raw: bool
    #: ``OpenOptions`` fields used to re-open the image in the handler process
    options: dict
    size: int
    backstore: str
    wwn: str
    lower: str
    upper: str
    work: str
    #: upper/work were created by obd (removed on umount)
    own_upper: bool
    device: str = ""
    backstore_path: str = ""
    #: starting | mounted
    phase: str = "starting"
    extra: dict = field(default_factory=dict)

    def public(self) -> dict:
        """The fields ``obd list --json`` shows (no options: they may hold credentials)."""
        d = dataclasses.asdict(self)
        d.pop("options")
        d.pop("extra")
        return d


def mount_id(mountpoint: str) -> str:
    return hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:12]


class _MountFiles:
    """A directory of one ``<id>.json`` file per mount; ``kind`` names them in errors."""

    kind = ""

    def __init__(self, path: str):
        self.path = path

    def file(self, mid: str) -> str:
        return os.path.join(self.path, f"{mid}.json")

    def _load_as(self, cls, path: str):
        try:
            with open(path) as f:
                return cls(**json.load(f))
        except FileNotFoundError:
            raise StateError(f"{path}: no such {self.kind}") from None
        except (ValueError, TypeError) as e:
            raise StateError(f"{path}: unreadable {self.kind}: {e}") from None

    def load(self, mid: str):
        return self.load_file(self.file(mid))

    def ids(self) -> list[str]:
        """The ids of every file, readable or not."""
        try:
            names = sorted(os.listdir(self.path))
        except FileNotFoundError:
            return []
        return [n[:-5] for n in names if n.endswith(".json")]

    def find_mountpoint(self, mountpoint: str):
        mid = mount_id(mountpoint)
        return self.load(mid) if os.path.exists(self.file(mid)) else None


class StateDir(_MountFiles):
    """The directory of state files (``<id>.json``) and handler logs (``<id>.log``)."""

    kind = "mount state"

    def log(self, mid: str) -> str:
        return os.path.join(self.path, f"{mid}.log")

    def pids_file(self, mid: str) -> str:
        return os.path.join(self.path, f"{mid}.pids")

    def write_pids(self, mid: str, supervisor: int, handler: int, restarts: int) -> None:
        """Written by the supervisor only (the state file belongs to obd mount)."""
        tmp = self.pids_file(mid) + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"supervisor_pid": supervisor, "handler_pid": handler, "restarts": restarts}, f)
        os.replace(tmp, self.pids_file(mid))

    def read_pids(self, mid: str) -> dict:
        try:
            with open(self.pids_file(mid)) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"supervisor_pid": 0, "handler_pid": 0, "restarts": 0}

    def save(self, st: MountState) -> None:
        _write_private_json(self.path, self.file(st.id), dataclasses.asdict(st))

    def load_file(self, path: str) -> MountState:
        return self._load_as(MountState, path)

    def all(self) -> list[MountState]:
        return [self.load(mid) for mid in self.ids()]

    def remove(self, mid: str) -> None:
        """Every file of mount ``mid``: state, log, pids, and the handler's stats socket and
        metrics address (stats/telemetry.py), which a killed handler leaves behind."""
        extra = [os.path.join(self.path, mid + suffix) for suffix in HANDLER_FILE_SUFFIXES]
        for p in (self.file(mid), self.log(mid), self.pids_file(mid), *extra):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


def _write_private_json(directory: str, path: str, data: dict) -> None:
    """Atomically write ``data`` to ``path`` (0600) inside ``directory`` (made 0700)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    write_private_file(path, json.dumps(data, indent=1).encode())


@dataclass
class MountRecord:
    """One mount as ``obd mount`` made it, kept across reboots (``<persistDir>/<id>.json``).

    Everything ``obd recover`` needs to mount it again the same way, with the same
    upper directory; ``size`` is the virtual disk size, checked again on recovery so a
    changed image is refused rather than put under the old upper layer.
    """

    id: str
    mountpoint: str
    image: str
    raw: bool
    #: ``OpenOptions`` fields without ``SECRET_OPTIONS``
    options: dict
    upper: str
    work: str
    own_upper: bool
    size: int

    @classmethod
    def of(cls, st: MountState) -> "MountRecord":
        options = {k: v for k, v in st.options.items() if k not in SECRET_OPTIONS}
        return cls(id=st.id, mountpoint=st.mountpoint, image=st.image, raw=st.raw, options=options,
                   upper=st.upper, work=st.work, own_upper=st.own_upper, size=st.size)

    def public(self) -> dict:
        """The fields ``obd list --json`` shows."""
        d = dataclasses.asdict(self)
        d.pop("options")
        return d


class RecordDir(_MountFiles):
    """The directory of persistent mount records (``<id>.json``)."""

    kind = "mount record"

    def save(self, rec: MountRecord) -> None:
        data = dataclasses.asdict(rec)
        data["options"] = {k: v for k, v in rec.options.items() if k not in SECRET_OPTIONS}
        _write_private_json(self.path, self.file(rec.id), data)

    def load_file(self, path: str) -> MountRecord:
        rec = self._load_as(MountRecord, path)
        if not isinstance(rec.options, dict) or os.path.basename(path) != f"{rec.id}.json":
            raise StateError(f"{path}: unreadable mount record: its id is not its file name")
        return rec

    def remove(self, mid: str) -> None:
        try:
            os.unlink(self.file(mid))
        except FileNotFoundError:
            pass


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


#: in the command line of every supervisor and of its handlers (forks of it)
SUPERVISOR_MODULE = b"tcmu_overlaybd.mount.supervisor"


def obd_pid_alive(pid: int) -> bool:
    """True if ``pid`` is a live obd supervisor or handler (a pid recycled by another
    program is not: pids files outlive their processes)."""
    if not pid_alive(pid):
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return SUPERVISOR_MODULE in f.read()
    except OSError:
        return False
