"""Audit log: one JSON line per request, rotated by size, no keys, text only when enabled."""

import json
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError

from deployments.gateway.audit import MAX_FIELD_CHARS, AuditConfig, AuditLog, AuditRecord, cap_text

SECRET = "sk-awq-do-not-log-me"
PROMPT = "my medical history is private"
COMPLETION = "a confidential answer"


def record(**overrides) -> AuditRecord:
    fields = dict(
        request_id="req-1",
        key_id="team-a",
        client_ip="10.0.0.1",
        model="smollm2",
        variant="stable",
        endpoint="/v1/chat/completions",
        status=200,
        prompt_tokens=12,
        completion_tokens=34,
        latency_ms=56.7,
        prompt=PROMPT,
        completion=COMPLETION,
    )
    return AuditRecord(**(fields | overrides))


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def audit(tmp_path):
    def make(**config) -> AuditLog:
        log = AuditLog(AuditConfig(path=tmp_path / "logs" / "audit.jsonl", **config))
        logs.append(log)
        return log

    logs: list[AuditLog] = []
    yield make
    for log in logs:
        log.close()


def test_audit_line_never_contains_key_or_prompt(audit):
    log = audit()
    log.write(record())
    text = log.config.path.read_text()
    assert SECRET not in text and PROMPT not in text and COMPLETION not in text
    (line,) = read_lines(log.config.path)
    assert line["key_id"] == "team-a" and "prompt" not in line and "completion" not in line
    with pytest.raises(ValidationError):
        AuditRecord(**record().model_dump(), api_key=SECRET)


def test_audit_line_has_request_facts(audit):
    log = audit()
    log.write(record())
    (line,) = read_lines(log.config.path)
    assert line["request_id"] == "req-1"
    assert line["model"] == "smollm2" and line["variant"] == "stable"
    assert (line["status"], line["prompt_tokens"], line["completion_tokens"]) == (200, 12, 34)
    assert line["latency_ms"] == 56.7
    assert line["time"].endswith("+00:00")


def test_audit_records_prompts_only_when_enabled(audit):
    log = audit(log_prompts=True)
    log.write(record())
    (line,) = read_lines(log.config.path)
    assert (line["prompt"], line["completion"]) == (PROMPT, COMPLETION)


def test_audit_rotates_by_size(audit):
    log = audit(max_bytes=600, backup_count=2)
    for i in range(30):
        log.write(record(request_id=f"req-{i}"))
    path = log.config.path
    files = [path, path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2")]
    assert all(f.exists() and f.stat().st_size <= 600 for f in files)
    assert not path.with_name("audit.jsonl.3").exists()
    assert read_lines(path)[-1]["request_id"] == "req-29"


def test_audit_creates_its_parent_folder(audit, tmp_path):
    log = audit()
    assert (tmp_path / "logs").is_dir()
    log.write(record())
    assert log.config.path.exists()


def test_disabled_audit_writes_nothing(audit, tmp_path):
    log = audit(enabled=False)
    log.write(record())
    assert not (tmp_path / "logs").exists()


def test_concurrent_writes_give_whole_lines(audit):
    log = audit()

    def write_many(thread: int) -> None:
        for i in range(50):
            log.write(record(request_id=f"t{thread}-{i}"))

    threads = [threading.Thread(target=write_many, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = {line["request_id"] for line in read_lines(log.config.path)}
    assert len(ids) == 200


@pytest.mark.parametrize("bad", [{"max_bytes": 0}, {"backup_count": 0}])
def test_audit_config_rejects_settings_that_would_never_rotate(bad):
    with pytest.raises(ValidationError):
        AuditConfig(**bad)


def test_audit_file_is_created_owner_only(audit):
    log = audit()
    log.write(record())
    assert log.config.path.stat().st_mode & 0o777 == 0o600


def test_an_existing_world_readable_audit_file_is_tightened(tmp_path):
    path = tmp_path / "audit.jsonl"
    path.write_text('{"earlier": "line"}\n')
    path.chmod(0o644)
    log = AuditLog(AuditConfig(path=path))
    try:
        log.write(record())
    finally:
        log.close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(read_lines(path)) == 2  # appended, not truncated


def test_rotated_audit_files_stay_owner_only(audit):
    log = audit(max_bytes=600, backup_count=2)
    for i in range(30):
        log.write(record(request_id=f"req-{i}"))
    path = log.config.path
    for f in (path, path.with_name("audit.jsonl.1"), path.with_name("audit.jsonl.2")):
        assert f.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("field", ["request_id", "client_ip", "model", "variant", "endpoint"])
def test_client_supplied_strings_are_capped_with_a_marker(audit, field):
    log = audit()
    log.write(record(**{field: "x" * 100_000}))
    (line,) = read_lines(log.config.path)
    assert line[field] == "x" * MAX_FIELD_CHARS + "...[truncated 99744 chars]"
    assert len(log.config.path.read_text()) < 2000


def test_logged_prompts_are_capped_at_max_text_chars(audit):
    log = audit(log_prompts=True, max_text_chars=10)
    log.write(record(prompt="p" * 50, completion="c" * 5))
    (line,) = read_lines(log.config.path)
    assert line["prompt"] == "p" * 10 + "...[truncated 40 chars]"
    assert line["completion"] == "c" * 5


@pytest.mark.parametrize("log_prompts", [False, True])
def test_lone_surrogates_are_written_escaped_not_raised(audit, log_prompts):
    # json.loads('"\\ud800"') gives a str that UTF-8 cannot encode; the line must still write.
    log = audit(log_prompts=log_prompts)
    log.write(record(model="gpt\ud800", prompt="hi \udfff there"))
    (line,) = read_lines(log.config.path)
    assert line["model"] == "gpt\\ud800"
    if log_prompts:
        assert line["prompt"] == "hi \\udfff there"


def test_cap_text_leaves_short_text_alone():
    assert cap_text("Paris ✓", 256) == "Paris ✓"
