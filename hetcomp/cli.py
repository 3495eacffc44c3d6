"""The ``hetcomp`` command line: thin typer commands over the library."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hetcomp.config import check_choice, check_option, check_value, parse_options
from hetcomp.data import REGISTRY, DataError, load_dataset, resolve_data_dir
from hetcomp.data.registry import locate_files
from hetcomp.device import resolve_device, seed_everything
from hetcomp.distill import METHODS, EnsembleConfig, method_class
from hetcomp.ensemble import DECAYS, trajectory_state_metrics
from hetcomp.errors import HetCompError
from hetcomp.metrics import evaluate_split
from hetcomp.models import model_config
from hetcomp.paper.common import TABLE2_METHODS
from hetcomp.provenance import dataset_slug
from hetcomp.runs import distill
from hetcomp.teachers import (
    TEACHERS,
    TRAJECTORY_FILE,
    check_teacher_name,
    dataset_teacher_settings,
    load_teachers,
    seeded_name,
    shares_state_epochs,
    top_overlap,
    train_teacher,
    trajectory_file,
)
from hetcomp.train import Callback
from hetcomp.trajectory import import_rankings, load_trajectory

app = typer.Typer(help="HetComp: distil heterogeneous recommenders into one small student.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
datasets_app = typer.Typer(help="List the registered datasets and inspect their splits.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
console = Console()
#: g's defaults, read by the options of every command that builds an ensemble
DEFAULT_ENSEMBLE = EnsembleConfig()

DataDirOption = typer.Option(None, "--data-dir",
                             help="Folder with the raw files (default: $HETCOMP_DATA or ./datasets).")
CacheDirOption = typer.Option(None, "--cache-dir",
                              help="Folder for cached splits (default: $HETCOMP_CACHE or ./datasets/cache).")


def friendly_errors(command):
    """Print toolkit errors as one clear message and exit 1, instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except HetCompError as error:
            # the message as written: not read as markup ([...]) or emoji codes (:x: in "-o losses=kl:x")
            console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True, emoji=False)
            raise typer.Exit(1) from None

    return wrapper


@datasets_app.command("list")
@friendly_errors
def datasets_list(data_dir: Path = DataDirOption) -> None:
    """Show every registered dataset, its source and whether its files are present locally."""
    folder = resolve_data_dir(data_dir)
    table = Table(title=f"datasets (data directory: {folder})")
    for column in ("name", "source", "files", "present"):
        table.add_column(column, overflow="fold")
    for spec in REGISTRY.values():
        try:
            layout, _ = locate_files(spec, folder, download=False)
            present, files = "yes", " + ".join(f.name for f in layout.files)
        except DataError as error:
            present = "checksum mismatch" if "sha256" in str(error) else "no"
            files = " + ".join(f.name for f in spec.layouts[0].files)
        table.add_row(spec.name, spec.source + (f" ({spec.notes})" if spec.notes else ""), files, present)
    table.add_row("recbole", "any RecBole atomic .inter file (--path)", "<file>.inter", "-")
    table.add_row("csv", "any delimited file with user/item columns (--path, --user-col, --item-col)", "<file>", "-")
    console.print(table)


