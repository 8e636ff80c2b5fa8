"""One measured cold start, whatever the mode (the rows of the table and of the JSON file)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ColdStart:
    """One cold start: seconds from the same start, bytes as the registry's access log counted them.

    ``bytes_read`` (what the workload read from the block device) and
    ``handler_rss`` (peak RSS of the TCMU handler process, bytes) exist for the
    lazy modes only; the traditional mode has neither device nor handler.
    """

    image: str
    mode: str
    pull_s: float
    available_s: float
    bytes_fetched: int
    registry_size: int
    requests: int = 0
    bytes_read: int | None = None
    handler_rss: int | None = None
    details: dict = field(default_factory=dict)
