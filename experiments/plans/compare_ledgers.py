"""Two Table 2 ledgers (``table2.csv``) compared run by run: the rows both hold (same run identity, the ``config``
column) whose metrics agree to the last printed digit, those that differ, and the wall time of each cell in both.

Used to check that a table regenerated from scratch (``from-scratch-citeulike.sh``) gives the committed rows bit for
bit, and what each cell cost in both::

    python experiments/plans/compare_ledgers.py experiments/results/tuned/citeulike/table2.csv \\
        /work/scratch/results/citeulike/table2.csv
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50", "best_epoch", "epochs")


def read(path: Path) -> dict[str, dict]:
    with open(path) as handle:
        return {row["config"]: row for row in csv.DictReader(handle)}


def main(reference: Path, other: Path) -> int:
    before, after = read(reference), read(other)
    shared = [key for key in after if key in before]
    differ = [key for key in shared if any(before[key][m] != after[key][m] for m in METRICS)]
    for key in differ:
        row = after[key]
        print(f"differs: {row['student']} {row['method']} seed {row['seed']}: "
              + ", ".join(f"{m} {before[key][m]} -> {row[m]}" for m in METRICS if before[key][m] != row[m]))
    print(f"{len(after)} rows in {other}; {len(shared)} also in {reference}: {len(shared) - len(differ)} identical "
          f"in {', '.join(METRICS)}, {len(differ)} differ; {len(after) - len(shared)} not there")
    cells: dict[tuple[str, str], list[str]] = {}
    for key in shared:
        cells.setdefault((after[key]["student"], after[key]["method"]), []).append(key)
    print("\n| student | method | runs | mean wall there (s) | mean wall here (s) | here / there |")
    print("|---|---|---|---|---|---|")
    for (student, method), keys in sorted(cells.items()):
        there = statistics.mean(float(before[k]["wall_seconds"]) for k in keys)
        here = statistics.mean(float(after[k]["wall_seconds"]) for k in keys)
        print(f"| {student} | {method} | {len(keys)} | {there:.0f} | {here:.0f} | {here / there:.2f} |")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
