"""The model registry: atomic publish from staging, hash verification, name resolution."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from quantization.registry import (
    MANIFEST,
    STAGING,
    STALE_STAGING_S,
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


def _publish_next_in_process(root: str, ready, go, out) -> None:
    """A separate process publishing the same model: waits at the barrier, then publishes."""
    registry = Registry(root)
    with registry.staging("tiny") as staged:
        (staged / "config.json").write_bytes(FILES["config.json"])
        ready.wait()
        go.wait()
        manifest = Manifest(name="tiny", version="-", source_model="org/tiny")
        out.put(registry.publish_next(staged, manifest, "w4").name)


def test_concurrent_publishes_of_one_model_both_succeed_with_different_versions(
    registry: Registry,
) -> None:
    ctx = multiprocessing.get_context("fork")
    ready, go, out = ctx.Barrier(3), ctx.Barrier(3), ctx.Queue()
    procs = [
        ctx.Process(target=_publish_next_in_process, args=(str(registry.root), ready, go, out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    ready.wait()  # both have staged their files
    go.wait()  # and publish at the same moment
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    versions = sorted(out.get(timeout=5) for _ in procs)
    assert versions == ["w4-1", "w4-2"]
    assert sorted(registry.versions("tiny")) == versions
    for v in versions:
        registry.verify("tiny", v)
    assert _staging_contents(registry) == []


def test_version_numbers_stay_monotonic_after_a_version_is_deleted(registry: Registry) -> None:
    def publish_next() -> str:
        with registry.staging("tiny") as staged:
            (staged / "config.json").write_bytes(FILES["config.json"])
            manifest = Manifest(name="tiny", version="-", source_model="org/tiny")
            return registry.publish_next(staged, manifest, "w4").name

    assert [publish_next(), publish_next()] == ["w4-1", "w4-2"]
    shutil.rmtree(registry.path("tiny", "w4-2"))
    assert publish_next() == "w4-3"
    shutil.rmtree(registry.path("tiny", "w4-3"))
    shutil.rmtree(registry.path("tiny", "w4-1"))
    assert publish_next() == "w4-4"
    assert registry.versions("tiny") == ["w4-4"]


def test_publish_onto_an_existing_version_is_refused_even_when_allocated(
    registry: Registry,
) -> None:
    _publish(registry, version="w4-1")
    assert registry.allocate_version("tiny", "w4") == "w4-2"
    with pytest.raises(RegistryError, match="tiny:w4-1 is already published"):
        _publish(registry, version="w4-1")


def test_a_killed_jobs_staging_is_swept_by_the_next_run(registry: Registry) -> None:
    code = (
        "import os, sys\n"
        "from quantization.registry import Registry\n"
        "with Registry(sys.argv[1]).staging('tiny') as s:\n"
        "    (s / 'model.safetensors').write_bytes(b'partial')\n"
        "    print(s, flush=True)\n"
        "    os.kill(os.getpid(), 9)\n"
    )
    killed = subprocess.run([sys.executable, "-c", code, str(registry.root)], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert killed.returncode == -9
    left = Path(killed.stdout.strip())
    assert left.parent == registry.root / STAGING and left.is_dir()
    old_foreign = registry.root / STAGING / "tiny-otherhost-1-abcd"
    recent_foreign = registry.root / STAGING / "tiny-otherhost-2-efgh"
    old_foreign.mkdir()
    recent_foreign.mkdir()
    os.utime(old_foreign, (time.time() - 2 * STALE_STAGING_S,) * 2)

    _publish(registry)

    assert not left.exists() and not old_foreign.exists()
    assert recent_foreign.exists(), "another host's live staging is left alone"


def test_a_killed_publishs_reserved_version_is_swept_and_its_number_not_reused(
    registry: Registry,
) -> None:
    code = (
        "import os, sys\n"
        "from quantization.registry import Registry\n"
        "print(Registry(sys.argv[1]).allocate_version('tiny', 'w4'), flush=True)\n"
        "os.kill(os.getpid(), 9)\n"  # killed between reserving and renaming onto it
    )
    killed = subprocess.run([sys.executable, "-c", code, str(registry.root)], capture_output=True,
                            text=True, cwd=Path(__file__).resolve().parents[2])  # fmt: skip
    assert killed.returncode == -9 and killed.stdout.strip() == "w4-1"
    assert registry.path("tiny", "w4-1").is_dir()
    live = registry.allocate_version("tiny", "w4")  # this process's reservation: kept

    with registry.staging("tiny") as staged:
        (staged / "config.json").write_bytes(FILES["config.json"])
        manifest = Manifest(name="tiny", version="-", source_model="org/tiny")
        published = registry.publish_next(staged, manifest, "w4").name

    assert (live, published) == ("w4-2", "w4-3")
    folders = sorted(p.name for p in (registry.root / "tiny").iterdir() if p.is_dir())
    assert folders == ["w4-2", "w4-3"], "the dead reservation is gone, the live one kept"
    assert registry.versions("tiny") == ["w4-3"]
    with registry.staging("tiny") as staged:  # the live reservation can still be published
        (staged / "config.json").write_bytes(FILES["config.json"])
        registry.publish(staged, Manifest(name="tiny", version=live, source_model="org/tiny"))
    assert sorted(registry.versions("tiny")) == ["w4-2", "w4-3"]
    assert list(registry.path("tiny", live).glob(".reserved-by-*")) == []
    registry.verify("tiny", live)


def test_publish_records_provenance_fields(registry: Registry) -> None:
    _publish(registry, source_revision="folder-sha256:abc", project_version="0.1.0+def")
    manifest = registry.manifest("tiny", "1")
    assert (manifest.source_revision, manifest.project_version) == (
        "folder-sha256:abc",
        "0.1.0+def",
    )
