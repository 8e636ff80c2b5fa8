"""Driver of the cold-start benchmark: build, push, measure, print the table and the goals, write JSON.

Steps: build the images (cached, see ``images``) and convert them to overlaybd
and FastOCI (cached, see ``convert``); push each image to ``bench/<image>:oci``
and its conversions to ``bench/<image>:overlaybd`` and ``:fastoci`` of a seed
registry storage; then measure, each run starting from a fresh copy of the seed
served by a docker-registry on 127.0.0.1.  Where the measuring happens:

* here, when the kernel has TCMU (or only the traditional mode is asked for);
* in the VM harness otherwise (``vm``), after the traditional mode was measured
  here too, unshaped, for the VM/host factor;
* with a shaped link profile (``--shape``), inside a network namespace of its own
  (``shaping``), wherever that is.

The measuring part reads the plan (``plan``) and writes a raw result document;
the top-level driver prints the table of issue 6 with ratios against the
traditional pull of the same run, the goal lines (``goals``) and writes
``benchmarks/results/startup.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys

from tcmu_overlaybd.errors import CorruptDataError, ObdError, UsageError
from tcmu_overlaybd.image.options import OpenOptions
from tcmu_overlaybd.image.resolve import open_image

from . import cpu
from . import goals as goals_mod
from . import lazy
from . import modes as modes_mod
from .convert import FORMATS, convert
from .images import DEFAULT_CACHE, IMAGES, BuiltImage, ImageBuilder
from .plan import Plan
from .registry import REPO_PREFIX, BenchRegistry, free_port
from .report import breakdown, document, results_from_json, sizes_table, table, write_json
from .result import ColdStart
from .service import AppConfig
from .shaping import PROFILES, Namespace, apply_profile, parse_profiles
from .vm import guest_memory_mb, have_tcmu, in_vm, run_in_vm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "benchmarks", "results", "startup.json")
SHAPED = "100mbit-20ms"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/startup/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=",".join(IMAGES), help=f"comma-separated (default: {','.join(IMAGES)})")
    p.add_argument("--modes", default=",".join(m.name for m in modes_mod.MODES),
                   help="comma-separated modes (default: all; those obd cannot run yet are listed)")
    p.add_argument("--links", default="unshaped", help=f"comma-separated link profiles ({', '.join(PROFILES)})")
    p.add_argument("--shape", action="store_true", help=f"also measure on the shaped link {SHAPED} "
                   "(tc netem on lo of a private network namespace)")
    p.add_argument("--runs", type=int, default=1, help="cold starts per image, mode and link (default 1)")
    p.add_argument("--obd-env", action="append", default=[], metavar="OBD_KEY=VALUE",
                   help="environment for every obd command of the lazy modes (config overrides such as "
                        "OBD_READ_AHEAD_KB=1024); repeatable, kept in each run's details")
    p.add_argument("--sample-stacks", action="store_true",
                   help="the handler samples its threads' stacks every 100 ms (OBD_SAMPLE_STACKS); the top frames "
                        "go into each lazy run's details (diagnosis: it costs a little CPU)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"image build cache (default {DEFAULT_CACHE})")
    p.add_argument("--work", default="/var/tmp/obd-bench", help="scratch space: registry storage, rootfs")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON result file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds an app may take to answer")
    p.add_argument("--vm-timeout", type=int, default=5400, help="seconds the VM harness run may take")
    p.add_argument("--vm-mem", type=int, default=0, help="guest RAM in MB (default: by image size)")
    p.add_argument("--no-host-baseline", action="store_true",
                   help="do not measure the traditional mode on the host before booting the VM")
    p.add_argument("--build-only", action="store_true", help="build and convert (or find cached) images and stop")
    p.add_argument("--from-json", metavar="FILE", help="print the table and goal lines of an earlier result "
                   "file (no building, no measuring)")
    p.add_argument("--plan", help=argparse.SUPPRESS)  # measuring part only: the plan to read ...
    p.add_argument("--doc", help=argparse.SUPPRESS)  # ... and the raw result document to write
    p.add_argument("--in-netns", metavar="NAME", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.image_names = [n for n in args.images.split(",") if n]
    for name in args.image_names:
        if name not in IMAGES:
            raise UsageError(f"unknown image {name!r} (known: {', '.join(IMAGES)})")
    args.mode_names = [n for n in args.modes.split(",") if n]
    known = {m.name for m in modes_mod.MODES}
    for name in args.mode_names:
        if name not in known:
            raise UsageError(f"unknown mode {name!r} (known: {', '.join(sorted(known))})")
    args.profiles = parse_profiles(args.links + (f",{SHAPED}" if args.shape and SHAPED not in args.links else ""))
    if args.runs < 1:
        raise UsageError("--runs must be at least 1")
    args.obd_env_dict = {}
    for item in args.obd_env:
        key, eq, value = item.partition("=")
        if not eq or not key.startswith("OBD_"):
            raise UsageError(f"--obd-env {item!r}: expected OBD_KEY=VALUE")
        args.obd_env_dict[key] = value
    if bool(args.plan) != bool(args.doc):
        raise UsageError("--plan and --doc go together")
    return args


def image_figures(image: BuiltImage) -> dict:
    return {"ref": image.ref, "manifest_digest": image.manifest_digest,
            "uncompressed_size": image.uncompressed_size, "compressed_size": image.compressed_size,
            "build_seconds": round(image.build_seconds, 1), "layers": [layer.to_json() for layer in image.layers]}


def seed_registry(work: str, built: dict[str, BuiltImage], converted: dict) -> Plan:
    """Push every image and conversion into the seed storage (blobs already there are skipped)."""
    seed = os.path.join(work, "seed-" + "+".join(sorted(built)))
    registry = BenchRegistry(seed)
    pushed: dict = {}
    try:
        for name, image in built.items():
            repo = f"{REPO_PREFIX}/{name}"
            # the OCI image goes first: a FastOCI image reads the OCI layers of its repository
            for fmt, ref in [("oci", image.ref)] + [(c.fmt, c.ref) for c in converted[name]]:
                p = registry.push_layout(ref, repo, fmt)
                pushed.setdefault(name, {})[fmt] = p
                print(f"pushed {p.ref(registry.host)}: {p.registry_size / 1e6:.1f} MB in the registry", flush=True)
    finally:
        registry.stop()
    return Plan(built, converted, seed, pushed)


def app_config(image: BuiltImage) -> AppConfig:
    """How the image's app starts (its OCI config, read from the local layout)."""
    source = open_image(image.ref, OpenOptions(quiet=True, discover_accelerated=False))
    try:
        return AppConfig.from_image_config(source.config)
    finally:
        source.store.close()


