"""Run folders: ``<root>/<dataset>/<spec.folder_name>/`` holding ``spec.json``, ``last.pt`` (while training),
``metrics.json`` and ``student.pt`` (when finished).

A folder belongs to exactly one :class:`~hetcomp.runs.spec.RunSpec` (its name ends with the spec's identity), and
its finished metrics are returned only when the stored ``spec.json`` equals the asked spec. One process at a time
trains a folder: :meth:`RunStore.claim` holds an exclusive ``flock`` on its ``.lock`` file (released by the
kernel when the process dies, so a killed run never leaves a stale lock); a second caller waits for it and then
finds the run finished.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hetcomp.errors import HetCompError
from hetcomp.locks import exclusive_lock, held_elsewhere
from hetcomp.provenance import atomic_write_text, dataset_slug, read_json
from hetcomp.runs.spec import RunSpec

SPEC_FILE = "spec.json"
METRICS_FILE = "metrics.json"
LOCK_FILE = ".lock"


def write_json_atomic(path: Path, value: dict) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    atomic_write_text(path, json.dumps(value, indent=1))


def read_metrics(path: Path) -> dict:
    """A finished run's ``metrics.json``; an unreadable one is an error naming it and how to retrain."""
    return read_json(path, "finished run's metrics", "the file is truncated or corrupt: delete it to retrain the run")


class RunStore:
    """The run folders under one root (a path every worker of a cluster sees)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def folder(self, spec: RunSpec) -> Path:
        return self.root / dataset_slug(spec.dataset) / spec.folder_name

    def finished(self, spec: RunSpec) -> dict | None:
        """The metrics of ``spec``'s finished run, or None; an error when the folder holds another spec's files."""
        folder = self.folder(spec)
        metrics_file = folder / METRICS_FILE
        if not metrics_file.is_file():
            return None
        fix = f"delete {folder} to train the run again"
        metrics = read_json(metrics_file, "finished run's metrics", fix)
        stored = read_json(folder / SPEC_FILE, "run specification", fix)
        if {key: stored.get(key) for key in spec.identity_dict()} != json.loads(json.dumps(spec.identity_dict())):
            raise HetCompError(f"{folder} holds a run of another specification than the one asked "
                               f"(identity {stored.get('identity')} vs {spec.identity}); {fix}")
        if not {"valid", "test"} <= set(metrics):
            raise HetCompError(f"{metrics_file} has no valid/test metrics; {fix}")
        return metrics

    def busy(self, spec: RunSpec) -> bool:
        """Whether another process trains ``spec``'s run now (holds its folder's lock)."""
        return held_elsewhere(self.folder(spec) / LOCK_FILE)

    @contextmanager
    def claim(self, spec: RunSpec, say: Callable[[str], None] | None = None) -> Iterator[Path]:
        """The run's folder, held by this process alone (others wait); ``spec.json`` written on first claim."""
        folder = self.folder(spec)
        with exclusive_lock(folder / LOCK_FILE, say):
            spec_file = folder / SPEC_FILE
            if not spec_file.is_file():
                write_json_atomic(spec_file, spec.to_dict())
            yield folder

    def write_metrics(self, spec: RunSpec, metrics: dict) -> None:
        write_json_atomic(self.folder(spec) / METRICS_FILE, metrics)
