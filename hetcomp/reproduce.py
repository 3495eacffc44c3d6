"""`hetcomp reproduce`: the paper's tables and figures regenerated from real data.

Every table is built from runs: teachers (``train_teacher``) and students (``distill``), each reused when it is
already finished, so an interrupted reproduce resumes. The CSV files under ``experiments/results/<dataset>/``
are the source of truth: one row per run, with the command that reruns it, its seed and the identity of its
configuration (a hash of the dataset split, the teachers' settings and the run's settings). A row whose
configuration hash matches is reused even when its run folder is gone (run folders are not committed), so a
long table accumulates over several sessions; each row also records the digest of the teachers' rankings it
was trained from, and the Markdown table says when rows came from differently-trained (but identically
configured) teachers.

``--quick`` runs the same pipeline on the first users of the dataset with short schedules (a few minutes);
its numbers only show that the pipeline works.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import os
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetcomp.bench import timed
from hetcomp.data import HetCompError, Split
from hetcomp.distill import EnsembleConfig, method_class
from hetcomp.distill.base import DistillContext
from hetcomp.distill.knowledge import discrepancy
from hetcomp.distill.losses import fine_loss, tail_logsumexp
from hetcomp.distill.run import default_recipe, distill
from hetcomp.metrics import csr_rows_dense, evaluate_split, exclude_rows_, topk_items
from hetcomp.models import build_model
from hetcomp.provenance import git_commit, machine
from hetcomp.teachers import (
    TEACHERS,
    dataset_teacher_settings,
    load_teachers,
    parse_seeded_name,
    seeded_name,
    shares_state_epochs,
    teacher_dir,
    train_teacher,
    trajectory_file,
)
from hetcomp.train import Callback

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
HEADERS = ("R@10", "N@10", "R@50", "N@50")
#: Table 2's rows in the paper's order, with the paper's labels
TABLE2_METHODS = {"none": "w/o KD", "rd": "RD", "rrd": "RRD", "mtd": "MTD", "cl-drd": "CL-DRD", "dcd": "DCD",
                  "hetcomp": "HetComp"}
#: every method's label in tables (kd is ours, not a paper row)
LABELS = {**TABLE2_METHODS, "kd": "KD (loss menu)"}
BASELINES = ("rd", "rrd", "mtd", "cl-drd", "dcd", "kd")
CURVE_METHODS = ("none", "dcd", "hetcomp")
#: the users ``--quick`` keeps (the first ones of the file)
QUICK_USERS = 300
#: Table 1: the MF teachers of different training seeds that form supervision (b)
MF_SEEDS = (0, 1, 2, 3, 4)
TABLE1_METHOD = "rrd"


@dataclass
class Schedule:
    """Training lengths: the paper's (default) or ``--quick``'s short ones."""

    teacher_dim: int = 64
    teacher_overrides: dict = field(default_factory=dict)
    max_epochs: int = 1000
    eval_every: int = 10
    method_options: dict = field(default_factory=dict)  # per method, e.g. HetComp's DKC period for --quick
    quick: bool = False

    def options(self, method: str) -> dict:
        """The method options this schedule sets (a fresh dict: callers may extend it)."""
        return dict(self.method_options.get(method, {}))

    @classmethod
    def short(cls) -> Schedule:
        """``--quick``: dim-16 teachers and 20-epoch runs, evaluated every 5 epochs."""
        return cls(teacher_dim=16, teacher_overrides={"max_epochs": 20, "eval_every": 5}, max_epochs=20,
                   eval_every=5, method_options={"hetcomp": {"period": 5, "deadline": 10}}, quick=True)


@dataclass
class Reproduction:
    """One dataset's inputs and where everything goes."""

    dataset: str
    split: Split
    teachers_dir: Path = Path("teachers")
    runs_dir: Path = Path("experiments/runs")
    results_dir: Path = Path("experiments/results")
    device: torch.device = torch.device("cpu")
    schedule: Schedule = field(default_factory=Schedule)
    command: str = ""
    train: bool = True  # False: tables from finished runs only; what is missing is listed, not trained
    progress: Callable[[str, int], Callback | None] = lambda label, total: None
    say: Callable[[str], None] = print
    #: the command line of a child ``hetcomp reproduce`` that trains one (student, method, seed) run; ``--jobs``
    #: runs several of them side by side
    child_command: Callable[[str, str, int], list[str]] | None = None

    @property
    def label(self) -> str:
        return self.split.meta["dataset"].replace(":", "-")

    @property
    def out_dir(self) -> Path:
        return self.results_dir / self.label


