"""``obd convert``: build overlaybd and/or FastOCI images from an OCI image and publish them.

The source is fetched once (a registry image is mirrored into the work
directory; an ``oci:`` layout is read in place), each requested format is
converted into its own work layout, and only when every conversion succeeded
are the results published (blobs, then manifests, tags last).  The work
directory is removed in every case.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from dataclasses import replace

import click

from ..convert.image import FORMAT_FASTOCI, FORMAT_OVERLAYBD, ConvertOptions, convert_all_platforms, convert_image
from ..convert.mkfs import GIB
from ..convert.publish import Published, mirror_source, publish
from ..errors import StateError, UsageError
from ..image.manifest import load_manifest
from ..image.oci_layout import OciLayoutStore
from ..image.options import OpenOptions
from ..image.reference import parse_reference
from ..image.resolve import open_store
from ..progress import progress_bar
from .options import image_options

#: ZFile block sizes upstream's overlaybd-commit accepts (``--bs``)
BLOCK_SIZES = {f"{n}K": n << 10 for n in (4, 8, 16, 32, 64)}
SOURCE_TAG = "source"
DEFAULT_WORK_PARENT = "/var/tmp"
#: local file-system failures a user can fix (space, quota, permissions): one line, not a traceback
LOCAL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.EPERM)

log = logging.getLogger(__name__)


def _block_size(text: str) -> int:
    key = text.strip().upper().removesuffix("B").removesuffix("I")
    if key.isdigit() and int(key) in BLOCK_SIZES.values():
        return int(key)
    if key in BLOCK_SIZES:
        return BLOCK_SIZES[key]
    raise UsageError(f"--bs {text}: block size must be one of {', '.join(BLOCK_SIZES)}")


class LayerBars:
    """``ConvertOptions.progress``: one bar per source layer, closed when the next layer starts."""

    def __init__(self, fmt: str, quiet: bool):
        self.fmt = fmt
        self.quiet = quiet
        self._stack = contextlib.ExitStack()
        self._layer = -1
        self._bar = None

    def __call__(self, layer: int, done: int, total: int) -> None:
        if layer != self._layer or done < self._bar.n:  # the next layer (or platform, with --all-platforms)
            self._stack.close()
            self._layer = layer
            self._bar = self._stack.enter_context(progress_bar(total, f"{self.fmt} layer {layer + 1}", self.quiet))
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        self._stack.close()


def _work_root(workdir: str | None) -> str:
    parent = workdir or (DEFAULT_WORK_PARENT if os.path.isdir(DEFAULT_WORK_PARENT) else None)
    try:
        if parent:
            os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix="obd-convert-", dir=parent)
    except OSError as e:
        raise UsageError(f"--workdir {parent or tempfile.gettempdir()}: {e.strerror}") from None


def _warn_foreign_referrer(src: str, targets: dict[str, str]) -> None:
    """A referrer is found only through its own repository: say so when DST is elsewhere."""
    src_ref = parse_reference(src)
    for fmt, dst in targets.items():
        ref = parse_reference(dst)
        if (ref.transport, ref.registry, ref.repository, ref.path) != (
                src_ref.transport, src_ref.registry, src_ref.repository, src_ref.path):
            log.warning("--%s %s: not in the repository of %s, so %s will not find it as a referrer",
                        fmt, dst, src, src)


def _check_destinations(targets: dict[str, str]) -> None:
    if not targets:
        raise UsageError("nothing to do: give --overlaybd DST and/or --fastoci DST")
    refs = {fmt: parse_reference(dst) for fmt, dst in targets.items()}
    for fmt, ref in refs.items():
        if ref.digest:
            raise UsageError(f"--{fmt} {targets[fmt]}: a destination names a tag, not a digest")
    if len(refs) == 2 and str(refs[FORMAT_OVERLAYBD]) == str(refs[FORMAT_FASTOCI]):
        raise UsageError(f"--overlaybd and --fastoci both name {refs[FORMAT_OVERLAYBD]}; give each its own tag")


def run_convert(src: str, targets: dict[str, str], copts: ConvertOptions, opts: OpenOptions, all_platforms: bool,
                workdir: str | None) -> dict[str, Published]:
    """Convert ``src`` into every format of ``targets`` ({format: destination}) and publish them."""
    _check_destinations(targets)
    source_opts = replace(opts, discover_accelerated=False)  # convert the image named, not its accelerated twin
    src_ref = parse_reference(src)
    root = _work_root(workdir)
    store = None
    try:
        store = open_store(src_ref, source_opts)
        desc = store.resolve(src_ref)
        if not all_platforms:
            image = load_manifest(store, src_ref, desc, opts.platform)
            desc = image.manifest_descriptor  # with --referrer the subject: found from the index too
        if src_ref.transport != "oci":  # fetch once for both formats
            local = os.path.join(root, "source")
            mirror_source(store, desc, local, SOURCE_TAG)
            store.close()
            store = OciLayoutStore(local)
            src_ref = parse_reference(f"oci:{local}:{SOURCE_TAG}")
        converted = {}
        for fmt in targets:
            layout, work = os.path.join(root, f"out-{fmt}"), os.path.join(root, f"work-{fmt}")
            bars = LayerBars(fmt, opts.quiet)
            one = replace(copts, fmt=fmt, tag=fmt, progress=bars)
            try:
                if all_platforms:
                    converted[fmt] = (layout, convert_all_platforms(store, src_ref, layout, work, one))
                else:
                    image = load_manifest(store, src_ref, desc, opts.platform)
                    converted[fmt] = (layout, convert_image(image, layout, work, one).manifest_descriptor)
            finally:
                bars.close()
        return {fmt: publish(layout, result, targets[fmt], opts) for fmt, (layout, result) in converted.items()}
    except OSError as e:
        if e.errno not in LOCAL_ERRNOS:
            raise
        raise StateError(f"{e.filename or root}: {e.strerror}") from None
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(root, ignore_errors=True)


@click.command("convert")
@click.argument("src")
@click.option("--overlaybd", "overlaybd_dst", metavar="DST",
              help="Build a native overlaybd image and publish it to DST (registry ref or oci:DIR[:TAG]).")
@click.option("--fastoci", "fastoci_dst", metavar="DST",
              help="Build a FastOCI (index-only) image and publish it to DST.")
@click.option("--referrer", is_flag=True,
              help="Link each result to the source manifest (subject), so the source reference finds it.")
@click.option("--all-platforms", is_flag=True, help="Convert every platform of a multi-platform source.")
@click.option("--algorithm", type=click.Choice(["lz4", "zstd"]), default="lz4", show_default=True,
              help="ZFile compression of overlaybd layers.")
@click.option("--bs", "block_size", default="4K", show_default=True, metavar="4K..64K",
              help="ZFile block size of overlaybd layers.")
@click.option("--vsize", type=click.IntRange(1, 256 * 1024), default=64, show_default=True, metavar="GiB",
              help="Virtual size of the image's filesystem.")
@click.option("--oci/--docker", default=True, show_default=True,
              help="OCI or Docker v2 media types for the results (--referrer implies --oci).")
@click.option("--workdir", default=None, type=click.Path(file_okay=False),
              help="Where temporary files go (a fresh subdirectory, removed afterwards; "
                   f"default {DEFAULT_WORK_PARENT}).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@image_options
def convert(src, overlaybd_dst, fastoci_dst, referrer, all_platforms, algorithm, block_size, vsize, oci, workdir,
            as_json, opts: OpenOptions):
    """Convert the OCI image SRC to overlaybd (--overlaybd) and/or FastOCI (--fastoci).

    SRC and DST are registry references or oci:DIR[:TAG] layouts; registry options apply to both.
    """
    if all_platforms and opts.platform:
        raise UsageError("--platform and --all-platforms exclude each other")
    targets = {fmt: dst for fmt, dst in ((FORMAT_OVERLAYBD, overlaybd_dst), (FORMAT_FASTOCI, fastoci_dst)) if dst}
    copts = ConvertOptions(vsize=vsize * GIB, algorithm=algorithm, block_size=_block_size(block_size), oci=oci,
                           referrer=referrer)
    if referrer:
        _warn_foreign_referrer(src, targets)
    results = run_convert(src, targets, copts, opts, all_platforms, workdir)
    if as_json:
        click.echo(json.dumps({fmt: p.to_json() for fmt, p in results.items()}, indent=2))
        return
    for fmt, p in results.items():
        click.echo(f"{fmt}: {p.reference}@{p.digest}")


def register(group) -> None:
    """Attach ``obd convert`` to the ``obd`` group."""
    group.add_command(convert)
