"""A diagnostic stack sampler for the handler: where its threads spend their time, at low cost.

``OBD_SAMPLE_STACKS=FILE`` in the environment of ``obd mount`` makes the handler
look at every thread's Python stack every ``INTERVAL_S`` (0.1 s) (``sys._current_frames``)
and, when it stops, write FILE (JSON): per thread group (thread name without its
number) the number of samples and the most frequent innermost frames, plus the
most frequent innermost frames of all threads together.  A thread blocked in a
system call or in C code shows at the Python line that called it, so waits
(``select``, ``Condition.wait``) appear too and read as idle.  Meant for the
startup benchmark under TCG, where a profiler that traces every call would
change the figures it is meant to explain.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections import Counter

log = logging.getLogger(__name__)

ENV = "OBD_SAMPLE_STACKS"
INTERVAL_S = 0.1
#: innermost frames kept per sample (the call site and its callers)
DEPTH = 3
TOP = 25


def _frame_key(frame) -> tuple:
    """The innermost ``DEPTH`` frames as (code, line) pairs: cheap to hash; named only at the end."""
    key = []
    while frame is not None and len(key) < DEPTH:
        key.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
    return tuple(key)


def _name(key: tuple) -> str:
    return " < ".join(f"{code.co_name} ({os.path.basename(code.co_filename)}:{line})" for code, line in key)


class StackSampler:
    """Samples every thread but its own until ``stop``, then writes the counts to ``path``."""

    def __init__(self, path: str, interval: float = INTERVAL_S):
        self.path = path
        self.interval = interval
        self.samples = 0
        self.groups: dict[str, Counter] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="obd-sampler", daemon=True)

    @classmethod
    def from_env(cls) -> "StackSampler | None":
        path = os.environ.get(ENV)
        return cls(path).start() if path else None

    def start(self) -> "StackSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        me = threading.get_ident()
        groups: dict[int, Counter] = {}  # thread ident -> its group's counter
        while not self._stop.wait(self.interval):
            self.samples += 1
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                counter = groups.get(ident)
                if counter is None:  # a thread seen for the first time: find its group once
                    names = {t.ident: t.name for t in threading.enumerate()}
                    group = re.sub(r"[-_]?\d+$", "", names.get(ident, "?"))
                    counter = groups[ident] = self.groups.setdefault(group, Counter())
                counter[_frame_key(frame)] += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        overall: Counter = Counter()
        for c in self.groups.values():
            overall.update(c)
        doc = {"interval_s": self.interval, "samples": self.samples,
               "threads": {g: {"samples": sum(c.values()), "top": [(_name(k), n) for k, n in c.most_common(TOP)]}
                           for g, c in sorted(self.groups.items(), key=lambda kv: -sum(kv[1].values()))},
               "overall": [(_name(k), n) for k, n in overall.most_common(TOP)]}
        try:
            with open(self.path, "w") as f:
                json.dump(doc, f, indent=1)
        except OSError as e:
            log.warning("%s: cannot write the stack samples: %s", self.path, e.strerror)
