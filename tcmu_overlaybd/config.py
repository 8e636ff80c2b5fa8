"""obd's configuration: one JSON file, every key overridable by environment and flags.

Precedence, lowest first: built-in default < config file < environment variable
< command-line flag.  The file is ``/etc/obd/config.json`` unless ``$OBD_CONFIG``
names another one; a missing default file is fine, a missing ``$OBD_CONFIG`` file
is an error.  Keys are dotted paths into the JSON object (``cache.sizeGB`` is
``{"cache": {"sizeGB": ...}}``); each key has one environment variable
(``OBD_CACHE_SIZE_GB``).  Unknown keys and values of the wrong type are errors
that name the key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable

from .errors import UsageError

DEFAULT_PATH = "/etc/obd/config.json"


@dataclass(frozen=True)
class Key:
    name: str
    type: type
    default: Any
    env: str
    help: str
    check: Callable[[Any], str | None] | None = None


def _positive(v) -> str | None:
    return None if v > 0 else "must be > 0"


def _non_negative(v) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _log_level(v) -> str | None:
    ok = ("debug", "info", "warning", "error")
    return None if v.lower() in ok else f"must be one of {', '.join(ok)}"


def _host_port(v) -> str | None:
    if v == "":
        return None
    host, sep, port = v.rpartition(":")
    return None if sep and host and port.isdigit() and int(port) < 65536 else "must be HOST:PORT or empty"


def _power_of_two_4k(v) -> str | None:
    return None if v >= 4096 and v & (v - 1) == 0 else "must be a power of two >= 4096"


KEYS: tuple[Key, ...] = (
    Key("cache.dir", str, "/var/cache/obd/blocks", "OBD_CACHE_DIR",
        "block cache directory shared by all mounts"),
    Key("cache.sizeGB", float, 4.0, "OBD_CACHE_SIZE_GB",
        "hard cap of the block cache, GiB", _positive),
    Key("cache.blockSize", int, 262144, "OBD_CACHE_BLOCK_SIZE",
        "cache block (and minimum registry request) size, bytes", _power_of_two_4k),
    Key("gzipCache.enable", bool, True, "OBD_GZIP_CACHE_ENABLE",
        "cache decompressed data of gzip layers (FastOCI), like overlaybd's gzipCacheConfig"),
    Key("gzipCache.cacheDir", str, "/var/cache/obd/gzip", "OBD_GZIP_CACHE_DIR",
        "directory of the decompressed-data cache"),
    Key("gzipCache.cacheSizeGB", float, 4.0, "OBD_GZIP_CACHE_SIZE_GB",
        "cap of the decompressed-data cache, GiB", _positive),
    Key("registry.connectTimeout", float, 10.0, "OBD_REGISTRY_CONNECT_TIMEOUT",
        "seconds to establish a connection", _positive),
    Key("registry.readTimeout", float, 30.0, "OBD_REGISTRY_READ_TIMEOUT",
        "seconds to wait for response bytes", _positive),
    Key("registry.retries", int, 3, "OBD_REGISTRY_RETRIES",
        "retries of a failed request (with exponential backoff)", _non_negative),
    Key("registry.authfile", str, "", "OBD_AUTHFILE",
        "credentials file (docker config.json format); empty = $DOCKER_CONFIG or ~/.docker"),
    Key("registry.hostsDir", str, "/etc/containerd/certs.d", "OBD_HOSTS_DIR",
        "containerd hosts.toml / certs.d directory for mirrors and CAs"),
    Key("io.timeout", float, 120.0, "OBD_IO_TIMEOUT",
        "seconds a read may wait for the registry before the device returns EIO", _positive),
    Key("io.threads", int, 8, "OBD_IO_THREADS",
        "handler worker threads per device", _positive),
    Key("io.parallelFetches", int, 4, "OBD_IO_PARALLEL_FETCHES",
        "range requests in flight per blob for one large cold read", _positive),
    Key("io.readAheadKb", int, 0, "OBD_READ_AHEAD_KB",
        "the device's read_ahead_kb (KiB the kernel reads ahead of a file read); 0 = the kernel's default",
        _non_negative),
    Key("io.slowMs", float, 1000.0, "OBD_IO_SLOW_MS",
        "a device read slower than this, ms, counts as slow in obd stats and logs a warning", _positive),
    Key("prefetch.concurrency", int, 16, "OBD_PREFETCH_CONCURRENCY",
        "range requests in flight while a mount replays a trace or prefetch list", _positive),
    Key("prefetch.mergeGapKb", int, 256, "OBD_PREFETCH_MERGE_GAP_KB",
        "KiB of a blob a trace replay fetches unasked to join two ranges into one request", _non_negative),
    Key("prefetch.background", bool, False, "OBD_PREFETCH_BACKGROUND",
        "download every block of the image in the background after a mount"),
    Key("prefetch.backgroundDelay", float, 10.0, "OBD_PREFETCH_BACKGROUND_DELAY",
        "seconds after the mount before the background download starts", _non_negative),
    Key("prefetch.backgroundRateMBps", float, 20.0, "OBD_PREFETCH_BACKGROUND_RATE",
        "bandwidth cap of the background download, MB/s", _positive),
    Key("metrics.listen", str, "", "OBD_METRICS_LISTEN",
        "Prometheus text endpoint of each handler, HOST:PORT (port 0 = any free port); empty = off",
        _host_port),
    Key("log.level", str, "warning", "OBD_LOG_LEVEL", "debug, info, warning or error", _log_level),
    Key("log.file", str, "", "OBD_LOG_FILE", "handler log file; empty = stderr / journal"),
    Key("state.dir", str, "/run/obd", "OBD_STATE_DIR", "per-mount state files"),
    Key("state.upperDir", str, "/var/lib/obd/upper", "OBD_UPPER_DIR",
        "default parent of overlayfs upper/work directories"),
    Key("state.persistDir", str, "/var/lib/obd/mounts", "OBD_PERSIST_DIR",
        "mount records kept across reboots, from which obd recover re-creates the mounts"),
)

_BY_NAME = {k.name: k for k in KEYS}


def _coerce(key: Key, value: Any, source: str) -> Any:
    """Check/convert one value; ``source`` says where it came from for the error."""
    t = key.type
    if isinstance(value, str) and source != "file":
        text = value.strip()
        try:
            if t is bool:
                low = text.lower()
                if low in ("1", "true", "yes", "on"):
                    value = True
                elif low in ("0", "false", "no", "off"):
                    value = False
                else:
                    raise ValueError
            elif t is int:
                value = int(text, 0)
            elif t is float:
                value = float(text)
        except ValueError:
            raise UsageError(f"{source}: {key.name} must be a {t.__name__}, got {value!r}") from None
    else:
        ok = isinstance(value, t) and not (t is not bool and isinstance(value, bool))
        if t is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise UsageError(
                f"{source}: {key.name} must be a {t.__name__}, got {type(value).__name__} {value!r}"
            )
    if key.check:
        problem = key.check(value)
        if problem:
            raise UsageError(f"{source}: {key.name} {problem} (got {value!r})")
    return value


def _flatten(obj: dict, prefix: str, path: str, out: dict) -> None:
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            _flatten(v, name + ".", path, out)
        elif name not in _BY_NAME:
            raise UsageError(f"{path}: unknown configuration key {name!r}")
        else:
            out[name] = v


class Config:
    """Resolved configuration values, looked up by dotted key name."""

    def __init__(self, values: dict[str, Any], origins: dict[str, str]):
        self._values = values
        self.origins = origins

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def as_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def with_overrides(self, overrides: dict[str, Any]) -> "Config":
        """Apply command-line values (None means "flag not given")."""
        values, origins = dict(self._values), dict(self.origins)
        for name, v in overrides.items():
            if v is None:
                continue
            key = _BY_NAME.get(name)
            if key is None:
                raise UsageError(f"unknown configuration key {name!r}")
            values[name] = _coerce(key, v, "command line")
            origins[name] = "flag"
        return Config(values, origins)


def load(path: str | None = None, environ: dict | None = None) -> Config:
    """Read the file (if any) and the environment into a Config."""
    env = os.environ if environ is None else environ
    explicit = path or env.get("OBD_CONFIG")
    path = explicit or DEFAULT_PATH
    raw: dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        if explicit:
            raise UsageError(f"{path}: configuration file not found") from None
        text = None
    except OSError as e:
        raise UsageError(f"{path}: cannot read configuration: {e.strerror}") from None
    if text is not None:
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        if not isinstance(doc, dict):
            raise UsageError(f"{path}: the configuration must be a JSON object")
        _flatten(doc, "", path, raw)
    values, origins = {}, {}
    for key in KEYS:
        if key.env in env:
            values[key.name] = _coerce(key, env[key.env], f"${key.env}")
            origins[key.name] = "env"
        elif key.name in raw:
            values[key.name] = _coerce(key, raw[key.name], path)
            origins[key.name] = "file"
        else:
            values[key.name] = key.default
            origins[key.name] = "default"
    return Config(values, origins)


def documentation() -> str:
    """A Markdown table of every key (kept in the README)."""
    rows = ["| key | env | default | meaning |", "|---|---|---|---|"]
    for k in KEYS:
        rows.append(f"| `{k.name}` | `{k.env}` | `{json.dumps(k.default)}` | {k.help} |")
    return "\n".join(rows)
