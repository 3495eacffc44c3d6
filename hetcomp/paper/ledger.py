"""The results ledger: one CSV row per run under ``<results>/<dataset>/``, written atomically under a folder lock.

The CSV files are the source of truth of every table: pages are rendered from them, never from run folders.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from hetcomp.locks import exclusive_lock
from hetcomp.paper.common import METRICS
from hetcomp.provenance import atomic_write_text

#: table2.csv: one row per student run (test metrics, cost, how to rerun it, where it came from)
#: ``trained_as``: the identity of the finished run that served this one (a twin: DCD at ``dcd_weight=0`` is its
#: RRD run), whose wall time the row repeats; empty for a run trained as itself. ``cpu_seconds``: the run's CPU
#: time over the same spans as ``wall_seconds`` (a core shared with other work inflates only the wall); empty for
#: rows written before it was counted
TABLE2_COLUMNS = ("dataset", "student", "method", "seed", *METRICS, "best_epoch", "epochs", "wall_seconds", "command",
                  "config", "teachers_digest", "commit", "code_digest", "machine", "packages",
                  "trained_as", "cpu_seconds")
#: curves.csv: one row per evaluation of a Table 2 run
CURVE_COLUMNS = ("dataset", "student", "method", "seed", "config", "epoch", "valid_recall@50", "test_recall@50")


def read_rows(path: Path) -> list[dict]:
    """A ledger's rows as text fields (none when the file does not exist yet)."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    """Write a CSV atomically (a killed reproduce never leaves half a table)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


def row_key(row: dict) -> tuple[str, str, str, str]:
    """student, method, seed and the run's identity (the ``config`` column holds ``RunSpec.identity``)."""
    return row["student"], row["method"], row["seed"], row["config"]


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on a results folder, so that reproduce calls running side by side (e.g. one per group of
    methods, one per core) merge their rows instead of overwriting each other's."""
    with exclusive_lock(Path(folder) / ".lock"):
        yield
