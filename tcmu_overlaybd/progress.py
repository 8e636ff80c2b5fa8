"""Progress bars for things a person waits on (downloads, uploads, prefetch).

``progress_bar(total, desc, quiet)`` is a context manager yielding an object
with ``update(n)``.  A tqdm bar is drawn on stderr only when stderr is a TTY and
``quiet`` is false; otherwise the returned object only counts, so callers never
branch on whether a bar is visible.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator


class _Counter:
    """The invisible bar: keeps the count so callers and tests can read ``n``."""

    def __init__(self, total: int | None):
        self.total = total
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n


def bars_visible(quiet: bool, stream=None) -> bool:
    """True when a bar would be drawn: not quiet and the stream is a terminal."""
    stream = sys.stderr if stream is None else stream
    if quiet:
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, quiet: bool = False, unit: str = "B") -> Iterator:
    """A byte-counting bar (``unit="B"`` scales to KiB/MiB) that is silent off-TTY or when quiet."""
    if not bars_visible(quiet):
        yield _Counter(total)
        return
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
               file=sys.stderr, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()
