"""The run layer: one specification, one identity; a finished run is reused only when nothing that decides it
changed; one process at a time trains a run folder."""

from __future__ import annotations

import json
import multiprocessing

import pytest
import torch
from conftest import make_tiny_split

from hetcomp.data import HetCompError
from hetcomp.distill import method_class
from hetcomp.runs import RunStore, distill, make_spec
from hetcomp.runs import spec as spec_module
from hetcomp.runs.tuned import summary_path
from hetcomp.teachers import train_teacher

SPLIT = make_tiny_split(n_users=80, n_items=60, per_user=12)
FAST = {"max_epochs": 2, "eval_every": 2}


def _teachers(root, dim: int, split=SPLIT) -> list:
    out = []
    for name in ("mf", "ae"):
        torch.manual_seed(0)
        out.append(train_teacher(split, name, root, dim=dim, top_m=30, max_epochs=6, eval_every=2, lr=1e-2))
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return _teachers(tmp_path_factory.mktemp("teachers16"), 16)


def _folders(root) -> list:
    return sorted(p.parent.name for p in root.rglob("metrics.json"))


def test_a_finished_run_is_reused_when_nothing_changed(teachers, tmp_path):
    first = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    again = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    assert again == first and len(_folders(tmp_path)) == 1
    # spelling a default out is the same run
    assert distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, lr=spec_module.KD_LR, **FAST) == first
    assert json.loads((tmp_path.rglob("spec.json").__next__()).read_text())["identity"] == first["identity"]


def test_other_teachers_are_a_new_run_not_a_stale_one(teachers, tmp_path_factory, tmp_path):
    """The issue's example: distil from teachers of dim 16, then of dim 8, into the same runs folder."""
    first = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    smaller = _teachers(tmp_path_factory.mktemp("teachers8"), 8)
    second = distill(SPLIT, smaller, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    fresh = distill(SPLIT, smaller, "mf", "rrd", dim=4, runs_root=tmp_path_factory.mktemp("fresh"), **FAST)
    assert second["identity"] != first["identity"] and len(_folders(tmp_path)) == 2
    assert second["test"] == fresh["test"] and second["teachers_digest"] != first["teachers_digest"]


def test_another_split_is_a_new_run(tmp_path_factory, tmp_path):
    other = make_tiny_split(n_users=80, n_items=60, per_user=12, seed=1)
    a = make_spec(SPLIT, _teachers(tmp_path_factory.mktemp("a"), 8), "mf", "rrd", 4)
    b = make_spec(other, _teachers(tmp_path_factory.mktemp("b"), 8, other), "mf", "rrd", 4)
    assert a.split_fingerprint != b.split_fingerprint and a.identity != b.identity


def test_a_method_option_or_version_or_default_change_is_a_new_run(teachers, tmp_path, monkeypatch):
    first = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    option = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, method_options={"weight": 0.5}, **FAST)
    assert option["identity"] != first["identity"]
    monkeypatch.setattr(method_class("rrd"), "version", method_class("rrd").version + 1)
    bumped = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    assert bumped["identity"] != first["identity"] and bumped["method_version"] == first["method_version"] + 1
    monkeypatch.setattr(spec_module, "KD_LR", 3e-2)  # a default recipe changed since
    relearnt = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    assert relearnt["lr"] == 3e-2 and len(_folders(tmp_path)) == 4


def test_a_changed_config_default_changes_the_identity(teachers, monkeypatch):
    """The method's whole resolved config is hashed, not only the options given."""
    before = make_spec(SPLIT, teachers, "mf", "hetcomp", 4)
    config = method_class("hetcomp").config_class
    monkeypatch.setattr(config, "__init__", _with_default(config.__init__, "deadline", 123))
    after = make_spec(SPLIT, teachers, "mf", "hetcomp", 4)
    assert dict(after.method_config)["deadline"] == 123 and after.identity != before.identity


def _with_default(init, key, value):
    def patched(self, *args, **kwargs):
        kwargs.setdefault(key, value)
        init(self, *args, **kwargs)
    return patched


def test_the_command_names_what_differs_from_the_defaults(teachers):
    spec = make_spec(SPLIT, teachers, "mf", "hetcomp", 4, seed=3, method_options={"deadline": 100},
                     weight_decay=1e-5, max_epochs=50)
    command = spec.command()
    for part in ("--student mf", "--dim 4", "--method hetcomp", "--seed 3", "--teachers mf,ae", "-o deadline=100",
                 "--weight-decay 1e-05", "--max-epochs 50"):
        assert part in command
    assert "--lr" not in command and "--eval-every" not in command


