"""Training teachers and recording their trajectories (E1..E4), resumable per teacher."""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from hetcomp.data import REGISTRY, Split

# re-exported: their home was this module
from hetcomp.ensemble import teacher_weights as teacher_weights
from hetcomp.ensemble import trajectory_state_metrics as trajectory_state_metrics
from hetcomp.errors import HetCompError
from hetcomp.locks import exclusive_lock
from hetcomp.models import build_model
from hetcomp.provenance import check_sources_unchanged, dataset_slug, machine, packages
from hetcomp.train import Callback, Trainer, train_model
from hetcomp.trajectory import (
    Trajectory,
    TrajectoryError,
    load_trajectory,
    make_trajectory,
    rank_observed,
    state_epochs,
)

TEACHERS = ("mf", "ml", "dnn", "gnn", "ae", "iae")
TRAJECTORY_FILE = "trajectory.npz"


def check_teacher_name(name: str) -> str:
    """A teacher's name is its folder under ``<teachers-dir>/<dataset>/``: a plain folder name (letters, digits,
    ``-``, ``_`` and ``.``, not leading with ``.``), never a path."""
    if not re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]*", name):
        raise TrajectoryError(f"teacher name {name!r}: use a plain folder name of letters, digits, '-', '_' and "
                              "'.' (not first), e.g. mytool-v2; it names the folder under <teachers-dir>/<dataset>/")
    return name


def teacher_dir(root: Path, dataset: str, teacher: str) -> Path:
    return Path(root) / dataset_slug(dataset) / teacher


def trajectory_file(root: Path, dataset: str, teacher: str) -> Path:
    """Where a trained teacher's trajectory lives (its presence means the teacher is finished)."""
    return teacher_dir(root, dataset, teacher) / TRAJECTORY_FILE


class TrajectoryRecorder(Callback):
    """Keeps every evaluation's top-M ranking on disk; at the end writes the E1..E4 trajectory.

    Snapshots go to ``run_dir/snapshots/epoch_NNNN.npy`` so a killed run resumes with them. Once the
    trajectory is written, the snapshots and the resume checkpoint are deleted (the trajectory holds the four
    chosen states; ``best.pt`` keeps the converged weights).
    """

    def __init__(self, run_dir: Path, meta: dict) -> None:
        self.run_dir = Path(run_dir)
        self.snapshots = self.run_dir / "snapshots"
        self.meta = meta
        self.trajectory: Trajectory | None = None

    def on_evaluate(self, trainer: Trainer, epoch: int, result: dict, improved: bool) -> None:
        self.snapshots.mkdir(parents=True, exist_ok=True)
        tmp = self.snapshots / f"epoch_{epoch:04d}.tmp.npy"
        np.save(tmp, result["ranking"].numpy())
        tmp.replace(self.snapshots / f"epoch_{epoch:04d}.npy")

    def on_fit_end(self, trainer: Trainer) -> None:
        history = {entry["epoch"]: entry for entry in trainer.state.history}
        converged = trainer.state.best_epoch
        epochs = state_epochs(converged, sorted(history))
        states = [torch.from_numpy(_read_snapshot(self.snapshots / f"epoch_{epoch:04d}.npy", self.run_dir))
                  for epoch in epochs]
        observed = rank_observed(trainer.model.score, trainer.split.train, device=trainer.device)
        meta = dict(self.meta)
        meta.update({
            "state_epochs": epochs, "converged_epoch": converged, "epochs_trained": trainer.state.epoch,
            "train_seconds": round(trainer.state.seconds, 1), "eval_seconds": round(trainer.state.eval_seconds, 1),
            "metrics": [{"valid": history[e]["valid"], "test": history[e]["test"]} for e in epochs],
        })
        self.trajectory = make_trajectory(states, observed, trainer.split, meta)
        self.trajectory.save(self.run_dir / TRAJECTORY_FILE)
        shutil.rmtree(self.snapshots, ignore_errors=True)
        (self.run_dir / "last.pt").unlink(missing_ok=True)


