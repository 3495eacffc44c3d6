"""Running one :class:`~hetcomp.runs.spec.RunSpec`: student + method + shared trainer, in its own run folder
(reused when finished, resumed from ``last.pt`` when interrupted, one process at a time)."""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hetcomp.data import Split
from hetcomp.device import peak_memory_mb
from hetcomp.distill import DistillContext, EnsembleConfig, build_method, method_class
from hetcomp.errors import HetCompError
from hetcomp.models import build_model
from hetcomp.provenance import CODE_DIGEST, check_sources_unchanged, git_commit, machine, packages
from hetcomp.runs.spec import (
    DEFAULT_BATCH_USERS,
    DEFAULT_EVAL_EVERY,
    DEFAULT_MAX_EPOCHS,
    DEFAULT_PATIENCE,
    RunSpec,
    make_spec,
    twin_spec,
)
from hetcomp.runs.store import RunStore
from hetcomp.runs.tuned import summary_path
from hetcomp.train import Callback, Trainer, TrainerConfig


def train_run(spec: RunSpec, split: Split, trajectories: Sequence, store: RunStore,
              device: torch.device | str = "cpu", callbacks: list[Callback] | None = None, train: bool = True,
              say: Callable[[str], None] | None = None) -> dict | None:
    """The metrics of ``spec``'s run: reused when finished, else trained (resuming its ``last.pt``); None when
    it is not finished and ``train`` is off. ``split`` and ``trajectories`` must be the spec's own (a method that
    reads no teachers ignores any given)."""
    trajectories = _own_inputs(spec, split, trajectories)
    finished = store.finished(spec)
    if finished is not None or not train:
        return finished
    twin = twin_spec(spec)
    twin_result = store.finished(twin) if twin is not None else None
    with store.claim(spec, say) as folder:
        finished = store.finished(spec)  # another process may have finished it while this one waited
        if finished is not None:
            return finished
        if twin_result is not None:
            return _adopt(spec, twin, twin_result, store, folder)
        return _train(spec, split, trajectories, store, folder, torch.device(device), callbacks)


def _own_inputs(spec: RunSpec, split: Split, trajectories: Sequence) -> Sequence:
    """The trajectories ``spec``'s run reads (none for a method that reads no teachers), checked with the split
    against the specification."""
    if not method_class(spec.method).reads_teachers:
        trajectories = ()
    if (split.fingerprint, tuple(t.name for t in trajectories)) != (spec.split_fingerprint, spec.teachers):
        raise HetCompError(f"the split or teachers given differ from the run specification {spec.identity}")
    return trajectories


def _adopt(spec: RunSpec, twin: RunSpec, twin_result: dict, store: RunStore, folder: Path) -> dict:
    """``spec``'s run from its twin's finished one (a method that trains exactly as another at these settings,
    e.g. DCD at ``dcd_weight=0`` as RRD): the same student and metrics, under this spec's identity and command,
    with the twin named (``trained_as``). Its times, commit and machine stay the twin's: that training made
    these numbers; this call trained nothing."""
    result = {**twin_result, "run": spec.folder_name, "identity": spec.identity, "method": spec.method,
              "method_version": spec.method_version, "method_options": spec.method_options,
              "command": spec.command(), "this_call_seconds": 0.0,
              "trained_as": {"method": twin.method, "run": twin.folder_name, "identity": twin.identity,
                             "command": twin.command()}}
    student = store.folder(twin) / "student.pt"
    if student.is_file():
        shutil.copyfile(student, folder / "student.pt")
    (folder / "last.pt").unlink(missing_ok=True)
    store.write_metrics(spec, result)
    return result


def _trainer(spec: RunSpec, split: Split, context: DistillContext, device: torch.device,
             callbacks: list[Callback] | None, folder: Path) -> Trainer:
    """The ordinary trainer of ``spec``'s run (its student initialized under its seed)."""
    torch.manual_seed(spec.seed)
    model = build_model(spec.student, split.train, **dict(spec.student_config))
    objective = build_method(spec.method, context, **dict(spec.method_config))
    config = TrainerConfig(lr=spec.lr, weight_decay=spec.weight_decay, max_epochs=spec.max_epochs,
                           eval_every=spec.eval_every, patience=spec.patience, top_m=objective.evaluation_top_m,
                           seed=spec.seed)
    return Trainer(model, split, objective, config, device, callbacks, folder)


def fresh_trainer(spec: RunSpec, split: Split, trajectories: Sequence, device: torch.device | str = "cpu") -> Trainer:
    """The trainer of ``spec``'s run at its first epoch, with no run folder (it writes nothing): for timing its
    epochs (``reproduce --price``), not for training a run, which :func:`train_run` records and resumes."""
    trajectories = _own_inputs(spec, split, trajectories)
    device = torch.device(device)
    return _trainer(spec, split, _context(spec, split, trajectories, device), device, None, None)


def _context(spec: RunSpec, split: Split, trajectories: Sequence, device: torch.device) -> DistillContext:
    return DistillContext(split, list(trajectories), device, spec.ensemble_config(), spec.batch_users,
                          needs_teachers=method_class(spec.method).reads_teachers)


