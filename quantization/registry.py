"""The model registry shared by quantization (writer) and serving (reader).

Layout: `<root>/<name>/<version>/` holding the model files and `manifest.json` (source, recipe,
library versions, sha256 of every file, evaluation results, time). Publishing writes into
`<root>/.staging/` and renames into place, so a reader never sees a half-written version and a
failed or interrupted job leaves nothing under `<name>/`. Readers verify hashes before loading.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from quantization.owner import owned_temp_dir, sweep_dead

MANIFEST = "manifest.json"
STAGING = ".staging"
LOCK = ".lock"
HIGH_WATER = ".last-version"  # highest version number ever allocated for the name
# Inside a reserved version folder until its publish renames onto it: who reserved it (`owner`).
RESERVED_BY = ".reserved-by-"
STALE_STAGING_S = 24 * 3600.0
DEFAULT_ROOT = Path("models")


class RegistryError(RuntimeError):
    """A registry lookup or verification that failed, with what to do about it."""


class Manifest(BaseModel):
    name: str
    version: str
    source_model: str
    source_revision: str | None = Field(None, description="Content hash or hub commit.")
    project_version: str | None = Field(None, description="awq-serve's version and code digest.")
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


def fsync_tree(folder: Path) -> None:
    """fsync every file and folder under `folder`, then `folder` itself."""
    for p in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        if p.is_file():
            with p.open("rb") as f:
                os.fsync(f.fileno())
        elif p.is_dir():
            _fsync_dir(p)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (flock) held for the block; other processes wait."""
    with path.open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_reservation(folder: Path) -> bool:
    """An existing version folder that holds nothing but owner tags (or nothing at all)."""
    try:
        return folder.is_dir() and all(p.name.startswith(RESERVED_BY) for p in folder.iterdir())
    except FileNotFoundError:  # swept or published meanwhile
        return False


def _release(reservation: Path) -> None:
    for tag in reservation.glob(f"{RESERVED_BY}*"):
        shutil.rmtree(tag, ignore_errors=True)


def sweep_dead_reservations(name_folder: Path) -> list[Path]:
    """Remove version folders reserved by a publish that died before its rename: their owner
    process on this host is gone, or the tag is older than `STALE_STAGING_S`. Call under the
    name's lock. The numbers stay used (the high-water mark has them)."""
    removed = []
    for folder in name_folder.iterdir():
        if folder.name.startswith(".") or not _is_reservation(folder):
            continue
        sweep_dead(folder, RESERVED_BY, max_age_s=STALE_STAGING_S)
        try:
            folder.rmdir()  # only when no live owner's tag is left
        except OSError:
            continue
        removed.append(folder)
    return removed


def _number(version: str) -> int:
    """The allocation number of a version folder (`w4-g64-3` -> 3, `2` -> 2), else 0."""
    tail = version.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in version.replace("-", ".").split("."))


class Registry:
    def __init__(self, root: Path | str = DEFAULT_ROOT) -> None:
        self.root = Path(root)

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    @contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A temp folder on the registry's filesystem; removed unless it was published.

        Named after this host and process: what a killed job left is swept here, by the next
        run, as is anything older than `STALE_STAGING_S` (another host's, or a reused pid).
        """
        staging_root = self.root / STAGING
        sweep_dead(staging_root, "", max_age_s=STALE_STAGING_S)
        folder = owned_temp_dir(staging_root, f"{name}-")
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def allocate_version(self, name: str, prefix: str) -> str:
        """Reserve `<prefix>-<n>` with n one above every number this name ever had.

        Under an exclusive lock on the name's folder: concurrent publishers get different
        numbers, and the high-water mark on disk keeps numbers monotonic after a version is
        deleted. The reservation is a folder holding only its owner's tag (readers skip folders
        without a manifest); `publish` renames the staged folder onto it. Reservations whose owner
        was killed before publishing are swept here, by the next allocation.
        """
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        with _locked(folder / LOCK):
            sweep_dead_reservations(folder)
            mark = folder / HIGH_WATER
            last = int(mark.read_text()) if mark.is_file() else 0
            used = [_number(p.name) for p in folder.iterdir() if p.is_dir()]
            number = max([last, *used]) + 1
            _write_durably(mark, str(number))
            version = f"{prefix}-{number}" if prefix else str(number)
            (folder / version).mkdir()  # exclusive: fails loudly rather than share a version
            owned_temp_dir(folder / version, RESERVED_BY)
        return version

    def publish(self, staged: Path, manifest: Manifest, replace: bool = False) -> Path:
        """Hash the staged files, write the manifest, fsync, and rename the folder into place.

        The target may be absent or the folder `allocate_version` reserved.
        """
        target = self.path(manifest.name, manifest.version)
        reserved = _is_reservation(target)
        if target.exists() and not reserved and not replace:
            raise RegistryError(f"{manifest.name}:{manifest.version} is already published")
        manifest = manifest.model_copy(update={"files": hash_tree(staged)})
        tmp_manifest = staged / f".{MANIFEST}.tmp"
        tmp_manifest.write_text(manifest.model_dump_json(indent=2))
        os.replace(tmp_manifest, staged / MANIFEST)
        fsync_tree(staged)  # the data is on disk before the rename makes it visible
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and not reserved:
            trash = self.root / STAGING / f"replaced-{manifest.name}-{manifest.version}"
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(target, trash)
            shutil.rmtree(trash, ignore_errors=True)
        if reserved:
            # Untagged, the empty folder may be swept before the rename; the rename then makes it.
            _release(target)
        os.replace(staged, target)  # onto an empty reserved folder: POSIX rename allows it
        _fsync_dir(target.parent)
        return target

    def publish_next(self, staged: Path, manifest: Manifest, prefix: str) -> Path:
        """Publish under a newly allocated version `<prefix>-<n>`."""
        version = self.allocate_version(manifest.name, prefix)
        try:
            return self.publish(staged, manifest.model_copy(update={"version": version}))
        except BaseException:
            reservation = self.path(manifest.name, version)
            if _is_reservation(reservation):
                _release(reservation)
                with suppress(OSError):  # a sweep may have removed it since
                    reservation.rmdir()  # the number stays used: the high-water mark has it
            raise

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
