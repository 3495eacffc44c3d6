"""A study's trials as its storage holds them now, running ones included (validation R@50 at each evaluation):
what a long study has reached before its trials finish and reach the committed trials record. First one row per
run (the trials of one parameter set: a worker that stops marks its trial failed and the set is queued again, so
one run can span several trial numbers, each resuming the run's last checkpoint), then every trial. Reads the
storage only; trains nothing.

Usage: python experiments/plans/study_progress.py experiments/tuning/foursquare/mf-cl-drd-full-6.db
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna


def progress_lines(storage: str) -> list[str]:
    """One markdown table row per trial of every study in ``storage``: number, state, parameters, the validation
    curve (epoch: value) and its best point so far."""
    lines = ["| study | trial | state | parameters | validation R@50 by epoch | best so far |",
             "|---|---|---|---|---|---|"]
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        for trial in study.get_trials(deepcopy=False):
            curve = sorted(trial.intermediate_values.items())
            shown = ", ".join(f"{step}: {value:.4f}" for step, value in curve) or "-"
            best = max(curve, key=lambda point: point[1]) if curve else None
            params = ", ".join(f"{name}={_short(value)}" for name, value in sorted(trial.params.items()))
            lines.append(f"| {summary.study_name} | {trial.number} | {trial.state.name.lower()} | {params} | {shown} | "
                         + (f"{best[1]:.4f} (epoch {best[0]})" if best else "-") + " |")
    return lines


def run_lines(storage: str) -> list[str]:
    """One markdown table row per run (a parameter set) of every study in ``storage``, in the order of its first
    trial: its trial numbers, its state (complete or pruned once a trial of it is; else running, else failed), the
    last epoch any of its trials evaluated, and the best validation R@50 over all of them."""
    lines = ["| study | run: trials | state | parameters | last epoch evaluated | best valid R@50 (epoch) |",
             "|---|---|---|---|---|---|"]
    for summary in optuna.get_all_study_summaries(storage):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        runs: dict[tuple, list] = {}
        for trial in study.get_trials(deepcopy=False):
            runs.setdefault(tuple(sorted(trial.params.items())), []).append(trial)
        for params, trials in runs.items():
            states = {trial.state.name.lower() for trial in trials}
            state = next((name for name in ("complete", "pruned", "running", "waiting") if name in states), "fail")
            points = [point for trial in trials for point in trial.intermediate_values.items()]
            best = max(points, key=lambda point: point[1]) if points else None
            shown = ", ".join(f"{name}={_short(value)}" for name, value in params)
            lines.append(f"| {summary.study_name} | {', '.join(str(trial.number) for trial in trials)} | {state} | "
                         f"{shown} | {max((step for step, _ in points), default='-')} | "
                         + (f"{best[1]:.4f} ({best[0]})" if best else "-") + " |")
    return lines


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path, help="the study's SQLite file (or give --storage)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{args.database.resolve()}"
    print("\n".join(run_lines(storage)) + "\n\n" + "\n".join(progress_lines(storage)))


if __name__ == "__main__":
    main()
