"""The model registry shared by quantization (writer) and serving (reader).

Layout: `<root>/<name>/<version>/` holding the model files and `manifest.json` (source, recipe,
library versions, sha256 of every file, evaluation results, time). Publishing writes into
`<root>/.staging/` and renames into place, so a reader never sees a half-written version and a
failed or interrupted job leaves nothing under `<name>/`. Readers verify hashes before loading.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

MANIFEST = "manifest.json"
STAGING = ".staging"
DEFAULT_ROOT = Path("models")


class RegistryError(RuntimeError):
    """A registry lookup or verification that failed, with what to do about it."""


class Manifest(BaseModel):
    name: str
    version: str
    source_model: str
    source_revision: str | None = None
    kind: str = Field("awq", description="awq (servable artifact) or fp16 (source copy).")
    recipe: dict[str, Any] = Field(default_factory=dict)
    library_versions: dict[str, str] = Field(default_factory=dict)
    files: dict[str, str] = Field(default_factory=dict, description="relative path -> sha256")
    evaluation: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder` except the manifest, by relative POSIX path."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for pkg in ("torch", "transformers", "autoawq", "gptqmodel", "awq-serve"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return found


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in version.replace("-", ".").split("."))


class Registry:
    def __init__(self, root: Path | str = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A temp folder on the registry's filesystem; removed unless it was published."""
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=staging_root))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def publish(self, staged: Path, manifest: Manifest, replace: bool = False) -> Path:
        """Hash the staged files, write the manifest, and rename the folder into place."""
        target = self.path(manifest.name, manifest.version)
        if target.exists() and not replace:
            raise RegistryError(f"{manifest.name}:{manifest.version} is already published")
        manifest = manifest.model_copy(update={"files": hash_tree(staged)})
        tmp_manifest = staged / f".{MANIFEST}.tmp"
        tmp_manifest.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp_manifest, staged / MANIFEST)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            trash = self.root / STAGING / f"replaced-{manifest.name}-{manifest.version}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staged, target)
        return target

    def manifest(self, name: str, version: str) -> Manifest:
        path = self.path(name, version) / MANIFEST
        if not path.is_file():
            raise RegistryError(f"{name}:{version} has no manifest at {path}")
        return Manifest.model_validate_json(path.read_text())

    def versions(self, name: str) -> list[str]:
        folder = self.root / name
        if not folder.is_dir():
            return []
        found = [p.name for p in folder.iterdir() if (p / MANIFEST).is_file()]
        return sorted(found, key=lambda v: (self._created_at(name, v), _version_key(v)))

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def resolve(self, ref: str) -> tuple[str, str]:
        """`name` (newest version) or `name:version` -> (name, version)."""
        name, _, version = ref.partition(":")
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise RegistryError(
                f"model '{name}' is not in the registry at {self.root} (present: {known}). "
                "Build the demo model with `awq-serve demo` or quantize one with "
                "`awq-serve quantize`."
            )
        if not version or version == "latest":
            return name, versions[-1]
        if version not in versions:
            raise RegistryError(
                f"{name} has no version '{version}'; versions: {versions}. Use one of those, "
                "or build it with `awq-serve demo` or `awq-serve quantize`."
            )
        return name, version

    def verify(self, name: str, version: str) -> Manifest:
        """Check every file's sha256 against the manifest; raise naming what differs."""
        manifest = self.manifest(name, version)
        actual = hash_tree(self.path(name, version))
        problems = [f"missing {f}" for f in manifest.files if f not in actual]
        problems += [f"unexpected {f}" for f in actual if f not in manifest.files]
        problems += [
            f"modified {f}"
            for f, digest in manifest.files.items()
            if f in actual and actual[f] != digest
        ]
        if problems:
            raise RegistryError(
                f"{name}:{version} failed verification ({'; '.join(problems)}); "
                "re-publish it or restore the files"
            )
        return manifest

    def entries(self) -> list[Manifest]:
        return [self.manifest(n, v) for n in self.names() for v in self.versions(n)]

    def _created_at(self, name: str, version: str) -> str:
        try:
            return self.manifest(name, version).created_at
        except (RegistryError, ValueError):
            return ""


def manifest_table(manifests: list[Manifest]) -> str:
    """Markdown table of registry entries for `awq-serve list`."""
    rows = [
        "| name | version | kind | recipe | ppl | top-1 | size MB | created |",
        "|" + "---|" * 8,
    ]
    for m in manifests:
        ev = m.evaluation.get("candidate", m.evaluation)  # FP16 copies hold their own figures
        size = int(ev.get("size_bytes") or m.evaluation.get("size_bytes") or 0)
        rows.append(
            f"| {m.name} | {m.version} | {m.kind} | {m.recipe.get('name', '-')} | "
            f"{_fmt(ev.get('perplexity'))} | {_fmt(ev.get('top1_agreement'))} | "
            f"{size / 1e6:.1f} | {m.created_at[:19]} |"
        )
    return "\n".join(rows)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"