@datasets_app.command("info")
@friendly_errors
def datasets_info(
    name: str = typer.Argument(..., help="Registered dataset name, or 'recbole' / 'csv' with --path."),
    seed: int = typer.Option(0, help="Split seed."),
    protocol: str = typer.Option("authors", help="Split protocol: authors, random or leave-last-out."),
    path: Path = typer.Option(None, help="The file, for the recbole and csv formats."),
    user_col: str = typer.Option("user_id", help="csv: the user column."),
    item_col: str = typer.Option("item_id", help="csv: the item column."),
    sep: str = typer.Option(",", help="csv: the delimiter."),
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
) -> None:
    """Print users, items and interactions of train / valid / test, density and the file checksum."""
    check_option("--seed", seed, 0, ge=0)
    sep = _separator(sep)
    started = time.perf_counter()
    split = load_dataset(name, data_dir=data_dir, seed=seed, protocol=protocol, cache_dir=cache_dir, path=path,
                         user_col=user_col, item_col=item_col, sep=sep)
    elapsed = time.perf_counter() - started
    stats = split.stats()
    table = Table(title=f"{split.meta['dataset']} — {protocol} split, seed {seed}")
    for column in ("part", "users", "items", "interactions", "density"):
        table.add_column(column, justify="right")
    for part in ("train", "valid", "test"):
        row = stats[part]
        table.add_row(part, f"{row['users']:,}", f"{stats['items']:,}", f"{row['interactions']:,}",
                      f"{row['density']:.6f}")
    table.add_row("all", f"{stats['users']:,}", f"{stats['items']:,}", f"{stats['interactions']:,}",
                  f"{stats['density']:.6f}")
    console.print(table)
    console.print(f"file sha256:  {split.meta['checksum']}")
    console.print(f"split sha256: {split.digest()}")
    console.print(f"fingerprint:  {split.fingerprint}   (loaded in {elapsed:.2f} s)")


TeachersDirOption = typer.Option(Path("teachers"), "--teachers-dir", help="Where teacher trajectories live.")
DatasetHelp = "Registered dataset name, or csv / recbole with --path."
PathOption = typer.Option(None, "--path", help="The file, for the csv and recbole formats.")
UserColOption = typer.Option("user_id", "--user-col", help="csv: the user column.")
ItemColOption = typer.Option("item_id", "--item-col", help="csv: the item column.")
SepOption = typer.Option(",", "--sep", help="csv: the delimiter.")


def load_split(dataset: str, seed: int, path: Path | None, user_col: str, item_col: str, sep: str,
               data_dir: Path | None, cache_dir: Path | None):
    """The split of a registered dataset, or of a csv / recbole file (``--path`` and its columns and delimiter):
    what every command that takes ``--dataset`` reads (the options above declare the file's part)."""
    return load_dataset(dataset, data_dir=data_dir, seed=seed, cache_dir=cache_dir, path=path, user_col=user_col,
                        item_col=item_col, sep=_separator(sep))


def _source(dataset: str, path: Path | None, user_col: str, item_col: str, sep: str) -> dict:
    """How a run's command line names its data (a run specification's ``source``)."""
    if path is None:
        return {"dataset": dataset}
    return {"dataset": dataset, "path": str(path), "user_col": user_col, "item_col": item_col, "sep": sep}


class ProgressCallback(Callback):
    """A rich progress bar over epochs, with the latest validation result in its description."""

    def __init__(self, progress: Progress, label: str, max_epochs: int, verbose: bool = True) -> None:
        self.progress = progress
        self.label = label
        self.verbose = verbose
        self.task = progress.add_task(label, total=max_epochs)

    def on_fit_start(self, trainer) -> None:
        self.progress.update(self.task, completed=trainer.state.epoch, total=trainer.config.max_epochs)

    def on_epoch_end(self, trainer, epoch: int, loss: float) -> None:
        self.progress.update(self.task, completed=epoch)

    def on_evaluate(self, trainer, epoch: int, result: dict, improved: bool) -> None:
        valid = result["valid"][trainer.config.monitor]
        mark = "*" if improved else " "
        self.progress.update(self.task, description=f"{self.label} ep {epoch} valid R@50 {valid:.4f}{mark}")
        if not self.verbose:
            return
        extra = getattr(trainer.objective, "describe", lambda: "")()
        self.progress.console.print(f"{self.label} epoch {epoch:4d}  valid R@50 {valid:.4f}{mark}  "
                                    f"test R@50 {result['test']['recall@50']:.4f}  {extra}", highlight=False)

    def close(self) -> None:
        """Remove the bar (a reproduce shows one per run: finished or reused runs must not pile up)."""
        if self.task in self.progress.task_ids:
            self.progress.remove_task(self.task)

    def on_fit_end(self, trainer) -> None:
        if not self.verbose:
            self.close()
            return
        self.progress.update(self.task, completed=trainer.config.max_epochs,
                             description=f"{self.label} done (best epoch {trainer.state.best_epoch})")


