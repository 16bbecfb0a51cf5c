"""Audit log: one JSON line per request, size-rotated; never keys, text only when enabled."""

from __future__ import annotations

import itertools
import logging
import logging.handlers
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

_instances = itertools.count()
# Identifiers in a line (request id, model, ...) are client-supplied and capped at this many
# characters, so one request cannot write megabytes into the audit log.
MAX_FIELD_CHARS = 256
FILE_MODE = 0o600  # audit lines name clients and keys: owner only


def cap_text(value: str, limit: int) -> str:
    """`value` safe to write: at most `limit` characters plus a marker saying how many were cut.

    Lone surrogates (a JSON body may hold `"\\ud800"`) cannot be encoded as UTF-8 and would
    make the JSON line fail to serialise; they are written as their `\\udXXX` escape instead.
    """
    value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) > limit:
        value = f"{value[:limit]}...[truncated {len(value) - limit} chars]"
    return value


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
    max_text_chars: int = Field(
        default=4096,
        ge=1,
        description="With log_prompts: prompt and completion are cut to this many characters.",
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

    @field_validator("request_id", "key_id", "client_ip", "model", "variant", "endpoint")
    @classmethod
    def _cap_identifier(cls, value: str | None) -> str | None:
        return None if value is None else cap_text(value, MAX_FIELD_CHARS)


class _PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A rotating handler whose files are created 0600, and an existing file tightened to it.

    The stock handler opens with `open()`, i.e. 0666 minus the umask (usually world-readable);
    creating with the mode avoids any window where the file is readable by others.
    """

    def _open(self) -> IO[Any]:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # a file that already existed keeps its mode on open
            return open(fd, self.mode, encoding=self.encoding, errors=self.errors)
        except BaseException:
            os.close(fd)
            raise


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
            handler = _PrivateRotatingFileHandler(
                config.path,
                maxBytes=config.max_bytes,
                backupCount=config.backup_count,
                encoding="utf-8",
            )
            handler.setFormatter(logging.Formatter("%(message)s"))
            self._logger.addHandler(handler)
            self._handler = handler

    def line(self, record: AuditRecord) -> str:
        """The JSON line for `record`; text only with `log_prompts`, and then capped."""
        if not self.config.log_prompts:
            return record.model_dump_json(exclude={"prompt", "completion"})
        limit = self.config.max_text_chars
        text = {
            name: None if value is None else cap_text(value, limit)
            for name, value in (("prompt", record.prompt), ("completion", record.completion))
        }
        return record.model_copy(update=text).model_dump_json()

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
