"""Find the folder a ModelConfig's `source` names: a registry entry (verified) or a local path."""

from __future__ import annotations

from pathlib import Path

from quantization.registry import Registry, RegistryError


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded; the message says how to get it."""


def resolve_model_dir(source: str, registry_root: Path, verify: bool) -> tuple[Path, str]:
    """Return (folder, description) for `source`, verifying registry hashes when asked."""
    path = Path(source)
    if (path / "config.json").is_file():
        return path, f"path {path}"
    registry = Registry(registry_root)
    try:
        name, version = registry.resolve(source)
        if verify:
            registry.verify(name, version)
    except RegistryError as e:
        raise ModelUnavailable(f"cannot serve '{source}': {e}") from e
    return registry.path(name, version), f"{name}:{version}"
