"""Ray node tags that outlive the process that set them: a JSON state file, written atomically.

RunPod cannot change a pod's env without restarting the pod, so the tags Ray sets after a launch
(node status, runtime-config hash, file-mounts hash) cannot go on the pod. Ray's updater decides
from those tags whether a node is set up; kept in memory only, a restarted autoscaler (or a second
`ray up`) would see every live node as never set up and re-run setup and `ray stop` on it. Ray's
own local provider keeps such a file for the same reason (`/tmp/cluster-<name>.state`); this one
lives where the provider runs: on the head for workers, on the laptop for the head.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path

from filelock import FileLock


def default_state_path(cluster_name: str) -> Path:
    """~/.ray/runpod/<cluster>.tags.json: home survives `ray stop`, unlike a Ray session dir."""
    return Path.home() / ".ray" / "runpod" / f"{cluster_name}.tags.json"


class TagStore:
    """Tag updates per node id; every change is one atomic replace of the whole file.

    A file lock serialises writers in different processes on one machine (two `ray up` runs, or
    `ray up` and `ray exec`); a thread lock the updater threads of one process.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file_lock = FileLock(str(self.path) + ".lock")
        self._lock = threading.RLock()

    def get(self, node_id: str) -> dict[str, str]:
        return dict(self._read().get(node_id, {}))

    def all(self) -> dict[str, dict[str, str]]:
        return self._read()

    def update(self, node_id: str, tags: Mapping[str, str]) -> None:
        """Merge tags into node_id's stored tags."""
        with self._lock, self._file_lock:
            state = self._read()
            state[node_id] = {**state.get(node_id, {}), **{k: str(v) for k, v in tags.items()}}
            self._write(state)

    def forget(self, node_ids: Iterable[str]) -> None:
        """Drop terminated nodes, so the file does not grow with every pod ever launched."""
        node_ids = set(node_ids)
        with self._lock, self._file_lock:
            state = self._read()
            if node_ids & set(state):
                self._write({k: v for k, v in state.items() if k not in node_ids})

    def _read(self) -> dict[str, dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise ValueError(
                f"RunPod provider state file {self.path} is not valid JSON ({exc}); it holds "
                "the tags of live nodes: fix or remove it (removing makes Ray set nodes up again)"
            ) from exc
        return {str(k): {str(a): str(b) for a, b in v.items()} for k, v in data.items()}

    def _write(self, state: Mapping[str, Mapping[str, str]]) -> None:
        # Write a temp file in the same folder, fsync, rename over: a crash leaves the old file
        # or the new one, never half of one.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                json.dump(state, out, indent=1, sort_keys=True)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
