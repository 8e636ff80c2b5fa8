"""``obd stats``, the Prometheus endpoint and the slow-read warning of a real mount: hello-world
from a registry in the guest, reached through a proxy that can hold a blob request back."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.registry import RegistryClient

from ..helpers.registry import Proxy, RegistryServer, needs_registry, push_hello_world
from .conftest import kernel_leftovers, obd
from .test_registry_outage import LAYER, offset_in_middle_unit, read_direct

pytestmark = pytest.mark.kernel

SLOW_MS = 2000  # TCG: a cold read takes up to ~0.8 s, a read held 6 s by the proxy is slow
HOLD_S = 6


def stats(mnt) -> dict:
    rc, out = obd("stats", str(mnt), "--json")
    assert rc == 0
    return json.loads(out)


@needs_registry
def test_stats_metrics_and_a_stuck_read_of_a_mount(vectors, tmp_path, monkeypatch):
    monkeypatch.setenv("OBD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OBD_GZIP_CACHE_DIR", str(tmp_path / "gzcache"))
    monkeypatch.setenv("OBD_METRICS_LISTEN", "127.0.0.1:0")  # inherited by the handler
    monkeypatch.setenv("OBD_IO_SLOW_MS", str(SLOW_MS))
    # counters are the handler's: small cache blocks leave the file's data to it (obd mount's own
    # probe of the image caches only the blocks of the headers and indexes it reads)
    monkeypatch.setenv("OBD_CACHE_BLOCK_SIZE", "4096")
    offset, want = offset_in_middle_unit((vectors / "aci-hello-world" / LAYER).read_bytes())
    reg = RegistryServer(str(tmp_path / "registry"))
    proxy = Proxy(reg.host)
    before = kernel_leftovers()
    try:
        push_hello_world(RegistryClient(reg.host, OpenOptions(plain_http=True)), vectors, "library/hello", "s")
        ref = f"{proxy.host}/library/hello:s"
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        assert obd("mount", "--plain-http", ref, str(mnt))[0] == 0
        try:
            assert len((mnt / "hello").read_bytes()) == 13256
            doc = stats(mnt)
            assert doc["mountpoint"] == str(mnt) and doc["image"] == ref and doc["restarts"] == 0
            assert doc["device"].startswith("/dev/sd")
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

            # a blob request the registry side holds back: never silence
            proxy.add_fault(f"delay:{HOLD_S}", "/blobs/")
            got: list[bytes] = []
            reader = threading.Thread(target=lambda: got.append(read_direct(doc["device"], offset)))
            reader.start()
            deadline = time.monotonic() + HOLD_S + 30
            while (held := stats(mnt))["stuck_reads"] == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert held["stuck_reads"] == 1 and held["inflight_reads"] >= 1
            reader.join(60)
            assert got == [want]
            after = stats(mnt)
            assert (after["stuck_reads"], after["inflight_reads"], after["read_errors"]) == (0, 0, 0)
            assert after["slow_reads"] == 1 and after["slow_warnings"] == 1
            assert after["latency_ms"]["max"] >= SLOW_MS
            with open(f"/run/obd/{doc['mount_id']}.log") as f:
                log = f.read()
            assert log.count(f"device read of 4096 bytes at offset {offset} in flight for") == 1
            assert log.count(f"device read of 4096 bytes at offset {offset} completed after") == 1
        finally:
            assert obd("umount", str(mnt))[0] == 0
    finally:
        proxy.stop()
        reg.stop()
    assert kernel_leftovers() == before  # no stats socket or metrics file left behind
