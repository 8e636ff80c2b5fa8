"""Logging: structured lines with a per-mount id, and secrets that never reach a log.

Every record is formatted as ``time level logger [mount=<id>] message key=value ...``
(or one JSON object per line with ``json=True``).  A filter on the root handler
scrubs credentials from every record: the values registered with
``register_secret`` (passwords, tokens, as soon as they are loaded) and anything
shaped like an ``Authorization`` header, a ``password=``/``token=`` pair or
basic-auth userinfo in a URL.
"""

from __future__ import annotations

import json
import logging
import re
import threading

REDACTED = "***"

_SENSITIVE_KEYS = re.compile(r"(?i)pass|secret|token|auth|credential|cookie")

_secrets: set[str] = set()
_secrets_lock = threading.Lock()

_PATTERNS = (
    # Authorization: Bearer xxx / Basic xxx (headers, reprs of header dicts)
    (re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:bearer|basic)\s+)[^\s'\",}]+"), r"\1" + REDACTED),
    # password=..., "password": "...", token=..., access_token, refresh_token, auth
    (
        re.compile(r"(?i)(\b(?:password|passwd|secret|token|access_token|refresh_token|auth)['\"]?\s*[:=]\s*['\"]?)"
                   r"[^\s'\",}&]+"),
        r"\1" + REDACTED,
    ),
    # scheme://user:pass@host
    (re.compile(r"(\w+://[^/\s:@]+:)[^@\s/]+@"), r"\1" + REDACTED + "@"),
)


def register_secret(value: str | None) -> None:
    """Make sure ``value`` is replaced by *** wherever it would be logged."""
    if value and len(value) >= 3:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with every known secret and credential-shaped substring replaced."""
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for s in secrets:
        if s in text:
            text = text.replace(s, REDACTED)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """Renders each record's message once, scrubbed, so no handler sees the raw args."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # a bad format string must not hide the record
            msg = str(record.msg)
        record.msg = redact(msg)
        record.args = None
        fields = getattr(record, "fields", None)
        if fields:
            record.fields = {
                k: REDACTED if _SENSITIVE_KEYS.search(k) else redact(str(v)) for k, v in fields.items()
            }
        return True


class _MountContext(logging.Filter):
    def __init__(self, mount_id: str | None):
        super().__init__()
        self.mount_id = mount_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "mount"):
            record.mount = self.mount_id
        return True


class StructuredFormatter(logging.Formatter):
    def __init__(self, as_json: bool = False):
        super().__init__()
        self.as_json = as_json

    def format(self, record: logging.LogRecord) -> str:
        fields = dict(getattr(record, "fields", None) or {})
        ts = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
        if self.as_json:
            doc = {"time": ts, "level": record.levelname.lower(), "logger": record.name,
                   "msg": record.getMessage()}
            if getattr(record, "mount", None):
                doc["mount"] = record.mount
            doc.update(fields)
            if record.exc_info:
                doc["exc"] = redact(self.formatException(record.exc_info))
            return json.dumps(doc, sort_keys=False)
        parts = [ts, record.levelname.lower(), record.name]
        if getattr(record, "mount", None):
            parts.append(f"[mount={record.mount}]")
        parts.append(record.getMessage())
        parts.extend(f"{k}={v}" for k, v in fields.items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def setup_logging(level: str | int = "warning", file: str | None = None, *,
                  mount_id: str | None = None, as_json: bool = False) -> logging.Handler:
    """Configure the root logger once for this process; returns the handler."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.WARNING)
    if file:
        handler: logging.Handler = logging.FileHandler(file, encoding="utf-8")
    else:
        handler = logging.StreamHandler()
    handler.setFormatter(StructuredFormatter(as_json))
    handler.addFilter(RedactingFilter())
    handler.addFilter(_MountContext(mount_id))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def log_fields(**fields) -> dict:
    """``logger.info("msg", extra=log_fields(blob=d, offset=o))`` adds key=value pairs."""
    return {"fields": fields}
