"""Audit log: one JSON line per request, size-rotated; never keys, text only when enabled."""

from __future__ import annotations

import itertools
import logging
import logging.handlers
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

_instances = itertools.count()


def utc_now_iso() -> str:
    """Current UTC time as ISO 8601 with milliseconds."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class AuditConfig(BaseModel):
    """Where and how the router writes its audit log."""

    enabled: bool = Field(default=True, description="Write one audit line per request.")
    path: Path = Field(
        default=Path("logs/audit.jsonl"),
        description="JSON-lines file; its folder is created if missing.",
    )
    max_bytes: int = Field(
        default=10_000_000, gt=0, description="Rotate the file when it would exceed this size."
    )
    backup_count: int = Field(
        default=5,
        ge=1,
        description="Rotated files kept (audit.jsonl.1 ... .N); at least 1, since the "
        "rotating handler never rotates with 0.",
    )
    log_prompts: bool = Field(
        default=False,
        description="Also record prompt and completion text. Off by default: text may hold "
        "personal data.",
    )


class AuditRecord(BaseModel):
    """What is known about one finished request; `prompt`/`completion` only if enabled."""

    model_config = ConfigDict(extra="forbid")

    time: str = Field(default_factory=utc_now_iso, description="ISO 8601 UTC time.")
    request_id: str
    key_id: str | None = None
    client_ip: str | None = None
    model: str | None = None
    variant: str | None = None
    endpoint: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float
    prompt: str | None = None
    completion: str | None = None


class AuditLog:
    """Thread-safe JSON-lines writer; the rotating handler serialises writes under its lock."""

    def __init__(self, config: AuditConfig) -> None:
        self.config = config
        self._handler: logging.Handler | None = None
        # A private logger, not from the global registry: nothing propagates to root handlers.
        self._logger = logging.Logger(f"awq_serve.audit.{next(_instances)}", logging.INFO)
        self._logger.propagate = False
        if config.enabled:
            config.path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.RotatingFileHandler(
                config.path,
                maxBytes=config.max_bytes,
                backupCount=config.backup_count,
                encoding="utf-8",
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(handler)
            self._handler = handler

    def line(self, record: AuditRecord) -> str:
        """The JSON line for `record`, text fields dropped unless `log_prompts` is on."""
        exclude = None if self.config.log_prompts else {"prompt", "completion"}
        return record.model_dump_json(exclude=exclude)

    def write(self, record: AuditRecord) -> None:
        """Append one line; a no-op when the audit log is disabled."""
        if self._handler is not None:
            self._logger.info(self.line(record))

    def close(self) -> None:
        """Flush and close the file."""
        if self._handler is not None:
            self._logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
