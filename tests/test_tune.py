"""``hetcomp tune``: declared search spaces, an Optuna study over tiny runs, resume, pruning, test isolation,
the chosen settings as make_spec's defaults, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import optuna
import pytest
import scipy.sparse as sp
import torch
from conftest import make_tiny_split
from typer.testing import CliRunner

from hetcomp.cli import app
from hetcomp.distill import METHODS, method_class
from hetcomp.errors import HetCompError
from hetcomp.metrics import evaluate_split
from hetcomp.models import model_config
from hetcomp.runs import RunStore, make_spec, teachers_digest, train_run
from hetcomp.runs import tuned as tuned_module
from hetcomp.runs.tuned import RECIPE, summary_path, tuned_defaults
from hetcomp.teachers import train_teacher
from hetcomp.tune import (
    COMMON_SPACE,
    check_space,
    moved_start_points,
    search_space,
    special_case_choice,
    start_point,
    start_points,
    trials_path,
    tune,
    validation_only,
)
from hetcomp.tune_page import STUDIES_PAGE, studies_page

SPLIT = make_tiny_split(n_users=60, n_items=150, per_user=12)
FAST = {"max_epochs": 4, "eval_every": 2, "patience": 2}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    out = []
    for name in ("mf", "ae"):
        torch.manual_seed(0)
        out.append(train_teacher(SPLIT, name, tmp_path_factory.mktemp("teachers"), dim=8, top_m=30, max_epochs=4,
                                 eval_every=2, lr=1e-2))
    return out


def _study(tmp, trajectories, split=SPLIT, trials=3, **kwargs) -> dict:
    kwargs.setdefault("storage", f"sqlite:///{tmp / 'study.db'}")
    return tune(split, trajectories, "mf", "rrd", 4, trials, store=RunStore(tmp / "runs"), root=tmp / "tuning",
                **FAST, **kwargs)


@pytest.fixture(scope="module")
def study(teachers, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    return tmp, _study(tmp, teachers)


def _keys(value) -> set:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    return {k for v in value for k in _keys(v)} if isinstance(value, list) else set()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_declared_space_names_real_settings_within_their_ranges(method):
    config_class = method_class(method).config_class
    declared = getattr(config_class, "search_space", {})
    check_space(config_class, declared, method)
    check_space(config_class, COMMON_SPACE, method)
    fields = {f.name for f in dataclasses.fields(config_class)}
    assert set(declared) <= fields | {"lr", "weight_decay"}
    assert {"lr", "weight_decay"} <= set(search_space(method))


@pytest.mark.parametrize("entry, message", [
    ({"nosuch": ("float", 0.0, 1.0)}, "has no setting 'nosuch'"),
    ({"weight": ("float", -1.0, 1.0)}, "weight of rrd must be"),
    ({"k": ("float", 1.0, 5.0)}, "k of rrd must be an integer"),
    ({"k": ("int", 5, 5)}, "LOW < HIGH"),
    ({"weight": ("float_log", 0.0, 1.0)}, "LOW > 0"),
    ({"weight": ("normal", 0.0, 1.0)}, "KIND one of"),
    ({"k": ("choice", [])}, "non-empty list"),
    ({"lr": ("float_log", 1e-3, float("inf"))}, "lr of the trainer"),
])
def test_a_bad_declared_space_is_a_one_line_error(entry, message):
    with pytest.raises(HetCompError, match=message):
        check_space(method_class("rrd").config_class, entry, "rrd")


def test_a_study_runs_and_writes_its_summary_without_test_metrics(study):
    tmp, summary = study
    path = summary_path("tiny", "mf", "rrd", 4, tmp / "tuning")
    assert json.loads(path.read_text()) == json.loads(json.dumps(summary))
    assert summary["trials"] == {"complete": 3, "pruned": 0, "failed": 0, "running": 0}
    values = [t["value"] for t in summary["history"]]
    assert summary["best_value"] == max(values) > 0 and set(summary["best_params"]) == {"lr", "weight_decay",
                                                                                          "weight", "k"}
    assert summary["settings"] == {"lr": summary["best_params"]["lr"],
                                   "weight_decay": summary["best_params"]["weight_decay"],
                                   "options": {"weight": summary["best_params"]["weight"],
                                               "k": summary["best_params"]["k"]}}
    assert not any("test" in key for key in _keys(summary))
    assert summary["command"].startswith("hetcomp tune --dataset tiny --student mf --method rrd --dim 4 --trials 3")
    # the trials' runs saw an empty test part, under their own fingerprint
    runs = [json.loads(p.read_text()) for p in (tmp / "runs").rglob("metrics.json")]
    assert len(runs) == 3 and all(r["test"]["recall@50"] == 0 for r in runs)
    assert {r["split_fingerprint"] for r in runs} == {SPLIT.fingerprint + "+valid-only"}


def test_the_studies_page_lists_every_finished_study_and_flags_stale_ones(study):
    tmp, summary = study
    folder = summary_path("tiny", "mf", "rrd", 4, tmp / "tuning").parent
    page = (folder / STUDIES_PAGE).read_text()
    assert f"| mf | 4 | rrd | {summary['method_version']} |" in page and f"{summary['best_value']:.4f}" in page
    assert "| current |" in page
    stale = {**summary, "method": "dcd", "method_version": 0, "best_value": 0.5}
    (folder / "mf-dcd-4.json").write_text(json.dumps(stale))
    try:
        page = studies_page(folder)
    finally:
        (folder / "mf-dcd-4.json").unlink()
    assert page.index("| rrd |") < page.index("| dcd |")  # the methods' order
    assert "0.5000" in page and "stale: made for version 0" in page
    hours = sum(h["seconds"] for h in summary["history"]) / 3600
    killed = {**summary, "history": [*summary["history"], {"number": 9, "state": "fail", "seconds": 36_000.0}]}
    (folder / "mf-rrd-4.json").write_text(json.dumps(killed))  # a killed attempt's span: hours, not work
    try:
        row = next(line for line in studies_page(folder).splitlines() if line.startswith("| mf | 4 | rrd |"))
    finally:
        (folder / "mf-rrd-4.json").write_text(json.dumps(summary))
    assert f"| ≥ {hours:.2f} |" in row  # a lower bound: the killed attempt's work is unknown
    assert "## In progress" not in page  # the study's record holds no more than its summary

    partial = {"format": "hetcomp-study/1", "study_name": "tiny-mf-kd-4",
               "study": {**summary, "method": "kd", "method_version": method_class("kd").version},
               "trials": [{"number": 0, "state": "complete", "value": 0.25}, {"number": 1, "state": "pruned",
                                                                              "value": 0.1}]}
    (folder / "mf-kd-4.trials.json").write_text(json.dumps(partial))
    try:
        page = studies_page(folder)
    finally:
        (folder / "mf-kd-4.trials.json").unlink()
    progress = page[page.index("## In progress"):]
    assert "| mf | 4 | kd |" in progress and "| 1 + 1 | 0.2500 (0) | current |" in progress
    assert "| rrd |" not in progress


def test_the_chosen_settings_are_make_specs_defaults_and_explicit_arguments_win(study, teachers, monkeypatch):
    tmp, summary = study
    before = make_spec(SPLIT, teachers, "mf", "rrd", 4)
    monkeypatch.setattr(tuned_module, "TUNING_ROOT", tmp / "tuning")
    chosen = tuned_defaults("tiny", "mf", "rrd", 4)
    assert chosen == {**summary["settings"]["options"], "lr": summary["settings"]["lr"],
                      "weight_decay": summary["settings"]["weight_decay"]}
    spec = make_spec(SPLIT, teachers, "mf", "rrd", 4)
    assert spec.lr == chosen["lr"] and dict(spec.method_config)["k"] == chosen["k"]
    assert f"-o k={chosen['k']}" in spec.command() and spec.identity != before.identity
    explicit = make_spec(SPLIT, teachers, "mf", "rrd", 4, method_options={"k": 7}, lr=0.5)
    assert explicit.lr == 0.5 and dict(explicit.method_config)["k"] == 7
    assert dict(explicit.method_config)["weight"] == chosen["weight"]
    assert make_spec(SPLIT, teachers, "mf", "rrd", 4, tuned=False) == before
    monkeypatch.setattr(tuned_module, "TUNING_ROOT", tmp / "elsewhere")  # another folder: named, or not read
    assert make_spec(SPLIT, teachers, "mf", "rrd", 4, tuning_dir=tmp / "tuning") == spec
    assert make_spec(SPLIT, teachers, "mf", "rrd", 4) == before
    monkeypatch.setattr(tuned_module, "TUNING_ROOT", tmp / "tuning")
    assert make_spec(SPLIT, teachers, "mf", "mtd", 4) == make_spec(SPLIT, teachers, "mf", "mtd", 4, tuned=False)
    path = summary_path("tiny", "mf", "rrd", 4)
    path.write_text(json.dumps({"settings": {"options": {"k": 0}}}))
    with pytest.raises(HetCompError, match=f"{path}: k of rrd must be"):
        make_spec(SPLIT, teachers, "mf", "rrd", 4)


def test_settings_chosen_for_another_split_or_version_are_an_error_other_teachers_a_warning(study, teachers,
                                                                                             tmp_path, monkeypatch):
    _, summary = study
    monkeypatch.setattr(tuned_module, "TUNING_ROOT", tmp_path)
    path = summary_path("tiny", "mf", "rrd", 4)
    path.parent.mkdir(parents=True)
    for key, value, message in (("method_version", 99, "chosen for method version 99"),
                                ("split_fingerprint", "0123", "chosen for split '0123'")):
        path.write_text(json.dumps({**summary, key: value}))
        with pytest.raises(HetCompError, match=f"{message}, this run has .*; rerun `hetcomp tune --dataset tiny"):
            make_spec(SPLIT, teachers, "mf", "rrd", 4)
    path.write_text(json.dumps({**summary, "teachers_digest": "other"}))
    with pytest.warns(UserWarning, match="chosen with teachers other"):
        spec = make_spec(SPLIT, teachers, "mf", "rrd", 4)
    assert spec.lr == summary["settings"]["lr"]
    none_path = summary_path("tiny", "mf", "none", 4)  # w/o KD reads no teacher: no warning
    none_path.write_text(json.dumps({**summary, "method": "none", "method_version": method_class("none").version,
                                     "settings": {"lr": 3e-3, "weight_decay": 0.0, "options": {}},
                                     "teachers_digest": "other"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_spec(SPLIT, teachers, "mf", "none", 4).lr == 3e-3


def test_a_new_study_starts_from_the_defaults_and_dcd_from_the_tuned_rrd(study, tmp_path):
    _, summary = study
    first = summary["history"][0]["params"]
    config = method_class("rrd").config_class()
    assert first == {"lr": 1e-2, "weight_decay": 0.0, "weight": config.weight, "k": config.k}
    tmp = tmp_path
    path = summary_path("tiny", "mf", "rrd", 4, tmp / "tuning")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))
    dcd = start_point("dcd", "mf", 4, "tiny", search_space("dcd"), {}, tmp / "tuning")
    rrd = summary["settings"]
    assert (dcd["k"], dcd["rrd_weight"], dcd["lr"]) == (rrd["options"]["k"], rrd["options"]["weight"], rrd["lr"])
    assert dcd["dcd_weight"] == method_class("dcd").config_class().dcd_weight
    # its second trial: the same, with the smallest correction (nearly the RRD it extends)
    points = start_points("dcd", "mf", 4, "tiny", search_space("dcd"), {}, tmp / "tuning")
    assert points == [dcd, {**dcd, "dcd_weight": search_space("dcd")["dcd_weight"][1]}]
    stale = tmp / "stale"  # RRD settings chosen for another version of RRD: DCD starts from its defaults
    summary_path("tiny", "mf", "rrd", 4, stale).parent.mkdir(parents=True)
    summary_path("tiny", "mf", "rrd", 4, stale).write_text(json.dumps({**summary, "method_version": 1}))
    with pytest.warns(UserWarning, match="does not start from these settings.*method version 1"):
        assert start_point("dcd", "mf", 4, "tiny", search_space("dcd"), {}, stale) == start_point(
            "dcd", "mf", 4, "tiny", search_space("dcd"), {}, tmp / "elsewhere")
    fixed = {"dcd_weight": 0.5}  # a fixed weight leaves nothing to vary: one start
    assert start_points("dcd", "mf", 4, "tiny", search_space("dcd"), fixed, tmp / "tuning") == [
        start_point("dcd", "mf", 4, "tiny", search_space("dcd"), fixed, tmp / "tuning")]
    untuned = start_point("dcd", "mf", 4, "tiny", search_space("dcd"), {"epsilon": 0.5}, tmp / "elsewhere")
    assert untuned["k"] == method_class("dcd").config_class().k and "epsilon" not in untuned
    own = start_point("none", "mf", 4, "tiny", search_space("none"), {}, tmp / "elsewhere")
    assert own["lr"] == model_config("mf").lr  # w/o KD starts from the model's own recipe
    # another student starts from the options the MF study chose, with its own recipe
    other = start_point("rrd", "ml", 4, "tiny", search_space("rrd"), {}, tmp / "tuning")
    assert (other["k"], other["weight"]) == (rrd["options"]["k"], rrd["options"]["weight"])
    assert (other["lr"], other["weight_decay"]) == (first["lr"], first["weight_decay"])
    assert start_point("rrd", "ml", 4, "tiny", search_space("rrd"), {}, tmp / "elsewhere") == first


def test_dcd_chooses_rrds_settings_at_zero_correction_where_rrd_reached_more(study, teachers, tmp_path):
    _, rrd = study
    root = tmp_path / "tuning"
    path = summary_path("tiny", "mf", "rrd", 4, root)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(rrd))
    own = {"lr": 3e-3, "weight_decay": 0.0, "k": 20, "epsilon": 0.01, "n_under": 5, "n_over": 5,
           "rrd_weight": 0.01, "dcd_weight": 0.1, "period": 2, "sides": "user"}
    dcd = {**rrd, "method": "dcd", "method_version": method_class("dcd").version, "best_params": own,
           "best_value": rrd["best_value"] - 0.01, "settings": None}
    chosen = special_case_choice(dcd, root)
    expected = {"k": rrd["settings"]["options"]["k"], "rrd_weight": rrd["settings"]["options"]["weight"],
                "dcd_weight": 0.0}
    assert chosen["settings"] == {"lr": rrd["settings"]["lr"], "weight_decay": rrd["settings"]["weight_decay"],
                                  "options": expected}
    assert chosen["chosen_from"]["method"] == "rrd" and chosen["chosen_from"]["value"] == rrd["best_value"]
    assert chosen["best_value"] == dcd["best_value"] and chosen["best_params"] == own  # its own trials stay
    summary_path("tiny", "mf", "dcd", 4, root).write_text(json.dumps(chosen))
    settings = tuned_defaults("tiny", "mf", "dcd", 4, root)
    assert settings == {"lr": rrd["settings"]["lr"], "weight_decay": rrd["settings"]["weight_decay"], **expected}
    assert "rrd's choice" in studies_page(root / "tiny")
    path.write_text(json.dumps({**rrd, "best_value": 0.9}))  # RRD's study changed since: choose again
    with pytest.warns(UserWarning, match="rrd's choice when its study's best was .* rerun `hetcomp tune"):
        tuned_defaults("tiny", "mf", "dcd", 4, root)
    path.write_text(json.dumps(rrd))
    # the claim it rests on: a DCD run at those settings reaches RRD's best trial value, bit for bit
    blind = validation_only(SPLIT)
    spec = make_spec(blind, teachers, "mf", "dcd", 4, 0, expected, lr=settings["lr"],
                     weight_decay=settings["weight_decay"], tuned=False, **FAST)
    result = train_run(spec, blind, teachers, RunStore(tmp_path / "runs"), "cpu", [])
    assert result["valid"]["recall@50"] == rrd["best_value"]
    # its own settings where they did at least as well, or where RRD's study does not compare
    own_settings = {"lr": 3e-3, "weight_decay": 0.0, "options": {k: v for k, v in own.items() if k not in RECIPE}}
    for other, changed in (({}, {"best_value": rrd["best_value"]}),
                           ({"teachers_digest": "another"}, {}),
                           ({"seed": 1}, {}),
                           ({"budget": rrd["budget"] + 1}, {}),
                           ({"method_version": 1}, {}),
                           ({}, {"fixed": {"dcd_weight": 0.5}, "best_params": {**own, "dcd_weight": 0.5}})):
        path.write_text(json.dumps({**rrd, **other}))
        kept = special_case_choice({**dcd, **changed}, root)
        assert "chosen_from" not in kept and kept["settings"]["options"]["dcd_weight"] == (
            0.5 if changed.get("fixed") else 0.1), (other, changed)
    assert special_case_choice(dcd, tmp_path / "elsewhere")["settings"] == own_settings
    assert special_case_choice({**rrd}, root)["settings"] == rrd["settings"]  # RRD has no special case


def test_a_finished_dcd_study_takes_up_rrds_choice_when_rerun(study, teachers, tmp_path):
    _, rrd = study
    root = tmp_path / "tuning"
    rrd_file = summary_path("tiny", "mf", "rrd", 4, root)
    rrd_file.parent.mkdir(parents=True)
    rrd_file.write_text(json.dumps({**rrd, "best_value": 0.0}))  # below any trial: DCD keeps its own

    def dcd_study() -> dict:
        return tune(SPLIT, teachers, "mf", "dcd", 4, 2, store=RunStore(tmp_path / "runs"), root=root, **FAST)
    own = dcd_study()
    assert "chosen_from" not in own and own["settings"]["options"]["dcd_weight"] > 0
    rrd_file.write_text(json.dumps({**rrd, "best_value": 1.0}))  # RRD's study now reached more
    dcd_file = summary_path("tiny", "mf", "dcd", 4, root)
    before = json.loads(dcd_file.read_text())
    assert dcd_study()["chosen_from"]["value"] == 1.0  # no trial runs: the budget is spent
    after = json.loads(dcd_file.read_text())
    assert after["settings"]["options"]["dcd_weight"] == 0.0 and after["chosen_from"]["method"] == "rrd"
    assert {k: v for k, v in after.items() if k not in ("settings", "chosen_from")} == {
        k: v for k, v in before.items() if k != "settings"}


def test_corrupting_the_test_part_leaves_every_trial_unchanged(study, teachers, tmp_path):
    """The test part replaced by the validation items plus random ones: anything that read it (its metrics, or
    its items as the validation ranking's mask, as ``hetcomp distill`` does) would see every value move."""
    _, summary = study
    noise = sp.random(SPLIT.n_users, SPLIT.n_items, density=0.05, format="csr", random_state=1)
    corrupted = ((SPLIT.valid + noise) > 0).astype(SPLIT.test.dtype).tocsr()
    popular = -torch.arange(SPLIT.n_items, dtype=torch.float32)
    def score(users):
        return popular.expand(len(users), -1)
    seen = [evaluate_split(score, split)["valid"]["recall@50"]
            for split in (SPLIT, dataclasses.replace(SPLIT, test=corrupted))]
    assert seen[1] < seen[0] / 2  # the corruption is visible to a reader of the test part
    other = _study(tmp_path, teachers, dataclasses.replace(SPLIT, test=corrupted))
    assert [(t["params"], t["value"]) for t in other["history"]] == [(t["params"], t["value"])
                                                                     for t in summary["history"]]


def test_an_interrupted_study_resumes_to_its_budget(teachers, tmp_path):
    first = _study(tmp_path, teachers, trials=2)
    assert first["trials"]["complete"] == 2
    resumed = _study(tmp_path, teachers, trials=5)
    assert resumed["trials"]["complete"] == 5 and [t["number"] for t in resumed["history"]] == list(range(5))
    assert len({json.dumps(t["params"]) for t in resumed["history"]}) == 5  # no repeated proposal
    (tmp_path / "whole").mkdir()  # the same budget in one go proposes the same points and reaches the same values
    whole = _study(tmp_path / "whole", teachers, trials=5)
    assert [(t["params"], t["value"]) for t in whole["history"]] == [(t["params"], t["value"])
                                                                     for t in resumed["history"]]
    summary_file = summary_path("tiny", "mf", "rrd", 4, tmp_path / "tuning")
    summary_file.write_text(summary_file.read_text().replace(f'"commit": "{resumed["commit"]}"', '"commit": "maker"'))
    assert _study(tmp_path, teachers, trials=5)["history"] == resumed["history"]  # budget reached: nothing runs
    assert json.loads(summary_file.read_text())["commit"] == "maker"  # nor rewrites who made the summary


def test_a_study_whose_database_is_lost_goes_on_from_its_committed_record(teachers, tmp_path):
    """A fresh checkout has the summary and the trials record (committed) but no SQLite file and no runs."""
    import shutil

    first = _study(tmp_path, teachers, trials=2, storage=None)
    summary_file = summary_path("tiny", "mf", "rrd", 4, tmp_path / "tuning")
    record = trials_path(summary_file)
    saved = json.loads(record.read_text())
    assert [t["number"] for t in saved["trials"]] == [0, 1] and all(t["curve"] for t in saved["trials"])
    summary_file.with_suffix(".db").unlink()
    shutil.rmtree(tmp_path / "runs")
    resumed = _study(tmp_path, teachers, trials=3, storage=None)
    def kept(history):
        return [(t["params"], t["value"], t["last_epoch"]) for t in history]
    assert kept(resumed["history"][:2]) == kept(first["history"])
    assert len(resumed["history"]) == 3 and resumed["history"][2]["params"] not in [t["params"] for t in
                                                                                       first["history"]]
    assert len(list((tmp_path / "runs").rglob("metrics.json"))) == 1  # only the new trial trained
    assert len(json.loads(record.read_text())["trials"]) == 3

    summary_file.with_suffix(".db").unlink()  # a record made for another method version is not taken
    version = method_class("rrd").version
    record.write_text(record.read_text().replace(f'"method_version": {version}', f'"method_version": {version - 1}'))
    with pytest.warns(UserWarning, match="made for other settings \\(method_version\\)"):
        fresh = _study(tmp_path, teachers, trials=1, storage=None)
    assert fresh["history"][0]["params"] == start_point("rrd", "mf", 4, "tiny", search_space("rrd"), {},
                                                        tmp_path / "tuning")
    summary_file.with_suffix(".db").unlink()
    record.write_text("{ truncated")
    with pytest.raises(HetCompError, match="mf-rrd-4.trials.json: not a readable study record"):
        _study(tmp_path, teachers, trials=1, storage=None)


def _study_with_a_killed_trial(teachers, tmp_path) -> tuple:
    """A finished 2-trial study whose trial 1 was killed (its SQLite file and record hold it): (summary file,
    summary)."""
    _study(tmp_path, teachers, trials=1, storage=None)
    summary_file = summary_path("tiny", "mf", "rrd", 4, tmp_path / "tuning")
    storage = f"sqlite:///{summary_file.with_suffix('.db')}"
    study = optuna.load_study(study_name="tiny-mf-rrd-4", storage=storage)
    done = study.trials[0]  # the killed trial had parameters of its own (its resumption trains them)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                              params={**done.params, "lr": done.params["lr"] / 2},
                                              distributions=done.distributions, user_attrs={"worker": "gone:1"}))
    original = _study(tmp_path, teachers, trials=2, storage=None)
    return summary_file, original