def _train(spec: RunSpec, split: Split, trajectories: Sequence, store: RunStore, folder: Path,
           device: torch.device, callbacks: list[Callback] | None) -> dict:
    check_sources_unchanged()
    trainer = _trainer(spec, split, _context(spec, split, trajectories, device), device, callbacks, folder)
    started = time.perf_counter()
    trainer.fit()
    return _write_run(spec, trainer, store, folder, started)


def _write_run(spec: RunSpec, trainer: Trainer, store: RunStore, folder: Path, started: float,
               stacked_with: Sequence[int] = ()) -> dict:
    """Evaluate the trainer's model (at its best state) and write the finished run: metrics.json, student.pt."""
    model, objective, state = trainer.model, trainer.objective, trainer.state
    final = trainer.evaluate()
    result = {
        "run": spec.folder_name, "identity": spec.identity, "dataset": spec.dataset,
        "split_fingerprint": spec.split_fingerprint, "student": spec.student, "method": spec.method,
        "method_version": spec.method_version, "dim": spec.dim, "seed": spec.seed, "split_seed": spec.split_seed,
        "teachers": list(spec.teachers), "teachers_digest": spec.teachers_digest,
        "method_options": spec.method_options, "ensemble": dict(spec.ensemble), "lr": spec.lr,
        "batch_users": spec.batch_users, "weight_decay": spec.weight_decay,
        "best_epoch": state.best_epoch, "epochs": state.epoch, "max_epochs": spec.max_epochs,
        "stopped_by": "early stopping" if state.stopped else "max_epochs",
        "valid": final["valid"], "test": final["test"],
        "n_parameters": model.n_parameters(), "train_seconds": round(state.seconds, 1),
        "eval_seconds": round(state.eval_seconds, 1),
        # training + evaluation over every resumed segment (a resumed run's own call is shorter); a stacked
        # run's training seconds are its share of the stack's epochs
        "wall_seconds": round(state.seconds + state.eval_seconds, 1),
        # the same spans in the process's CPU time, which a core shared with other work does not inflate (None:
        # resumed from a checkpoint made before it was counted)
        "cpu_seconds": None if state.cpu_seconds is None else round(state.cpu_seconds, 1),
        "this_call_seconds": round(time.perf_counter() - started, 1),
        "resumed_from_epoch": trainer.resumed_from_epoch,
        "seconds_per_epoch": round(state.seconds / max(state.epoch, 1), 3),
        "peak_memory_mb": round(peak_memory_mb()),  # of this process (the whole run when it ran alone)
        "device": str(trainer.device), "command": spec.command(), "commit": git_commit(), "code_digest": CODE_DIGEST,
        "machine": machine(), "packages": packages(),
        "curve": [{"epoch": h["epoch"], "valid_recall@50": h["valid"]["recall@50"],
                   "test_recall@50": h["test"]["recall@50"]} for h in state.history],
    }
    if stacked_with:
        result["stacked_with"] = list(stacked_with)  # the seeds whose runs trained as one model with this one
    if hasattr(objective, "knowledge"):
        result["dkc_log"] = objective.knowledge.log
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, folder / "student.pt")
    store.write_metrics(spec, result)
    (folder / "last.pt").unlink(missing_ok=True)
    return result


def train_stack(specs: Sequence[RunSpec], split: Split, trajectories: Sequence, store: RunStore,
                device: torch.device | str = "cpu", say: Callable[[str], None] | None = None,
                callbacks: Callable[[RunSpec], list[Callback] | None] | None = None) -> list[dict]:
    """The metrics of each of ``specs`` (one run at several seeds, nothing else differing), the unfinished ones
    trained as one stacked model (:mod:`hetcomp.stacked`): each replica writes its own run folder as it stops,
    checkpoints as an ordinary run, and resumes (stacked, or alone with ``train_run``). A run that another
    method's finished run serves (a twin) and a method or student that cannot stack train one by one
    (:func:`train_run`); so does a single unfinished run. ``callbacks(spec)``: the callbacks of a seed's trainer
    (e.g. its progress bar)."""
    if len({dataclasses.replace(spec, seed=0) for spec in specs}) > 1 or len({s.seed for s in specs}) < len(specs):
        raise HetCompError("a stack holds runs of one specification at different seeds")
    results: dict[int, dict] = {}
    alone = [spec for spec in specs if twin_spec(spec) is not None or store.finished(spec) is not None]
    stack = [spec for spec in specs if spec not in alone]
    if len(stack) < 2 or not stack[0].stacks_seeds:
        alone, stack = list(specs), []
    callbacks = callbacks or (lambda spec: None)
    for spec in alone:
        results[spec.seed] = train_run(spec, split, trajectories, store, device, callbacks(spec), say=say)
    if stack:
        _train_stacked(stack, split, trajectories, store, torch.device(device), say, callbacks, results)
    return [results[spec.seed] for spec in specs]


