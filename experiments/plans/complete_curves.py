"""Give a study's finished trials the whole validation curve of their run, for studies made before 2026-12-05
(eighth session), when a trial that resumed a killed trial's run reported only the epochs after the restart.

A run killed mid-way (a session's end, a stopped worker) goes on from its checkpoint under a new trial number
(``hetcomp.tune._rerun_stale``): the same parameters, hence the same run. Since the eighth session of
2026-12-05 the new trial first reports the run's curve so far (``hetcomp.tune._Report.on_fit_start``); before,
a finished trial held only its last attempt's epochs, and the median pruner, which compares a trial with the
finished trials' values at the same epoch, had nothing to compare with at the early epochs. This script copies
the earlier attempts' values (the failed trials of the same parameters, numbered before it) into each finished
trial that lacks them: the values the run reported, nothing recomputed, validation only. It changes no trial's
value or state and is idempotent; it lists what it adds. Optuna's API cannot change a finished trial, so it writes
the SQLite file's ``trial_intermediate_values`` table directly (safe beside running workers: one transaction).
The trials record beside the study is rewritten from the file by ``hetcomp tune`` after its next trial.

Usage: python experiments/plans/complete_curves.py experiments/tuning/foursquare/mf-cl-drd-full-6.db [--dry-run]
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

import optuna

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def missing_points(trials: list[optuna.trial.FrozenTrial]) -> dict[int, dict[int, float]]:
    """For each finished trial (by its storage id), the (epoch: value) points its earlier attempts reported that it
    lacks: the failed trials with its parameters, numbered before it and after the previous finished one."""
    added: dict[int, dict[int, float]] = {}
    attempts: dict[tuple, list[optuna.trial.FrozenTrial]] = {}
    for trial in sorted(trials, key=lambda t: t.number):
        key = tuple(sorted(trial.params.items()))
        if trial.state == optuna.trial.TrialState.FAIL:
            attempts.setdefault(key, []).append(trial)
        elif trial.state in FINISHED:
            earlier = {step: value for attempt in attempts.pop(key, []) for step, value in
                       attempt.intermediate_values.items()}
            points = {step: value for step, value in earlier.items() if step not in trial.intermediate_values}
            if points:
                added[trial._trial_id] = points
    return added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path, help="the study's SQLite file")
    parser.add_argument("--dry-run", action="store_true", help="list what would be added, write nothing")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sys.path.insert(0, str(Path(__file__).parent))
    from study_progress import studies_trials

    for name, trials in studies_trials(f"sqlite:///{args.database.resolve()}").items():
        numbers = {trial._trial_id: trial.number for trial in trials}
        added = missing_points(trials)
        for trial_id, points in added.items():
            steps = sorted(points)
            print(f"{name}: trial {numbers[trial_id]} gets epochs {steps[0]}..{steps[-1]} "
                  f"({len(steps)} values) of its run's earlier attempts")
        if not added:
            print(f"{name}: every finished trial already holds its run's whole curve")
        if added and not args.dry_run:
            with sqlite3.connect(args.database, timeout=60) as connection:
                connection.executemany(
                    "INSERT INTO trial_intermediate_values (trial_id, step, intermediate_value, "
                    "intermediate_value_type) VALUES (?, ?, ?, 'FINITE')",
                    [(trial_id, step, value) for trial_id, points in added.items() for step, value in points.items()])


if __name__ == "__main__":
    main()
