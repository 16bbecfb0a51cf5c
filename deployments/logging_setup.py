"""Structured logs: one JSON object per line on stderr, carrying the request id.

Why not Serve's `logging_config` (ray/serve/schema.py `LoggingConfig(encoding="JSON")`): it only
configures the `ray.serve` logger, writes its JSON to files under the Serve log directory (stderr
stays text), and takes the request id from Serve's request context, which the engine thread and
our `awq_serve.*` loggers do not run in. So the `awq_serve` logger gets its own JSON handler; the
request id comes from `extra={"request_id": ...}` (the router puts it in every body it sends to a
replica), falling back to Serve's request context. Ray forwards worker stderr to the driver
(`serve run`'s console) and to `worker-*.err` files in the session's log directory.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

LOGGER = "awq_serve"
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _serve_request_id() -> str | None:
    try:
        from ray.serve.context import _get_serve_request_context

        return _get_serve_request_context().request_id or None
    except Exception:  # outside Serve (CLI, tests, engine thread): no context
        return None


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", "request_id"?, ...extra}` as one line of JSON."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        # Private attributes (Ray's `_ray_timestamp_ns`) are plumbing, not log fields.
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k[0] != "_"}
        request_id = extra.pop("request_id", None) or _serve_request_id()
        if request_id:
            out["request_id"] = request_id
        out.update(extra)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def parse_level(level: str | None) -> int:
    """`LOG_LEVEL`-style name (any case) to a logging level; a clear error for a typo."""
    name = (level or os.environ.get("LOG_LEVEL") or "INFO").upper()
    levels = logging.getLevelNamesMapping()
    if name not in levels:
        raise ValueError(f"unknown log level '{level}'; use one of DEBUG, INFO, WARNING, ERROR")
    return levels[name]


def configure_logging(level: str | None = None, stream: Any = None) -> logging.Logger:
    """Send `awq_serve.*` logs as JSON lines to stderr at `level` (default: LOG_LEVEL, or INFO).

    Idempotent: a second call replaces the handler, so a process hosting several components (or
    a test) never prints a line twice. Does not propagate, so Ray's root handlers add nothing.
    """
    logger = logging.getLogger(LOGGER)
    logger.setLevel(parse_level(level))
    for h in [h for h in logger.handlers if getattr(h, "_awq_serve", False)]:
        logger.removeHandler(h)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler._awq_serve = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False
    return logger