def measure(args, plan: Plan) -> dict:
    """Measure every runnable mode here; the raw result document.

    With ``--doc`` the document is rewritten after every run (``complete`` false
    until the end), so a run cut short still leaves what it measured.  A cold
    start that fails is recorded under ``failures`` and the others go on.
    """
    runnable, missing = modes_mod.select(args.mode_names, modes_mod.obd_mount_flags())
    names = [n for n in args.image_names if n in plan.built]
    mode_doc = {m.name: {"measures": m.measures, "available": True} for m in runnable}
    mode_doc.update({m.name: {"measures": m.measures, "available": False, "missing": why} for m, why in missing})
    images = {n: image_figures(plan.built[n]) for n in names}
    for name in names:
        images[name]["registry"] = {f: {"ref": f"{REPO_PREFIX}/{name}:{f}", "registry_size": p.registry_size}
                                    for f, p in plan.pushed[name].items()}
        for c in plan.converted[name]:
            images[name]["registry"][c.fmt]["convert_seconds"] = round(c.convert_seconds, 1)
    results: list[tuple[str, ColdStart]] = []
    extra: dict = {"complete": False, "recordings": [], "failures": [], "obd_cli_start_s": None}

    def doc() -> dict:
        return document(results, images, mode_doc, extra)

    def checkpoint() -> None:
        if args.doc:
            write_json(args.doc, doc())

    def attempt(link: str, image: str, mode: str, run):
        try:
            return run()
        except ObdError as e:
            extra["failures"].append({"image": image, "link": link, "mode": mode, "error": str(e)})
            print(f"{image} {link} {mode}: FAILED: {e}", flush=True)
            checkpoint()
            return None

    os.makedirs(args.work, exist_ok=True)
    reg_dir = os.path.join(args.work, "registry")
    registry = BenchRegistry.from_seed(plan.seed, reg_dir)
    try:
        trials = {}
        for name in names:
            pushed = plan.pushed[name]
            trials[name] = modes_mod.Trial(name, {f: p.ref(registry.host) for f, p in pushed.items()},
                                           {f: p.registry_size for f, p in pushed.items()},
                                           app_config(plan.built[name]), "", 0, args.timeout,
                                           sample_stacks=args.sample_stacks, obd_env=args.obd_env_dict)
        if any(m.lazy for m in runnable):
            extra["obd_cli_start_s"] = lazy.warm_up()
            print(f"obd's code read once; a warm `obd --help` takes {extra['obd_cli_start_s']:.2f} s here",
                  flush=True)
        recorded = sorted({m.fmt for m in runnable if m.prefetch})
        if recorded and args.in_netns:
            apply_profile(PROFILES["unshaped"], args.in_netns)
        for name in names:
            for fmt in recorded:  # one untimed unshaped run per image and format records its trace
                t = dataclasses.replace(trials[name], work=os.path.join(args.work, f"{fmt}-recording"),
                                        port=free_port())
                path = os.path.join(args.work, "traces", f"{name}-{fmt}.trace")
                os.makedirs(os.path.dirname(path), exist_ok=True)
                mark = registry.mark()
                r = attempt("unshaped", name, f"{fmt} recording", lambda: modes_mod.record_trace(t, fmt, path))
                if r is None:
                    continue
                r.bytes_fetched = registry.served_since(mark).bytes
                trials[name].traces[fmt] = path
                extra["recordings"].append(dict(dataclasses.asdict(r), trace=path, trace_size=os.path.getsize(path)))
                print(f"{name} {fmt}: trace recorded ({os.path.getsize(path)} bytes; "
                      f"{_run_line('unshaped', r).split(': ', 1)[1]})", flush=True)
                checkpoint()
        for profile in args.profiles:
            if args.in_netns:
                apply_profile(profile, args.in_netns)
            for name in names:
                for mode in runnable:
                    if mode.prefetch and mode.fmt not in trials[name].traces:
                        continue  # its recording failed (recorded under failures)
                    for _ in range(args.runs):
                        t = dataclasses.replace(trials[name], work=os.path.join(args.work, mode.name),
                                                port=free_port())
                        mark = registry.mark()
                        r = attempt(profile.name, name, mode.name, lambda: mode.run(t))
                        if r is None:
                            continue
                        served = registry.served_since(mark)
                        if not mode.lazy:
                            r.details["client_bytes"] = r.bytes_fetched
                        r.bytes_fetched, r.requests = served.bytes, served.requests
                        r.details["range_requests"] = served.range_requests
                        results.append((profile.name, r))
                        print(_run_line(profile.name, r), flush=True)
                        checkpoint()
    finally:
        if args.in_netns:
            apply_profile(PROFILES["unshaped"], args.in_netns)
        registry.stop()
        shutil.rmtree(reg_dir, ignore_errors=True)  # the seed stays
    extra["complete"] = True
    return doc()


