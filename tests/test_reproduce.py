"""`hetcomp reproduce --quick` end to end on a generated dataset: tables, reuse of finished runs, figure, costs."""

from __future__ import annotations

import csv
import json
import math
import shutil
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import hetcomp.paper.clock as clock_module
import hetcomp.paper.table2 as table2_module
from hetcomp.cli import app
from hetcomp.errors import HetCompError
from hetcomp.paper.clock import CLOCK_FILE, open_clock, union_seconds
from hetcomp.paper.ledger import read_rows
from hetcomp.paper.pages import paired_p_value
from hetcomp.runs import teachers_digest
from hetcomp.trajectory import Trajectory

runner = CliRunner()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    rng = np.random.default_rng(0)
    popularity = 1.0 / np.arange(1, 301) ** 0.8
    popularity /= popularity.sum()
    lines = ["u,i"]
    for user in range(100):
        for item in rng.choice(300, size=20, replace=False, p=popularity):
            lines.append(f"{user},{item}")
    (root / "toy.csv").write_text("\n".join(lines))
    return root


def invoke(root, *args):
    result = runner.invoke(app, ["reproduce", "--dataset", "csv", "--path", str(root / "toy.csv"), "--user-col", "u",
                                 "--item-col", "i", "--quick", "--device", "cpu",
                                 "--teachers-dir", str(root / "teachers"), "--runs-dir", str(root / "runs"),
                                 "--results-dir", str(root / "results"), "--cache-dir", str(root / "cache"), *args])
    assert result.exit_code == 0, result.output
    return result


def test_quick_table2_resumes_and_writes_every_artifact(workspace):
    first = invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "2", "--methods", "none,rrd,hetcomp")
    out = workspace / "results" / "csv-toy-first300"
    with open(out / "table2.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["method"], r["seed"]) for r in rows) == [(m, s) for m in ("hetcomp", "none", "rrd")
                                                              for s in ("0", "1")]
    for row in rows:
        assert 0.0 <= float(row["recall@50"]) <= 1.0 and row["command"].startswith("hetcomp ")
        assert (row["teachers_digest"] == "") == (row["method"] == "none") and row["config"]  # w/o KD reads none
    page = (out / "table2.md").read_text()
    assert "| HetComp |" in page and "| Imp. |" in page and "p (paired t)" in page and "Ensemble" in page
    assert "(0.2814)" not in page  # a quick slice never shows the paper's numbers beside its own
    manifest = json.loads((out / "manifest.json").read_text())["table2"]
    assert manifest["seeds"] == [0, 1] and len(manifest["runs"]) == 6 and manifest["wall_seconds_this_call"] > 0
    assert "[1/6]" in first.output
    # after each run the log says what is left and how long it should take by the finished rows
    log = " ".join(first.output.split())  # the console wraps long lines
    assert "5 runs left" in log and "4 not yet estimated" in log
    assert first.output.count("nothing left") == 1
    # nothing existed to reuse: this call's wall time is a from-scratch measurement, kept with its command
    measured = manifest["from_scratch_measured"]
    assert measured["wall_seconds"] == manifest["wall_seconds_this_call"] and measured["runs"] == 6
    assert measured["command"] == manifest["command"] and measured["jobs"] == 1

    # a second call reuses every finished run, even with the run folders gone (the CSV is the source of truth)
    for metrics in (workspace / "runs").rglob("metrics.json"):
        metrics.unlink()
    again = invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "2", "--methods", "none,rrd,hetcomp")
    assert "[1/6]" not in again.output
    with open(out / "table2.csv") as handle:
        assert [r["recall@50"] for r in csv.DictReader(handle)] == [r["recall@50"] for r in rows]
    reused = json.loads((out / "manifest.json").read_text())["table2"]
    assert reused["from_scratch_measured"] == measured  # carried over, not replaced by a call that reused runs
    assert reused["wall_seconds_this_call"] != measured["wall_seconds"]

    # --no-train writes the table from what is finished and lists the rest
    listed = invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "3", "--methods", "none,rrd,hetcomp",
                    "--no-train")
    assert "[1/9]" not in listed.output
    page = (out / "table2.md").read_text()
    assert "Not finished yet (3 of 9 runs" in page and "| HetComp |" in page
    assert "Reading it" not in page
    assert json.loads((out / "manifest.json").read_text())["table2"]["from_scratch_measured"] == measured

    # a hand-written reading of the table survives its regeneration
    (out / "table2-notes.md").write_text("RRD wins on this toy because ...\n")
    invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "2", "--methods", "none,rrd,hetcomp", "--no-train")
    assert "RRD wins on this toy because ..." in (out / "table2.md").read_text()
    assert len(read_rows(out / "table2.csv")) == 6

    invoke(workspace, "--figure", "curves", "--students", "mf")
    assert (out / "curves-mf.png").stat().st_size > 1000

    invoke(workspace, "--table", "cost", "--students", "mf")
    cost = (out / "cost.md").read_text()
    assert "ensemble" in cost and "student mf" in cost and "teacher iae" in cost


