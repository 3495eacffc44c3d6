"""The teachers of a reproduction: trained or reused, and their rows of Table 2."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from hetcomp.distill import EnsembleConfig
from hetcomp.errors import HetCompError
from hetcomp.experiments import committed_teacher_digests
from hetcomp.metrics import evaluate_split
from hetcomp.paper.common import Reproduction
from hetcomp.provenance import cpu
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


def ensure_teachers(rep: Reproduction, names: Sequence[str] = TEACHERS, seed: int = 0) -> list:
    """Train (or reuse) the teachers ``names`` (``<model>`` or ``<model>-s<seed>``) and load them."""
    dataset = rep.split.meta["dataset"]
    absent = [name for name in names if not trajectory_file(rep.teachers_dir, dataset, name).is_file()]
    if absent and not rep.train:
        raise HetCompError(f"teacher(s) {', '.join(absent)} not trained under {rep.teachers_dir}; --no-train uses "
                           "finished runs only: drop it, or train them first with `hetcomp train-teachers`")
    page, committed = ({}, {}) if rep.schedule.quick else committed_teacher_digests(dataset)
    for name in absent:
        model, train_seed = parse_seeded_name(name, seed)
        threads = _committed_threads(committed.get(name))
        rep.say(f"training teacher {name}" + (f" with {threads} thread(s), as the committed one was ({page}): a "
                                              "teacher's rankings depend on the thread count" if threads else ""))
        overrides = {**({} if rep.schedule.quick else dataset_teacher_settings(rep.dataset)),
                     **rep.schedule.teacher_overrides}
        callback = rep.progress(f"teacher {name}", overrides.get("max_epochs", 300))
        with torch_threads(threads):
            trajectory = train_teacher(
                rep.split, model, rep.teachers_dir, dim=rep.schedule.teacher_dim, seed=train_seed,
                device=rep.device, top_m=rep.teacher_top_m, callbacks=[callback] if callback else None, name=name,
                waiting=rep.say, command=f"hetcomp train-teachers --dataset {rep.dataset} --teachers {model}"
                                         + (f" --train-seed {train_seed}" if train_seed != seed else "")
                                         + (f" --threads {threads}" if threads else ""),
                **overrides)
        if name in committed and (digest := trajectory_digest(trajectory)[:12]) != committed[name][0]:
            rep.say(f"warning: teacher {name}'s rankings differ from the committed one's ({page}: {committed[name][0]}"
                    f", this one {digest}, on {cpu()}): the committed studies' settings and rows were made with the "
                    "other (`hetcomp train-teachers --help` says what a teacher's rankings depend on)")
    trajectories = load_teachers(rep.split, rep.teachers_dir, list(names))
    for trajectory in trajectories:
        if shares_state_epochs(trajectory):
            rep.say(f"warning: {trajectory.name}'s states share epochs {trajectory.meta['state_epochs']}; retrain "
                    "it with a smaller --eval-every (hetcomp train-teachers) so that E1..E4 differ")
    return trajectories


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
