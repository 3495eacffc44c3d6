"""A student run's identity: the configuration hash of its ledger row and the command that reruns it.

The hash covers the dataset split, the teachers' settings and the run's settings, so a row whose hash matches is
reused even when its run folder is gone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from hetcomp.distill import method_class
from hetcomp.paper.common import Reproduction
from hetcomp.paper.ledger import CURVE_COLUMNS, TABLE2_COLUMNS, locked, read_rows, row_key, write_rows
from hetcomp.paper.teachers import teacher_identity
from hetcomp.runs import default_recipe, distill
from hetcomp.teachers import TEACHERS

#: settings added to a model's configuration after teachers had been trained without them, each with the value
#: that keeps the earlier behaviour. A row hashed with a teacher that lacked the key is the same run as one with
#: a teacher that has it at this value (CiteULike's RD rows rerun bit for bit with retrained teachers, 2026-11-27),
#: so :func:`adopt_earlier_rows` gives such rows the current hash instead of retraining them.
LATER_TEACHER_SETTINGS = {"score_scale": 10.0}


def run_identity(rep: Reproduction, trajectories: list, student: str, method: str, seed: int, dim: int,
                 options: dict) -> dict:
    """Everything that decides a student run's result (hashed into its configuration)."""
    identity = {"split": rep.split.fingerprint, "teachers": teacher_identity(trajectories), "student": student,
                "method": method, "dim": dim, "seed": seed, "options": options,
                "recipe": default_recipe(student, method),
                "max_epochs": rep.schedule.max_epochs, "eval_every": rep.schedule.eval_every}
    if (version := method_class(method).version) != 1:
        identity["method_version"] = version
    return identity


def _identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_config(rep: Reproduction, trajectories: list, student: str, method: str, seed: int, dim: int,
               options: dict) -> tuple[str, str]:
    """(configuration hash, the ``hetcomp distill`` command) of one student run."""
    digest = _identity_hash(run_identity(rep, trajectories, student, method, seed, dim, options))
    if rep.schedule.quick:  # a quick slice is not a registered dataset: only reproduce itself reruns it
        return digest, rep.command
    names = [t.name for t in trajectories]
    command = (f"hetcomp distill --dataset {rep.dataset} --student {student} --dim {dim} --method {method} "
               f"--seed {seed}")
    if names != list(TEACHERS):
        command += f" --teachers {','.join(names)}"
    command += "".join(f" -o {key}={json.dumps(value)}" for key, value in options.items())
    if rep.schedule.max_epochs != 1000:
        command += f" --max-epochs {rep.schedule.max_epochs}"
    return digest, command


def earlier_config(rep: Reproduction, trajectories: list, student: str, method: str, seed: int, dim: int,
                   options: dict) -> str:
    """The run's configuration hash from before :data:`LATER_TEACHER_SETTINGS` (run_config's when unaffected)."""
    identity = run_identity(rep, trajectories, student, method, seed, dim, options)
    missing = object()
    for teacher in identity["teachers"]:
        if isinstance(teacher["config"], dict):  # an imported teacher has none
            teacher["config"] = {key: value for key, value in teacher["config"].items()
                                 if LATER_TEACHER_SETTINGS.get(key, missing) != value}
    return _identity_hash(identity)


def adopt_earlier_rows(rep: Reproduction, trajectories: list, plan: Sequence[tuple], dim: int) -> int:
    """Give the current configuration hash to rows of ``plan`` hashed before a later teacher setting existed
    (the same runs, see :data:`LATER_TEACHER_SETTINGS`), in table2.csv and curves.csv; returns how many."""
    renamed = {}
    for student, method, seed, config, _ in plan:
        earlier = earlier_config(rep, trajectories, student, method, seed, dim, rep.schedule.options(method))
        if earlier != config:
            renamed[(student, method, str(seed), earlier)] = config
    if not renamed:
        return 0
    table_file, curves_file = rep.out_dir / "table2.csv", rep.out_dir / "curves.csv"
    with locked(rep.out_dir):
        rows = read_rows(table_file)
        present = {row_key(r) for r in rows}
        adopted = {key: config for key, config in renamed.items()
                   if key in present and (*key[:3], config) not in present}
        if not adopted:
            return 0
        for row in rows:
            row["config"] = adopted.get(row_key(row), row["config"])
        write_rows(table_file, rows, TABLE2_COLUMNS)
        curves = read_rows(curves_file)
        for point in curves:
            point["config"] = adopted.get(row_key(point), point["config"])
        write_rows(curves_file, curves, CURVE_COLUMNS)
    rep.say(f"{len(adopted)} row(s) hashed before the teacher setting(s) {', '.join(LATER_TEACHER_SETTINGS)} "
            "existed now carry the current configuration hash (same runs, reused)")
    return len(adopted)


def student_run(rep: Reproduction, trajectories: list, student: str, method: str, seed: int, dim: int = 6,
                options: dict | None = None) -> dict | None:
    """Train (or reuse) one student run; returns its metrics.json content (None: not finished and ``rep.train``
    is off)."""
    options = dict(rep.schedule.options(method), **(options or {}))
    _, command = run_config(rep, trajectories, student, method, seed, dim, options)
    callback = rep.progress(f"{student}-{method} seed {seed}", rep.schedule.max_epochs) if rep.train else None
    try:
        return distill(rep.split, trajectories, student, method, dim, seed, rep.device, rep.runs_dir, options,
                       max_epochs=rep.schedule.max_epochs, eval_every=rep.schedule.eval_every,
                       callbacks=[callback] if callback else None, train=rep.train)
    finally:
        if callback is not None and hasattr(callback, "close"):
            callback.close()