def test_a_study_rebuilt_from_its_record_keeps_its_killed_trials_and_numbers(teachers, tmp_path):
    """A trial killed by a stop is in the record too, so the rebuilt study's summary is the lost database's: the
    same trial numbers (a resumed trial names the killed one), failed count and best trial."""
    summary_file, original = _study_with_a_killed_trial(teachers, tmp_path)
    assert [t["state"] for t in original["history"]] == ["complete", "fail", "complete"]
    assert [t["state"] for t in json.loads(trials_path(summary_file).read_text())["trials"]] == [
        "complete", "fail", "complete"]
    summary_file.with_suffix(".db").unlink()
    rebuilt = _study(tmp_path, teachers, trials=2, storage=None)
    def result(summary):
        return {key: value for key, value in summary.items() if key not in ("commit", "code_digest", "machine")}
    assert result(rebuilt) == result(original) and rebuilt["trials"]["failed"] == 1


def test_a_stopped_trial_that_nothing_resumed_runs_again_when_its_study_goes_on(teachers, tmp_path, monkeypatch):
    """A killed start point whose resuming trial was queued (or running) when the machine was lost is in the
    committed record as failed, with nothing resuming it: the rebuilt study queues it again, as a start point
    (never pruned), before any new proposal; so does a trial stopped by hand (Ctrl-C). A trial that failed on an
    error in its own process (it recorded its seconds) is not retried."""
    from hetcomp import tune as tune_module

    first = _study(tmp_path, teachers, trials=1, storage=None)
    summary_file = summary_path("tiny", "mf", "rrd", 4, tmp_path / "tuning")
    record = trials_path(summary_file)
    saved = json.loads(record.read_text())
    killed = saved["trials"][0]
    assert killed["user_attrs"]["start_point"] == "first"
    killed.update(state="fail", value=None, user_attrs={k: v for k, v in killed["user_attrs"].items()
                                                        if k in ("run", "start_point", "worker")})
    record.write_text(json.dumps(saved))
    summary_file.with_suffix(".db").unlink()
    summary_file.unlink()
    rebuilt = _study(tmp_path, teachers, trials=1, storage=None)
    assert [t["state"] for t in rebuilt["history"]] == ["fail", "complete"]
    assert rebuilt["history"][1]["params"] == first["history"][0]["params"]  # the start point, resumed
    resumer = json.loads(record.read_text())["trials"][1]["user_attrs"]
    assert resumer["resumes"] == 0 and resumer["start_point"] == "first"
    assert rebuilt["best_value"] == first["best_value"]  # the same run (spec), finished already: reused

    calls = []
    real = tune_module._train_reporting

    def stopped_by_hand(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    storage = f"sqlite:///{tmp_path / 'by-hand.db'}"
    monkeypatch.setattr(tune_module, "_train_reporting", stopped_by_hand)
    with pytest.raises(KeyboardInterrupt):
        _study(tmp_path / "by-hand", teachers, trials=2, storage=storage)
    again = _study(tmp_path / "by-hand", teachers, trials=2, storage=storage)
    assert [t["state"] for t in again["history"]][:2] == ["fail", "complete"]
    assert again["history"][1]["params"] == again["history"][0]["params"]

    def an_error(*args, **kwargs):
        raise HetCompError("a bad setting")

    errors = f"sqlite:///{tmp_path / 'error.db'}"
    monkeypatch.setattr(tune_module, "_train_reporting", an_error)
    with pytest.raises(HetCompError):
        _study(tmp_path / "error", teachers, trials=1, storage=errors)
    monkeypatch.setattr(tune_module, "_train_reporting", real)
    after_error = _study(tmp_path / "error", teachers, trials=1, storage=errors)
    assert [t["state"] for t in after_error["history"]] == ["fail", "complete"]
    assert after_error["history"][1]["params"] != after_error["history"][0]["params"]  # a new proposal


def test_a_finished_study_rebuilt_from_an_older_record_keeps_its_committed_summary(teachers, tmp_path):
    """Records once kept neither killed trials nor costs: a finished study rebuilt from such a record (a new machine)
    and rerun must not rewrite its committed summary with fewer trials and zero seconds, and a rebuilt trial's cost
    is the committed summary's, not its rebuilt span."""
    summary_file, original = _study_with_a_killed_trial(teachers, tmp_path)
    committed = summary_file.read_text()
    record = trials_path(summary_file)
    older = json.loads(record.read_text())
    older["trials"] = [{**t, "user_attrs": {k: v for k, v in t["user_attrs"].items() if k != "seconds"}}
                       for t in older["trials"] if t["state"] != "fail"]
    record.write_text(json.dumps(older))
    summary_file.with_suffix(".db").unlink()
    rerun = _study(tmp_path, teachers, trials=2, storage=None)
    assert summary_file.read_text() == committed
    assert rerun["trials"]["failed"] == 0  # what the rebuilt study holds; the committed file says more
    assert [t["seconds"] for t in rerun["history"]] == [t["seconds"] for t in original["history"]
                                                        if t["state"] != "fail"]
    assert all(t["seconds"] > 0 for t in rerun["history"])


def test_committed_trials_made_with_other_teachers_are_an_error_not_replaced(teachers, tmp_path):
    """Teachers retrained with another thread count get other rankings: the study's committed record and summary
    are refused with the fix, never silently replaced by a fresh study (w/o KD's are taken: it reads no teacher)."""
    _study(tmp_path, teachers, trials=1, storage=None)
    summary_file = summary_path("tiny", "mf", "rrd", 4, tmp_path / "tuning")
    record = trials_path(summary_file)
    before = record.read_text()
    summary_file.with_suffix(".db").unlink()
    with pytest.raises(HetCompError, match="made with teachers .*, but the teachers here are .*--threads N.*"
                                           "move mf-rrd-4.trials.json and its summary away"):
        tune(SPLIT, teachers[:1], "mf", "rrd", 4, 1, store=RunStore(tmp_path / "runs"), root=tmp_path / "tuning",
             **FAST)
    assert record.read_text() == before
    summary_file.with_suffix(".db").unlink()
    record.unlink()  # a summary without a record (older studies): the same
    with pytest.raises(HetCompError, match="mf-rrd-4.json holds this study's trials made with teachers"):
        tune(SPLIT, teachers[:1], "mf", "rrd", 4, 1, store=RunStore(tmp_path / "runs"), root=tmp_path / "tuning",
             **FAST)
    assert json.loads(summary_file.read_text())["teachers_digest"] != teachers_digest(teachers[:1])


def test_the_refusal_names_the_teachers_whose_rankings_differ(teachers, tmp_path):
    """A record made with teachers of which one ranks differently (retrained on another CPU) names that one."""
    _study(tmp_path, teachers, trials=1, storage=None)
    summary_file = summary_path("tiny", "mf", "rrd", 4, tmp_path / "tuning")
    record = trials_path(summary_file)
    saved = json.loads(record.read_text())
    names = list(saved["study"]["teacher_digests"])
    assert len(names) == len(teachers) > 1
    saved["study"]["teacher_digests"][names[-1]] = "0" * 12
    saved["study"]["teachers_digest"] = "000000000000"
    record.write_text(json.dumps(saved))
    summary_file.with_suffix(".db").unlink()
    with pytest.raises(HetCompError, match=rf"teachers here are \w+ \({names[-1]} differ: .*instruction set"):
        tune(SPLIT, teachers, "mf", "rrd", 4, 1, store=RunStore(tmp_path / "runs"), root=tmp_path / "tuning", **FAST)


def test_a_summary_made_before_trials_records_is_not_studied_again(teachers, tmp_path):
    """Older studies left only their summary (no SQLite file, no trials record): at their budget and made for
    these settings, rerunning `tune` trains nothing; made for another method version, the study runs afresh."""
    import shutil

    first = _study(tmp_path, teachers, trials=2, storage=None)
    assert all(t["seconds"] > 0 for t in first["history"])  # each trial's cost is recorded
    summary_file = summary_path("tiny", "mf", "rrd", 4, tmp_path / "tuning")
    summary_file.with_suffix(".db").unlink()
    trials_path(summary_file).unlink()
    shutil.rmtree(tmp_path / "runs")
    with pytest.warns(UserWarning, match="already holds this study's 2 trials"):
        again = _study(tmp_path, teachers, trials=2, storage=None)
    assert again == first and not (tmp_path / "runs").exists()

    summary_file.with_suffix(".db").unlink()
    version = method_class("rrd").version
    summary_file.write_text(summary_file.read_text().replace(f'"method_version": {version}',
                                                             f'"method_version": {version - 1}'))
    fresh = _study(tmp_path, teachers, trials=1, storage=None)
    assert fresh["method_version"] == version and len(list((tmp_path / "runs").rglob("metrics.json"))) == 1


def test_retrained_teachers_end_a_kd_study_but_not_a_wo_kd_one(teachers, tmp_path):
    """w/o KD reads no teacher: its study (database and record) goes on with other teachers; RRD's is refused."""
    def run(method, trajectories, trials, storage=None):
        return tune(SPLIT, trajectories, "mf", method, 4, trials, storage=storage, store=RunStore(tmp_path / "runs"),
                    root=tmp_path / "tuning", **FAST)

    first = run("none", teachers, 1)
    again = run("none", teachers[:1], 2)  # the database: same study
    assert again["history"][0] == first["history"][0] and again["trials"]["complete"] == 2
    summary_path("tiny", "mf", "none", 4, tmp_path / "tuning").with_suffix(".db").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the record is taken, not warned about and replaced
        restored = run("none", teachers[::-1], 2)
    assert restored["history"] == again["history"]
    alone = run("none", [], 3)  # and with no teachers at all (`hetcomp tune --method none` needs none)
    assert alone["history"][:2] == again["history"] and alone["trials"]["complete"] == 3
    assert "--teachers" not in alone["command"]
    storage = f"sqlite:///{tmp_path / 'rrd.db'}"
    run("rrd", teachers, 1, storage)
    with pytest.raises(HetCompError, match="was created for teachers"):
        run("rrd", teachers[:1], 1, storage)


def test_a_trial_whose_process_died_runs_again_with_its_parameters(teachers, tmp_path):
    import subprocess
    import sys

    from hetcomp import tune as tune_module
    first = _study(tmp_path, teachers, trials=1)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="tiny-mf-rrd-4", storage=storage)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    killed.set_user_attr("worker", f"{tune_module.socket.gethostname()}:{int(dead.stdout)}")
    live = study.ask()
    live.set_user_attr("worker", tune_module.WORKER)  # this process: alive, left alone
    resumed = _study(tmp_path, teachers, trials=2)  # same parameters, same spec: its run resumes (RunStore)
    states = {t["number"]: t["state"] for t in resumed["history"]}
    assert states[killed.number] == "fail" and states[live.number] == "running"
    again = [t for t in resumed["history"] if t["number"] > live.number]
    assert len(again) == 1 and again[0]["state"] == "complete"
    assert again[0]["params"]["lr"] == killed.params["lr"] and first["trials"]["complete"] == 1
    # it names the trial it resumed, and records its run's own cost (every attempt), which prices the run
    assert again[0]["resumes"] == killed.number
    walls = {json.loads(m.read_text())["wall_seconds"] for m in (tmp_path / "runs").glob("*/*/metrics.json")}
    assert again[0]["run_seconds"] in walls and all(t["run_seconds"] in walls for t in first["history"])


