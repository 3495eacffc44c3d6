"""Results files: Markdown tables built from trajectories and run metrics, stamped with how they were made."""

from __future__ import annotations

import time
from pathlib import Path

from hetcomp.data import Split
from hetcomp.ensemble import EnsembleConfig, EnsembleScorer, teacher_weights, trajectory_state_metrics
from hetcomp.metrics import evaluate_split
from hetcomp.paper.pages import paper_values
from hetcomp.provenance import dataset_slug, git_commit, machine
from hetcomp.runs.spec import teachers_digest, trajectory_digest
from hetcomp.runs.store import read_metrics
from hetcomp.teachers import top_overlap

METRICS = ("recall@10", "ndcg@10", "recall@50", "ndcg@50")
#: (decay, its parameter, teacher-weight power; 0 = uniform as released)
ENSEMBLE_GRID = (("exp", 10.0, 0), ("exp", 50.0, 0), ("exp", 100.0, 0), ("power", 0.05, 0),
                 ("exp", 50.0, 1), ("exp", 50.0, 2), ("exp", 50.0, 4), ("exp", 50.0, 8), ("exp", 50.0, 16))


def _cells(metrics: dict) -> str:
    return " | ".join(f"{metrics[key]:.4f}" for key in METRICS)


def stamp(command: str, seed: int) -> list[str]:
    return [f"- command: `{command}`",
            f"- seed: split {seed}; each run's training seed ends its name (<student>-<method>-<dim>-<seed>)",
            f"- commit: {git_commit()}",
            f"- machine: {machine()}", f"- written: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]


#: the columns of a teachers page's table of converged teachers (:func:`teachers_report` writes them,
#: :func:`committed_teacher_digests` finds the teacher, threads and digest cells by these names)
TEACHER_COLUMNS = ("teacher", "params", "state epochs E1–E4", "train s", "eval s", "test R@10", "N@10", "R@50",
                   "N@50", "test R@50 at E1 / E2 / E3 / E4", "threads", "digest")


def committed_teacher_digests(dataset: str, results_dir: Path = Path("experiments/results")
                              ) -> tuple[Path, dict[str, tuple[str, str]]]:
    """The teachers page of ``dataset`` (``<results_dir>/teachers-<dataset>.md``, relative to the working
    directory as ``experiments/runs`` is) and, per teacher on it, (digest, threads); {} where there is none.

    Every table with teacher, threads and digest columns counts, a later row overriding an earlier one: a table in
    the page's hand-written notes names the teachers that the studies and tables use where the generated table
    shows an older set (Foursquare's)."""
    page = Path(results_dir) / f"teachers-{dataset_slug(dataset)}.md"
    if not page.is_file():
        return page, {}
    found: dict[str, tuple[str, str]] = {}
    columns: list[str] | None = None  # the header of the table being read, where it names what is needed
    for line in page.read_text(errors="replace").splitlines():
        if not line.startswith("|"):
            columns = None
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if {"teacher", "threads", "digest"} <= set(cells):
            columns = cells
        elif columns and len(cells) == len(columns) and set(cells[0]) - set("-: "):
            row = dict(zip(columns, cells, strict=True))
            found[row["teacher"]] = (row["digest"], row["threads"])
    return page, found


def teachers_report(split: Split, trajectories: list, command: str, train_command: str = "") -> str:
    """The teachers results page: per-teacher metrics and states, the ensemble, the g decay study, checks."""
    lines = [f"# Teachers on {split.meta['dataset']} (authors' split, seed {split.meta['seed']})", ""]
    lines += stamp(command, split.meta["seed"])
    if train_command:
        lines.append(f"- teachers trained by: `{train_command}`")
    machines = sorted({t.meta["machine"] for t in trajectories if t.meta.get("machine")})
    if machines:  # the command alone does not say which kernels ran (e.g. held at AVX2, MKL as on AMD)
        unrecorded = [t.name for t in trajectories if not t.meta.get("machine")]
        lines.append(f"- teachers trained on: {' ; '.join(machines)}"
                     + (f" ({', '.join(unrecorded)}: not recorded)" if unrecorded else ""))
    lines += ["", "## Converged teachers (E4) and their trajectories", "",
              "| " + " | ".join(TEACHER_COLUMNS) + " |", "|" + "---|" * len(TEACHER_COLUMNS)]
    state_metrics = {}
    for trajectory in trajectories:
        metrics = [trajectory_state_metrics(split, trajectory, s) for s in range(trajectory.n_states)]
        state_metrics[trajectory.name] = metrics
        meta = trajectory.meta
        per_state = " / ".join(f"{m['test']['recall@50']:.4f}" for m in metrics)
        lines.append(f"| {trajectory.name} | {meta.get('n_parameters', '-'):,} | {meta.get('state_epochs')} | "
                     f"{meta.get('train_seconds', '-')} | {meta.get('eval_seconds', '-')} | "
                     f"{_cells(metrics[-1]['test'])} | {per_state} | {meta.get('threads', '-')} | "
                     f"{trajectory_digest(trajectory)[:12]} |")
    lines += ["", f"Teachers digest (these {len(trajectories)}, in this order): **{teachers_digest(trajectories)}**, "
              "the identity every student run and tuning summary records (`digest`: each trajectory's, over its "
              "settings and rankings). Retrained with the same thread count (`threads`; `train-teachers --threads`), "
              "a teacher gets the same digest; other digests make earlier runs stale."]
    study = []
    for decay, parameter, power in ENSEMBLE_GRID:
        weights = teacher_weights(split, trajectories, "valid", power) if power else None
        scorer = EnsembleScorer(trajectories, -1, decay, temperature=parameter, beta=parameter, weights=weights)
        study.append((decay, parameter, power, evaluate_split(scorer, split)))
    chosen = max(study, key=lambda row: row[3]["valid"]["recall@50"])
    config = EnsembleConfig()
    default = next(row for row in study if row[:3] == (config.decay, config.temperature, config.weight_power))
    lines += ["", f"Ensemble (g = {config.decay}, T = {config.temperature:g}, teacher weights (valid R@50 / mean)^"
              f"{config.weight_power:g}, all teachers at E4): test "
              f"R@10 {default[3]['test']['recall@10']:.4f}, N@10 {default[3]['test']['ndcg@10']:.4f}, "
              f"R@50 {default[3]['test']['recall@50']:.4f}, N@50 {default[3]['test']['ndcg@50']:.4f}.", "",
              "## The aggregation g, chosen on validation", "",
              "| decay | parameter | teacher weights | valid R@50 | valid N@50 | test R@10 | test N@10 | test R@50 | "
              "test N@50 |", "|---|---|---|---|---|---|---|---|---|"]
    for decay, parameter, power, result in study:
        label = "exp(−r/T)" if decay == "exp" else "(r+1)^−β"
        weighting = f"(valid R@50 / mean)^{power}" if power else "uniform"
        lines.append(f"| {label} | {parameter:g} | {weighting} | {result['valid']['recall@50']:.4f} | "
                     f"{result['valid']['ndcg@50']:.4f} | {_cells(result['test'])} |")
    lines += ["", f"Best on validation R@50: {chosen[0]} {chosen[1]:g}, weight power {chosen[2]}. The toolkit's "
              "default (used by every student) is exp, T = 50, weight power 8. The released code sums the teachers "
              "uniformly (weight power 0 here). Our teachers are unbalanced: the item autoencoder alone is about as "
              "good as the uniform ensemble, so weighting by validation recall is what lets g beat every teacher."]
    best_name = max(state_metrics, key=lambda name: state_metrics[name][-1]["test"]["recall@50"])
    best = state_metrics[best_name][-1]["test"]
    ensemble = default[3]["test"]
    overlap = top_overlap(trajectories, 50)
    checks = []
    if split.meta["dataset"] == "citeulike":  # the teacher targets set for the authors' CiteULike split
        checks += [("every teacher test R@50 ≥ 0.20",
                    all(m[-1]["test"]["recall@50"] >= 0.20 for m in state_metrics.values())),
                   (f"best teacher ({best_name}) test R@50 ≥ 0.26", best["recall@50"] >= 0.26)]
    checks += [
        ("ensemble above the best teacher on R@50 and N@50",
         ensemble["recall@50"] > best["recall@50"] and ensemble["ndcg@50"] > best["ndcg@50"]),
        ("E1 < E4 on test R@50 for every teacher",
         all(m[0]["test"]["recall@50"] < m[-1]["test"]["recall@50"] for m in state_metrics.values())),
        ("E1..E4 are four different epochs for every teacher",
         all(len(set(t.meta.get("state_epochs") or [])) == t.n_states for t in trajectories)),
    ]
    lines += ["", "## Heterogeneity", "",
              f"Mean pairwise overlap of the converged teachers' top-50 lists (|A ∩ B| / 50, averaged over users "
              f"and the {len(trajectories) * (len(trajectories) - 1) // 2} teacher pairs): **{overlap:.3f}**.", "",
              "## Checks", ""]
    lines += [f"- [{'x' if ok else ' '}] {text}" for text, ok in checks]
    paper = paper_values(split.meta["dataset"])
    if ("", "Best Teacher") in paper:
        shown = {label: paper[("", label)] for label in ("Best Teacher", "Ensemble")}
        lines += ["", f"Paper (for comparison only, {split.meta['dataset']}, its own cut of the data): best "
                  f"teacher R@50 {shown['Best Teacher']['recall@50']:.4f} / N@50 "
                  f"{shown['Best Teacher']['ndcg@50']:.4f}, Ensemble {shown['Ensemble']['recall@50']:.4f} / "
                  f"{shown['Ensemble']['ndcg@50']:.4f}."]
    return "\n".join(lines) + "\n"


def collect_runs(runs_dir, dataset: str) -> list[dict]:
    """Every finished run (its metrics.json) of a dataset."""
    from pathlib import Path

    folder = Path(runs_dir) / dataset_slug(dataset)
    runs = []
    for path in sorted(folder.glob("*/metrics.json")):
        run = read_metrics(path)
        run["run"] = path.parent.name
        runs.append(run)
    return runs


def _is_default(run: dict) -> bool:
    """A run with every setting at its default: its command line names nothing after ``--seed`` (a run
    specification's command spells out only what differs from the defaults), or, for runs written before run
    specifications, its folder name carries no settings hash."""
    if "identity" in run:
        command = run.get("command", "")
        return "--split-seed" not in command and command.endswith(f"--seed {run['seed']}")
    return run["run"] == f"{run['student']}-{run['method']}-{run['dim']}-{run['seed']}"


def _stopped_by(run: dict) -> str:
    # runs written before the field existed all had the 1,000-epoch cap
    return run.get("stopped_by") or ("early stopping" if run["epochs"] < run.get("max_epochs", 1000) else "max_epochs")


def runs_report(split: Split, runs: list[dict], ensemble_test: dict, command: str) -> str:
    """The distillation results page: every run's test metrics, cost, and HetComp's knowledge schedule."""
    lines = [f"# Students on {split.meta['dataset']} (authors' split)", ""]
    lines += stamp(command, split.meta["seed"])
    lines += ["", f"Ensemble (all teachers at E4) test: {_cells(ensemble_test)} (R@10 | N@10 | R@50 | N@50).", "",
              "| run | test R@10 | N@10 | R@50 | N@50 | R@50 / ens. | N@50 / ens. | "
              "best epoch | epochs (stopped by) | s / epoch | wall s | command |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        test = run["test"]
        lines.append(f"| {run['run']} | {_cells(test)} | "
                     f"{test['recall@50'] / ensemble_test['recall@50']:.3f} | "
                     f"{test['ndcg@50'] / ensemble_test['ndcg@50']:.3f} | {run['best_epoch']} | {run['epochs']} "
                     f"({_stopped_by(run)}) | "
                     f"{run['seconds_per_epoch']} | {run['wall_seconds']} | `{run['command']}` |")
    # the reference is the default-settings w/o KD run of the same student, dim and seed
    baselines = {(r["student"], r["dim"], r["seed"]): r for r in runs if r["method"] == "none" and _is_default(r)}
    comparisons = []
    for run in runs:
        base = baselines.get((run["student"], run["dim"], run["seed"]))
        if run["method"] != "none" and base is not None:
            comparisons.append(
                f"- {run['run']} vs {base['run']}: R@50 × {run['test']['recall@50'] / base['test']['recall@50']:.2f}, "
                f"N@50 × {run['test']['ndcg@50'] / base['test']['ndcg@50']:.2f}")
    if comparisons:
        lines += ["", "## Gain over the same student without KD", "", *comparisons]
    for run in runs:
        log = run.get("dkc_log")
        if not log:
            continue
        final = next((entry["epoch"] for entry in log if all(s == 4.0 for s in entry["mean_state"])), None)
        lines += ["", f"## DKC schedule: {run['run']}", "",
                  f"Teachers: {', '.join(run['teachers'])}. Every user at E4 for every teacher (L_O → L_F) at epoch "
                  f"{final if final is not None else 'never (training ended first)'}.", "",
                  "| epoch | users x teachers moved | forced by the deadline | mean state per teacher | "
                  "mean γ of open states |", "|---|---|---|---|---|"]
        for entry in log:
            gamma = "-" if entry["mean_gamma"] is None else f"{entry['mean_gamma']:.3f}"
            lines.append(f"| {entry['epoch']} | {entry['moved']} | {entry.get('forced', 0)} | {entry['mean_state']} | "
                         f"{gamma} |")
        lines += ["", "Test R@50 every 10 epochs: " + ", ".join(f"{p['epoch']}: {p['test_recall@50']:.4f}"
                                                             for p in run["curve"])]
    return "\n".join(lines) + "\n"
