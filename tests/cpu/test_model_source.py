"""Serving refuses early, and says how to fix it, when a model is missing or tampered with."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from deployments.app import build_app
from deployments.model_source import ModelUnavailable, resolve_model_dir


def test_missing_demo_model_fails_the_deploy_naming_the_command_that_builds_it(tmp_path) -> None:
    args = {"models": [{"name": "chat", "source": "smollm2-135m-instruct", "registry": tmp_path}]}
    with pytest.raises(ModelUnavailable, match=r"awq-serve demo"):
        build_app(args)


def test_registry_model_with_a_modified_file_is_refused(registry_root: Path, tmp_path) -> None:
    shutil.copytree(registry_root / "smollm2-135m-instruct", tmp_path / "smollm2-135m-instruct")
    [version] = [p for p in (tmp_path / "smollm2-135m-instruct").iterdir() if p.is_dir()]
    with (version / "config.json").open("a") as f:
        f.write(" ")
    with pytest.raises(ModelUnavailable, match=r"modified config.json"):
        resolve_model_dir("smollm2-135m-instruct", tmp_path, verify=True)
    folder, ref = resolve_model_dir("smollm2-135m-instruct", tmp_path, verify=False)
    assert folder == version and ref.endswith(version.name)


def test_a_plain_model_folder_is_served_as_is(demo_fp16_dir: Path) -> None:
    folder, ref = resolve_model_dir(str(demo_fp16_dir), Path("/nonexistent"), verify=True)
    assert folder == demo_fp16_dir and ref.startswith("path ")
