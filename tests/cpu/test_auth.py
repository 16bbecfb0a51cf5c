"""API keys: hashed storage, bearer authentication, per-model authorization, the keys file."""

import json
import stat

import pytest
from pydantic import ValidationError

from deployments.errors import ApiError
from deployments.gateway.auth import (
    ApiKeyRecord,
    AuthConfig,
    AuthError,
    KeysFileError,
    KeyStore,
    create_key,
    hash_key,
    list_keys,
    revoke_key,
)


@pytest.fixture
def keys_file(tmp_path):
    return tmp_path / "secrets" / "keys.json"


@pytest.fixture
def store_for(keys_file):
    def make(environ: dict[str, str] | None = None, **config) -> KeyStore:
        cfg = AuthConfig(enabled=True, keys_file=keys_file, **config)
        return KeyStore.from_config(cfg, environ=environ or {})

    return make


def bearer(secret: str) -> str:
    return f"Bearer {secret}"


def test_keys_file_stores_only_hashes(keys_file):
    secret = create_key(keys_file, "team-a", allowed_models=["smollm2"], rpm=60, tpm=1000)
    text = keys_file.read_text()
    assert secret.startswith("sk-awq-") and len(secret) > 40
    assert secret not in text
    (stored,) = json.loads(text)
    assert stored["key_hash"] == hash_key(secret)
    assert stored["allowed_models"] == ["smollm2"]
    assert (stored["requests_per_minute"], stored["tokens_per_minute"]) == (60, 1000)


def test_keys_file_is_private_and_leaves_no_temp_files(keys_file):
    create_key(keys_file, "a")
    create_key(keys_file, "b")
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o600
    assert [p.name for p in keys_file.parent.iterdir()] == ["keys.json"]
    assert [r.key_id for r in list_keys(keys_file)] == ["a", "b"]


def test_each_created_key_is_a_new_secret(keys_file):
    assert create_key(keys_file, "a") != create_key(keys_file, "b")


def test_created_key_authenticates_as_its_record(keys_file, store_for):
    secret = create_key(keys_file, "team-a", rpm=60)
    record = store_for().authenticate(bearer(secret))
    assert record.key_id == "team-a" and record.requests_per_minute == 60


def test_revoked_key_is_rejected_with_401(keys_file, store_for):
    secret = create_key(keys_file, "team-a")
    create_key(keys_file, "team-b")
    store = store_for()
    assert store.authenticate(bearer(secret)).key_id == "team-a"
    revoke_key(keys_file, "team-a")
    with pytest.raises(AuthError) as info:
        store.authenticate(bearer(secret))
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    assert [r.revoked for r in list_keys(keys_file)] == [True, False]


def test_unknown_key_is_rejected_with_401_without_echoing_it(keys_file, store_for):
    create_key(keys_file, "team-a")
    wrong = "sk-awq-not-a-real-key"
    with pytest.raises(AuthError) as info:
        store_for().authenticate(bearer(wrong))
    err = info.value
    assert isinstance(err, ApiError) and err.status == 401
    assert wrong not in json.dumps(err.body())


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer   ", "Basic abc", "sk-awq-x"])
def test_missing_or_malformed_authorization_is_rejected_with_401(keys_file, store_for, header):
    create_key(keys_file, "team-a")
    with pytest.raises(AuthError) as info:
        store_for().authenticate(header)
    assert info.value.status == 401 and "Bearer" in info.value.message


def test_key_restricted_to_models_gets_403_for_other_models(keys_file, store_for):
    secret = create_key(keys_file, "team-a", allowed_models=["smollm2"])
    store = store_for()
    record = store.authenticate(bearer(secret))
    store.authorize(record, "smollm2")
    with pytest.raises(AuthError) as info:
        store.authorize(record, "llama-8b")
    assert info.value.status == 403 and info.value.code == "model_not_allowed"


def test_env_var_keys_get_ids_env_n_and_all_models(store_for):
    store = store_for(environ={"AWQ_SERVE_API_KEYS": " first , ,second"})
    record = store.authenticate(bearer("second"))
    assert record.key_id == "env-2" and record.allowed_models is None
    store.authorize(record, "any-model")
    assert store.authenticate(bearer("first")).key_id == "env-1"


def test_enabled_auth_without_any_key_fails_at_load(store_for):
    with pytest.raises(KeysFileError, match="awq-serve keys create"):
        store_for()


def test_only_non_public_paths_require_a_key_when_enabled(keys_file, store_for):
    create_key(keys_file, "team-a")
    store = store_for()
    assert not store.requires_auth("/health") and not store.requires_auth("/metrics")
    assert store.requires_auth("/v1/chat/completions")
    off = KeyStore.from_config(AuthConfig(), environ={})
    assert not off.requires_auth("/v1/chat/completions")


def test_revoking_an_unknown_key_names_the_known_ones(keys_file):
    create_key(keys_file, "team-a")
    with pytest.raises(KeysFileError, match="team-a"):
        revoke_key(keys_file, "team-z")


@pytest.mark.parametrize("key_id", ["team-a", "env-1", "has space", ""])
def test_create_refuses_duplicate_reserved_or_malformed_key_ids(keys_file, key_id):
    create_key(keys_file, "team-a")
    with pytest.raises(KeysFileError):
        create_key(keys_file, key_id)
    assert len(list_keys(keys_file)) == 1


def test_bad_keys_file_error_never_echoes_a_pasted_secret(keys_file):
    keys_file.parent.mkdir(parents=True)
    pasted = "sk-awq-pasted-by-mistake"
    keys_file.write_text(json.dumps([{"key_id": "a", "key_hash": pasted, "created_at": "x"}]))
    with pytest.raises(KeysFileError, match="key_hash") as info:
        list_keys(keys_file)
    assert pasted not in str(info.value)


def test_broken_keys_file_on_reload_keeps_the_previous_keys(keys_file, store_for):
    secret = create_key(keys_file, "team-a")
    store = store_for()
    keys_file.write_text("{ not json")
    assert store.authenticate(bearer(secret)).key_id == "team-a"


def test_key_record_rejects_a_hash_that_is_not_sha256():
    with pytest.raises(ValidationError):
        ApiKeyRecord(key_id="a", key_hash="plain-secret")


def test_auth_config_rejects_relative_public_paths():
    with pytest.raises(ValidationError, match="public_paths"):
        AuthConfig(public_paths=["health"])
