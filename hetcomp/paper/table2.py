"""Table 2: every method's students, each a run specification; trained or reused, merged into the ledger, and
rendered for every cell that any caller asked for (calls running side by side merge, they never overwrite)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from hetcomp.errors import HetCompError
from hetcomp.paper.clock import FromScratchClock, open_clock
from hetcomp.paper.common import TABLE2_DEFAULT_METHODS, TABLE2_STUDENTS, Reproduction
from hetcomp.paper.ledger import locked, read_rows, row_key
from hetcomp.paper.manifest import read_manifest, write_manifest
from hetcomp.paper.pages import TABLE2_NOTES, stamp, table2_markdown, validation_at_best
from hetcomp.paper.runs import (
    record_table2_row,
    rerun_command,
    rows_from_twins,
    run_spec,
    student_run,
    train_missing,
    twins_after,
)
from hetcomp.paper.teachers import ensure_teachers, teacher_rows
from hetcomp.provenance import atomic_write_text
from hetcomp.runs import teachers_digest
from hetcomp.runs.tuned import summary_path
from hetcomp.teachers import TEACHERS, trajectory_file


def table2(rep: Reproduction, students: Sequence[str], seeds: Sequence[int], methods: Sequence[str] | None = None,
           dim: int = 6) -> dict:
    """Run (or reuse) every teacher and student of Table 2 and write table2.csv / curves.csv / table2.md.

    A cell is reused when the ledger holds a row with its run's identity, or its run folder is finished. The
    page and the manifest cover the union of the cells asked by every call on the same teachers (kept in the
    manifest's ``grid``), so two calls running side by side both end with the whole table."""
    started = time.perf_counter()
    methods = list(methods or TABLE2_DEFAULT_METHODS)
    dataset = rep.split.meta["dataset"]
    had_teachers = any(trajectory_file(rep.teachers_dir, dataset, name).is_file() for name in TEACHERS)
    table_file = rep.out_dir / "table2.csv"
    runs_folder = rep.runs_dir / rep.label
    from_scratch = (rep.train and not had_teachers and not read_rows(table_file)
                    and not (runs_folder.is_dir() and any(runs_folder.iterdir())))
    clock = open_clock(rep.out_dir, rep.command, {"students": list(students), "methods": methods,
                                                  "seeds": list(seeds), "dim": dim},
                       from_scratch, rep.train, rep.jobs, rep.say, started)
    try:
        return _table2(rep, students, seeds, methods, dim, started, clock)
    finally:
        if clock is not None:
            clock.stop()  # nothing after ``close``; else this sitting's last beat (an error, an interrupt)


def _table2(rep: Reproduction, students: Sequence[str], seeds: Sequence[int], methods: list[str], dim: int,
            started: float, clock: FromScratchClock | None) -> dict:
    trajectories = ensure_teachers(rep)
    digest = teachers_digest(trajectories)
    table_file = rep.out_dir / "table2.csv"
    cells = {(s, m, seed): run_spec(rep, trajectories, s, m, seed, dim)
             for s in students for m in methods for seed in seeds}
    specs = list(cells.values())
    recorded = {r["config"] for r in read_rows(table_file)}
    todo = [spec for spec in specs if spec.identity not in recorded]
    if rep.train:
        _refuse_replacing_other_teachers(rep, table_file, todo, digest)
    todo = rows_from_twins(rep, todo)
    if rep.train:
        planned = _merged_grid(rep, digest, students, methods, seeds)  # the page's cells, earlier calls' too
        _refuse_untuned(rep, todo, cells_without_study(rep, planned["students"], planned["methods"], dim))
        for group in twins_after(todo):
            train_missing(rep, trajectories, group, lambda spec, result: record_table2_row(rep, spec, result))
    else:  # finished run folders still count; the rest is listed on the page
        for spec in todo:
            if (result := student_run(rep, trajectories, spec)) is not None:
                record_table2_row(rep, spec, result)
    teachers = teacher_rows(rep, trajectories)
    teacher_seconds = sum(float(t.meta.get("train_seconds") or 0) + float(t.meta.get("eval_seconds") or 0)
                          for t in trajectories)
    with locked(rep.out_dir):
        grid = _merged_grid(rep, digest, students, methods, seeds)
        union = [cells.get((s, m, seed)) or run_spec(rep, trajectories, s, m, seed, dim)  # others' cells
                 for s in grid["students"] for m in grid["methods"] for seed in grid["seeds"]]
        by_identity = {r["config"]: r for r in read_rows(table_file)}
        chosen = [by_identity[spec.identity] for spec in union if spec.identity in by_identity]
        missing = [rerun_command(rep, spec) for spec in union if spec.identity not in by_identity]
        notes = rep.out_dir / TABLE2_NOTES
        validation = validation_at_best(chosen, read_rows(rep.out_dir / "curves.csv"))
        page = table2_markdown(rep, chosen, teachers, grid["students"], grid["methods"], grid["seeds"], missing,
                               stamp(), notes.read_text() if notes.is_file() else None, validation,
                               cells_without_study(rep, grid["students"], grid["methods"], dim))
        atomic_write_text(rep.out_dir / "table2.md", page)
        seconds = time.perf_counter() - started
        measured = clock.close(seconds) if clock is not None and not missing else None
        manifest = write_manifest(rep, "table2", chosen, grid["seeds"], seconds, teacher_seconds, rep.jobs,
                                  measured, grid={**grid, "teachers_digest": digest})
    if measured is not None:
        rep.say(f"measured from scratch: {measured['wall_seconds'] / 3600:.2f} h of wall time over "
                f"{measured['sittings']} call(s) (manifest.json's from_scratch_measured)")
    return {"rows": chosen, "teachers": teachers, "manifest": manifest, "keys": [row_key(r) for r in chosen]}


def cells_without_study(rep: Reproduction, students: Sequence[str], methods: Sequence[str],
                        dim: int = 6) -> list[tuple[str, str]]:
    """The (student, method) cells that no ``hetcomp tune`` study chose settings for, when some other cell of the
    grid has one: such a cell trains at the built-in settings beside rows chosen on validation, an unequal budget.
    [] when every cell, or none, has a study (a table of built-in settings is consistent)."""
    dataset = rep.split.meta["dataset"]
    cells = [(student, method) for student in students for method in methods]
    studied = {cell: summary_path(dataset, *cell, dim, rep.tuning_dir).is_file() for cell in cells}
    return [cell for cell in cells if not studied[cell]] if any(studied.values()) else []


def _refuse_untuned(rep: Reproduction, todo: Sequence, untuned: Sequence[tuple[str, str]]) -> None:
    """Training cells without a study beside studied ones is an error (unless ``rep.allow_untuned``), naming the
    studies to run: a silently untuned row would look like a tuned one on the page."""
    training = {(spec.student, spec.method) for spec in todo}
    cells = [cell for cell in untuned if cell in training]
    if rep.allow_untuned or not cells:
        return
    dataset = rep.split.meta["dataset"]
    folder = "" if rep.tuning_dir is None else f" --tuning-dir {rep.tuning_dir}"
    commands = "; ".join(f"hetcomp tune --dataset {dataset} --student {student} --method {method}{folder}"
                         for student, method in cells)
    listed = ", ".join(f"{student} {method}" for student, method in cells)
    raise HetCompError(
        f"{len(cells)} cell(s) of this table have no tuning study ({listed}) while other cells do: they would "
        f"train at the built-in settings beside rows whose settings were chosen on validation. Tune them first "
        f"({commands}), leave them out of --students / --methods, or pass --allow-untuned to train them at the "
        "built-in settings (the page marks them)")


def _refuse_replacing_other_teachers(rep: Reproduction, table_file, todo: Sequence, digest: str) -> None:
    """Rows that training ``todo`` would replace are an error when other teachers made them (unless
    ``rep.replace_other_teachers``): teachers retrained on another machine or thread count rank a few items
    differently, and hours of committed rows would be swapped for rows of other teachers one run at a time."""
    if rep.replace_other_teachers:
        return
    rows = {(r["student"], r["method"], r["seed"]): r for r in read_rows(table_file)}
    clashing = [row for spec in todo if (row := rows.get((spec.student, spec.method, str(spec.seed)))) is not None
                and spec.teachers_digest and row["teachers_digest"] not in ("", spec.teachers_digest)]
    if not clashing:
        return
    other = sorted({row["teachers_digest"] for row in clashing})
    raise HetCompError(
        f"{table_file} holds {len(clashing)} row(s) of these cells made with teachers {', '.join(other)}, but the "
        f"teachers under {rep.teachers_dir} are {digest}: training would replace those rows with rows of other "
        "teachers. "
        f"Retrain the teachers as those rows' were (each teacher's digest, thread count and machine are on "
        f"experiments/results/teachers-{rep.label}.md), give another --results-dir, or pass "
        "--replace-other-teachers to replace them")


def _merged_grid(rep: Reproduction, digest: str, students: Sequence[str], methods: Sequence[str],
                 seeds: Sequence[int]) -> dict:
    """This call's cells with those earlier calls on the same teachers asked for (from the manifest)."""
    earlier = read_manifest(rep.out_dir / "manifest.json").get("table2", {}).get("grid", {})
    if earlier.get("teachers_digest") != digest:
        earlier = {}

    def union(key: str, ours: Sequence, order: Sequence) -> list:
        merged = set(earlier.get(key, [])) | set(ours)
        return [x for x in order if x in merged] + sorted(x for x in merged if x not in order)

    return {"students": union("students", students, TABLE2_STUDENTS),
            "methods": union("methods", methods, TABLE2_DEFAULT_METHODS),
            "seeds": sorted(set(earlier.get("seeds", [])) | set(seeds))}