def test_a_from_scratch_table_stopped_midway_is_measured_over_the_calls_of_its_command(workspace, tmp_path,
                                                                                       monkeypatch):
    shutil.copy(workspace / "toy.csv", tmp_path / "toy.csv")
    grid = ("--table", "2", "--students", "mf", "--seeds", "1", "--methods", "none,rrd")
    trained_before_the_stop = train_missing = table2_module.train_missing

    def stopped_after_one_group(rep, trajectories, group, record):
        trained_before_the_stop(rep, trajectories, group[:1], record)
        raise RuntimeError("the session ended")

    monkeypatch.setattr(table2_module, "train_missing", stopped_after_one_group)
    first = runner.invoke(app, ["reproduce", "--dataset", "csv", "--path", str(tmp_path / "toy.csv"), "--user-col",
                                "u", "--item-col", "i", "--quick", "--device", "cpu", "--teachers-dir",
                                str(tmp_path / "teachers"), "--runs-dir", str(tmp_path / "runs"), "--results-dir",
                                str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache"), *grid])
    assert first.exit_code != 0 and "from scratch: this table's whole wall time is measured" in first.output
    out = tmp_path / "results" / "csv-toy-first300"
    clock = json.loads((out / CLOCK_FILE).read_text())
    assert len(clock["sittings"]) == 1 and clock["sittings"][0]["seconds"] > 0  # its last beat, teachers included
    assert len(read_rows(out / "table2.csv")) == 1

    monkeypatch.setattr(table2_module, "train_missing", train_missing)
    again = invoke(tmp_path, *grid)  # the same command goes on: no teachers to train, one run left
    assert "from-scratch clock:" in again.output
    assert "measured from scratch" in " ".join(again.output.split())
    assert not (out / CLOCK_FILE).exists()
    manifest = json.loads((out / "manifest.json").read_text())["table2"]
    measured = manifest["from_scratch_measured"]
    assert measured["sittings"] == 2 and measured["runs"] == 2
    sittings = [s["seconds"] for s in measured["per_sitting"]]
    assert measured["wall_seconds"] == pytest.approx(sum(sittings), abs=0.2)  # one after the other: no overlap
    assert sittings[1] == pytest.approx(manifest["wall_seconds_this_call"], abs=0.1)
    assert measured["wall_seconds"] > manifest["wall_seconds_this_call"]  # the stopped call's time counts too


def test_the_clock_counts_overlapping_calls_once_and_ends_when_another_grid_trains_there(tmp_path, monkeypatch):
    assert union_seconds([(0, 10), (5, 12), (20, 21)]) == 13 and union_seconds([]) == 0
    monkeypatch.setattr(clock_module, "BEAT_SECONDS", 0.05)
    said = []
    grid = {"students": ["mf"], "methods": ["none", "rrd"], "seeds": [0], "dim": 6}
    clock = open_clock(tmp_path, "hetcomp reproduce ...", grid, True, True, 2, said.append, time.perf_counter())
    time.sleep(0.4)  # beats without being stopped, as a call killed at a session's end would have
    assert json.loads((tmp_path / CLOCK_FILE).read_text())["sittings"][0]["seconds"] >= 0.2
    clock.stop()
    assert open_clock(tmp_path, "other", grid, False, False, 1, said.append, 0.0) is None  # trains nothing
    assert (tmp_path / CLOCK_FILE).exists()
    reordered = open_clock(tmp_path, "again", {**grid, "methods": ["rrd", "none"]}, False, True, 1,
                           said.append, time.perf_counter())
    assert reordered is not None and "earlier call(s)" in said[-1]  # the same cells: a sitting of the same table
    reordered.stop()
    assert len(json.loads((tmp_path / CLOCK_FILE).read_text())["sittings"]) == 2
    assert open_clock(tmp_path, "other", {**grid, "seeds": [0, 1]}, False, True, 1, said.append, 0.0) is None
    assert not (tmp_path / CLOCK_FILE).exists() and "ended the from-scratch measurement" in said[-1]
    assert open_clock(tmp_path, "again", grid, False, True, 1, said.append, 0.0) is None  # nothing to go on with
    (tmp_path / CLOCK_FILE).write_text("{")
    with pytest.raises(HetCompError, match="delete it"):
        open_clock(tmp_path, "again", grid, False, True, 1, said.append, 0.0)


def test_parallel_runs_are_queued_longest_first_by_a_ledger_with_unknown_rows_first():
    from types import SimpleNamespace

    from hetcomp.paper.runs import longest_first

    specs = [SimpleNamespace(student=s, method=m, seed=k) for s in ("mf", "dnn") for m in ("none", "kd", "rd")
             for k in (0, 1)]
    rows = [{"student": "mf", "method": "none", "wall_seconds": "50"}, {"student": "mf", "method": "kd",
            "wall_seconds": "600"}, {"student": "mf", "method": "kd", "wall_seconds": "700"},
            {"student": "dnn", "method": "none", "wall_seconds": "70"}, {"student": "dnn", "method": "kd",
            "wall_seconds": "690"}, {"student": "dnn", "method": "rd", "wall_seconds": "n/a"}]
    order = [(s.student, s.method, s.seed) for s in longest_first(specs, rows)]
    assert order == [("mf", "rd", 0), ("mf", "rd", 1), ("dnn", "rd", 0), ("dnn", "rd", 1),  # no usable wall time
                     ("dnn", "kd", 0), ("dnn", "kd", 1), ("mf", "kd", 0), ("mf", "kd", 1),
                     ("dnn", "none", 0), ("dnn", "none", 1), ("mf", "none", 0), ("mf", "none", 1)]
    assert longest_first(specs, []) == specs  # no ledger: the table's order


def test_the_time_left_of_a_table_comes_from_its_finished_rows_and_names_what_it_cannot_estimate():
    from types import SimpleNamespace

    from hetcomp.paper.runs import time_left

    rows = [{"student": "mf", "method": "kd", "wall_seconds": "3000"}, {"student": "mf", "method": "kd",
            "wall_seconds": "4200"}, {"student": "mf", "method": "none", "wall_seconds": "60"}]
    kd, none, rd = (SimpleNamespace(student="mf", method=method, seed=0) for method in ("kd", "none", "rd"))
    assert time_left([kd, kd, none], rows) == ("3 runs left, ~2.0 h by the ledger's mean wall time of their "
                                               "student and method")
    assert time_left([kd, none, none], rows, jobs=2).startswith("3 runs left, ~1.0 h on 2 workers")  # the longest
    assert time_left([kd, kd, kd, none], rows, jobs=2).startswith("4 runs left, ~1.5 h on 2 workers")
    assert time_left([kd, rd], rows) == ("2 runs left, ~1.0 h for 1 of them, by the ledger's mean wall time of "
                                         "their student and method; 1 not yet estimated")
    assert "no finished run" in time_left([rd], rows) and time_left([], rows) == "nothing left"


def test_the_time_left_goes_at_the_pace_of_the_runs_this_call_finished():
    """A machine faster or busier than the ledger's: once runs finish, the estimate scales by their wall time over
    what the ledger expected of them (as it was when the call started)."""
    from types import SimpleNamespace

    from hetcomp.paper.runs import Pace, expected_walls, time_left

    rows = [{"student": "mf", "method": "kd", "wall_seconds": "3600"}]
    kd, rd = (SimpleNamespace(student="mf", method=method, seed=0) for method in ("kd", "rd"))
    pace = Pace(expected_walls(rows))
    assert pace.ratio is None and time_left([kd, kd], rows, pace=pace).startswith("2 runs left, ~2.0 h by the")
    pace.add(rd, 500.0)  # no estimate: says nothing of the pace
    assert pace.ratio is None
    pace.add(kd, 1800.0)
    pace.add(kd, 3600.0)
    assert pace.ratio == 0.75
    grown = rows + [{"student": "mf", "method": "kd", "wall_seconds": "1800"}]  # the call's own rows, at its pace
    assert time_left([kd, kd], rows, pace=pace) == (
        "2 runs left, ~1.5 h by the ledger's mean wall time of their student and method, at this call's pace "
        "(0.75× that over its 2 finished runs)")
    assert time_left([kd, kd], grown, pace=pace).startswith("2 runs left, ~1.5 h")  # not scaled twice
    nothing_then = Pace(expected_walls([]))  # a table's own ledger, empty when the call started
    nothing_then.add(kd, 1800.0)
    assert nothing_then.ratio is None and time_left([kd], grown, pace=nothing_then).startswith("1 runs left, ~45 min")


def test_runs_not_yet_in_the_ledger_are_priced_by_their_studys_trial_at_the_same_settings(tmp_path):
    import json
    from types import SimpleNamespace

    from hetcomp.paper.runs import study_walls, time_left

    folder = tmp_path / "toy"
    folder.mkdir()

    def summary(name: str, settings: dict, history: list, **more) -> None:
        (folder / f"{name}.json").write_text(json.dumps({"settings": settings, "history": history, **more}))

    kd_settings = {"lr": 0.002, "weight_decay": 0.0, "options": {"k": 68}}
    summary("mf-kd-6", kd_settings, [{"number": 0, "state": "complete", "seconds": 900.0, "params": {"lr": 0.01}},
                                     {"number": 1, "state": "complete", "seconds": 1800.0, "params": {"lr": 0.002}}],
            best_trial=1)
    summary("mf-rrd-6", {"lr": 0.004, "options": {"k": 49}},
            [{"number": 0, "state": "fail", "seconds": None, "params": {"lr": 0.004}},
             {"number": 1, "state": "complete", "seconds": 200.0, "params": {"lr": 0.004}},  # resumed trial 0's run
             {"number": 2, "state": "complete", "seconds": 700.0, "params": {"lr": 0.005}}], best_trial=1)
    summary("mf-dcd-6", {"lr": 0.005, "options": {"k": 49, "dcd_weight": 0.0}},
            [{"number": 0, "state": "complete", "seconds": 50.0, "params": {}}], best_trial=0,
            chosen_from={"method": "rrd", "trial": 2})

    def spec(method: str, lr: float, **config) -> SimpleNamespace:
        return SimpleNamespace(dataset="toy", student="mf", method=method, dim=6, lr=lr, weight_decay=0.0,
                               method_config=tuple(config.items()))

    priced = study_walls(tmp_path)
    kd = spec("kd", 0.002, k=68, temperature=1.0)
    assert priced(kd) == 1800.0  # the chosen trial's cost
    assert priced(spec("kd", 0.003, k=68)) is None and priced(spec("kd", 0.002, k=69)) is None  # other settings
    assert priced(spec("rrd", 0.004, k=49)) is None  # it timed only its part of a resumed run
    assert priced(spec("dcd", 0.005, k=49, dcd_weight=0.0)) == 700.0  # the trial of the study it was chosen from
    assert priced(spec("none", 0.01)) is None  # no summary
    rows = [{"student": "mf", "method": "kd", "wall_seconds": "3600"}]
    assert priced(kd) == 1800.0 and time_left([kd], rows, fallback=priced).startswith("1 runs left, ~1.0 h")
    dcd = spec("dcd", 0.005, k=49, dcd_weight=0.0)
    assert time_left([dcd, spec("rrd", 0.004, k=49)], [], fallback=priced) == (
        "2 runs left, ~12 min for 1 of them, by the ledger's mean wall time of their student and method, or their "
        "study's trial at the same settings; 1 not yet estimated")


def test_price_times_each_cell_on_this_machine_and_trains_or_writes_nothing(workspace):
    """--price: a few timed epochs and an evaluation per (student, method) cell, times the epochs its ledger rows
    trained (or '?' where nothing says how long its runs train); no run, row or page is made."""
    from hetcomp.paper.price import CellPrice, PhasePrice, threads_per_run

    invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "2", "--methods", "none,rrd")
    before = sorted(str(p) for p in workspace.rglob("*") if p.is_file())
    own_threads, timed_threads = torch.get_num_threads(), threads_per_run(1)
    torch.set_num_threads(timed_threads + 1)  # the caller's count, which pricing must leave as it found it
    try:
        result = invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "2", "--methods", "none,rrd,rd",
                        "--price")
        assert torch.get_num_threads() == timed_threads + 1
    finally:
        torch.set_num_threads(own_threads)
    heading = next(line for line in result.output.splitlines() if "thread(s) a run" in line)
    assert f", {timed_threads} threads, " in heading  # the machine line: the threads the runs were timed on
    assert sorted(str(p) for p in workspace.rglob("*") if p.is_file()) == before
    rows = {line.split(" | ")[1]: line for line in result.output.splitlines() if line.startswith("| mf |")}
    assert set(rows) == {"none", "rrd", "rd"}
    assert "(ledger (2 rows))" in rows["rrd"] and rows["rd"].endswith("| ? | ? |")
    assert "1 cell(s) not priced" in result.output and "thread(s) a run" in result.output
    price = CellPrice("mf", "rrd", [PhasePrice("", 25, 0.5, 0.5)], evaluation_seconds=2.0, epochs=25,
                      epochs_from="ledger (5 rows)", eval_every=10)
    assert price.run_seconds == 25 * 0.5 + 3 * 2.0  # evaluations at epochs 10, 20 and the last
    phased = CellPrice("mf", "hetcomp", [PhasePrice("L_O", 10, 0.5, 0.4), PhasePrice("L_F", 30, 1.0, 0.9)],
                       evaluation_seconds=1.0, epochs=40, epochs_from="ledger (5 rows)", eval_every=10)
    assert phased.run_seconds == 10 * 0.5 + 30 * 1.0 + 4 * 1.0 and phased.seconds_per_epoch == 35 / 40


