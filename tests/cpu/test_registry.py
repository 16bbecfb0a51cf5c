"""The model registry: atomic publish from staging, hash verification, name resolution."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from quantization.registry import (
    MANIFEST,
    STAGING,
    Manifest,
    Registry,
    RegistryError,
    manifest_table,
)

FILES = {"config.json": b'{"hidden_size": 64}', "weights/model.safetensors": b"\x00\x01weights"}


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "models")


def _publish(
    registry: Registry,
    name: str = "tiny",
    version: str = "1",
    files: dict[str, bytes] = FILES,
    replace: bool = False,
    **manifest_fields: object,
) -> Path:
    with registry.staging(name) as staged:
        for rel, content in files.items():
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            (staged / rel).write_bytes(content)
        manifest = Manifest(name=name, version=version, source_model="org/tiny", **manifest_fields)
        return registry.publish(staged, manifest, replace=replace)


def _staging_contents(registry: Registry) -> list[Path]:
    return list((registry.root / STAGING).iterdir())


def test_publish_moves_staged_folder_into_name_version_with_file_hashes(
    registry: Registry,
) -> None:
    target = _publish(registry)
    assert target == registry.root / "tiny" / "1"
    assert (target / "weights" / "model.safetensors").read_bytes() == FILES[
        "weights/model.safetensors"
    ]
    manifest = registry.manifest("tiny", "1")
    assert manifest.files == {rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()}
    assert MANIFEST not in manifest.files
    assert _staging_contents(registry) == []


def test_failed_job_inside_staging_leaves_nothing_in_registry(registry: Registry) -> None:
    with pytest.raises(RuntimeError, match="quantization failed"), registry.staging("tiny") as st:
        (st / "config.json").write_bytes(FILES["config.json"])
        raise RuntimeError("quantization failed")
    assert not (registry.root / "tiny").exists()
    assert _staging_contents(registry) == []
    assert registry.names() == []


def test_publishing_an_existing_version_is_refused(registry: Registry) -> None:
    _publish(registry)
    with pytest.raises(RegistryError, match="tiny:1 is already published"):
        _publish(registry, files={"config.json": b"other"})
    assert registry.manifest("tiny", "1").files == {
        rel: hashlib.sha256(data).hexdigest() for rel, data in FILES.items()
    }


def test_publishing_with_replace_swaps_the_version_and_leaves_no_trash(
    registry: Registry,
) -> None:
    _publish(registry)
    target = _publish(registry, files={"config.json": b"new"}, replace=True)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", MANIFEST]
    assert registry.verify("tiny", "1").files == {"config.json": hashlib.sha256(b"new").hexdigest()}
    assert _staging_contents(registry) == []


def test_verify_passes_for_untouched_files(registry: Registry) -> None:
    _publish(registry)
    assert registry.verify("tiny", "1").name == "tiny"


def _modify(folder: Path) -> str:
    (folder / "config.json").write_bytes(b"tampered")
    return "modified config.json"


def _remove(folder: Path) -> str:
    (folder / "weights" / "model.safetensors").unlink()
    return "missing weights/model.safetensors"


def _add(folder: Path) -> str:
    (folder / "extra.bin").write_bytes(b"stray")
    return "unexpected extra.bin"


@pytest.mark.parametrize("change", [_modify, _remove, _add], ids=["modified", "missing", "extra"])
def test_verify_fails_naming_the_changed_file(registry: Registry, change) -> None:
    folder = _publish(registry)
    problem = change(folder)
    with pytest.raises(RegistryError, match="tiny:1 failed verification") as exc:
        registry.verify("tiny", "1")
    assert problem in str(exc.value)


def test_resolve_name_gives_newest_version_and_name_version_gives_that_one(
    registry: Registry,
) -> None:
    _publish(registry, version="2", created_at="2024-01-01T00:00:00+00:00")
    _publish(registry, version="1", created_at="2024-06-01T00:00:00+00:00")
    assert registry.versions("tiny") == ["2", "1"]
    assert registry.resolve("tiny") == ("tiny", "1")
    assert registry.resolve("tiny:latest") == ("tiny", "1")
    assert registry.resolve("tiny:2") == ("tiny", "2")


def test_resolve_unknown_name_names_present_models_and_the_demo_command(
    registry: Registry,
) -> None:
    _publish(registry)
    with pytest.raises(RegistryError, match="model 'huge' is not in the registry") as exc:
        registry.resolve("huge")
    assert "present: tiny" in str(exc.value)
    assert "awq-serve demo" in str(exc.value)


def test_resolve_in_empty_registry_says_none_present(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="present: none"):
        registry.resolve("tiny")


def test_resolve_unknown_version_names_present_versions_and_the_demo_command(
    registry: Registry,
) -> None:
    _publish(registry)
    with pytest.raises(RegistryError, match="tiny has no version '9'") as exc:
        registry.resolve("tiny:9")
    assert "['1']" in str(exc.value)
    assert "awq-serve demo" in str(exc.value)


def test_manifest_table_lists_every_entry_with_its_evaluation(registry: Registry) -> None:
    _publish(
        registry,
        recipe={"name": "w4-g128"},
        evaluation={
            "candidate": {"perplexity": 12.3456, "top1_agreement": 0.9},
            "size_bytes": 2_500_000,
        },
        created_at="2024-01-01T00:00:00+00:00",
    )
    _publish(registry, name="other", version="3")
    lines = manifest_table(registry.entries()).splitlines()
    assert lines[0].startswith("| name | version |")
    assert len(lines) == 2 + 2
    other, tiny = lines[2], lines[3]
    assert other.startswith("| other | 3 | awq | - | - | - | 0.0 |")
    assert tiny == "| tiny | 1 | awq | w4-g128 | 12.346 | 0.900 | 2.5 | 2024-01-01T00:00:00 |"
