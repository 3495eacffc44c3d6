"""Several studies at once: each (student, method) study of ``hetcomp tune`` is one Ray task (or one local process
where Ray is not installed, e.g. on a bare GPU machine).

The whole tuning plan of a table (every method for every student, the same budget each) is one command: on a local
cluster of ``jobs`` CPUs by default, or on an existing Ray cluster (``address``) whose workers see the same data,
teachers, tuning and runs folders; without Ray, on ``jobs`` spawned processes of this machine. Each task runs
:func:`~hetcomp.tune.tune` with the default storage (the SQLite file and the trials record beside the summary), so a
rerun resumes every study where it stopped, and a Ray task whose worker dies is retried (a local process that dies
fails its study, named): its running trial is recovered like any killed process's. A study whose first trials read
other studies' choices (:func:`prerequisites`: w/o KD's recipe, DCD's RRD, an ML or DNN study's MF one) starts once
those have ended, so a plan gives the studies of running them one by one in that order; among the ready ones, those
that head the longest chains of waiting studies start first. Only the driver reports: a study's summary as it
finishes, and the finished trials of all studies while they run (read from their trials records).
"""

from __future__ import annotations

import json
import multiprocessing
import queue
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hetcomp.config import check_option
from hetcomp.errors import HetCompError
from hetcomp.runs.grid import (
    RETRIES,
    Inputs,
    choose_backend,
    collect,
    ray_cluster,
    sigterm_interrupts,
    task_threads,
)
from hetcomp.runs.spec import DEFAULT_EVAL_EVERY, DEFAULT_MAX_EPOCHS, DEFAULT_PATIENCE
from hetcomp.runs.tuned import summary_path


@dataclass(frozen=True)
class StudyPlan:
    """One study of a plan, and what all of a plan's studies share."""

    student: str
    method: str
    dim: int
    trials: int
    teachers: tuple[str, ...]
    seed: int = 0
    max_epochs: int = DEFAULT_MAX_EPOCHS
    eval_every: int = DEFAULT_EVAL_EVERY
    patience: int = DEFAULT_PATIENCE

    @property
    def label(self) -> str:
        return f"{self.student}-{self.method}-{self.dim}"


def run_study(plan: StudyPlan, inputs: Inputs, runs_dir: str, root: str, threads: int,
              source: dict | None = None) -> dict:
    """One study, to its budget, in this process: the body of a plan's Ray task. Returns its summary."""
    import torch

    from hetcomp.runs import RunStore
    from hetcomp.tune import tune

    torch.set_num_threads(max(1, threads))
    split, trajectories = inputs.load(plan.teachers)
    return tune(split, trajectories, plan.student, plan.method, plan.dim, plan.trials, store=RunStore(runs_dir),
                seed=plan.seed, max_epochs=plan.max_epochs, eval_every=plan.eval_every, patience=plan.patience,
                device=inputs.device, source=source, root=Path(root))


def _finished_records(dataset: str, plan: StudyPlan, root: Path) -> list[dict]:
    """The finished trials (complete or pruned, not the killed ones) of a study's trials record, in the record's
    order; none before its first, and while the record is an earlier study's, made for another version of the
    method, which this one will replace."""
    from hetcomp.distill import method_class
    from hetcomp.tune import trials_path
    from hetcomp.tune_space import FINISHED_STATES

    path = trials_path(summary_path(dataset, plan.student, plan.method, plan.dim, root))
    try:
        record = json.loads(path.read_text())
        if record["study"]["method_version"] != method_class(plan.method).version:
            return []
        return [trial for trial in record["trials"] if trial["state"] in FINISHED_STATES]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def finished_trials(dataset: str, plan: StudyPlan, root: Path) -> int:
    """Finished trials of a study so far, from its trials record (see :func:`_finished_records`)."""
    return len(_finished_records(dataset, plan, root))


def latest_trial(dataset: str, plan: StudyPlan, root: Path) -> str:
    """A log line's account of a study's newest finished trial and its best so far (validation R@50), e.g.
    "trial 8 pruned at 0.1812 after 404 s; best 0.2223 (trial 3)"; empty before its first."""
    trials = _finished_records(dataset, plan, root)
    if not trials:
        return ""
    last = max(trials, key=lambda trial: trial.get("number", -1))
    value = last.get("value")
    seconds = (last.get("user_attrs") or {}).get("seconds")
    text = (f"trial {last.get('number')} {'pruned at' if last['state'] == 'pruned' else 'ended at'} "
            + ("no value" if value is None else f"{value:.4f}")
            + ("" if seconds is None else f" after {seconds:.0f} s"))
    complete = [trial for trial in trials if trial["state"] == "complete" and trial.get("value") is not None]
    if complete:
        best = max(complete, key=lambda trial: trial["value"])
        text += f"; best {best['value']:.4f} (trial {best.get('number')})"
    return text


