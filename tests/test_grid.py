"""Grids on Ray (a local 2-worker cluster) and on local processes (where Ray is not installed): the same rows as
one by one, a killed worker's run retried and resumed to the same result (Ray) or named as failed while the
others finish (processes), and a SIGTERM'd driver leaving no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from hetcomp.data import load_dataset
from hetcomp.errors import HetCompError
from hetcomp.runs import RunStore, make_spec, train_run
from hetcomp.runs.grid import Inputs, run_grid, stack_units
from hetcomp.teachers import train_teacher

pytest.importorskip("ray")

KEYS = ("valid", "test", "best_epoch", "epochs", "curve")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A toy csv file, its split (cached) and two small teachers on disk, as a worker would find them."""
    root = tmp_path_factory.mktemp("grid")
    rng = np.random.default_rng(0)
    lines = ["u,i"] + [f"{u},{i}" for u in range(80) for i in rng.choice(60, size=12, replace=False)]
    (root / "toy.csv").write_text("\n".join(lines))
    inputs = Inputs("csv", cache_dir=str(root / "cache"), teachers_dir=str(root / "teachers"),
                    source=(("item_col", "i"), ("path", str(root / "toy.csv")), ("user_col", "u")))
    split = load_dataset("csv", cache_dir=root / "cache", **dict(inputs.source))
    for name in ("mf", "ae"):
        torch.manual_seed(0)
        train_teacher(split, name, root / "teachers", dim=8, top_m=30, max_epochs=6, eval_every=2, lr=1e-2)
    split, trajectories = inputs.load(("mf", "ae"))
    return root, inputs, split, trajectories


def _specs(world, seeds, max_epochs=4, patience=5):
    _, _, split, trajectories = world
    return [make_spec(split, trajectories, "mf", method, 4, seed, max_epochs=max_epochs, eval_every=2,
                      patience=patience)
            for method in ("none", "rrd") for seed in seeds]


def _same(a: dict, b: dict) -> bool:
    return all(a[key] == b[key] for key in KEYS)


@pytest.mark.parametrize("backend", ["ray", "processes"])
def test_a_grid_on_two_workers_gives_the_rows_of_one_by_one(world, tmp_path, backend):
    _, inputs, split, trajectories = world
    specs = _specs(world, seeds=(0, 1))
    seen = []
    report = run_grid(specs, inputs, RunStore(tmp_path / "grid"), jobs=2, on_result=lambda s, m: seen.append(s),
                      backend=backend)
    assert not report.failures and sorted(s.identity for s in seen) == sorted(s.identity for s in specs)
    for spec in specs:
        alone = train_run(spec, split, trajectories, RunStore(tmp_path / "serial"))
        assert _same(report.results[spec.identity], alone)


