"""``obd stats`` and the Prometheus endpoint of a real mount: hello-world from a registry in the guest."""

from __future__ import annotations

import json
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.registry import RegistryClient

from ..helpers.registry import RegistryServer, needs_registry, push_hello_world
from .conftest import kernel_leftovers, obd

pytestmark = pytest.mark.kernel


@needs_registry
def test_stats_and_metrics_of_a_mount(vectors, tmp_path, monkeypatch):
    monkeypatch.setenv("OBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OBD_GZIP_CACHE_DIR", str(tmp_path / "gzcache"))
    monkeypatch.setenv("OBD_METRICS_LISTEN", "127.0.0.1:0")  # inherited by the handler
    # counters are the handler's: small cache blocks leave the file's data to it (obd mount's own
    # probe of the image caches only the blocks of the headers and indexes it reads)
    monkeypatch.setenv("OBD_CACHE_BLOCK_SIZE", "4096")
    reg = RegistryServer(str(tmp_path / "registry"))
    before = kernel_leftovers()
    try:
        push_hello_world(RegistryClient(reg.host, OpenOptions(plain_http=True)), vectors, "library/hello", "s")
        ref = f"{reg.host}/library/hello:s"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        assert obd("mount", "--plain-http", ref, str(mnt))[0] == 0
        try:
            assert len((mnt / "hello").read_bytes()) > 1000
            rc, out = obd("stats", str(mnt), "--json")
            assert rc == 0
            doc = json.loads(out)
            assert doc["mountpoint"] == str(mnt) and doc["image"] == ref and doc["restarts"] == 0
            assert doc["device_reads"] > 0 and doc["device_bytes_read"] > 0
            assert doc["bytes_fetched"] > 0 and doc["fetch_requests"] > 0
            assert doc["cache"]["misses"] > 0
            lat = doc["latency_ms"]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
            assert (doc["slow_reads"], doc["stuck_reads"], doc["read_errors"], doc["inflight_reads"]) == (0, 0, 0, 0)
            address = doc["metrics_address"]
            assert address and address.startswith("127.0.0.1:")
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=30) as r:
                text = r.read().decode()
            samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
            reads = samples["obd_device_reads_total"]
            assert reads.labels == {"mount_id": doc["mount_id"], "mountpoint": str(mnt)}
            assert reads.value >= doc["device_reads"]
            assert samples["obd_registry_fetched_bytes_total"].value == doc["bytes_fetched"]
            assert samples["obd_device_read_duration_seconds_count"].value == reads.value
            rc, out = obd("stats", str(mnt))
            assert rc == 0 and f"  metrics   http://{address}/metrics" in out
        finally:
            assert obd("umount", str(mnt))[0] == 0
    finally:
        reg.stop()
    assert kernel_leftovers() == before  # no stats socket or metrics file left behind
