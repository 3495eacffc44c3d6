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
    _grid_inputs,
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
from hetcomp.errors import HetCompError
from hetcomp.models import MODELS
from hetcomp.runs import RunStore
from hetcomp.runs.spec import DEFAULT_MAX_EPOCHS
from hetcomp.runs.tuned import TUNING_ROOT, TUNING_RUNS_ROOT, summary_path
from hetcomp.teachers import TEACHERS, load_teachers
from hetcomp.tune_plan import parse_budgets


class _EpochBar(ProgressCallback):
    """The epochs of the current trial: one bar, added again for each trial once the last one removed it. Where the
    output is not a terminal (a log of a study run in the background), each evaluation is a line instead."""

    def on_fit_start(self, trainer) -> None:
        if self.task not in self.progress.task_ids:
            self.task = self.progress.add_task(self.label, total=trainer.config.max_epochs)
        super().on_fit_start(trainer)

    def on_evaluate(self, trainer, epoch: int, result: dict, improved: bool) -> None:
        super().on_evaluate(trainer, epoch, result, improved)
        if not self.progress.console.is_terminal:
            self.print_evaluation(trainer, epoch, result["valid"][trainer.config.monitor], improved)


def parse_methods(text: str) -> list[str]:
    """``--method``: names, comma-separated, or ``all``, every registered method (Table 2's slow CL-DRD too)."""
    return list(METHODS) if text.strip() == "all" else _parse_names(text, list(METHODS), "method")


@app.command("tune")
@friendly_errors
def tune_command(
    dataset: str = typer.Option("citeulike", help=DatasetHelp),
    student: str = typer.Option("mf", help="Student model, or several comma-separated (one study each)."),
    method: str = typer.Option("hetcomp", help=f"Distillation method: {', '.join(METHODS)}; several "
                                                "comma-separated, or all (one study each)."),
    dim: int = typer.Option(6, help="Student embedding size."),
    trials: str = typer.Option("16", help="Each study's budget: trials in all (complete or pruned), one number "
                                          "for every study or one per student, e.g. mf=16,ml=8,dnn=8; rerunning "
                                          "the command resumes an interrupted study up to it."),
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
    runs_dir: Path = typer.Option(TUNING_RUNS_ROOT, help="Where the trials' run folders go."),
    tuning_dir: Path = typer.Option(TUNING_ROOT, help="Where the summary (the chosen settings) is written."),
    jobs: int = typer.Option(1, help="Run this many studies at once, as Ray tasks on a local cluster of this many "
                                     "CPUs (each with cores/jobs threads; local processes where Ray is not "
                                     "installed)."),
    threads: int = typer.Option(None, help="Torch threads of each study's runs (default: torch's, one per core; "
                                           "as tasks, the machine's cores / --jobs); lower it when other work "
                                           "or another worker of the study shares the machine."),
    ray_address: str = typer.Option(None, "--ray-address", help="Send the studies to an existing Ray cluster "
                                    "(auto, ray://HOST:PORT); every node must see the data, --teachers-dir, "
                                    "--runs-dir and --tuning-dir."),
) -> None:
    """Search a method's declared space on validation R@50 (test data is never read); write the chosen settings,
    which `distill` and `reproduce` then use by default."""
    import optuna

    from hetcomp.tune import open_storage, search_space, tune

    students = _parse_names(student, list(MODELS), "student")
    methods = parse_methods(method)
    budgets = parse_budgets(trials, students)
    check_option("--jobs", jobs, 2, ge=1)
    if threads is not None:
        check_option("--threads", threads, 1, ge=1)
    if len(students) * len(methods) > 1 or jobs > 1 or ray_address is not None:
        if storage is not None or study_name is not None or knobs is not None or option:
            raise HetCompError("--storage, --study-name, --knobs and -o set one study: give one --student and "
                               "one --method (and no --jobs / --ray-address) with them")
        _tune_plan(students, methods, dataset, dim, budgets, teachers, max_epochs, seed, split_seed, device, path,
                   user_col, item_col, sep, data_dir, cache_dir, teachers_dir, runs_dir, tuning_dir, jobs,
                   ray_address, threads)
        return
    student, method = students[0], methods[0]
    trials = budgets[student]
    if threads is not None:  # one study in this process: its runs train with this many threads
        import torch

        torch.set_num_threads(threads)
    fixed = parse_options(method_class(method).config_class, _parse_options(option))
    knob_names = [k.strip() for k in knobs.split(",") if k.strip()] if knobs is not None else None
    search_space(method, knob_names, fixed)  # an unknown knob or an empty space fails before any data is read
    if storage is not None:
        open_storage(storage)
    for name, value, example in (("--dim", dim, 6), ("--max-epochs", max_epochs, 300), ("--seed", seed, 0),
                                 ("--split-seed", split_seed, 0)):
        check_option(name, value, example, ge=0 if "seed" in name else 1)
    split = load_split(dataset, split_seed, path, user_col, item_col, sep, data_dir, cache_dir)
    known = TEACHERS + _imported(teachers_dir, split)
    names = _parse_names(teachers, known, "teacher")
    # w/o KD learns from the data alone: its study needs no trained teachers
    trajectories = load_teachers(split, teachers_dir, names) if method_class(method).reads_teachers else []
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
                  f"{counts['failed']} failed of {trials}; {_outcome(summary)}")
    if counts["complete"] + counts["pruned"] >= trials:
        console.print(f"chosen settings: {summary_path(split.meta['dataset'], student, method, dim, tuning_dir)}")


