"""The settings a study chose (``hetcomp tune``), read back as defaults for the runs that did not set them.

One small JSON file per dataset, student, method and dimension, ``<root>/<dataset>/<student>-<method>-<dim>.json``
(:data:`TUNING_ROOT`, relative to the working directory like ``experiments/runs``). Its ``settings`` hold the
chosen ``lr``, ``weight_decay`` and method ``options``; :func:`~hetcomp.runs.spec.make_spec` takes them for
whatever its caller left unset, so they enter the run's identity and its ``hetcomp distill`` command line.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from hetcomp.config import check_value, unknown_settings
from hetcomp.distill import method_class
from hetcomp.errors import HetCompError
from hetcomp.provenance import dataset_slug, read_json
from hetcomp.train import TrainerConfig

#: where committed study summaries live (tests point it elsewhere)
TUNING_ROOT = Path("experiments/tuning")
#: where ``hetcomp tune`` keeps its trials' run folders by default
TUNING_RUNS_ROOT = Path("experiments/tuning-runs")
#: the searched settings that belong to the trainer's recipe rather than to the method's config
RECIPE = ("lr", "weight_decay")


def summary_path(dataset: str, student: str, method: str, dim: int, root: Path | None = None) -> Path:
    """``<root>/<dataset-slug>/<student>-<method>-<dim>.json``."""
    return Path(TUNING_ROOT if root is None else root) / dataset_slug(dataset) / f"{student}-{method}-{dim}.json"


def trials_path(summary_file: Path) -> Path:
    """The study's finished trials as text, beside its summary (``mf-dcd-6.json`` → ``mf-dcd-6.trials.json``)."""
    return summary_file.with_name(f"{summary_file.stem}.trials.json")


def trial_run_seconds(summary_file: Path, number: object, summary: dict | None = None,
                      runs_root: Path | None = None) -> float | None:
    """What one run at trial ``number``'s settings cost (wall seconds of training and evaluation, over every
    attempt), for pricing runs before any has finished: the ``run_seconds`` the summary's history records; for a
    trial recorded before those were, its run's own ``metrics.json`` in the tuning run store ``runs_root``
    (:data:`TUNING_RUNS_ROOT`; the trials record names the run), where that folder is on this machine; else the
    trial's ``seconds``, unless it resumed a killed trial's run and so timed only its own attempt (a Foursquare DNN
    run of 7,892 s recorded as 2,609 s): None then, and where nothing is known. ``summary``: the file's contents,
    where the caller read them already."""
    summary = json_object_or_none(summary_file) if summary is None else summary
    history = [trial for trial in (summary or {}).get("history") or [] if isinstance(trial, dict)]
    chosen = next((trial for trial in history if trial.get("number") == number), None)
    if chosen is None:
        return None
    if _positive(chosen.get("run_seconds")):
        return float(chosen["run_seconds"])
    record = json_object_or_none(trials_path(summary_file)) or {}
    named = next((trial.get("user_attrs", {}).get("run") for trial in record.get("trials") or []
                  if isinstance(trial, dict) and trial.get("number") == number
                  and trial.get("params") == chosen.get("params")), None)
    if isinstance(named, str) and isinstance(summary.get("dataset"), str):
        metrics = json_object_or_none(Path(TUNING_RUNS_ROOT if runs_root is None else runs_root)
                                / dataset_slug(summary["dataset"]) / named / "metrics.json") or {}
        if _positive(metrics.get("wall_seconds")):
            return float(metrics["wall_seconds"])
    resumed = "resumes" in chosen or any(trial.get("state") == "fail" and trial.get("params") == chosen.get("params")
                                         for trial in history)
    return None if resumed or not _positive(chosen.get("seconds")) else float(chosen["seconds"])