def _read_snapshot(path: Path, run_dir: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        raise TrajectoryError(f"{path}: cannot read this snapshot of the teacher run ({error}); delete the folder "
                              f"{run_dir} to retrain the teacher") from None


def dataset_teacher_settings(dataset: str, eval_every: int | None = None) -> dict:
    """Training settings a dataset asks of every teacher (its registered ``teacher_eval_every``), ``eval_every``
    (e.g. from the command line) taking precedence; empty for unregistered data (each model's defaults)."""
    spec = REGISTRY.get(dataset)
    every = eval_every or (spec.teacher_eval_every if spec else None)
    return {"eval_every": every} if every else {}


#: items kept per user and state in a trained teacher's trajectory unless the catalogue is smaller
DEFAULT_TOP_M = 200


def trained_top_m(split: Split, top_m: int | None = None) -> int:
    """Items per user and state that a teacher trained on ``split`` keeps: ``top_m``, by default
    :data:`DEFAULT_TOP_M` or, on a small catalogue, every unobserved item of the user with the most training
    items (a trajectory ranks unobserved items only, so more could never be loaded)."""
    fits = split.fewest_unobserved
    if top_m is None:
        return min(DEFAULT_TOP_M, fits)
    if top_m > fits:
        raise HetCompError(f"--top-m {top_m}: the catalogue has {split.n_items} items and a user has "
                           f"{split.n_items - fits} training items, so a ranking of unobserved items holds at most "
                           f"{fits}; use --top-m {fits} or less")
    return top_m


def shares_state_epochs(trajectory: Trajectory) -> bool:
    """True when two of a teacher's states were taken at the same epoch (it converged within a few evaluations),
    so its trajectory has fewer distinct steps than states."""
    epochs = trajectory.meta.get("state_epochs") or []
    return len(set(epochs)) < len(epochs)


def seeded_name(teacher: str, seed: int, split_seed: int) -> str:
    """Folder name of a teacher: the model name, plus ``-s<seed>`` when trained with another seed than the split's
    (e.g. the MF teachers of several seeds that Table 1's ensemble of MF teachers needs)."""
    return teacher if seed == split_seed else f"{teacher}-s{seed}"


def parse_seeded_name(name: str, split_seed: int = 0) -> tuple[str, int]:
    """The inverse of :func:`seeded_name`: (model, training seed) of a teacher folder name."""
    model, _, seed = name.partition("-s")
    return model, int(seed) if seed.isdigit() else split_seed


def train_teacher(split: Split, teacher: str, root: Path, dim: int = 64, seed: int = 0,
                  device: torch.device | str = "cpu", top_m: int = DEFAULT_TOP_M,
                  callbacks: list[Callback] | None = None, command: str = "", name: str | None = None,
                  waiting: Callable[[str], None] | None = print,
                  **overrides) -> Trajectory:
    """Train one teacher (resuming a killed run) and return its trajectory; reuse a finished one.

    ``name`` is its folder under ``root/<dataset>/`` (default: the model name). One process at a time trains a
    teacher folder; another caller is told (``waiting``) and waits for it."""
    run_dir = teacher_dir(root, split.meta["dataset"], name or teacher)
    done = run_dir / TRAJECTORY_FILE
    if done.is_file():
        return _finished_teacher(done, split, dim, seed)
    with exclusive_lock(run_dir / ".lock", waiting):
        if done.is_file():  # trained by the process this one waited for
            return _finished_teacher(done, split, dim, seed)
        return _train_teacher(split, teacher, run_dir, dim, seed, device, top_m, callbacks, command, overrides)


def _finished_teacher(done: Path, split: Split, dim: int, seed: int) -> Trajectory:
    trajectory = load_trajectory(done, split)
    if trajectory.meta.get("dim") == dim and trajectory.meta.get("train_seed") == seed:
        return trajectory
    raise TrajectoryError(f"{done} was trained with dim {trajectory.meta.get('dim')} and seed "
                          f"{trajectory.meta.get('train_seed')}, not dim {dim} and seed {seed}; move it away "
                          f"or pass --teachers-dir to another folder")


def _train_teacher(split: Split, teacher: str, run_dir: Path, dim: int, seed: int, device: torch.device | str,
                   top_m: int, callbacks: list[Callback] | None, command: str, overrides: dict) -> Trajectory:
    check_sources_unchanged()
    torch.manual_seed(seed)
    model = build_model(teacher, split.train, dim=dim, **overrides)
    config = {k: v for k, v in vars(model.config).items()}
    check_partial_run(run_dir, {"teacher": teacher, "config": config, "seed": seed, "top_m": top_m})
    (run_dir).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"teacher": teacher, "config": config, "seed": seed,
                                                     "top_m": top_m}, indent=1))
    recorder = TrajectoryRecorder(run_dir, {"teacher": teacher, "dim": dim, "train_seed": seed, "config": config,
                                            "n_parameters": model.n_parameters(), "source": command,
                                            "threads": torch.get_num_threads(),  # the rankings depend on it
                                            # and so do the kernels' level and the packages (not in the digest)
                                            "machine": machine(), "packages": packages(),
                                            "created": time.strftime("%Y-%m-%d %H:%M:%S")})
    train_model(model, split, device=device, seed=seed, callbacks=[recorder, *(callbacks or [])], run_dir=run_dir,
                top_m=top_m)
    assert recorder.trajectory is not None
    return recorder.trajectory


