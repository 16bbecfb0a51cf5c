"""Test modules that must hold their process's first Ray session, run in a fresh interpreter.

Ray's in-process metrics exporter outlives `ray.shutdown()`. In a process that has had a Ray
session before, it keeps exporting to that session's dead agent, and a later driver connected to
an external cluster (`ray.init(address=...)`) can be ended by it just after its own
`ray.shutdown()`: the core worker exits with status 1 ("the language frontend accesses the Ray's
worker after it is shutdown"), taking pytest down with no summary. The main suite starts one Ray
session per module in one process, so the modules under `tests/fresh_process/` get their own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.serving import REPO

MODULES = sorted((REPO / "tests" / "fresh_process").glob("test_*.py"))


def test_there_is_something_to_run() -> None:
    assert MODULES, "tests/fresh_process/ holds no test module"


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES, ids=lambda path: path.stem)
def test_module_passes_in_a_fresh_interpreter(module: Path) -> None:
    command = [sys.executable, "-u", "-m", "pytest", str(module), "-q", "-rA",
               "-p", "no:cacheprovider"]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200)
    print(run.stdout[-4000:])  # shown with -s or -rA: the module's own results
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-4000:]