# ---- teachers -----------------------------------------------------------------------------------------------

def ensure_teachers(rep: Reproduction, names: Sequence[str] = TEACHERS, seed: int = 0) -> list:
    """Train (or reuse) the teachers ``names`` (``<model>`` or ``<model>-s<seed>``) and load them."""
    for name in names:
        model, train_seed = parse_seeded_name(name, seed)
        if trajectory_file(rep.teachers_dir, rep.split.meta["dataset"], name).is_file():
            continue
        rep.say(f"training teacher {name}")
        overrides = {**({} if rep.schedule.quick else dataset_teacher_settings(rep.dataset)),
                     **rep.schedule.teacher_overrides}
        callback = rep.progress(f"teacher {name}", overrides.get("max_epochs", 300))
        train_teacher(rep.split, model, rep.teachers_dir, dim=rep.schedule.teacher_dim, seed=train_seed,
                      device=rep.device, callbacks=[callback] if callback else None, name=name,
                      command=f"hetcomp train-teachers --dataset {rep.dataset} --teachers {model}"
                              + (f" --train-seed {train_seed}" if train_seed != seed else ""),
                      **overrides)
    trajectories = load_teachers(rep.split, rep.teachers_dir, list(names))
    for trajectory in trajectories:
        if shares_state_epochs(trajectory):
            rep.say(f"warning: {trajectory.name}'s states share epochs {trajectory.meta['state_epochs']}; retrain "
                    "it with a smaller --eval-every (hetcomp train-teachers) so that E1..E4 differ")
    return trajectories


def teachers_digest(trajectories: Sequence) -> str:
    """sha256 (first 12 hex digits) over the teachers' identities and rankings: which exact teachers a run learnt
    from. The arrays, not the files: two trainings with the same rankings get one digest, although their files
    differ in timing metadata."""
    digest = hashlib.sha256(json.dumps(teacher_identity(trajectories), sort_keys=True, default=str).encode())
    for trajectory in trajectories:
        for array in (trajectory.states.numpy(), trajectory.observed, trajectory.observed_indptr):
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:12]


def teacher_identity(trajectories: list) -> list[dict]:
    """What identifies a teacher's training, independent of floating-point noise: name, model, dim, seed, settings."""
    return [{"name": t.name, "teacher": t.teacher, "dim": t.meta.get("dim"), "train_seed": t.meta.get("train_seed"),
             "config": t.meta.get("config")} for t in trajectories]