def test_a_trial_of_a_worker_that_died_meanwhile_resumes_before_the_next_new_one(teachers, tmp_path):
    """Between two of its trials a live worker takes up the trial of a worker of this machine that died while it
    ran (not only a tune process that starts does)."""
    import subprocess
    import sys

    from hetcomp import tune as tune_module
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    killed = []

    def a_worker_dies(trial):
        if not killed:
            study = optuna.load_study(study_name="tiny-mf-rrd-4", storage=storage)
            orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
            orphan.set_user_attr("worker", f"{tune_module.socket.gethostname()}:{int(dead.stdout)}")
            killed.append(study.trials[orphan.number])

    summary = _study(tmp_path, teachers, trials=3, on_trial=a_worker_dies)
    history = {t["number"]: t for t in summary["history"]}
    orphan = killed[0]
    assert history[orphan.number]["state"] == "fail"
    taken_up = history[orphan.number + 1]  # the very next trial, before any new proposal
    assert taken_up["state"] == "complete" and taken_up["params"]["lr"] == orphan.params["lr"]
    assert summary["trials"]["complete"] == 3


def test_pruned_trials_leave_no_finished_run(teachers, tmp_path):
    summary = _study(tmp_path, teachers, trials=3, pruner=optuna.pruners.ThresholdPruner(lower=1.0))
    start, *pruned = summary["history"]  # the start point (the defaults) is never pruned; the sampler's trials are
    assert summary["trials"]["pruned"] == 2 and start["state"] == "complete" and summary["best_trial"] == 0
    assert all(t["state"] == "pruned" and t["last_epoch"] == 2 for t in pruned)
    assert len(list((tmp_path / "runs").rglob("spec.json"))) == 3
    assert len(list((tmp_path / "runs").rglob("metrics.json"))) == 1  # the start point's run alone finished