def test_price_is_for_table_2_and_needs_the_teachers(workspace, tmp_path):
    result = runner.invoke(app, ["reproduce", "--dataset", "csv", "--path", str(workspace / "toy.csv"),
                                 "--user-col", "u", "--item-col", "i", "--quick", "--table", "1", "--price"])
    assert result.exit_code != 0 and "--price prices the runs of --table 2" in result.output
    result = runner.invoke(app, ["reproduce", "--dataset", "csv", "--path", str(workspace / "toy.csv"),
                                 "--user-col", "u", "--item-col", "i", "--quick", "--table", "2", "--price",
                                 "--stack-seeds"])
    assert result.exit_code != 0 and "times ordinary runs on this machine" in result.output
    result = runner.invoke(app, ["reproduce", "--dataset", "csv", "--path", str(workspace / "toy.csv"),
                                 "--user-col", "u", "--item-col", "i", "--quick", "--table", "2", "--price",
                                 "--methods", "rrd", "--seeds", "1", "--teachers-dir", str(tmp_path / "none"),
                                 "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code != 0 and "not trained under" in result.output and "hetcomp train-teachers" in result.output
    assert not (tmp_path / "none").exists()


def test_a_trial_that_resumed_a_killed_one_prices_its_whole_run_not_its_own_attempt(tmp_path):
    """The run's cost over every attempt: recorded on the trial, else read from its run folder, else unknown."""
    import json

    from hetcomp.runs.tuned import trial_run_seconds, trials_path

    summary_file = tmp_path / "tuning" / "toy" / "mf-rrd-6.json"
    summary_file.parent.mkdir(parents=True)
    killed = {"number": 0, "state": "fail", "seconds": None, "params": {"lr": 0.004}}
    history = [killed, {"number": 1, "state": "complete", "seconds": 200.0, "params": {"lr": 0.004}, "resumes": 0},
               {"number": 2, "state": "complete", "seconds": 300.0, "params": {"lr": 0.004}, "resumes": 0,
                "run_seconds": 900.0},
               {"number": 3, "state": "complete", "seconds": 700.0, "params": {"lr": 0.005}}]
    summary_file.write_text(json.dumps({"dataset": "toy", "history": history}))
    runs = tmp_path / "runs"
    assert trial_run_seconds(summary_file, 2, runs_root=runs) == 900.0  # recorded on the trial
    assert trial_run_seconds(summary_file, 3, runs_root=runs) == 700.0  # a trial that resumed nothing: its own
    assert trial_run_seconds(summary_file, 1, runs_root=runs) is None  # timed its own attempt only
    assert trial_run_seconds(summary_file, 9, runs_root=runs) is None  # no such trial
    trials_path(summary_file).write_text(json.dumps({"trials": [
        {"number": 1, "params": {"lr": 0.004}, "user_attrs": {"run": "rrd-mf-6-abc"}}]}))
    (runs / "toy" / "rrd-mf-6-abc").mkdir(parents=True)
    (runs / "toy" / "rrd-mf-6-abc" / "metrics.json").write_text(json.dumps({"wall_seconds": 850.5}))
    assert trial_run_seconds(summary_file, 1, runs_root=runs) == 850.5  # the run folder it names, where it is here


def test_jobs_train_runs_as_ray_tasks_and_the_driver_merges_their_rows(workspace):
    result = invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "2", "--methods", "rd", "--jobs", "2")
    out = workspace / "results" / "csv-toy-first300"
    assert "training 2 runs on 2 local workers" in result.output and "[2/2]" in result.output
    assert "nothing left" in result.output
    rows = [r for r in read_rows(out / "table2.csv") if r["method"] == "rd"]
    assert sorted(r["seed"] for r in rows) == ["0", "1"]
    assert "| RD |" in (out / "table2.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())["table2"]
    assert all(r["command"] == manifest["command"] for r in rows)  # a quick row: the reproduce call that made it
    assert manifest["jobs"] == 2 and {r["command"] for r in rows} <= set(manifest["runs"])
    assert "rd" in manifest["grid"]["methods"]
    assert manifest["from_scratch_estimate"]["seconds"] >= manifest["teacher_training_seconds"]

    # nothing left to train: no cluster is started
    again = invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "2", "--methods", "rd", "--jobs", "2")
    assert "Ray" not in again.output


def test_two_reproduce_calls_at_once_end_with_every_row_page_and_manifest(workspace, tmp_path):
    """Side by side on the same (empty) folders: the teachers are trained once, shared runs once, and both the
    page and the manifest hold every cell of both calls."""
    import subprocess
    import sys

    common = [sys.executable, "-m", "hetcomp", "reproduce", "--dataset", "csv", "--path", str(workspace / "toy.csv"),
              "--user-col", "u", "--item-col", "i", "--quick", "--device", "cpu", "--table", "2",
              "--students", "mf", "--seeds", "2", "--teachers-dir", str(tmp_path / "teachers"),
              "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"),
              "--cache-dir", str(tmp_path / "cache")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    calls = [subprocess.Popen([*common, "--methods", methods], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env=env) for methods in ("none,rrd", "rrd,rd")]
    outputs = [call.communicate(timeout=600)[0] for call in calls]
    assert [call.returncode for call in calls] == [0, 0], outputs
    out = tmp_path / "results" / "csv-toy-first300"
    rows = read_rows(out / "table2.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == [(m, s) for m in ("none", "rd", "rrd") for s in "01"]
    page = (out / "table2.md").read_text()
    assert all(f"| {label} |" in page for label in ("w/o KD", "RD", "RRD")) and "Not finished" not in page
    manifest = json.loads((out / "manifest.json").read_text())["table2"]
    assert len(manifest["runs"]) == 6 and manifest["grid"]["methods"] == ["none", "rd", "rrd"]
    assert len(list((tmp_path / "runs").rglob("metrics.json"))) == 6  # the shared rrd runs trained once each
    assert len(list((tmp_path / "teachers").rglob("trajectory.npz"))) == 6


def test_quick_table1_reports_three_supervisions(workspace):
    invoke(workspace, "--table", "1")
    with open(workspace / "results" / "csv-toy-first300" / "table1.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["supervision"][:3] for r in rows] == ["(a)", "(b)", "(b)", "(c)", "(c)"]
    assert rows[0]["g"] == "-" and [r["g"] for r in rows[1:]] == ["uniform (released code)",
                                                                  "valid-weighted (ours)"] * 2
    assert rows[1]["teachers"] == "mf,mf-s1,mf-s2,mf-s3,mf-s4"
    for row in rows:
        assert 0.0 <= float(row["D@10"]) <= 1.0 and 0.0 <= float(row["D@50"]) <= 1.0 and float(row["NLL"]) > 0


def test_reproduce_needs_a_table_or_figure():
    result = runner.invoke(app, ["reproduce", "--dataset", "citeulike"])
    assert result.exit_code == 1 and "--table" in result.output and "Traceback" not in result.output


def test_paired_p_value():
    assert paired_p_value([0.3, 0.31, 0.32], [0.2, 0.2, 0.21]) < 0.01
    assert paired_p_value([0.3], [0.2]) != paired_p_value([0.3], [0.2])  # nan with one pair
    assert math.isnan(paired_p_value([0.3, 0.31, 0.32], [0.3, 0.31, 0.32]))  # a row adopted from another's runs
    # the same difference on every seed up to rounding: scipy would give p ≈ 1e-32 (and warn); there is no spread
    assert math.isnan(paired_p_value([0.1 + 0.2, 0.3, 0.4], [0.1, 0.1, 0.2]))
    assert paired_p_value([0.3, 0.3, 0.4], [0.1, 0.1, 0.2 + 1e-6]) < 1e-3  # a real, tiny spread is still tested


def test_seeds_are_a_count_or_a_list():
    from hetcomp.cli.common import _parse_seeds
    from hetcomp.data import HetCompError

    assert _parse_seeds("3") == [0, 1, 2] and _parse_seeds("1,2") == [1, 2] and _parse_seeds("4,") == [4]
    for bad in ("0", "x", "-1,2"):
        with pytest.raises(HetCompError, match="--seeds"):
            _parse_seeds(bad)


def test_a_method_version_bump_retrains_its_rows(monkeypatch):
    from conftest import make_tiny_split

    from hetcomp.distill import method_class
    from hetcomp.paper.common import Reproduction
    from hetcomp.paper.runs import run_spec

    rep = Reproduction("csv", make_tiny_split())
    before = {m: run_spec(rep, [], "mf", m, 0).identity for m in ("rrd", "dcd")}
    monkeypatch.setattr(method_class("rrd"), "version", method_class("rrd").version + 1)
    after = {m: run_spec(rep, [], "mf", m, 0).identity for m in ("rrd", "dcd")}
    assert after["rrd"] != before["rrd"] and after["dcd"] == before["dcd"]


def test_teachers_digest_follows_the_rankings_not_the_timing_metadata():
    def trajectory(seconds: float, first_item: int = 1) -> Trajectory:
        states = torch.tensor([[[first_item, 2], [3, 4]]], dtype=torch.int32)
        return Trajectory(states, np.array([0, 5], dtype=np.int32), np.array([0, 1, 2], dtype=np.int64),
                          {"teacher": "mf", "dim": 8, "train_seed": 0, "train_seconds": seconds})

    retrained = teachers_digest([trajectory(10.0)])
    assert teachers_digest([trajectory(99.0)]) == retrained  # same rankings, another wall time
    assert teachers_digest([trajectory(10.0, first_item=0)]) != retrained  # one item moved


def test_no_train_never_trains_a_teacher_and_top_m_fits_a_small_catalogue(tmp_path):
    rng = np.random.default_rng(1)
    lines = ["u,i"] + [f"{u},{i}" for u in range(60) for i in rng.choice(120, size=12, replace=False)]
    (tmp_path / "small.csv").write_text("\n".join(lines))
    base = ["reproduce", "--dataset", "csv", "--path", str(tmp_path / "small.csv"), "--user-col", "u", "--item-col",
            "i", "--quick", "--device", "cpu", "--table", "2", "--students", "mf", "--methods", "none,rrd",
            "--seeds", "1", "--teachers-dir", str(tmp_path / "teachers"), "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"), "--cache-dir", str(tmp_path / "cache")]
    refused = runner.invoke(app, [*base, "--no-train"])
    assert refused.exit_code == 1 and "not trained" in refused.output and "Traceback" not in refused.output
    assert not (tmp_path / "teachers").exists() or not list((tmp_path / "teachers").rglob("trajectory.npz"))
    too_long = runner.invoke(app, [*base, "--top-m", "500"])
    assert too_long.exit_code == 1 and "--top-m 500" in too_long.output and "120 items" in too_long.output
    done = runner.invoke(app, base)  # the default top-M shrinks to the catalogue
    assert done.exit_code == 0, done.output
    assert len(read_rows(tmp_path / "results" / "csv-small-first300" / "table2.csv")) == 2


def test_table2_page_flags_rows_whose_share_of_the_ensemble_is_far_from_the_papers():
    from types import SimpleNamespace

    from hetcomp.paper.common import LABELS
    from hetcomp.paper.pages import paper_values, table2_markdown

    paper = paper_values("citeulike")
    ensemble = paper[("", "Ensemble")]
    rep = SimpleNamespace(schedule=SimpleNamespace(quick=False), dataset="citeulike", label="citeulike",
                          command="hetcomp reproduce", split=SimpleNamespace(meta={"seed": 0, "dataset": "citeulike"}))
    def row(method, seed, share):  # a run whose R@50 is ``share`` × the paper's own share of its ensemble
        recall = share * paper[("mf", LABELS[method])]["recall@50"] / ensemble["recall@50"] * 0.5
        return {"student": "mf", "method": method, "seed": seed, "recall@10": 0.1, "ndcg@10": 0.1,
                "recall@50": recall, "ndcg@50": 0.1, "epochs": 10, "wall_seconds": 1, "teachers_digest": "d"}
    rows = [row("rrd", s, 1.05) for s in (0, 1)] + [row("dcd", s, 0.85) for s in (0, 1)]
    ours = {"Ensemble": {"recall@10": 0.1, "ndcg@10": 0.1, "recall@50": 0.5, "ndcg@50": 0.1}}
    page = table2_markdown(rep, rows, ours, ["mf"], ["rrd", "dcd"], [0, 1])
    lines = {line.split(" |")[0]: line for line in page.splitlines() if line.startswith(("| RRD |", "| DCD |"))
             and line.count("|") == 5}
    assert "+5.0%" in lines["| RRD"] and "flagged" not in lines["| RRD"]
    assert "-15.0% **flagged**" in lines["| DCD"]
    quick = SimpleNamespace(**{**vars(rep), "schedule": SimpleNamespace(quick=True)})
    assert "share of the ensemble" not in table2_markdown(quick, rows, ours, ["mf"], ["rrd", "dcd"], [0, 1])


def test_table2_page_shows_unsampled_cl_drd_as_the_papers_cl_drd_and_the_sampled_form_as_an_option_row():
    """Table 2's CL-DRD is the form the HetComp paper ran (unsampled, ``cl-drd-full``): printed as "CL-DRD" beside
    the paper's value; the authors'-code sampled form keeps a row of its own, "CL-DRD (sampled)", with no paper
    value beside it (the paper has no such row); both are marked and both count as baselines."""
    from types import SimpleNamespace

    from hetcomp.paper.pages import paper_values, table2_markdown

    paper = paper_values("citeulike")["mf", "CL-DRD"]
    rep = SimpleNamespace(schedule=SimpleNamespace(quick=False), dataset="citeulike", label="citeulike",
                          command="hetcomp reproduce", split=SimpleNamespace(meta={"seed": 0, "dataset": "citeulike"}))
    rows = [{"student": "mf", "method": method, "seed": 0, "recall@10": 0.1, "ndcg@10": 0.1, "recall@50": recall,
             "ndcg@50": 0.1, "epochs": 10, "wall_seconds": 1, "teachers_digest": "d"}
            for method, recall in (("cl-drd", 0.2), ("cl-drd-full", 0.3), ("hetcomp", 0.31))]
    page = table2_markdown(rep, rows, {}, ["mf"], ["cl-drd-full", "hetcomp", "cl-drd"], [0])
    lines = page.splitlines()
    unsampled = next(line for line in lines if line.startswith("| CL-DRD§ |"))
    assert f"0.3000 ({paper['recall@50']:.4f})" in unsampled
    sampled = next(line for line in lines if line.startswith("| CL-DRD (sampled)¶ |"))
    assert "0.2000 |" in sampled and "(" not in sampled.split("|")[4]  # R@50 cell: ours only
    assert lines.index(unsampled) < lines.index(sampled)  # the columns' order: the paper's row first
    assert "+3.3% vs CL-DRD" in page  # the strongest baseline, whichever form it is
    rows[1]["recall@50"] = 0.15
    assert "+55.0% vs CL-DRD (sampled)" in table2_markdown(rep, rows, {}, ["mf"], ["cl-drd-full", "hetcomp", "cl-drd"],
                                                           [0])
    assert "§ CL-DRD is the form the HetComp paper ran" in page and "¶ CL-DRD (sampled) is an option row" in page


def test_table2_page_checks_each_student_on_validation_at_the_best_epoch():
    """Under each student's table: every KD baseline's and DCD's validation R@50 at each run's best epoch (read
    from curves.csv), mean over seeds, against w/o KD and against RRD, with a paired t-test over seeds."""
    from types import SimpleNamespace

    from hetcomp.paper.pages import paired_p_value, table2_markdown, validation_at_best

    rep = SimpleNamespace(schedule=SimpleNamespace(quick=True), dataset="tiny", label="tiny",
                          command="hetcomp reproduce", split=SimpleNamespace(meta={"seed": 0, "dataset": "tiny"}))
    valid = {("none", 0): 0.10, ("none", 1): 0.12, ("rrd", 0): 0.20, ("rrd", 1): 0.22, ("dcd", 0): 0.19,
             ("dcd", 1): 0.225}
    rows, curves = [], []
    for (method, seed), value in valid.items():
        config = f"{method}{seed}"
        rows.append({"student": "mf", "method": method, "seed": seed, "config": config, "best_epoch": 20,
                     "recall@10": 0.1, "ndcg@10": 0.1, "recall@50": 0.3, "ndcg@50": 0.1, "epochs": 30,
                     "wall_seconds": 1, "teachers_digest": "d"})
        curves += [{"config": config, "epoch": epoch, "valid_recall@50": value if epoch == 20 else value / 2}
                   for epoch in (10, 20, 30)]
    validation = validation_at_best(rows, curves)
    assert validation == {f"{m}{s}": v for (m, s), v in valid.items()}
    assert validation_at_best(rows, curves[:1]) == {}  # no evaluation at the best epoch: left out, not guessed
    page = table2_markdown(rep, rows, {}, ["mf"], ["none", "rrd", "dcd"], [0, 1], validation=validation)
    lines = [line for line in page.splitlines() if line.startswith("| DCD |") and "valid" not in line]
    against_rrd = next(line for line in lines if "| RRD |" in line)
    p = paired_p_value([0.19, 0.225], [0.20, 0.22])
    assert f"| DCD | 0.2075 | RRD | 0.2100 | -1.2% | {p:.3g} |" == against_rrd
    assert any("| w/o KD | 0.1100 | +88.6% |" in line for line in lines)
    assert "Validation R@50" not in table2_markdown(rep, rows, {}, ["mf"], ["none", "rrd", "dcd"], [0, 1])
    assert "dcd_weight 0" not in page
    # DCD at its special case (the tuned RRD, no correction) says so under the comparison
    for row in rows:
        if row["method"] == "dcd":
            row["command"] = (f"hetcomp distill --method dcd --seed {row['seed']} -o dcd_weight=0.0 -o k=41 "
                              "-o 'sides=\"both\"'")
    page = table2_markdown(rep, rows, {}, ["mf"], ["none", "rrd", "dcd"], [0, 1], validation=validation)
    assert "DCD runs with dcd_weight 0 (2 of its runs here)" in page


def test_a_row_served_by_its_twin_names_it_and_the_manifest_counts_that_training_once(tmp_path):
    from types import SimpleNamespace

    from hetcomp.paper.common import METRICS
    from hetcomp.paper.manifest import write_manifest
    from hetcomp.paper.runs import table2_row

    rep = SimpleNamespace(label="toy", schedule=SimpleNamespace(quick=False), out_dir=tmp_path, command="hetcomp x")
    result = {"test": dict.fromkeys(METRICS, 0.1), "best_epoch": 4, "epochs": 6, "wall_seconds": 50.0, "curve": []}

    def row(method: str, **extra) -> dict:
        spec = SimpleNamespace(student="mf", method=method, seed=0, identity=f"{method}-id", teachers_digest="t",
                               command=lambda: f"hetcomp distill --method {method}")
        return table2_row(rep, spec, {**result, **extra})[0]

    rrd, dcd = row("rrd"), row("dcd", trained_as={"method": "rrd", "identity": "rrd-id"})
    assert (rrd["trained_as"], dcd["trained_as"]) == ("", "rrd-id") and dcd["wall_seconds"] == 50.0
    manifest = write_manifest(rep, "table2", [rrd, dcd, row("none")], [0], seconds=1.0)
    assert manifest["sum_of_run_wall_seconds"] == 100.0  # rrd and none; dcd's training was rrd's
    assert rrd["cpu_seconds"] == ""  # a run that did not count its CPU time: an empty cell, not 0
    counted = row("kd", cpu_seconds=48.5)
    manifest = write_manifest(rep, "table2", [rrd, dcd, row("none"), counted], [0], seconds=1.0)
    assert manifest["sum_of_run_cpu_seconds"] == {"seconds": 48.5, "runs": 1, "of_runs_trained": 3}


def test_rows_of_other_teachers_are_not_replaced_unless_asked(workspace, tmp_path):
    """Teachers retrained elsewhere rank differently: training the table over rows they did not make is refused
    (naming the rows, the digests and the fixes) until --replace-other-teachers."""
    from hetcomp.paper.ledger import TABLE2_COLUMNS, write_rows

    results = tmp_path / "results"
    args = ("--table", "2", "--students", "mf", "--seeds", "1", "--methods", "none,rd", "--results-dir", str(results),
            "--runs-dir", str(tmp_path / "runs"))  # the last --results-dir / --runs-dir given wins
    invoke(workspace, *args)
    table = results / "csv-toy-first300" / "table2.csv"
    rows = read_rows(table)
    for row in rows:  # as if another machine's teachers had made the RD row (its run folder is not here either)
        if row["method"] == "rd":
            row["teachers_digest"], row["config"] = "0123456789ab", "elsewhere"
    write_rows(table, rows, TABLE2_COLUMNS)
    shutil.rmtree(tmp_path / "runs")
    refused = runner.invoke(app, ["reproduce", "--dataset", "csv", "--path", str(workspace / "toy.csv"),
                                  "--user-col", "u", "--item-col", "i", "--quick", "--device", "cpu",
                                  "--teachers-dir", str(workspace / "teachers"), "--cache-dir",
                                  str(workspace / "cache"), *args])
    assert refused.exit_code != 0 and "Traceback" not in refused.output
    assert "1 row(s) of these cells made with teachers 0123456789ab" in refused.output
    assert "--replace-other-teachers" in refused.output and read_rows(table) == rows
    invoke(workspace, *args, "--replace-other-teachers")
    assert {r["method"]: r["teachers_digest"] for r in read_rows(table)}["rd"] not in ("0123456789ab", "")


def test_a_dcd_row_at_zero_correction_comes_from_its_rrd_row_when_the_folders_are_gone(workspace, tmp_path,
                                                                                        monkeypatch):
    """A fresh machine keeps the committed ledger, not the run folders: DCD at dcd_weight 0 trains exactly as its
    RRD, so the RRD row serves it (its own identity and command, trained_as naming RRD), nothing is trained."""
    import dataclasses

    from hetcomp.data import load_dataset
    from hetcomp.paper import table2 as table2_module
    from hetcomp.paper.common import QUICK_USERS, Reproduction, Schedule

    split = load_dataset("csv", path=str(workspace / "toy.csv"), user_col="u", item_col="i", sep=",",
                         cache_dir=workspace / "cache", max_users=QUICK_USERS)
    quick = Schedule.short()
    schedule = dataclasses.replace(quick, method_options={**quick.method_options, "rrd": {"weight": 0.3, "k": 12},
                                                          "dcd": {"rrd_weight": 0.3, "k": 12, "dcd_weight": 0.0}})
    rep = Reproduction("csv", split, workspace / "teachers", tmp_path / "runs", tmp_path / "results",
                       schedule=schedule, command="hetcomp reproduce (test)", say=lambda text: None)
    table2_module.table2(rep, ["mf"], [0], ["rrd"])
    shutil.rmtree(tmp_path / "runs")
    monkeypatch.setattr(table2_module, "train_missing",
                        lambda rep, trajectories, todo, record: pytest.fail("nothing to train") if todo else None)
    result = table2_module.table2(rep, ["mf"], [0], ["rrd", "dcd"])
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["dcd"]["trained_as"] == rows["rrd"]["config"] != rows["dcd"]["config"]
    assert all(rows["dcd"][k] == rows["rrd"][k] for k in ("recall@50", "ndcg@50", "epochs", "wall_seconds"))
    curves = read_rows(rep.out_dir / "curves.csv")
    assert ([c["valid_recall@50"] for c in curves if c["method"] == "dcd"]
            == [c["valid_recall@50"] for c in curves if c["method"] == "rrd"] != [])
    assert result["manifest"]["sum_of_run_wall_seconds"] == float(rows["rrd"]["wall_seconds"])

    # trained together (both missing), the DCD cell waits for its twin rather than training beside it
    from hetcomp.paper.runs import run_spec, twins_after

    specs = [run_spec(rep, [], "mf", method, 1) for method in ("dcd", "rrd", "none")]
    first, later = twins_after(specs)
    assert [s.method for s in first] == ["rrd", "none"] and [s.method for s in later] == ["dcd"]


def test_stack_seeds_trains_a_rows_seeds_as_one_model_and_records_each(workspace, tmp_path):
    """Every method's row through the CLI: each method that stacks at its settings (all but KD's default menu,
    which has no listwise term) trains its seeds as one model; each seed writes its own row and run."""
    methods = ("cl-drd", "dcd", "hetcomp", "kd", "mtd", "none", "rd", "rrd")
    result = invoke(workspace, "--table", "2", "--students", "mf", "--seeds", "2,3", "--methods", ",".join(methods),
                    "--stack-seeds", "--runs-dir", str(tmp_path / "runs"), "--results-dir", str(tmp_path / "results"))
    assert result.output.count("as one stacked model") == len(methods) - 1
    rows = read_rows(tmp_path / "results" / "csv-toy-first300" / "table2.csv")
    assert sorted((r["method"], r["seed"]) for r in rows) == [(m, s) for m in methods for s in ("2", "3")]
    runs = [json.loads(path.read_text()) for path in (tmp_path / "runs").rglob("metrics.json")]
    assert sorted((run["method"], run["seed"], tuple(run.get("stacked_with", ()))) for run in runs) == [
        (m, seed, () if m == "kd" else (2, 3)) for m in methods for seed in (2, 3)]


def test_table2_refuses_cells_without_a_study_beside_studied_ones_unless_allowed(workspace, tmp_path):
    """A tuned table must not get a row at the built-in settings silently, whether the studied cells are in the
    same call or on the page already: refused, naming the study to run; with --allow-untuned it trains and the
    page marks the row."""
    tuning = tmp_path / "tuning"
    (tuning / "csv-toy-first300").mkdir(parents=True)
    (tuning / "csv-toy-first300" / "mf-none-6.json").write_text(json.dumps({"settings": {"lr": 0.01,
                                                                                          "weight_decay": 0.0}}))
    common = ("--table", "2", "--students", "mf", "--seeds", "1", "--results-dir", str(tmp_path / "results"),
              "--runs-dir", str(tmp_path / "runs"), "--tuning-dir", str(tuning))

    def refused(methods: str) -> str:
        result = runner.invoke(app, ["reproduce", "--dataset", "csv", "--path", str(workspace / "toy.csv"),
                                     "--user-col", "u", "--item-col", "i", "--quick", "--device", "cpu",
                                     "--teachers-dir", str(workspace / "teachers"), "--cache-dir",
                                     str(workspace / "cache"), *common, "--methods", methods])
        said = " ".join(result.output.split())
        assert result.exit_code == 1 and "Traceback" not in said, said
        return said

    said = refused("none,rrd")
    assert "1 cell(s) of this table have no tuning study (mf rrd)" in said
    assert "hetcomp tune --dataset" in said and "--method rrd --tuning-dir" in said and "--allow-untuned" in said
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("metrics.json"))
    invoke(workspace, *common, "--methods", "none")  # studied: trains
    assert "(mf rrd)" in refused("rrd")  # alone in its call, but beside the page's studied w/o KD row
    invoke(workspace, *common, "--methods", "rrd", "--allow-untuned")
    page = (tmp_path / "results" / "csv-toy-first300" / "table2.md").read_text()
    assert "| RRD (built-in settings) |" in page and "Rows marked (built-in settings)" in page
    assert page.count("(built-in settings) |") == 1  # w/o KD's row was tuned


def _hold(lock, release):
    """Another process holding ``lock`` (as a run being trained there) until ``release`` exists (20 s at most)."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; from hetcomp.locks import exclusive_lock\n"
         f"with exclusive_lock(Path({str(lock)!r})):\n print('held', flush=True)\n"
         f" end = time.time() + 20\n while not Path({str(release)!r}).exists() and time.time() < end:"
         " time.sleep(0.05)"],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_run_another_process_trains_waits_until_the_free_runs_are_done(workspace, tmp_path):
    """Two reproduce calls side by side share a table's runs: a run whose folder another process holds is taken
    last (then reused or trained), instead of both calls taking turns on the same run."""
    from hetcomp.data import load_dataset
    from hetcomp.paper import table2 as table2_module
    from hetcomp.paper.common import QUICK_USERS, Reproduction, Schedule
    from hetcomp.paper.runs import run_spec
    from hetcomp.runs import RunStore

    split = load_dataset("csv", path=str(workspace / "toy.csv"), user_col="u", item_col="i", sep=",",
                         cache_dir=workspace / "cache", max_users=QUICK_USERS)
    said, release = [], tmp_path / "release"

    def say(line: str) -> None:  # the holder lets go once this call has finished a run
        said.append(line)
        if "done (" in line:
            release.touch()

    rep = Reproduction("csv", split, workspace / "teachers", tmp_path / "runs", tmp_path / "results",
                       schedule=Schedule.short(), command="hetcomp reproduce (test)", say=say)
    first = RunStore(rep.runs_dir).folder(run_spec(rep, [], "mf", "none", 0))
    first.mkdir(parents=True)
    holder = _hold(first / ".lock", release)
    assert RunStore(rep.runs_dir).busy(run_spec(rep, [], "mf", "none", 0))
    result = table2_module.table2(rep, ["mf"], [0, 1], ["none"])
    holder.wait(timeout=60)
    assert any(first.name in line and "another process" in line for line in said), "\n".join(said)
    assert sorted(int(r["seed"]) for r in result["rows"]) == [0, 1]
    metrics = {seed: RunStore(rep.runs_dir).folder(run_spec(rep, [], "mf", "none", seed)) / "metrics.json"
               for seed in (0, 1)}
    assert metrics[1].stat().st_mtime < metrics[0].stat().st_mtime  # the free run first

    # with leave_busy a call ends once the free runs are done, leaving the held one to its process
    import dataclasses
    release.unlink()
    second = RunStore(rep.runs_dir).folder(run_spec(rep, [], "mf", "none", 2))
    second.mkdir(parents=True)
    holder = _hold(second / ".lock", release)
    said.clear()
    result = table2_module.table2(dataclasses.replace(rep, leave_busy=True), ["mf"], [2, 3], ["none"])
    assert sorted(int(r["seed"]) for r in result["rows"]) == [0, 1, 3]  # the page: every call's cells so far
    assert any("1 run(s) left to the process(es) training them now" in line for line in said), "\n".join(said)
    assert not (second / "metrics.json").exists() and "Not finished yet" in (rep.out_dir / "table2.md").read_text()
    release.touch()
    holder.wait(timeout=60)
    assert not RunStore(rep.runs_dir).busy(run_spec(rep, [], "mf", "none", 0))


def test_a_pages_students_keep_the_tables_order_whatever_order_the_calls_named_them_in(tmp_path):
    """A call for one student (e.g. a lane's `--students mf`) merges the students earlier calls on the same teachers
    asked for: the page lists them MF, ML, DNN, not the call's student first and the rest alphabetically."""
    from types import SimpleNamespace

    from hetcomp.paper import table2

    grid = {"teachers_digest": "d", "students": ["dnn", "ml"], "methods": ["none"], "seeds": [0]}
    (tmp_path / "manifest.json").write_text(json.dumps({"table2": {"grid": grid}}))
    rep = SimpleNamespace(out_dir=tmp_path)
    assert table2._merged_grid(rep, "d", ["mf"], ["none"], [0])["students"] == ["mf", "ml", "dnn"]
    assert table2._merged_grid(rep, "other", ["dnn", "mf"], ["none"], [0])["students"] == ["mf", "dnn"]


def test_reproduce_trains_each_teacher_with_the_thread_count_of_the_committed_one(tmp_path, monkeypatch):
    from conftest import make_tiny_split

    from hetcomp.paper.common import Reproduction, Schedule
    from hetcomp.paper.teachers import ensure_teachers

    monkeypatch.chdir(tmp_path)  # the committed teachers page is read where experiments/runs are, the working dir
    page = tmp_path / "experiments" / "results" / "teachers-tiny.md"
    page.parent.mkdir(parents=True)
    page.write_text("| teacher | threads | digest |\n|---|---|---|\n| mf | 1 | 000000000000 |\n")
    said: list[str] = []
    schedule = Schedule(teacher_dim=8, teacher_overrides={"max_epochs": 8, "eval_every": 1})
    rep = Reproduction("tiny", make_tiny_split(n_items=120), teachers_dir=tmp_path / "teachers", schedule=schedule,
                       say=said.append, teacher_top_m=50)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        (mf,) = ensure_teachers(rep, names=["mf"])
        (ml,) = ensure_teachers(rep, names=["ml"])  # not on the page: torch's own count
        assert torch.get_num_threads() == 2  # restored after training
    finally:
        torch.set_num_threads(before)
    assert mf.meta["threads"] == 1 and ml.meta["threads"] == 2
    assert "training teacher mf with 1 thread(s), as the committed one was" in said[0]
    assert "warning: teacher mf's rankings differ from the committed one's" in said[1]
    assert "training teacher ml" in said and not any("ml with" in line or "teacher ml's" in line for line in said)


def test_teachers_trained_side_by_side_with_jobs_are_the_ones_trained_one_by_one(workspace, tmp_path):
    from hetcomp.paper.common import Reproduction, Schedule
    from hetcomp.paper.teachers import ensure_teachers, torch_threads
    from hetcomp.runs.grid import Inputs, task_threads
    from hetcomp.runs.spec import trajectory_digest

    source = (("item_col", "i"), ("path", str(workspace / "toy.csv")), ("sep", ","), ("user_col", "u"))
    inputs = Inputs("csv", None, str(tmp_path / "cache"), str(tmp_path / "unused"), 0, None, source, "cpu")
    split, _ = inputs.load([])
    names = ["mf", "gnn", "iae"]
    said: list[str] = []
    seen: dict[str, list] = {}

    class Bar:  # what a progress bar is told: the worker processes' trainer events, relayed here
        def __init__(self, label: str, total: int) -> None:
            self.events = seen.setdefault(label, [])

        def on_fit_start(self, trainer) -> None:
            self.events.append(("start", trainer.config.max_epochs))

        def on_epoch_end(self, trainer, epoch: int, loss: float) -> None:
            self.events.append(("epoch", epoch))

        def on_evaluate(self, trainer, epoch: int, result: dict, improved: bool) -> None:
            self.events.append(("evaluate", epoch, result["valid"][trainer.config.monitor], improved))

        def on_fit_end(self, trainer) -> None:
            self.events.append(("end", trainer.state.epoch, trainer.state.best_epoch))

    side = Reproduction("csv", split, teachers_dir=tmp_path / "side", schedule=Schedule.short(), inputs=inputs,
                        jobs=2, say=said.append, teacher_top_m=50, progress=Bar)
    by_side = {t.name: (trajectory_digest(t), t.meta["threads"], t.meta) for t in ensure_teachers(side, names)}
    assert said[0].startswith("2 teachers at a time") and sum("trained (" in line for line in said) == 3
    for name, (_, _, meta) in by_side.items():
        events = seen[f"teacher {name}"]
        epochs = [event[1] for event in events if event[0] == "epoch"]
        assert events[0][0] == "start" and epochs == list(range(1, len(epochs) + 1)) and events[-1][0] == "end"
        evaluated = [event for event in events if event[0] == "evaluate"]
        at = {event[1]: event[2] for event in evaluated}  # the states' validation results among them
        assert [at[epoch] for epoch in meta["state_epochs"]] == [m["valid"]["recall@50"] for m in meta["metrics"]]
        assert events[-1][2] == max(evaluated, key=lambda event: event[2])[1]  # the best epoch
    by_side = {name: value[:2] for name, value in by_side.items()}
    one = Reproduction("csv", split, teachers_dir=tmp_path / "one", schedule=Schedule.short(), teacher_top_m=50)
    with torch_threads(task_threads(2, None, 1)):  # the threads each side-by-side worker had
        by_one = {t.name: (trajectory_digest(t), t.meta["threads"]) for t in ensure_teachers(one, names)}
    assert by_side == by_one