# ---- student runs -------------------------------------------------------------------------------------------

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
    with _locked(rep.out_dir):
        rows = read_rows(table_file)
        present = {_row_key(r) for r in rows}
        adopted = {key: config for key, config in renamed.items()
                   if key in present and (*key[:3], config) not in present}
        if not adopted:
            return 0
        for row in rows:
            row["config"] = adopted.get(_row_key(row), row["config"])
        write_rows(table_file, rows, TABLE2_COLUMNS)
        curves = read_rows(curves_file)
        for point in curves:
            point["config"] = adopted.get(_row_key(point), point["config"])
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
                       callbacks=[callback] if callback else None, command=command, train=rep.train)
    finally:
        if callback is not None and hasattr(callback, "close"):
            callback.close()


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_rows(path: Path, rows: list[dict], columns: Sequence[str]) -> None:
    """Write a CSV atomically (a killed reproduce never leaves half a table)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def _row_key(row: dict) -> tuple[str, str, str, str]:
    return row["student"], row["method"], row["seed"], row["config"]


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on a results folder, so that reproduce calls running side by side (e.g. one per group of
    methods, one per core) merge their rows instead of overwriting each other's."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


TABLE2_COLUMNS = ("dataset", "student", "method", "seed", *METRICS, "best_epoch", "epochs", "wall_seconds", "command",
                  "config", "teachers_digest", "commit", "code_digest", "machine")
#: hand-written reading of a dataset's Table 2 (exceptions explained), appended to every regenerated table2.md
TABLE2_NOTES = "table2-notes.md"
CURVE_COLUMNS = ("dataset", "student", "method", "seed", "config", "epoch", "valid_recall@50", "test_recall@50")


def table2(rep: Reproduction, students: Sequence[str], seeds: Sequence[int], methods: Sequence[str] | None = None,
           dim: int = 6, jobs: int = 1, write_page: bool = True) -> dict:
    """Run (or reuse) every teacher and student of Table 2 and write table2.csv / curves.csv / table2.md.

    With ``jobs`` > 1 the missing student runs are trained by that many child processes at once (teachers first,
    in this process). ``write_page=False`` (the children) only merges rows: a child's one-row table2.md and manifest
    would replace the whole table's until the parent rewrote them."""
    started = time.perf_counter()
    methods = list(methods or TABLE2_METHODS)
    dataset = rep.split.meta["dataset"]
    had_teachers = any(trajectory_file(rep.teachers_dir, dataset, name).is_file() for name in TEACHERS)
    trajectories = ensure_teachers(rep)
    digest = teachers_digest(trajectories)
    table_file, curves_file = rep.out_dir / "table2.csv", rep.out_dir / "curves.csv"
    plan = [(s, m, seed, *run_config(rep, trajectories, s, m, seed, dim, rep.schedule.options(m)))
            for s in students for m in methods for seed in seeds]
    adopt_earlier_rows(rep, trajectories, plan, dim)
    runs_folder = rep.runs_dir / rep.label
    from_scratch = (rep.train and not had_teachers and not read_rows(table_file)
                    and not (runs_folder.is_dir() and any(runs_folder.iterdir())))
    if rep.train and jobs > 1:
        finished = {_row_key(r) for r in read_rows(table_file)}
        train_side_by_side(rep, [(s, m, seed) for s, m, seed, config, _ in plan
                                 if (s, m, str(seed), config) not in finished], jobs)
    wanted, missing = [], []
    for position, (student, method, seed, config, command) in enumerate(plan, 1):
        key = (student, method, str(seed), config)
        if key in {_row_key(r) for r in read_rows(table_file)}:  # re-read: another reproduce may share the file
            wanted.append(key)
            continue
        if rep.train:
            rep.say(f"[{position}/{len(plan)}] {command}")
        result = student_run(rep, trajectories, student, method, seed, dim)
        if result is None:
            missing.append(command)
            continue
        wanted.append(key)
        row = {"dataset": rep.label, "student": student, "method": method, "seed": str(seed),
               **{m: f"{result['test'][m]:.6f}" for m in METRICS}, "best_epoch": result["best_epoch"],
               "epochs": result["epochs"], "wall_seconds": result["wall_seconds"], "command": command,
               "config": config, "teachers_digest": digest, "commit": result.get("commit", git_commit()),
               "code_digest": result.get("code_digest", ""),
               "machine": result.get("machine", machine())}
        curve = [{"dataset": rep.label, "student": student, "method": method, "seed": seed, "config": config,
                  "epoch": p["epoch"], "valid_recall@50": f"{p['valid_recall@50']:.6f}",
                  "test_recall@50": f"{p['test_recall@50']:.6f}"} for p in result["curve"]]
        with _locked(rep.out_dir):
            # a row of the same student, method and seed under another configuration (older defaults) is replaced
            same = (student, method, str(seed))
            write_rows(table_file, [r for r in read_rows(table_file) if _row_key(r)[:3] != same] + [row],
                       TABLE2_COLUMNS)
            write_rows(curves_file, [c for c in read_rows(curves_file)
                                     if (c["student"], c["method"], c["seed"]) != same] + curve, CURVE_COLUMNS)
    by_key = {_row_key(r): r for r in read_rows(table_file)}
    chosen = [by_key[key] for key in wanted]
    if not write_page:
        return {"rows": chosen, "teachers": {}, "manifest": None}
    teachers = teacher_rows(rep, trajectories)
    page = table2_markdown(rep, chosen, teachers, students, methods, seeds, missing)
    teacher_seconds = sum(float(t.meta.get("train_seconds") or 0) + float(t.meta.get("eval_seconds") or 0)
                          for t in trajectories)
    with _locked(rep.out_dir):
        (rep.out_dir / "table2.md").write_text(page)
        manifest = write_manifest(rep, "table2", chosen, seeds, time.perf_counter() - started, teacher_seconds,
                                  jobs, from_scratch)
    return {"rows": chosen, "teachers": teachers, "manifest": manifest}


