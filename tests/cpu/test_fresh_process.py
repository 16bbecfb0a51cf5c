"""Test modules run each in an interpreter of its own, in a lane beside the suite.

Such a module's Ray driver attaches to an external cluster, and such a driver has been ended by
Ray's core worker at its `ray.shutdown()` (exit status 1, "the language frontend accesses the
Ray's worker after it is shutdown"), most often when the process had held Ray sessions before,
whose metrics exporter outlives them. In the suite's own process that ended pytest with no
summary; in its own interpreter it starts clean, and a crash is this test's failure, reported
with the child's output. The lane starts when the suite is collected (tests/fresh_runs.py), so
the module's minutes of waiting on its cluster overlap the suite; its test here runs last.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import fresh_runs
from tests.serving import REPO

MODULES = sorted((REPO / "tests" / "fresh_process").glob("test_*.py"))


def test_there_is_something_to_run() -> None:
    assert MODULES, "tests/fresh_process/ holds no test module"


@pytest.mark.slow
@pytest.mark.parametrize("module", MODULES, ids=lambda path: path.stem)
def test_module_passes_in_a_fresh_interpreter(module: Path) -> None:
    rc, output = fresh_runs.wait(module, timeout_s=1800)  # the lane started at collection
    print(output[-4000:])  # shown with -s or -rA: the module's own results
    assert rc == 0, output[-12000:]
