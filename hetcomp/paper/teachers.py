"""The teachers of a reproduction: trained or reused, and their rows of Table 2."""

from __future__ import annotations

from collections.abc import Sequence

from hetcomp.distill import EnsembleConfig
from hetcomp.errors import HetCompError
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
    dataset = rep.split.meta["dataset"]
    absent = [name for name in names if not trajectory_file(rep.teachers_dir, dataset, name).is_file()]
    if absent and not rep.train:
        raise HetCompError(f"teacher(s) {', '.join(absent)} not trained under {rep.teachers_dir}; --no-train uses "
                           "finished runs only: drop it, or train them first with `hetcomp train-teachers`")
    for name in absent:
        model, train_seed = parse_seeded_name(name, seed)
        rep.say(f"training teacher {name}")
        overrides = {**({} if rep.schedule.quick else dataset_teacher_settings(rep.dataset)),
                     **rep.schedule.teacher_overrides}
        callback = rep.progress(f"teacher {name}", overrides.get("max_epochs", 300))
        train_teacher(rep.split, model, rep.teachers_dir, dim=rep.schedule.teacher_dim, seed=train_seed,
                      device=rep.device, top_m=rep.teacher_top_m, callbacks=[callback] if callback else None,
                      name=name, waiting=rep.say,
                      command=f"hetcomp train-teachers --dataset {rep.dataset} --teachers {model}"
                              + (f" --train-seed {train_seed}" if train_seed != seed else ""),
                      **overrides)
    trajectories = load_teachers(rep.split, rep.teachers_dir, list(names))
    for trajectory in trajectories:
        if shares_state_epochs(trajectory):
            rep.say(f"warning: {trajectory.name}'s states share epochs {trajectory.meta['state_epochs']}; retrain "
                    "it with a smaller --eval-every (hetcomp train-teachers) so that E1..E4 differ")
    return trajectories


def teacher_rows(rep: Reproduction, trajectories: list) -> dict[str, dict]:
    """Test metrics of the best teacher (by validation R@50) and of the converged ensemble."""
    finals = {t.name: t.meta["metrics"][-1] for t in trajectories if t.meta.get("metrics")}
    best = max(finals, key=lambda name: finals[name]["valid"]["recall@50"])
    ensemble = evaluate_split(EnsembleConfig().scorer(rep.split, trajectories), rep.split)
    return {"Best Teacher": {"name": best, **finals[best]["test"]}, "Ensemble": ensemble["test"]}
