"""GPU tests run only where CUDA exists (`pytest tests/gpu` on a GPU node); CI runs tests/cpu."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available() and any("tests/gpu" in str(i.fspath) for i in items):
        raise pytest.UsageError("tests/gpu needs a CUDA device; on CPU run tests/cpu")
