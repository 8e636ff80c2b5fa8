"""Options that decide how an image is reached: platform, registry access, cache."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class OpenOptions:
    #: "os/arch[/variant]"; None = the host platform
    platform: str | None = None
    #: suppress progress bars
    quiet: bool = False
    # registry access
    username: str | None = None
    password: str | None = None
    authfile: str | None = None
    tls_ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    skip_verify: bool = False
    plain_http: bool = False
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 3
    # the on-disk block cache shared by all mounts
    cache_dir: str | None = None
    cache_size: int | None = None
    cache_block_size: int = 262144
    #: containerd-style certs.d directory (``<dir>/<host>/ca.crt``, ``client.cert``, ``client.key``)
    hosts_dir: str | None = None
    # decompressed-data cache of gzip layers (FastOCI), like overlaybd's gzipCacheConfig
    gzip_cache_enable: bool = True
    gzip_cache_dir: str | None = None
    gzip_cache_size: int | None = None
    # seconds a device read may wait for the registry before failing with EIO
    io_timeout: float = 120.0
    #: set by TCMU handlers: blob range reads keep retrying (with backoff) until
    #: ``io_timeout`` has passed instead of giving up after ``retries`` attempts, so a
    #: registry outage shows as slow I/O first and as EIO only after that bound
    device_reads: bool = False
    # look for an accelerated (overlaybd / FastOCI) counterpart of a plain OCI image
    discover_accelerated: bool = True
    # prefetch (obd mount flags, kept in the mount's state for every handler it starts)
    #: absolute path of the trace to record (spec §7.1); the handler records while FILE.spool exists
    record_trace: str | None = None
    #: absolute path of a trace or prefetch list to replay once the handler serves
    prefetch_file: str | None = None
    #: ``prefetch_file`` is a prefetch list even if it starts with the trace magic
    prefetch_list: bool = False
    #: download every blob in the background; None = the ``prefetch.background`` setting
    background_download: bool | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "OpenOptions":
        """Defaults taken from a resolved ``config.Config``; ``overrides`` win when not None."""
        gib = 1 << 30
        base = dict(
            connect_timeout=cfg["registry.connectTimeout"],
            read_timeout=cfg["registry.readTimeout"],
            retries=cfg["registry.retries"],
            authfile=cfg["registry.authfile"] or None,
            cache_dir=cfg["cache.dir"],
            cache_size=int(cfg["cache.sizeGB"] * gib),
            cache_block_size=cfg["cache.blockSize"],
            hosts_dir=cfg["registry.hostsDir"] or None,
            gzip_cache_enable=cfg["gzipCache.enable"],
            gzip_cache_dir=cfg["gzipCache.cacheDir"],
            gzip_cache_size=int(cfg["gzipCache.cacheSizeGB"] * gib),
            io_timeout=cfg["io.timeout"],
        )
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)