def _outcome(summary: dict) -> str:
    """One line: the study's best value and its chosen settings, or the special case's whose choice it took."""
    line = f"best valid R@50 {summary['best_value']}"
    source = summary.get("chosen_from")
    if source:
        return (f"{line}; chosen: {source['method']}'s settings (valid R@50 {source['value']}), at which "
                f"{summary['method']} trains exactly as {source['method']}: {summary['settings']}")
    return f"{line} with {summary['settings']}"


def _tune_plan(students: list[str], methods: list[str], dataset: str, dim: int, budgets: dict[str, int], teachers: str,
               max_epochs: int, seed: int, split_seed: int, device: str, path: Path | None, user_col: str,
               item_col: str, sep: str, data_dir: Path | None, cache_dir: Path | None, teachers_dir: Path,
               runs_dir: Path, tuning_dir: Path, jobs: int, ray_address: str | None, threads: int | None) -> None:
    """Every (student, method) study as a Ray task or a local process (:mod:`hetcomp.tune_plan`); each resumes
    where it stopped."""
    from hetcomp.tune import search_space
    from hetcomp.tune_plan import StudyPlan, latest_trial, run_studies

    for name, value, example in (("--dim", dim, 6), ("--max-epochs", max_epochs, 300), ("--seed", seed, 0),
                                 ("--split-seed", split_seed, 0)):
        check_option(name, value, example, ge=0 if "seed" in name else 1)
    for method in methods:
        search_space(method)
    split = load_split(dataset, split_seed, path, user_col, item_col, sep, data_dir, cache_dir)
    names = _parse_names(teachers, TEACHERS + _imported(teachers_dir, split), "teacher")
    reading = {m: method_class(m).reads_teachers for m in methods}  # w/o KD's studies need no teachers
    if any(reading.values()):
        load_teachers(split, teachers_dir, names)  # missing or stale teachers fail here, not in every task
    inputs = _grid_inputs(dataset, path, user_col, item_col, sep, data_dir, cache_dir, teachers_dir, device,
                          split_seed)
    plans = [StudyPlan(s, m, dim, budgets[s], tuple(names) if reading[m] else (), seed, max_epochs)
             for s in students for m in methods]
    budget_of = {plan.label: plan.trials for plan in plans}
    plan_of = {plan.label: plan for plan in plans}
    failed = []
    with make_progress() as progress:
        bar = progress.add_task(f"{len(plans)} studies, trials", total=sum(budget_of.values()))

        def done(plan: StudyPlan, summary: dict | None, message: str | None) -> None:
            if summary is None:
                failed.append(plan.label)
                progress.console.print(f"FAILED {plan.label}: {message}", highlight=False)
                return
            progress.console.print(f"{plan.label}: {_outcome(summary)}", highlight=False)

        shown: dict[str, int] = {}

        def advanced(counts: dict[str, int]) -> None:  # a line per new trial: logs of background runs show them
            for label, count in counts.items():
                if count > shown.get(label, 0):
                    latest = latest_trial(split.meta["dataset"], plan_of[label], tuning_dir)
                    progress.console.print(f"{label}: {count}/{budget_of[label]} trials finished"
                                           + (f"; {latest}" if latest else ""), highlight=False)
                    shown[label] = count
            progress.update(bar, completed=sum(counts.values()))

        summaries = run_studies(plans, inputs, split.meta["dataset"], runs_dir, tuning_dir, jobs, ray_address,
                                threads=threads, source=_source(dataset, path, user_col, item_col, sep),
                                on_done=done, on_progress=advanced)
        progress.update(bar, completed=sum(s["trials"]["complete"] + s["trials"]["pruned"]
                                           for s in summaries.values()))
    if failed:
        raise HetCompError(f"{len(failed)} of {len(plans)} studies failed ({', '.join(failed)}); rerun the same "
                           "command to resume them")
