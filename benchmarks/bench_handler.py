"""Read throughput of /dev/sdX through obd's TCMU handler as a ratio to a loop device.

Both devices sit on the same raw ext4 image (on the guest's tmpfs) in the same
boot, so the ratios are meaningful even under TCG.  Measures: sequential 1 MiB
reads (O_DIRECT and buffered), 4 KiB random reads at queue depth 1 and 16
(O_DIRECT), and the handler process's RSS.  Prints a table and writes JSON to
benchmarks/results/handler.json.

Run: .venv/bin/python benchmarks/bench_handler.py
(on a host without TCMU it re-runs itself inside the VM harness, scripts/vm-run).
With Debian's tcmu-runner installed, the same device served by that C handler is
measured too, as the reference to beat.
"""

from __future__ import annotations

import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "benchmarks", "results", "handler.json")
IMAGE_MB = 128
SEQ_CHUNK = 1 << 20
RAND_READS = 600
# every metric is sampled on all devices back to back, ROUNDS times, the device order
# rotating; the ratios are medians of the per-round ratios, so a load change of the host
# (TCG shares its CPUs) hits both sides of a ratio alike
ROUNDS = 5
RAND_QD = 16


def have_tcmu() -> bool:
    return subprocess.run(["modprobe", "-a", "target_core_user", "tcm_loop"], capture_output=True).returncode == 0


def run_in_vm() -> int:
    out = os.environ.get("OBD_VM_RESULTS") or os.path.join(ROOT, "build", "bench-vm")
    rc = subprocess.call([os.path.join(ROOT, "scripts", "vm-run"), "--timeout", "1800", "--out", out, "--",
                          os.path.join(ROOT, ".venv", "bin", "python"), os.path.abspath(__file__)])
    if rc == 0:
        os.makedirs(os.path.dirname(RESULT), exist_ok=True)
        shutil.copyfile(os.path.join(out, "handler.json"), RESULT)
        print(f"results: {RESULT}")
    return rc


def drop_device_cache(fd: int) -> None:
    """Forget the device's cached pages only: a global drop_caches would also evict the
    handler's Python code (read over 9p in the VM) and measure that instead."""
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def make_image(work: str) -> str:
    tree = os.path.join(work, "tree")
    rnd = random.Random(1)
    for d in range(8):
        os.makedirs(os.path.join(tree, f"d{d}"))
        for i in range(20):
            size = rnd.choice([1 << 10, 8 << 10, 64 << 10, 512 << 10, 2 << 20])
            with open(os.path.join(tree, f"d{d}", f"f{i}"), "wb") as f:
                f.write(os.urandom(size))
    img = os.path.join(work, "disk.img")
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree, img, f"{IMAGE_MB}M"], check=True)
    shutil.rmtree(tree)
    return img