def train_side_by_side(rep: Reproduction, todo: Sequence[tuple[str, str, int]], jobs: int,
                       poll_seconds: float = 2.0) -> None:
    """Train the runs ``todo`` in ``jobs`` child processes at a time, each with its share of the cores.

    Each child is one ``hetcomp reproduce`` of a single run (``rep.child_command``), so it merges its row into
    table2.csv under the folder lock exactly as a serial call does, and an interrupted child resumes from its
    ``last.pt`` next time. A child's output goes to ``<results>/<dataset>/logs/``; a failed child stops the table
    with the path of its log instead of a number that silently is not there.
    """
    if not todo:
        return
    if rep.child_command is None:
        raise HetCompError("--jobs needs a way to start child runs (use the hetcomp reproduce command)")
    logs = rep.out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    pending, running, failed, done = list(todo), {}, [], 0
    bar = rep.progress(f"{len(todo)} runs, {jobs} at a time", len(todo))
    rep.say(f"training {len(todo)} runs in {jobs} processes of {threads} thread(s) each; logs in {logs}")
    try:
        while pending or running:
            while pending and len(running) < jobs:
                student, method, seed = pending.pop(0)
                log = logs / f"{student}-{method}-{seed}.log"
                with open(log, "a") as handle:
                    child = subprocess.Popen(rep.child_command(student, method, seed), stdout=handle,
                                             stderr=subprocess.STDOUT, env=env)
                running[child] = (log, time.perf_counter())
            time.sleep(poll_seconds)
            for child in [c for c in running if c.poll() is not None]:
                log, began = running.pop(child)
                done += 1
                status = "done" if child.returncode == 0 else f"FAILED (exit {child.returncode})"
                rep.say(f"[{done}/{len(todo)}] {log.stem} {status} in {(time.perf_counter() - began) / 60:.1f} min")
                if child.returncode != 0:
                    failed.append(log)
                if bar is not None:
                    bar.on_epoch_end(None, done, 0.0)
    finally:
        for child in running:
            child.terminate()
        if bar is not None and hasattr(bar, "close"):
            bar.close()
    if failed:
        raise HetCompError(f"{len(failed)} run(s) failed; see " + ", ".join(str(f) for f in failed)
                           + " (finished runs are kept: rerun the same command to retry the rest)")


def teacher_rows(rep: Reproduction, trajectories: list) -> dict[str, dict]:
    """Test metrics of the best teacher (by validation R@50) and of the converged ensemble."""
    finals = {t.name: t.meta["metrics"][-1] for t in trajectories if t.meta.get("metrics")}
    best = max(finals, key=lambda name: finals[name]["valid"]["recall@50"])
    ensemble = evaluate_split(EnsembleConfig().scorer(rep.split, trajectories), rep.split)
    return {"Best Teacher": {"name": best, **finals[best]["test"]}, "Ensemble": ensemble["test"]}