def _kill_when_checkpointed(folder, killed: list[int], done: threading.Event) -> None:
    """SIGKILL the process that holds the run ``folder`` once it has written a checkpoint (its pid into ``killed``),
    watching until the grid is ``done`` (not a fixed time: on a loaded machine a worker may take minutes to start)."""
    while not done.is_set() and not killed:
        lock = folder / ".lock"
        if (folder / "last.pt").is_file() and lock.is_file() and lock.read_text().strip():
            pid = int(lock.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
        time.sleep(0.01)


def test_a_killed_worker_is_retried_and_resumes_to_the_same_result(world, tmp_path):
    _, inputs, split, trajectories = world
    spec = _specs(world, seeds=(0,), max_epochs=40, patience=40)[1]  # all 40 epochs: time to be killed
    store = RunStore(tmp_path / "ray")
    folder = store.folder(spec)
    killed: list[int] = []
    done = threading.Event()
    killer = threading.Thread(target=_kill_when_checkpointed, args=(folder, killed, done))
    killer.start()
    try:
        report = run_grid([spec], inputs, store, jobs=2)
    finally:
        done.set()
        killer.join()
    assert killed and not report.failures
    resumed = report.results[spec.identity]
    assert resumed["resumed_from_epoch"] > 0  # the retry continued from last.pt, not restarted
    alone = train_run(spec, split, trajectories, RunStore(tmp_path / "serial"))
    assert _same(resumed, alone)


@pytest.mark.parametrize("backend", ["ray", "processes"])
def test_stacked_seeds_on_a_grid_give_each_seed_its_own_run(world, tmp_path, backend):
    """--stack-seeds: one task per run specification whose method stacks; each seed still writes its own folder
    and metrics, which follow the ordinary run of that seed up to batched kernels' rounding. A seed finished
    before is reused, not retrained."""
    _, inputs, split, trajectories = world
    specs = _specs(world, seeds=(0, 1, 2))
    store = RunStore(tmp_path / "stacked")
    train_run(specs[4], split, trajectories, store)  # rrd seed 1, finished before the grid
    units = stack_units(specs, stack_seeds=True)
    assert [[(s.method, s.seed) for s in unit] for unit in units] == [[("none", 0), ("none", 1), ("none", 2)],
                                                                     [("rrd", 0), ("rrd", 1), ("rrd", 2)]]
    report = run_grid(specs, inputs, store, jobs=2, backend=backend, stack_seeds=True)
    assert not report.failures and sorted(report.results) == sorted(s.identity for s in specs)
    for spec in specs:
        stacked = report.results[spec.identity]
        assert stacked == RunStore(store.root).finished(spec)
        expected = [] if (spec.method, spec.seed) == ("rrd", 1) else ([0, 2] if spec.method == "rrd" else [0, 1, 2])
        assert stacked.get("stacked_with", []) == expected
        alone = train_run(spec, split, trajectories, RunStore(tmp_path / "serial"))
        assert (stacked["epochs"], stacked["best_epoch"]) == (alone["epochs"], alone["best_epoch"])
        for mine, theirs in zip(stacked["curve"], alone["curve"], strict=True):
            assert mine["valid_recall@50"] == pytest.approx(theirs["valid_recall@50"], abs=1e-6)


def test_only_methods_that_stack_at_their_settings_are_grouped(world):
    _, _, split, trajectories = world
    kd = [make_spec(split, trajectories, "mf", "kd", 4, seed, {"losses": losses})
          for losses in ("kl:1.0", "listwise:1.0") for seed in (0, 1)]
    assert [len(unit) for unit in stack_units(kd, stack_seeds=True)] == [1, 1, 2]
    assert [len(unit) for unit in stack_units(kd, stack_seeds=False)] == [1, 1, 1, 1]
    rrd = [make_spec(split, trajectories, "mf", "rrd", 4, seed) for seed in (0, 1)]
    both = kd + rrd  # --stack-methods: only the named methods' seeds stack
    assert [len(unit) for unit in stack_units(both, stack_seeds=frozenset({"rrd"}))] == [1, 1, 1, 1, 2]
    assert [len(unit) for unit in stack_units(both, stack_seeds=frozenset({"kd", "rrd"}))] == [1, 1, 2, 2]


def test_stack_size_splits_a_rows_seeds_into_even_stacks(world):
    """--stack-size: no stack holds more seeds than asked, a row's seeds split as evenly as can be, larger first,
    in seed order; methods that do not stack stay one run a task."""
    specs = _specs(world, seeds=(0, 1, 2, 3, 4))  # w/o KD's five seeds, then RRD's

    def seeds(size: int | None) -> list[list[int]]:
        return [[spec.seed for spec in unit] for unit in stack_units(specs, stack_seeds=True, stack_size=size)]

    assert seeds(None) == seeds(5) == [[0, 1, 2, 3, 4]] * 2
    assert seeds(3) == [[0, 1, 2], [3, 4]] * 2
    assert seeds(2) == [[0, 1], [2, 3], [4]] * 2
    assert seeds(1) == [[seed] for seed in range(5)] * 2
    only_rrd = stack_units(specs, stack_seeds=frozenset({"rrd"}), stack_size=3)
    assert [[spec.seed for spec in unit] for unit in only_rrd] == [[0], [1], [2], [3], [4], [0, 1, 2], [3, 4]]


def test_a_killed_process_fails_its_run_by_name_and_the_others_finish(world, tmp_path):
    _, inputs, _, _ = world
    long = _specs(world, seeds=(0,), max_epochs=40, patience=40)[1]  # rrd for 40 epochs: time to be killed
    short = _specs(world, seeds=(1, 2))
    store = RunStore(tmp_path / "processes")
    folder = store.folder(long)
    killed: list[int] = []
    done = threading.Event()
    killer = threading.Thread(target=_kill_when_checkpointed, args=(folder, killed, done))
    killer.start()
    try:
        report = run_grid([long, *short], inputs, store, jobs=2, backend="processes")
    finally:
        done.set()
        killer.join()
    assert killed
    assert [(spec.identity, "died" in message) for spec, message in report.failures] == [(long.identity, True)]
    assert sorted(report.results) == sorted(spec.identity for spec in short)


def test_without_ray_a_grid_runs_on_local_processes_and_says_so(world, tmp_path, monkeypatch):
    from hetcomp.runs import grid

    monkeypatch.setattr(grid, "ray_importable", lambda: False)
    said = []
    specs = _specs(world, seeds=(0,))[:1]
    report = run_grid(specs, world[1], RunStore(tmp_path), jobs=2, say=said.append)
    assert not report.failures and list(report.results) == [specs[0].identity]
    assert said == ["Ray is not installed here: 1 run(s) on 2 local processes"]
    with pytest.raises(HetCompError, match="unknown grid backend"):
        run_grid(specs, world[1], RunStore(tmp_path), backend="threads")
    with pytest.raises(HetCompError, match="pip install ray"):
        run_grid(specs, world[1], RunStore(tmp_path), address="auto")


DRIVER = textwrap.dedent("""
    import sys, pickle
    from hetcomp.runs import RunStore
    from hetcomp.runs.grid import run_grid
    specs, inputs = pickle.load(open(sys.argv[1], "rb"))
    run_grid(specs, inputs, RunStore(sys.argv[2]), jobs=2, backend=sys.argv[3])
""")


@pytest.mark.parametrize("backend", ["ray", "processes"])
def test_sigterm_of_the_driver_leaves_no_process(world, tmp_path, backend):
    import pickle

    _, inputs, _, _ = world
    specs = _specs(world, seeds=(0, 1), max_epochs=5000, patience=5000)  # runs outlive the test
    (tmp_path / "grid.pkl").write_bytes(pickle.dumps((specs, inputs)))
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path / "grid.pkl"), str(tmp_path / "runs"),
                               backend])
    deadline = time.time() + 300  # a loaded 2-core machine needs minutes to start Ray and a first checkpoint
    while time.time() < deadline and not list((tmp_path / "runs").rglob("last.pt")):
        time.sleep(0.1)
    assert list((tmp_path / "runs").rglob("last.pt")), "no run started"
    family = psutil.Process(driver.pid).children(recursive=True)
    assert family
    driver.send_signal(signal.SIGTERM)
    driver.wait(60)
    gone, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert driver.returncode != 0