def test_bad_input_is_a_clear_error(study, teachers, tmp_path, monkeypatch):
    with pytest.raises(HetCompError, match="unknown method 'magic'"):
        search_space("magic")
    with pytest.raises(HetCompError, match="declares no knob nosuch"):
        search_space("rrd", ["k", "nosuch"])
    with pytest.raises(HetCompError, match="search space of method 'rrd' is empty"):
        search_space("rrd", ["k"], {"k": 10})
    monkeypatch.setattr(method_class("mtd").config_class, "search_space", {"depth": ("int", 1, 3)}, raising=False)
    with pytest.raises(HetCompError, match="mtd' has no setting 'depth'"):
        search_space("mtd")
    for url in ("nosuchdb://x", f"sqlite:///{tmp_path}/missing/folder/x.db", "not a url"):
        with pytest.raises(HetCompError, match="cannot open this study storage"):
            _study(tmp_path, teachers, storage=url)
    stored, _ = study
    with pytest.raises(HetCompError, match="was created for dim 4, not 8"):
        tune(SPLIT, teachers, "mf", "rrd", 8, 3, storage=f"sqlite:///{stored / 'study.db'}", study_name="tiny-mf-rrd-4")
    other = make_tiny_split(n_users=60, n_items=150, per_user=12, seed=1)
    with pytest.raises(HetCompError, match="was created for split_fingerprint"):
        _study(stored, teachers, other, study_name="tiny-mf-rrd-4")
    with pytest.raises(HetCompError, match="was created for student 'mf', not 'ml'"):
        tune(SPLIT, teachers, "ml", "rrd", 4, 3, storage=f"sqlite:///{stored / 'study.db'}", study_name="tiny-mf-rrd-4")


