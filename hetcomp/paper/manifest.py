"""manifest.json: how each table of a dataset was made, and what it cost."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

from hetcomp.paper.common import Reproduction
from hetcomp.provenance import atomic_write_text, git_commit, machine, packages, read_json


def read_manifest(path: Path) -> dict:
    """manifest.json's content ({} before the first table); a corrupt one is named with its fix."""
    if not path.is_file():
        return {}
    return read_json(path, "results manifest", "delete it: the next reproduce writes it again")


def write_manifest(rep: Reproduction, table: str, rows: list[dict], seeds: Sequence[int], seconds: float,
                   teacher_seconds: float = 0.0, jobs: int = 1, from_scratch: dict | None = None,
                   grid: dict | None = None) -> dict:
    """manifest.json: per table, the commands, seeds, commit, machine and wall times (this call, the runs' and the
    teachers' training; a run served by its twin's training counts once). From scratch, the table costs the
    teachers' time plus the runs' time divided by the runs trained side by side (``--jobs``, one per core here):
    that estimate is recorded beside the measured times.

    The call that finished a table whose teachers and runs were all trained by one command (from empty folders,
    maybe over several calls: ``hetcomp.paper.clock``) passes that measurement as ``from_scratch``: it is kept as
    ``from_scratch_measured`` with its command, and later calls (a ``--no-train`` regeneration of the page, more
    seeds) carry it over instead of losing it. ``grid``: the cells
    the table covers (every caller's, merged by the caller under the results lock)."""
    path = rep.out_dir / "manifest.json"
    manifest = read_manifest(path)
    # a row served by its twin (``trained_as``) repeats the twin's wall time: that training is counted once
    trained = [r for r in rows if not r.get("trained_as")]
    run_seconds = sum(float(r.get("wall_seconds") or 0) for r in trained)
    # CPU time where the rows counted it (rows made before it was counted have none): the sum and the runs it covers
    counted = [float(r["cpu_seconds"]) for r in trained if r.get("cpu_seconds") not in (None, "")]
    stamp = {"commit": git_commit(), "machine": machine(), "packages": packages(),
             "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    measured = manifest.get(table, {}).get("from_scratch_measured")
    if from_scratch:
        measured = {**from_scratch, "runs": len(rows), "jobs": jobs, **stamp}
    manifest[table] = {
        "command": rep.command, "seeds": list(seeds), **stamp,
        "wall_seconds_this_call": round(seconds, 1),
        "sum_of_run_wall_seconds": round(run_seconds, 1),
        "sum_of_run_cpu_seconds": {"seconds": round(sum(counted), 1), "runs": len(counted),
                                   "of_runs_trained": len(trained)},
        "teacher_training_seconds": round(teacher_seconds, 1),
        "jobs": jobs,
        "from_scratch_estimate": {
            "jobs": (cores := os.cpu_count() or 1),
            "seconds": round(teacher_seconds + run_seconds / cores, 1),
            "how": "teachers' training + the runs' summed wall time / jobs (one single-thread run per core)",
        },
        **({"from_scratch_measured": measured} if measured else {}),
        "runs": [r.get("command", "") for r in rows],
        **({"grid": grid} if grid else {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(manifest, indent=1))
    return manifest[table]
