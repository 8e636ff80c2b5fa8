"""The benchmark's images, built from Debian packages the way a Dockerfile would build them.

One root directory goes through a chain of stages, each of which becomes a layer:

=============  ===========================================================  ==================
stage          what runs                                                    like a Dockerfile
=============  ===========================================================  ==================
``base``       ``debootstrap --variant=minbase bookworm`` + ``apt-get clean``  ``FROM debian``
``python``     ``apt-get install python3-flask`` (then lists and debs removed)  ``RUN apt-get ...``
``scientific`` numpy, scipy, pandas, matplotlib, scikit-learn, ... likewise    ``RUN apt-get ...``
=============  ===========================================================  ==================

Each image is a prefix of that chain plus an app layer (``/app/app.py``, a Flask
app answering ``GET /`` with ``ok`` on ``$PORT``), so the two images share their
first layers as real images do.  Layers are diffs between snapshots of the root
taken after each stage (``layers.diff``), written deterministically.

Everything lives under ``<cache>/chain-<key>/`` where the key hashes the builder
version, the suite, the mirror and every stage's package list: ``rootfs/`` (the
tree, left at the last stage built), ``snap-<stage>.json.gz``, ``stages.json``
(the layers built so far) and ``layout/`` (the OCI layout, one tag per image).
A later run reuses every stage already built and only extends the chain.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from tcmu_overlaybd.errors import NotFoundError, ObdError, UsageError

from .layers import DEFAULT_MTIME_CLAMP, LayerBlob, diff, load_snapshot, save_snapshot, snapshot, write_layer
from .oci import ImageConfig, blob_path, write_image

#: bump when a change to this module changes the bytes of the layers it writes
BUILDER_VERSION = "1"
SUITE = "bookworm"
DEFAULT_CACHE = "/var/cache/obd-bench"
#: recorded but not descended into by snapshots: a container engine provides these
SKIP_CONTENTS = ("dev", "proc", "sys")
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
APP_PORT = 8080


@dataclass(frozen=True)
class Stage:
    """One step of the chain: ``packages`` installed with apt (``base`` is debootstrap itself)."""

    name: str
    packages: tuple[str, ...] = ()

    @property
    def history(self) -> str:
        if not self.packages:
            return f"debootstrap --variant=minbase {SUITE}"
        return ("RUN apt-get update && apt-get install -y --no-install-recommends "
                f"{' '.join(self.packages)} && apt-get clean && rm -rf /var/lib/apt/lists/*")


STAGES = (
    Stage("base"),
    Stage("python", ("python3-flask",)),
    Stage("scientific", ("python3-numpy", "python3-scipy", "python3-pandas", "python3-matplotlib",
                         "python3-sklearn", "python3-skimage", "python3-statsmodels", "python3-sympy",
                         "python3-numba")),
)

SMALL_APP = '''\
"""python-small: a Flask app that answers GET / with "ok"."""
import os

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "ok"


if __name__ == "__main__":
    app.run(host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ["PORT"]))
'''

LARGE_APP = '''\
"""python-large: a Flask app that loads a scientific stack before it answers GET / with "ok"."""
import os

import matplotlib
import numpy as np
import pandas as pd
import scipy.optimize
import scipy.stats
import skimage.filters
import sklearn.ensemble
import statsmodels.api as sm
import sympy
from flask import Flask

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# touch each library once, as a real service warming its models would
rng = np.random.default_rng(0)
x = rng.normal(size=(200, 4))
y = (x[:, 0] + x[:, 1] > 0).astype(int)
model = sklearn.ensemble.RandomForestClassifier(n_estimators=5, random_state=0).fit(x, y)
frame = pd.DataFrame(x, columns=list("abcd")).describe()
fit = sm.OLS(x[:, 0], sm.add_constant(x[:, 1:])).fit()
edges = skimage.filters.sobel(rng.random((32, 32)))
root = scipy.optimize.brentq(lambda v: v * v - 2, 0, 2)
p = scipy.stats.norm.cdf(1.0)
expr = sympy.diff(sympy.sin(sympy.Symbol("t")) ** 2)
plt.figure().gca().plot(x[:, 0])

app = Flask(__name__)


@app.get("/")
def index():
    return "ok"


if __name__ == "__main__":
    app.run(host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ["PORT"]))
'''


@dataclass(frozen=True)
class ImageSpec:
    """An image: the first ``depth`` stages of the chain plus an app layer."""

    name: str
    depth: int
    app_source: str
    extra_env: tuple[str, ...] = ()

    def config(self, stages: tuple[Stage, ...]) -> ImageConfig:
        env = [f"PATH={CHROOT_PATH}", f"PORT={APP_PORT}", "PYTHONUNBUFFERED=1", *self.extra_env]
        history = [s.history for s in stages[: self.depth]] + ["COPY app.py /app/app.py"]
        return ImageConfig(cmd=["python3", "/app/app.py"], env=env, working_dir="/app",
                           exposed_port=APP_PORT, history=history)


IMAGES = {
    "python-small": ImageSpec("python-small", 2, SMALL_APP),
    "python-large": ImageSpec("python-large", 3, LARGE_APP, ("MPLBACKEND=Agg",)),
}


@dataclass
class BuiltImage:
    """An image in an OCI layout, with the figures the benchmark prints."""

    name: str
    layout: str
    tag: str
    manifest_digest: str
    layers: list[LayerBlob]
    build_seconds: float = 0.0

    @property
    def ref(self) -> str:
        return f"oci:{self.layout}:{self.tag}"

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def uncompressed_size(self) -> int:
        return sum(layer.tar_size for layer in self.layers)


def debian_mirror(apt_dir: str = "/etc/apt") -> str:
    """The Debian mirror this machine's apt uses for ``SUITE`` (sources.list and deb822 .sources)."""
    candidates = [os.path.join(apt_dir, "sources.list")]
    candidates += sorted(glob.glob(os.path.join(apt_dir, "sources.list.d", "*.list")))
    candidates += sorted(glob.glob(os.path.join(apt_dir, "sources.list.d", "*.sources")))
    for path in candidates:
        try:
            with open(path) as f:
                text = f.read()
        except OSError:
            continue
        found = _mirror_in(text, deb822=path.endswith(".sources"))
        if found:
            return found
    raise NotFoundError(f"no apt source for Debian {SUITE} under {apt_dir} (debootstrap needs a mirror)")


