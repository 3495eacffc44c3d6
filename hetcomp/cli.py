"""The ``hetcomp`` command line: thin typer commands over the library."""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from hetcomp.data import REGISTRY, DataError, HetCompError, load_dataset, resolve_data_dir
from hetcomp.data.registry import locate_files
from hetcomp.device import resolve_device, seed_everything
from hetcomp.models import model_config
from hetcomp.teachers import TEACHERS, TRAJECTORY_FILE, teacher_dir, train_teacher
from hetcomp.train import Callback
from hetcomp.trajectory import load_trajectory

app = typer.Typer(help="HetComp: distil heterogeneous recommenders into one small student.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
datasets_app = typer.Typer(help="List the registered datasets and inspect their splits.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
console = Console()

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
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
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


class ProgressCallback(Callback):
    """A rich progress bar over epochs, with the latest validation result in its description."""

    def __init__(self, progress: Progress, label: str, max_epochs: int) -> None:
        self.progress = progress
        self.label = label
        self.task = progress.add_task(label, total=max_epochs)

    def on_fit_start(self, trainer) -> None:
        self.progress.update(self.task, completed=trainer.state.epoch, total=trainer.config.max_epochs)

    def on_epoch_end(self, trainer, epoch: int, loss: float) -> None:
        self.progress.update(self.task, completed=epoch)

    def on_evaluate(self, trainer, epoch: int, result: dict, improved: bool) -> None:
        valid = result["valid"][trainer.config.monitor]
        mark = "*" if improved else " "
        self.progress.update(self.task, description=f"{self.label} ep {epoch} valid R@50 {valid:.4f}{mark}")
        extra = getattr(trainer.objective, "describe", lambda: "")()
        self.progress.console.print(f"{self.label} epoch {epoch:4d}  valid R@50 {valid:.4f}{mark}  "
                                    f"test R@50 {result['test']['recall@50']:.4f}  {extra}", highlight=False)

    def on_fit_end(self, trainer) -> None:
        self.progress.update(self.task, completed=trainer.config.max_epochs,
                             description=f"{self.label} done (best epoch {trainer.state.best_epoch})")


def make_progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


@app.command("train-teachers")
@friendly_errors
def train_teachers(
    dataset: str = typer.Option("citeulike", help="Registered dataset name."),
    teachers: str = typer.Option(",".join(TEACHERS), help="Comma-separated teacher models."),
    dim: int = typer.Option(64, help="Embedding size of every teacher."),
    seed: int = typer.Option(0, help="Split and training seed."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    top_m: int = typer.Option(200, help="Items kept per user and state in the trajectory."),
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
) -> None:
    """Train the heterogeneous teachers and save each one's trajectory (E1..E4); finished ones are skipped."""
    names = _parse_names(teachers, TEACHERS, "teacher")
    split = load_dataset(dataset, data_dir=data_dir, seed=seed, cache_dir=cache_dir)
    target = resolve_device(device)
    command = "hetcomp " + " ".join(sys.argv[1:])
    with make_progress() as progress:
        for name in names:
            path = teacher_dir(teachers_dir, split.meta["dataset"], name) / TRAJECTORY_FILE
            if path.is_file():
                load_trajectory(path, split)
                progress.console.print(f"{name}: already complete at {path}, skipped (delete it to retrain)")
                continue
            seed_everything(seed)
            config = model_config(name, dim=dim)
            bar = ProgressCallback(progress, name, config.max_epochs)
            trajectory = train_teacher(split, name, teachers_dir, dim=dim, seed=seed, device=target, top_m=top_m,
                                       callbacks=[bar], command=command)
            test = trajectory.meta["metrics"][-1]["test"]
            progress.console.print(f"{name}: converged at epoch {trajectory.meta['converged_epoch']}, states at "
                                   f"{trajectory.meta['state_epochs']}, test R@50 {test['recall@50']:.4f}, "
                                   f"{trajectory.meta['train_seconds']:.0f} s -> {path}")


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