def test_the_command_names_bad_input_in_one_line(tmp_path):
    runner = CliRunner()
    for args, message in ((["--method", "magic"], "unknown method magic"),
                          (["--method", "rrd", "--knobs", "depth"], "declares no knob depth"),
                          (["--method", "rrd", "--knobs", "k", "-o", "k=5"], "is empty"),
                          (["--method", "rrd", "-o", "depth=3"], "rrd has no setting depth"),
                          (["--method", "rrd", "--storage", "nosuchdb://x"], "cannot open this study storage"),
                          (["--method", "rrd,dcd", "-o", "k=5"], "set one study"),
                          (["--student", "mf,xx", "--method", "all"], "unknown student xx"),
                          (["--method", "all", "--jobs", "0"], "--jobs 0: must be an integer ≥ 1"),
                          (["--student", "mf,ml", "--trials", "mf=16"], "gives no budget to ml; add ml=N"),
                          (["--trials", "0"], "--trials 0: must be an integer ≥ 1"),
                          (["--trials", "many"], "give a number of trials or per-student budgets")):
        result = runner.invoke(app, ["tune", *args, "--data-dir", str(tmp_path)])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output


def test_trials_take_one_budget_or_one_per_student():
    from hetcomp.tune_plan import parse_budgets

    assert parse_budgets("8", ["mf", "ml"]) == {"mf": 8, "ml": 8}
    assert parse_budgets(" mf=16, ml=8 ,dnn=8", ["mf", "ml", "dnn"]) == {"mf": 16, "ml": 8, "dnn": 8}
    for text, message in (("mf=16", "gives no budget to ml; add ml=N, e.g. --trials 16 or --trials mf=16,ml=8"),
                          ("mf=16,ml=8,dnn=8", "'dnn' is not among --student mf,ml"),
                          ("mf=16,mf=4,ml=8", "mf has two budgets"),
                          ("mf=16,ml=x", "ml's budget 'x' is not a number"),
                          ("mf=16,ml=0", "ml's budget must be at least 1 trial"),
                          ("-2", "--trials -2: must be an integer ≥ 1"),
                          ("16.5", "give a number of trials or per-student budgets")):
        with pytest.raises(HetCompError, match=message):
            parse_budgets(text, ["mf", "ml"])