def test_student_model_settings_are_part_of_the_run_and_of_its_command(teachers):
    """``-m n_negatives=3``: another run (its own folder), spelled in its command; the model's defaults are not."""
    plain = make_spec(SPLIT, teachers, "ml", "none", 4)
    spec = make_spec(SPLIT, teachers, "ml", "none", 4, model_options={"n_negatives": "3", "margin": 0.5})
    assert dict(spec.student_config)["n_negatives"] == 3 and dict(spec.student_config)["margin"] == 0.5
    assert spec.identity != plain.identity and " -m " not in plain.command()
    assert "-m margin=0.5" in spec.command() and "-m n_negatives=3" in spec.command()
    assert make_spec(SPLIT, teachers, "ml", "none", 4, model_options={"n_negatives": 10}).identity == plain.identity


@pytest.mark.parametrize("option, message", [
    ({"lr": 0.1}, "-m lr: the student's lr is set with --lr, not -m"),
    ({"negatives": 1}, "-m negatives=1: student 'ml' has no setting negatives; its model settings: n_negatives, "
                       "margin, init_std, score_scale"),
    ({"n_negatives": 0}, "-m n_negatives=0: n_negatives .* ≥ 1"),
])
def test_a_bad_student_model_setting_is_a_one_line_error(teachers, option, message):
    with pytest.raises(HetCompError, match=message):
        make_spec(SPLIT, teachers, "ml", "none", 4, model_options=option)


def test_a_folder_holding_another_spec_or_a_corrupt_file_is_named(teachers, tmp_path):
    first = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    spec_file = next(tmp_path.rglob("spec.json"))
    stored = json.loads(spec_file.read_text())
    spec_file.write_text(json.dumps(dict(stored, seed=99)))
    with pytest.raises(HetCompError, match="another specification"):
        distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    spec_file.write_text(json.dumps(stored))
    metrics = spec_file.with_name("metrics.json")
    metrics.write_text(metrics.read_text()[:40])
    with pytest.raises(HetCompError, match=f"{metrics}.*delete"):
        distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, **FAST)
    assert first["run"] in str(metrics)


def _distill_in_child(root, teachers, queue):
    torch.set_num_threads(1)
    result = distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=root, max_epochs=6, eval_every=2)
    queue.put((result["identity"], result["test"]["recall@50"], result["this_call_seconds"]))


