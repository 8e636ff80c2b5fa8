"""bench_readpath's model of the device reads a kernel sends for a workload's file reads."""

from __future__ import annotations

from benchmarks.bench_readpath import device_reads


def test_reads_become_whole_pages_each_read_once():
    assert device_reads([(100, 10)]) == [(0, 4096)]
    assert device_reads([(0, 4096), (10, 20), (4000, 200)]) == [(0, 4096), (4096, 4096)]


def test_new_pages_merge_up_to_the_readahead_size_around_cached_ones():
    assert device_reads([(0, 300_000)]) == [(0, 131072), (131072, 131072), (262144, 40960)]
    assert device_reads([(4096, 4096), (0, 16384)]) == [(4096, 4096), (0, 4096), (8192, 8192)]
