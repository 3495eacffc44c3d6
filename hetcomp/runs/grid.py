"""Grids of runs on Ray: each :class:`~hetcomp.runs.spec.RunSpec` is one Ray task.

By default :func:`run_grid` starts a local in-process cluster with ``jobs`` CPUs (nothing to install or start
beyond the Python package); ``address`` (``auto``, ``ray://HOST:PORT``) sends the same grid to an existing
cluster. Every worker must see the same run store and the same data/teacher folders (on a cluster: a shared
mount, see README). Only the driver writes ledgers and pages (``on_result``); a task whose worker dies is
retried and resumes from its run folder's ``last.pt``; Ctrl-C or SIGTERM of the driver cancels every task and
stops the cluster it started.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from hetcomp.errors import HetCompError
from hetcomp.runs.spec import RunSpec
from hetcomp.runs.store import RunStore

#: how often a task whose worker died is started again (it resumes from its last checkpoint)
RETRIES = 3


@dataclass(frozen=True)
class Inputs:
    """How a worker loads the split and the teachers that a grid's specs were made from."""

    dataset: str
    data_dir: str | None = None
    cache_dir: str | None = None
    teachers_dir: str = "teachers"
    split_seed: int = 0
    max_users: int | None = None
    source: tuple[tuple[str, object], ...] = ()  # path, user_col, item_col, sep for csv / recbole files
    device: str = "cpu"

    def load(self, teachers: Sequence[str]) -> tuple:
        """(split, trajectories), loaded once per worker process for each set of teachers."""
        key = (self, tuple(teachers))
        if key not in _LOADED:
            from hetcomp.data import load_dataset
            from hetcomp.teachers import load_teachers

            split = load_dataset(self.dataset, data_dir=self.data_dir, seed=self.split_seed,
                                 cache_dir=self.cache_dir, max_users=self.max_users, **dict(self.source))
            _LOADED[key] = split, load_teachers(split, Path(self.teachers_dir), list(teachers))
        return _LOADED[key]


_LOADED: dict = {}


@dataclass
class GridReport:
    """What a grid did: finished metrics by identity, and the failures (spec, message)."""

    results: dict[str, dict] = field(default_factory=dict)
    failures: list[tuple[RunSpec, str]] = field(default_factory=list)


def execute_specs(specs: tuple[RunSpec, ...], inputs: Inputs, store_root: str, threads: int) -> list[dict]:
    """Train (or reuse) one run, or one stack of a run's seeds (:func:`stack_units`), in this process; the body
    of a grid's task."""
    import torch

    from hetcomp.runs.execute import train_run, train_stack

    torch.set_num_threads(max(1, threads))
    split, trajectories = inputs.load(specs[0].teachers)
    if split.fingerprint != specs[0].split_fingerprint:
        raise HetCompError(f"run {specs[0].identity}: the worker's split {split.fingerprint} is not the driver's "
                           f"{specs[0].split_fingerprint}; every worker must read the same data")
    if len(specs) == 1:
        return [train_run(specs[0], split, trajectories, RunStore(store_root), inputs.device)]
    return train_stack(specs, split, trajectories, RunStore(store_root), inputs.device)


