"""The virtual disk of an accelerated image: its layers opened and stacked bottom first.

Native layers go through ``format.layer.open_layer_blob`` (tar wrapper → ZFile
→ LSMT), TurboOCI layers through ``format.turbooci`` (meta tarball, original
layer's head, warp LSMT over both); the blobs of all layers open concurrently,
so a registry's round trips overlap.  A local layout's blob files are hashed
once across processes (``oci_layout.VerifiedFiles`` in the block cache
directory).  The acceleration (trace) layer holds no disk data and is left out
of the stack; ``ImageDisk`` keeps it (and the blobs
and unwrapped layers) for prefetch, and wraps every layer in a
``prefetch.record.RecordingLayer`` when ``opts.record_trace`` is set.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor, wait
from functools import partial

from ..block.stack import StackedDisk
from ..errors import UnsupportedError, UsageError
from .manifest import UNKNOWN_SIZE, Image
from .oci_layout import OciLayoutStore, VerifiedFiles
from .options import OpenOptions


def _gzip_cache(opts: OpenOptions):
    """The shared decompressed-data cache of gzip originals (spec §4.5), or None when off."""
    if not opts.gzip_cache_enable or not opts.gzip_cache_dir:
        return None
    from ..cache.gzipcache import GzipCache

    cap = {"capacity_gb": opts.gzip_cache_size / (1 << 30)} if opts.gzip_cache_size else {}
    return GzipCache.try_open(os.path.expanduser(opts.gzip_cache_dir), **cap)


#: blob opens in flight while an image opens: each layer's open is a few dependent reads
#: (round trips to a registry), so the layers open together, in about the time of the slowest
OPEN_CONCURRENCY = 8


def _run_all(calls: list):
    """The results of ``calls``, run concurrently (up to ``OPEN_CONCURRENCY``), in order.

    Every call has finished when this returns or raises; the error raised is the one of
    the first failing call in list order, so the same broken image always reports the
    same layer."""
    if len(calls) <= 1:
        return [call() for call in calls]
    with ThreadPoolExecutor(min(OPEN_CONCURRENCY, len(calls)), thread_name_prefix="obd-open") as pool:
        futures = [pool.submit(call) for call in calls]
        wait(futures)
    return [f.result() for f in futures]


def _use_verified_record(store, opts: OpenOptions) -> None:
    """Let a local layout skip hashing blob files verified by earlier processes
    (the record lives in the block cache directory, ``cache.dir``)."""
    if isinstance(store, OciLayoutStore) and store.verified is None and opts.cache_dir:
        store.verified = VerifiedFiles.in_dir(os.path.expanduser(opts.cache_dir))


#: ``open_layers(gzip_cache=...)`` default: open the pool ``opts`` describes
_FROM_OPTIONS = object()


def open_layers(image: Image, opts: OpenOptions, blobs: list | None = None, *, gzip_cache=_FROM_OPTIONS) -> list:
    """Each data layer of ``image`` as a layer byte source, bottom first.

    The layers' blobs are opened concurrently (``_run_all``): a native layer is
    one task (blob, tar wrapper, ZFile, LSMT index), a TurboOCI layer two (the
    meta tarball; the original layer's size and head), joined here.
    ``blobs`` receives every blob source opened (layer, meta and original blobs);
    ``gzip_cache``: the pool TurboOCI layers read through (None: none; default: per ``opts``)."""
    if image.mode == "oci":
        raise UsageError(f"{image.reference}: image is not accelerated (run obd convert)")
    data_layers = [la for la in image.layers if la.kind != "acceleration"]
    for layer in data_layers:
        if layer.kind not in ("overlaybd", "fastoci"):
            raise UnsupportedError(f"{image.reference}: layer {layer.descriptor.digest} ({layer.kind}) "
                                   f"cannot be part of an accelerated disk")
    from ..format.layer import open_layer_blob

    turbo = None
    if any(la.kind == "fastoci" for la in data_layers):
        try:
            from ..format import turbooci as turbo
        except ImportError:
            raise UnsupportedError("TurboOCI (FastOCI) images are not supported by this build") from None
    if gzip_cache is _FROM_OPTIONS:
        gzip_cache = _gzip_cache(opts) if image.mode == "fastoci" else None
    store = image.store
    _use_verified_record(store, opts)
    # one task per blob: (what to do with it, layer); the blob each task opened, by task, so
    # that ``blobs`` keeps the bottom-first order whatever order the tasks finish in
    tasks = [(step, la) for la in data_layers
             for step in (("native",) if la.kind == "overlaybd" else ("meta", "target"))]
    opened: list = [None] * len(tasks)

    def run(slot: int):
        step, layer = tasks[slot]
        if step == "target":
            size = None if layer.target.size == UNKNOWN_SIZE else layer.target.size
            src = opened[slot] = store.open_blob(layer.target.digest, size)
            turbo.check_target_kind(src, layer.target_is_gzip)
            return src
        src = opened[slot] = store.open_blob(layer.descriptor.digest, layer.descriptor.size)
        return open_layer_blob(src) if step == "native" else (src.name, turbo.open_meta(src))

    calls = [partial(run, slot) for slot in range(len(tasks))]
    try:
        done = iter(_run_all(calls))
        layers: list = []
        for layer in data_layers:
            if layer.kind == "overlaybd":
                layers.append(next(done))
                continue
            (meta_name, meta), target = next(done), next(done)
            layers.append(turbo.turbo_layer(meta, meta_name, target, target_is_gzip=layer.target_is_gzip,
                                            gzip_cache=gzip_cache, cache_key=layer.target.digest))
    except BaseException:
        for src in opened:
            if src is not None:
                src.close()
        raise
    if blobs is not None:
        blobs.extend(opened)
    return layers


def open_disk(image: Image, opts: OpenOptions):
    """The merged virtual disk (an ``ImageDisk`` byte source) of an overlaybd or TurboOCI image."""
    blobs: list = []
    gzip_cache = _gzip_cache(opts) if image.mode == "fastoci" else None
    layers = open_layers(image, opts, blobs, gzip_cache=gzip_cache)
    return ImageDisk(image, layers, blobs, opts, gzip_cache=gzip_cache)


class ImageDisk(StackedDisk):
    """The merged stack of an image, plus what prefetch needs (see ``prefetch.session``).

    ``data_layers``: the layers bottom first, never wrapped (replay reads them
    without recording itself); ``blobs``: every blob source of the stack (the
    background download walks them); ``acceleration``: the image's §7.2 trace
    layer, or None; ``recorder``: the ``TraceRecorder`` of ``opts.record_trace``
    (inert until started), or None; ``gzip_cache``: the ``cache.gzipcache.GzipCache``
    the TurboOCI layers read through (its ``stats()`` are ``obd stats``' ``gzip_cache``),
    or None.
    """

    def __init__(self, image: Image, layers: list, blobs: list, opts: OpenOptions, *, gzip_cache=None):
        self.image = image
        self.data_layers = layers
        self.blobs = blobs
        self.acceleration = next((la for la in image.layers if la.kind == "acceleration"), None)
        self.recorder = None
        self.gzip_cache = gzip_cache
        if opts.record_trace:
            from ..prefetch.record import RecordingLayer, TraceRecorder

            self.recorder = TraceRecorder(opts.record_trace)
            layers = [RecordingLayer(layer, i, self.recorder) for i, layer in enumerate(layers)]
        super().__init__(layers)
