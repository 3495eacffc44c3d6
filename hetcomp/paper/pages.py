"""Table 2's Markdown page and its statistics, rendered from ledger rows (no training, no evaluation)."""

from __future__ import annotations

import json
import math
import shlex
import time
from collections.abc import Collection, Sequence
from pathlib import Path

import numpy as np

from hetcomp.paper.common import BASELINES, CONSTRUCTED, HEADERS, LABELS, METRICS, Reproduction
from hetcomp.paper.ledger import read_rows
from hetcomp.provenance import git_commit, machine

#: hand-written reading of a dataset's Table 2 (exceptions explained), appended to every regenerated table2.md
TABLE2_NOTES = "table2-notes.md"


def paper_values(dataset: str) -> dict[tuple[str, str], dict]:
    """The paper's Table 2, for display beside ours only (a copy of the shared docs' paper-table2.csv; nothing in
    training or evaluation reads it)."""
    path = Path(__file__).parents[1] / "paper_table2.csv"
    out = {}
    for row in read_rows(path):
        if row["dataset"] == dataset:
            out[(row["student"], row["method"])] = {m: float(row[h]) for m, h in zip(METRICS, HEADERS, strict=True)}
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def paired_p_value(a: list[float], b: list[float]) -> float:
    """Two-sided paired t-test over seeds (nan with fewer than two pairs or identical differences).

    Differences equal up to rounding (e.g. a row adopted from another method's runs, or metrics that differ by the
    same amount on every seed) have no spread to test against: the t statistic is 0/0 or a rounding error's
    quotient (a p of 1e-32 from differences of 0.2 ± 1e-17), so they give nan, not a number.
    """
    if len(a) < 2:
        return math.nan
    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if np.ptp(differences) <= 1e-9 * max(float(np.abs(differences).max()), 1e-12):
        return math.nan
    from scipy import stats

    with np.errstate(all="ignore"):
        return float(stats.ttest_rel(a, b).pvalue)


