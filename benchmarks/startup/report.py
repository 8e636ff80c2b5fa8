"""The result table (the layout of issue 6) and the JSON result file.

Ratios compare a mode's service-available time with the traditional pull of the
same image on the same link, measured in the same run (median of its runs).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict

from .traditional import ColdStart

HEADER = ("image", "link", "mode", "pull s", "service available s", "bytes fetched", "registry size",
          "vs traditional")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def ratios(results: list[tuple[str, ColdStart]]) -> list[float | None]:
    """For each (link, result): available_s / the traditional available_s of its image and link
    (the median when there were several runs)."""
    runs: dict[tuple[str, str], list[float]] = {}
    for link, r in results:
        if r.mode == "traditional":
            runs.setdefault((link, r.image), []).append(r.available_s)
    base = {key: statistics.median(values) for key, values in runs.items()}
    return [r.available_s / base[(link, r.image)] if (link, r.image) in base else None for link, r in results]


def table(results: list[tuple[str, ColdStart]]) -> str:
    rows = [HEADER]
    for (link, r), ratio in zip(results, ratios(results)):
        rows.append((r.image, link, r.mode, f"{r.pull_s:.2f}", f"{r.available_s:.2f}", _size(r.bytes_fetched),
                     _size(r.registry_size), "-" if ratio is None else f"{ratio:.2f}x"))
    return _format(rows)


def _format(rows: list[tuple[str, ...]]) -> str:
    """Rows as aligned columns, the first one a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def sizes_table(sizes: list[tuple[str, str, int]]) -> str:
    """Registry size of each image in each format: manifest + config + the layers it lists
    (for FastOCI the meta layers; the gzip layers they read are the OCI image's)."""
    return _format([("image", "format", "registry size")] + [(n, f, _size(s)) for n, f, s in sizes])


def machine() -> dict:
    """Where the figures came from."""
    return {"hostname": platform.node(), "kernel": platform.release(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "virtualized": _virt()}


def _virt() -> str:
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def write_json(path: str, results: list[tuple[str, ColdStart]], images: dict, modes: dict) -> None:
    """``benchmarks/results/startup.json``: machine, images, modes (ran / not available), results."""
    doc = {
        "benchmark": "startup",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "images": images,
        "modes": modes,
        "results": [dict(asdict(r), link=link, ratio_vs_traditional=ratio)
                    for (link, r), ratio in zip(results, ratios(results))],
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".part", "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(path + ".part", path)