@pytest.mark.parametrize("backend", ["ray", "processes"])
def test_a_failed_run_is_reported_by_name_while_the_others_finish(world, tmp_path, backend):
    import dataclasses

    good = _specs(world, seeds=(0,))
    bad = dataclasses.replace(good[0], split_fingerprint="not-this-split")
    report = run_grid([bad, *good], world[1], RunStore(tmp_path), jobs=2, backend=backend)
    assert sorted(report.results) == sorted(s.identity for s in good)
    assert [(spec.identity, "not the driver's" in message) for spec, message in report.failures] == [(bad.identity,
                                                                                                     True)]


@pytest.mark.parametrize("backend", ["ray", "processes"])
def test_a_plan_of_studies_on_two_workers_gives_the_studies_of_one_by_one(world, tmp_path, backend):
    """Ray tasks, or local processes where Ray is not installed (a bare GPU machine): the same studies."""
    from hetcomp.tune import tune
    from hetcomp.tune_plan import StudyPlan, run_studies

    _, inputs, split, trajectories = world
    plans = [StudyPlan("mf", method, 4, 2, ("mf", "ae"), max_epochs=4, eval_every=2, patience=2)
             for method in ("none", "rrd")]
    ended, counts = [], []
    summaries = run_studies(plans, inputs, split.meta["dataset"], tmp_path / "runs", tmp_path / "tuning", jobs=2,
                            on_done=lambda plan, summary, message: ended.append((plan.label, message)),
                            on_progress=counts.append, poll=0.5, backend=backend)
    assert sorted(ended) == [("mf-none-4", None), ("mf-rrd-4", None)]
    assert all(set(count) == {"mf-none-4", "mf-rrd-4"} and all(0 <= n <= 2 for n in count.values())
               for count in counts)
    for plan in plans:
        alone = tune(split, trajectories, "mf", plan.method, 4, 2, store=RunStore(tmp_path / "serial"),
                     root=tmp_path / "serial-tuning", max_epochs=4, eval_every=2, patience=2)
        assert [(t["params"], t["value"]) for t in summaries[plan.label]["history"]] == [
            (t["params"], t["value"]) for t in alone["history"]]


