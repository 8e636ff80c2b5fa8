"""Host tests of the cold-start driver's pure parts: table, goal lines, access log, plan, modes, JSON."""

from __future__ import annotations

import hashlib
import http.client
import json
import os

import pytest

from benchmarks.startup.__main__ import parse_args
from benchmarks.startup.convert import Converted
from benchmarks.startup.goals import check, vm_host_factor
from benchmarks.startup.images import BuiltImage
from benchmarks.startup.layers import LayerBlob
from benchmarks.startup.lazy import mount_entry, obd_stats
from benchmarks.startup.modes import MODES, select
from benchmarks.startup.plan import Plan
from benchmarks.startup.registry import BenchRegistry, PushedImage, parse_access_log
from benchmarks.startup.report import breakdown, document, results_from_json, table
from benchmarks.startup.result import ColdStart
from tcmu_overlaybd.errors import CorruptDataError, KernelError, UsageError
from tcmu_overlaybd.image.push import push_blob
from tests.helpers.registry import needs_registry

MB = 1_000_000


def lazy(image, mode, pull, available, fetched, read, rss):
    return ColdStart(image, mode, pull, available, fetched, 900 * MB, bytes_read=read, handler_rss=rss)


def test_table_has_ratios_against_the_traditional_pull_of_the_same_link():
    results = [("unshaped", ColdStart("python-large", "traditional", 30.0, 32.0, 400 * MB, 410 * MB)),
               ("unshaped", lazy("python-large", "overlaybd", 2.0, 8.0, 40 * MB, 35 * MB, 95 * MB)),
               ("100mbit-20ms", lazy("python-large", "overlaybd", 3.0, 12.0, 40 * MB, 35 * MB, 95 * MB))]
    lines = table(results).splitlines()
    assert [c.strip() for c in lines[0].split(" | ")] == [
        "image", "link", "mode", "pull s", "service available s", "bytes fetched", "bytes read", "registry size",
        "handler RSS", "vs traditional pull"]
    trad = [c.strip() for c in lines[2].split(" | ")]
    assert trad[3:] == ["30.00", "32.00", "400.0 MB", "-", "410.0 MB", "-", "1.07x"]
    obd = [c.strip() for c in lines[3].split(" | ")]
    assert obd[5:] == ["40.0 MB", "35.0 MB", "900.0 MB", "95.0 MB", "0.27x"]
    assert lines[4].endswith("| -")  # no traditional pull on that link


def test_goal_lines_pass_and_fail_on_the_figures_of_issue_6():
    large, shaped = "python-large", "100mbit-20ms"
    results = [
        (shaped, ColdStart(large, "traditional", 90.0, 95.0, 528 * MB, 528 * MB)),
        (shaped, lazy(large, "overlaybd+prefetch", 4.0, 25.0, 300 * MB, 200 * MB, 120 * MB)),
        (shaped, lazy(large, "fastoci+prefetch", 5.0, 35.0, 500 * MB, 200 * MB, 160 * MB)),
        ("unshaped", lazy(large, "overlaybd", 1.5, 20.0, 250 * MB, 200 * MB, 110 * MB)),
        ("unshaped", lazy(large, "overlaybd", 2.5, 20.0, 250 * MB, 200 * MB, 110 * MB)),
        ("unshaped", lazy(large, "overlaybd", 1.9, 20.0, 250 * MB, 200 * MB, 149 * MB)),
    ]
    lines = [g.line() for g in check(results, vm_host_factor=10.0)]
    assert lines == [
        "PASS: lazy service available <= 1/3 traditional pull (python-large, 100mbit-20ms, with prefetch): "
        "overlaybd+prefetch 25.0 s vs pull 90.0 s = 0.28x",
        "FAIL: lazy service available <= 1/3 traditional pull (python-large, 100mbit-20ms, with prefetch): "
        "fastoci+prefetch 35.0 s vs pull 90.0 s = 0.39x",
        "FAIL: FastOCI service available <= 1.25x overlaybd: python-large 100mbit-20ms fastoci+prefetch 35.0 s "
        "vs overlaybd+prefetch 25.0 s = 1.40x",
        "PASS: obd mount < 2 s (unshaped): python-large overlaybd 1.90 s in the VM; / VM-host factor 10.0 = "
        "~0.19 s on the host (estimate)",  # the median of three runs
        "PASS: bytes fetched <= 2x bytes read: python-large 100mbit-20ms overlaybd+prefetch 300.0 MB / 200.0 MB "
        "= 1.50x",
        "FAIL: bytes fetched <= 2x bytes read: python-large 100mbit-20ms fastoci+prefetch 500.0 MB / 200.0 MB "
        "= 2.50x",
        "PASS: bytes fetched <= 2x bytes read: python-large unshaped overlaybd 250.0 MB / 200.0 MB = 1.25x",
        "PASS: handler RSS < 150.0 MB (python-large): 100mbit-20ms overlaybd+prefetch 120.0 MB",
        "FAIL: handler RSS < 150.0 MB (python-large): 100mbit-20ms fastoci+prefetch 160.0 MB",
        "PASS: handler RSS < 150.0 MB (python-large): unshaped overlaybd 149.0 MB",  # the peak of the runs
    ]


