"""Temp folders named after the process that owns them, so a later run can sweep a dead one's.

Name: `<prefix><host>-<pid>-<suffix>` (the suffix has no "-"). A killed job (`ray job stop`, a
force-cancelled task, SIGKILL) cannot clean up after itself; the next run on the same host sees
that the pid is gone and removes the folder. Folders of other hosts are only removed by age.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path


def owned_temp_dir(parent: Path, prefix: str) -> Path:
    """A new temp folder under `parent` tagged with this host and process. `prefix` may end
    with a name (`.tmp-awq-`); sweeps match on the part before that name."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{socket.gethostname()}-{os.getpid()}-",
                                 dir=parent))  # fmt: skip


def sweep_dead(parent: Path, prefix: str, max_age_s: float | None = None) -> list[Path]:
    """Remove `parent/<prefix>*` folders whose owner process on this host is gone, and any
    (from any host) older than `max_age_s`. Returns what was removed."""
    host = socket.gethostname()
    # Anything (a step name, a model name) may come between the prefix and the owner tag.
    ours = re.compile(re.escape(prefix) + r"(.*-)?" + re.escape(host) + r"-(?P<pid>\d+)-[^-]*")
    now, removed = time.time(), []
    for folder in parent.glob(f"{prefix}*"):
        owner = ours.fullmatch(folder.name)
        dead = owner is not None and not _alive(int(owner["pid"]))
        try:
            stale = max_age_s is not None and now - folder.stat().st_mtime > max_age_s
        except FileNotFoundError:  # removed by another sweeper meanwhile
            continue
        if dead or stale:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