def seq_read(dev: str, direct: bool) -> float:
    """MB/s reading the whole device in 1 MiB requests."""
    fd = os.open(dev, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    drop_device_cache(fd)
    size = os.lseek(fd, 0, os.SEEK_END)
    buf = mmap.mmap(-1, SEQ_CHUNK)
    t = time.perf_counter()
    for off in range(0, size, SEQ_CHUNK):
        os.preadv(fd, [buf], off)
    dt = time.perf_counter() - t
    os.close(fd)
    return size / dt / 1e6


def rand_read(dev: str, qd: int) -> float:
    """4 KiB O_DIRECT random reads per second with ``qd`` threads in flight."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    blocks = os.lseek(fd, 0, os.SEEK_END) // 4096
    offsets = [random.Random(7).randrange(blocks) * 4096 for _ in range(RAND_READS)]
    per = [offsets[i::qd] for i in range(qd)]

    def worker(offs):
        buf = mmap.mmap(-1, 4096)
        for off in offs:
            os.preadv(fd, [buf], off)

    threads = [threading.Thread(target=worker, args=(p,)) for p in per]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    dt = time.perf_counter() - t
    os.close(fd)
    return RAND_READS / dt


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` and all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_us_per_read(dev: str, pid: int) -> float:
    """CPU time the handler process ``pid`` spends per 4 KiB QD1 read (whole-process, so
    it includes the kernel work done in its write(4), §7.2)."""
    before = cpu_s(pid)
    rand_read(dev, 1)
    return (cpu_s(pid) - before) / RAND_READS * 1e6


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def c_handler_device(img: str, work: str):
    """Serve ``img`` with Debian's tcmu-runner (C, qcow handler, raw files too) through the
    same kind of tcm_loop LUN; returns (device, cleanup) or None without tcmu-runner."""
    exe = shutil.which("tcmu-runner")
    if exe is None:
        return None
    import rtslib_fb as rtslib

    from tcmu_overlaybd.lio import backstore, loopback

    runner = subprocess.Popen([exe, "-l", work], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)  # it subscribes to the TCM-USER netlink family and answers ADDED events
    so = rtslib.UserBackedStorageObject("crunner", config=f"qcow/{img}", size=os.path.getsize(img),
                                        hw_max_sectors=backstore.MAX_SECTORS,
                                        control=f"max_data_area_mb={backstore.MAX_DATA_AREA_MB}")
    wwn = loopback.wwn_for("crunner")
    # loopback.export() only exports obd's own backstores: build the same LUN by hand
    tpg = rtslib.TPG(rtslib.Target(rtslib.FabricModule("loopback"), wwn, mode="create"), 1, mode="create")
    rtslib.LUN(tpg, 0, storage_object=so)
    dev = loopback.wait_block_device(tpg.path, 0, 30)

    def cleanup():
        loopback.unexport(wwn)
        so.delete()
        runner.terminate()
        runner.wait()

    return dev, cleanup, runner.pid


METRICS = {
    "seq_direct_MBps": lambda dev: seq_read(dev, True),
    "seq_buffered_MBps": lambda dev: seq_read(dev, False),
    "rand4k_qd1_iops": lambda dev: rand_read(dev, 1),
    f"rand4k_qd{RAND_QD}_iops": lambda dev: rand_read(dev, RAND_QD),
}


def median(values: list[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def measure_all(devices: dict[str, str]) -> dict:
    """{device label: {metric: [sample per round]}}, each round sampling every device back
    to back (order rotating) so that paired samples see the same host load."""
    samples = {label: {m: [] for m in METRICS} for label in devices}
    labels = list(devices)
    for r in range(ROUNDS):
        order = labels[r % len(labels):] + labels[:r % len(labels)]
        for metric, fn in METRICS.items():
            for label in order:
                samples[label][metric].append(fn(devices[label]))
    return samples


def paired_ratio(samples: dict, a: str, b: str) -> dict[str, float]:
    """{metric: median over rounds of a's sample / b's sample of the same round}."""
    return {m: median([x / y for x, y in zip(samples[a][m], samples[b][m])]) for m in METRICS}


def main() -> int:
    if not os.environ.get("OBD_IN_VM") and not have_tcmu():
        return run_in_vm()
    sys.path.insert(0, ROOT)
    from tcmu_overlaybd.cli.main import main as obd
    from tcmu_overlaybd.mount import mounter

    work = tempfile.mkdtemp(prefix="obd-bench-")
    img = make_image(work)
    subprocess.run(["modprobe", "loop"], check=True)
    loop = subprocess.run(["losetup", "-f", "--show", "-r", img], capture_output=True, text=True,
                          check=True).stdout.strip()
    mnt = os.path.join(work, "mnt")
    os.mkdir(mnt)
    if obd(["mount", "--raw", img, mnt]) != 0:
        return 1
    cleanup = None
    try:
        [m] = mounter.list_mounts()
        devices = {"loop": loop, "obd": m["device"]}
        c = c_handler_device(img, work)
        if c is not None:
            devices["tcmu_runner"], cleanup, runner_pid = c
        samples = measure_all(devices)
        results = {label: {m: median(v) for m, v in per.items()} for label, per in samples.items()}
        results["samples"] = samples
        results["handler_cpu_us_per_4k_read"] = cpu_us_per_read(m["device"], m["handler_pid"])
        if c is not None:
            results["tcmu_runner_cpu_us_per_4k_read"] = cpu_us_per_read(devices["tcmu_runner"], runner_pid)
        results["handler_rss_kib"] = rss_kib(m["handler_pid"])
        results["supervisor_rss_kib"] = rss_kib(m["supervisor_pid"])
        if c is not None:
            results["tcmu_runner_rss_kib"] = rss_kib(runner_pid)
    finally:
        if cleanup:
            cleanup()
        obd(["umount", mnt])
        subprocess.run(["losetup", "-d", loop])
    results["ratio_obd_to_loop"] = paired_ratio(samples, "obd", "loop")
    have_c = "tcmu_runner" in results
    if have_c:
        results["ratio_obd_to_tcmu_runner"] = paired_ratio(samples, "obd", "tcmu_runner")
    results.update(image_mb=IMAGE_MB, rounds=ROUNDS, kernel=os.uname().release)
    print(f"{'metric (median of %d)' % ROUNDS:22} {'loop':>10} {'obd':>10} {'obd/loop':>9}"
          + (f" {'C runner':>10} {'obd/C':>7}" if have_c else ""))
    for k, r in results["ratio_obd_to_loop"].items():
        line = f"{k:22} {results['loop'][k]:10.1f} {results['obd'][k]:10.1f} {r:9.2f}"
        if have_c:
            line += f" {results['tcmu_runner'][k]:10.1f} {results['ratio_obd_to_tcmu_runner'][k]:7.2f}"
        print(line)
    print(f"handler RSS {results['handler_rss_kib']} KiB, supervisor RSS {results['supervisor_rss_kib']} KiB"
          + (f", tcmu-runner RSS {results['tcmu_runner_rss_kib']} KiB" if have_c else ""))
    print(f"handler CPU per 4 KiB read {results['handler_cpu_us_per_4k_read']:.0f} us"
          + (f", tcmu-runner {results['tcmu_runner_cpu_us_per_4k_read']:.0f} us" if have_c else ""))
    out = os.path.join(os.environ.get("OBD_VM_OUT", os.path.dirname(RESULT)), "handler.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
