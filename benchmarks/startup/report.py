"""The result table (the layout of issue 6) and the JSON result file.

Ratios compare a mode's service-available time with the traditional *pull* of
the same image on the same link, measured in the same run (medians when there
were several runs), as issue 6 states its goals.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, fields

from .result import ColdStart

HEADER = ("image", "link", "mode", "pull s", "service available s", "bytes fetched", "bytes read",
          "registry size", "handler RSS", "vs traditional pull")


def size(n: int | None) -> str:
    """``n`` bytes in decimal units, ``-`` for a figure a mode does not have."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def traditional_pulls(results: list[tuple[str, ColdStart]]) -> dict[tuple[str, str], float]:
    """(link, image) -> median pull s of the traditional runs."""
    runs: dict[tuple[str, str], list[float]] = {}
    for link, r in results:
        if r.mode == "traditional":
            runs.setdefault((link, r.image), []).append(r.pull_s)
    return {key: statistics.median(values) for key, values in runs.items()}


def ratios(results: list[tuple[str, ColdStart]]) -> list[float | None]:
    """For each (link, result): available_s / the traditional pull s of its image and link."""
    base = traditional_pulls(results)
    return [r.available_s / base[(link, r.image)] if (link, r.image) in base else None for link, r in results]


def table(results: list[tuple[str, ColdStart]]) -> str:
    rows = [HEADER]
    for (link, r), ratio in zip(results, ratios(results)):
        rows.append((r.image, link, r.mode, f"{r.pull_s:.2f}", f"{r.available_s:.2f}", size(r.bytes_fetched),
                     size(r.bytes_read), size(r.registry_size), size(r.handler_rss),
                     "-" if ratio is None else f"{ratio:.2f}x"))
    return format_rows(rows)


def format_rows(rows: list[tuple[str, ...]]) -> str:
    """Rows as aligned columns, the first one a header underlined with dashes."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def sizes_table(sizes: list[tuple[str, str, int]]) -> str:
    """Registry size of each image in each format: manifest + config + the layers it lists
    (for FastOCI the meta layers; the gzip layers they read are the OCI image's)."""
    return format_rows([("image", "format", "registry size")] + [(n, f, size(s)) for n, f, s in sizes])


def machine() -> dict:
    """Where the figures came from."""
    return {"hostname": platform.node(), "kernel": platform.release(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "virtualized": _virt(), "in_vm_harness": bool(os.environ.get("OBD_IN_VM"))}


def _virt() -> str:
    try:
        with open("/sys/class/dmi/id/product_name") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def result_json(link: str, r: ColdStart, ratio: float | None) -> dict:
    return dict(asdict(r), link=link, ratio_vs_traditional_pull=ratio)


def results_from_json(rows: list[dict]) -> list[tuple[str, ColdStart]]:
    """The (link, result) pairs of a JSON result file's ``results``."""
    names = {f.name for f in fields(ColdStart)}
    return [(row["link"], ColdStart(**{k: v for k, v in row.items() if k in names})) for row in rows]


def document(results: list[tuple[str, ColdStart]], images: dict, modes: dict, extra: dict | None = None) -> dict:
    """The JSON result document: machine, images, modes (ran / not available), results (+ ``extra``)."""
    doc = {
        "benchmark": "startup",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "images": images,
        "modes": modes,
        "results": [result_json(link, r, ratio) for (link, r), ratio in zip(results, ratios(results))],
    }
    doc.update(extra or {})
    return doc


def write_json(path: str, doc: dict) -> None:
    """Write ``doc`` to ``path`` atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".part", "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    os.replace(path + ".part", path)


def breakdown(results: list[tuple[str, ColdStart]]) -> str:
    """Where a lazy cold start's time went, from the handler's ``obd stats`` (kept in ``details``):
    device reads, the seconds they waited in sum, registry fetches and their mean size, cache hits."""
    rows = [("image", "link", "mode", "device reads", "read wait s", "available s", "fetches", "mean fetch",
             "cache hit ratio")]
    for link, r in results:
        st = r.details.get("obd_stats") or {}
        if "device_reads" not in st:
            continue
        fetches = st.get("fetch_requests", 0)
        rows.append((r.image, link, r.mode, str(st["device_reads"]), f"{st.get('latency_sum_s', 0):.1f}",
                     f"{r.available_s:.1f}", str(fetches),
                     size(st.get("bytes_fetched", 0) // fetches) if fetches else "-",
                     f"{st.get('cache', {}).get('hit_ratio', 0):.2f}"))
    return format_rows(rows) if len(rows) > 1 else ""
