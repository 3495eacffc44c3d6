"""What a study searches and where it starts: each method's declared space (checked against its config) and a
new study's first trials (:func:`start_points`), read from the defaults and from other studies' choices."""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

from hetcomp.config import check_value, settings_summary
from hetcomp.distill import method_class
from hetcomp.errors import HetCompError
from hetcomp.runs.spec import default_recipe
from hetcomp.runs.tuned import RECIPE, tuned_defaults
from hetcomp.train import TrainerConfig

#: what a study records and a resumed study must match
#: the states of a finished trial as records and summaries spell them (Optuna's COMPLETE and PRUNED; a killed
#: trial, "fail", is kept in both but spent no budget)
FINISHED_STATES = ("complete", "pruned")

STUDY_KEYS = ("dataset", "split_fingerprint", "student", "dim", "method", "method_version", "teachers",
              "teachers_digest", "search_space", "fixed", "seed", "max_epochs", "eval_every", "patience")


def identity_keys(method: str) -> tuple[str, ...]:
    """The :data:`STUDY_KEYS` a resumed study must match: w/o KD reads no teacher, so retrained teachers leave
    its study (and its record and summary) valid."""
    return tuple(key for key in STUDY_KEYS if method != "none" or not key.startswith("teachers"))


KINDS = ("float_log", "float", "int", "choice")
#: searched for every method: Adam's lr, and weight decay as a choice (0 cannot sit on a log scale)
COMMON_SPACE = {"lr": ("float_log", 1e-4, 1e-1), "weight_decay": ("choice", [0.0, 1e-6, 1e-5, 1e-4])}
#: the student whose study of a method gives the other students' studies of it their first trial's options
REFERENCE_STUDENT = "mf"


def check_space(config_class: type, space: dict, owner: str) -> None:
    """Each entry a known kind over a real setting (of the method's config, or lr / weight_decay), its bounds or
    choices within that setting's declared range; else a one-line HetCompError naming the entry."""
    fields = {f.name for f in dataclasses.fields(config_class)}
    for name, entry in space.items():
        target = TrainerConfig if name in RECIPE else config_class
        label = f"the search space of {owner}, {name}={entry!r}: "
        if name not in RECIPE and name not in fields:
            settings = settings_summary(config_class)
            raise HetCompError(f"{label}{owner} has no setting {name!r}; its settings: {settings}")
        kind = entry[0] if isinstance(entry, tuple | list) and entry else None
        if kind not in KINDS or len(entry) != (2 if kind == "choice" else 3):
            raise HetCompError(f"{label}write (KIND, LOW, HIGH) or ('choice', [VALUES]) with KIND one of "
                               f"{', '.join(KINDS[:3])}")
        if kind == "choice":
            if not isinstance(entry[1], list | tuple) or not entry[1]:
                raise HetCompError(f"{label}a choice needs a non-empty list of values")
            values = list(entry[1])
        else:
            low, high = entry[1:]
            cast = int if kind == "int" else float
            if kind == "int" and not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
                raise HetCompError(f"{label}an int range needs integer bounds")
            if not low < high or kind == "float_log" and low <= 0:
                raise HetCompError(f"{label}needs LOW < HIGH{' and LOW > 0 on a log scale' * (kind == 'float_log')}")
            values = [cast(low), cast(high)]
        for value in values:
            check_value(target, name, value, label=label)


def search_space(method: str, knobs: Sequence[str] | None = None, fixed: dict | None = None) -> dict:
    """The space a study of ``method`` searches: lr, weight decay and the method's declared knobs, narrowed to
    ``knobs`` when given, without the ``fixed`` options; an unknown knob or an empty space is an error."""
    config_class = method_class(method).config_class
    declared = getattr(config_class, "search_space", {})
    check_space(config_class, declared, f"method {method!r}")
    space = {**COMMON_SPACE, **declared}
    if knobs is not None:
        unknown = [k for k in knobs if k not in space]
        if unknown:
            raise HetCompError(f"--knobs {','.join(knobs)}: method {method!r} declares no knob "
                               f"{', '.join(unknown)}; its search space: {', '.join(space)}")
        space = {k: space[k] for k in knobs}
    space = {k: v for k, v in space.items() if k not in (fixed or {})}
    if not space:
        raise HetCompError(f"the search space of method {method!r} is empty (every knob is fixed or left out); "
                           f"search at least one of {', '.join({**COMMON_SPACE, **declared})}")
    return space