def test_without_ray_a_plan_runs_on_processes_and_a_killed_study_fails_by_name(world, tmp_path, monkeypatch):
    """Where Ray is not installed, each study is a local process; one that dies fails its study, named, and the
    plan's other studies end as usual (a rerun resumes the killed one from its trials record)."""
    from hetcomp.runs import grid
    from hetcomp.tune_plan import StudyPlan, run_studies

    monkeypatch.setattr(grid, "ray_importable", lambda: False)
    _, inputs, split, _ = world
    plans = [StudyPlan("mf", "none", 4, 1, (), max_epochs=4, eval_every=2, patience=2),
             StudyPlan("mf", "rrd", 4, 1, ("mf", "ae"), max_epochs=60, eval_every=2, patience=60)]
    killed: list[int] = []

    done = threading.Event()

    def kill_rrd() -> None:  # the RRD trial's process, once its run has checkpointed (watched until the plan ends)
        while not done.is_set() and not killed:
            for last in (tmp_path / "runs").rglob("last.pt"):
                lock = last.parent / ".lock"
                if "rrd" in last.parent.name and lock.is_file() and lock.read_text().strip():
                    os.kill(int(lock.read_text()), signal.SIGKILL)
                    killed.append(1)
                    break
            time.sleep(0.01)

    killer = threading.Thread(target=kill_rrd)
    killer.start()
    ended = []
    try:
        summaries = run_studies(plans, inputs, split.meta["dataset"], tmp_path / "runs", tmp_path / "tuning",
                                jobs=2, on_done=lambda plan, summary, message: ended.append((plan.label, message)),
                                poll=0.2)
    finally:
        done.set()
        killer.join()
    assert killed and list(summaries) == ["mf-none-4"]
    assert [(label, message is not None and "its process died" in message) for label, message in ended] == [
        ("mf-none-4", False), ("mf-rrd-4", True)]
    with pytest.raises(HetCompError, match="unknown plan backend"):
        run_studies(plans, inputs, split.meta["dataset"], tmp_path / "runs", tmp_path / "tuning", backend="threads")
    with pytest.raises(HetCompError, match="pip install ray"):
        run_studies(plans, inputs, split.meta["dataset"], tmp_path / "runs", tmp_path / "tuning", address="auto")


