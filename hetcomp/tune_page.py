"""The studies page: every finished study of a dataset in one Markdown table, beside their summaries, and the
studies still under way.

`hetcomp tune` rewrites it from the summaries whenever a study reaches its budget (and its "In progress" part,
from the trials records, after every trial), so the figures a reader
compares across methods (trials spent, best validation R@50, the chosen settings, what the trials cost, whether a
choice is still valid for today's method) are never typed by hand nor left behind by a newer study.
"""

from __future__ import annotations

import json
from pathlib import Path

from hetcomp.distill import METHODS, method_class
from hetcomp.errors import HetCompError
from hetcomp.provenance import atomic_write_text
from hetcomp.tune_space import FINISHED_STATES, identity_keys, moved_start_points

STUDIES_PAGE = "STUDIES.md"


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.3g}"


def _settings(summary: dict) -> str:
    settings = summary.get("settings") or {}
    parts = [f"{name}={_number(settings[name])}" for name in ("lr", "weight_decay") if name in settings]
    parts += [f"{name}={_number(value)}" for name, value in sorted((settings.get("options") or {}).items())]
    source = summary.get("chosen_from")
    if isinstance(source, dict) and "method" in source:  # a special case's choice, e.g. DCD's RRD at weight 0
        value = source.get("value")
        reached = f" ({value:.4f}, trial {source.get('trial')})" if isinstance(value, float) else ""
        parts.insert(0, f"{source['method']}'s choice{reached}:")
        return " ".join(parts[:1]) + " " + ", ".join(parts[1:])
    return ", ".join(parts) or "—"


def _status(method: str, version: int) -> str:
    """Whether settings made for ``version`` of ``method`` still fit today's method."""
    try:
        current = method_class(method).version
    except HetCompError:  # a method this version of the toolkit does not know
        return f"unknown method {method!r}"
    if version != current:
        return f"stale: made for version {version}, the method is now {current}"
    return "current"


def _moved(summary: dict, folder: Path) -> str:
    """A note when start points moved since the study began (:func:`~hetcomp.tune_space.moved_start_points`)."""
    moved = len(moved_start_points(summary, Path(folder).parent))
    return (f"; {moved} start point{'s' if moved > 1 else ''} moved since it began (a larger --trials tries "
            f"{'them' if moved > 1 else 'it'} first)") if moved else ""


def _cost(summary: dict) -> str:
    """Hours of the finished trials (complete or pruned); a killed attempt's time is unknown and left out (the
    trial that resumed it counts its own attempt), and ``seconds`` of a failed trial from older summaries too."""
    history = summary.get("history", [])
    finished = [h for h in history if h.get("state") in FINISHED_STATES]
    if not finished or any(h.get("seconds") is None for h in finished):
        return "—"  # trials made before their cost was recorded
    killed = any(h.get("state") == "fail" for h in history)  # then a lower bound
    return f"{'≥ ' if killed else ''}{sum(h['seconds'] for h in finished) / 3600:.2f}"


def study_summaries(folder: Path) -> list[tuple[str, dict]]:
    """(file name, summary) of every study summary in ``folder`` (one dataset), by name; other files skipped."""
    summaries = []
    for file in sorted(Path(folder).glob("*.json")):
        if file.name.endswith(".trials.json"):
            continue
        try:
            summary = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(summary, dict) or "best_value" not in summary or "trials" not in summary:
            continue  # not a study summary
        summaries.append((file.name, summary))
    return summaries


def studies_page(folder: Path) -> str:
    """The page for the summaries in ``folder`` (one dataset), grouped by student in the methods' order."""
    summaries = study_summaries(folder)
    order = {name: position for position, name in enumerate(METHODS)}
    summaries.sort(key=lambda item: (item[1]["student"], item[1]["dim"], order.get(item[1]["method"], 99)))
    lines = [f"# Tuning studies — {summaries[0][1]['dataset'] if summaries else Path(folder).name}", "",
             "Written by `hetcomp tune` whenever a study reaches its budget (and after every trial), from the "
             "summaries in this folder (each holds its command, search space, commit and machine; the "
             "`.trials.json` beside it every trial). "
             "Values are validation Recall@50 at a run's best epoch; test data is never read. \"Trial hours\": the "
             "wall time of the finished (complete or pruned) trials, as recorded (one thread each, on a machine that "
             "may have been shared); \"≥\": some attempt was killed by a stop, whose time is not known (the trial "
             "resuming it counts its own). \"X's choice\": no trial of the study beat method X's chosen settings, "
             "at which this method trains exactly as X (DCD at dcd_weight 0 is RRD), so it takes them. \"Start "
             "point moved\": a study its first trials read (e.g. w/o KD's, for its recipe) chose again after this "
             "one began, so this study never tried today's informed guess.", "",
             "| student | dim | method | version | teachers | trials: complete + pruned / budget | best valid R@50 "
             "(trial) | trial hours | chosen settings | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for _, s in summaries:
        teachers = s.get("teachers_digest", "?") if "teachers_digest" in identity_keys(s["method"]) else "—"
        best = "—" if s["best_value"] is None else f"{s['best_value']:.4f} ({s.get('best_trial')})"
        counts = s["trials"]
        lines.append(f"| {s['student']} | {s['dim']} | {s['method']} | {s['method_version']} | {teachers} | "
                     f"{counts['complete']} + {counts['pruned']} / {s.get('budget', '?')} | {best} | {_cost(s)} | "
                     f"{_settings(s)} | {_status(s['method'], s['method_version'])}{_moved(s, folder)} |")
    return "\n".join(lines + _in_progress(folder, summaries)) + "\n"


def _in_progress(folder: Path, summaries: list[tuple[str, dict]]) -> list[str]:
    """Studies whose trials record (written after every trial) is ahead of their summary, or has none: what a
    rerun of the `hetcomp tune` command resumes."""
    finished = {(s["student"], s["dim"], s["method"], s["method_version"]):
                s["trials"]["complete"] + s["trials"]["pruned"] for _, s in summaries}
    rows = []
    for file in sorted(Path(folder).glob("*.trials.json")):
        try:
            record = json.loads(file.read_text())
            study, trials = record["study"], record["trials"]
            key = (study["student"], study["dim"], study["method"], study["method_version"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        complete = [t for t in trials if t.get("state") == "complete" and t.get("value") is not None]
        pruned = sum(t.get("state") == "pruned" for t in trials)
        if len(complete) + pruned <= finished.get(key, -1):  # killed trials are recorded too: not counted
            continue
        best = max(complete, key=lambda t: t["value"], default=None)
        shown = "—" if best is None else f"{best['value']:.4f} ({best['number']})"
        rows.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {len(complete)} + {pruned} | {shown} | "
                    f"{_status(key[2], key[3])} |")
    if not rows:
        return []
    return ["", "## In progress", "",
            "Finished trials so far, from each study's trials record (rerunning its `hetcomp tune` command resumes it; "
            "the table above keeps the last finished summary, if any, until the study reaches its budget again).", "",
            "| student | dim | method | version | trials so far: complete + pruned | best so far (trial) | status |",
            "|---|---|---|---|---|---|---|", *rows]


def write_studies_page(folder: Path) -> Path:
    """Rewrite ``folder``'s page from its summaries (atomically: a study finishing beside this one rewrites it
    again after its own summary is on disk, so the last page written holds both)."""
    path = Path(folder) / STUDIES_PAGE
    atomic_write_text(path, studies_page(folder))
    return path
