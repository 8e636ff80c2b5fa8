"""Shared test fixtures: where the golden vectors live."""

from __future__ import annotations

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: shared/ sits beside the checkout (CI clones main with shared/ next to it)
SHARED = pathlib.Path(os.environ.get("OBD_SHARED", ROOT.parent / "shared"))
VECTORS = SHARED / "spec" / "vectors"


@pytest.fixture(scope="session")
def vectors() -> pathlib.Path:
    if not VECTORS.is_dir():
        pytest.fail(f"golden vectors not found at {VECTORS} (set OBD_SHARED)")
    return VECTORS
