"""``reproduce --table 2 --price``: what a Table 2 grid would take on this machine with today's code, trained now.

The ledger's wall times were measured on whatever machine, code and company each run had (some shared their core
with a study, some predate a faster kernel), so they say little about a table trained here from scratch. Pricing
measures instead: for each (student, method) cell, the run the grid would train (seed ``seeds[0]``, the settings
its study chose) gets a warm-up epoch, then ``timed_epochs`` timed epochs and one timed evaluation (with what the
method does at an evaluation, e.g. HetComp's DKC check), at the threads a run gets with ``jobs`` workers. Times
the cell's number of epochs (the mean over its ledger rows at these settings, else its study's chosen trial, else
unknown), plus an evaluation every ``eval_every`` epochs, that is its run's price. Nothing is trained or written.

A price is an estimate: an epoch's cost moves little along a run for most methods, but not for all (CL-DRD's
stages lengthen its list; HetComp's L_F replaces L_O; DCD refreshes every few epochs: the timed epochs sample
that), and the epoch counts come from the rows' seeds, not from the runs it prices.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hetcomp.errors import HetCompError
from hetcomp.paper.common import Reproduction
from hetcomp.paper.ledger import read_rows
from hetcomp.paper.runs import run_spec
from hetcomp.provenance import machine
from hetcomp.runs.execute import fresh_trainer
from hetcomp.runs.spec import twin_spec
from hetcomp.runs.tuned import summary_path
from hetcomp.teachers import TEACHERS, load_teachers, trajectory_file

#: timed epochs per cell after its warm-up epoch
TIMED_EPOCHS = 3


@dataclass
class CellPrice:
    """One (student, method) cell: the measured costs and what one of its runs would take."""

    student: str
    method: str
    seconds_per_epoch: float
    cpu_per_epoch: float
    evaluation_seconds: float
    epochs: float | None  # None: neither a ledger row nor a study says how long a run of these settings trains
    epochs_from: str  # "ledger (n rows)", "study trial N" or "unknown"
    eval_every: int

    @property
    def run_seconds(self) -> float | None:
        if self.epochs is None:
            return None
        return self.epochs * self.seconds_per_epoch + math.ceil(self.epochs / self.eval_every) * self.evaluation_seconds


def price_table2(rep: Reproduction, students: Sequence[str], seeds: Sequence[int], methods: Sequence[str],
                 dim: int = 6, timed_epochs: int = TIMED_EPOCHS) -> list[CellPrice]:
    """The price of each (student, method) cell of the grid (see the module's docstring); the threads are those a
    run gets from ``rep.jobs`` workers on this machine (set for this process)."""
    trajectories = _existing_teachers(rep)
    torch.set_num_threads(threads_per_run(rep.jobs))
    ledger = read_rows(rep.out_dir / "table2.csv")
    prices = []
    for student in students:
        for method in methods:
            specs = [run_spec(rep, trajectories, student, method, seed, dim) for seed in seeds]
            twin = twin_spec(specs[0])
            if twin is not None and twin.method in methods:  # its runs are adopted from the twin's: no training
                prices.append(CellPrice(student, method, 0.0, 0.0, 0.0, 0.0, f"{twin.method}'s runs",
                                        specs[0].eval_every))
                continue
            trainer = fresh_trainer(specs[0], rep.split, trajectories, rep.device)
            rep.say(f"pricing {student}-{method}: a warm-up epoch, {timed_epochs} timed epochs, one evaluation")
            trainer.train_epoch()
            started, started_cpu = time.perf_counter(), time.process_time()
            loss = 0.0
            for _ in range(timed_epochs):
                loss = trainer.train_epoch()
            seconds = (time.perf_counter() - started) / timed_epochs
            cpu = (time.process_time() - started_cpu) / timed_epochs
            started = time.perf_counter()
            trainer._evaluate_and_select(loss)
            evaluation = time.perf_counter() - started
            epochs, source = _epochs(rep, ledger, specs, dim)
            prices.append(CellPrice(student, method, seconds, cpu, evaluation, epochs, source, specs[0].eval_every))
    return prices


def threads_per_run(jobs: int) -> int:
    """The threads one run gets with ``jobs`` local workers (as ``reproduce --jobs`` gives them)."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def _epochs(rep: Reproduction, ledger: Sequence[dict], specs: Sequence, dim: int) -> tuple[float | None, str]:
    """How many epochs a run of the cell trains: the mean over its ledger rows at these settings (any of the
    grid's seeds), else the epoch its study's chosen trial ended at, else unknown."""
    identities = {spec.identity for spec in specs}
    counted = [int(row["epochs"]) for row in ledger if row.get("config") in identities and row.get("epochs")]
    if counted:
        return statistics.mean(counted), f"ledger ({len(counted)} rows)"
    spec = specs[0]
    try:
        summary = json.loads(summary_path(spec.dataset, spec.student, spec.method, dim, rep.tuning_dir).read_text())
        chosen = next(t for t in summary["history"] if t["number"] == summary["best_trial"])
        return float(chosen["last_epoch"]), f"study trial {chosen['number']}"
    except (OSError, ValueError, KeyError, TypeError, StopIteration):
        return None, "unknown"


def price_markdown(rep: Reproduction, prices: Sequence[CellPrice], n_seeds: int) -> str:
    """The prices as a Markdown table, with the whole grid's estimate at ``rep.jobs`` workers."""
    lines = [f"`{rep.command}` on {machine()}, {threads_per_run(rep.jobs)} thread(s) a run "
             f"({rep.jobs} worker(s)), {rep.device}:", "",
             "| student | method | s / epoch (CPU) | evaluation | epochs (from) | one run | "
             f"{n_seeds} seeds |", "|---|---|---|---|---|---|---|"]
    known = []
    for p in prices:
        run = p.run_seconds
        lines.append(f"| {p.student} | {p.method} | {p.seconds_per_epoch:.3f} ({p.cpu_per_epoch:.3f}) | "
                     f"{p.evaluation_seconds:.2f} s | {_epochs_text(p)} | {_seconds(run)} | "
                     f"{_seconds(None if run is None else run * n_seeds)} |")
        if run is not None:
            known.append(run * n_seeds)
    unknown = sum(p.run_seconds is None for p in prices)
    total = sum(known)
    teachers = _teacher_seconds(rep)
    workers = max(1, rep.jobs)
    lines += ["", f"Runs: {_seconds(total)} in all, ~{_seconds(total / workers)} on {workers} worker(s)"
              + (f"; {unknown} cell(s) not priced (no ledger row or study says how long their runs train)"
                 if unknown else "")
              + (f". With the teachers' recorded training ({_seconds(teachers)}), from scratch "
                 f"~{_seconds(teachers + total / workers)}." if teachers else ".")]
    return "\n".join(lines) + "\n"


def _epochs_text(price: CellPrice) -> str:
    return "?" if price.epochs is None else f"{price.epochs:.0f} ({price.epochs_from})"


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    return f"{value / 3600:.2f} h" if value >= 3600 else f"{value:.0f} s"


def _existing_teachers(rep: Reproduction) -> list:
    """The grid's teachers, which pricing needs (the students' epochs read them) but never trains."""
    dataset = rep.split.meta["dataset"]
    absent = [name for name in TEACHERS if not trajectory_file(rep.teachers_dir, dataset, name).is_file()]
    if absent:
        raise HetCompError(f"--price times the students' epochs, which read the teachers: {', '.join(absent)} not "
                           f"trained under {rep.teachers_dir}; train them first (`hetcomp train-teachers --dataset "
                           f"{rep.dataset}`) or point --teachers-dir at them")
    return load_teachers(rep.split, rep.teachers_dir, list(TEACHERS))


def _teacher_seconds(rep: Reproduction) -> float:
    """The teachers' training and evaluation seconds as their trajectories recorded them (their machine's)."""
    return sum(float(t.meta.get("train_seconds") or 0) + float(t.meta.get("eval_seconds") or 0)
               for t in _existing_teachers(rep))
