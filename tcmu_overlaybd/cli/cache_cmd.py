"""``obd cache ls|prune|clear``: look at and shrink the shared caches.

Two caches live on disk: the block cache of registry blobs (``cache.dir``) and
the decompressed-data cache of gzip layers read by FastOCI images
(``gzipCache.cacheDir``).  Every subcommand covers both.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import click

from .. import config
from ..cache.blockcache import BlockCache
from ..cache.gzipcache import GzipCache
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


def _open_caches(cache_dir: str | None, gzip_cache_dir: str | None) -> tuple[BlockCache, GzipCache | None]:
    """The block cache, and the gzip cache or None when it does not exist yet (nothing to
    list or free); one configuration read for both."""
    cfg = config.load()
    blocks = BlockCache(cache_dir or cfg["cache.dir"], int(cfg["cache.sizeGB"] * (1 << 30)), cfg["cache.blockSize"])
    path = gzip_cache_dir or cfg["gzipCache.cacheDir"]
    gz = GzipCache(path, capacity_gb=cfg["gzipCache.cacheSizeGB"]) if os.path.isdir(path) else None
    return blocks, gz


_dir_option = click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                           help="Block cache directory (default: cache.dir from the configuration).")
_gzip_dir_option = click.option("--gzip-cache-dir", default=None, type=click.Path(file_okay=False),
                                help="Gzip cache directory (default: gzipCache.cacheDir).")


@click.group("cache")
def cache_group() -> None:
    """The on-disk block cache shared by all mounts."""


@cache_group.command("ls")
@_dir_option
@_gzip_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_ls(cache_dir: str | None, gzip_cache_dir: str | None, as_json: bool) -> None:
    """List cached blobs (blocks, bytes, last use) and cached gzip layers."""
    cache, gz = _open_caches(cache_dir, gzip_cache_dir)
    blobs: dict[str, dict] = defaultdict(lambda: {"blocks": 0, "bytes": 0, "last_used": 0.0})
    for e in cache.scan():
        b = blobs[e.digest]
        b["blocks"] += 1
        b["bytes"] += e.size
        b["last_used"] = max(b["last_used"], e.mtime)
    rows = sorted(({"digest": d, **v} for d, v in blobs.items()), key=lambda r: r["last_used"], reverse=True)
    total = sum(r["bytes"] for r in rows)
    gz_rows = [] if gz is None else sorted(
        ({"digest": name, "bytes": used, "last_used": when} for name, used, when in gz.files()),
        key=lambda r: r["last_used"], reverse=True)
    if as_json:
        doc = {"dir": cache.dir, "capacity": cache.capacity, "block_size": cache.block_size,
               "usage": total, "blobs": rows}
        if gz is not None:
            doc["gzip"] = {"dir": gz.dir, "capacity": gz.capacity, "usage": sum(r["bytes"] for r in gz_rows),
                           "layers": gz_rows}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"{cache.dir}: {_human(total)} of {_human(cache.capacity)} in {len(rows)} blobs")
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_used"]))
        click.echo(f"{r['digest']}  {r['blocks']:>6} blocks  {_human(r['bytes']):>10}  {when}")
    if gz is not None:
        used = sum(r["bytes"] for r in gz_rows)
        click.echo(f"{gz.dir}: {_human(used)} of {_human(gz.capacity)} in {len(gz_rows)} gzip layers")
        for r in gz_rows:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_used"]))
            click.echo(f"{r['digest']}  {'':>13}  {_human(r['bytes']):>10}  {when}")


@cache_group.command("prune")
@_dir_option
@_gzip_dir_option
@click.option("--max-size", default=None, metavar="SIZE",
              help="Shrink each cache to at most SIZE (e.g. 500M, 2G); default: its configured cap.")
def cache_prune(cache_dir: str | None, gzip_cache_dir: str | None, max_size: str | None) -> None:
    """Evict least recently used blocks (and gzip layers) down to a size."""
    limit = _size_arg(max_size)
    cache, gz = _open_caches(cache_dir, gzip_cache_dir)
    freed = cache.prune(limit)
    click.echo(f"freed {_human(freed)}; {_human(cache.usage())} left in {cache.dir}")
    if gz is not None:
        freed = gz.prune(limit)
        click.echo(f"freed {_human(freed)}; {_human(gz.usage())} left in {gz.dir}")


@cache_group.command("clear")
@_dir_option
@_gzip_dir_option
@click.argument("digest", required=False)
def cache_clear(cache_dir: str | None, gzip_cache_dir: str | None, digest: str | None) -> None:
    """Remove every cached block and gzip layer, or only those of DIGEST.

    Without DIGEST the record of local-layout blob files already verified goes too
    (their next open hashes them again)."""
    if digest:
        validate_digest(digest)
    cache, gz = _open_caches(cache_dir, gzip_cache_dir)
    freed = cache.clear(digest)
    if not digest:
        from ..image.oci_layout import VERIFIED_RECORD

        try:
            os.unlink(os.path.join(cache.dir, VERIFIED_RECORD))
        except FileNotFoundError:
            pass
    click.echo(f"freed {_human(freed)} from {cache.dir}")
    if gz is not None:
        freed = gz.clear(digest)
        click.echo(f"freed {_human(freed)} from {gz.dir}")


def register(group) -> None:
    """Attach ``obd cache`` to the ``obd`` group."""
    group.add_command(cache_group)