def _run_line(link: str, r: ColdStart) -> str:
    line = (f"{r.image} {link} {r.mode}: pull {r.pull_s:.2f} s, available {r.available_s:.2f} s, "
            f"{r.bytes_fetched / 1e6:.1f} MB fetched")
    if r.bytes_read is not None:
        line += f", {r.bytes_read / 1e6:.1f} MB read, handler RSS {r.handler_rss / 1e6:.0f} MB"
    if r.details.get("cpu_s"):
        line += f"\n  CPU {cpu.summary(r.details['cpu_s'])}"
    return line


def measure_here(args, argv: list[str], plan: Plan) -> dict:
    """Measure on this kernel: in a network namespace of our own when a link is shaped."""
    if not any(p.shaped for p in args.profiles) or args.in_netns:
        return measure(args, plan)
    os.makedirs(args.work, exist_ok=True)
    plan_path = os.path.join(args.work, "netns-plan.json")
    doc_path = args.doc or os.path.join(args.work, "netns-doc.json")
    plan.save(plan_path)
    if os.path.exists(doc_path):
        os.unlink(doc_path)
    ns = Namespace(f"obd-bench-{os.getpid()}")
    try:
        print(f"measuring inside network namespace {ns.name}", flush=True)
        rc = ns.run([sys.executable, "-m", "benchmarks.startup", *argv, "--plan", plan_path, "--doc", doc_path,
                     "--in-netns", ns.name], cwd=REPO_ROOT)
    finally:
        ns.delete()
    if rc != 0:
        raise ObdError(f"the measuring run in network namespace {ns.name} failed (exit status {rc})")
    return load_doc(doc_path)


def load_doc(path: str) -> dict:
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CorruptDataError(f"result document is not JSON ({e.msg})", blob=path, offset=e.pos) from None