def test_a_study_waits_for_the_studies_whose_choices_its_first_trials_read():
    from hetcomp.tune_plan import StudyPlan, prerequisites

    plans = [StudyPlan(student, method, 6, 8, ("mf",)) for student in ("mf", "ml") for method in
             ("none", "rrd", "dcd", "hetcomp")]
    needs = {plan.label: sorted(prerequisites(plan, plans)) for plan in plans}
    assert needs == {"mf-none-6": [], "mf-rrd-6": ["mf-none-6"], "mf-dcd-6": ["mf-rrd-6"], "mf-hetcomp-6": [],
                     "ml-none-6": ["mf-none-6"], "ml-rrd-6": ["mf-rrd-6", "ml-none-6"],
                     "ml-dcd-6": ["mf-dcd-6", "ml-rrd-6"], "ml-hetcomp-6": ["mf-hetcomp-6"]}


def test_a_plan_starts_its_ready_studies_in_the_listed_order_as_workers_free():
    from hetcomp.tune_plan import StudyPlan, next_studies

    plans = [StudyPlan(student, method, 6, 8, ("mf",)) for student, method in
             (("mf", "none"), ("mf", "rrd"), ("mf", "hetcomp"), ("mf", "kd"), ("ml", "none"))]
    labels = lambda chosen: [plan.label for plan in chosen]  # noqa: E731
    assert labels(next_studies(plans, plans, set(), 1)) == ["mf-none-6"]
    assert labels(next_studies(plans, plans, set(), 2)) == ["mf-none-6", "mf-hetcomp-6"]
    assert labels(next_studies(plans[1:], plans, {"mf-none-6"}, 1)) == ["mf-rrd-6"]
    assert labels(next_studies(plans[1:], plans, {"mf-none-6"}, 0)) == []
    assert labels(next_studies(plans[1:], plans, {"mf-none-6"}, None)) == ["mf-rrd-6", "mf-hetcomp-6", "mf-kd-6",
                                                                            "ml-none-6"]


def test_a_plan_starts_the_studies_that_head_the_longest_chains_first():
    from hetcomp.tune_plan import StudyPlan, chain_lengths, next_studies

    methods = ("none", "hetcomp", "rrd", "dcd")
    plans = [StudyPlan(student, method, 6, 8, ("mf",)) for student in ("mf", "ml", "dnn") for method in methods]
    lengths = chain_lengths(plans)
    assert lengths["mf-none-6"] == 4 and lengths["ml-none-6"] == 3 and lengths["mf-hetcomp-6"] == 2
    assert lengths["dnn-dcd-6"] == lengths["ml-hetcomp-6"] == 1
    labels = lambda chosen: [plan.label for plan in chosen]  # noqa: E731
    waiting = plans[len(methods):]
    mf_ended = {plan.label for plan in plans[:len(methods)]}
    # in plan order ML's w/o KD and HetComp would come first and DNN's w/o KD → RRD → DCD chain would wait
    assert labels(next_studies(waiting, plans, mf_ended, 2)) == ["ml-none-6", "dnn-none-6"]
    assert labels(next_studies(waiting, plans, mf_ended, None)) == ["ml-none-6", "dnn-none-6", "ml-hetcomp-6",
                                                                     "dnn-hetcomp-6"]