def stack_units(specs: Sequence[RunSpec], stack_seeds: bool | Collection[str],
                stack_size: int | None = None) -> list[tuple[RunSpec, ...]]:
    """The grid's tasks: one per run, or with ``stack_seeds`` one per run specification whose method stacks
    (:meth:`~hetcomp.distill.base.DistillMethod.stacks_seeds`) holding its seeds, placed where its first seed
    was (the queue's order is kept). ``stack_seeds`` True: every method that stacks; a collection of method
    names: those of them (a GPU gains from stacking some methods more than others). ``stack_size``: at most this
    many seeds a stack, a row's seeds split into stacks as even as can be (5 at 3: 3 + 2), so that no task runs
    much longer than the rest (a stack of R seeds takes several times one run)."""
    units: dict[object, list[RunSpec]] = {}
    for index, spec in enumerate(specs):
        chosen = stack_seeds is True or (not isinstance(stack_seeds, bool) and spec.method in stack_seeds)
        stacks = chosen and spec.stacks_seeds
        units.setdefault(dataclasses.replace(spec, seed=0) if stacks else index, []).append(spec)
    out = []
    for unit in units.values():
        parts = math.ceil(len(unit) / stack_size) if stack_size else 1
        bounds = [-(-len(unit) * part // parts) for part in range(parts + 1)]  # the larger stacks first
        out.extend(tuple(unit[start:end]) for start, end in itertools.pairwise(bounds))
    return out


def run_grid(specs: Sequence[RunSpec], inputs: Inputs, store: RunStore, jobs: int = 1, address: str | None = None,
             cpus_per_run: float = 1.0, gpus_per_run: float = 0.0,
             on_result: Callable[[RunSpec, dict], None] | None = None,
             say: Callable[[str], None] = print, backend: str | None = None,
             stack_seeds: bool | Collection[str] = False, stack_size: int | None = None) -> GridReport:
    """Run every spec as a Ray task (finished ones are reused by the task itself) and report as they finish.

    ``jobs``: CPUs of the local cluster started when ``address`` is None (each run gets ``cpus_per_run`` of them
    and ``cores / jobs`` torch threads). ``on_result`` is called in the driver, in completion order.
    ``backend``: ``ray``, or ``processes`` (``jobs`` spawned processes of this machine taking the runs one after
    another: no retry of a process that dies); by default Ray, and the processes where Ray is not installed
    (e.g. a bare GPU machine) and no ``address`` asks for a cluster. ``stack_seeds``: the seeds of a run whose
    method stacks (or, a collection of names, of those methods) train as one stacked model in one task
    (:func:`stack_units`, at most ``stack_size`` seeds a stack; for a GPU, where a stack's epoch costs little more
    than one run's)."""
    report = GridReport()
    if not specs:
        return report
    asked, backend = backend, choose_backend(backend, address, "grid", "runs", "train")
    if asked is None and backend == "processes":
        say(f"Ray is not installed here: {len(specs)} run(s) on {jobs} local processes")

    def finished(unit: tuple[RunSpec, ...], results: list[dict] | None, message: str | None) -> None:
        for position, spec in enumerate(unit):
            if message is not None:
                report.failures.append((spec, message))
                say(f"FAILED {spec.folder_name}: {message}")
                continue
            report.results[spec.identity] = results[position]
            if on_result is not None:
                on_result(spec, results[position])

    units = stack_units(specs, stack_seeds, stack_size)
    threads = task_threads(jobs, address, cpus_per_run)
    if backend == "processes":
        with sigterm_interrupts():
            run_in_processes(units, inputs, str(store.root), jobs, threads, finished)
        return report
    import ray

    with ray_cluster(jobs, address):
        task = ray.remote(max_retries=RETRIES, num_cpus=cpus_per_run, num_gpus=gpus_per_run)(execute_specs)
        collect({task.remote(unit, inputs, str(store.root), threads): unit for unit in units}, finished)
    return report


def run_in_processes(units: Sequence[tuple[RunSpec, ...]], inputs: Inputs, store_root: str, jobs: int, threads: int,
                     finished: Callable[[tuple[RunSpec, ...], list[dict] | None, str | None], None],
                     poll: float = 1.0) -> None:
    """The grid's tasks ``units`` (each a run or a stack of a run's seeds) on ``jobs`` spawned processes of this
    machine, each taking the next task from one queue (they balance themselves over the processes);
    ``finished`` as in :func:`collect`. A process that dies fails its task (named; rerunning resumes it from its
    checkpoints) and another takes its place. Every process is stopped when this returns or raises (Ctrl-C,
    SIGTERM)."""
    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    for index, unit in enumerate(units):
        tasks.put((index, unit))
    workers: list = []
    taken: dict[int, int] = {}  # pid -> index of the run it took
    left = set(range(len(units)))

    def start() -> None:
        tasks.put(None)  # one stop mark per process started
        worker = context.Process(target=_take_runs, args=(tasks, results, inputs, store_root, threads), daemon=True)
        worker.start()
        workers.append(worker)

    try:
        for _ in range(min(jobs, len(units))):
            start()
        while left:
            try:
                kind, index, value = results.get(timeout=poll)
            except queue.Empty:
                for worker in [w for w in workers if not w.is_alive() and w.exitcode not in (0, None)]:
                    workers.remove(worker)
                    index = taken.pop(worker.pid, None)
                    if index is not None and index in left:
                        left.discard(index)
                        finished(units[index], None, f"its process died (exit code {worker.exitcode}); rerun "
                                                     "the command to resume it from its last checkpoint")
                    if left:
                        start()
                if left and not any(worker.is_alive() for worker in workers):  # a run taken but never announced
                    for index in sorted(left):
                        finished(units[index], None, "its process ended before reporting it; rerun the command")
                    left.clear()
                continue
            if kind == "start":
                taken[value] = index
            elif index in left:
                left.discard(index)
                finished(units[index], value if kind == "done" else None, value if kind == "failed" else None)
    finally:
        for worker in workers:
            if worker.is_alive():
                worker.terminate()
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()


def _take_runs(tasks, results, inputs: Inputs, store_root: str, threads: int) -> None:
    """A process of :func:`run_in_processes`: runs from ``tasks`` until the stop mark."""
    while (task := tasks.get()) is not None:
        index, unit = task
        results.put(("start", index, os.getpid()))
        try:
            results.put(("done", index, execute_specs(unit, inputs, store_root, threads)))
        except Exception as error:  # the task's own error: reported by name, the others go on
            text = str(error).strip()
            results.put(("failed", index, text.splitlines()[-1] if text else repr(error)))


def task_threads(jobs: int, address: str | None, cpus_per_task: float) -> int:
    """torch threads of one task: the local machine's cores shared by ``jobs`` tasks, else its CPUs; never more
    than ``OMP_NUM_THREADS`` when the caller set it (other work shares the machine: OpenMP threads that wait on
    a busy core slow an epoch tens of times)."""
    threads = max(1, (os.cpu_count() or 1) // jobs) if address is None else max(1, int(cpus_per_task))
    limit = os.environ.get("OMP_NUM_THREADS", "")
    return min(threads, int(limit)) if limit.isdigit() and int(limit) > 0 else threads


@contextmanager
def ray_cluster(jobs: int, address: str | None) -> Iterator[None]:
    """Ray for the duration of a grid: a local cluster of ``jobs`` CPUs started here (and stopped at the end)
    when ``address`` is None, else the cluster at ``address``; SIGTERM of the driver becomes a
    KeyboardInterrupt, so that :func:`collect` cancels every task."""
    import ray

    started_here = address is None and not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False, configure_logging=False)
    elif not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        with sigterm_interrupts():
            yield
    finally:
        if started_here:
            ray.shutdown()


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM of the driver becomes a KeyboardInterrupt for the duration (main thread only), so that a grid
    stops every task it started."""
    previous = signal.signal(signal.SIGTERM, _interrupt) if _main_thread() else None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def collect(pending: dict, finished: Callable[[object, object, str | None], None], poll: float | None = None,
            waiting: Callable[[], None] | None = None) -> None:
    """Wait for the Ray tasks ``pending`` {ref: item}; ``finished(item, result, None)`` or ``finished(item, None,
    message)`` (a task's own error: reported, the others go on) in completion order; ``waiting()`` every ``poll``
    seconds meanwhile. Whatever is still pending when this returns or raises is cancelled."""
    import ray

    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=poll)
            if not done:
                if waiting is not None:
                    waiting()
                continue
            item = pending.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as error:
                cause = getattr(error, "cause", None) or error
                finished(item, None, str(cause).strip().splitlines()[-1] if str(cause).strip() else repr(cause))
                continue
            finished(item, result, None)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def choose_backend(backend: str | None, address: str | None, kind: str, items: str, doing: str) -> str:
    """``ray`` or ``processes``: ``backend`` where given, else Ray where it is installed or ``address`` names a
    cluster, else this machine's processes. ``kind``, ``items`` and ``doing`` word the errors (e.g. "grid",
    "runs", "train")."""
    has_ray = ray_importable()
    chosen = backend or ("ray" if address is not None or has_ray else "processes")
    if chosen not in ("ray", "processes"):
        raise HetCompError(f"unknown {kind} backend {chosen!r}; use ray or processes")
    if chosen == "ray" and not has_ray:
        raise HetCompError(f"Ray cannot be imported here, and the {kind} asks for it (--ray-address sends {items} "
                           f"to a Ray cluster): install it (`pip install ray`), or leave --ray-address out to "
                           f"{doing} on local processes")
    return chosen


def ray_importable() -> bool:
    """Whether Ray is installed here (else grids and tuning plans run on local processes)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
