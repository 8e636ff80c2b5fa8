"""Finding accelerated images: referrers API, the sha256-<hex> tag fallback, explicit tags."""

from __future__ import annotations

import json

import pytest

from tcmu_overlaybd.image.discovery import ARTIFACT_NATIVE, ARTIFACT_TURBO, find_accelerated
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.reference import parse_reference
from tcmu_overlaybd.image.registry import RegistryClient, RegistryStore

from .helpers.registry import (  # noqa: F401 - fixtures
    OCI_MANIFEST,
    needs_registry,
    plain_registry,
    proxied_registry,
    push_image,
)

pytestmark = [needs_registry, pytest.mark.registry]


def options(tmp_path, **kw):
    return OpenOptions(plain_http=True, cache_dir=str(tmp_path / "cache"), cache_size=1 << 30, retries=1,
                       quiet=True, extra={"backoff_base": 0.01}, **kw)


def _base_and_converted(client, kinds=(ARTIFACT_NATIVE,)):
    """Push a plain image ``app:v1`` and one converted image per kind; returns (base desc, {kind: digest})."""
    base_digest, base = push_image(client, "app", "v1", [b"plain layer"])
    subject = {"mediaType": OCI_MANIFEST, "digest": base_digest, "size": len(json.dumps(base).encode())}
    converted = {}
    for i, kind in enumerate(kinds):
        digest, _ = push_image(client, "app", f"v1_conv{i}", [f"converted {i}".encode()], artifact_type=kind,
                               subject=subject)
        converted[kind] = digest
    return subject, converted


def test_tag_schema_fallback_when_the_registry_has_no_referrers_api(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    opts = options(tmp_path)
    subject, converted = _base_and_converted(RegistryClient(registry.host, opts), (ARTIFACT_TURBO,))
    store = RegistryStore(parse_reference(f"{proxy.host}/app:v1"), opts)
    desc = store.resolve(store.ref)
    assert desc.digest == subject["digest"]
    proxy.reset_counters()
    found = find_accelerated(store, store.ref, desc, opts)
    assert found is not None
    assert found.digest == converted[ARTIFACT_TURBO] and found.artifact_type == ARTIFACT_TURBO
    paths = [(m, p.split("?")[0], s) for m, p, _r, s in proxy.log.requests]
    assert paths[0] == ("GET", f"/v2/app/referrers/{desc.digest}", 404)
    tag = desc.digest.replace(":", "-")
    assert ("HEAD", f"/v2/app/manifests/{tag}", 200) in paths


@pytest.mark.parametrize("status", [405, 501])
def test_other_refusals_of_the_referrers_api_also_fall_back(proxied_registry, tmp_path, status):
    registry, proxy = proxied_registry
    opts = options(tmp_path)
    subject, converted = _base_and_converted(RegistryClient(registry.host, opts))
    proxy.add_fault(f"status:{status}", "/referrers/", "GET")
    store = RegistryStore(parse_reference(f"{proxy.host}/app:v1"), opts)
    found = find_accelerated(store, store.ref, store.resolve(store.ref), opts)
    assert found.digest == converted[ARTIFACT_NATIVE]


def test_referrers_api_is_used_when_present_and_native_wins(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    opts = options(tmp_path)
    subject, converted = _base_and_converted(RegistryClient(registry.host, opts), (ARTIFACT_TURBO, ARTIFACT_NATIVE))
    proxy.referrers = {subject["digest"]: [
        {"mediaType": OCI_MANIFEST, "digest": converted[ARTIFACT_TURBO], "size": 1, "artifactType": ARTIFACT_TURBO},
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "5" * 64, "size": 1,
         "artifactType": "application/vnd.example.sbom"},
        {"mediaType": OCI_MANIFEST, "digest": converted[ARTIFACT_NATIVE], "size": 1, "artifactType": ARTIFACT_NATIVE},
    ]}
    store = RegistryStore(parse_reference(f"{proxy.host}/app:v1"), opts)
    desc = store.resolve(store.ref)
    proxy.reset_counters()
    found = find_accelerated(store, store.ref, desc, opts)
    assert found.digest == converted[ARTIFACT_NATIVE]
    assert [p.split("?")[0] for _m, p, _r, _s in proxy.log.requests] == [f"/v2/app/referrers/{desc.digest}"]
    sboms = store.referrers(desc.digest, "application/vnd.example.sbom")
    assert [d.digest for d in sboms] == ["sha256:" + "5" * 64]


def test_newest_of_one_kind_wins(proxied_registry, tmp_path):
    registry, proxy = proxied_registry
    opts = options(tmp_path)
    _subject, _ = _base_and_converted(RegistryClient(registry.host, opts), ())
    sub = "sha256:" + "1" * 64
    proxy.referrers = {sub: [
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "a" * 64, "size": 1, "artifactType": ARTIFACT_NATIVE,
         "annotations": {"org.opencontainers.image.created": "2025-05-01T00:00:00Z"}},
        {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "b" * 64, "size": 1, "artifactType": ARTIFACT_NATIVE,
         "annotations": {"org.opencontainers.image.created": "2024-01-01T00:00:00Z"}},
    ]}
    store = RegistryStore(parse_reference(f"{proxy.host}/app:v1"), opts)
    from tcmu_overlaybd.image.store import Descriptor

    found = find_accelerated(store, store.ref, Descriptor(OCI_MANIFEST, sub, 1), opts)
    assert found.digest == "sha256:" + "a" * 64


def test_nothing_found_or_discovery_off(plain_registry, tmp_path):
    opts = options(tmp_path)
    client = RegistryClient(plain_registry.host, opts)
    push_image(client, "lonely", "v1", [b"x"])
    subject, converted = _base_and_converted(client)
    lonely = RegistryStore(parse_reference(f"{plain_registry.host}/lonely:v1"), opts)
    assert find_accelerated(lonely, lonely.ref, lonely.resolve(lonely.ref), opts) is None
    store = RegistryStore(parse_reference(f"{plain_registry.host}/app:v1"), opts)
    off = options(tmp_path, discover_accelerated=False)
    assert find_accelerated(store, store.ref, store.resolve(store.ref), off) is None
    assert find_accelerated(store, store.ref, store.resolve(store.ref), opts).digest == converted[ARTIFACT_NATIVE]


def test_explicit_accelerated_tags_resolve_directly(plain_registry, tmp_path):
    opts = options(tmp_path)
    client = RegistryClient(plain_registry.host, opts)
    _subject, converted = _base_and_converted(client)
    from tcmu_overlaybd.image.push import tag_manifest

    for suffix in ("_accelerated", "_containerd_accelerated"):
        tag_manifest(client, "app", converted[ARTIFACT_NATIVE], "v1" + suffix)
        ref = parse_reference(f"{plain_registry.host}/app:v1{suffix}")
        desc = RegistryStore(ref, opts).resolve(ref)
        assert desc.digest == converted[ARTIFACT_NATIVE]