def _twice_at_once(target, *args) -> list:
    """Run ``target(*args, queue)`` in two forked processes at once; both must succeed; what each put."""
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [context.Process(target=target, args=(*args, queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(120)
    assert [child.exitcode for child in children] == [0, 0]
    return [queue.get(timeout=5) for _ in children]


def test_two_processes_on_one_run_wait_for_each_other_instead_of_crashing(teachers, tmp_path):
    results = _twice_at_once(_distill_in_child, tmp_path, teachers)
    assert results[0][:2] == results[1][:2] and len(_folders(tmp_path)) == 1
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("last.pt"))


def test_the_store_finds_nothing_for_an_unfinished_run(teachers, tmp_path):
    spec = make_spec(SPLIT, teachers, "mf", "rrd", 4)
    store = RunStore(tmp_path)
    assert store.finished(spec) is None
    assert distill(SPLIT, teachers, "mf", "rrd", dim=4, runs_root=tmp_path, train=False) is None


def _teacher_in_child(root, queue):
    torch.set_num_threads(1)
    trajectory = train_teacher(SPLIT, "mf", root, dim=8, top_m=30, max_epochs=8, eval_every=2, lr=1e-2)
    queue.put(trajectory.states.sum().item())


def test_two_processes_training_one_teacher_share_it_instead_of_crashing(tmp_path):
    sums = _twice_at_once(_teacher_in_child, tmp_path)
    assert sums[0] == sums[1] and len(list(tmp_path.rglob("trajectory.npz"))) <= 1


def test_a_spec_command_run_through_the_cli_is_the_same_run(tmp_path):
    """The command a run records reruns that very run: parsed by the CLI it yields the same identity."""
    import shlex

    import numpy as np
    from typer.testing import CliRunner

    from hetcomp.cli import app
    from hetcomp.data import load_dataset
    from hetcomp.distill import EnsembleConfig

    rng = np.random.default_rng(0)
    lines = ["u,i"] + [f"{u},{i}" for u in range(60) for i in rng.choice(50, size=10, replace=False)]
    (tmp_path / "toy.csv").write_text("\n".join(lines))
    source = {"path": str(tmp_path / "toy.csv"), "user_col": "u", "item_col": "i", "sep": ","}
    split = load_dataset("csv", cache_dir=tmp_path / "cache", **source)
    teachers = [train_teacher(split, "mf", tmp_path / "teachers", dim=8, top_m=30, max_epochs=4, eval_every=2)]
    spec = make_spec(split, teachers, "mf", "rrd", 4, seed=1, method_options={"weight": 0.5}, lr=3e-3,
                     max_epochs=2, eval_every=2, patience=3, source={"dataset": "csv", **source},
                     ensemble=EnsembleConfig(decay="power", beta=0.1), model_options={"n_negatives": 2})
    words = shlex.split(spec.command())[2:]
    result = CliRunner().invoke(app, ["distill", *words, "--teachers-dir", str(tmp_path / "teachers"),
                                      "--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache"),
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [p.parent.name for p in (tmp_path / "runs").rglob("metrics.json")] == [spec.folder_name]


def test_wo_kd_runs_without_teachers_and_its_identity_names_none(teachers, tmp_path):
    """w/o KD learns from the data alone: `hetcomp distill --method none` needs no trained teacher, and its run
    is the same whether teachers were given or not (retraining them leaves its rows valid)."""
    import shlex

    import numpy as np
    from typer.testing import CliRunner

    from hetcomp.cli import app
    from hetcomp.data import load_dataset

    with_teachers = make_spec(SPLIT, teachers, "mf", "none", 4, seed=0, max_epochs=2, eval_every=2, tuned=False)
    alone = make_spec(SPLIT, [], "mf", "none", 4, seed=0, max_epochs=2, eval_every=2, tuned=False)
    assert with_teachers == alone and alone.teachers == () and alone.teachers_digest == ""
    assert "--teachers" not in alone.command()
    result = distill(SPLIT, teachers, "mf", "none", 4, seed=0, runs_root=tmp_path / "runs", max_epochs=2,
                     eval_every=2)
    assert distill(SPLIT, [], "mf", "none", 4, seed=0, runs_root=tmp_path / "runs", max_epochs=2,
                   eval_every=2) == result  # the same run, reused
    assert result["teachers_digest"] == ""
    rng = np.random.default_rng(0)
    lines = ["u,i"] + [f"{u},{i}" for u in range(60) for i in rng.choice(50, size=10, replace=False)]
    (tmp_path / "toy.csv").write_text("\n".join(lines))
    source = ["--dataset", "csv", "--path", str(tmp_path / "toy.csv"), "--user-col", "u", "--item-col", "i",
              "--sep", ","]
    folders = ["--teachers-dir", str(tmp_path / "no-teachers"), "--runs-dir", str(tmp_path / "cli-runs"),
               "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--max-epochs", "2", "--eval-every", "2"]
    done = CliRunner().invoke(app, ["distill", *source, *folders, "--method", "none"])
    assert done.exit_code == 0, done.output
    assert "settings: built-in, no study at" in " ".join(done.output.split())
    split = load_dataset("csv", cache_dir=tmp_path / "cache", path=str(tmp_path / "toy.csv"), user_col="u",
                         item_col="i", sep=",")
    spec = make_spec(split, [], "mf", "none", 6, max_epochs=2, eval_every=2, tuned=False,
                     source={"dataset": "csv", "path": str(tmp_path / "toy.csv"), "user_col": "u", "item_col": "i",
                             "sep": ","})
    assert [p.parent.name for p in (tmp_path / "cli-runs").rglob("metrics.json")] == [spec.folder_name]
    assert shlex.split(spec.command())[:2] == ["hetcomp", "distill"]
    needs = CliRunner().invoke(app, ["distill", *source, *folders, "--method", "rrd"])
    assert needs.exit_code != 0 and "train-teachers" in needs.output
    tuning = tmp_path / "studies"  # settings `hetcomp tune --tuning-dir` wrote elsewhere: read with the same option
    chosen = summary_path(split.meta["dataset"], "mf", "none", 6, tuning)
    chosen.parent.mkdir(parents=True)
    chosen.write_text(json.dumps({"settings": {"lr": 0.003, "weight_decay": 0.0, "options": {}}}))
    tuned = CliRunner().invoke(app, ["distill", *source, *folders, "--method", "none", "--tuning-dir", str(tuning)])
    assert tuned.exit_code == 0, tuned.output
    assert "settings: the choice of the study in" in " ".join(tuned.output.split())
    commands = [json.loads(p.read_text())["command"] for p in (tmp_path / "cli-runs").rglob("metrics.json")]
    assert len(commands) == 2 and sum("--lr 0.003" in command for command in commands) == 1


def test_dcd_at_zero_correction_is_served_by_its_finished_rrd_twin(teachers, tmp_path, monkeypatch):
    """DCD at dcd_weight 0 trains exactly as RRD (same parameters, tested in test_baselines): its run is the RRD
    run's numbers under DCD's identity and command, the twin named; a trained DCD gives the same numbers."""
    from hetcomp.runs import execute
    from hetcomp.runs.spec import twin_spec

    rrd_options, dcd_options = {"weight": 0.3, "k": 12}, {"rrd_weight": 0.3, "k": 12, "dcd_weight": 0.0}
    run = {"dim": 4, "seed": 1, "lr": 1e-2, "max_epochs": 4, "eval_every": 2}
    dcd_spec = make_spec(SPLIT, teachers, "mf", "dcd", 4, seed=1, method_options=dcd_options, lr=1e-2,
                         max_epochs=4, eval_every=2)
    rrd_spec = make_spec(SPLIT, teachers, "mf", "rrd", 4, seed=1, method_options=rrd_options, lr=1e-2,
                         max_epochs=4, eval_every=2)
    assert twin_spec(dcd_spec) == rrd_spec and twin_spec(rrd_spec) is None
    assert twin_spec(make_spec(SPLIT, teachers, "mf", "dcd", 4, method_options={**dcd_options, "dcd_weight": 0.1},
                               **FAST)) is None

    trained = distill(SPLIT, teachers, "mf", "dcd", method_options=dcd_options, runs_root=tmp_path / "alone", **run)
    rrd = distill(SPLIT, teachers, "mf", "rrd", method_options=rrd_options, runs_root=tmp_path / "shared", **run)
    monkeypatch.setattr(execute, "_train", lambda *args: pytest.fail("the twin's finished run should serve"))
    adopted = distill(SPLIT, teachers, "mf", "dcd", method_options=dcd_options, runs_root=tmp_path / "shared", **run)
    assert (adopted["valid"], adopted["test"], adopted["curve"]) == (trained["valid"], trained["test"],
                                                                     trained["curve"])
    assert adopted["test"] == rrd["test"] and adopted["identity"] == dcd_spec.identity != rrd["identity"]
    assert adopted["trained_as"]["method"] == "rrd" and adopted["trained_as"]["identity"] == rrd_spec.identity
    assert adopted["command"] == dcd_spec.command()
    assert adopted["wall_seconds"] == rrd["wall_seconds"] and adopted["this_call_seconds"] == 0.0
    assert distill(SPLIT, teachers, "mf", "dcd", method_options=dcd_options, runs_root=tmp_path / "shared",
                   **run) == adopted  # now a finished run of its own
    assert len(_folders(tmp_path / "shared")) == 2


def test_a_dcd_whose_rrd_part_its_options_do_not_spell_out_has_no_twin():
    """The twin is the RRD that the command line's options make: where this run's RRD part differs from it (a
    value not among the options, e.g. a default of DCD's that RRD does not share), there is none."""
    import dataclasses

    from hetcomp.distill.dcd import DCD, DCDConfig

    config = dataclasses.asdict(DCDConfig(dcd_weight=0.0, temperature=5.0))
    assert DCD.trains_as(config, {"dcd_weight": 0.0}) is None
    assert DCD.trains_as(config, {"dcd_weight": 0.0, "temperature": 5.0}) == ("rrd", {"temperature": 5.0})


@pytest.mark.parametrize(("method", "options"), [("hetcomp", {"period": 2, "deadline": 4, "dkc_k": 10, "k": 20,
                                                                "pos_k": 5}),
                                                ("mtd", {"k": 10})])
def test_a_stack_of_seeds_writes_each_seed_and_resumes_where_it_was_interrupted(teachers, tmp_path, monkeypatch,
                                                                                 method, options):
    """train_stack: the seeds of one run as one stacked model (HetComp's DKC state and MTD's logit table are each
    replica's own), each seed's run folder written as an ordinary run's; killed after a checkpoint, the same call
    resumes the stack and ends where the uninterrupted stack ends."""
    from hetcomp.runs import execute
    from hetcomp.stacked import StackedTrainer

    specs = [make_spec(SPLIT, teachers, "mf", method, 4, seed, options, max_epochs=8, eval_every=2, patience=10)
             for seed in (0, 1)]
    whole = execute.train_stack(specs, SPLIT, teachers, RunStore(tmp_path / "whole"))
    assert [r["stacked_with"] for r in whole] == [[0, 1], [0, 1]] and whole[0]["test"] != whole[1]["test"]
    assert [r["identity"] for r in whole] == [s.identity for s in specs]

    train_epoch = StackedTrainer.train_epoch

    def killed_at_epoch_5(self, trainers):
        if trainers[0].state.epoch == 4:  # after the checkpoints of epoch 4
            raise KeyboardInterrupt
        return train_epoch(self, trainers)

    store = RunStore(tmp_path / "interrupted")
    monkeypatch.setattr(StackedTrainer, "train_epoch", killed_at_epoch_5)
    with pytest.raises(KeyboardInterrupt):
        execute.train_stack(specs, SPLIT, teachers, store)
    monkeypatch.undo()
    assert all((store.folder(spec) / "last.pt").is_file() for spec in specs)
    resumed = execute.train_stack(specs, SPLIT, teachers, store)
    assert [r["resumed_from_epoch"] for r in resumed] == [4, 4]
    for mine, theirs in zip(resumed, whole, strict=True):
        assert (mine["curve"], mine["test"], mine.get("dkc_log")) == (theirs["curve"], theirs["test"],
                                                                       theirs.get("dkc_log"))
    assert execute.train_stack(specs, SPLIT, teachers, store) == resumed  # finished: reused


def test_a_stack_its_student_refuses_trains_its_seeds_one_by_one_and_says_so(tmp_path):
    from hetcomp.runs import execute

    specs = [make_spec(SPLIT, [], "gnn", "none", 4, seed, **FAST) for seed in (0, 1)]
    said: list[str] = []
    results = execute.train_stack(specs, SPLIT, [], RunStore(tmp_path), say=said.append)
    assert [r["seed"] for r in results] == [0, 1] and not any("stacked_with" in r for r in results)
    assert any("train one by one" in line and "gnn student cannot be stacked" in line for line in said)


def test_a_run_counts_its_cpu_time_over_every_attempt_and_says_when_it_cannot(teachers, tmp_path):
    """cpu_seconds beside wall_seconds (the same spans): carried through a resume; unknown (None, an empty ledger
    cell) for a run resumed from a checkpoint made before it was counted, never a silently partial figure."""
    from hetcomp.runs import train_run
    from hetcomp.train import Callback

    class Killed(Exception):
        pass

    class KillAtEpoch3(Callback):
        def on_epoch_end(self, trainer, epoch, loss):
            if epoch == 3:  # epoch 2's checkpoint is written
                raise Killed

    spec = make_spec(SPLIT, teachers, "mf", "rrd", 4, max_epochs=6, eval_every=2, patience=10)
    for legacy in (False, True):
        store = RunStore(tmp_path / f"legacy-{legacy}")
        with pytest.raises(Killed):
            train_run(spec, SPLIT, teachers, store, "cpu", [KillAtEpoch3()])
        last = store.folder(spec) / "last.pt"
        saved = torch.load(last, weights_only=False)
        first_attempt = saved["state"]["cpu_seconds"]
        assert first_attempt > 0
        if legacy:
            del saved["state"]["cpu_seconds"]
            torch.save(saved, last)
        result = train_run(spec, SPLIT, teachers, store, "cpu")
        assert result["resumed_from_epoch"] == 2
        if legacy:
            assert result["cpu_seconds"] is None
        else:
            assert result["cpu_seconds"] >= round(first_attempt, 1)  # the first attempt's, and more
