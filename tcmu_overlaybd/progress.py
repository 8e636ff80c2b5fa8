"""Progress bars for things a person waits on (downloads, uploads, prefetch).

``progress_bar(total, desc, quiet)`` is a context manager yielding an object
with ``update(n)``.  A tqdm bar is drawn on stderr only when stderr is a TTY and
``quiet`` is false; otherwise the returned object only counts, so callers never
branch on whether a bar is visible.
"""

from __future__ import annotations

import contextlib
import os
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


def _terminal_columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


@contextlib.contextmanager
def progress_bar(total: int | None, desc: str, quiet: bool = False, unit: str = "B") -> Iterator:
    """A byte-counting bar (``unit="B"`` scales to KiB/MiB) that is silent off-TTY or when quiet."""
    if not bars_visible(quiet):
        yield _Counter(total)
        return
    from tqdm import tqdm

    # a terminal that reports a 0x0 size (script(1), some CI consoles) would get no bar at all
    sized = _terminal_columns(sys.stderr) > 0
    fixed = {} if sized else {"ncols": 80, "nrows": 24}
    bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", unit_divisor=1024,
               file=sys.stderr, leave=False, dynamic_ncols=sized, **fixed)
    try:
        yield bar
    finally:
        bar.close()
