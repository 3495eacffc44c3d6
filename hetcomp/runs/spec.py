"""One run specification, one identity.

A :class:`RunSpec` holds everything that decides a student run's result, with every default resolved: the split
(its fingerprint), the teachers (names and a digest of their rankings), the ensemble g, the student and its
architecture, the method with its *whole* configuration and its ``version``, the recipe (lr, weight decay, batch),
the seed and the training limits. Its :meth:`~RunSpec.identity` is the one hash of a run: the run folder's name,
the ledger's key. Because defaults are resolved before hashing, changing a default (or retraining the teachers)
gives new identities instead of silently reusing old results, while spelling a default out gives the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hetcomp.config import identity_settings, parse_options
from hetcomp.data import Split
from hetcomp.distill import EnsembleConfig, method_class
from hetcomp.errors import HetCompError
from hetcomp.models import model_class, model_config
from hetcomp.registry import checked_config
from hetcomp.runs.tuned import RECIPE, tuned_defaults
from hetcomp.teachers import TEACHERS

#: the student's recipe when its method distils (Adam); methods that train mostly on the student's own loss
#: (``uses_own_recipe``: w/o KD, RD) take the model's own lr and weight decay instead
KD_LR = 1e-2
KD_WEIGHT_DECAY = 0.0
#: ``hetcomp distill``'s defaults for what is not a config field
DEFAULT_BATCH_USERS = 64
DEFAULT_MAX_EPOCHS = 1000
DEFAULT_EVAL_EVERY = 10
DEFAULT_PATIENCE = 5
#: the dataset options of the command line that are not part of a run's identity (the split fingerprint is)
SOURCE_OPTIONS = ("path", "user_col", "item_col", "sep")


#: model settings a run sets with its own options (a student's lr, weight decay, epochs and batches are the run's,
#: not its model config's, which are a teacher's recipe), not with ``-m``
RUN_SETTINGS = {"dim": "--dim", "lr": "--lr", "weight_decay": "--weight-decay", "batch_size": "--batch-users",
                "max_epochs": "--max-epochs", "eval_every": "--eval-every"}


def student_options(student: str, options: dict | None) -> dict:
    """``-m NAME=VALUE`` settings of the student model (e.g. CML's ``n_negatives``, ``margin``), converted and
    checked against its config; an unknown name, a bad value or a setting the run owns is a HetCompError."""
    options = dict(options or {})
    config_class = model_class(student).config_class
    settable = [f.name for f in dataclasses.fields(config_class) if f.name not in RUN_SETTINGS]
    for name, value in options.items():
        if name in RUN_SETTINGS:
            raise HetCompError(f"-m {name}: the student's {name} is set with {RUN_SETTINGS[name]}, not -m")
        if name not in settable:
            raise HetCompError(f"-m {name}={value}: student {student!r} has no setting {name}; its model settings: "
                               f"{', '.join(settable)}")
    return parse_options(config_class, options, f"student {student!r}", flag="-m")


def default_recipe(student: str, method: str) -> tuple[float, float]:
    """(lr, weight decay) a student trains with by default: the model's own for methods that say so (w/o KD, RD),
    else the distillation recipe."""
    if method_class(method).uses_own_recipe:
        config = model_config(student)
        return config.lr, config.weight_decay
    return KD_LR, KD_WEIGHT_DECAY


def trajectory_digest(trajectory) -> str:
    """sha256 over one teacher's identity (name, model, dim, seed, settings) and its rankings; cached on it.

    The arrays, not the files: two trainings with the same rankings get one digest although their files differ
    in timing metadata, and a retrained teacher whose rankings moved gets a new one."""
    cached = getattr(trajectory, "_digest", None)
    if cached is None:
        identity = {"name": trajectory.name, "teacher": trajectory.teacher, "dim": trajectory.meta.get("dim"),
                    "train_seed": trajectory.meta.get("train_seed"), "config": trajectory.meta.get("config")}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode())
        for array in (trajectory.states.numpy(), trajectory.observed, trajectory.observed_indptr):
            digest.update(np.ascontiguousarray(array).tobytes())
        cached = digest.hexdigest()
        trajectory._digest = cached
    return cached


def teachers_digest(trajectories: Sequence) -> str:
    """12 hex digits over the teachers' digests, in order: which exact teachers a run learnt from."""
    digest = hashlib.sha256("".join(trajectory_digest(t) for t in trajectories).encode())
    return digest.hexdigest()[:12]


def teacher_digests(trajectories: Sequence) -> dict[str, str]:
    """Each teacher's own digest (12 hex digits) by name: which of them differ when two ensembles' digests do."""
    return {t.name: trajectory_digest(t)[:12] for t in trajectories}


def _frozen(mapping: dict) -> tuple[tuple[str, object], ...]:
    return tuple(sorted((key, tuple(value) if isinstance(value, list) else value) for key, value in mapping.items()))


def _canonical(value) -> str:
    """JSON that is equal exactly when the values are (tuples as lists, keys sorted, floats by repr)."""
    return json.dumps(value, sort_keys=True, default=str, allow_nan=True)


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides one student run, defaults resolved (build one with :func:`make_spec`)."""

    dataset: str  # the split's label (e.g. ``citeulike``; a csv file's ``csv:<name>``)
    split_fingerprint: str
    split_seed: int
    teachers: tuple[str, ...]
    teachers_digest: str
    ensemble: tuple[tuple[str, object], ...]
    student: str
    student_version: int
    student_config: tuple[tuple[str, object], ...]
    dim: int
    method: str
    method_version: int
    method_config: tuple[tuple[str, object], ...]
    options: tuple[tuple[str, object], ...]  # what the command line set (method_config has every value)
    lr: float
    weight_decay: float
    batch_users: int
    seed: int
    max_epochs: int
    eval_every: int
    patience: int
    #: how the command line names the data (``--dataset``, and ``--path`` … for csv/recbole); not identity
    source: tuple[tuple[str, object], ...] = field(default=(), compare=False)

    def identity_dict(self) -> dict:
        """The fields that make the identity, as plain JSON-able values."""
        out = {}
        for spec_field in dataclasses.fields(self):
            if not spec_field.compare:
                continue
            value = getattr(self, spec_field.name)
            if spec_field.name in ("ensemble", "student_config", "method_config", "options"):
                value = {key: list(v) if isinstance(v, tuple) else v for key, v in value}
            elif isinstance(value, tuple):
                value = list(value)
            out[spec_field.name] = value
        return out

    def to_dict(self) -> dict:
        """What ``spec.json`` stores: the identity fields, the identity and the command that reruns the run."""
        return {**self.identity_dict(), "source": dict(self.source), "identity": self.identity,
                "command": self.command()}

    @property
    def identity(self) -> str:
        """16 hex digits of sha256 over :meth:`identity_dict`: the run's folder suffix and its ledger key."""
        return hashlib.sha256(_canonical(self.identity_dict()).encode()).hexdigest()[:16]

    @property
    def folder_name(self) -> str:
        """``<student>-<method>-<dim>-<seed>-<identity>``: readable, and never shared by two specs."""
        return f"{self.student}-{self.method}-{self.dim}-{self.seed}-{self.identity}"

    @property
    def method_options(self) -> dict:
        return dict(self.options)

    def command(self) -> str:
        """The ``hetcomp distill`` line that trains (or reuses) exactly this run."""
        source = dict(self.source)
        words = ["hetcomp", "distill", "--dataset", str(source.get("dataset", self.dataset))]
        for key in SOURCE_OPTIONS:
            if source.get(key) is not None:
                words += [f"--{key.replace('_', '-')}", str(source[key])]
        if self.split_seed:
            words += ["--split-seed", str(self.split_seed)]
        words += ["--student", self.student, "--dim", str(self.dim), "--method", self.method,
                  "--seed", str(self.seed)]
        if self.teachers and list(self.teachers) != list(TEACHERS):  # w/o KD names none: it reads none
            words += ["--teachers", ",".join(self.teachers)]
        for key, value in self.options:
            words += ["-o", f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]
        model_defaults = dataclasses.asdict(model_config(self.student, dim=self.dim))
        for key, value in self.student_config:
            if key not in RUN_SETTINGS and key in model_defaults and value != model_defaults[key]:
                words += ["-m", f"{key}={json.dumps(list(value) if isinstance(value, tuple) else value)}"]
        default_lr, default_decay = default_recipe(self.student, self.method)
        if self.lr != default_lr:
            words += ["--lr", repr(self.lr)]
        if self.weight_decay != default_decay:
            words += ["--weight-decay", repr(self.weight_decay)]
        if self.batch_users != DEFAULT_BATCH_USERS:
            words += ["--batch-users", str(self.batch_users)]
        ensemble, default = dict(self.ensemble), dataclasses.asdict(EnsembleConfig())
        for key, value in ensemble.items():
            if value != default.get(key):
                words += [f"--{key.replace('_', '-')}", str(value)]
        for key, value, default_value in (("max-epochs", self.max_epochs, DEFAULT_MAX_EPOCHS),
                                          ("eval-every", self.eval_every, DEFAULT_EVAL_EVERY),
                                          ("patience", self.patience, DEFAULT_PATIENCE)):
            if value != default_value:
                words += [f"--{key}", str(value)]
        return shlex.join(words)

    def ensemble_config(self) -> EnsembleConfig:
        return EnsembleConfig(**dict(self.ensemble))

    @property
    def stacks_seeds(self) -> bool:
        """Whether this run's method stacks seeds at its settings (``DistillMethod.stacks_seeds``)."""
        cls = method_class(self.method)
        return cls.stacks_seeds(cls.config_class(**dict(self.method_config)))


def make_spec(split: Split, trajectories: Sequence, student: str = "mf", method: str = "hetcomp", dim: int = 6,
              seed: int = 0, method_options: dict | None = None, ensemble: EnsembleConfig | None = None,
              batch_users: int = DEFAULT_BATCH_USERS, lr: float | None = None, weight_decay: float | None = None,
              max_epochs: int = DEFAULT_MAX_EPOCHS, eval_every: int = DEFAULT_EVAL_EVERY,
              patience: int = DEFAULT_PATIENCE, source: dict | None = None, tuned: bool = True,
              model_options: dict | None = None, tuning_dir: Path | None = None) -> RunSpec:
    """Resolve every default of one run into its :class:`RunSpec` (unknown method options are an error).

    With ``tuned`` (the default), the settings a study chose for this dataset, student, method and dim
    (:func:`~hetcomp.runs.tuned.tuned_defaults`, a committed ``experiments/tuning`` file, or one under
    ``tuning_dir``) fill the method options, lr and weight decay that the caller did not give; explicit arguments
    win. Tuned options join the spec's ``options``, so its command line spells them out and reruns the same run
    without the file.
    ``model_options``: settings of the student model (:func:`student_options`), the model's defaults otherwise."""
    cls = method_class(method)
    trajectories = trajectories if cls.reads_teachers else ()  # w/o KD's identity names no teachers
    options = dict(method_options or {})
    if tuned:
        made_for = {"split_fingerprint": split.fingerprint, "method_version": cls.version}
        if method != "none":  # w/o KD reads no teacher: its settings hold for any
            made_for["teachers_digest"] = teachers_digest(trajectories)
        chosen = tuned_defaults(split.meta["dataset"], student, method, dim, tuning_dir, made_for=made_for)
        options = {**{k: v for k, v in chosen.items() if k not in RECIPE}, **options}
        lr = chosen.get("lr") if lr is None else lr
        weight_decay = chosen.get("weight_decay") if weight_decay is None else weight_decay
    config = checked_config(cls.config_class, options, f"method {method!r}")
    default_lr, default_decay = default_recipe(student, method)
    lr = default_lr if lr is None else lr
    weight_decay = default_decay if weight_decay is None else weight_decay
    for name, value in (("lr", lr), ("weight decay", weight_decay)):
        if not math.isfinite(value):
            raise HetCompError(f"{name} must be a finite number (got {value})")
    return RunSpec(
        dataset=split.meta["dataset"], split_fingerprint=split.fingerprint, split_seed=int(split.meta.get("seed", 0)),
        teachers=tuple(t.name for t in trajectories),
        teachers_digest=teachers_digest(trajectories) if trajectories else "",
        ensemble=_frozen(dataclasses.asdict(ensemble or EnsembleConfig())), student=student,
        student_version=model_class(student).version,
        student_config=_frozen(dataclasses.asdict(model_config(student, **student_options(student, model_options),
                                                               dim=dim))), dim=dim, method=method,
        method_version=cls.version, method_config=_frozen(identity_settings(config)), options=_frozen(options),
        lr=float(lr), weight_decay=float(weight_decay), batch_users=batch_users, seed=seed, max_epochs=max_epochs,
        eval_every=eval_every, patience=patience, source=_frozen(source or {"dataset": split.meta["dataset"]}))


def twin_spec(spec: RunSpec) -> RunSpec | None:
    """The run of another method that ``spec`` trains exactly as (:meth:`DistillMethod.trains_as`), with every
    other setting (data, teachers, student, recipe, seed, schedule) the same; None when its method has no twin."""
    twin = method_class(spec.method).trains_as(dict(spec.method_config), dict(spec.options))
    if twin is None:
        return None
    method, options = twin
    cls = method_class(method)
    config = checked_config(cls.config_class, options, f"method {method!r}")
    return dataclasses.replace(spec, method=method, method_version=cls.version,
                               method_config=_frozen(identity_settings(config)), options=_frozen(options))