def _tune_toy(tmp_path, n_items: int, *args: str):
    """``hetcomp tune`` on a toy csv (40 users, 8 of ``n_items`` items each) with ``args``; its result."""
    rng = np.random.default_rng(0)
    lines = ["u,i"] + [f"{u},{i}" for u in range(40) for i in rng.choice(n_items, size=8, replace=False)]
    (tmp_path / "toy.csv").write_text("\n".join(lines))
    return CliRunner().invoke(app, [
        "tune", "--dataset", "csv", "--path", str(tmp_path / "toy.csv"), "--user-col", "u", "--item-col", "i",
        "--cache-dir", str(tmp_path / "cache"), "--tuning-dir", str(tmp_path / "tuning"), *args])


def test_a_plan_gives_each_student_its_own_budget(tmp_path, monkeypatch):
    """``--trials mf=2,ml=1``: each study's plan carries its student's budget (the plan's runner is replaced here:
    the studies themselves are the plan tests' business)."""
    import hetcomp.tune_plan as tune_plan

    planned = []
    monkeypatch.setattr(tune_plan, "run_studies", lambda plans, *args, **kwargs: planned.extend(plans) or {})
    result = _tune_toy(tmp_path, 30, "--student", "mf,ml", "--method", "none", "--trials", "mf=2,ml=1", "--jobs", "2")
    assert result.exit_code == 0, result.output
    assert {plan.label: plan.trials for plan in planned} == {"mf-none-6": 2, "ml-none-6": 1}


