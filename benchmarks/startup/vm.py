"""Running the measuring part in the VM harness when this host's kernel has no TCMU.

The host writes the plan into the harness's results directory (the guest's
``$OBD_VM_OUT``), boots ``scripts/vm-run`` with enough memory for the registry
copy, the unpacked roots and the caches (the guest's root is a tmpfs overlay),
and the guest runs this driver with ``--plan``/``--doc`` there: it measures and
writes the raw result document back, which the host then reports.
"""

from __future__ import annotations

import json
import os
import subprocess

from tcmu_overlaybd.errors import CorruptDataError, KernelError

from .plan import Plan

#: where the results share is mounted inside the guest (scripts/vm-guest)
GUEST_OUT = "/obd-results"
#: guest scratch space: on its tmpfs overlay, never the host's files seen through 9p
GUEST_WORK = "/var/tmp/obd-bench-guest"


def in_vm() -> bool:
    return bool(os.environ.get("OBD_IN_VM"))


def have_tcmu() -> bool:
    """True if this kernel can load target_core_user and tcm_loop (the lazy modes' kernel path)."""
    return subprocess.run(["modprobe", "-a", "target_core_user", "tcm_loop"], capture_output=True).returncode == 0


def guest_memory_mb(image_names: list[str]) -> int:
    """Guest RAM: its root tmpfs (75 % of it) holds the registry copy, a traditional root and the caches."""
    return 8192 if "python-large" in image_names else 4096


def run_in_vm(repo_root: str, argv: list[str], plan: Plan, out: str, memory_mb: int,
              timeout_s: int) -> tuple[dict, str | None]:
    """Boot the harness, run ``python -m benchmarks.startup ARGV`` in it on ``plan``.

    Returns the guest's result document and None, or, when the guest failed or
    ran out of time after measuring something, the partial document and why it
    is partial.  Nothing measured at all is a KernelError.
    """
    os.makedirs(out, exist_ok=True)
    doc_path = os.path.join(out, "doc.json")
    if os.path.exists(doc_path):
        os.unlink(doc_path)
    plan.save(os.path.join(out, "plan.json"))
    python = os.path.join(repo_root, ".venv", "bin", "python")
    cmd = [os.path.join(repo_root, "scripts", "vm-run"), "--mem", str(memory_mb), "--timeout", str(timeout_s),
           "--out", out, "--", python, "-m", "benchmarks.startup", *argv,
           "--work", GUEST_WORK, "--plan", f"{GUEST_OUT}/plan.json", "--doc", f"{GUEST_OUT}/doc.json"]
    print(f"measuring in the VM harness ({memory_mb} MB, up to {timeout_s} s): results in {out}", flush=True)
    rc = subprocess.run(cmd, cwd=repo_root).returncode
    failed = None
    if rc != 0:
        why = "ran out of time" if rc == 124 else f"failed (exit status {rc})"
        failed = f"the measuring run in the VM harness {why}; console output above, guest files in {out}"
    try:
        with open(doc_path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise KernelError(failed or f"the VM harness run ended without writing {doc_path}") from None
    except json.JSONDecodeError as e:
        raise CorruptDataError(f"result document is not JSON ({e.msg})", blob=doc_path, offset=e.pos) from None
    if failed is None and not doc.get("complete"):
        failed = f"the VM harness run ended with an incomplete result document {doc_path}"
    return doc, failed