def stamp() -> dict:
    """Where and when a page is written: the commit, the machine and the time (UTC)."""
    return {"commit": git_commit(), "machine": machine(), "written": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def validation_at_best(rows: list[dict], curves: list[dict]) -> dict[str, float]:
    """Each run's validation R@50 at its best epoch (the one early stopping kept), by the run's identity
    (``config``), from curves.csv; runs without that evaluation in the curves are left out."""
    valid = {(c["config"], int(c["epoch"])): float(c["valid_recall@50"]) for c in curves}
    keys = {r["config"]: (r["config"], int(r.get("best_epoch") or -1)) for r in rows if r.get("config")}
    return {config: valid[key] for config, key in keys.items() if key in valid}


def table2_markdown(rep: Reproduction, rows: list[dict], teachers: dict, students: Sequence[str],
                    methods: Sequence[str], seeds: Sequence[int], missing: Sequence[str] = (),
                    written: dict | None = None, notes: str | None = None,
                    validation: dict[str, float] | None = None,
                    untuned: Collection[tuple[str, str]] = ()) -> str:
    """Table 2's page from the ledger's rows: a pure function of its arguments (``written``: :func:`stamp`'s
    commit, machine and time; ``notes``: the hand-written reading kept below the table; ``validation``:
    :func:`validation_at_best` of the rows, for the validation checks under each student's table; ``untuned``:
    the (student, method) rows at the built-in settings beside studied ones, so marked)."""
    written = written or {"commit": "-", "machine": "-", "written": "-"}
    paper = {} if rep.schedule.quick else paper_values(rep.dataset)
    digests = sorted({r["teachers_digest"] for r in rows} - {""})  # w/o KD's runs name no teachers
    lines = [f"# Table 2 — {rep.label} (authors' split), students at dim 6", "",
             f"- command: `{rep.command}`", f"- seeds: {', '.join(map(str, seeds))} (student training seeds; split "
             f"seed {rep.split.meta['seed']}; teachers trained with seed 0)", f"- commit: {written['commit']}",
             f"- machine: {written['machine']}", f"- written: {written['written']}",
             "- source of truth: `table2.csv` beside this file (one row per run, with the command that reruns it); "
             "the manifest has the wall times", "",
             "Cells: ours, mean ± std over seeds (the paper's value in brackets where it reports one). "
             "Imp.: HetComp over the best baseline on each metric (by mean); p: paired t-test over seeds between "
             "HetComp and that baseline.", ""]
    untuned = {(r["student"], r["method"]) for r in rows} & set(untuned)  # only the rows shown here
    if untuned:
        lines += ["Rows marked (built-in settings): no `hetcomp tune` study of that student and method, while the "
                  "other rows' settings were chosen on validation (trained with `--allow-untuned`).", ""]
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
            mark = " (built-in settings)" if (student, method) in untuned else ""
            lines.append(f"| {_row_label(method)}{mark} | " + " | ".join(cells) + f" | {len(runs)} | "
                         f"{epochs:.0f} | {seconds:.0f} |")
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
        lines += _validation_checks(block, methods, validation or {})
        lines += _against_the_paper(student, per_method, teachers.get("Ensemble"), paper)
    marked = [method for method in methods if method in CONSTRUCTED and any(r["method"] == method for r in rows)]
    if marked:
        lines += [" ".join(f"{CONSTRUCTED[m][0]} {CONSTRUCTED[m][1]}" for m in marked), ""]
    if missing:
        lines += [f"Not finished yet ({len(missing)} of {len(missing) + len(rows)} runs; the cells above average the "
                  "seeds that are): rerun the command without --no-train to train them.", ""]
        lines += [f"- `{command}`" for command in missing] + [""]
    if rep.split.meta["dataset"].startswith(("foursquare", "amusic")):
        lines += ["Our copy of this dataset differs from the paper's (a smaller cut; see the data catalogue), so the "
                  "paper's values are shown for orientation, not as a like-for-like comparison.", ""]
    if notes:
        lines += [f"## Reading it (written by hand in `{TABLE2_NOTES}`, kept when the table is regenerated)", "",
                  notes.strip(), ""]
    return "\n".join(lines)


#: the validation comparisons the fair-comparison issue asks of every student: (method, the method it must beat)
VALIDATION_PAIRS = tuple((m, "none") for m in BASELINES) + (("dcd", "rrd"),)


def _validation_checks(block: list[dict], methods: Sequence[str], validation: dict[str, float]) -> list[str]:
    """Validation R@50 at each run's best epoch, mean over seeds, for each pair of :data:`VALIDATION_PAIRS`
    present: every KD baseline against w/o KD, DCD against the RRD it extends (difference of the means and a
    paired t-test over the seeds both have). Validation only: the rows' test numbers are the table above."""
    per_method = {}
    for method in methods:
        runs = {int(r["seed"]): validation[r["config"]] for r in block
                if r["method"] == method and r.get("config") in validation}
        if runs:
            per_method[method] = runs
    pairs = [(a, b) for a, b in VALIDATION_PAIRS if a in per_method and b in per_method]
    if not pairs:
        return []
    lines = ["Validation R@50 at each run's best epoch (mean over seeds), for the comparisons every student is held "
             "to: each KD baseline against w/o KD, DCD against RRD (p: paired t-test over seeds):", "",
             "| method | valid R@50 | against | its valid R@50 | difference | p |", "|---|---|---|---|---|---|"]
    for method, other in pairs:
        shared = sorted(set(per_method[method]) & set(per_method[other]))
        ours, theirs = np.mean(list(per_method[method].values())), np.mean(list(per_method[other].values()))
        p = paired_p_value([per_method[method][s] for s in shared], [per_method[other][s] for s in shared])
        lines.append(f"| {_row_label(method)} | {ours:.4f} | {_row_label(other)} | {theirs:.4f} | "
                     f"{100 * (ours / theirs - 1):+.1f}% | {'-' if math.isnan(p) else f'{p:.3g}'} |")
    lines.append("")
    uncorrected = [r for r in block if r["method"] == "dcd" and _option(r.get("command", ""), "dcd_weight") == 0]
    if uncorrected:
        lines += [f"DCD runs with dcd_weight 0 ({len(uncorrected)} of its runs here): at that weight DCD trains "
                  "exactly as RRD, so at RRD's settings its row repeats RRD's. A DCD study chooses it when no "
                  "correction it tried beat RRD's tuned settings on validation (`chosen_from` in its summary).", ""]
    return lines


def _option(command: str, name: str):
    """The value a ``hetcomp distill`` command line gives option ``name`` (``-o name=VALUE``), else None."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for flag, value in zip(words, words[1:], strict=False):
        if flag == "-o" and value.startswith(f"{name}="):
            try:
                return json.loads(value.split("=", 1)[1])
            except ValueError:
                return None
    return None


def _row_label(method: str) -> str:
    """A method's label in tables, with its footnote mark when it is the project's construction or adaptation."""
    return LABELS[method] + CONSTRUCTED.get(method, ("",))[0]


#: how far (relative) a row's share of its ensemble's R@50 may sit from the paper's before it needs a measured reason
PAPER_GAP = 0.10


def _against_the_paper(student: str, per_method: dict, ensemble: dict | None, paper: dict) -> list[str]:
    """Each row's test R@50 as a share of its own ensemble's, ours beside the paper's (our data, teachers and
    ensemble differ from the paper's, so shares compare where raw values cannot); rows more than
    :data:`PAPER_GAP` apart are flagged, for the hand-written notes to give a measured reason."""
    theirs_ensemble = paper.get(("", "Ensemble"))
    shown = [m for m in per_method if paper.get((student, LABELS[m]))]
    if not ensemble or not theirs_ensemble or not shown:
        return []
    lines = ["R@50 as a share of the ensemble's (ours ÷ our ensemble, the paper's ÷ its ensemble); **flagged**: more "
             f"than {PAPER_GAP:.0%} apart, the reading below gives each flagged gap its measured reason:", "",
             "| method | ours | paper | ours vs paper |", "|---|---|---|---|"]
    for method in shown:
        ours = float(np.mean(per_method[method]["recall@50"])) / ensemble["recall@50"]
        theirs = paper[(student, LABELS[method])]["recall@50"] / theirs_ensemble["recall@50"]
        gap = ours / theirs - 1
        flag = " **flagged**" if abs(gap) > PAPER_GAP else ""
        lines.append(f"| {_row_label(method)} | {ours:.3f} | {theirs:.3f} | "
                     f"{gap:+.1%}{flag} |")
    return lines + [""]


def _paper_cell(values: dict | None, metric: str) -> str:
    return f" ({values[metric]:.4f})" if values else ""
