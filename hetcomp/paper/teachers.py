"""The teachers of a reproduction: trained or reused, and their rows of Table 2."""

from __future__ import annotations

import multiprocessing
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from hetcomp.distill import EnsembleConfig
from hetcomp.errors import HetCompError
from hetcomp.experiments import committed_teacher_digests
from hetcomp.metrics import evaluate_split
from hetcomp.paper.common import Reproduction
from hetcomp.provenance import cpu
from hetcomp.runs.grid import Inputs, task_threads
from hetcomp.runs.spec import trajectory_digest
from hetcomp.teachers import (
    TEACHERS,
    dataset_teacher_settings,
    load_teachers,
    parse_seeded_name,
    shares_state_epochs,
    train_teacher,
    trajectory_file,
)
from hetcomp.train import Callback
from hetcomp.trajectory import Trajectory


def ensure_teachers(rep: Reproduction, names: Sequence[str] = TEACHERS, seed: int = 0) -> list:
    """Train (or reuse) the teachers ``names`` (``<model>`` or ``<model>-s<seed>``) and load them."""
    dataset = rep.split.meta["dataset"]
    absent = [name for name in names if not trajectory_file(rep.teachers_dir, dataset, name).is_file()]
    if absent and not rep.train:
        raise HetCompError(f"teacher(s) {', '.join(absent)} not trained under {rep.teachers_dir}; --no-train uses "
                           "finished runs only: drop it, or train them first with `hetcomp train-teachers`")
    page, committed = ({}, {}) if rep.schedule.quick else committed_teacher_digests(dataset)
    overrides = {**({} if rep.schedule.quick else dataset_teacher_settings(rep.dataset)),
                 **rep.schedule.teacher_overrides}
    side_by_side = min(rep.jobs, len(absent)) if rep.inputs is not None and rep.device.type == "cpu" else 1
    tasks = []
    for name in absent:
        model, train_seed = parse_seeded_name(name, seed)
        threads = _committed_threads(committed.get(name))
        if threads is None and side_by_side > 1:
            threads = task_threads(side_by_side, None, 1)
        command = (f"hetcomp train-teachers --dataset {rep.dataset} --teachers {model}"
                   + (f" --train-seed {train_seed}" if train_seed != seed else "")
                   + (f" --threads {threads}" if threads else ""))
        tasks.append(TeacherTask(name, model, train_seed, threads, rep.schedule.teacher_dim, rep.teacher_top_m,
                                 overrides, command))
    said = {task.name: f"training teacher {task.name}" + (f" with {task.threads} thread(s)" if task.threads else "")
            + (f", as the committed one was ({page}): a teacher's rankings depend on the thread count"
               if task.name in committed and task.threads else "") for task in tasks}
    if side_by_side > 1:
        rep.say(f"{side_by_side} teachers at a time, each in its own process (--jobs {rep.jobs}):")
        for line in said.values():
            rep.say(line)
        digests = _train_side_by_side(rep, tasks, side_by_side)
    else:
        digests = {}
        for task in tasks:
            rep.say(said[task.name])
            callback = rep.progress(f"teacher {task.name}", overrides.get("max_epochs", 300))
            trajectory = task.train(rep.split, rep.teachers_dir, rep.device, [callback] if callback else None,
                                    rep.say)
            digests[task.name] = trajectory_digest(trajectory)[:12]
    for name, digest in digests.items():
        if name in committed and digest != committed[name][0]:
            rep.say(f"warning: teacher {name}'s rankings differ from the committed one's ({page}: {committed[name][0]}"
                    f", this one {digest}, on {cpu()}): the committed studies' settings and rows were made with the "
                    "other (`hetcomp train-teachers --help` says what a teacher's rankings depend on)")
    trajectories = load_teachers(rep.split, rep.teachers_dir, list(names))
    for trajectory in trajectories:
        if shares_state_epochs(trajectory):
            rep.say(f"warning: {trajectory.name}'s states share epochs {trajectory.meta['state_epochs']}; retrain "
                    "it with a smaller --eval-every (hetcomp train-teachers) so that E1..E4 differ")
    return trajectories


@dataclass(frozen=True)
class TeacherTask:
    """One teacher to train, picklable so that a worker process can train it as this process would."""

    name: str
    model: str
    seed: int
    threads: int | None  # None: torch's count, left alone
    dim: int
    top_m: int
    overrides: dict
    command: str

    def train(self, split, teachers_dir: Path, device: torch.device, callbacks: list | None,
              waiting: Callable[[str], None] | None) -> Trajectory:
        with torch_threads(self.threads):
            return train_teacher(split, self.model, teachers_dir, dim=self.dim, seed=self.seed, device=device,
                                 top_m=self.top_m, callbacks=callbacks, name=self.name, waiting=waiting,
                                 command=self.command, **self.overrides)


