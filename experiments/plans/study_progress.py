"""A study's trials as its storage holds them now, running ones included (validation R@50 at each evaluation):
what a long study has reached before its trials finish and reach the committed trials record. Reads the storage
only; trains nothing.

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


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("database", type=Path, help="the study's SQLite file (or give --storage)")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    print("\n".join(progress_lines(f"sqlite:///{args.database.resolve()}")))


if __name__ == "__main__":
    main()
