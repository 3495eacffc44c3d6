"""``reproduce --table 2 --price``: what a Table 2 grid would take on this machine with today's code, trained now.

The ledger's wall times were measured on whatever machine, code and company each run had (some shared their core
with a study, some predate a faster kernel), so they say little about a table trained here from scratch. Pricing
measures instead: for each (student, method) cell, the run the grid would train (seed ``seeds[0]``, the settings
its study chose) gets a warm-up epoch and one timed evaluation (with what the method does at an evaluation, e.g.
HetComp's DKC check), then the median of several timed epochs (at least ``timed_epochs``, more until a few seconds
are timed) in each part of a run whose epochs cost differently (the method's
:meth:`~hetcomp.train.Objective.cost_phases`: HetComp's L_O and L_F), at the threads a run gets with ``jobs``
workers. The cell's number of epochs (the mean over its ledger rows at these settings, else its study's
chosen trial, else unknown), split among those parts, times their epochs' cost, plus an evaluation every
``eval_every`` epochs, is its run's price. Nothing is trained or written.

A price is an estimate: the epoch counts come from the rows' seeds, not from the runs it prices; a few epochs
sample what a method does every few epochs (DCD's refresh every 3); where a part's length is not known in advance
it is bounded (HetComp's switch to L_F is taken at its ``deadline``, the latest it can come, so its dearer L_F
epochs are counted at their fewest: a lower bound); and an epoch can grow dearer as the student trains, which
the first epochs do not see (HetComp's scores pass its clamp at 40 after ~20 epochs on CiteULike's MF student,
and its clamped tail costs more: 0.61 → 0.73 s an epoch by epoch 90; ``experiments/results/bench.md``).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from hetcomp.errors import HetCompError
from hetcomp.paper.common import Reproduction
from hetcomp.paper.ledger import read_rows
from hetcomp.paper.runs import run_spec
from hetcomp.paper.teachers import torch_threads
from hetcomp.provenance import machine
from hetcomp.runs.execute import fresh_trainer
from hetcomp.runs.grid import task_threads
from hetcomp.runs.spec import twin_spec
from hetcomp.runs.tuned import summary_path
from hetcomp.teachers import TEACHERS, load_teachers, trajectory_file

#: timed epochs per part of a cell's run after its warm-up epoch: at least this many, more (up to
#: :data:`MOST_EPOCHS`) until :data:`ENOUGH_SECONDS` are timed; their median is the price of an epoch
TIMED_EPOCHS = 3
ENOUGH_SECONDS = 5.0
MOST_EPOCHS = 15


@dataclass
class PhasePrice:
    """A part of a run whose epochs cost alike (:class:`~hetcomp.train.CostPhase`): its epochs and their cost."""

    name: str
    epochs: float
    seconds_per_epoch: float
    cpu_per_epoch: float


@dataclass
class CellPrice:
    """One (student, method) cell: the measured costs and what one of its runs would take."""

    student: str
    method: str
    phases: list[PhasePrice]
    evaluation_seconds: float
    epochs: float | None  # None: neither a ledger row nor a study says how long a run of these settings trains
    epochs_from: str  # "ledger (n rows)", "study trial N", "<twin>'s runs" or "unknown"
    eval_every: int

    @property
    def seconds_per_epoch(self) -> float:
        """The mean over the run's epochs (its phases weighted by their epochs; the first phase's if none)."""
        return _weighted(self.phases, "seconds_per_epoch")

    @property
    def cpu_per_epoch(self) -> float:
        return _weighted(self.phases, "cpu_per_epoch")

    @property
    def run_seconds(self) -> float | None:
        if self.epochs is None:
            return None
        return (sum(p.epochs * p.seconds_per_epoch for p in self.phases)
                + math.ceil(self.epochs / self.eval_every) * self.evaluation_seconds)


def _weighted(phases: Sequence[PhasePrice], name: str) -> float:
    total = sum(p.epochs for p in phases)
    if not phases:
        return 0.0
    if total <= 0:
        return getattr(phases[0], name)
    return sum(p.epochs * getattr(p, name) for p in phases) / total


@dataclass
class TablePrice:
    """A grid's cells priced, and the teachers' training as their trajectories recorded it (their machine's)."""

    cells: list[CellPrice]
    teacher_seconds: float


def threads_per_run(jobs: int) -> int:
    """The threads one run of the grid gets with ``jobs`` local workers (``reproduce --jobs``'s own rule)."""
    return task_threads(max(1, jobs), None, 1)


def price_table2(rep: Reproduction, students: Sequence[str], seeds: Sequence[int], methods: Sequence[str],
                 dim: int = 6, timed_epochs: int = TIMED_EPOCHS) -> TablePrice:
    """The price of each (student, method) cell of the grid (see the module's docstring); the threads are those a
    run gets from ``rep.jobs`` workers on this machine (for the timing only)."""
    trajectories = _existing_teachers(rep)
    teacher_seconds = sum(float(t.meta.get("train_seconds") or 0) + float(t.meta.get("eval_seconds") or 0)
                          for t in trajectories)
    with torch_threads(threads_per_run(rep.jobs)):  # restored after: the caller's process keeps its own
        ledger = read_rows(rep.out_dir / "table2.csv")
        prices = []
        for student in students:
            for method in methods:
                specs = [run_spec(rep, trajectories, student, method, seed, dim) for seed in seeds]
                twin = twin_spec(specs[0])
                if twin is not None and twin.method in methods:  # its runs are adopted from the twin's: no training
                    prices.append(CellPrice(student, method, [PhasePrice("", 0.0, 0.0, 0.0)], 0.0, 0.0,
                                            f"{twin.method}'s runs", specs[0].eval_every))
                    continue
                epochs, source = _epochs(rep, ledger, specs, dim)
                trainer = fresh_trainer(specs[0], rep.split, trajectories, rep.device)
                phases = trainer.objective.cost_phases(float(specs[0].max_epochs) if epochs is None else epochs)
                names = ", ".join(p.name for p in phases if p.name)
                rep.say(f"pricing {student}-{method}: a warm-up epoch, an evaluation, {timed_epochs}+ timed epochs"
                        + (f" in each phase ({names})" if len(phases) > 1 else ""))
                loss = trainer.train_epoch()
                started = time.perf_counter()
                trainer._evaluate_and_select(loss)  # with the method's own work there (HetComp's DKC check)
                evaluation = time.perf_counter() - started
                timed = []
                for phase in phases:
                    with phase.enter() if phase.enter is not None else contextlib.nullcontext():
                        seconds, cpu = _time_epochs(trainer, timed_epochs)
                    timed.append(PhasePrice(phase.name, phase.epochs, seconds, cpu))
                prices.append(CellPrice(student, method, timed, evaluation, epochs, source, specs[0].eval_every))
    return TablePrice(prices, teacher_seconds)


def _time_epochs(trainer, least: int, enough: float = ENOUGH_SECONDS, most: int = MOST_EPOCHS) -> tuple[float, float]:
    """Median wall and CPU seconds of one epoch of ``trainer``, over at least ``least`` epochs and until
    ``enough`` seconds are timed (at most ``most`` epochs): a 2-core VM's epochs vary by ±15 % from one to the
    next, which a median of several resists better than a mean of three."""
    walls, cpus = [], []
    while len(walls) < least or (sum(walls) < enough and len(walls) < most):
        started, started_cpu = time.perf_counter(), time.process_time()
        trainer.train_epoch()
        walls.append(time.perf_counter() - started)
        cpus.append(time.process_time() - started_cpu)
    return statistics.median(walls), statistics.median(cpus)


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


def price_markdown(rep: Reproduction, table: TablePrice, n_seeds: int) -> str:
    """The prices as a Markdown table, with the whole grid's estimate at ``rep.jobs`` workers."""
    prices = table.cells
    threads = threads_per_run(rep.jobs)
    with torch_threads(threads):  # the machine line names the threads the runs were timed on
        where = machine()
    lines = [f"`{rep.command}` on {where}, {threads} thread(s) a run "
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
    teachers = table.teacher_seconds
    workers = max(1, rep.jobs)
    lines += ["", f"Runs: {_seconds(total)} in all, ~{_seconds(total / workers)} on {workers} worker(s)"
              + (f"; {unknown} cell(s) not priced (no ledger row or study says how long their runs train)"
                 if unknown else "")
              + (f". With the teachers' recorded training ({_seconds(teachers)}), from scratch "
                 f"~{_seconds(teachers + total / workers)}." if teachers else ".")]
    return "\n".join(lines) + "\n"


def _epochs_text(price: CellPrice) -> str:
    if price.epochs is None:
        return "?"
    parts = "".join(f"; {p.name} {p.epochs:.0f} at {p.seconds_per_epoch:.3f} s" for p in price.phases
                    if len(price.phases) > 1)
    return f"{price.epochs:.0f} ({price.epochs_from}{parts})"


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

