"""The goals of issue 6, checked against measured results: one PASS / FAIL / NOT MEASURED line each.

* lazy service available <= 1/3 of the traditional pull (large image, shaped link, with prefetch);
* FastOCI service available <= 1.25x overlaybd (same image, link and prefetch setting);
* ``obd mount`` < 2 s on the unshaped link (the figure as measured; under TCG a
  separate line scales it by the VM/host factor the traditional mode measured,
  as an estimate, never as the verdict);
* bytes fetched <= 2x bytes read from the device;
* handler peak RSS < 150 MB per mount of the large image.

Several runs of one (image, link, mode) are summarised by their median.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .report import size, traditional_pulls
from .result import ColdStart

LARGE = "python-large"
SHAPED = "100mbit-20ms"
UNSHAPED = "unshaped"
LAZY_VS_TRADITIONAL = 1 / 3
FASTOCI_VS_OVERLAYBD = 1.25
MOUNT_S = 2.0
FETCH_VS_READ = 2.0
RSS_BYTES = 150_000_000
PAIRS = (("fastoci", "overlaybd"), ("fastoci+prefetch", "overlaybd+prefetch"),
         ("fastoci recording", "overlaybd recording"))


@dataclass(frozen=True)
class Goal:
    verdict: str  # PASS, FAIL or NOT MEASURED
    goal: str
    detail: str

    def line(self) -> str:
        return f"{self.verdict}: {self.goal}: {self.detail}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _groups(results: list[tuple[str, ColdStart]]) -> dict[tuple[str, str, str], list[ColdStart]]:
    out: dict[tuple[str, str, str], list[ColdStart]] = {}
    for link, r in results:
        out.setdefault((r.image, link, r.mode), []).append(r)
    return out


def _median(runs: list[ColdStart], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def check(results: list[tuple[str, ColdStart]], vm_host_factor: float | None = None) -> list[Goal]:
    """Every goal line the results allow (NOT MEASURED where a needed figure is missing)."""
    groups = _groups(results)
    pulls = traditional_pulls(results)
    lazy = {k: v for k, v in groups.items() if k[2] != "traditional"}
    goals: list[Goal] = []

    what = f"lazy service available <= 1/3 traditional pull ({LARGE}, {SHAPED}, with prefetch)"
    base = pulls.get((SHAPED, LARGE))
    for mode in ("overlaybd+prefetch", "fastoci+prefetch"):
        runs = groups.get((LARGE, SHAPED, mode))
        if not runs or base is None:
            goals.append(Goal("NOT MEASURED", what, f"{mode}: needs {mode} and traditional on that image and link"))
            continue
        ratio = _median(runs, "available_s") / base
        goals.append(Goal(_verdict(ratio <= LAZY_VS_TRADITIONAL), what,
                          f"{mode} {_median(runs, 'available_s'):.1f} s vs pull {base:.1f} s = {ratio:.2f}x"))

    what = f"FastOCI service available <= {FASTOCI_VS_OVERLAYBD}x overlaybd"
    for (image, link, mode), runs in lazy.items():
        for fast, native in PAIRS:
            other = groups.get((image, link, native))
            if mode == fast and other:
                ratio = _median(runs, "available_s") / _median(other, "available_s")
                goals.append(Goal(_verdict(ratio <= FASTOCI_VS_OVERLAYBD), what,
                                  f"{image} {link} {fast} {_median(runs, 'available_s'):.1f} s vs {native} "
                                  f"{_median(other, 'available_s'):.1f} s = {ratio:.2f}x"))
    if not any(g.goal == what for g in goals):
        goals.append(Goal("NOT MEASURED", what, "needs fastoci and overlaybd on the same image and link"))

    what = f"obd mount < {MOUNT_S:g} s ({UNSHAPED})"
    for (image, link, mode), runs in lazy.items():
        if link != UNSHAPED:
            continue
        pull = _median(runs, "pull_s")
        detail = f"{image} {mode} {pull:.2f} s"
        if vm_host_factor:
            detail += (f" in the VM; / VM-host factor {vm_host_factor:.1f} = ~{pull / vm_host_factor:.2f} s "
                       "on the host (estimate)")
        goals.append(Goal(_verdict(pull < MOUNT_S), what, detail))
    if not any(g.goal == what for g in goals):
        goals.append(Goal("NOT MEASURED", what, "needs a lazy mode on the unshaped link"))

    what = f"bytes fetched <= {FETCH_VS_READ:g}x bytes read"
    for (image, link, mode), runs in lazy.items():
        fetched, read = _median(runs, "bytes_fetched"), _median(runs, "bytes_read")
        ratio = fetched / read if read else float("inf")
        goals.append(Goal(_verdict(ratio <= FETCH_VS_READ), what,
                          f"{image} {link} {mode} {size(int(fetched))} / {size(int(read))} = {ratio:.2f}x"))
    if not any(g.goal == what for g in goals):
        goals.append(Goal("NOT MEASURED", what, "needs a lazy mode"))

    what = f"handler RSS < {size(RSS_BYTES)} ({LARGE})"
    for (image, link, mode), runs in lazy.items():
        if image == LARGE:
            peak = max(r.handler_rss for r in runs)
            goals.append(Goal(_verdict(peak < RSS_BYTES), what, f"{link} {mode} {size(peak)}"))
    if not any(g.goal == what for g in goals):
        goals.append(Goal("NOT MEASURED", what, f"needs a lazy mode on {LARGE}"))
    return goals


def vm_host_factor(vm: list[tuple[str, ColdStart]], host: list[tuple[str, ColdStart]]) -> tuple[float, str] | None:
    """How much slower the VM ran the traditional unshaped pull than the host did (median ratio over
    the images both measured), with the figures it came from; None without both."""
    vm_pulls, host_pulls = traditional_pulls(vm), traditional_pulls(host)
    common = sorted(k for k in vm_pulls if k in host_pulls and k[0] == UNSHAPED)
    if not common:
        return None
    factor = statistics.median(vm_pulls[k] / host_pulls[k] for k in common)
    detail = ", ".join(f"{image}: VM {vm_pulls[(link, image)]:.1f} s / host {host_pulls[(link, image)]:.1f} s"
                       for link, image in common)
    return factor, detail
