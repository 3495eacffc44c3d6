"""The teachers of a reproduction: trained or reused, identified, and their rows of Table 2."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import numpy as np

from hetcomp.distill import EnsembleConfig
from hetcomp.metrics import evaluate_split
from hetcomp.paper.common import Reproduction
from hetcomp.teachers import (
    TEACHERS,
    dataset_teacher_settings,
    load_teachers,
    parse_seeded_name,
    shares_state_epochs,
    train_teacher,
    trajectory_file,
)


def ensure_teachers(rep: Reproduction, names: Sequence[str] = TEACHERS, seed: int = 0) -> list:
    """Train (or reuse) the teachers ``names`` (``<model>`` or ``<model>-s<seed>``) and load them."""
    for name in names:
        model, train_seed = parse_seeded_name(name, seed)
        if trajectory_file(rep.teachers_dir, rep.split.meta["dataset"], name).is_file():
            continue
        rep.say(f"training teacher {name}")
        overrides = {**({} if rep.schedule.quick else dataset_teacher_settings(rep.dataset)),
                     **rep.schedule.teacher_overrides}
        callback = rep.progress(f"teacher {name}", overrides.get("max_epochs", 300))
        train_teacher(rep.split, model, rep.teachers_dir, dim=rep.schedule.teacher_dim, seed=train_seed,
                      device=rep.device, callbacks=[callback] if callback else None, name=name,
                      command=f"hetcomp train-teachers --dataset {rep.dataset} --teachers {model}"
                              + (f" --train-seed {train_seed}" if train_seed != seed else ""),
                      **overrides)
    trajectories = load_teachers(rep.split, rep.teachers_dir, list(names))
    for trajectory in trajectories:
        if shares_state_epochs(trajectory):
            rep.say(f"warning: {trajectory.name}'s states share epochs {trajectory.meta['state_epochs']}; retrain "
                    "it with a smaller --eval-every (hetcomp train-teachers) so that E1..E4 differ")
    return trajectories


def teachers_digest(trajectories: Sequence) -> str:
    """sha256 (first 12 hex digits) over the teachers' identities and rankings: which exact teachers a run learnt
    from. The arrays, not the files: two trainings with the same rankings get one digest, although their files
    differ in timing metadata."""
    digest = hashlib.sha256(json.dumps(teacher_identity(trajectories), sort_keys=True, default=str).encode())
    for trajectory in trajectories:
        for array in (trajectory.states.numpy(), trajectory.observed, trajectory.observed_indptr):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:12]


def teacher_identity(trajectories: list) -> list[dict]:
    """What identifies a teacher's training, independent of floating-point noise: name, model, dim, seed, settings."""
    return [{"name": t.name, "teacher": t.teacher, "dim": t.meta.get("dim"), "train_seed": t.meta.get("train_seed"),
             "config": t.meta.get("config")} for t in trajectories]


def teacher_rows(rep: Reproduction, trajectories: list) -> dict[str, dict]:
    """Test metrics of the best teacher (by validation R@50) and of the converged ensemble."""
    finals = {t.name: t.meta["metrics"][-1] for t in trajectories if t.meta.get("metrics")}
    best = max(finals, key=lambda name: finals[name]["valid"]["recall@50"])
    ensemble = evaluate_split(EnsembleConfig().scorer(rep.split, trajectories), rep.split)
    return {"Best Teacher": {"name": best, **finals[best]["test"]}, "Ensemble": ensemble["test"]}
