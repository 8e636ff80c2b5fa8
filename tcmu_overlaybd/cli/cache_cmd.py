"""``obd cache ls|prune|clear``: look at and shrink the shared block cache."""

from __future__ import annotations

import json
import time
from collections import defaultdict

import click

from .. import config
from ..cache.blockcache import BlockCache
from ..errors import UsageError
from ..image.reference import validate_digest


def _size_arg(text: str | None) -> int | None:
    """``500M``, ``2G``, ``1048576`` -> bytes (binary units)."""
    if text is None:
        return None
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    num, unit = (t[:-1], t[-1]) if t and t[-1] in units else (t, "")
    try:
        value = float(num) * units[unit]
    except ValueError:
        raise UsageError(f"invalid size {text!r} (examples: 500M, 2G, 1048576)") from None
    if value < 0:
        raise UsageError(f"invalid size {text!r}: negative")
    return int(value)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _open(cache_dir: str | None) -> BlockCache:
    cfg = config.load()
    return BlockCache(cache_dir or cfg["cache.dir"], int(cfg["cache.sizeGB"] * (1 << 30)), cfg["cache.blockSize"])


_dir_option = click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                           help="Block cache directory (default: cache.dir from the configuration).")


@click.group("cache")
def cache_group() -> None:
    """The on-disk block cache shared by all mounts."""


@cache_group.command("ls")
@_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_ls(cache_dir: str | None, as_json: bool) -> None:
    """List cached blobs: blocks, bytes and last use."""
    cache = _open(cache_dir)
    blobs: dict[str, dict] = defaultdict(lambda: {"blocks": 0, "bytes": 0, "last_used": 0.0})
    for e in cache.scan():
        b = blobs[e.digest]
        b["blocks"] += 1
        b["bytes"] += e.size
        b["last_used"] = max(b["last_used"], e.mtime)
    rows = sorted(({"digest": d, **v} for d, v in blobs.items()), key=lambda r: r["last_used"], reverse=True)
    total = sum(r["bytes"] for r in rows)
    if as_json:
        click.echo(json.dumps({"dir": cache.dir, "capacity": cache.capacity, "block_size": cache.block_size,
                               "usage": total, "blobs": rows}, indent=2))
        return
    click.echo(f"{cache.dir}: {_human(total)} of {_human(cache.capacity)} in {len(rows)} blobs")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_used"]))
        click.echo(f"{r['digest']}  {r['blocks']:>6} blocks  {_human(r['bytes']):>10}  {when}")


@cache_group.command("prune")
@_dir_option
@click.option("--max-size", default=None, metavar="SIZE",
              help="Shrink to at most SIZE (e.g. 500M, 2G); default: the configured cap.")
def cache_prune(cache_dir: str | None, max_size: str | None) -> None:
    """Evict least recently used blocks down to a size."""
    cache = _open(cache_dir)
    freed = cache.prune(_size_arg(max_size))
    click.echo(f"freed {_human(freed)}; {_human(cache.usage())} left in {cache.dir}")


@cache_group.command("clear")
@_dir_option
@click.argument("digest", required=False)
def cache_clear(cache_dir: str | None, digest: str | None) -> None:
    """Remove every cached block, or only those of DIGEST."""
    if digest:
        validate_digest(digest)
    cache = _open(cache_dir)
    freed = cache.clear(digest)
    click.echo(f"freed {_human(freed)} from {cache.dir}")


def register(group) -> None:
    """Attach ``obd cache`` to the ``obd`` group."""
    group.add_command(cache_group)