def paper_values(dataset: str) -> dict[tuple[str, str], dict]:
    """The paper's Table 2, for display beside ours only (a copy of the shared docs' paper-table2.csv; nothing in
    training or evaluation reads it)."""
    path = Path(__file__).with_name("paper_table2.csv")
    out = {}
    for row in read_rows(path):
        if row["dataset"] == dataset:
            out[(row["student"], row["method"])] = {m: float(row[h]) for m, h in zip(METRICS, HEADERS, strict=True)}
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired_p_value(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test over seeds (nan with fewer than two pairs or identical differences)."""
    if len(a) < 2:
        return math.nan
    from scipy import stats

    with np.errstate(all="ignore"):
        return float(stats.ttest_rel(a, b).pvalue)


def table2_markdown(rep: Reproduction, rows: list[dict], teachers: dict, students: Sequence[str],
                    methods: Sequence[str], seeds: Sequence[int], missing: Sequence[str] = ()) -> str:
    paper = {} if rep.schedule.quick else paper_values(rep.dataset)
    digests = sorted({r["teachers_digest"] for r in rows})
    lines = [f"# Table 2 — {rep.label} (authors' split), students at dim 6", "",
             f"- command: `{rep.command}`", f"- seeds: {', '.join(map(str, seeds))} (student training seeds; split "
             f"seed {rep.split.meta['seed']}; teachers trained with seed 0)", f"- commit: {git_commit()}",
             f"- machine: {machine()}", f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "- source of truth: `table2.csv` beside this file (one row per run, with the command that reruns it); "
             "the manifest has the wall times", "",
             "Cells: ours, mean ± std over seeds (the paper's value in brackets where it reports one). "
             "Imp.: HetComp over the best baseline on each metric (by mean); p: paired t-test over seeds between "
             "HetComp and that baseline.", ""]
    if len(digests) > 1:
        lines += [f"Note: rows came from {len(digests)} trainings of the same teacher configuration "
                  f"(digests {', '.join(digests)}); retrained teachers differ only by floating-point order.", ""]
    for student in students:
        block = [r for r in rows if r["student"] == student]
        if not block:
            continue
        lines += [f"## {student.upper()} student", "",
                  "| method | " + " | ".join(HEADERS) + " | seeds | epochs (mean) | wall s (mean) |",
                  "|---|" + "---|" * (len(HEADERS) + 3)]
        for label, metrics in teachers.items():
            shown = f"{label} ({metrics['name']})" if "name" in metrics else label
            cells = [f"{metrics[m]:.4f}" + _paper_cell(paper.get(("", label)), m) for m in METRICS]
            lines.append(f"| {shown} | " + " | ".join(cells) + " | - | - | - |")
        per_method: dict[str, dict[str, list[float]]] = {}
        for method in methods:
            runs = sorted((r for r in block if r["method"] == method), key=lambda r: int(r["seed"]))
            if not runs:
                continue
            per_method[method] = {m: [float(r[m]) for r in runs] for m in METRICS}
            per_method[method]["seeds"] = [int(r["seed"]) for r in runs]
            cells = []
            for m in METRICS:
                mean, std = mean_std(per_method[method][m])
                spread = f" ± {std:.4f}" if len(runs) > 1 else ""  # one seed has no spread to show
                cells.append(f"{mean:.4f}{spread}" + _paper_cell(paper.get((student, LABELS[method])), m))
            epochs = np.mean([float(r["epochs"]) for r in runs])
            seconds = np.mean([float(r["wall_seconds"]) for r in runs])
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {len(runs)} | {epochs:.0f} | "
                         f"{seconds:.0f} |")
        baselines = [m for m in BASELINES if m in per_method]
        if "hetcomp" in per_method and baselines:
            imp, pvals = [], []
            for m in METRICS:
                best = max(baselines, key=lambda b: np.mean(per_method[b][m]))
                ours, theirs = np.mean(per_method["hetcomp"][m]), np.mean(per_method[best][m])
                imp.append(f"{100 * (ours / theirs - 1):+.1f}% vs {LABELS[best]}")
                shared = sorted(set(per_method["hetcomp"]["seeds"]) & set(per_method[best]["seeds"]))
                a = [per_method["hetcomp"][m][per_method["hetcomp"]["seeds"].index(s)] for s in shared]
                b = [per_method[best][m][per_method[best]["seeds"].index(s)] for s in shared]
                p = paired_p_value(a, b)
                pvals.append("-" if math.isnan(p) else f"{p:.3g}")
            lines.append("| Imp. | " + " | ".join(imp) + " | | | |")
            lines.append("| p (paired t) | " + " | ".join(pvals) + " | | | |")
        lines.append("")
    if missing:
        lines += [f"Not finished yet ({len(missing)} of {len(missing) + len(rows)} runs; the cells above average the "
                  "seeds that are): rerun the command without --no-train to train them.", ""]
        lines += [f"- `{command}`" for command in missing] + [""]
    if rep.split.meta["dataset"].startswith(("foursquare", "amusic")):
        lines += ["Our copy of this dataset differs from the paper's (a smaller cut; see the data catalogue), so the "
                  "paper's values are shown for orientation, not as a like-for-like comparison.", ""]
    notes = rep.out_dir / TABLE2_NOTES
    if notes.is_file():
        lines += [f"## Reading it (written by hand in `{TABLE2_NOTES}`, kept when the table is regenerated)", "",
                  notes.read_text().strip(), ""]
    return "\n".join(lines)


def _paper_cell(values: dict | None, metric: str) -> str:
    return f" ({values[metric]:.4f})" if values else ""


def write_manifest(rep: Reproduction, table: str, rows: list[dict], seeds: Sequence[int], seconds: float,
                   teacher_seconds: float = 0.0, jobs: int = 1, from_scratch: bool = False) -> dict:
    """manifest.json: per table, the commands, seeds, commit, machine and wall times (this call, the runs' and the
    teachers' training). From scratch, the table costs the teachers' time plus the runs' time divided by the runs
    trained side by side (``--jobs``, one per core here): that estimate is recorded beside the measured times.

    A call that trained every teacher and every run itself (``from_scratch``: nothing existed to reuse) is a
    measurement of that cost: it is kept as ``from_scratch_measured`` with its command, and later calls (a
    ``--no-train`` regeneration of the page, more seeds) carry it over instead of losing it."""
    path = rep.out_dir / "manifest.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    run_seconds = sum(float(r.get("wall_seconds") or 0) for r in rows)
    stamp = {"commit": git_commit(), "machine": machine(),
             "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    measured = manifest.get(table, {}).get("from_scratch_measured")
    if from_scratch:
        measured = {"command": rep.command, "wall_seconds": round(seconds, 1), "runs": len(rows), "jobs": jobs,
                    **stamp}
    manifest[table] = {
        "command": rep.command, "seeds": list(seeds), **stamp,
        "wall_seconds_this_call": round(seconds, 1),
        "sum_of_run_wall_seconds": round(run_seconds, 1),
        "teacher_training_seconds": round(teacher_seconds, 1),
        "jobs": jobs,
        "from_scratch_estimate": {
            "jobs": (cores := os.cpu_count() or 1),
            "seconds": round(teacher_seconds + run_seconds / cores, 1),
            "how": "teachers' training + the runs' summed wall time / jobs (one single-thread run per core)",
        },
        **({"from_scratch_measured": measured} if measured else {}),
        "runs": [r.get("command", "") for r in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=1))
    return manifest[table]


# ---- Table 1: the discrepancy study --------------------------------------------------------------------------

def supervision_nll(score_fn: Callable, split: Split, supervision: torch.Tensor, device,
                    batch_size: int = 1024) -> float:
    """Plackett–Luce negative log-likelihood of the supervision's top-K list under the student, per list position.

    For each user: (1/K) Σ_k −log( e^{f(π_k)} / (Σ_{l≥k} e^{f(π_l)} + Σ_{j unobserved, not listed} e^{f(j)}) ),
    averaged over users: how improbable the student finds the supervision's ordering (lower = closer).
    """
    total, count = 0.0, 0
    k = supervision.shape[1]
    for start in range(0, split.n_users, batch_size):
        users = torch.arange(start, min(start + batch_size, split.n_users))
        with torch.no_grad():
            scores = score_fn(users.to(device)).float()
        listed = supervision[users].long().to(scores.device)
        observed = csr_rows_dense(split.train, users.numpy(), scores.device)
        scores = scores.masked_fill(observed, -1e30)
        valid = torch.ones_like(listed, dtype=torch.bool)
        tail = tail_logsumexp(scores, listed, valid)
        per_user = fine_loss(scores, listed, valid, tail_lse=tail) * len(users) / k
        total += float(per_user)
        count += len(users)
    return total / max(count, 1)


def table1(rep: Reproduction, seed: int = 0, dim: int = 6, k: int = 50) -> dict:
    """Supervision (a) one MF teacher, (b) an ensemble of MF teachers of different seeds, (c) the heterogeneous
    ensemble: its test R@50, and an MF student's D@10, D@50 and NLL with respect to it after distillation."""
    started = time.perf_counter()
    mf_names = [seeded_name("mf", s, 0) for s in MF_SEEDS]
    supervisions = {"(a) one MF teacher": ["mf"], f"(b) ensemble of {len(mf_names)} MF teachers": mf_names,
                    "(c) heterogeneous ensemble": list(TEACHERS)}
    ensure_teachers(rep, sorted(set(sum(supervisions.values(), []))))
    rows = []
    for label, names in supervisions.items():
        trajectories = load_teachers(rep.split, rep.teachers_dir, names)
        context = DistillContext(rep.split, trajectories, rep.device)
        supervision = context.ensemble_topk(k).cpu()
        quality = evaluate_split(context.scorer(), rep.split, device=rep.device)["test"]
        result = student_run(rep, trajectories, "mf", TABLE1_METHOD, seed, dim)
        run_dir = rep.runs_dir / rep.label / result["run"]
        model = build_model("mf", rep.split.train, dim=dim)
        model.load_state_dict(torch.load(run_dir / "student.pt", map_location="cpu", weights_only=True))
        model = model.to(rep.device).eval()
        ranking = evaluate_split(model.score, rep.split, top_m=k, device=rep.device)["ranking"]
        d10 = float(discrepancy(ranking[:, :10], supervision[:, :10], 10).mean())
        d50 = float(discrepancy(ranking, supervision, 50).mean())
        nll = supervision_nll(model.score, rep.split, supervision, rep.device)
        rows.append({"dataset": rep.label, "supervision": label, "teachers": ",".join(names),
                     "supervision_R@50": f"{quality['recall@50']:.6f}", "D@10": f"{d10:.6f}", "D@50": f"{d50:.6f}",
                     "NLL": f"{nll:.6f}", "student_R@50": f"{result['test']['recall@50']:.6f}",
                     "command": result["command"], "seed": seed})
    columns = ("dataset", "supervision", "teachers", "supervision_R@50", "D@10", "D@50", "NLL", "student_R@50",
               "seed", "command")
    write_rows(rep.out_dir / "table1.csv", rows, columns)
    lines = [f"# Table 1 — {rep.label}: the student's discrepancy to its supervision after distillation", "",
             f"- command: `{rep.command}`", f"- seed: {seed} (student); teachers seed 0, MF teachers of (b) seeds "
             f"{', '.join(map(str, MF_SEEDS))}", f"- commit: {git_commit()}", f"- machine: {machine()}", "",
             f"The student (MF, dim {dim}) is trained by {TABLE1_METHOD.upper()} on each supervision's top items. "
             "R@50: the supervision's own test Recall@50. D@K = 1 − NDCG@K of the student's top-K against the "
             "supervision's (the paper's graded form, λ = 10). NLL: the Plackett–Luce negative log-likelihood of "
             "the supervision's top-50 under the student, per position (our normalization; the paper's is not "
             "stated, so only the order of the rows compares).", "",
             "| supervision | R@50 | D@10 | D@50 | NLL | student test R@50 |", "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['supervision']} | {float(row['supervision_R@50']):.4f} | {float(row['D@10']):.4f} | "
                     f"{float(row['D@50']):.4f} | {float(row['NLL']):.4f} | {float(row['student_R@50']):.4f} |")
    lines += ["", "Commands of the student runs:", ""] + [f"- {r['supervision']}: `{r['command']}`" for r in rows]
    (rep.out_dir / "table1.md").write_text("\n".join(lines) + "\n")
    write_manifest(rep, "table1", [], [seed], time.perf_counter() - started)
    return {"rows": rows}


# ---- cost table ---------------------------------------------------------------------------------------------

def inference_seconds(score_fn: Callable, split: Split, device: torch.device, k: int = 50,
                      batch_size: int = 1024) -> tuple[float, float]:
    """(seconds to score every user against every item, seconds to also take every user's top-k unobserved).

    The training items are masked in place in the fresh score table, as a serving system would.
    """

    def score_all(with_topk: bool) -> None:
        for start in range(0, split.n_users, batch_size):
            users = np.arange(start, min(start + batch_size, split.n_users))
            with torch.no_grad():
                scores = score_fn(torch.from_numpy(users).to(device))
                if with_topk:
                    topk_items(exclude_rows_(scores, split.train, users), k)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return timed(lambda: score_all(False), 3, enough=5.0), timed(lambda: score_all(True), 3, enough=5.0)


def load_teacher_model(rep: Reproduction, name: str):
    folder = teacher_dir(rep.teachers_dir, rep.split.meta["dataset"], name)
    saved = json.loads((folder / "config.json").read_text())
    model = build_model(saved["teacher"], rep.split.train, **saved["config"])
    model.load_state_dict(torch.load(folder / "best.pt", map_location="cpu", weights_only=True))
    return model


def cost_table(rep: Reproduction, students: Sequence[str] = ("mf", "ml", "dnn"), dim: int = 6) -> dict:
    """Parameters and inference latency (all users x all items, and with top-50) of teachers, ensemble, students."""
    started = time.perf_counter()
    trajectories = ensure_teachers(rep)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        teacher_cost = []
        for trajectory in trajectories:
            model = load_teacher_model(rep, trajectory.name).to(device).eval()
            score, top = inference_seconds(model.score, rep.split, device)
            teacher_cost.append((trajectory.name, model.n_parameters(), score, top))
            rows.append({"device": device.type, "model": f"teacher {trajectory.name}", "dim": model.config.dim,
                         "parameters": model.n_parameters(), "score_seconds": score, "top50_seconds": top})
        _, aggregate = inference_seconds(EnsembleConfig().scorer(rep.split, trajectories, device=device), rep.split,
                                         device)
        rows.append({"device": device.type, "model": "ensemble (every teacher's top-50, then g)", "dim": "-",
                     "parameters": sum(c[1] for c in teacher_cost), "score_seconds": sum(c[2] for c in teacher_cost),
                     "top50_seconds": sum(c[3] for c in teacher_cost) + aggregate})
        for student in students:
            model = build_model(student, rep.split.train, dim=dim).to(device).eval()
            score, top = inference_seconds(model.score, rep.split, device)
            rows.append({"device": device.type, "model": f"student {student}", "dim": dim,
                         "parameters": model.n_parameters(), "score_seconds": score, "top50_seconds": top})
    columns = ("device", "model", "dim", "parameters", "score_seconds", "top50_seconds")
    write_rows(rep.out_dir / "cost.csv", [{**r, "score_seconds": f"{r['score_seconds']:.4g}",
                                           "top50_seconds": f"{r['top50_seconds']:.4g}"} for r in rows], columns)
    lines = [f"# Cost — {rep.label}: parameters and inference latency", "", f"- command: `{rep.command}`",
             f"- commit: {git_commit()}", f"- machine: {machine()}", "",
             "Latency: best of 3 passes (1 when a pass takes over 5 s) "
             f"over all {rep.split.n_users:,} users in batches of 1,024, scoring all "
             f"{rep.split.n_items:,} items (score) and also taking each user's top-50 unobserved items (top-50). "
             "The ensemble must run every teacher and aggregate their top lists with g, so its cost is the "
             "teachers' sum plus g. A student's latency does not depend on its trained values.", ""]
    for device in devices:
        ensemble = next(r for r in rows if r["device"] == device.type and r["model"].startswith("ensemble"))
        lines += [f"## {device.type.upper()}", "",
                  "| model | dim | parameters | score s | top-50 s | ensemble / this (top-50) |",
                  "|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["device"] == device.type):
            ratio = ensemble["top50_seconds"] / row["top50_seconds"]
            lines.append(f"| {row['model']} | {row['dim']} | {row['parameters']:,} | {row['score_seconds']:.3g} | "
                         f"{row['top50_seconds']:.3g} | {ratio:.1f}× |")
        lines.append("")
    (rep.out_dir / "cost.md").write_text("\n".join(lines))
    write_manifest(rep, "cost", [], [], time.perf_counter() - started)
    return {"rows": rows}


# ---- training curves ----------------------------------------------------------------------------------------

def curves_figure(rep: Reproduction, student: str = "mf", methods: Sequence[str] = CURVE_METHODS) -> Path:
    """Test Recall@50 every evaluation for ``methods`` (mean over the seeds in curves.csv), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    points = [r for r in read_rows(rep.out_dir / "curves.csv") if r["student"] == student]
    if not points:
        raise HetCompError(f"no curves for the {student} student in {rep.out_dir / 'curves.csv'}: run "
                           f"`hetcomp reproduce --dataset {rep.dataset} --table 2` first")
    figure, axis = pyplot.subplots(figsize=(6, 4))
    for method in methods:
        by_epoch: dict[int, list[float]] = {}
        for point in points:
            if point["method"] == method:
                by_epoch.setdefault(int(point["epoch"]), []).append(float(point["test_recall@50"]))
        if by_epoch:
            epochs = sorted(by_epoch)
            seeds = max(len(v) for v in by_epoch.values())
            axis.plot(epochs, [np.mean(by_epoch[e]) for e in epochs],
                      label=f"{LABELS.get(method, method)} ({seeds} seed{'s' if seeds > 1 else ''})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("test Recall@50")
    axis.set_title(f"{rep.label}: {student.upper()} student, dim 6")
    axis.grid(alpha=0.3)
    axis.legend()
    path = rep.out_dir / f"curves-{student}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path
