"""Where the CPU went during a cold start: the machine's CPU time by kind and by process.

Under the VM harness every process (the app, obd's handler, the guest's
registry, the kernel's SCSI target) shares one emulated CPU, so a lazy start
can be slow without waiting for the network at all.  A ``Snapshot`` is taken at
the start of a cold start, when its pull (or ``obd mount``) returned and when
the app answered; ``between`` gives the seconds of each kind in between
(``/proc/stat``: user, system, softirq, iowait, idle, ...) and the CPU seconds
of the busiest processes (``/proc/PID/stat`` utime + stime over all threads),
grouped by label (the handler's pid, known only once ``obd list`` ran, is
labelled afterwards) or else by command name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

#: the columns of the ``cpu`` line of /proc/stat, in order (man 5 proc)
KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
#: how many process groups ``between`` lists, busiest first
TOP = 6


def _group(comm: str) -> str:
    """The name a process is counted under: kernel workers (whose name shows their current work) as one."""
    return "kworkers" if comm.startswith("kworker/") else comm


def _read_proc(pid: str) -> tuple[str, int, int] | None:
    """(group name, start time, utime + stime in clock ticks over all threads) of ``pid``; None once
    it is gone.  The start time tells a reused pid from the process that had it before."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            line = f.read()
    except OSError:
        return None
    head, _, tail = line.rpartition(")")
    fields = tail.split()
    if len(fields) < 20:
        return None
    # fields 14, 15 and 22 of man 5 proc, counted after pid and (comm)
    return _group(head.partition("(")[2]), int(fields[19]), int(fields[11]) + int(fields[12])


@dataclass
class Snapshot:
    """CPU ticks of the whole machine by kind, and of every process by pid."""

    kinds: dict[str, int]
    procs: dict[int, tuple[str, int, int]] = field(default_factory=dict)  # pid -> (group, start, ticks)

    @classmethod
    def take(cls) -> "Snapshot":
        with open("/proc/stat") as f:
            first = f.readline().split()
        procs = {}
        for name in os.listdir("/proc"):
            if name.isdigit() and (p := _read_proc(name)) is not None:
                procs[int(name)] = p
        return cls({k: int(v) for k, v in zip(KINDS, first[1:])}, procs)


def between(a: Snapshot, b: Snapshot, labels: dict[int, str] | None = None) -> dict[str, float]:
    """Seconds of each CPU kind from ``a`` to ``b``, then ``proc:<name>`` for the busiest process
    groups: a pid in ``labels`` under its label, any other under its command name (a process born
    after ``a`` counts from zero; one that ended before ``b`` is not seen)."""
    hz = os.sysconf("SC_CLK_TCK")
    out = {k: round((b.kinds[k] - a.kinds.get(k, 0)) / hz, 2) for k in b.kinds}
    groups: dict[str, int] = {}
    for pid, (group, start, ticks) in b.procs.items():
        name = (labels or {}).get(pid, group)
        before = a.procs[pid][2] if pid in a.procs and a.procs[pid][1] == start else 0
        groups[name] = groups.get(name, 0) + ticks - before
    for name, ticks in sorted(groups.items(), key=lambda kv: -kv[1])[:TOP]:
        if ticks > 0:
            out[f"proc:{name}"] = round(ticks / hz, 2)
    return out


def phases(t0: Snapshot, t_pull: Snapshot, t_up: Snapshot,
           labels: dict[int, str] | None = None) -> dict[str, dict[str, float]]:
    """The two phases of a cold start: until the pull (or mount) returned, and from then until the
    app answered."""
    return {"pull": between(t0, t_pull, labels), "app": between(t_pull, t_up, labels)}


def summary(cpu: dict[str, dict[str, float]]) -> str:
    """One line per phase: busy seconds, the main kinds and the busiest processes."""
    parts = []
    for phase, d in cpu.items():
        busy = sum(v for k, v in d.items() if k in KINDS and k not in ("idle", "iowait"))
        kinds = ", ".join(f"{k} {d[k]:.1f}" for k in ("user", "system", "softirq", "iowait", "idle") if k in d)
        procs = ", ".join(f"{k[5:]} {v:.1f}" for k, v in d.items() if k.startswith("proc:"))
        parts.append(f"{phase}: busy {busy:.1f} s ({kinds}{'; ' + procs if procs else ''})")
    return " | ".join(parts)
