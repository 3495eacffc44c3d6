"""Table 2: every method's students, trained or reused run by run, merged into the ledger and rendered."""

from __future__ import annotations

import time
from collections.abc import Sequence

from hetcomp.paper.common import METRICS, TABLE2_METHODS, Reproduction
from hetcomp.paper.identity import adopt_earlier_rows, run_config, student_run
from hetcomp.paper.ledger import CURVE_COLUMNS, TABLE2_COLUMNS, locked, read_rows, row_key, write_rows
from hetcomp.paper.manifest import write_manifest
from hetcomp.paper.pages import table2_markdown
from hetcomp.paper.scheduler import train_side_by_side
from hetcomp.paper.teachers import ensure_teachers, teacher_rows, teachers_digest
from hetcomp.provenance import git_commit, machine
from hetcomp.teachers import TEACHERS, trajectory_file


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
        finished = {row_key(r) for r in read_rows(table_file)}
        train_side_by_side(rep, [(s, m, seed) for s, m, seed, config, _ in plan
                                 if (s, m, str(seed), config) not in finished], jobs)
    wanted, missing = [], []
    for position, (student, method, seed, config, command) in enumerate(plan, 1):
        key = (student, method, str(seed), config)
        if key in {row_key(r) for r in read_rows(table_file)}:  # re-read: another reproduce may share the file
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
        with locked(rep.out_dir):
            # a row of the same student, method and seed under another configuration (older defaults) is replaced
            same = (student, method, str(seed))
            write_rows(table_file, [r for r in read_rows(table_file) if row_key(r)[:3] != same] + [row],
                       TABLE2_COLUMNS)
            write_rows(curves_file, [c for c in read_rows(curves_file)
                                     if (c["student"], c["method"], c["seed"]) != same] + curve, CURVE_COLUMNS)
    by_key = {row_key(r): r for r in read_rows(table_file)}
    chosen = [by_key[key] for key in wanted]
    if not write_page:
        return {"rows": chosen, "teachers": {}, "manifest": None}
    teachers = teacher_rows(rep, trajectories)
    page = table2_markdown(rep, chosen, teachers, students, methods, seeds, missing)
    teacher_seconds = sum(float(t.meta.get("train_seconds") or 0) + float(t.meta.get("eval_seconds") or 0)
                          for t in trajectories)
    with locked(rep.out_dir):
        (rep.out_dir / "table2.md").write_text(page)
        manifest = write_manifest(rep, "table2", chosen, seeds, time.perf_counter() - started, teacher_seconds,
                                  jobs, from_scratch)
    return {"rows": chosen, "teachers": teachers, "manifest": manifest}
