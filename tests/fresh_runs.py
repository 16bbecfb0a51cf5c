"""Run test modules one after another, each in an interpreter of its own, beside the suite.

These modules (tests/fresh_process/) start a cluster of their own and spend most of their
minutes waiting on it (autoscaler rounds, pods starting, idle timeouts), with little CPU work of
their own, so they run in a lane that starts as soon as the suite is collected instead of after
it, at a lower CPU priority; their tests in the suite wait for them at the end. Only such
modules belong here: on 2 cores, a lane that also ran demo-model replicas (the multi-node,
autoscaling and rolling-drain modules) slowed the foreground's OpenMP-bound tests up to 8x
(one went from 32 to 257 s, measured), for a suite 13 s shorter in all. Each run gets a Ray
temp dir of its own: a `ray start` records its cluster in the temp dir's `ray_current_cluster`,
which a bare `ray.init()` elsewhere would otherwise join.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NICENESS = 10  # CFS weight 110 vs 1024: the suite in the foreground keeps ~90% of a busy CPU


@dataclass
class FreshRun:
    module: Path
    done: threading.Event = field(default_factory=threading.Event)
    returncode: int | None = None
    output: str = ""


class Lane:
    """Runs its modules in order on a thread; `wait` gives one module's outcome."""

    def __init__(self, modules: list[Path]) -> None:
        self.runs = {module: FreshRun(module) for module in modules}
        self._stopping = threading.Event()
        self._current: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(target=self._run_all, name="fresh-runs", daemon=True)
        self._thread.start()

    def wait(self, module: Path, timeout_s: float) -> tuple[int | None, str]:
        run = self.runs[module]
        if not run.done.wait(timeout_s):
            self.stop()
            run.done.wait(60)
            return None, f"{module.name} did not finish in {timeout_s:.0f} s\n{run.output}"
        return run.returncode, run.output

    def stop(self) -> None:
        """No further module starts; the running one gets SIGINT (its fixtures tear its
        cluster down), then SIGKILL for its whole process group."""
        self._stopping.set()
        process = self._current
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def _run_all(self) -> None:
        for run in self.runs.values():
            if self._stopping.is_set():
                run.output = "not run: the suite stopped first"
            else:
                self._run(run)
            run.done.set()

    def _run(self, run: FreshRun) -> None:
        # Short: Ray's socket paths under it must stay within AF_UNIX's 107 bytes.
        ray_tmp = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
        log = ray_tmp / "pytest.log"
        command = [sys.executable, "-u", "-m", "pytest", str(run.module), "-q", "-rA",
                   "-p", "no:cacheprovider"]  # fmt: skip
        try:
            with log.open("wb") as out:
                self._current = subprocess.Popen(
                    command,
                    cwd=REPO,
                    env={**os.environ, "RAY_TMPDIR": str(ray_tmp)},
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=lambda: os.nice(NICENESS),
                )
                run.returncode = self._current.wait()
            run.output = log.read_text(errors="replace")
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)


_lane: Lane | None = None


def start(modules: list[Path]) -> None:
    """Start the lane over `modules` (once per process)."""
    global _lane
    if _lane is None and modules:
        _lane = Lane(modules)


def wait(module: Path, timeout_s: float) -> tuple[int | None, str]:
    """The module's exit status (None past the timeout) and output; starts the lane if needed."""
    start([module])
    assert _lane is not None
    return _lane.wait(module, timeout_s)


def stop() -> None:
    if _lane is not None:
        _lane.stop()