def _train_side_by_side(rep: Reproduction, tasks: Sequence[TeacherTask], workers: int) -> dict[str, str]:
    """Train ``tasks`` in ``workers`` spawned processes (the teachers are independent; each locks its folder);
    their digests by name. Each worker relays its trainer's events to a progress bar here (``rep.progress``),
    made when the teacher starts. A failure cancels the teachers not yet started and is raised with the teacher's
    name once those in training have finished (their trajectories are kept for the next call)."""
    digests: dict[str, str] = {}
    bars = _RelayedBars(rep.progress)
    context = multiprocessing.get_context("spawn")  # no forked copy of this process's threads and locks
    events = context.Queue()
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_relay_to,
                                 initargs=(events,)) as pool:
            futures = {pool.submit(_train_in_worker, rep.inputs, str(rep.teachers_dir), task): task
                       for task in tasks}
            pending = set(futures)
            try:
                while pending:
                    finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
                    bars.replay(events)
                    for future in finished:
                        task = futures[future]
                        try:
                            digests[task.name], seconds = future.result()
                        except Exception as error:
                            raise HetCompError(f"teacher {task.name} failed in its worker process: {error}") from error
                        rep.say(f"teacher {task.name} trained ({seconds:.0f} s, digest {digests[task.name]})")
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:  # the workers have exited, flushing what they relayed last
        bars.replay(events)
    return digests


_events = None  # a worker process's queue to the driver (set by the pool's initializer)


def _relay_to(events) -> None:
    global _events
    _events = events


class _Relay(Callback):
    """A worker's trainer events, sent to the driver as plain tuples (the trainer itself stays here)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def on_fit_start(self, trainer) -> None:
        _events.put((self.name, "start", trainer.state.epoch, trainer.config.max_epochs, trainer.config.monitor))

    def on_epoch_end(self, trainer, epoch: int, loss: float) -> None:
        _events.put((self.name, "epoch", epoch, float(loss)))

    def on_evaluate(self, trainer, epoch: int, result: dict, improved: bool) -> None:
        _events.put((self.name, "evaluate", epoch, {"valid": dict(result["valid"])}, improved,
                     getattr(trainer.objective, "describe", lambda: "")()))

    def on_fit_end(self, trainer) -> None:
        _events.put((self.name, "end", trainer.state.epoch, trainer.state.best_epoch))


class _RelayedBars:
    """The driver's side of :class:`_Relay`: each teacher's progress bar (made by ``progress`` at its first
    event), told the relayed events with a stand-in for the worker's trainer that holds what they say (epoch,
    limit, monitor, best epoch)."""

    def __init__(self, progress: Callable[[str, int], Callback | None]) -> None:
        self.progress = progress
        self.bars: dict[str, tuple[Callback | None, SimpleNamespace]] = {}

    def replay(self, events) -> None:
        """Hand every event relayed so far to its teacher's bar."""
        while True:
            try:
                name, kind, *event = events.get_nowait()
            except queue.Empty:
                return
            if name not in self.bars:
                total = event[1] if kind == "start" else 0
                self.bars[name] = (self.progress(f"teacher {name}", total), SimpleNamespace(
                    state=SimpleNamespace(epoch=0, best_epoch=0),
                    config=SimpleNamespace(max_epochs=total, monitor="recall@50"),
                    objective=SimpleNamespace(describe=lambda: "")))
            bar, trainer = self.bars[name]
            if bar is not None:
                self._tell(bar, trainer, kind, event)

    @staticmethod
    def _tell(bar: Callback, trainer: SimpleNamespace, kind: str, event: list) -> None:
        if kind == "start":
            trainer.state.epoch, trainer.config.max_epochs, trainer.config.monitor = event
            bar.on_fit_start(trainer)
        elif kind == "epoch":
            trainer.state.epoch = event[0]
            bar.on_epoch_end(trainer, *event)
        elif kind == "evaluate":
            epoch, result, improved, described = event
            trainer.objective.describe = lambda: described
            bar.on_evaluate(trainer, epoch, result, improved)
        elif kind == "end":
            trainer.state.epoch, trainer.state.best_epoch = event
            bar.on_fit_end(trainer)


def _train_in_worker(inputs: Inputs, teachers_dir: str, task: TeacherTask) -> tuple[str, float]:
    split, _ = inputs.load([])
    relay = [_Relay(task.name)] if _events is not None else None
    trajectory = task.train(split, Path(teachers_dir), torch.device("cpu"), relay, None)
    return trajectory_digest(trajectory)[:12], float(trajectory.meta.get("train_seconds") or 0.0)


def _committed_threads(committed: tuple[str, str] | None) -> int | None:
    """The thread count the committed teachers page lists for a teacher, None where it names none."""
    return int(committed[1]) if committed is not None and committed[1].isdigit() else None


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` (None: left alone) for the block, restored after it."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def teacher_rows(rep: Reproduction, trajectories: list) -> dict[str, dict]:
    """Test metrics of the best teacher (by validation R@50) and of the converged ensemble."""
    finals = {t.name: t.meta["metrics"][-1] for t in trajectories if t.meta.get("metrics")}
    best = max(finals, key=lambda name: finals[name]["valid"]["recall@50"])
    ensemble = evaluate_split(EnsembleConfig().scorer(rep.split, trajectories), rep.split)
    return {"Best Teacher": {"name": best, **finals[best]["test"]}, "Ensemble": ensemble["test"]}