def _train_stacked(specs: Sequence[RunSpec], split: Split, trajectories: Sequence, store: RunStore,
                   device: torch.device, say: Callable[[str], None] | None,
                   callbacks: Callable[[RunSpec], list[Callback] | None], results: dict[int, dict]) -> None:
    from hetcomp.stacked import StackedTrainer, resume_groups

    for spec in specs:
        trajectories = _own_inputs(spec, split, trajectories)
    with contextlib.ExitStack() as claims:
        # one lock order for every process, so that two stacks sharing runs cannot wait for each other
        folders = {spec.seed: claims.enter_context(store.claim(spec, say))
                   for spec in sorted(specs, key=lambda spec: spec.folder_name)}
        left = []
        for spec in specs:  # another process may have finished some while this one waited
            finished = store.finished(spec)
            if finished is not None:
                results[spec.seed] = finished
            else:
                left.append(spec)
        if not left:
            return
        check_sources_unchanged()
        context = _context(left[0], split, trajectories, device)
        by_seed = {spec.seed: spec for spec in left}
        trainers = [_trainer(spec, split, context, device, callbacks(spec), folders[spec.seed]) for spec in left]
        started = time.perf_counter()

        def write(trainer: Trainer, stacked_with: Sequence[int]) -> None:
            spec = by_seed[trainer.config.seed]
            results[spec.seed] = _write_run(spec, trainer, store, folders[spec.seed], started, stacked_with)

        for group in resume_groups(trainers):
            seeds = [trainer.config.seed for trainer in group]
            try:
                stacked = StackedTrainer(group)
            except HetCompError as error:  # e.g. a student whose scoring has no vmap rule
                if say is not None:
                    say(f"{left[0].student}-{left[0].method}: seeds {seeds} train one by one ({error})")
                for trainer in group:
                    trainer.fit()
                    write(trainer, ())
                continue
            stacked.fit(lambda trainer, seeds=seeds: write(trainer, seeds))


def distill(split: Split, trajectories: list, student: str = "mf", method: str = "hetcomp", dim: int = 6,
            seed: int = 0, device: torch.device | str = "cpu", runs_root: Path = Path("experiments/runs"),
            method_options: dict | None = None, ensemble: EnsembleConfig | None = None,
            batch_users: int = DEFAULT_BATCH_USERS, lr: float | None = None, weight_decay: float | None = None,
            max_epochs: int = DEFAULT_MAX_EPOCHS, eval_every: int = DEFAULT_EVAL_EVERY,
            patience: int = DEFAULT_PATIENCE,
            callbacks: list[Callback] | None = None, train: bool = True, source: dict | None = None,
            say: Callable[[str], None] | None = None, model_options: dict | None = None,
            tuning_dir: Path | None = None) -> dict | None:
    """Train a student with ``method`` (or reuse its finished run); returns its metrics (None: not finished and
    ``train`` is off). The arguments become a :class:`RunSpec`; see :func:`~hetcomp.runs.spec.make_spec`.

    Batches are ``batch_users`` users, each user once per epoch (the released code instead rescored ~900
    users per 1,024 interactions, each user ~13 times per epoch: 13× the compute). With one update per user
    per epoch, the released lr of 1e-3 moves user embeddings ~10× less per epoch; lr 1e-2 restores the per-epoch
    movement (on CiteULike with three teachers, valid R@50 after 10 epochs: 0.069 at lr 1e-3, 0.093 at 1e-2;
    512-user batches at 1e-2: 0.069). No weight decay by default (the release used Adam's 1e-5): Adam adds the
    decay to the gradient of *every* row at every step, while a user's distillation gradient arrives once per
    epoch and, with losses averaged over the batch's users, 64× smaller than the release's per-user sums. A method
    that trains the student on its own loss mostly (w/o KD, RD) uses the model's own recipe instead (its lr and
    weight decay, as a teacher): for the MF student that gave valid R@50 0.1307 at lr 1e-3 against 0.1085 at 1e-2.
    """
    spec = make_spec(split, trajectories, student, method, dim, seed, method_options, ensemble, batch_users, lr,
                     weight_decay, max_epochs, eval_every, patience, source, model_options=model_options,
                     tuning_dir=tuning_dir)
    if say is not None:
        say(settings_origin(spec, tuning_dir))
    return train_run(spec, split, trajectories, RunStore(runs_root), device, callbacks, train, say)


def settings_origin(spec: RunSpec, tuning_dir: Path | None = None) -> str:
    """Where a run's lr, weight decay and method options come from, for its log: a study's choice (those not
    given on the command line), or the built-in settings where no study exists, with the command that makes one."""
    path = summary_path(spec.dataset, spec.student, spec.method, spec.dim, tuning_dir)
    if path.is_file():
        return f"settings: the choice of the study in {path}, where not given on the command line"
    return (f"settings: built-in, no study at {path} (`hetcomp tune --dataset {spec.dataset} --student "
            f"{spec.student} --method {spec.method} --dim {spec.dim}` chooses them on validation)")
