"""Prefetch for cold starts (issue 6, spec §7, §8.4).

``record``: trace recording in the handler; ``replay``: fetching a trace's or a
prefetch list's ranges up front; ``background``: the rate-capped download of
whole blobs; ``session``: what a handler starts and stops (and the counters
``obd stats`` reads).
"""