def start_points(method: str, student: str, dim: int, dataset: str, space: dict, fixed: dict,
                 root: Path | None = None) -> list[dict]:
    """A new study's first trials: :func:`start_point`, then each of the method's ``tuning_alternatives`` applied
    to it (kept inside the space; a point equal to an earlier one is left out)."""
    first = start_point(method, student, dim, dataset, space, fixed, root)
    points = [first]
    tuned = functools.partial(_tuned_settings, dataset, student, dim, root)
    for change in method_class(method).tuning_alternatives(tuned):
        point = {**first, **_inside(space, fixed, change)}
        if point not in points:
            points.append(point)
    return points


def same_point(point: dict, params: dict) -> bool:
    """Whether trial ``params`` hold ``point``'s values (a point may leave a setting to the sampler)."""
    return all(name in params and (value == params[name] or (
        isinstance(value, float) and isinstance(params[name], float)
        and math.isclose(value, params[name], rel_tol=1e-12))) for name, value in point.items())


def moved_start_points(summary: dict, root: Path | None = None) -> list[dict]:
    """The start points a study (its ``summary``, under the tuning ``root``) would try today that none of its
    trials tried: they moved because a study they read chose again after this one began. Reads summaries only;
    a choice that no longer fits its method is left out, as for a new study (without the warning)."""
    try:
        space = {name: tuple(entry) for name, entry in summary["search_space"].items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            points = start_points(summary["method"], summary["student"], summary["dim"], summary["dataset"], space,
                                  summary.get("fixed") or {}, root)
        tried = [trial["params"] for trial in summary["history"] if isinstance(trial, dict)]
    except (KeyError, TypeError, AttributeError, HetCompError):  # not a summary this version can read
        return []
    return [point for point in points if not any(same_point(point, params) for params in tried)]


def _tuned_settings(dataset: str, student: str, dim: int, root: Path | None, method: str) -> dict:
    """A finished study's choice to start from; ``{}``, with a warning, when it was made for another version of
    its method or no longer fits it (a stale choice is no informed guess, and must not stop a new study)."""
    try:
        return tuned_defaults(dataset, student, method, dim, root,
                              made_for={"method_version": method_class(method).version})
    except HetCompError as error:
        warnings.warn(f"a new study does not start from these settings: {error}", stacklevel=2)
        return {}


def _inside(space: dict, fixed: dict, point: dict) -> dict:
    """The searched entries of ``point`` (not fixed), clipped into their ranges; choices outside the list dropped."""
    kept = {}
    for name, entry in space.items():
        value = point.get(name)
        if value is None or name in fixed:
            continue
        if entry[0] == "choice":
            if value in entry[1]:
                kept[name] = value
        else:
            kept[name] = type(entry[1])(min(max(value, entry[1]), entry[2]))
    return kept


def start_point(method: str, student: str, dim: int, dataset: str, space: dict, fixed: dict,
                root: Path | None = None) -> dict:
    """A study's first trial: the values ``distill`` would use today (built-in defaults and the recipe), the
    method's options chosen by its study for :data:`REFERENCE_STUDENT` when this is another student (a better
    guess than the built-in defaults; lr and weight decay stay this student's recipe), then what the method's
    ``tuning_start`` draws from this student's other finished studies (DCD starts from a tuned RRD, the method it
    extends), kept inside the space. It spends one trial of the same budget as any other."""
    cls = method_class(method)
    defaults = dataclasses.asdict(cls.config_class())
    lr, weight_decay = default_recipe(student, method)
    point = {**defaults, "lr": lr, "weight_decay": weight_decay}
    if student != REFERENCE_STUDENT:  # the method's own knobs as the reference student's study chose them
        chosen = _tuned_settings(dataset, REFERENCE_STUDENT, dim, root, method)
        point.update({name: value for name, value in chosen.items() if name not in RECIPE})
    point.update(cls.tuning_start(functools.partial(_tuned_settings, dataset, student, dim, root)))
    return _inside(space, fixed, point)