def make_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@app.command("train-teachers")
@friendly_errors
def train_teachers(
    dataset: str = typer.Option("citeulike", help=DatasetHelp),
    teachers: str = typer.Option(",".join(TEACHERS), help="Comma-separated teacher models."),
    dim: int = typer.Option(64, help="Embedding size of every teacher."),
    seed: int = typer.Option(0, help="Split and training seed."),
    train_seed: int = typer.Option(None, help="Another training seed on the same split (default: --seed); such "
                                             "teachers are saved as <model>-s<seed>, e.g. mf-s1."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    top_m: int = typer.Option(200, help="Items kept per user and state in the trajectory."),
    eval_every: int = typer.Option(None, help="Evaluate and snapshot every N epochs (the trajectory's "
                                              "states are chosen among these); default: the dataset's "
                                              "setting, else each model's."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
) -> None:
    """Train the heterogeneous teachers and save each one's trajectory (E1..E4); finished ones are skipped."""
    check_option("--dim", dim, 64, ge=1)
    check_option("--seed", seed, 0, ge=0)
    check_option("--train-seed", train_seed, 1, ge=0)
    check_option("--top-m", top_m, 200, ge=1)
    check_option("--eval-every", eval_every, 10, ge=1)
    names = _parse_names(teachers, TEACHERS, "teacher")
    split = load_split(dataset, seed, path, user_col, item_col, sep, data_dir, cache_dir)
    target = resolve_device(device)
    command = "hetcomp " + " ".join(sys.argv[1:])
    train_seed = seed if train_seed is None else train_seed
    with make_progress() as progress:
        for model in names:
            name = seeded_name(model, train_seed, seed)
            path = trajectory_file(teachers_dir, split.meta["dataset"], name)
            if path.is_file():
                load_trajectory(path, split)
                progress.console.print(f"{name}: already complete at {path}, skipped (delete it to retrain)")
                continue
            seed_everything(train_seed)
            config = model_config(model, dim=dim)
            bar = ProgressCallback(progress, name, config.max_epochs)
            trajectory = train_teacher(split, model, teachers_dir, dim=dim, seed=train_seed, device=target,
                                       top_m=top_m, callbacks=[bar], command=command, name=name,
                                       **dataset_teacher_settings(dataset, eval_every))
            test = trajectory.meta["metrics"][-1]["test"]
            epochs = trajectory.meta["state_epochs"]
            progress.console.print(f"{name}: converged at epoch {trajectory.meta['converged_epoch']}, states at "
                                   f"{epochs}, test R@50 {test['recall@50']:.4f}, "
                                   f"{trajectory.meta['train_seconds']:.0f} s -> {path}")
            if shares_state_epochs(trajectory):
                progress.console.print(f"[yellow]warning[/]: {name}'s states share epochs {epochs}: it converged "
                                       "within a few evaluations; retrain it with a smaller --eval-every so that "
                                       "E1..E4 differ")


@app.command("distill")
@friendly_errors
def distill_command(
    dataset: str = typer.Option("citeulike", help=DatasetHelp),
    student: str = typer.Option("mf", help="Student model: mf, ml or dnn (any model name works)."),
    dim: int = typer.Option(6, help="Student embedding size."),
    method: str = typer.Option("hetcomp", help=f"Distillation method: {', '.join(METHODS)}."),
    seed: int = typer.Option(0, help="Training seed of the student (initialization, batches, sampling)."),
    split_seed: int = typer.Option(0, help="Split seed; the teachers must have been trained on the same split."),
    teachers: str = typer.Option(",".join(TEACHERS), help="Comma-separated teachers to distil from."),
    option: list[str] = typer.Option([], "--option", "-o",
                                     help="Method option NAME=VALUE (repeatable), e.g. -o preset=code."),
    kd_loss: str = typer.Option(None, "--kd-loss", help="For --method kd: weighted losses, e.g. "
                                "kl:1.0,pairwise_hinge:0.5 (ce, bce, l2, kl, pairwise_hinge, listwise)."),
    max_epochs: int = typer.Option(1000, help="Upper bound on epochs (early stopping usually ends sooner)."),
    eval_every: int = typer.Option(10, help="Evaluate on validation every N epochs (early stopping, DKC)."),
    patience: int = typer.Option(5, help="Stop after this many evaluations without a better validation R@50."),
    batch_users: int = typer.Option(64, help="Users per batch (each user once per epoch)."),
    lr: float = typer.Option(None, help="Adam learning rate of the student (default 1e-2 for KD methods, the "
                                        "model's own for --method none)."),
    weight_decay: float = typer.Option(None, help="Adam weight decay of the student (default 0 for KD methods, "
                                                  "the model's own for --method none)."),
    decay: str = typer.Option(DEFAULT_ENSEMBLE.decay, help="Rank decay of the aggregation g: exp or power."),
    temperature: float = typer.Option(DEFAULT_ENSEMBLE.temperature, help="T of the exp decay exp(-rank/T)."),
    weighting: str = typer.Option(DEFAULT_ENSEMBLE.weighting,
                                  help="Teacher weights in g: valid ((valid R@50/mean)^power) or uniform."),
    weight_power: float = typer.Option(DEFAULT_ENSEMBLE.weight_power, help="The power of the valid weighting."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
    runs_dir: Path = typer.Option(Path("experiments/runs"), help="Where run folders are written."),
) -> None:
    """Train a small student from the teachers' trajectories with HetComp or a baseline."""
    config_class = method_class(method).config_class
    options = parse_options(config_class, _parse_options(option))
    if kd_loss is not None:
        if method != "kd":
            raise HetCompError("--kd-loss applies to --method kd only")
        check_value(config_class, "losses", kd_loss, label=f"--kd-loss {kd_loss}: ")
        options["losses"] = kd_loss
    check_option("--dim", dim, 6, ge=1)
    check_option("--seed", seed, 0, ge=0)
    check_option("--split-seed", split_seed, 0, ge=0)
    check_option("--max-epochs", max_epochs, 1000, ge=1)
    check_option("--eval-every", eval_every, 10, ge=1)
    check_option("--patience", patience, 5, ge=1)
    check_option("--batch-users", batch_users, 64, ge=1)
    check_option("--lr", lr, 0.01, gt=0)
    check_option("--weight-decay", weight_decay, 0, ge=0)
    ensemble = _ensemble(decay, temperature, weighting, weight_power)
    split = load_split(dataset, split_seed, path, user_col, item_col, sep, data_dir, cache_dir)
    known = TEACHERS + _imported(teachers_dir, split)
    trajectories = load_teachers(split, teachers_dir, _parse_names(teachers, known, "teacher"))
    seed_everything(seed)
    with make_progress() as progress:
        bar = ProgressCallback(progress, f"{student}-{method}", max_epochs)
        result = distill(split, trajectories, student, method, dim, seed, resolve_device(device), runs_dir,
                         options, ensemble, batch_users, lr=lr, weight_decay=weight_decay, max_epochs=max_epochs,
                         eval_every=eval_every, patience=patience, callbacks=[bar],
                         source=_source(dataset, path, user_col, item_col, sep),
                         say=lambda text: progress.console.print(text, highlight=False))
    test = result["test"]
    console.print(f"{student}-{method} dim {dim} seed {seed}: best epoch {result['best_epoch']}, test "
                  f"R@10 {test['recall@10']:.4f} N@10 {test['ndcg@10']:.4f} R@50 {test['recall@50']:.4f} "
                  f"N@50 {test['ndcg@50']:.4f} ({result['wall_seconds']:.0f} s)")


@app.command("evaluate")
@friendly_errors
def evaluate_command(
    dataset: str = typer.Option("citeulike", help=DatasetHelp),
    teachers: bool = typer.Option(True, "--teachers", help="Report the teachers, their states and the ensemble."),
    names: str = typer.Option(",".join(TEACHERS), "--names", help="Comma-separated teachers to report."),
    seed: int = typer.Option(0, help="Split seed."),
    decay: str = typer.Option(DEFAULT_ENSEMBLE.decay, help="Rank decay of the ensemble g: exp or power."),
    temperature: float = typer.Option(DEFAULT_ENSEMBLE.temperature, help="T of the exp decay exp(-rank/T)."),
    weighting: str = typer.Option(DEFAULT_ENSEMBLE.weighting,
                                  help="Teacher weights in g: valid ((valid R@50/mean)^power) or uniform."),
    weight_power: float = typer.Option(DEFAULT_ENSEMBLE.weight_power, help="The power of the valid weighting."),
    write: Path = typer.Option(None, help="Also write a results page (Markdown) here, e.g. "
                                          "experiments/results/teachers-citeulike.md."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
) -> None:
    """Print R@10/N@10/R@50/N@50 on valid and test of each teacher, each of its states, and the ensemble."""
    check_option("--seed", seed, 0, ge=0)
    config = _ensemble(decay, temperature, weighting, weight_power)
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
        write.parent.mkdir(parents=True, exist_ok=True)
        write.write_text(page)
        console.print(f"wrote {write}")


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


@app.command("reproduce")
@friendly_errors
def reproduce_command(
    dataset: str = typer.Option("citeulike", help="Registered dataset name (or csv / recbole with --path)."),
    table: str = typer.Option(None, help="2 (accuracy of every method), 1 (discrepancy study) or cost."),
    figure: str = typer.Option(None, help="curves: test R@50 every 10 epochs of w/o KD, DCD and HetComp (PNG)."),
    students: str = typer.Option("mf,ml,dnn", help="Comma-separated students (Table 2, cost)."),
    seeds: str = typer.Option("5", help="Student seeds of Table 2: a count N (seeds 0 .. N-1) or a list, e.g. 1,2."),
    methods: str = typer.Option(",".join(TABLE2_METHODS), help="Methods of Table 2."),
    quick: bool = typer.Option(False, "--quick", help="The same pipeline on the first 300 users with short "
                                                      "schedules (minutes; checks the pipeline, not the paper)."),
    no_train: bool = typer.Option(False, "--no-train", help="Table 2 from finished runs only: list the missing "
                                                             "runs instead of training them."),
    path: Path = typer.Option(None, help="The file, for the csv and recbole formats."),
    user_col: str = typer.Option("user_id", help="csv: the user column."),
    item_col: str = typer.Option("item_id", help="csv: the item column."),
    sep: str = typer.Option(",", help="csv: the delimiter."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
    runs_dir: Path = typer.Option(Path("experiments/runs"), help="Where run folders are written."),
    results_dir: Path = typer.Option(Path("experiments/results"), help="Tables go to <results-dir>/<dataset>/."),
    jobs: int = typer.Option(1, help="Table 2: train this many student runs at once, as Ray tasks on a local "
                                     "cluster of this many CPUs, each run with cores/jobs threads (e.g. 2 on a "
                                     "2-core machine); 1 trains them one by one in this process."),
    ray_address: str = typer.Option(None, "--ray-address", help="Send the runs to an existing Ray cluster (auto, "
                                    "ray://HOST:PORT); every node must see --runs-dir, --teachers-dir and the data."),
    top_m: int = typer.Option(200, help="Items kept per user and state in the trajectory of a teacher trained "
                                        "here (at most the catalogue's size)."),
) -> None:
    """Regenerate the paper's tables and figures from real data; finished runs are reused, so it resumes."""
    from hetcomp.paper import common, cost, curves, ledger, table1, table2
    from hetcomp.runs.grid import Inputs

    check_option("--jobs", jobs, 2, ge=1)
    check_option("--top-m", top_m, 200, ge=1)
    sep = _separator(sep)
    if (table is None) == (figure is None):
        raise HetCompError("choose what to regenerate: --table 2, --table 1, --table cost or --figure curves")
    if table not in (None, "1", "2", "cost") or figure not in (None, "curves"):
        raise HetCompError(f"unknown --table {table!r} / --figure {figure!r}; tables: 1, 2, cost; figures: curves")
    source = {"path": str(path), "user_col": user_col, "item_col": item_col, "sep": sep} if path else {}
    max_users = common.QUICK_USERS if quick else None
    split = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir, max_users=max_users, **source)
    if top_m > split.n_items:
        raise HetCompError(f"--top-m {top_m}: the catalogue has only {split.n_items} items; use --top-m "
                           f"{split.n_items} or less")
    student_names = _parse_names(students, ("mf", "ml", "dnn", "gnn", "ae", "iae"), "student")
    method_names = _parse_names(methods, list(METHODS), "method")
    command = "hetcomp " + " ".join(sys.argv[1:])
    inputs = Inputs(dataset, str(data_dir) if data_dir else None, str(cache_dir) if cache_dir else None,
                    str(teachers_dir), 0, max_users, tuple(sorted(source.items())), str(resolve_device(device)))

    with make_progress() as progress:
        def bar(label: str, total: int) -> ProgressCallback:
            return ProgressCallback(progress, label, total, verbose=False)

        rep = common.Reproduction(dataset, split, teachers_dir, runs_dir, results_dir, resolve_device(device),
                                  common.Schedule.short() if quick else common.Schedule(), command, not no_train,
                                  bar, lambda text: progress.console.print(text, highlight=False),
                                  source={"dataset": dataset, **source}, inputs=inputs, jobs=jobs,
                                  ray_address=ray_address, teacher_top_m=top_m)
        if figure == "curves":
            written = [curves.curves_figure(rep, s) for s in student_names
                       if any(r["student"] == s for r in ledger.read_rows(rep.out_dir / "curves.csv"))]
            if not written:
                raise HetCompError(f"no curves in {rep.out_dir / 'curves.csv'}; run --table 2 first")
        elif table == "2":
            table2.table2(rep, student_names, _parse_seeds(seeds), method_names)
            written = [rep.out_dir / "table2.md", rep.out_dir / "table2.csv"]
        elif table == "1":
            table1.table1(rep)
            written = [rep.out_dir / "table1.md", rep.out_dir / "table1.csv"]
        else:
            cost.cost_table(rep, student_names)
            written = [rep.out_dir / "cost.md", rep.out_dir / "cost.csv"]
    for file in written:
        console.print(f"wrote {file}")


@app.command("import-teacher")
@friendly_errors
def import_teacher(
    file: Path = typer.Option(..., "--file", help="Rankings to import: .npz or .csv (see teachers/README.md)."),
    name: str = typer.Option(..., "--name", help="Name of the imported teacher (its folder name)."),
    dataset: str = typer.Option("citeulike", help=DatasetHelp),
    seed: int = typer.Option(0, help="Split seed the rankings were made on."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
) -> None:
    """Turn rankings produced by another tool into a trajectory that `distill` can use."""
    check_option("--seed", seed, 0, ge=0)
    check_teacher_name(name)
    split = load_split(dataset, seed, path, user_col, item_col, sep, data_dir, cache_dir)
    target = trajectory_file(teachers_dir, split.meta["dataset"], name)
    if target.exists():
        raise HetCompError(f"{target} already exists; choose another --name or delete it first")
    trajectory = import_rankings(file, split, name)
    trajectory.meta["source"] = "hetcomp " + " ".join(sys.argv[1:])
    trajectory.save(target)
    console.print(f"imported {trajectory.n_states} states x {split.n_users} users x top-{trajectory.top_m} "
                  f"from {file} -> {target}")


@app.command("bench")
@friendly_errors
def bench_command(
    dataset: str = typer.Option("citeulike", help="Registered dataset name."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    methods: str = typer.Option(",".join(METHODS), help="Methods whose student epoch is timed."),
    append: Path = typer.Option(None, help="Append the figures to a Markdown file, e.g. experiments/results/bench.md."),
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
) -> None:
    """Time data loading, full evaluation, a teacher epoch, a student epoch per method and one DKC check."""
    from hetcomp.bench import run_bench

    target = resolve_device(device)
    rows: list[tuple[str, float]] = []

    def report(name: str, seconds: float) -> None:
        rows.append((name, seconds))
        unit = "" if "MB" in name or seconds != seconds else " s"
        console.print(f"{name:<60} {seconds:10.3f}{unit}" if seconds == seconds else name, highlight=False)

    result = run_bench(dataset, data_dir, cache_dir, teachers_dir, target,
                       methods=_parse_names(methods, list(METHODS), "method"), report=report)
    console.print(f"machine: {result.get('machine', '')}")
    if append is not None:
        lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — `hetcomp {' '.join(sys.argv[1:])}`",
                 f"machine: {result.get('machine', '')}, device {target}", "",
                 "| what | seconds (MB for memory) |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in rows if value == value]
        append.parent.mkdir(parents=True, exist_ok=True)
        with open(append, "a") as handle:
            handle.write("\n".join(lines) + "\n")
        console.print(f"appended to {append}")


def _imported(root: Path, split) -> tuple[str, ...]:
    """Teachers present on disk for this split besides the built-in ones (e.g. imported)."""
    folder = Path(root) / dataset_slug(split.meta["dataset"])
    if not folder.is_dir():
        return ()
    return tuple(p.name for p in sorted(folder.iterdir()) if (p / TRAJECTORY_FILE).is_file() and p.name not in TEACHERS)


def _parse_options(items: list[str]) -> dict[str, str]:
    """NAME=VALUE pairs as text; :func:`hetcomp.config.parse_options` converts and checks them per method."""
    options = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise HetCompError(f"-o {item}: a method option must look like NAME=VALUE, e.g. -o preset=code")
        name, value = item.split("=", 1)
        options[name.strip()] = value
    return options


def _ensemble(decay: str, temperature: float, weighting: str, weight_power: float) -> EnsembleConfig:
    """The aggregation g from its options, each checked with a message that names the option."""
    check_choice("--decay", decay, DECAYS)
    check_option("--temperature", temperature, 50, gt=0)
    check_choice("--weighting", weighting, ("valid", "uniform"))
    check_option("--weight-power", weight_power, 8, ge=0)
    return EnsembleConfig(decay, temperature, weighting=weighting, weight_power=weight_power)


def _separator(sep: str) -> str:
    """The csv delimiter: one character; the escape ``\\t`` (as typed in a shell) or ``tab`` means a tab."""
    sep = "\t" if sep in ("\\t", "tab") else sep
    if len(sep) != 1:
        shown = sep if sep.isprintable() else repr(sep)
        raise HetCompError(f"--sep {shown}: the csv delimiter must be one character, e.g. --sep ';' or --sep '\\t' "
                           "for a tab")
    return sep


def _parse_seeds(text: str) -> list[int]:
    """``5`` = seeds 0..4; ``1,2`` (or ``3,``) = exactly those seeds."""
    try:
        if "," in text:
            seeds = [int(part) for part in text.split(",") if part.strip()]
        else:
            seeds = list(range(int(text)))
    except ValueError:
        seeds = []
    if not seeds or min(seeds) < 0:
        raise HetCompError(f"--seeds {text!r}: give a positive count (e.g. 5) or a list of seeds (e.g. 1,2)")
    return seeds


def _parse_names(text: str, known, kind: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise HetCompError(f"unknown {kind} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def main() -> None:
    app()


if __name__ == "__main__":
    main()