def report(doc: dict, host_doc: dict | None) -> list[goals_mod.Goal]:
    """Print the sizes, the table, the modes not run and the goal lines; complete ``doc`` with them."""
    results = results_from_json(doc["results"])
    sizes = [(n, f, r["registry_size"]) for n, i in doc["images"].items() for f, r in i["registry"].items()]
    print()
    print(sizes_table(sizes))
    print()
    print(table(results))
    where = breakdown(results)
    if where:
        print("\nwhere the lazy time went (the handler's obd stats; read wait sums overlapping reads):")
        print(where)
    used = [(link, r) for link, r in results if r.details.get("cpu_s")]
    if used:
        print("\nwhere the CPU went (seconds of the machine's CPU by kind, and of the busiest processes):")
        for link, r in used:
            print(f"{r.image} {link} {r.mode}: {cpu.summary(r.details['cpu_s'])}")
    for name, m in doc["modes"].items():
        if not m["available"]:
            print(f"mode {name}: not yet available: needs {m['missing']}")
    for f in doc.get("failures", []):
        print(f"FAILED run: {f['image']} {f['link']} {f['mode']}: {f['error']}")
    for r in doc.get("recordings", []):
        print(f"trace recording ({r['image']} unshaped {r['mode']}): pull {r['pull_s']:.2f} s, available "
              f"{r['available_s']:.2f} s, {r['bytes_fetched'] / 1e6:.1f} MB fetched, {r['trace_size']} byte trace")
    if doc.get("obd_cli_start_s") is not None:
        print(f"\nobd CLI start-up (a warm `obd --help`) where the lazy modes ran: {doc['obd_cli_start_s']:.2f} s")
    factor = None
    if host_doc is not None:
        found = goals_mod.vm_host_factor(results, results_from_json(host_doc["results"]))
        doc["host_baseline"] = {"machine": host_doc["machine"], "results": host_doc["results"],
                                "vm_host_factor": found[0] if found else None,
                                "vm_host_factor_from": found[1] if found else None}
        if found:
            factor = found[0]
            print(f"\nVM/host factor (traditional pull, unshaped): {factor:.1f}x ({found[1]})")
    # the trace recordings are unshaped lazy mounts too: their mount time, bytes and RSS count
    recordings = results_from_json([dict(r, link="unshaped") for r in doc.get("recordings", [])])
    goals = goals_mod.check(results + recordings, factor)
    print()
    for g in goals:
        print(g.line())
    doc["goals"] = [dataclasses.asdict(g) for g in goals]
    return goals


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.from_json:
        doc = load_doc(args.from_json)
        report(doc, doc.get("host_baseline"))
        return 0
    if os.geteuid() != 0:
        raise UsageError("the startup benchmark needs root (debootstrap, chroot, namespaces)")
    if args.plan:  # the measuring part, in the VM harness or a network namespace
        write_json(args.doc, measure_here(args, argv, Plan.load(args.plan)))
        return 0
    builder = ImageBuilder(args.cache)
    built = {name: builder.build(name) for name in args.image_names}
    formats = [f for f in FORMATS if any(m.fmt == f for m in modes_mod.MODES if m.name in args.mode_names)]
    conv_root = os.path.join(builder.dir, "converted")
    converted = {name: [convert(image, fmt, conv_root) for fmt in formats] for name, image in built.items()}
    if args.build_only:
        return 0
    plan = seed_registry(args.work, built, converted)
    runnable, _ = modes_mod.select(args.mode_names, modes_mod.obd_mount_flags())
    host_doc = None
    if any(m.lazy for m in runnable) and not in_vm() and not have_tcmu():
        if "traditional" in args.mode_names and not args.no_host_baseline:
            print("traditional pulls on this host first (unshaped): the VM/host factor", flush=True)
            base_args = argparse.Namespace(**{**vars(args), "mode_names": ["traditional"],
                                              "profiles": [PROFILES["unshaped"]]})
            host_doc = measure(base_args, plan)
        doc, failed = run_in_vm(REPO_ROOT, argv, plan, os.path.join(args.work, "vm-" + "+".join(sorted(built))),
                                args.vm_mem or guest_memory_mb(args.image_names), args.vm_timeout)
    else:
        doc, failed = measure_here(args, argv, plan), None
    report(doc, host_doc)
    write_json(args.output, doc)
    print(f"wrote {args.output}")
    if failed:
        raise ObdError(f"partial results only: {failed}")
    return 0


def run() -> None:
    try:
        sys.exit(main(sys.argv[1:]))
    except ObdError as e:
        print(f"startup: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    run()
