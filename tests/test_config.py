"""Configuration: file < environment < flags, and every bad value names its key."""

import json

import pytest

from tcmu_overlaybd import config
from tcmu_overlaybd.errors import UsageError

# a valid non-default value and an invalid one for every key
SAMPLES = {
    "cache.dir": ("/srv/cache", 5),
    "cache.sizeGB": (10, -1),
    "cache.blockSize": (65536, 5000),
    "gzipCache.enable": (False, "yes please"),
    "gzipCache.cacheDir": ("/srv/gz", ["x"]),
    "gzipCache.cacheSizeGB": (0.5, 0),
    "registry.connectTimeout": (3, 0),
    "registry.readTimeout": (60, -5),
    "registry.retries": (0, -1),
    "registry.authfile": ("/root/auth.json", 1),
    "registry.hostsDir": ("/etc/obd/certs.d", True),
    "io.timeout": (30, 0),
    "io.threads": (16, 0),
    "io.parallelFetches": (8, 0),
    "io.readAheadKb": (1024, -1),
    "io.slowMs": (250, -1),
    "prefetch.concurrency": (32, 0),
    "prefetch.mergeGapKb": (1024, -1),
    "prefetch.background": (True, "sometimes"),
    "prefetch.backgroundDelay": (0, -3),
    "prefetch.backgroundRateMBps": (5, 0),
    "metrics.listen": ("127.0.0.1:9464", "nine"),
    "log.level": ("debug", "loud"),
    "log.file": ("/var/log/obd.log", 5),
    "state.dir": ("/run/obd2", None),
    "state.upperDir": ("/var/lib/x", 3.5),
    "state.persistDir": ("/srv/obd/mounts", 7),
}


def test_samples_cover_every_key():
    assert set(SAMPLES) == {k.name for k in config.KEYS}


def _write(tmp_path, name, value):
    doc: dict = {}
    node = doc
    parts = name.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    p = tmp_path / "config.json"
    p.write_text(json.dumps(doc))
    return str(p)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_valid_value_from_file(tmp_path, name):
    good, _ = SAMPLES[name]
    cfg = config.load(_write(tmp_path, name, good), environ={})
    assert cfg[name] == good
    assert cfg.origins[name] == "file"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_invalid_value_from_file_names_the_key(tmp_path, name):
    _, bad = SAMPLES[name]
    with pytest.raises(UsageError) as e:
        config.load(_write(tmp_path, name, bad), environ={})
    assert name in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key", config.KEYS, ids=lambda k: k.name)
def test_environment_overrides_file(tmp_path, key):
    good, _ = SAMPLES[key.name]
    path = _write(tmp_path, key.name, good)
    assert good != key.default
    # the environment carries text; the file holds the sample, the env the default
    expected = key.default
    env_value = str(expected).lower() if isinstance(expected, bool) else str(expected)
    cfg = config.load(path, environ={key.env: env_value})
    assert cfg[key.name] == expected
    assert cfg.origins[key.name] == "env"


def test_flags_override_environment():
    cfg = config.Config({k.name: k.default for k in config.KEYS}, {})
    cfg = cfg.with_overrides({"registry.retries": "5", "cache.dir": None})
    assert cfg["registry.retries"] == 5
    assert cfg["cache.dir"] == "/var/cache/obd/blocks"


def test_bad_environment_value_names_variable():
    with pytest.raises(UsageError, match=r"\$OBD_REGISTRY_RETRIES: registry.retries"):
        config.load(environ={"OBD_REGISTRY_RETRIES": "many"})


def test_unknown_key_and_bad_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"cache": {"sizeGb": 3}}')
    with pytest.raises(UsageError, match="unknown configuration key 'cache.sizeGb'"):
        config.load(str(p), environ={})
    p.write_text('{"cache": ')
    with pytest.raises(UsageError, match="invalid JSON at line 1"):
        config.load(str(p), environ={})


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        config.load(environ={"OBD_CONFIG": str(tmp_path / "nope.json")})


def test_missing_default_file_gives_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.json"))
    cfg = config.load(environ={})
    assert cfg["registry.retries"] == 3
    assert set(cfg.origins.values()) == {"default"}


def test_readme_documents_every_key():
    import pathlib
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    for k in config.KEYS:
        assert f"`{k.name}`" in readme and f"`{k.env}`" in readme


def test_open_options_take_config_defaults_and_flags_win():
    from tcmu_overlaybd.image.options import OpenOptions

    cfg = config.load(environ={"OBD_CONFIG": "", "OBD_REGISTRY_RETRIES": "9", "OBD_CACHE_SIZE_GB": "0.5",
                               "OBD_CACHE_DIR": "/env/cache"})
    opts = OpenOptions.from_config(cfg, cache_dir="/flag/cache", platform=None)
    assert opts.retries == 9
    assert opts.cache_size == 512 << 20
    assert opts.cache_dir == "/flag/cache"