def parse_budgets(text: str, students: Sequence[str]) -> dict[str, int]:
    """``--trials``: one budget for every study (``16``), or one per student (``mf=16,ml=8,dnn=8``, the fair
    comparison's protocol) naming each of ``students`` once and no other; a one-line HetCompError otherwise."""
    text = str(text).strip()
    example = f"--trials 16 or --trials {','.join(f'{s}={16 if i == 0 else 8}' for i, s in enumerate(students))}"
    if "=" not in text:
        try:
            budget = int(text)
        except ValueError:
            raise HetCompError(f"--trials {text!r}: give a number of trials or per-student budgets, e.g. "
                               f"{example}") from None
        check_option("--trials", budget, 16, ge=1)
        return dict.fromkeys(students, budget)
    budgets: dict[str, int] = {}
    for part in (piece.strip() for piece in text.split(",") if piece.strip()):
        name, _, value = (side.strip() for side in part.partition("="))
        if name not in students:
            raise HetCompError(f"--trials {text!r}: {name!r} is not among --student {','.join(students)}; "
                               f"give a budget to each of them, e.g. {example}")
        if name in budgets:
            raise HetCompError(f"--trials {text!r}: {name} has two budgets; give one, e.g. {example}")
        try:
            budgets[name] = int(value)
        except ValueError:
            raise HetCompError(f"--trials {text!r}: {name}'s budget {value!r} is not a number of trials, e.g. "
                               f"{example}") from None
        if budgets[name] < 1:
            raise HetCompError(f"--trials {text!r}: {name}'s budget must be at least 1 trial, e.g. {example}")
    missing = [name for name in students if name not in budgets]
    if missing:
        raise HetCompError(f"--trials {text!r} gives no budget to {', '.join(missing)}; add "
                           f"{','.join(f'{name}=N' for name in missing)}, e.g. {example}")
    return budgets


def prerequisites(plan: StudyPlan, plans: Sequence[StudyPlan]) -> set[str]:
    """Labels of the studies in ``plans`` whose chosen settings ``plan``'s first trials read (so they run first):
    the same student's studies of the methods its method reads (w/o KD for the methods that add the student's
    own loss, RRD for DCD), and, for a student other than the reference one, its method's reference study."""
    from hetcomp.distill import method_class
    from hetcomp.tune import REFERENCE_STUDENT

    reads = method_class(plan.method).tuning_reads()
    return {other.label for other in plans if other.dim == plan.dim and other.label != plan.label and (
        (other.student == plan.student and other.method in reads)
        or (plan.student != REFERENCE_STUDENT and other.student == REFERENCE_STUDENT
            and other.method == plan.method))}


def chain_lengths(plans: Sequence[StudyPlan]) -> dict[str, int]:
    """For each study, the number of studies on the longest chain that waits on it, itself included: 1 plus the
    longest of the studies whose :func:`prerequisites` include it (1 when none do)."""
    needs = {plan.label: prerequisites(plan, plans) for plan in plans}
    lengths: dict[str, int] = {}

    def length(label: str) -> int:
        if label not in lengths:
            lengths[label] = 1 + max((length(other) for other, reads in needs.items() if label in reads), default=0)
        return lengths[label]

    for plan in plans:
        length(plan.label)
    return lengths


def next_studies(waiting: Sequence[StudyPlan], plans: Sequence[StudyPlan], ended: set[str],
                 room: int | None) -> list[StudyPlan]:
    """The studies of ``waiting`` to start now: those whose :func:`prerequisites` have ended, at most ``room`` of
    them (None: all; a remote cluster decides its own capacity), those that head the longest chains of waiting
    studies first (:func:`chain_lengths`), then in plan order. So a plan's long chains (w/o KD → RRD → DCD for every
    student, each student's study after the reference one) do not wait behind studies nothing waits for; each study's
    trials depend only on its prerequisites' choices, never on this order. Starting only as many as there are
    workers keeps the order: Ray runs the tasks it holds in an order of its own."""
    lengths = chain_lengths(plans)
    ready = sorted((plan for plan in waiting if prerequisites(plan, plans) <= ended),
                   key=lambda plan: -lengths[plan.label])  # stable: plan order among equal chains
    return ready if room is None else ready[:max(0, room)]


