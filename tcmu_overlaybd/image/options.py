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
    # look for an accelerated (overlaybd / FastOCI) counterpart of a plain OCI image
    discover_accelerated: bool = True
    extra: dict = field(default_factory=dict)