def test_the_tune_command_runs_a_plan_and_a_rerun_resumes_it(world, tmp_path):
    from typer.testing import CliRunner

    from hetcomp.cli import app

    root, inputs, _, _ = world
    args = ["tune", "--dataset", "csv", "--path", str(root / "toy.csv"), "--user-col", "u", "--item-col", "i",
            "--cache-dir", inputs.cache_dir, "--teachers-dir", inputs.teachers_dir, "--teachers", "mf,ae",
            "--student", "mf", "--method", "none,rrd", "--dim", "4", "--trials", "1", "--max-epochs", "2",
            "--jobs", "2", "--runs-dir", str(tmp_path / "runs"), "--tuning-dir", str(tmp_path / "tuning")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "mf-none-4: best valid R@50" in result.output and "mf-rrd-4: best valid R@50" in result.output
    summaries = sorted(p.name for p in (tmp_path / "tuning").rglob("*.json") if ".trials" not in p.name)
    assert summaries == ["mf-none-4.json", "mf-rrd-4.json"]
    runs = len(list((tmp_path / "runs").rglob("metrics.json")))
    again = CliRunner().invoke(app, args)  # both studies at their budget: nothing trains again
    assert again.exit_code == 0 and len(list((tmp_path / "runs").rglob("metrics.json"))) == runs


def test_a_plans_log_names_each_studys_newest_trial_and_its_best_so_far(tmp_path):
    from hetcomp.distill import method_class
    from hetcomp.runs.tuned import summary_path
    from hetcomp.tune import trials_path
    from hetcomp.tune_plan import StudyPlan, finished_trials, latest_trial

    plan = StudyPlan("mf", "rrd", 6, 8, ("mf",))
    assert latest_trial("toy", plan, tmp_path) == "" and finished_trials("toy", plan, tmp_path) == 0
    path = trials_path(summary_path("toy", "mf", "rrd", 6, tmp_path))
    path.parent.mkdir(parents=True)
    trials = [{"number": 0, "state": "complete", "value": 0.21, "user_attrs": {"seconds": 300.2}},
              {"number": 1, "state": "fail", "value": None, "user_attrs": {}},  # killed: not counted
              {"number": 2, "state": "complete", "value": 0.25, "user_attrs": {"seconds": 410.0}},
              {"number": 3, "state": "pruned", "value": 0.1234, "user_attrs": {"seconds": 12.4}}]
    record = {"study": {"method_version": method_class("rrd").version}, "trials": trials}
    path.write_text(json.dumps(record))
    assert finished_trials("toy", plan, tmp_path) == 3
    assert latest_trial("toy", plan, tmp_path) == "trial 3 pruned at 0.1234 after 12 s; best 0.2500 (trial 2)"
    record["study"]["method_version"] -= 1  # an earlier version's record, which this study will replace
    path.write_text(json.dumps(record))
    assert latest_trial("toy", plan, tmp_path) == "" and finished_trials("toy", plan, tmp_path) == 0


def test_the_tune_commands_progress_lines_name_the_newest_trial(world, tmp_path, monkeypatch):
    """A plan's log (a background run's only view) gets a line per new trial with its value and the best so far."""
    from typer.testing import CliRunner

    import hetcomp.tune_plan as tune_plan
    from hetcomp.cli import app
    from hetcomp.distill import method_class
    from hetcomp.runs.tuned import summary_path
    from hetcomp.tune import trials_path

    def one_trial_then_stop(plans, inputs, dataset, runs_dir, root, *args, on_progress=None, **kwargs):
        path = trials_path(summary_path(dataset, "mf", "none", 4, root))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"study": {"method_version": method_class("none").version}, "trials": [
            {"number": 0, "state": "complete", "value": 0.125, "user_attrs": {"seconds": 3.0}}]}))
        on_progress({plan.label: tune_plan.finished_trials(dataset, plan, root) for plan in plans})
        return {}

    monkeypatch.setattr(tune_plan, "run_studies", one_trial_then_stop)
    root, inputs, _, _ = world
    result = CliRunner().invoke(app, [
        "tune", "--dataset", "csv", "--path", str(root / "toy.csv"), "--user-col", "u", "--item-col", "i",
        "--cache-dir", inputs.cache_dir, "--student", "mf,ml", "--method", "none", "--dim", "4", "--trials", "2",
        "--runs-dir", str(tmp_path / "runs"), "--tuning-dir", str(tmp_path / "tuning")])
    assert result.exit_code == 0, result.output
    logged = " ".join(result.output.split())  # the console wraps long lines
    assert "mf-none-4: 1/2 trials finished; trial 0 ended at 0.1250 after 3 s; best 0.1250 (trial 0)" in logged


def test_a_task_never_takes_more_threads_than_the_caller_allows(monkeypatch):
    from hetcomp.runs.grid import task_threads

    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert (task_threads(2, None, 1), task_threads(16, None, 1), task_threads(1, "auto", 3)) == (4, 1, 3)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert (task_threads(2, None, 1), task_threads(1, "auto", 3)) == (1, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert task_threads(2, None, 1) == 4