def test_goals_without_lazy_results_are_not_measured_never_passed():
    lines = [g.line() for g in check([("unshaped", ColdStart("python-small", "traditional", 8.0, 9.0, 79 * MB,
                                                                      79 * MB))])]
    assert len(lines) == 6 and all(line.startswith("NOT MEASURED: ") for line in lines)
    assert lines[3] == "NOT MEASURED: obd mount < 2 s (unshaped): needs a lazy mode on the unshaped link"


def test_vm_host_factor_is_the_median_ratio_of_traditional_unshaped_pulls():
    vm = [("unshaped", ColdStart("python-small", "traditional", 60.0, 71.0, 1, 1)),
          ("unshaped", ColdStart("python-large", "traditional", 400.0, 430.0, 1, 1)),
          ("100mbit-20ms", ColdStart("python-small", "traditional", 104.0, 128.0, 1, 1))]
    host = [("unshaped", ColdStart("python-small", "traditional", 6.0, 7.0, 1, 1))]
    factor, detail = vm_host_factor(vm, host)
    assert factor == 10.0 and detail == "python-small: VM 60.0 s / host 6.0 s"
    assert vm_host_factor(vm, []) is None


def test_result_document_round_trips_through_json():
    results = [("unshaped", ColdStart("python-small", "traditional", 8.0, 9.0, 79 * MB, 79 * MB,
                                      details={"client_bytes": 79 * MB})),
               ("unshaped", lazy("python-small", "fastoci", 3.0, 6.0, 30 * MB, 25 * MB, 60 * MB))]
    doc = json.loads(json.dumps(document(results, {}, {}, {"recordings": []})))
    assert results_from_json(doc["results"]) == results
    assert [r["ratio_vs_traditional_pull"] for r in doc["results"]] == [9.0 / 8.0, 6.0 / 8.0]
    assert doc["machine"]["in_vm_harness"] in (True, False) and doc["recordings"] == []


def test_access_log_totals_count_get_bodies_blob_ranges_and_skip_other_lines():
    log = "\n".join([
        '127.0.0.1 - - [23/Nov/2026:12:41:13 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "obd"',
        '127.0.0.1 - - [23/Nov/2026:12:41:13 +0000] "HEAD /v2/bench/x/manifests/oci HTTP/1.1" 200 0 "" "obd"',
        '127.0.0.1 - - [23/Nov/2026:12:41:13 +0000] "GET /v2/bench/x/manifests/oci HTTP/1.1" 200 1200 "" "obd"',
        '127.0.0.1 - - [23/Nov/2026:12:41:14 +0000] "GET /v2/bench/x/blobs/sha256:ab HTTP/1.1" 206 262144 "" "o"',
        '127.0.0.1 - - [23/Nov/2026:12:41:14 +0000] "GET /v2/bench/x/blobs/sha256:cd HTTP/1.1" 200 5000 "" "o"',
        '127.0.0.1 - - [23/Nov/2026:12:41:15 +0000] "PUT /v2/bench/x/blobs/uploads/1 HTTP/1.1" 201 0 "" "o"',
        '127.0.0.1 - - [23/Nov/2026:12:41:15 +0000] "GET /v2/bench/x/blobs/sha256:ef HTTP/1.1" 499 - "" "o"',
        'time="2026-11-23T12:41:13Z" level=error msg="response completed with error"',
        '127.0.0.1 - - [23/Nov/2026:12:41:16 +0000] "GET /v2/bench/x/blobs/sha256:ab HTTP/1.1" 206 10',  # cut
    ])
    served = parse_access_log(log)
    assert (served.bytes, served.blob_bytes, served.requests, served.range_requests) == (
        2 + 1200 + 262144 + 5000 + 10, 262144 + 5000 + 10, 7, 2)


