"""API keys: bearer-token authentication, per-model authorization, and the keys file.

Only sha256 hashes of secrets are stored; a secret is shown once, when it is created, and is
never logged or put into an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator

from deployments.errors import ApiError

logger = logging.getLogger(__name__)

SECRET_PREFIX = "sk-awq-"
ENV_KEY_PREFIX = "env-"
_KEY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class AuthError(ApiError):
    """401 (bad or missing key) or 403 (key not allowed for this model)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(status, message, code=code)


class KeysFileError(ValueError):
    """The keys file cannot be read or does not allow the requested change."""


def hash_key(secret: str) -> str:
    """The stored form of a secret: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ApiKeyRecord(BaseModel):
    """One key as stored: its id, the hash of its secret, and what it may do."""

    key_id: str = Field(description="Public name of the key; appears in logs and audit lines.")
    key_hash: str = Field(description="`sha256:<hex>` of the secret; the secret is never stored.")
    allowed_models: list[str] | None = Field(
        default=None, description="Model names this key may call; None = all models."
    )
    requests_per_minute: int | None = Field(
        default=None, gt=0, description="This key's request limit; None = the configured default."
    )
    tokens_per_minute: int | None = Field(
        default=None, gt=0, description="This key's token limit; None = the configured default."
    )
    revoked: bool = Field(default=False, description="A revoked key is refused with 401.")
    created_at: str = Field(default_factory=_utc_now_iso, description="ISO 8601 UTC time.")

    @field_validator("key_id")
    @classmethod
    def _key_id_is_simple(cls, key_id: str) -> str:
        if not _KEY_ID.match(key_id):
            raise ValueError(
                f"key_id {key_id!r} must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        return key_id

    @field_validator("key_hash")
    @classmethod
    def _hash_is_sha256(cls, key_hash: str) -> str:
        # The message must not echo the value: a raw secret pasted here would leak into logs.
        if not _KEY_HASH.match(key_hash):
            raise ValueError("key_hash must be 'sha256:' followed by 64 lowercase hex digits")
        return key_hash

    def allows(self, model: str) -> bool:
        """Whether this key may call `model`."""
        return self.allowed_models is None or model in self.allowed_models


_RECORDS = TypeAdapter(list[ApiKeyRecord])


class AuthConfig(BaseModel):
    """Whether the router requires API keys, and where the keys come from."""

    enabled: bool = Field(
        default=False, description="Require `Authorization: Bearer <key>` on non-public paths."
    )
    keys_file: Path | None = Field(
        default=None,
        description="JSON list of key records (hashes only), managed by `awq-serve keys`; "
        "re-read when it changes, so revocations apply without a redeploy.",
    )
    env_var: str = Field(
        default="AWQ_SERVE_API_KEYS",
        pattern=r"^[A-Z_][A-Z0-9_]*$",
        description="Environment variable holding comma-separated raw keys (e.g. from a "
        "secret); each becomes key id env-<n> with access to all models.",
    )
    public_paths: list[str] = Field(
        default_factory=lambda: ["/health", "/metrics"],
        description="Paths served without a key.",
    )

    @field_validator("public_paths")
    @classmethod
    def _paths_are_absolute(cls, paths: list[str]) -> list[str]:
        bad = [p for p in paths if not p.startswith("/")]
        if bad:
            raise ValueError(f"public_paths must start with '/'; got {bad}")
        return paths


def _describe(exc: ValidationError) -> str:
    """Validation errors without the input values, which might hold a pasted secret."""
    return "; ".join(
        f"{'.'.join(str(part) for part in err['loc']) or 'file'}: {err['msg']}"
        for err in exc.errors(include_input=False, include_url=False)
    )


def read_keys_file(keys_file: Path) -> list[ApiKeyRecord]:
    """Records from a keys file; a missing file has none."""
    if not keys_file.exists():
        return []
    try:
        return _RECORDS.validate_json(keys_file.read_bytes())
    except ValidationError as exc:
        raise KeysFileError(
            f"keys file {keys_file} is not a valid list of key records: {_describe(exc)}"
        ) from None


def env_records(raw: str) -> list[ApiKeyRecord]:
    """Records for comma-separated raw keys, ids env-1, env-2, ... in order."""
    secrets_ = [s.strip() for s in raw.split(",") if s.strip()]
    return [
        ApiKeyRecord(key_id=f"{ENV_KEY_PREFIX}{n}", key_hash=hash_key(secret))
        for n, secret in enumerate(secrets_, start=1)
    ]


def _write_keys_file(keys_file: Path, records: list[ApiKeyRecord]) -> None:
    """Replace the file atomically, so the router never reads a half-written one."""
    keys_file.parent.mkdir(parents=True, exist_ok=True)
    payload = json.dumps([r.model_dump(mode="json") for r in records], indent=2) + "\n"
    fd, tmp = tempfile.mkstemp(dir=keys_file.parent, prefix=f".{keys_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, keys_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def create_key(
    keys_file: Path,
    key_id: str,
    allowed_models: list[str] | None = None,
    rpm: int | None = None,
    tpm: int | None = None,
) -> str:
    """Add a key to `keys_file` and return its secret, which is stored only as a hash."""
    if key_id.startswith(ENV_KEY_PREFIX):
        raise KeysFileError(f"key ids starting with {ENV_KEY_PREFIX!r} are reserved for env keys")
    records = read_keys_file(keys_file)
    if any(r.key_id == key_id for r in records):
        raise KeysFileError(
            f"key id {key_id!r} already exists in {keys_file}; pick another or revoke it first"
        )
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    try:
        record = ApiKeyRecord(
            key_id=key_id,
            key_hash=hash_key(secret),
            allowed_models=allowed_models,
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
        )
    except ValidationError as exc:
        raise KeysFileError(f"cannot create key {key_id!r}: {_describe(exc)}") from None
    _write_keys_file(keys_file, [*records, record])
    return secret


def list_keys(keys_file: Path) -> list[ApiKeyRecord]:
    """All records in the keys file, revoked ones included."""
    return read_keys_file(keys_file)


def revoke_key(keys_file: Path, key_id: str) -> None:
    """Mark a key revoked (kept for the audit trail); the router refuses it from then on."""
    records = read_keys_file(keys_file)
    if not any(r.key_id == key_id for r in records):
        known = ", ".join(r.key_id for r in records) or "none"
        raise KeysFileError(f"no key {key_id!r} in {keys_file}; known key ids: {known}")
    _write_keys_file(
        keys_file,
        [r.model_copy(update={"revoked": True}) if r.key_id == key_id else r for r in records],
    )


def _file_stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


class KeyStore:
    """The keys the router accepts: from the keys file and the env var, by hash."""

    def __init__(self, config: AuthConfig, env_keys: list[ApiKeyRecord]) -> None:
        self.config = config
        self._env_keys = env_keys
        self._stamp = _file_stamp(config.keys_file)
        self._records = self._load()

    @classmethod
    def from_config(cls, config: AuthConfig, environ: Mapping[str, str] | None = None) -> KeyStore:
        """Load keys; fail at deploy time if auth is on and there is no key at all."""
        env = os.environ if environ is None else environ
        store = cls(config, env_records(env.get(config.env_var, "")))
        if config.enabled and not store.records:
            raise KeysFileError(
                f"auth is enabled but no API keys were found in keys_file={config.keys_file} "
                f"or ${config.env_var}; create one with `awq-serve keys create`"
            )
        return store

    def _load(self) -> list[ApiKeyRecord]:
        file_keys = read_keys_file(self.config.keys_file) if self.config.keys_file else []
        ids = [r.key_id for r in file_keys + self._env_keys]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise KeysFileError(f"duplicate key ids {dupes} in {self.config.keys_file}")
        return file_keys + self._env_keys

    @property
    def records(self) -> list[ApiKeyRecord]:
        """Current records, revoked ones included."""
        return list(self._records)

    def refresh(self) -> None:
        """Re-read the keys file if it changed; keep the old keys if the new file is bad."""
        stamp = _file_stamp(self.config.keys_file)
        if stamp == self._stamp:
            return
        try:
            self._records = self._load()
        except KeysFileError as exc:
            logger.warning("keeping previous API keys: %s", exc)
        self._stamp = stamp

    def requires_auth(self, path: str) -> bool:
        """Whether a request to `path` must carry a key."""
        return self.config.enabled and path not in self.config.public_paths

    def authenticate(self, authorization_header: str | None) -> ApiKeyRecord:
        """The record for a `Bearer <key>` header, or AuthError 401."""
        scheme, _, token = (authorization_header or "").strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError(
                401,
                "Missing API key. Send it as 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
            )
        self.refresh()
        presented = hash_key(token).encode()
        match: ApiKeyRecord | None = None
        # Compare against every record without stopping early: timing says nothing about keys.
        for record in self._records:
            if hmac.compare_digest(presented, record.key_hash.encode()):
                match = record
        if match is None:
            raise AuthError(401, "Incorrect API key provided.", code="invalid_api_key")
        if match.revoked:
            raise AuthError(
                401, f"API key {match.key_id!r} has been revoked.", code="invalid_api_key"
            )
        return match

    def authorize(self, record: ApiKeyRecord, model: str) -> None:
        """Raise AuthError 403 unless `record` may call `model`."""
        if not record.allows(model):
            raise AuthError(
                403,
                f"API key {record.key_id!r} is not allowed to use model {model!r}.",
                code="model_not_allowed",
            )
