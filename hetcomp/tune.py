"""Choosing a method's settings on validation: an Optuna study over the space the method declares.

Each method's config declares ``search_space`` beside its fields: name → ``("float_log", low, high)``,
``("float", low, high)``, ``("int", low, high)`` or ``("choice", [values])``. Every method also searches
:data:`COMMON_SPACE` (lr and weight decay; a method may redeclare them). A trial is one student run
(:func:`~hetcomp.runs.make_spec` with the sampled values, trained by :func:`~hetcomp.runs.train_run` in its own
run store); its value is the validation Recall@50 at the best epoch, each evaluation is reported to the pruner.

Test data never reaches a trial: the runs train and evaluate on :func:`validation_only`, the split with an
empty test part (so validation ranks each user's held-out items among every item not in training, test items
included, where ``hetcomp distill`` also drops them; and the runs get their own split fingerprint, so that no
tuning run is ever taken for a real one). Optuna's TPE sampler (seeded) proposes, its median pruner stops
runs whose validation curve trails the earlier trials': the two things a grid cannot do with 16 runs. A new
study's first trial is :func:`start_point`, today's defaults (for a student other than MF, with the options
the method's MF study chose), so a tuned method is not worse on validation than its start.

A study is stored in an RDB (SQLite by default, any Optuna URL so that several machines share one study) and
records what it was made for; ``trials`` is the study's total budget, so rerunning an interrupted command
completes it, and a trial its killed process left "running" is run again from its run's last checkpoint
(the new trial first reports the run's curve so far, or the whole curve of a run that had finished, so that
finished trials hold whole curves for the pruner).
With the default storage every finished trial is also written to a small text file beside the summary
(:func:`trials_path`: parameters, value, validation curve), which is committed with the results: a study whose
SQLite file is gone (a fresh checkout, another machine) is rebuilt from it and goes on where it stopped.
When the budget is reached, the summary (:func:`~hetcomp.runs.tuned.summary_path`) holds the chosen settings,
which ``distill`` and ``reproduce`` then use by default. It holds no test metric. The dataset's studies page
(:mod:`hetcomp.tune_page`) is then rewritten from every summary beside it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import socket
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import optuna
import scipy.sparse as sp
import torch

from hetcomp.data import Split
from hetcomp.distill import method_class
from hetcomp.errors import HetCompError
from hetcomp.provenance import CODE_DIGEST, atomic_write_text, dataset_slug, git_commit, machine, packages
from hetcomp.runs import RunSpec, RunStore, make_spec, teacher_digests, teachers_digest, train_run
from hetcomp.runs.spec import DEFAULT_EVAL_EVERY, DEFAULT_MAX_EPOCHS, DEFAULT_PATIENCE
from hetcomp.runs.tuned import (
    RECIPE,
    TUNING_ROOT,
    TUNING_RUNS_ROOT,
    flat_settings,
    summary_path,
    summary_settings,
    trials_path,
)
from hetcomp.teachers import TEACHERS
from hetcomp.train import Callback
from hetcomp.tune_page import write_studies_page
from hetcomp.tune_space import (  # noqa: F401 (re-exported: the public names of tuning)
    COMMON_SPACE,
    FINISHED_STATES,
    KINDS,
    REFERENCE_STUDENT,
    STUDY_KEYS,
    check_space,
    identity_keys,
    moved_start_points,
    same_point,
    search_space,
    start_point,
    start_points,
)

DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
#: who runs a trial (host:pid), so that a later process can tell a killed trial from a live one
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def validation_only(split: Split) -> Split:
    """``split`` with an empty test part and its own fingerprint: what every tuning run sees."""
    return dataclasses.replace(split, test=sp.csr_matrix(split.test.shape, dtype=split.test.dtype),
                               meta={**split.meta, "fingerprint": f"{split.fingerprint}+valid-only"})


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """An Optuna RDB storage, or a one-line error naming the URL (its password hidden)."""
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as error:  # sqlalchemy's and the drivers' errors have no common base
        reason = " ".join(str(error).split("(Background")[0].split())[:200]
        raise HetCompError(f"--storage {_shown(url)}: cannot open this study storage ({reason}); give an Optuna "
                           "RDB URL such as sqlite:///study.db or postgresql://user@host/db") from None


def _shown(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


class _Report(Callback):
    """Reports each evaluation's validation R@50 to the trial; stops the run when the pruner says so (before
    its checkpoint and metrics are written: a pruned run is never a finished one), unless the trial is a start
    point (``start_point`` among its user attributes): an informed guess runs to its end, or the study could
    not promise to be at least as good on validation as its guesses (a slower learning rate, for one, trails
    the median at the first evaluations and would be cut there)."""

    def __init__(self, trial: optuna.Trial) -> None:
        self.trial = trial
        self.prunable = "start_point" not in trial.user_attrs
        self.fitted = False

    def on_fit_start(self, trainer) -> None:
        """A trial that resumes a run (its earlier attempt's process was killed: :func:`_rerun_stale`) reports the
        run's curve so far first, so the trial holds the whole curve: the median pruner compares a new trial with
        the finished trials' values at the same epoch, and a finished trial holding only the epochs after its
        last restart would leave the early epochs with nothing to compare with (no trial pruned there)."""
        self.fitted = True
        for entry in trainer.state.history:
            self.trial.report(entry["valid"]["recall@50"], entry["epoch"])

    def on_evaluate(self, trainer, epoch: int, result: dict, improved: bool) -> None:
        self.trial.report(result["valid"]["recall@50"], epoch)
        if self.prunable and self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at epoch {epoch}")


def _train_reporting(trial: optuna.Trial, spec: RunSpec, split: Split, trajectories: Sequence, store: RunStore,
                     device: torch.device | str, callbacks: Sequence[Callback]) -> dict:
    """``spec``'s run for ``trial`` (:func:`~hetcomp.runs.train_run`), the trial holding the run's whole
    validation curve: reported as it trains, or, where no training ran (the run was finished already: its
    earlier trial's process died after writing it, or a twin's finished run was adopted), from the finished
    run's curve, so that the trial serves the pruner's comparisons like any other."""
    report = _Report(trial)
    result = train_run(spec, split, trajectories, store, device, [report, *callbacks])
    if not report.fitted:
        for point in result.get("curve", ()):
            trial.report(point["valid_recall@50"], point["epoch"])
    return result


def tune(split: Split, trajectories: Sequence, student: str = "mf", method: str = "hetcomp", dim: int = 6,
         trials: int = 16, storage: str | None = None, study_name: str | None = None,
         store: RunStore | None = None, seed: int = 0, max_epochs: int = DEFAULT_MAX_EPOCHS,
         eval_every: int = DEFAULT_EVAL_EVERY, patience: int = DEFAULT_PATIENCE,
         knobs: Sequence[str] | None = None, fixed: dict | None = None,
         pruner: optuna.pruners.BasePruner | None = None, device: torch.device | str = "cpu",
         callbacks: Sequence[Callback] = (), on_trial: Callable[[optuna.trial.FrozenTrial], None] | None = None,
         source: dict | None = None, root: Path | None = None) -> dict:
    """Run ``method``'s study until it holds ``trials`` finished (complete or pruned) trials; returns the summary
    (also written to :func:`~hetcomp.runs.tuned.summary_path` under ``root`` once the budget is reached)."""
    dataset = split.meta["dataset"]
    fixed = dict(fixed or {})
    space = search_space(method, knobs, fixed)
    root = Path(TUNING_ROOT if root is None else root)
    summary_file = summary_path(dataset, student, method, dim, root)
    default_storage = storage is None
    if default_storage:
        summary_file.parent.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{summary_file.with_suffix('.db')}"
    study_name = study_name or f"{dataset}-{student}-{method}-{dim}"
    attrs = {"dataset": dataset, "split_fingerprint": split.fingerprint, "split_seed": int(split.meta.get("seed", 0)),
             "student": student, "dim": dim,
             "method": method, "method_version": method_class(method).version,
             "teachers": [t.name for t in trajectories], "teachers_digest": teachers_digest(trajectories),
             "teacher_digests": teacher_digests(trajectories),
             "search_space": _jsonable(space), "fixed": _jsonable(fixed), "seed": seed, "max_epochs": max_epochs,
             "eval_every": eval_every, "patience": patience}
    study = optuna.create_study(storage=open_storage(storage), study_name=study_name, direction="maximize",
                                pruner=pruner or optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=0),
                                load_if_exists=True)
    _claim(study, attrs, storage)
    record = trials_path(summary_file) if default_storage else None
    if record is not None:
        _restore(study, record, attrs, summary_file)
        finished = None if record.exists() else _finished_summary(study, summary_file, attrs, trials)
        if finished is not None:
            return finished
    blind = validation_only(split)
    store = store or RunStore(TUNING_RUNS_ROOT)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", WORKER)  # first: a running trial without it is an older study's
        params = {name: _suggest(trial, name, entry) for name, entry in space.items()}
        options = {**fixed, **{k: v for k, v in params.items() if k not in RECIPE}}
        spec = make_spec(blind, trajectories, student, method, dim, seed, options, lr=params.get("lr"),
                         weight_decay=params.get("weight_decay"), max_epochs=max_epochs, eval_every=eval_every,
                         patience=patience, source=source, tuned=False)
        trial.set_user_attr("run", spec.folder_name)
        started = time.perf_counter()
        try:
            result = _train_reporting(trial, spec, blind, trajectories, store, device, callbacks)
        except FloatingPointError as error:  # a diverging run is a bad setting, stopped: a pruned trial
            trial.set_user_attr("diverged", str(error))
            raise optuna.TrialPruned(str(error)) from None
        except KeyboardInterrupt:  # stopped by hand: optuna fails the trial now, the next start resumes it
            trial.set_user_attr("interrupted", True)
            raise
        finally:  # what the trial cost, pruned or not (a resumed trial: this attempt only)
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 3))
        trial.set_user_attr("best_epoch", result["best_epoch"])
        # the run's own training + evaluation over every attempt: what a run at these settings costs, where
        # "seconds" (this attempt) is short for a trial that resumed a killed one's run
        trial.set_user_attr("run_seconds", result["wall_seconds"])
        return result["valid"]["recall@50"]

    _rerun_stale(study, legacy=default_storage)
    remaining = trials - sum(t.state in DONE for t in study.trials)
    if remaining > 0:  # a new study's first trial is the defaults (never worse than them on validation)
        _resume_stopped(study)
        _enqueue_start_points(study, start_points(method, student, dim, dataset, space, fixed, root))
    ran = remaining > 0
    after_trial = [*([lambda _, trial: _record(study, record, attrs)] if record else []),
                 *([lambda _, trial: on_trial(trial)] if on_trial else []),
                 # another worker of this machine may have died meanwhile: its trial resumes now, not at the
                 # next start (only trials naming a dead worker: a trial another live worker is just creating
                 # names none yet)
                 lambda _, trial: _rerun_stale(study, legacy=False)]
    for _ in range(max(remaining, 0)):  # at most as many attempts as the budget lacked at the start
        if _still_needed(study, trials) <= 0:
            break
        # seeded afresh before each trial by the trials already there (running ones included): a study interrupted
        # and resumed proposes what it would have uninterrupted (one worker) and never repeats its first proposals;
        # two workers collide only if both read the count before either adds its trial
        study.sampler = optuna.samplers.TPESampler(seed=seed * 100_003 + len(study.trials))
        study.optimize(objective, n_trials=1, callbacks=after_trial)
    summary = _summary(study, attrs, trials, None if default_storage else storage, source, knobs)
    if summary["trials"]["complete"] + summary["trials"]["pruned"] >= trials:
        summary = special_case_choice(summary, root)
        if not _keeps_committed(summary_file, summary, ran):
            atomic_write_text(summary_file, json.dumps(summary, indent=1) + "\n")
        else:  # the committed summary stays, but chooses from today's summary of the special case
            stored = json.loads(summary_file.read_text())
            rechosen = special_case_choice(stored, root)
            if rechosen != stored:
                atomic_write_text(summary_file, json.dumps(rechosen, indent=1) + "\n")
        write_studies_page(summary_file.parent)
    return summary


#: what two studies share when their values compare: the same validation runs but for the method and its settings
COMPARABLE = ("dataset", "split_fingerprint", "split_seed", "student", "dim", "teachers_digest", "seed",
              "max_epochs", "eval_every", "patience")


def _own_settings(summary: dict) -> dict | None:
    """The settings of a summary's best trial (with the study's fixed options), as summaries hold them."""
    if summary.get("best_params") is None:
        return None
    return summary_settings({**summary.get("fixed", {}), **summary["best_params"]})


def special_case_choice(summary: dict, root: Path | None = None) -> dict:
    """``summary`` (a finished study's) with its chosen settings: its best trial's, or, for a method with a
    :meth:`~hetcomp.distill.base.DistillMethod.special_case` (DCD: RRD at ``dcd_weight=0``), that method's
    chosen settings read as this method's, where that method's finished study, made on the same split with the
    same teachers, seed and training lengths, reached a higher validation value than every trial here. The run
    at those settings trains exactly as that study's best, so the value is the one it reached; ``chosen_from``
    says so. Nothing else in the summary changes (its best trial, value and history stay its own)."""
    summary = {key: value for key, value in summary.items() if key != "chosen_from"}
    summary["settings"] = _own_settings(summary)
    special = method_class(summary["method"]).special_case()
    if special is None:
        return summary
    other, translate = special
    path = summary_path(summary["dataset"], summary["student"], other, summary["dim"], root)
    try:
        theirs = json.loads(path.read_text())
        finished = theirs["trials"]["complete"] + theirs["trials"]["pruned"] >= theirs["budget"]
        value = theirs["best_value"]
        chosen = translate(flat_settings(theirs["settings"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return summary  # no finished study of the special case (yet): nothing to compare
    fixed = summary.get("fixed", {})
    if (not finished or value is None or theirs.get("method_version") != method_class(other).version
            or any(theirs.get(key) != summary.get(key) for key in COMPARABLE)
            or any(name in fixed and fixed[name] != chosen[name] for name in chosen)
            or summary["best_value"] is not None and value <= summary["best_value"]):
        return summary
    summary["settings"] = summary_settings({**fixed, **chosen})
    own = "none complete" if summary["best_value"] is None else f"best {summary['best_value']:.4f}"
    summary["chosen_from"] = {
        "method": other, "summary": path.name, "study_name": theirs.get("study_name"),
        "trial": theirs.get("best_trial"), "value": value, "commit": theirs.get("commit"),
        "why": f"{other}'s study reached {value:.4f} on validation, above every trial of this study ({own}); "
               f"this method trains exactly as {other} at these settings"}
    return summary


#: what a summary says about where it was written, not about the study
PROVENANCE = ("commit", "code_digest", "machine", "packages")


def _keeps_committed(summary_file: Path, summary: dict, ran: bool) -> bool:
    """Whether the committed ``summary_file`` stays as it is: it holds ``summary`` but for its provenance (a rerun
    that changed nothing keeps who made it), or no trial ran here and it is this study's summary with the same
    finished trials (one written from the original SQLite file knows more, killed trials and costs, than a study
    rebuilt from an older record)."""
    try:
        stored = json.loads(summary_file.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(stored, dict):
        return False
    fresh = json.loads(json.dumps(summary))

    def result(value: dict) -> dict:
        return {key: item for key, item in value.items() if key not in PROVENANCE}
    if result(stored) == result(fresh):
        return True
    try:
        return not ran and all(stored.get(key) == fresh[key] for key in identity_keys(fresh["method"])) and (
            _finished_trials(stored) == _finished_trials(fresh))
    except (KeyError, TypeError):
        return False


def _trial_key(trial: dict) -> tuple:
    """What identifies a trial across a record and a summary (whose trial numbers may differ): state, value and
    parameters."""
    return trial.get("state"), trial.get("value"), trial.get("params")


def _finished_trials(summary: dict) -> list:
    """A summary's finished (complete or pruned) trials in order, by :func:`_trial_key`."""
    return [_trial_key(t) for t in summary["history"] if t["state"] in FINISHED_STATES]


def _trial_seconds(trial: optuna.trial.FrozenTrial) -> float | None:
    """What a trial cost: as it recorded it, else (trials made before they did) its span in the study's storage."""
    if "seconds" in trial.user_attrs:
        return trial.user_attrs["seconds"]
    if trial.state == optuna.trial.TrialState.FAIL:  # a killed trial's span runs until a later process marks it
        return None                                  # failed (hours later), not until it stopped: unknown
    return None if trial.duration is None else round(trial.duration.total_seconds(), 3)


def _recorded_attrs(trial: optuna.trial.FrozenTrial) -> dict:
    """A trial's user attributes as its record keeps them: with its cost, when known (see :func:`_trial_seconds`)."""
    seconds = _trial_seconds(trial)
    return trial.user_attrs if seconds is None else {**trial.user_attrs, "seconds": seconds}


def _record(study: optuna.Study, path: Path, attrs: dict) -> None:
    """Write every finished trial of ``study`` (what :func:`_restore` needs to rebuild it) to ``path``, and the
    studies page beside it. Failed (killed) trials too: a rebuilt study keeps its trial numbers, the "≥" of its
    cost and the trials a resumed one names, so its summary is the one the lost SQLite file gave."""
    trials = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
               "distributions": {k: optuna.distributions.distribution_to_json(d) for k, d in t.distributions.items()},
               "curve": {str(step): value for step, value in sorted(t.intermediate_values.items())},
               "user_attrs": _recorded_attrs(t)}
              for t in study.get_trials(deepcopy=False, states=(*DONE, optuna.trial.TrialState.FAIL))]
    record = {"format": "hetcomp-study/1", "study_name": study.study_name, "study": attrs, "trials": trials}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    write_studies_page(path.parent)  # its "in progress" part