def test_threads_hold_for_one_study_run_in_this_process(tmp_path, monkeypatch):
    """``--threads`` without ``--jobs``: the study's runs train with that many torch threads (it once applied only
    to studies run as tasks, so two one-study workers on two cores each ran two threads and spun)."""
    import hetcomp.tune as tune_module

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    monkeypatch.setattr(tune_module, "tune", lambda *args, **kwargs: {
        "trials": {"complete": 0, "pruned": 0, "failed": 0}, "study_name": "x", "best_value": None})
    result = _tune_toy(tmp_path, 30, "--student", "mf", "--method", "none", "--trials", "1", "--threads", "1")
    assert threads == [1], result.output


def test_a_study_in_a_log_shows_each_evaluation_of_its_trials(tmp_path):
    """Run in the background (output not a terminal), a study prints a line per evaluation: a log shows how far a
    long trial has come, not only the trials that finished."""
    result = _tune_toy(tmp_path, 80, "--student", "mf", "--method", "none", "--trials", "1", "--max-epochs", "2",
                       "--device", "cpu", "--runs-dir", str(tmp_path / "runs"))
    assert result.exit_code == 0, result.output
    assert "trial epoch    2  valid R@50" in result.output and "trial 0: valid R@50" in result.output


def test_all_means_every_registered_method():
    """``--method all`` is one study per registered method, Table 2's CL-DRD (the unsampled ``cl-drd-full``, hours
    a study on a CPU) included: a paper row is not left out for being slow."""
    from hetcomp.cli.tune import parse_methods

    assert parse_methods(" all ") == list(METHODS) and "cl-drd-full" in parse_methods("all")
    assert parse_methods("rd,cl-drd-full") == ["rd", "cl-drd-full"]
    with pytest.raises(HetCompError, match="method"):
        parse_methods("cl-drd-unsampled")


