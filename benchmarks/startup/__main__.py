"""Driver of the cold-start benchmark: build, push, measure, print the table, write JSON.

Steps: build the images (cached, see ``images``) and convert them to overlaybd
and FastOCI (cached, see ``convert``); start a docker-registry on 127.0.0.1 and
push each image to ``bench/<image>:oci`` and its conversions to
``bench/<image>:overlaybd`` and ``:fastoci``; for each link profile,
image and runnable mode, measure cold starts; print the table of issue 6 with
ratios against the traditional pull of the same run and write
``benchmarks/results/startup.json``.  With a shaped link profile (``--shape``)
the measuring part re-runs itself inside a network namespace of its own (see
``shaping``); building stays outside, where the Debian mirror is reachable.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from tcmu_overlaybd.errors import ObdError, UsageError
from tests.helpers.registry import free_port

from . import modes as modes_mod
from .convert import FORMATS, Converted, convert
from .images import DEFAULT_CACHE, IMAGES, BuiltImage, ImageBuilder
from .registry import REPO_PREFIX, BenchRegistry, registry_options
from .report import sizes_table, table, write_json
from .shaping import PROFILES, Namespace, apply_profile, parse_profiles

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUTPUT = os.path.join(REPO_ROOT, "benchmarks", "results", "startup.json")
SHAPED = "100mbit-20ms"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/startup/run", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=",".join(IMAGES), help=f"comma-separated (default: {','.join(IMAGES)})")
    p.add_argument("--modes", default=",".join(m.name for m in modes_mod.MODES),
                   help="comma-separated modes (default: all; those not available yet are listed)")
    p.add_argument("--links", default="unshaped", help=f"comma-separated link profiles ({', '.join(PROFILES)})")
    p.add_argument("--shape", action="store_true", help=f"also measure on the shaped link {SHAPED} "
                   "(tc netem on lo of a private network namespace)")
    p.add_argument("--runs", type=int, default=1, help="cold starts per image, mode and link (default 1)")
    p.add_argument("--cache", default=DEFAULT_CACHE, help=f"image build cache (default {DEFAULT_CACHE})")
    p.add_argument("--work", default="/var/tmp/obd-bench", help="scratch space: registry storage, rootfs")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="JSON result file")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds an app may take to answer")
    p.add_argument("--build-only", action="store_true", help="build and convert (or find cached) images and stop")
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
    return args


def image_figures(image: BuiltImage) -> dict:
    return {"ref": image.ref, "manifest_digest": image.manifest_digest,
            "uncompressed_size": image.uncompressed_size, "compressed_size": image.compressed_size,
            "build_seconds": round(image.build_seconds, 1), "layers": [layer.to_json() for layer in image.layers]}


def measure(args, built: dict[str, BuiltImage], converted: dict[str, list[Converted]]) -> int:
    runnable, missing = modes_mod.select(args.mode_names)
    os.makedirs(args.work, exist_ok=True)
    reg_dir = os.path.join(args.work, "registry")
    shutil.rmtree(reg_dir, ignore_errors=True)
    registry = BenchRegistry(reg_dir)
    results = []
    try:
        refs, sizes = {}, []
        for name, image in built.items():
            repo = f"{REPO_PREFIX}/{name}"
            for fmt, ref in [("oci", image.ref)] + [(c.fmt, c.ref) for c in converted[name]]:
                # the OCI image goes first: a FastOCI image reads the OCI layers of its repository
                pushed = registry.push_layout(ref, repo, fmt)
                refs[(name, fmt)] = pushed.ref
                sizes.append((name, fmt, pushed.registry_size))
                print(f"pushed {pushed.ref}: {pushed.registry_size / 1e6:.1f} MB in the registry", flush=True)
        for profile in args.profiles:
            if args.in_netns:
                apply_profile(profile, args.in_netns)
            for name in built:
                for mode in runnable:
                    for _ in range(args.runs):
                        work = os.path.join(args.work, mode.name)
                        r = mode.run(name, refs[(name, "oci")], work, registry_options(), free_port(),
                                     args.timeout)
                        results.append((profile.name, r))
                        print(f"{name} {profile.name} {mode.name}: pull {r.pull_s:.2f} s, available "
                              f"{r.available_s:.2f} s, {r.bytes_fetched / 1e6:.1f} MB fetched", flush=True)
    finally:
        if args.in_netns:
            apply_profile(PROFILES["unshaped"], args.in_netns)
        registry.stop()
        shutil.rmtree(reg_dir, ignore_errors=True)  # the images stay in the build cache
    print()
    print(sizes_table(sizes))
    print()
    print(table(results))
    for m in missing:
        print(f"mode {m.name}: not yet available: needs {m.missing}")
    mode_doc = {m.name: {"measures": m.measures, "available": m.available, "missing": m.missing or None}
                for m in modes_mod.MODES if m.name in args.mode_names}
    images = {n: image_figures(i) for n, i in built.items()}
    for name, fmt, size in sizes:
        images[name].setdefault("registry", {})[fmt] = {"ref": refs[(name, fmt)], "registry_size": size}
    for name, convs in converted.items():
        for c in convs:
            images[name]["registry"][c.fmt]["convert_seconds"] = round(c.convert_seconds, 1)
    write_json(args.output, results, images, mode_doc)
    print(f"wrote {args.output}")
    return 0


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        raise UsageError("the startup benchmark needs root (debootstrap, chroot, namespaces)")
    builder = ImageBuilder(args.cache)
    built = {name: builder.build(name) for name in args.image_names}
    formats = [f for f in FORMATS if f in args.mode_names]
    conv_root = os.path.join(builder.dir, "converted")
    converted = {name: [convert(image, fmt, conv_root) for fmt in formats] for name, image in built.items()}
    if args.build_only:
        return 0
    if any(p.shaped for p in args.profiles) and not args.in_netns:
        ns = Namespace(f"obd-bench-{os.getpid()}")
        try:
            print(f"measuring inside network namespace {ns.name}", flush=True)
            return ns.run([sys.executable, "-m", "benchmarks.startup", *argv, "--in-netns", ns.name], cwd=REPO_ROOT)
        finally:
            ns.delete()
    return measure(args, built, converted)


def run() -> None:
    try:
        sys.exit(main(sys.argv[1:]))
    except ObdError as e:
        print(f"startup: {e}", file=sys.stderr)
        sys.exit(e.exit_code)


if __name__ == "__main__":
    run()