def _restore(study: optuna.Study, path: Path, attrs: dict, summary_file: Path) -> None:
    """An empty study gets the finished trials recorded in ``path`` (its SQLite file was lost, the record was
    committed); a record made for another study (other teachers, method version, space...) is left alone. A rebuilt
    trial has no real start and end: its cost is the record's, else the committed summary's, else unknown (not the
    zero its rebuilt span would give)."""
    if study.trials or not path.exists():
        return
    cost = _committed_costs(summary_file)
    try:
        record = json.loads(path.read_text())
        made_for = record["study"]
        trials = [optuna.trial.create_trial(
            state=optuna.trial.TrialState[t["state"].upper()], value=t["value"], params=t["params"],
            distributions={k: optuna.distributions.json_to_distribution(d) for k, d in t["distributions"].items()},
            intermediate_values={int(step): value for step, value in t["curve"].items()},
            user_attrs={"seconds": cost(t), **t["user_attrs"]})
            for t in record["trials"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise HetCompError(f"{path}: not a readable study record ({type(error).__name__}: {error}); move it away "
                           "to start the study afresh") from None
    _refuse_other_teachers(path, made_for, attrs)
    differ = [key for key in identity_keys(attrs["method"]) if made_for.get(key) != attrs[key]]
    if differ or record.get("study_name") != study.study_name:
        warnings.warn(f"{path} records a study made for other settings ({', '.join(differ) or 'study name'}); "
                      "starting a new study, which will replace it", stacklevel=3)
        return
    study.add_trials(trials)


def _committed_costs(summary_file: Path) -> Callable[[dict], float | None]:
    """What the committed summary says a record's trial cost: the trial of the same state, value and parameters
    (records made before killed trials were kept number trials otherwise), or None when there is no such one."""
    try:
        history = [h for h in json.loads(summary_file.read_text())["history"] if isinstance(h, dict)]
    except (OSError, ValueError, KeyError, TypeError):
        history = []

    def cost(trial: dict) -> float | None:
        same = [h.get("seconds") for h in history if _trial_key(h) == _trial_key(trial)]
        return same[0] if len(same) == 1 else None
    return cost


def _refuse_other_teachers(path: Path, made_for: dict, attrs: dict) -> None:
    """Committed trials (a record or summary ``made_for`` a study) made with other teachers are an error, not a
    fresh study that would replace them: retrained teachers usually differ by accident (another thread count
    changes a teacher's rankings), not by intent. w/o KD's identity names no teachers."""
    made_with = made_for.get("teachers_digest")
    if "teachers_digest" not in identity_keys(attrs["method"]) or made_with == attrs["teachers_digest"]:
        return
    theirs, ours = made_for.get("teacher_digests") or {}, attrs.get("teacher_digests") or {}
    differ = [name for name in ours if name in theirs and theirs[name] != ours[name]]
    which = (f" ({', '.join(differ)} differ: a teacher retrained with another thread count, or on a CPU with "
             "another instruction set, ranks a few items differently)" if differ else "")
    raise HetCompError(
        f"{path} holds this study's trials made with teachers {made_with}, but the teachers "
        f"here are {attrs['teachers_digest']}{which}: retrain them as the study's were (each teacher's digest, "
        f"thread count and machine are on experiments/results/teachers-{dataset_slug(attrs['dataset'])}.md; "
        "`hetcomp train-teachers --threads N`), "
        f"or move {path.name} and its summary away to study afresh with these teachers")


def _finished_summary(study: optuna.Study, summary_file: Path, attrs: dict, trials: int) -> dict | None:
    """The committed summary of a study made before trials were recorded (no SQLite file, no trials record), when
    it was made for these settings and holds the budget: rerunning its trials would only repeat them."""
    if study.trials or not summary_file.exists():
        return None
    try:
        summary = json.loads(summary_file.read_text())
        done = summary["trials"]["complete"] + summary["trials"]["pruned"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    _refuse_other_teachers(summary_file, summary, attrs)
    if done < trials or any(summary.get(key) != attrs[key] for key in identity_keys(attrs["method"])):
        return None
    warnings.warn(f"{summary_file} already holds this study's {done} trials (made before trials records were "
                  "kept): nothing to run; move it away to study afresh", stacklevel=3)
    return summary


def _alive(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname():
        return True  # another machine's trial: its own process decides
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


def _still_needed(study: optuna.Study, trials: int) -> int:
    """Trials the budget still lacks beyond the finished ones and those other live workers of this machine are
    running: a worker starts no trial that another's running one will fill, so two workers on the last trial of a
    budget do not make one too many (they did: 17 of 16). Another machine's running trials do not count: whether
    its process still lives cannot be told from here, and a dead one's trial would hold the budget forever."""
    current = study.get_trials(deepcopy=False, states=(*DONE, optuna.trial.TrialState.RUNNING))
    finished = sum(trial.state in DONE for trial in current)
    here = f"{socket.gethostname()}:"
    elsewhere = sum(trial.state == optuna.trial.TrialState.RUNNING and worker != WORKER and worker.startswith(here)
                    and _alive(worker) for trial in current for worker in [trial.user_attrs.get("worker", "")])
    return trials - finished - elsewhere


def _enqueue_start_points(study: optuna.Study, points: list[dict]) -> None:
    """Queue each start point the study has not tried or queued yet: all of them for a new study; for one that
    goes on (resumed, or given a larger budget), those that moved since it began, because a study they read has
    chosen again (e.g. w/o KD's recipe, which every method with an own loss tries, after w/o KD's study went
    from 8 trials to 16): a study kept on the older guess would not start where the other methods now start.
    Each spends one trial of the same budget, and none is pruned (:class:`_Report`)."""
    new = not study.trials
    seen = [trial.params or trial.system_attrs.get("fixed_params") or {}
            for trial in study.get_trials(deepcopy=False)]
    for point in points:
        if not any(same_point(point, params) for params in seen):
            study.enqueue_trial(point, user_attrs={"start_point": "first" if new else "moved"})
            seen.append(point)


def _rerun_stale(study: optuna.Study, legacy: bool) -> None:
    """A trial left "running" by a killed process (this machine's, by pid) is marked failed and its parameters
    queued again: the same run specification, so the trial resumes from its run's last checkpoint. With the
    default (local) storage a running trial that names no worker (older studies) counts as stale too."""
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if (worker is None and not legacy) or (worker is not None and _alive(worker)):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (RuntimeError, ValueError):  # another process recovered it first
            continue
        _queue_resumption(study, trial)


def _queue_resumption(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue ``trial``'s parameters again, naming it (``resumes``): the same run specification, so the new trial
    resumes the run's last checkpoint; a start point stays one (never pruned)."""
    kept = {name: trial.user_attrs[name] for name in ("start_point",) if name in trial.user_attrs}
    study.enqueue_trial(trial.params, user_attrs={"resumes": trial.number, **kept})


def _resume_stopped(study: optuna.Study) -> None:
    """Queue again each failed trial that a stop left with nothing to resume it, as :func:`_rerun_stale` queues a
    killed one: a trial killed before its study's storage was lost (the study rebuilt from its trials record has the
    failed trial but not the trial queued or running to resume it, so a killed start point would never finish), or
    one stopped by hand (Ctrl-C: optuna fails it at once, so no later start finds it running). A trial that failed
    on an error in its own process (it recorded its seconds) is not retried. Called when a worker starts, not after
    each trial: a live worker's :func:`_rerun_stale` fails a trial and queues its successor in two steps."""
    trials = study.get_trials(deepcopy=False)
    resumed = {trial.user_attrs.get("resumes") for trial in trials}
    for trial in trials:
        stopped = trial.user_attrs.get("seconds") is None or trial.user_attrs.get("interrupted")
        if trial.state == optuna.trial.TrialState.FAIL and stopped and trial.params and trial.number not in resumed:
            _queue_resumption(study, trial)


def _suggest(trial: optuna.Trial, name: str, entry: tuple):
    kind = entry[0]
    if kind == "choice":
        return trial.suggest_categorical(name, list(entry[1]))
    if kind == "int":
        return trial.suggest_int(name, entry[1], entry[2])
    return trial.suggest_float(name, entry[1], entry[2], log=kind == "float_log")


def _jsonable(value):
    return json.loads(json.dumps(value))


def _claim(study: optuna.Study, attrs: dict, storage: str) -> None:
    """Record what a new study is for; a study made for something else is an error naming the difference."""
    stored = study.user_attrs
    if not stored and not study.trials:
        for key, value in attrs.items():
            study.set_user_attr(key, value)
        return
    for key in identity_keys(attrs["method"]):
        if stored.get(key) != attrs[key]:
            raise HetCompError(f"study {study.study_name!r} in {_shown(storage)} was created for {key} "
                               f"{stored.get(key)!r}, not {attrs[key]!r}; give another --study-name or --storage "
                               "to start a new study")


#: what a summary's history keeps of a trial's user attributes, where it has them: the run's own cost over every
#: attempt, the killed trial it resumed, why it diverged, the start point it was
HISTORY_ATTRS = ("run_seconds", "resumes", "diverged", "start_point")


def _summary(study: optuna.Study, attrs: dict, trials: int, storage: str | None, source: dict | None,
             knobs: Sequence[str] | None) -> dict:
    states = [t.state for t in study.trials]
    count = {name.lower(): states.count(state) for name, state in optuna.trial.TrialState.__members__.items()}
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None
    settings = _own_settings({"fixed": attrs["fixed"], "best_params": best.params if best else None})
    return {
        **attrs, "study_name": study.study_name, "storage": storage and _shown(storage), "budget": trials,
        "objective": "validation recall@50 at the best epoch, test part of the split emptied (never read)",
        "trials": {"complete": count["complete"], "pruned": count["pruned"], "failed": count["fail"],
                   "running": count["running"]},
        "best_value": best.value if best else None, "best_trial": best.number if best else None,
        "best_params": best.params if best else None, "settings": settings,
        "history": [{"number": t.number, "state": t.state.name.lower(),
                     "value": t.value if t.value is None or math.isfinite(t.value) else None,
                     "last_epoch": t.last_step, "seconds": _trial_seconds(t), "params": t.params,
                     **{key: t.user_attrs[key] for key in HISTORY_ATTRS if key in t.user_attrs}}
                    for t in study.trials],
        "command": _command(attrs, trials, storage, study.study_name, source, knobs),
        "commit": git_commit(), "code_digest": CODE_DIGEST, "machine": machine(), "packages": packages(),
    }


def _command(attrs: dict, trials: int, storage: str | None, study_name: str, source: dict | None,
             knobs: Sequence[str] | None) -> str:
    """The ``hetcomp tune`` line that runs (or resumes) this study."""
    source = dict(source or {"dataset": attrs["dataset"]})
    words = ["hetcomp", "tune", "--dataset", str(source.pop("dataset", attrs["dataset"]))]
    for key, value in source.items():
        words += [f"--{key.replace('_', '-')}", str(value)]
    if attrs["split_seed"]:
        words += ["--split-seed", str(attrs["split_seed"])]
    words += ["--student", attrs["student"], "--method", attrs["method"], "--dim", str(attrs["dim"]),
              "--trials", str(trials), "--seed", str(attrs["seed"]), "--max-epochs", str(attrs["max_epochs"])]
    if attrs["teachers"] and attrs["teachers"] != list(TEACHERS):  # none given: a study of w/o KD
        words += ["--teachers", ",".join(attrs["teachers"])]
    if knobs is not None:
        words += ["--knobs", ",".join(knobs)]
    for key, value in attrs["fixed"].items():
        words += ["-o", f"{key}={json.dumps(value)}"]
    if storage is not None:  # another than the default SQLite file beside the summary
        words += ["--storage", _shown(storage)]
    if study_name != f"{attrs['dataset']}-{attrs['student']}-{attrs['method']}-{attrs['dim']}":
        words += ["--study-name", study_name]
    return shlex.join(words)
