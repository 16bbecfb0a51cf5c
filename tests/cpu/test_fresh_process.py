"""Test modules whose Ray driver attaches to an external cluster, each in its own interpreter.

Such a driver has been ended by Ray's core worker at its `ray.shutdown()` (exit status 1, "the
language frontend accesses the Ray's worker after it is shutdown"), most often when the process
had held Ray sessions before, whose metrics exporter outlives them. In the suite's own process
that ended pytest with no summary; here it starts clean, and a crash is this test's failure,
reported with the child's output.
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
