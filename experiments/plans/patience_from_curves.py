"""What a shorter early-stopping patience would save and cost, read from a Table 2 ledger's validation curves.

Every run evaluates every 10 epochs and stops after ``patience`` evaluations without a better validation R@50
(5 in every committed table). Replaying each run's recorded validation curve with a smaller patience gives the
evaluation it would have stopped at and the best validation R@50 it would have kept; the run's own seconds per
epoch turn the epochs not trained into seconds. Reads validation only (``valid_recall@50``), never test. Rows
served by a twin's run (``trained_as``) are left out: that training is its twin's row.

Usage: python experiments/plans/patience_from_curves.py [experiments/results/tuned/citeulike]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def replay(values: list[float], patience: int) -> tuple[int, int]:
    """(index of the best evaluation kept, index of the evaluation the run stops at) under ``patience``."""
    best, best_index = float("-inf"), 0
    for index, value in enumerate(values):
        if value > best:
            best, best_index = value, index
        elif index - best_index >= patience:
            return best_index, index
    return best_index, len(values) - 1


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/results/tuned/citeulike")
    rows = pd.read_csv(folder / "table2.csv", dtype={"trained_as": str}).set_index("config")
    if "trained_as" in rows:  # a run served by its twin's training is that run again: counted once
        rows = rows[rows["trained_as"].isna()]
    curves = pd.read_csv(folder / "curves.csv").sort_values("epoch")
    curves = curves[curves["config"].isin(rows.index)]
    total = rows["wall_seconds"].sum()
    print(f"{folder}: {len(rows)} runs, {total:,.0f} s of run time\n")
    print("| patience (evaluations) | runs keeping their best | mean / max loss of best valid R@50 | run time saved |")
    print("|---|---|---|---|")
    for patience in (5, 4, 3, 2):
        kept, losses, saved = 0, [], 0.0
        for config, curve in curves.groupby("config"):
            values, epochs = curve["valid_recall@50"].tolist(), curve["epoch"].tolist()
            best_index, stop = replay(values, patience)
            run = rows.loc[config]
            saved += (run["epochs"] - epochs[stop]) * run["wall_seconds"] / run["epochs"]
            kept += values[best_index] == max(values)
            losses.append(1 - values[best_index] / max(values))
        print(f"| {patience} | {kept} / {len(losses)} | {100 * sum(losses) / len(losses):.2f} % / "
              f"{100 * max(losses):.1f} % | {saved:,.0f} s ({100 * saved / total:.0f} %) |")


if __name__ == "__main__":
    main()
