"""``hetcomp tune``: choose a method's settings on validation with an Optuna study (the library does the work)."""

from __future__ import annotations

from pathlib import Path

import typer

from hetcomp.cli.common import (
    CacheDirOption,
    DataDirOption,
    DatasetHelp,
    ItemColOption,
    PathOption,
    ProgressCallback,
    SepOption,
    TeachersDirOption,
    UserColOption,
    _imported,
    _parse_names,
    _parse_options,
    _source,
    app,
    console,
    friendly_errors,
    load_split,
    make_progress,
)
from hetcomp.config import check_option, parse_options
from hetcomp.device import resolve_device
from hetcomp.distill import METHODS, method_class
from hetcomp.runs import RunStore
from hetcomp.runs.spec import DEFAULT_MAX_EPOCHS
from hetcomp.runs.tuned import TUNING_ROOT, summary_path
from hetcomp.teachers import TEACHERS, load_teachers


class _EpochBar(ProgressCallback):
    """The epochs of the current trial: one bar, added again for each trial once the last one removed it."""

    def on_fit_start(self, trainer) -> None:
        if self.task not in self.progress.task_ids:
            self.task = self.progress.add_task(self.label, total=trainer.config.max_epochs)
        super().on_fit_start(trainer)


@app.command("tune")
@friendly_errors
def tune_command(
    dataset: str = typer.Option("citeulike", help=DatasetHelp),
    student: str = typer.Option("mf", help="Student model."),
    method: str = typer.Option("hetcomp", help=f"Distillation method: {', '.join(METHODS)}."),
    dim: int = typer.Option(6, help="Student embedding size."),
    trials: int = typer.Option(16, help="The study's budget: trials in all (complete or pruned); rerunning the "
                                        "command resumes an interrupted study up to it."),
    storage: str = typer.Option(None, help="Optuna RDB URL of the study, e.g. postgresql://user@host/db to share "
                                           "it between machines (default: an SQLite file beside the summary)."),
    study_name: str = typer.Option(None, help="Study name (default: <dataset>-<student>-<method>-<dim>)."),
    knobs: str = typer.Option(None, help="Comma-separated knobs to search (default: the method's whole declared "
                                         "space, lr and weight_decay included)."),
    option: list[str] = typer.Option([], "--option", "-o", help="Fix a method option NAME=VALUE (repeatable)."),
    teachers: str = typer.Option(",".join(TEACHERS), help="Comma-separated teachers to distil from."),
    max_epochs: int = typer.Option(DEFAULT_MAX_EPOCHS, help="Upper bound on each trial's epochs."),
    seed: int = typer.Option(0, help="Seed of every trial's run and of the sampler."),
    split_seed: int = typer.Option(0, help="Split seed; the teachers must have been trained on the same split."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
    runs_dir: Path = typer.Option(Path("experiments/tuning-runs"), help="Where the trials' run folders go."),
    tuning_dir: Path = typer.Option(TUNING_ROOT, help="Where the summary (the chosen settings) is written."),
) -> None:
    """Search a method's declared space on validation R@50 (test data is never read); write the chosen settings,
    which `distill` and `reproduce` then use by default."""
    import optuna

    from hetcomp.tune import open_storage, search_space, tune

    fixed = parse_options(method_class(method).config_class, _parse_options(option))
    knob_names = [k.strip() for k in knobs.split(",") if k.strip()] if knobs is not None else None
    search_space(method, knob_names, fixed)  # an unknown knob or an empty space fails before any data is read
    if storage is not None:
        open_storage(storage)
    for name, value, example in (("--dim", dim, 6), ("--trials", trials, 16), ("--max-epochs", max_epochs, 300),
                                 ("--seed", seed, 0), ("--split-seed", split_seed, 0)):
        check_option(name, value, example, ge=0 if "seed" in name else 1)
    split = load_split(dataset, split_seed, path, user_col, item_col, sep, data_dir, cache_dir)
    known = TEACHERS + _imported(teachers_dir, split)
    trajectories = load_teachers(split, teachers_dir, _parse_names(teachers, known, "teacher"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with make_progress() as progress:
        bar = progress.add_task(f"{student}-{method} trials", total=trials)
        epochs = _EpochBar(progress, "  trial", max_epochs, verbose=False)

        def on_trial(trial) -> None:
            value = f"valid R@50 {trial.value:.4f}" if trial.value is not None else trial.state.name.lower()
            progress.console.print(f"trial {trial.number}: {value}  {trial.params}", highlight=False)
            progress.advance(bar)

        summary = tune(split, trajectories, student, method, dim, trials, storage, study_name,
                       RunStore(runs_dir), seed, max_epochs, knobs=knob_names, fixed=fixed,
                       device=resolve_device(device), callbacks=[epochs], on_trial=on_trial,
                       source=_source(dataset, path, user_col, item_col, sep), root=tuning_dir)
    counts = summary["trials"]
    console.print(f"{summary['study_name']}: {counts['complete']} complete, {counts['pruned']} pruned, "
                  f"{counts['failed']} failed of {trials}; best valid R@50 {summary['best_value']} "
                  f"with {summary['settings']}")
    if counts["complete"] + counts["pruned"] >= trials:
        console.print(f"chosen settings: {summary_path(split.meta['dataset'], student, method, dim, tuning_dir)}")