def json_object_or_none(path: Path) -> dict | None:
    """A JSON object's content, or None where the file is absent or not one (a price is then unknown)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _positive(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def summary_settings(chosen: dict) -> dict:
    """Flat chosen settings (``{"lr": …, <option>: …}``) as a summary holds them: the recipe, then ``options``."""
    return {**{k: chosen[k] for k in RECIPE if k in chosen},
            "options": {k: v for k, v in chosen.items() if k not in RECIPE}}


def flat_settings(settings: dict) -> dict:
    """A summary's ``settings`` as one flat mapping (the inverse of :func:`summary_settings`)."""
    return {**settings.get("options", {}), **{k: settings[k] for k in RECIPE if k in settings}}


#: what a summary must have been made for, when the caller says (the teachers' digest only warns: retrained
#: teachers need not match bit for bit across machines, while another split or method version is other work)
MADE_FOR = {"split_fingerprint": "split", "method_version": "method version"}


def tuned_defaults(dataset: str, student: str, method: str, dim: int, root: Path | None = None,
                   made_for: dict | None = None) -> dict:
    """The chosen ``{"lr": …, "weight_decay": …, <option>: …}`` of a finished study; ``{}`` when there is none.

    Every value is checked against its declared range, so a summary that no longer fits the method (a renamed
    option, a narrowed range) is an error naming the file rather than a silently different run. ``made_for``
    (``split_fingerprint``, ``method_version``, ``teachers_digest``) is compared with what the study recorded:
    settings chosen on another split or for another version of the method are an error, for other teachers a
    warning."""
    path = summary_path(dataset, student, method, dim, root)
    if not path.is_file():
        return {}
    fix = f"rerun `hetcomp tune` for it, or delete {path} to use the built-in defaults"
    summary = read_json(path, "tuned settings file", fix)
    if isinstance(summary, dict):
        _check_made_for(path, summary, made_for or {}, fix)
    try:
        settings = summary.get("settings") or {}
        chosen = flat_settings(settings)
    except (AttributeError, TypeError) as error:
        raise HetCompError(f"{path}: cannot read these tuned settings ({error.__class__.__name__}: {error}); "
                           f"{fix}") from None
    if isinstance(summary, dict):
        _check_special_case(path, summary, dataset, student, dim, root)
    config_class = method_class(method).config_class
    label = f"{path}: "
    unknown_settings(config_class, [k for k in chosen if k not in RECIPE], label=label)
    for name, value in chosen.items():
        check_value(TrainerConfig if name in RECIPE else config_class, name, value, label=label)
    return chosen


def _check_made_for(path: Path, summary: dict, made_for: dict, fix: str) -> None:
    command = summary.get("command")
    fix = f"rerun `{command}`, or delete {path} to use the built-in defaults" if command else fix
    for key, what in MADE_FOR.items():
        if key in made_for and key in summary and summary[key] != made_for[key]:
            raise HetCompError(f"{path}: these settings were chosen for {what} {summary[key]!r}, this run has "
                               f"{made_for[key]!r}; {fix}")
    digest = made_for.get("teachers_digest")
    if digest is not None and summary.get("teachers_digest") not in (None, digest):
        warnings.warn(f"{path}: these settings were chosen with teachers {summary['teachers_digest']}, this run "
                      f"has {digest}; using them (to choose for these teachers: {fix.split(', or')[0]})",
                      stacklevel=3)


def _check_special_case(path: Path, summary: dict, dataset: str, student: str, dim: int, root: Path | None) -> None:
    """A warning when the settings are another method's choice (``chosen_from``, e.g. DCD's RRD at dcd_weight 0)
    and that method's study has changed since: rerunning this study's command chooses again."""
    source = summary.get("chosen_from")
    if not isinstance(source, dict) or not isinstance(source.get("method"), str):
        return
    other = summary_path(dataset, student, source["method"], dim, root)
    try:
        now = json.loads(other.read_text()).get("best_value")
    except (OSError, ValueError, AttributeError):
        now = None
    if now != source.get("value"):
        command = summary.get("command", "hetcomp tune")
        warnings.warn(f"{path}: these settings are {source['method']}'s choice when its study's best was "
                      f"{source.get('value')}, and {other} now holds {now}; rerun `{command}` to choose again",
                      stacklevel=3)
