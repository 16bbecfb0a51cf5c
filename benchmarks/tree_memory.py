"""Resident memory of a launched server's whole process tree, sampled while it serves.

A system is more than its first process: awq-serve is `serve run` plus Ray's GCS, raylet,
agents and one worker per replica; vLLM has an engine-core child. benchmarks.compare starts each
system as the leader of a new session, so its tree is the leader, everything descended from it,
and anything still in its session after its parent died (orphans are re-parented to init and
lose the ppid link, but keep the session).

RSS counts pages shared between processes (libraries, Ray's object store in /dev/shm) once per
process that maps them, so a tree's total overstates what the tree costs: it is an upper bound,
and the largest single process is reported beside it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import psutil
from pydantic import BaseModel, Field

MIB = 1024 * 1024


@dataclass(frozen=True)
class ProcInfo:
    """One process as sampled: ids, session and resident bytes."""

    pid: int
    ppid: int
    sid: int
    rss: int
    name: str = ""


@dataclass(frozen=True)
class TreeSample:
    """The tree at one instant: its total RSS and its largest process."""

    total_rss: int
    processes: int
    largest: ProcInfo | None


class MemoryPeak(BaseModel):
    """Peaks over a run: of the tree's total, and of its largest single process."""

    peak_tree_mib: float = Field(description="Highest total RSS of the tree in one sample.")
    peak_largest_mib: float = Field(description="Highest RSS of any one process of the tree.")
    largest_name: str = Field("", description="That process's command line (truncated).")
    max_processes: int = Field(0, description="Most processes counted in one sample.")
    samples: int = Field(0, description="Samples taken.")


def tree_members(procs: Iterable[ProcInfo], root: int) -> list[ProcInfo]:
    """`root`, its descendants by parent id, and every process still in `root`'s session."""
    procs = list(procs)
    children: dict[int, list[ProcInfo]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    descendants: dict[int, ProcInfo] = {}
    stack = [p for p in procs if p.pid == root]
    while stack:
        p = stack.pop()
        descendants[p.pid] = p
        stack += [c for c in children.get(p.pid, []) if c.pid not in descendants]
    # The session id of a leader is its pid; started with start_new_session, root is one.
    session = {p.pid: p for p in procs if p.sid == root}
    return sorted({**session, **descendants}.values(), key=lambda p: p.pid)


def tree_sample(procs: Iterable[ProcInfo], root: int) -> TreeSample:
    """Sum the RSS of `root`'s tree and pick its largest process."""
    members = tree_members(procs, root)
    largest = max(members, key=lambda p: p.rss, default=None)
    return TreeSample(sum(p.rss for p in members), len(members), largest)


def peak_of(samples: Sequence[TreeSample]) -> MemoryPeak | None:
    """The peaks over a run's samples; None when none saw the tree."""
    seen = [s for s in samples if s.processes]
    if not seen:
        return None
    top = max((s.largest for s in seen if s.largest), key=lambda p: p.rss)
    return MemoryPeak(
        peak_tree_mib=max(s.total_rss for s in seen) / MIB,
        peak_largest_mib=top.rss / MIB,
        largest_name=top.name,
        max_processes=max(s.processes for s in seen),
        samples=len(seen),
    )


def _session(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:  # exited, or not ours to ask
        return -1


def snapshot() -> list[ProcInfo]:
    """Every visible process, with the fields tree_members needs (no names: they cost a read)."""
    procs = []
    for proc in psutil.process_iter(["pid", "ppid", "memory_info"]):
        info = proc.info
        if info["memory_info"] is None:  # vanished or denied between listing and reading
            continue
        pid = info["pid"]
        procs.append(ProcInfo(pid, info["ppid"], _session(pid), info["memory_info"].rss))
    return procs


def command_line(pid: int, limit: int = 80) -> str:
    """A process's title as `ps` shows it (Ray workers set it to e.g. 'ray::ServeReplica:…'),
    the program without its folder, so the truncated text keeps what tells processes apart."""
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process(pid)
        argv = proc.cmdline()
        if not argv:
            return proc.name()
        # A title set by setproctitle (Ray's) comes as one string, slashes in its arguments.
        program = argv[0] if " " in argv[0] else Path(argv[0]).name
        return " ".join([program, *argv[1:]])[:limit]
    return ""


class TreeSampler:
    """Samples a tree's RSS on a thread every `interval_s` while the `with` block runs."""

    def __init__(self, root: int, interval_s: float = 0.5) -> None:
        self.root = root
        self.interval_s = interval_s
        self.samples: list[TreeSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-rss", daemon=True)

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        names: dict[int, str] = {}
        # One sample at once, one at the end: a run shorter than the interval still has two.
        while True:
            sample = tree_sample(snapshot(), self.root)
            if sample.largest is not None:
                pid = sample.largest.pid
                named = replace(sample.largest, name=names.setdefault(pid, command_line(pid)))
                sample = replace(sample, largest=named)
            self.samples.append(sample)
            if self._stop.is_set():
                return
            self._stop.wait(self.interval_s)

    def peak(self) -> MemoryPeak | None:
        return peak_of(self.samples)
