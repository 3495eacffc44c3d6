"""The unsampled CL-DRD's work (`fair-comparison.sh` cases `foursquare-cl-drd-full` and `citeulike-cl-drd-full`)
as one worker per core that always takes the next useful step, so both cores stay busy across the two datasets.

Start it once per core, from the repository root of a checkout nobody edits meanwhile (a worktree), ~10 s apart:

    HETCOMP_DATA=../shared/data/raw nohup python experiments/plans/lanes.py > lane-a.log 2>&1 &
    HETCOMP_DATA=../shared/data/raw nohup python experiments/plans/lanes.py > lane-b.log 2>&1 &

Each pass takes the first step below that is not done, not already run to its end by this worker, and whose
prerequisites have ended: a teachers step that another worker runs is skipped (the other takes the next one); a
study or a table's rows are shared (two workers on one SQLite study; two `reproduce` calls on one ledger, each
taking a run the other does not train). A study of ML or DNN starts only when MF's summary exists and no worker
still runs an MF trial, so its start point is MF's final choice. The MF student's rows come as soon as its study
is done (the row the comparison hinges on: CL-DRD against w/o KD), the rest when all three studies of their
dataset are summarised. With nothing to take, the
worker waits a minute; it exits when every step is done. `python experiments/plans/lanes.py --plan` lists the
steps, their state and their commands; `--datasets citeulike` keeps one dataset's steps (e.g. work that fits
the time a machine has left), and `--datasets citeulike,foursquare` takes CiteULike's steps first and then joins
Foursquare's, so a worker whose dataset is finished does not leave its core idle.

Every step resumes where it stopped (finished teachers are skipped, studies go on from their committed trials
records, finished runs are reused), so after a machine is lost the same two commands go on: they first retrain
the teachers exactly as the committed studies' were (digests in `experiments/results/teachers-<dataset>.md`;
`hetcomp tune` refuses trials made with other teachers). On an AVX-512 CPU, Foursquare's steps hold torch's
kernels at AVX2, which gives the table's Foursquare teachers (2cd1686186e0); CiteULike's run natively. On an
Intel CPU every step runs with MKL dispatching as on the AMD machines that made the committed teachers
(:mod:`hetcomp.mkl_as_amd`: it needs a C compiler once; all twelve committed teachers reproduce with it). The
teachers are trained with `--require-committed`: a teacher whose digest is not the committed one stops its worker
at once (the studies could not use it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetcomp import mkl_as_amd
from hetcomp.experiments import committed_teacher_digests
from hetcomp.paper.ledger import read_rows
from hetcomp.provenance import cpu_vendor_and_model
from hetcomp.runs.spec import trajectory_digest
from hetcomp.runs.tuned import summary_path, trial_run_seconds
from hetcomp.teachers import TEACHERS, trajectory_file
from hetcomp.trajectory import load_trajectory

#: Table 2's methods in its column order (CL-DRD is cl-drd-full), then the option row CL-DRD (sampled)
METHODS = "none,rd,rrd,mtd,cl-drd-full,dcd,kd,hetcomp,cl-drd"
SEEDS = {"foursquare": 3, "citeulike": 5}
BUDGET = {"mf": 16, "ml": 8, "dnn": 8}
#: where the rows steps write the tables (each dataset's ledger in its folder)
RESULTS_DIR = Path("experiments/results/tuned")


@dataclass
class Step:
    name: str
    dataset: str
    commands: list[list[str]]
    #: whether a step another worker runs is left to it (teachers) or joined (studies, rows)
    exclusive: bool = False
    #: steps that must be done, and run by no worker, before this one starts
    after: list[str] = field(default_factory=list)


@functools.cache
def _digest(path: Path, modified_ns: int) -> str:
    return trajectory_digest(load_trajectory(path))[:12]


def teachers_trained(dataset: str) -> bool:
    """Every teacher trained, with the digest the committed teachers page lists (another one is not done: its
    step's `train-teachers --require-committed` then stops the worker, naming it)."""
    _, committed = committed_teacher_digests(dataset)
    for name in TEACHERS:
        path = trajectory_file(Path("teachers"), dataset, name)
        if not path.exists():
            return False
        if name in committed and _digest(path, path.stat().st_mtime_ns) != committed[name][0]:
            return False
    return True


def rows_command(dataset: str, students: str) -> list[str]:
    """Table 2's rows of ``students``: two workers' calls side by side share them (each takes a free run, and
    leaves the last ones the other trains to it, going on to the next step)."""
    return ["hetcomp", "reproduce", "--dataset", dataset, "--table", "2", "--students", students, "--seeds",
            str(SEEDS[dataset]), "--methods", METHODS, "--results-dir", str(RESULTS_DIR), "--leave-busy"]


def steps() -> list[Step]:
    plan = [Step("teachers foursquare", "foursquare",
                 [["hetcomp", "train-teachers", "--dataset", "foursquare", "--threads", "1", "--require-committed"]],
                 exclusive=True),
            Step("teachers citeulike", "citeulike",
                 [["hetcomp", "train-teachers", "--dataset", "citeulike", "--teachers", "mf,ml,dnn,gnn,ae",
                   "--threads", "1", "--require-committed"],
                  ["hetcomp", "train-teachers", "--dataset", "citeulike", "--teachers", "iae", "--threads", "2",
                   "--require-committed"]],
                 exclusive=True)]
    for dataset in ("foursquare", "citeulike"):
        for student in ("mf", "ml", "dnn"):
            plan.append(Step(f"study {dataset} {student}", dataset,
                             [["hetcomp", "tune", "--dataset", dataset, "--student", student, "--method",
                               "cl-drd-full", "--trials", str(BUDGET[student]), "--threads", "1"]],
                             after=[f"teachers {dataset}"] + ([] if student == "mf" else [f"study {dataset} mf"])))
            if student == "mf":  # MF's rows as soon as its study is done: the row the comparison hinges on
                plan.append(Step(f"rows {dataset} mf", dataset, [rows_command(dataset, "mf")],
                                 after=[f"teachers {dataset}", f"study {dataset} mf"]))
        plan.append(Step(f"rows {dataset}", dataset, [rows_command(dataset, "mf,ml,dnn")],
                         after=[f"teachers {dataset}"] + [f"study {dataset} {student}" for student in BUDGET]))
    return plan


def done(step: Step) -> bool:
    """Teachers and studies say so on disk. A dataset's early MF rows step is done once the ledger holds its
    unsampled CL-DRD MF rows (so that a restarted worker does not rewrite the dataset's page with that step's
    narrower command); the whole table's rows step is never taken as done (its `reproduce` returns at once when
    nothing is missing, and retrains rows that a method's version bump made stale, MF's included)."""
    kind, dataset, *student = step.name.split()
    if kind == "teachers":
        return teachers_trained(dataset)
    if kind == "study":
        return summary_path(dataset, student[0], "cl-drd-full", 6).exists()
    if student == ["mf"]:
        return len(_unsampled_rows(dataset, ["mf"])) >= SEEDS[dataset]
    return False


def _unsampled_rows(dataset: str, students: list[str]) -> list[dict]:
    """The ledger's unsampled CL-DRD rows of ``students``."""
    return [row for row in read_rows(RESULTS_DIR / dataset / "table2.csv")
            if row["method"] == "cl-drd-full" and row["student"] in students]


def _finished_trials(dataset: str, student: str) -> list[dict]:
    """The study's finished (complete or pruned) trials, from its committed trials record (none yet: [])."""
    record = summary_path(dataset, student, "cl-drd-full", 6).with_suffix(".trials.json")
    try:
        trials = json.loads(record.read_text())["trials"]
    except (OSError, ValueError, KeyError):
        return []
    return [t for t in trials if t["state"] in ("complete", "pruned")]


def _mean_seconds(trials: list[dict]) -> float | None:
    costs = [t["user_attrs"]["seconds"] for t in trials if t.get("user_attrs", {}).get("seconds")]
    return sum(costs) / len(costs) if costs else None


def hours_left(step: Step) -> str:
    """A rough figure for ``--plan``: one core's hours the step still needs, from what was recorded on whatever
    machines ran the finished work (a study: its trials left times its finished trials' mean cost, or its dataset's
    MF study's; rows, per student: its unsampled CL-DRD runs not in the ledger times its finished runs' mean wall
    time, or else its study's chosen trial's cost (a run at the settings the rows use), or else the MF rows'; a
    dataset's rows step counts its MF runs too). Where nothing is recorded yet: "?"."""
    kind, dataset, *student = step.name.split()
    if kind == "teachers":
        return "-"
    if kind == "study":
        finished = _finished_trials(dataset, student[0])
        per_trial = _mean_seconds(finished) or _mean_seconds(_finished_trials(dataset, "mf"))
        left = max(BUDGET[student[0]] - len(finished), 0)
        return "0" if left == 0 else "?" if per_trial is None else f"{left * per_trial / 3600:.1f}"
    seconds = 0.0
    for name in student[0].split(",") if student else list(BUDGET):
        rows = _unsampled_rows(dataset, [name])
        left = max(SEEDS[dataset] - len(rows), 0)
        if left == 0:
            continue
        per_run = (_mean_wall(rows) or _chosen_trial_seconds(dataset, name)
                   or _mean_wall(_unsampled_rows(dataset, ["mf"])))
        if per_run is None:
            return "?"
        seconds += left * per_run
    return "0" if seconds == 0 else f"{seconds / 3600:.1f}"


def _mean_wall(rows: list[dict]) -> float | None:
    costs = [float(r["wall_seconds"]) for r in rows if r.get("wall_seconds")]
    return sum(costs) / len(costs) if costs else None


def _chosen_trial_seconds(dataset: str, student: str) -> float | None:
    """The cost of the run of the trial the unsampled CL-DRD study chose (its summary's ``best_trial``), where the
    study is at its budget (:func:`~hetcomp.runs.tuned.trial_run_seconds`: every attempt of the run, not only the
    trial's own when it resumed a killed one)."""
    path = summary_path(dataset, student, "cl-drd-full", 6)
    try:
        summary = json.loads(path.read_text())
        best = summary["best_trial"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return trial_run_seconds(path, best, summary)


def running(step: Step) -> bool:
    """Whether some process runs one of the step's commands (this worker's own are finished when asked)."""
    for command in step.commands:
        cut = next((at for at, word in enumerate(command) if word in ("--trials", "--threads", "--teachers")),
                   len(command))
        pattern = " ".join(command[1:cut])
        if subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
            return True
    return False


def intel_cpu() -> bool:
    return cpu_vendor_and_model()[0] == "GenuineIntel"


def environment(step: Step, threads: int) -> dict:
    """The studies' and rows' teachers came from AMD machines: on an Intel CPU, MKL dispatches as on AMD
    (:mod:`hetcomp.mkl_as_amd`; without it NeuMF, LightGCN and the autoencoders get other digests)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    if step.dataset == "foursquare" and torch.backends.cpu.get_cpu_capability() == "AVX512":
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    return mkl_as_amd.environment(env) if intel_cpu() else env


def next_step(plan: list[Step], finished: set[str]) -> Step | None:
    by_name = {step.name: step for step in plan}
    for step in plan:
        if step.name in finished or done(step):
            continue
        if any(not done(by_name[name]) or running(by_name[name]) for name in step.after):
            continue
        if step.exclusive and running(step):
            continue
        return step
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description="One worker of the unsampled CL-DRD's steps (start one per core).")
    parser.add_argument("--plan", action="store_true",
                        help="list the steps, their state, a rough figure of one core's hours left (from the "
                             "recorded costs of finished trials and rows) and their commands; run nothing")
    parser.add_argument("--datasets", default="foursquare,citeulike",
                        help="only these datasets' steps, in this order of preference (e.g. citeulike: work that "
                             "fits the time a machine has left, as a row of Foursquare's MF student is 1.3-2.6 h of "
                             "one core; citeulike,foursquare: CiteULike's steps first, then joining Foursquare's)")
    args = parser.parse_args()
    chosen = args.datasets.split(",")
    if unknown := sorted(set(chosen) - set(SEEDS)):
        parser.error(f"unknown dataset(s) {', '.join(unknown)}: choose among {', '.join(SEEDS)}")
    plan = sorted((step for step in steps() if step.dataset in chosen), key=lambda step: chosen.index(step.dataset))
    if args.plan:
        for step in plan:
            state = "done" if done(step) else "running" if running(step) else "to do"
            print(f"{step.name:24} {state:8} {hours_left(step):>5} h  "
                  f"{' && '.join(' '.join(command) for command in step.commands)}")
        return 0
    if not os.environ.get("HETCOMP_DATA"):
        print("lanes.py: set HETCOMP_DATA to the data directory (e.g. ../shared/data/raw)", file=sys.stderr)
        return 2
    finished: set[str] = set()
    while True:
        step = next_step(plan, finished)
        if step is None:
            if all(step.name in finished or done(step) for step in plan):
                print("lanes.py: every step is done", flush=True)
                return 0
            time.sleep(60)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {step.name}", flush=True)
        for command in step.commands:
            threads = int(command[command.index("--threads") + 1]) if "--threads" in command else 1
            code = subprocess.run(command, env=environment(step, threads)).returncode
            if code != 0:
                print(f"lanes.py: `{' '.join(command)}` exited {code}; stopping this worker", file=sys.stderr)
                return code
        finished.add(step.name)


if __name__ == "__main__":
    sys.exit(main())
