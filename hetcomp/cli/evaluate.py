"""``hetcomp evaluate`` and ``hetcomp summarize``: the teachers' and the finished runs' figures, as tables and pages."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from hetcomp.cli.common import (
    BetaOption,
    CacheDirOption,
    DataDirOption,
    DatasetHelp,
    DecayOption,
    ItemColOption,
    PathOption,
    SepOption,
    TeachersDirOption,
    TemperatureOption,
    UserColOption,
    WeightingOption,
    WeightPowerOption,
    _ensemble,
    _imported,
    _parse_names,
    app,
    console,
    friendly_errors,
    load_split,
)
from hetcomp.config import check_option
from hetcomp.distill import EnsembleConfig
from hetcomp.ensemble import trajectory_state_metrics
from hetcomp.errors import HetCompError
from hetcomp.metrics import evaluate_split
from hetcomp.teachers import TEACHERS, load_teachers, top_overlap


@app.command("evaluate")
@friendly_errors
def evaluate_command(
    dataset: str = typer.Option("citeulike", help=DatasetHelp),
    teachers: bool = typer.Option(True, "--teachers", help="Report the teachers, their states and the ensemble."),
    names: str = typer.Option(",".join(TEACHERS), "--names", help="Comma-separated teachers to report."),
    seed: int = typer.Option(0, help="Split seed."),
    decay: str = DecayOption, temperature: float = TemperatureOption, weighting: str = WeightingOption,
    weight_power: float = WeightPowerOption, beta: float = BetaOption,
    write: Path = typer.Option(None, help="Also write a results page (Markdown) here, e.g. "
                                          "experiments/results/teachers-citeulike.md."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
) -> None:
    """Print R@10/N@10/R@50/N@50 on valid and test of each teacher, each of its states, and the ensemble."""
    check_option("--seed", seed, 0, ge=0)
    config = _ensemble(decay, temperature, weighting, weight_power, beta)
    split = load_split(dataset, seed, path, user_col, item_col, sep, data_dir, cache_dir)
    trajectories = load_teachers(split, teachers_dir, _parse_names(names, TEACHERS + _imported(teachers_dir, split),
                                                                   "teacher"))
    table = Table(title=f"teachers on {split.meta['dataset']} (seed {seed})")
    for column in ("model", "state", "epoch", *(f"{p} {m}" for p in ("valid", "test")
                                               for m in ("R@10", "N@10", "R@50", "N@50"))):
        table.add_column(column, justify="right")

    def row(name: str, state: str, epoch: str, metrics: dict) -> None:
        cells = [f"{metrics[p][k]:.4f}" for p in ("valid", "test") for k in ("recall@10", "ndcg@10", "recall@50",
                                                                             "ndcg@50")]
        table.add_row(name, state, epoch, *cells)

    for trajectory in trajectories:
        epochs = trajectory.meta.get("state_epochs") or []
        for state in range(trajectory.n_states):
            metrics = trajectory_state_metrics(split, trajectory, state)
            row(trajectory.name, f"E{state + 1}", str(epochs[state]) if state < len(epochs) else "-", metrics)
    ensemble = evaluate_split(config.scorer(split, trajectories), split)
    row("ensemble", "E4", "-", ensemble)
    console.print(table)
    console.print(f"mean pairwise top-50 overlap of the converged teachers: {top_overlap(trajectories):.3f}")
    if write is not None:
        from hetcomp.experiments import teachers_report

        sources = {t.meta.get("source", "") for t in trajectories}
        page = teachers_report(split, trajectories, "hetcomp " + " ".join(sys.argv[1:]), " ; ".join(sorted(sources)))
        notes = write.with_name(f"{write.stem}-notes.md")  # measurements written by hand survive a regeneration
        kept = notes.is_file()
        if kept:
            page = (f"{page.rstrip()}\n\n## Notes (written by hand in `{notes.name}`, kept when this page is "
                    f"regenerated)\n\n{notes.read_text().strip()}\n")
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(page)
        console.print(f"wrote {write}" + (f" with the notes of {notes.name}" if kept else ""))


@app.command("summarize")
@friendly_errors
def summarize_command(
    dataset: str = typer.Option("citeulike", help=DatasetHelp),
    seed: int = typer.Option(0, help="Split seed."),
    write: Path = typer.Option(..., help="The results page to write, e.g. experiments/results/hetcomp-citeulike.md."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
    runs_dir: Path = typer.Option(Path("experiments/runs"), help="Where run folders are."),
) -> None:
    """Write a results page from every finished distillation run of a dataset."""
    from hetcomp.experiments import collect_runs, runs_report

    check_option("--seed", seed, 0, ge=0)
    split = load_split(dataset, seed, path, user_col, item_col, sep, data_dir, cache_dir)
    runs = collect_runs(runs_dir, split.meta["dataset"])
    if not runs:
        raise HetCompError(f"no finished runs under {runs_dir / split.meta['dataset']}; run `hetcomp distill` first")
    trajectories = load_teachers(split, teachers_dir, runs[0]["teachers"])
    # runs written before teacher weighting existed used the uniform g
    config = EnsembleConfig(**{"weighting": "uniform", "weight_power": 0, **runs[0]["ensemble"]})
    ensemble = evaluate_split(config.scorer(split, trajectories), split)["test"]
    write.parent.mkdir(parents=True, exist_ok=True)
    write.write_text(runs_report(split, runs, ensemble, "hetcomp " + " ".join(sys.argv[1:])))
    console.print(f"wrote {write} ({len(runs)} runs)")
