"""A study's trials as its storage holds them now, running ones included (validation R@50 at each evaluation):
what a long study has reached before its trials finish and reach the committed trials record. First one row per
run (the trials of one parameter set: a worker that stops marks its trial failed and the set is queued again, so
one run can span several trial numbers, each resuming the run's last checkpoint), then every trial. Reads the
storage only; trains nothing.

Usage: python experiments/plans/study_progress.py experiments/tuning/foursquare/mf-cl-drd-full-6.db [more .db files]
(several studies' files: one pair of tables over all of them, in the order given)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import optuna


def studies_trials(storage: str) -> dict[str, list]:
    """Every study's trials in ``storage``, by study name (read once for both tables)."""
    return {summary.study_name: optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(
        deepcopy=False) for summary in optuna.get_all_study_summaries(storage)}


def _params(trial) -> dict:
    """A trial's parameters; a waiting (queued) trial's are the ones it was queued with."""
    return trial.params or trial.system_attrs.get("fixed_params", {})


def progress_lines(studies: dict[str, list]) -> list[str]:
    """One markdown table row per trial of every study (:func:`studies_trials`): number, state, parameters, the
    validation curve (epoch: value) and its best point so far."""
    lines = ["| study | trial | state | parameters | validation R@50 by epoch | best so far |",
             "|---|---|---|---|---|---|"]
    for name, trials in studies.items():
        for trial in trials:
            curve = sorted(trial.intermediate_values.items())
            shown = ", ".join(f"{step}: {value:.4f}" for step, value in curve) or "-"
            best = max(curve, key=lambda point: point[1]) if curve else None
            params = ", ".join(f"{name}={_short(value)}" for name, value in sorted(_params(trial).items()))
            lines.append(f"| {name} | {trial.number} | {trial.state.name.lower()} | {params} | {shown} | "
                         + (f"{best[1]:.4f} (epoch {best[0]})" if best else "-") + " |")
    return lines


def run_lines(studies: dict[str, list]) -> list[str]:
    """One markdown table row per run (a parameter set) of every study (:func:`studies_trials`), in the order of
    its first trial: its trial numbers, its state (complete or pruned once a trial of it is; else running, else
    failed), the last epoch its latest started attempt evaluated (an attempt that resumed from no checkpoint starts
    again at 0, whatever an earlier attempt reached), and the best validation R@50 over all of them."""
    lines = ["| study | run: trials | state | parameters | last epoch evaluated | best valid R@50 (epoch) |",
             "|---|---|---|---|---|---|"]
    for name, study_trials in studies.items():
        runs: dict[tuple, list] = {}
        for trial in study_trials:
            runs.setdefault(tuple(sorted(_params(trial).items())), []).append(trial)
        for params, trials in runs.items():
            states = {trial.state.name.lower() for trial in trials}
            state = next((name for name in ("complete", "pruned", "running", "waiting") if name in states), "fail")
            points = [point for trial in trials for point in trial.intermediate_values.items()]
            best = max(points, key=lambda point: point[1]) if points else None
            shown = ", ".join(f"{name}={_short(value)}" for name, value in params)
            started = [trial for trial in trials if trial.state.name != "WAITING"]
            last = max(started[-1].intermediate_values, default=0) if started else "-"
            lines.append(f"| {name} | {', '.join(str(trial.number) for trial in trials)} | {state} | "
                         f"{shown} | {last} | "
                         + (f"{best[1]:.4f} ({best[0]})" if best else "-") + " |")
    return lines


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("databases", type=Path, nargs="+", help="the studies' SQLite files")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    studies = {}
    for database in args.databases:
        if not database.is_file():
            parser.error(f"no such study file: {database} (a study's SQLite file lies beside its summary, "
                         "experiments/tuning/<dataset>/<student>-<method>-<dim>.db)")
        studies.update(studies_trials(f"sqlite:///{database.resolve()}"))
    print("\n".join(run_lines(studies)) + "\n\n" + "\n".join(progress_lines(studies)))


if __name__ == "__main__":
    main()
