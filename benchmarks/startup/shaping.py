"""Shaped links: the registry and its clients in a private network namespace with ``tc netem`` on lo.

Everything that talks to the registry (the registry itself, the pulls, the
mounts and the apps) runs in a network namespace of its own, created with
``ip netns add`` and entered by re-running the driver under ``ip netns exec``.
There a profile is applied to the namespace's loopback: ``netem rate R delay D``
delays every packet by D in each direction (an RTT of 2·D) and caps the rate, so
only traffic between processes on this machine is shaped, never the host's.
``apply_profile`` refuses to run outside the namespace the driver created.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from tcmu_overlaybd.errors import KernelError, UsageError


@dataclass(frozen=True)
class LinkProfile:
    """A link between client and registry: ``rate`` for tc (e.g. ``100mbit``), one-way ``delay_ms``."""

    name: str
    rate: str | None = None
    delay_ms: float = 0.0

    @property
    def shaped(self) -> bool:
        return self.rate is not None or self.delay_ms > 0

    def netem_args(self) -> list[str]:
        args = ["netem"]
        if self.rate:
            args += ["rate", self.rate]
        if self.delay_ms:
            args += ["delay", f"{self.delay_ms:g}ms"]
        if self.rate:
            args += ["limit", "100000"]  # a queue deep enough that a bulk download is never dropped
        return args


PROFILES = {
    "unshaped": LinkProfile("unshaped"),
    "100mbit-20ms": LinkProfile("100mbit-20ms", "100mbit", 10.0),
}


def parse_profiles(text: str) -> list[LinkProfile]:
    """``unshaped,100mbit-20ms`` -> profiles (names from ``PROFILES``)."""
    out = []
    for name in filter(None, (n.strip() for n in text.split(","))):
        if name not in PROFILES:
            raise UsageError(f"unknown link profile {name!r} (known: {', '.join(PROFILES)})")
        out.append(PROFILES[name])
    if not out:
        raise UsageError("no link profile given")
    return out


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def inside_namespace(name: str) -> bool:
    """True if this process runs in the named network namespace ``name`` (``/run/netns/<name>``)."""
    try:
        return os.stat(f"/run/netns/{name}").st_ino == os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return False


def apply_profile(profile: LinkProfile, namespace: str) -> None:
    """Put ``profile`` on lo (replacing any earlier one; none when unshaped).

    Only inside the namespace ``namespace`` this driver created: never on the host's lo.
    """
    if not inside_namespace(namespace):
        raise UsageError(f"refusing to shape lo outside the benchmark's network namespace {namespace!r}")
    if not profile.shaped:
        _run("tc", "qdisc", "del", "dev", "lo", "root")  # fails harmlessly when none is set
        return
    res = _run("tc", "qdisc", "replace", "dev", "lo", "root", *profile.netem_args())
    if res.returncode != 0:
        raise KernelError(f"tc netem on lo failed: {res.stderr.strip()}")


class Namespace:
    """A network namespace ``name`` with lo up, and netem checked to work in it."""

    def __init__(self, name: str):
        self.name = name
        res = _run("ip", "netns", "add", name)
        if res.returncode != 0:
            raise KernelError(f"ip netns add {name}: {res.stderr.strip()}")
        try:
            self._check(_run("ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"), "ip link set lo up")
            probe = ("ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms")
            if _run(*probe).returncode != 0:
                _run("modprobe", "sch_netem")
                res = _run(*probe)
                if res.returncode != 0:
                    raise KernelError(f"tc netem is not available on this kernel ({res.stderr.strip()}); "
                                      "shaped links need sch_netem: run in the VM harness, or without --shape")
            _run("ip", "netns", "exec", name, "tc", "qdisc", "del", "dev", "lo", "root")
        except BaseException:
            self.delete()
            raise

    @staticmethod
    def _check(res: subprocess.CompletedProcess, what: str) -> None:
        if res.returncode != 0:
            raise KernelError(f"{what}: {res.stderr.strip()}")

    def run(self, argv: list[str], cwd: str | None = None) -> int:
        """Run ``argv`` inside the namespace, passing its output through; returns its exit status."""
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], cwd=cwd).returncode

    def delete(self) -> None:
        _run("ip", "netns", "del", self.name)