def test_a_study_that_goes_on_tries_the_start_points_that_moved_since_it_began(teachers, tmp_path):
    """RRD tries w/o KD's tuned recipe right after its defaults; when w/o KD's study chooses again before RRD's
    is extended, the extension's next trial is the new recipe (once: a further extension does not repeat it); the
    studies page says when a finished study's start point has moved."""
    root, store = tmp_path / "tuning", RunStore(tmp_path / "runs")

    def run(method: str, trials: int) -> dict:  # a pruner that would cut every trial at its first evaluation
        return tune(SPLIT, teachers, "mf", method, 4, trials, store=store, root=root,
                    pruner=optuna.pruners.ThresholdPruner(lower=1.0), **FAST)

    recipe = run("none", 2)["settings"]
    first = run("rrd", 2)["history"]
    assert (first[1]["params"]["lr"], first[1]["params"]["weight_decay"]) == (recipe["lr"],
                                                                             recipe["weight_decay"])
    # start points run to their end: an informed guess is not judged on its first epochs
    assert [(t["state"], t["start_point"]) for t in first] == [("complete", "first")] * 2
    path = summary_path("tiny", "mf", "none", 4, root)
    summary = json.loads(path.read_text())
    summary["settings"] = {**summary["settings"], "lr": 0.0031, "weight_decay": 1e-6}  # w/o KD chose again
    path.write_text(json.dumps(summary))
    assert [t["params"] for t in run("rrd", 2)["history"]] == [t["params"] for t in first]  # finished: as it was
    extended = run("rrd", 3)["history"]
    assert extended[2]["params"] == {**first[1]["params"], "lr": 0.0031, "weight_decay": 1e-6}
    assert (extended[2]["start_point"], extended[2]["state"]) == ("moved", "complete")  # the summary says why
    assert moved_start_points(json.loads(path.read_text()), root) == []  # w/o KD's own start did not move
    rrd_path = summary_path("tiny", "mf", "rrd", 4, root)
    assert moved_start_points(json.loads(rrd_path.read_text()), root) == []  # tried now
    summary["settings"] = {**summary["settings"], "lr": 0.0042}  # w/o KD chose again, after RRD's study ended
    path.write_text(json.dumps(summary))
    moved = moved_start_points(json.loads(rrd_path.read_text()), root)
    assert [point["lr"] for point in moved] == [0.0042]
    row = next(line for line in studies_page(root / "tiny").splitlines() if line.startswith("| mf | 4 | rrd |"))
    assert row.endswith("| current; 1 start point moved since it began (a larger --trials tries it first) |")
    again = run("rrd", 4)["history"]  # the point at lr 0.0031 is not tried twice; the new one is tried next
    assert again[3]["params"] == {**first[1]["params"], "lr": 0.0042, "weight_decay": 1e-6}
    assert moved_start_points(json.loads(rrd_path.read_text()), root) == []
    sampled = run("rrd", 5)["history"][4]  # nothing moved: the sampler's proposal, which the pruner may cut
    assert sampled["state"] == "pruned" and "start_point" not in sampled


def test_a_trial_that_resumes_a_run_reports_its_whole_curve(teachers, tmp_path):
    """A killed trial's run goes on from its checkpoint under a new trial: that trial holds the epochs before the
    restart too, so that, once finished, it serves the pruner's comparisons at every epoch."""
    from hetcomp.train import Callback
    from hetcomp.tune import _Report

    class Killed(Exception):
        pass

    class KillAfterFirstCheckpoint(Callback):
        seen: dict = {}

        def on_evaluate(self, trainer, epoch, result, improved):
            self.seen[epoch] = result["valid"]["recall@50"]

        def on_epoch_end(self, trainer, epoch, loss):
            if epoch == 3:  # epoch 2's evaluation and checkpoint are written
                raise Killed

    blind = validation_only(SPLIT)
    spec = make_spec(blind, teachers, "mf", "rrd", 4, tuned=False, **FAST)
    store = RunStore(tmp_path / "runs")
    with pytest.raises(Killed):
        train_run(spec, blind, teachers, store, "cpu", [KillAfterFirstCheckpoint()])
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    train_run(spec, blind, teachers, store, "cpu", [_Report(trial)])
    curve = study.trials[trial.number].intermediate_values
    assert sorted(curve) == [2, 4] and curve[2] == KillAfterFirstCheckpoint.seen[2]  # the first attempt's value


def test_a_trial_whose_run_was_already_finished_reports_the_runs_curve(teachers, tmp_path):
    """A trial that finds its run finished (an earlier attempt's process died after writing it) trains nothing;
    it still holds the run's whole validation curve, read from the finished run."""
    from hetcomp.tune import _train_reporting

    blind = validation_only(SPLIT)
    spec = make_spec(blind, teachers, "mf", "rrd", 4, tuned=False, **FAST)
    store = RunStore(tmp_path / "runs")
    finished = train_run(spec, blind, teachers, store, "cpu")
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    result = _train_reporting(trial, spec, blind, teachers, store, "cpu", ())
    assert result["this_call_seconds"] == finished["this_call_seconds"]  # reused, not trained again
    curve = study.trials[trial.number].intermediate_values
    assert curve == {point["epoch"]: point["valid_recall@50"] for point in finished["curve"]} and len(curve) >= 2


def test_a_worker_starts_no_trial_that_another_live_workers_running_one_fills(teachers, tmp_path):
    """Two workers on one study: the budget counts the other's running trial, so they do not make one too many."""
    import os

    from hetcomp import tune as tune_module
    _study(tmp_path, teachers, trials=1)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.load_study(study_name="tiny-mf-rrd-4", storage=storage)
    other = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    other.set_user_attr("worker", f"{tune_module.socket.gethostname()}:{os.getppid()}")  # alive, not this one
    waiting = _study(tmp_path, teachers, trials=2)
    assert waiting["trials"]["complete"] == 1  # nothing ran: the other worker's trial is the budget's second
    more = _study(tmp_path, teachers, trials=3)
    assert more["trials"]["complete"] == 2  # one more: the third is the other worker's
    remote = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)})
    remote.set_user_attr("worker", "another-host:1")  # whether it lives cannot be told: it holds no budget
    assert _study(tmp_path, teachers, trials=4)["trials"]["complete"] == 3
