"""The virtual disk of an accelerated image: its layers opened and stacked bottom first.

Native layers go through ``format.layer.open_layer_blob`` (tar wrapper → ZFile
→ LSMT), TurboOCI layers through ``format.turbooci.open_turbo_layer`` over the
meta blob and the original layer.  The acceleration (trace) layer holds no
disk data and is left out of the stack; ``ImageDisk`` keeps it (and the blobs
and unwrapped layers) for prefetch, and wraps every layer in a
``prefetch.record.RecordingLayer`` when ``opts.record_trace`` is set.
"""

from __future__ import annotations

import os

from ..block.stack import StackedDisk
from ..errors import UnsupportedError, UsageError
from .manifest import UNKNOWN_SIZE, Image, Layer
from .options import OpenOptions


def _gzip_cache(opts: OpenOptions):
    """The shared decompressed-data cache of gzip originals (spec §4.5), or None when off."""
    if not opts.gzip_cache_enable or not opts.gzip_cache_dir:
        return None
    from ..cache.gzipcache import GzipCache

    cap = {"capacity_gb": opts.gzip_cache_size / (1 << 30)} if opts.gzip_cache_size else {}
    return GzipCache.try_open(os.path.expanduser(opts.gzip_cache_dir), **cap)


def _open_turbo(image: Image, layer: Layer, gzip_cache, opened: list):
    try:
        from ..format.turbooci import open_turbo_layer
    except ImportError:
        raise UnsupportedError("TurboOCI (FastOCI) images are not supported by this build") from None
    meta = image.store.open_blob(layer.descriptor.digest, layer.descriptor.size)
    opened.append(meta)
    target = layer.target
    size = None if target.size == UNKNOWN_SIZE else target.size
    original = image.store.open_blob(target.digest, size)
    opened.append(original)
    return open_turbo_layer(meta, original, target_is_gzip=layer.target_is_gzip, gzip_cache=gzip_cache,
                            cache_key=target.digest)


#: ``open_layers(gzip_cache=...)`` default: open the pool ``opts`` describes
_FROM_OPTIONS = object()


def open_layers(image: Image, opts: OpenOptions, blobs: list | None = None, *, gzip_cache=_FROM_OPTIONS) -> list:
    """Each data layer of ``image`` as a layer byte source, bottom first.

    ``blobs`` receives every blob source opened (layer, meta and original blobs);
    ``gzip_cache``: the pool TurboOCI layers read through (None: none; default: per ``opts``)."""
    if image.mode == "oci":
        raise UsageError(f"{image.reference}: image is not accelerated (run obd convert)")
    from ..format.layer import open_layer_blob

    if gzip_cache is _FROM_OPTIONS:
        gzip_cache = _gzip_cache(opts) if image.mode == "fastoci" else None
    layers: list = []
    opened: list = []
    try:
        for layer in image.layers:
            if layer.kind == "acceleration":
                continue
            if layer.kind == "overlaybd":
                blob = image.store.open_blob(layer.descriptor.digest, layer.descriptor.size)
                opened.append(blob)
                layers.append(open_layer_blob(blob))
            elif layer.kind == "fastoci":
                layers.append(_open_turbo(image, layer, gzip_cache, opened))
            else:
                raise UnsupportedError(f"{image.reference}: layer {layer.descriptor.digest} ({layer.kind}) "
                                       f"cannot be part of an accelerated disk")
    except BaseException:
        for src in opened:
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
