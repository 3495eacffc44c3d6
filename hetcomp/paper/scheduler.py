"""Training a table's missing runs side by side, one child process each (to be replaced by Ray tasks)."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence

from hetcomp.errors import HetCompError
from hetcomp.paper.common import Reproduction


def train_side_by_side(rep: Reproduction, todo: Sequence[tuple[str, str, int]], jobs: int,
                       poll_seconds: float = 2.0) -> None:
    """Train the runs ``todo`` in ``jobs`` child processes at a time, each with its share of the cores.

    Each child is one ``hetcomp reproduce`` of a single run (``rep.child_command``), so it merges its row into
    table2.csv under the folder lock exactly as a serial call does, and an interrupted child resumes from its
    ``last.pt`` next time. A child's output goes to ``<results>/<dataset>/logs/``; a failed child stops the table
    with the path of its log instead of a number that silently is not there.
    """
    if not todo:
        return
    if rep.child_command is None:
        raise HetCompError("--jobs needs a way to start child runs (use the hetcomp reproduce command)")
    logs = rep.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    pending, running, failed, done = list(todo), {}, [], 0
    bar = rep.progress(f"{len(todo)} runs, {jobs} at a time", len(todo))
    rep.say(f"training {len(todo)} runs in {jobs} processes of {threads} thread(s) each; logs in {logs}")
    try:
        while pending or running:
            while pending and len(running) < jobs:
                student, method, seed = pending.pop(0)
                log = logs / f"{student}-{method}-{seed}.log"
                with open(log, "a") as handle:
                    child = subprocess.Popen(rep.child_command(student, method, seed), stdout=handle,
                                             stderr=subprocess.STDOUT, env=env)
                running[child] = (log, time.perf_counter())
            time.sleep(poll_seconds)
            for child in [c for c in running if c.poll() is not None]:
                log, began = running.pop(child)
                done += 1
                status = "done" if child.returncode == 0 else f"FAILED (exit {child.returncode})"
                rep.say(f"[{done}/{len(todo)}] {log.stem} {status} in {(time.perf_counter() - began) / 60:.1f} min")
                if child.returncode != 0:
                    failed.append(log)
                if bar is not None:
                    bar.on_epoch_end(None, done, 0.0)
    finally:
        for child in running:
            child.terminate()
        if bar is not None and hasattr(bar, "close"):
            bar.close()
    if failed:
        raise HetCompError(f"{len(failed)} run(s) failed; see " + ", ".join(str(f) for f in failed)
                           + " (finished runs are kept: rerun the same command to retry the rest)")