def run_studies(plans: Sequence[StudyPlan], inputs: Inputs, dataset: str, runs_dir: Path, root: Path,
                jobs: int = 1, address: str | None = None, cpus_per_study: float = 1.0,
                gpus_per_study: float = 0.0, threads: int | None = None, source: dict | None = None,
                on_done: Callable[[StudyPlan, dict | None, str | None], None] | None = None,
                on_progress: Callable[[dict[str, int]], None] | None = None, poll: float = 30.0,
                backend: str | None = None) -> dict[str, dict]:
    """Every study of ``plans`` as a Ray task, each once its :func:`prerequisites` have ended (a failed one
    too) and, on the local cluster, a worker is free (see :func:`next_studies`); ``on_done(plan, summary,
    None)`` or ``(plan, None, message)`` as each ends, ``on_progress({label: finished trials})`` every ``poll``
    seconds. ``threads``: torch threads of each study (default: the local
    cores shared by ``jobs``, or ``cpus_per_study`` on a cluster). ``backend``: ``ray``, or ``processes`` (each
    study a spawned process of this machine, ``jobs`` at a time); by default Ray, and the processes where Ray is
    not installed and no ``address`` asks for a cluster. Returns the summaries by :attr:`StudyPlan.label`."""
    if choose_backend(backend, address, "plan", "studies", "tune") == "processes":
        return _run_in_processes(plans, inputs, dataset, runs_dir, root, jobs,
                                 threads or task_threads(jobs, None, cpus_per_study), source, on_done, on_progress,
                                 poll)
    import ray

    summaries: dict[str, dict] = {}
    ended: set[str] = set()
    waiting_plans = list(plans)
    pending: dict = {}

    def submit_ready() -> None:
        room = None if address else jobs - len(pending)
        for plan in next_studies(waiting_plans, plans, ended, room):
            waiting_plans.remove(plan)
            pending[task.remote(plan, inputs, str(runs_dir), str(root), threads, source)] = plan

    def finished(plan: StudyPlan, summary: dict | None, message: str | None) -> None:
        ended.add(plan.label)
        if summary is not None:
            summaries[plan.label] = summary
        if on_done is not None:
            on_done(plan, summary, message)
        submit_ready()

    def waiting() -> None:
        if on_progress is not None:
            on_progress({plan.label: finished_trials(dataset, plan, root) for plan in plans})

    with ray_cluster(jobs, address):
        threads = threads or task_threads(jobs, address, cpus_per_study)
        task = ray.remote(max_retries=RETRIES, num_cpus=cpus_per_study, num_gpus=gpus_per_study)(run_study)
        submit_ready()
        collect(pending, finished, poll, waiting)
    return summaries


def _run_in_processes(plans: Sequence[StudyPlan], inputs: Inputs, dataset: str, runs_dir: Path, root: Path,
                      jobs: int, threads: int, source: dict | None,
                      on_done: Callable[[StudyPlan, dict | None, str | None], None] | None,
                      on_progress: Callable[[dict[str, int]], None] | None, poll: float) -> dict[str, dict]:
    """:func:`run_studies` on spawned processes of this machine: one per study, at most ``jobs`` at once, each
    started once its prerequisites have ended. A process that dies fails its study (named; a rerun resumes it
    from its trials record); every process is stopped when this returns or raises (Ctrl-C, SIGTERM)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    summaries: dict[str, dict] = {}
    ended: set[str] = set()
    waiting = list(plans)
    running: dict[str, tuple[StudyPlan, multiprocessing.process.BaseProcess]] = {}

    def start_ready() -> None:
        for plan in next_studies(waiting, plans, ended, jobs - len(running)):
            waiting.remove(plan)
            process = context.Process(target=_study_process, daemon=True, args=(
                plan, inputs, str(runs_dir), str(root), threads, source, results))
            process.start()
            running[plan.label] = (plan, process)

    def end(label: str, summary: dict | None, message: str | None) -> None:
        if label not in running:  # its result came after it was counted dead (killed just after sending it)
            return
        plan, process = running.pop(label)
        process.join(10)
        ended.add(label)
        if summary is not None:
            summaries[label] = summary
        if on_done is not None:
            on_done(plan, summary, message)

    with sigterm_interrupts():
        try:
            start_ready()
            while running:
                try:
                    end(*results.get(timeout=poll))
                except queue.Empty:
                    if on_progress is not None:
                        on_progress({plan.label: finished_trials(dataset, plan, root) for plan in plans})
                    for label, (_, process) in list(running.items()):
                        if process.exitcode not in (0, None):  # exit 0: its result is in the queue already
                            end(label, None, f"its process died (exit code {process.exitcode}); rerun the "
                                             "command to resume the study from its trials record")
                start_ready()
        finally:
            for _, process in running.values():
                if process.is_alive():
                    process.terminate()
                process.join(10)
    return summaries


def _study_process(plan: StudyPlan, inputs: Inputs, runs_dir: str, root: str, threads: int, source: dict | None,
                   results) -> None:
    """A process of :func:`_run_in_processes`: one study; its summary, or its error's last line, to ``results``."""
    try:
        results.put((plan.label, run_study(plan, inputs, runs_dir, root, threads, source), None))
    except Exception as error:  # the study's own error: reported by name, the others go on
        text = str(error).strip()
        results.put((plan.label, None, text.splitlines()[-1] if text else repr(error)))