def _mirror_in(text: str, deb822: bool) -> str | None:
    if deb822:
        for para in text.split("\n\n"):
            fields = {}
            for line in para.splitlines():
                if line and not line.startswith(("#", " ")) and ":" in line:
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.split()
            if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []) and \
                    fields.get("enabled", ["yes"])[0] != "no":
                return fields.get("uris", [None])[0]
        return None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words and words[0] == "deb":
            words = [w for w in words[1:] if not w.startswith("[")]
            if len(words) >= 2 and words[1] == SUITE:
                return words[0]
    return None


def chain_key(stages: tuple[Stage, ...], mirror: str) -> str:
    doc = {"builder": BUILDER_VERSION, "suite": SUITE, "mirror": mirror,
           "stages": [[s.name, list(s.packages)] for s in stages]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


class ImageBuilder:
    """Builds ``IMAGES`` under ``cache_root`` (see the module docstring); needs root."""

    def __init__(self, cache_root: str = DEFAULT_CACHE, mirror: str | None = None, out=sys.stdout):
        self.mirror = mirror or debian_mirror()
        self.key = chain_key(STAGES, self.mirror)
        self.dir = os.path.join(cache_root, f"chain-{self.key}")
        self.rootfs = os.path.join(self.dir, "rootfs")
        self.layout = os.path.join(self.dir, "layout")
        self.out = out
        self._stages_file = os.path.join(self.dir, "stages.json")
        self._busy_file = os.path.join(self.dir, "stage-in-progress")

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- the chain -----------------------------------------------------------------------------

    def built_stages(self) -> dict[str, LayerBlob]:
        try:
            with open(self._stages_file) as f:
                return {name: LayerBlob(**blob) for name, blob in json.load(f).items()}
        except FileNotFoundError:
            return {}

    def _record(self, done: dict[str, LayerBlob]) -> None:
        with open(self._stages_file + ".part", "w") as f:
            json.dump({name: blob.to_json() for name, blob in done.items()}, f, indent=1)
        os.replace(self._stages_file + ".part", self._stages_file)

    def ensure_stages(self, depth: int) -> list[LayerBlob]:
        """The layers of the first ``depth`` stages, building those not in the cache."""
        if os.path.exists(self._busy_file):
            self.say(f"build cache {self.dir}: a stage was interrupted; starting the chain again")
            shutil.rmtree(self.dir)
        os.makedirs(os.path.join(self.layout, "blobs", "sha256"), exist_ok=True)
        done = self.built_stages()
        for i, stage in enumerate(STAGES[:depth]):
            if stage.name in done:
                continue
            open(self._busy_file, "w").close()
            t0 = time.monotonic()
            self.say(f"building stage {stage.name}: {stage.history}")
            lower = load_snapshot(self._snap(STAGES[i - 1])) if i else {}
            self._run_stage(stage)
            upper = snapshot(self.rootfs, SKIP_CONTENTS)
            change = diff(lower, upper)
            blob = self._write(self.rootfs, change.changed, change.removed)
            save_snapshot(upper, self._snap(stage))
            done[stage.name] = blob
            self._record(done)
            os.unlink(self._busy_file)
            self.say(f"  stage {stage.name}: {len(change.changed)} entries, {len(change.removed)} whiteouts, "
                     f"{_mb(blob.tar_size)} tar, {_mb(blob.size)} gzip, {time.monotonic() - t0:.0f} s")
        return [done[s.name] for s in STAGES[:depth]]

    def _snap(self, stage: Stage) -> str:
        return os.path.join(self.dir, f"snap-{stage.name}.json.gz")

    def _write(self, root: str, paths: list[str], whiteouts: list[str]) -> LayerBlob:
        tmp = os.path.join(self.layout, "blobs", "sha256", "layer.tmp")
        blob = write_layer(root, paths, whiteouts, tmp)
        os.replace(tmp, blob_path(self.layout, blob.digest))
        return blob

    def _run_stage(self, stage: Stage) -> None:
        log = os.path.join(self.dir, f"{stage.name}.log")
        if not stage.packages:
            if os.path.exists(self.rootfs):
                shutil.rmtree(self.rootfs)
            _logged(["debootstrap", "--variant=minbase", SUITE, self.rootfs, self.mirror], log,
                    f"debootstrap {SUITE} from {self.mirror}")
            self.in_chroot("apt-get clean", log)
            return
        pkgs = " ".join(shlex.quote(p) for p in stage.packages)
        self.in_chroot("apt-get update -qq && apt-get install -y -q --no-install-recommends "
                       f"{pkgs} && apt-get clean && rm -rf /var/lib/apt/lists/*", log)

    def in_chroot(self, script: str, log: str) -> None:
        """Run ``script`` with sh in the rootfs: private mount and PID namespaces, /proc and DNS."""
        root = shlex.quote(self.rootfs)
        inner = shlex.quote(script)
        outer = (f"mount -t proc proc {root}/proc && "
                 f"mount --bind /etc/resolv.conf {root}/etc/resolv.conf && "
                 f"exec chroot {root} /usr/bin/env -i PATH={CHROOT_PATH} DEBIAN_FRONTEND=noninteractive "
                 f"LC_ALL=C.UTF-8 /bin/sh -c {inner}")
        _logged(["unshare", "--mount", "--pid", "--fork", "--kill-child", "sh", "-c", outer], log, script)

    @contextlib.contextmanager
    def locked(self):
        """Hold the chain's lock: one builder at a time per chain (others wait)."""
        os.makedirs(os.path.dirname(self.dir), exist_ok=True)
        with open(self.dir + ".lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.say(f"waiting for another build of {self.dir}")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    # -- images ----------------------------------------------------------------------------------

    def build(self, name: str) -> BuiltImage:
        """The image ``name`` (a key of ``IMAGES``) in this chain's layout, built if needed."""
        spec = IMAGES.get(name)
        if spec is None:
            raise UsageError(f"unknown benchmark image {name!r} (known: {', '.join(IMAGES)})")
        t0 = time.monotonic()
        with self.locked():
            layers = self.ensure_stages(spec.depth)
            layers.append(self.app_layer(spec))
            manifest = write_image(self.layout, spec.name, layers, spec.config(STAGES))
        image = BuiltImage(spec.name, self.layout, spec.name, manifest.digest, layers, time.monotonic() - t0)
        self.say(f"image {image.ref}: {len(layers)} layers, {_mb(image.uncompressed_size)} uncompressed, "
                 f"{_mb(image.compressed_size)} gzip ({image.build_seconds:.0f} s)")
        return image

    def app_layer(self, spec: ImageSpec) -> LayerBlob:
        """The ``/app`` layer: ``app/`` and ``app/app.py``, owned by root, mtimes at the clamp."""
        with tempfile.TemporaryDirectory(dir=self.dir) as tree:
            write_app_tree(tree, spec.app_source)
            return self._write(tree, ["app", "app/app.py"], [])


def write_app_tree(tree: str, source: str) -> None:
    """``app/app.py`` under ``tree`` with fixed owner, modes and mtimes (a reproducible COPY)."""
    app_dir = os.path.join(tree, "app")
    os.makedirs(app_dir, exist_ok=True)
    path = os.path.join(app_dir, "app.py")
    with open(path, "w") as f:
        f.write(source)
    for p, mode in ((path, 0o644), (app_dir, 0o755)):
        os.chmod(p, mode)
        if os.geteuid() == 0:
            os.chown(p, 0, 0)
        os.utime(p, (DEFAULT_MTIME_CLAMP, DEFAULT_MTIME_CLAMP))


def _logged(cmd: list[str], log: str, what: str) -> None:
    with open(log, "ab") as f:
        f.write(f"$ {shlex.join(cmd)}\n".encode())
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        except FileNotFoundError:
            raise NotFoundError(f"{cmd[0]}: not installed (scripts/install-deps installs it)") from None
    if rc != 0:
        raise ObdError(f"{what}: exit status {rc} (log: {log})")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"
