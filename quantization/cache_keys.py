"""What a cached step's output depends on, as data: content hashes, code, library versions.

A step is reused only when every input that changes its output is the same: the source model's
content (or hub revision), the recipe, the installed libraries, the project version and the code
of the modules the step runs (an edited patch must not reuse an artifact the old patch made).
Names, sizes and mtimes are not enough: an updated local folder can keep them all.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

from quantization.registry import hash_tree, library_versions, sha256_file


class SourceRevisionError(RuntimeError):
    """A source whose content or revision cannot be pinned, so no cache key can be trusted."""


def tree_digest(folder: Path) -> str:
    """sha256 over the relative path and sha256 of every file under `folder`."""
    return _digest(hash_tree(folder))


def code_digest(*modules: str) -> str:
    """sha256 of the source files of the named modules (`quantization.awq`, ...)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        digest.update(name.encode())
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    return digest.hexdigest()[:16]


def source_revision(source: str, demo_source: str) -> str:
    """The content of a model source as one string: a folder's content hash, the demo GGUF's
    hash, or a hub model's commit sha."""
    if source == demo_source:
        from quantization.demo_model import DEMO_GGUF, demo_gguf_folder

        return f"gguf-sha256:{sha256_file(demo_gguf_folder() / DEMO_GGUF)}"
    path = Path(source)
    if path.is_dir():
        return f"folder-sha256:{tree_digest(path)}"
    return f"hub:{source}@{_hub_commit(source)}"


def _hub_commit(repo_id: str) -> str:
    """The commit the hub serves now, or the one in the local cache when offline."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        return str(HfApi().model_info(repo_id).sha)
    except Exception:  # offline or unknown: the cache may still hold a snapshot
        pass
    try:
        return Path(snapshot_download(repo_id, local_files_only=True)).name
    except Exception as e:
        raise SourceRevisionError(
            f"cannot pin a revision of '{repo_id}': not a local folder, the hub is not reachable "
            f"and no cached snapshot exists ({type(e).__name__}). Give a local model folder."
        ) from e


def project_version() -> str:
    """awq-serve's package version plus a digest of this package's code (edits between
    releases are told apart)."""
    modules = sorted(f"quantization.{p.stem}" for p in Path(__file__).parent.glob("[!_]*.py"))
    return f"{library_versions().get('awq-serve', 'unknown')}+{code_digest(*modules)}"


def step_key(step: str, code: tuple[str, ...], **inputs: Any) -> str:
    """The cache key of one step: its inputs plus its code and the library versions."""
    return _digest(
        {"step": step, "code": code_digest(*code), "libraries": library_versions(), **inputs}
    )


def _digest(data: Any) -> str:
    blob = json.dumps(data, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