def check_partial_run(run_dir: Path, asked: dict) -> None:
    """A killed teacher resumes only with the settings it started with: compare its ``config.json`` and the top-M
    of its snapshots with ``asked`` (teacher, seed, top_m, config) before training, not at the end of the run."""
    snapshots = sorted((run_dir / "snapshots").glob("epoch_*[0-9].npy"))
    if not snapshots and not (run_dir / "last.pt").is_file():
        return
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        saved = {}
    asked = json.loads(json.dumps(asked))  # tuples as lists, as config.json holds them
    flat_saved = {**saved.get("config", {}), **{k: v for k, v in saved.items() if k != "config"}}
    flat_asked = {**asked["config"], **{k: v for k, v in asked.items() if k != "config"}}
    for snapshot in snapshots:  # headers only; folders from before top_m was recorded have it here too
        try:
            flat_saved.setdefault("top_m", int(np.load(snapshot, mmap_mode="r").shape[1]))
        except (OSError, ValueError, IndexError) as error:
            raise TrajectoryError(f"{snapshot}: a snapshot of the unfinished teacher run in {run_dir} cannot be "
                                  f"read ({error}); delete the folder {run_dir} to retrain the teacher") from None
    differ = [key for key in flat_asked if key in flat_saved and flat_saved[key] != flat_asked[key]]
    if differ:
        def show(values: dict) -> str:
            return ", ".join(f"{key.replace('_', '-')} {values[key]}" for key in differ)

        raise TrajectoryError(f"{run_dir} holds an unfinished run of this teacher started with {show(flat_saved)}, "
                              f"but this call asks for {show(flat_asked)}: rerun with the same settings to resume "
                              "it, or delete the folder to start over with the new ones")


def load_teachers(split: Split, root: Path, teachers: tuple[str, ...] | list[str] = TEACHERS) -> list[Trajectory]:
    """Load and validate the trajectories of ``teachers`` for this split."""
    out = []
    for teacher in teachers:
        path = trajectory_file(root, split.meta["dataset"], teacher)
        trajectory = load_trajectory(path, split)
        trajectory.meta["name"] = teacher
        out.append(trajectory)
    return out


def top_overlap(trajectories: list[Trajectory], k: int = 50) -> float:
    """Mean pairwise overlap |top-k(a) ∩ top-k(b)| / k of the converged teachers, averaged over users."""
    tops = [t.states[-1, :, :k].long() for t in trajectories]
    overlaps = []
    for a in range(len(tops)):
        for b in range(a + 1, len(tops)):
            shared = (tops[a].unsqueeze(2) == tops[b].unsqueeze(1)).any(2).sum(1).double() / k
            overlaps.append(float(shared.mean()))
    return float(np.mean(overlaps)) if overlaps else float("nan")