@needs_registry
def test_registry_access_log_counts_what_a_range_read_really_received(tmp_path):
    registry = BenchRegistry(str(tmp_path / "registry"))
    try:
        data = bytes(range(256)) * 4096
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        push_blob(registry.client, "bench/t", data, digest, len(data))
        mark = registry.mark()
        conn = http.client.HTTPConnection(registry.host, timeout=10)
        conn.request("GET", f"/v2/bench/t/blobs/{digest}", headers={"Range": "bytes=1000-5095"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        served = registry.served_since(mark)
    finally:
        registry.stop()
    assert resp.status == 206 and body == data[1000:5096]
    assert (served.blob_bytes, served.range_requests, served.requests) == (4096, 1, 1)


def _plan(tmp_path) -> Plan:
    layer = LayerBlob("sha256:" + "a" * 64, 10, "sha256:" + "b" * 64, 20, 3, 1)
    built = BuiltImage("python-small", str(tmp_path / "layout"), "python-small", "sha256:" + "c" * 64, [layer], 1.5)
    conv = Converted("python-small", "overlaybd", str(tmp_path / "ob"), "python-small", "sha256:" + "d" * 64,
                     [4096], 2.0)
    pushed = {"oci": PushedImage("bench/python-small", "oci", "sha256:" + "c" * 64, 1234, 1),
              "overlaybd": PushedImage("bench/python-small", "overlaybd", "sha256:" + "d" * 64, 5678, 1)}
    return Plan({"python-small": built}, {"python-small": [conv]}, str(tmp_path / "seed"), {"python-small": pushed})


def test_plan_file_round_trips_and_a_damaged_one_is_one_line(tmp_path):
    plan = _plan(tmp_path)
    plan.save(str(tmp_path / "plan.json"))
    again = Plan.load(str(tmp_path / "plan.json"))
    assert again == plan
    ref = again.pushed["python-small"]["overlaybd"].ref("127.0.0.1:5000")
    assert ref == "127.0.0.1:5000/bench/python-small:overlaybd"
    (tmp_path / "bad.json").write_text('{"version": 1, "seed": "x"')
    with pytest.raises(CorruptDataError,
                       match=r"bad\.json at offset 26: plan is not JSON \(Expecting ',' delimiter\)$"):
        Plan.load(str(tmp_path / "bad.json"))
    (tmp_path / "old.json").write_text('{"version": 1, "seed": "x"}')
    with pytest.raises(CorruptDataError, match=r"old\.json: plan has a missing or unexpected field 'built'$"):
        Plan.load(str(tmp_path / "old.json"))


def test_prefetch_modes_wait_for_obd_mount_record_trace_and_prefetch():
    names = [m.name for m in MODES]
    assert names == ["traditional", "overlaybd", "fastoci", "overlaybd+prefetch", "fastoci+prefetch"]
    runnable, missing = select(names, {"--plain-http", "-q", "--record-trace"})
    assert [m.name for m in runnable] == ["traditional", "overlaybd", "fastoci"]
    assert [(m.name, why) for m, why in missing] == [
        ("overlaybd+prefetch", "obd mount --prefetch (not in this checkout yet)"),
        ("fastoci+prefetch", "obd mount --prefetch (not in this checkout yet)")]
    runnable, missing = select(["fastoci+prefetch"], {"--record-trace", "--prefetch"})
    assert [(m.name, m.fmt, m.prefetch, m.lazy) for m in runnable] == [("fastoci+prefetch", "fastoci", True, True)]
    assert missing == []


def test_mount_entry_is_found_by_real_path_and_missing_is_one_line(tmp_path):
    (tmp_path / "mnt").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "mnt")
    listing = json.dumps([{"mountpoint": "/elsewhere", "device": "/dev/sdb", "handler_pid": 7},
                          {"mountpoint": str(tmp_path / "mnt"), "device": "/dev/sda", "handler_pid": 42}])
    assert mount_entry(listing, str(tmp_path / "link"))["handler_pid"] == 42
    with pytest.raises(KernelError, match="obd list does not show /nowhere although obd mount succeeded"):
        mount_entry(listing, "/nowhere")


def test_arguments_check_images_modes_and_the_plan_doc_pair():
    args = parse_args(["--images", "python-small", "--modes", "overlaybd,fastoci", "--shape"])
    assert args.image_names == ["python-small"] and args.mode_names == ["overlaybd", "fastoci"]
    assert [p.name for p in args.profiles] == ["unshaped", "100mbit-20ms"]
    with pytest.raises(UsageError, match="unknown mode 'lazy'"):
        parse_args(["--modes", "lazy"])
    with pytest.raises(UsageError, match="--plan and --doc go together"):
        parse_args(["--plan", "/x"])


def test_obd_stats_of_a_path_that_is_no_mount_is_kept_as_its_one_line_error(tmp_path):
    assert obd_stats(str(tmp_path), dict(os.environ)) == {"error": f"obd stats: {tmp_path} is not an obd mount"}


def test_breakdown_shows_device_reads_their_wait_and_fetch_sizes_from_obd_stats():
    stats = {"device_reads": 4770, "latency_sum_s": 385.57, "fetch_requests": 643, "bytes_fetched": 183238656,
             "cache": {"hit_ratio": 0.7975}}
    r = lazy("python-large", "fastoci", 83.7, 645.6, 204 * MB, 226 * MB, 111 * MB)
    r.details["obd_stats"] = stats
    lines = breakdown([("unshaped", r), ("unshaped", ColdStart("python-large", "traditional", 1.0, 2.0, 3, 4))])
    lines = lines.splitlines()
    assert len(lines) == 3  # header, rule, the one lazy run with stats
    assert [c.strip() for c in lines[2].split(" | ")] == [
        "python-large", "unshaped", "fastoci", "4770", "385.6", "645.6", "643", "285.0 kB", "0.80"]
    assert breakdown([("unshaped", lazy("python-small", "overlaybd", 1, 2, 3, 4, 5))]) == ""


def test_cpu_phases_count_each_process_from_its_own_start_and_name_the_handler():
    from benchmarks.startup import cpu
    hz = os.sysconf("SC_CLK_TCK")
    kinds0 = dict.fromkeys(cpu.KINDS, 0)
    a = cpu.Snapshot(kinds0, {10: ("python3", 5, 100), 11: ("docker-registry", 6, 50), 12: ("sh", 7, 40)})
    b = cpu.Snapshot(dict(kinds0, user=3 * hz, idle=hz),
                     {10: ("python3", 5, 100 + 2 * hz), 11: ("docker-registry", 6, 50 + hz),
                      12: ("python3", 99, hz // 2),  # pid 12 reused by a new process: counts from zero
                      13: ("python3", 100, hz // 2)})
    d = cpu.between(a, b, {10: "obd handler"})
    assert d["user"] == 3.0 and d["idle"] == 1.0
    assert d["proc:obd handler"] == 2.0 and d["proc:docker-registry"] == 1.0 and d["proc:python3"] == 1.0
    assert "busy 3.0 s" in cpu.summary({"app": d})


def test_obd_env_options_reach_obd_only_as_obd_keys():
    args = parse_args(["--obd-env", "OBD_READ_AHEAD_KB=1024", "--obd-env", "OBD_IO_THREADS=4"])
    assert args.obd_env_dict == {"OBD_READ_AHEAD_KB": "1024", "OBD_IO_THREADS": "4"}
    with pytest.raises(UsageError, match="OBD_KEY=VALUE"):
        parse_args(["--obd-env", "PATH=/tmp"])
