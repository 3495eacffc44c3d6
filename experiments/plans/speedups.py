"""Issue 17's goals 1 and 2 read off two Table 2 ledgers: per (student, method) cell, the mean wall time per run
and mean test R@50 of the ledger the issue measured (``experiments/results/citeulike/table2.csv``, the defaults
rows before the speed work) against a newer one, with the speed-up and the change in R@50.

The goals' bars: HetComp's MF student within 4 minutes a run; every other cell ≥ 3× faster at no more than 1 %
lower R@50. The unsampled CL-DRD (``cl-drd-full``) is read against the sampled ``cl-drd`` rows the issue timed (the
HetComp paper's variant replaced it in the tables). R@50 is printed, not used to choose anything::

    python experiments/plans/speedups.py experiments/results/citeulike/table2.csv \\
        /work/scratch/results/citeulike/table2.csv
"""

from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

BEFORE_NAMES = {"cl-drd-full": "cl-drd"}  # a cell's name in the earlier ledger where it differs


def cells(path: Path) -> dict[tuple[str, str], list[dict]]:
    with open(path) as handle:
        grouped: dict[tuple[str, str], list[dict]] = {}
        for row in csv.DictReader(handle):
            grouped.setdefault((row["student"], row["method"]), []).append(row)
        return grouped


def mean(rows: list[dict], column: str) -> float:
    return statistics.mean(float(row[column]) for row in rows)


def main(before_path: Path, after_path: Path) -> int:
    before, after = cells(before_path), cells(after_path)
    print(f"before: {before_path}; after: {after_path}\n")
    print("| student | method | runs | wall before (s) | wall after (s) | speed-up | R@50 before | R@50 after "
          "| R@50 change |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (student, method), rows in sorted(after.items()):
        then = before.get((student, BEFORE_NAMES.get(method, method))) or before.get((student, method))
        wall, recall = mean(rows, "wall_seconds"), mean(rows, "recall@50")
        if not then:
            print(f"| {student} | {method} | {len(rows)} | - | {wall:.0f} | - | - | {recall:.4f} | - |")
            continue
        wall_then, recall_then = mean(then, "wall_seconds"), mean(then, "recall@50")
        print(f"| {student} | {method} | {len(rows)} | {wall_then:.0f} | {wall:.0f} | {wall_then / wall:.1f}× | "
              f"{recall_then:.4f} | {recall:.4f} | {100 * (recall / recall_then - 1):+.1f} % |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
