"""What every ``hetcomp`` command shares: the app, the console, error handling, the option declarations,
loading a split, the progress bar and the small parsers of comma-separated and NAME=VALUE options.

The commands themselves live one module per command (or small group) beside this one and register on
:data:`app`; keeping the shared parts here keeps each of those modules a thin layer over the library.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Collection
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hetcomp.config import check_choice, check_option
from hetcomp.data import Split, load_dataset
from hetcomp.distill import EnsembleConfig
from hetcomp.ensemble import DECAYS, WEIGHTINGS
from hetcomp.errors import HetCompError
from hetcomp.provenance import dataset_slug
from hetcomp.runs.tuned import TUNING_ROOT
from hetcomp.teachers import TEACHERS, TRAJECTORY_FILE
from hetcomp.train import Callback

app = typer.Typer(help="HetComp: distil heterogeneous recommenders into one small student.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
#: g's defaults, read by the options of every command that builds an ensemble
DEFAULT_ENSEMBLE = EnsembleConfig()

DataDirOption = typer.Option(None, "--data-dir",
                             help="Folder with the raw files (default: $HETCOMP_DATA or ./datasets).")
CacheDirOption = typer.Option(None, "--cache-dir",
                              help="Folder for cached splits (default: $HETCOMP_CACHE or ./datasets/cache).")
TeachersDirOption = typer.Option(Path("teachers"), "--teachers-dir", help="Where teacher trajectories live.")
TuningDirOption = typer.Option(TUNING_ROOT, "--tuning-dir",
                               help="Where `hetcomp tune` wrote its chosen settings, the runs' defaults (e.g. the "
                                    "studies of another teacher set).")
DatasetHelp = "Registered dataset name, or csv / recbole with --path."
PathOption = typer.Option(None, "--path", help="The file, for the csv and recbole formats.")
UserColOption = typer.Option("user_id", "--user-col", help="csv: the user column.")
ItemColOption = typer.Option("item_id", "--item-col", help="csv: the item column.")
SepOption = typer.Option(",", "--sep", help="csv: the delimiter.")
#: the aggregation g's options (distill, evaluate), defaults from EnsembleConfig
DecayOption = typer.Option(DEFAULT_ENSEMBLE.decay, "--decay", help="Rank decay of the aggregation g: exp or power.")
TemperatureOption = typer.Option(DEFAULT_ENSEMBLE.temperature, "--temperature", help="T of the exp decay exp(-rank/T).")
WeightingOption = typer.Option(DEFAULT_ENSEMBLE.weighting, "--weighting",
                               help="Teacher weights in g: valid ((converged valid R@50/mean)^power), valid-state "
                                    "(each state its own valid R@50) or uniform.")
WeightPowerOption = typer.Option(DEFAULT_ENSEMBLE.weight_power, "--weight-power",
                                 help="The power of the valid weighting.")
BetaOption = typer.Option(DEFAULT_ENSEMBLE.beta, "--beta", help="β of the power decay (rank+1)^-β.")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True, emoji=False)


def friendly_errors(command: Callable) -> Callable:
    """Print toolkit errors as one clear message and exit 1, instead of a traceback; warnings as one line
    (not Python's file:line form with the source line)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                return command(*args, **kwargs)
        except HetCompError as error:
            # the message as written: not read as markup ([...]) or emoji codes (:x: in "-o losses=kl:x")
            console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True, emoji=False)
            raise typer.Exit(1) from None

    return wrapper


def load_split(dataset: str, seed: int, path: Path | None, user_col: str, item_col: str, sep: str,
               data_dir: Path | None, cache_dir: Path | None) -> Split:
    """The split of a registered dataset, or of a csv / recbole file (``--path`` and its columns and delimiter):
    what every command that takes ``--dataset`` reads (the options above declare the file's part)."""
    return load_dataset(dataset, data_dir=data_dir, seed=seed, cache_dir=cache_dir, path=path, user_col=user_col,
                        item_col=item_col, sep=_separator(sep))


def _grid_inputs(dataset: str, path: Path | None, user_col: str, item_col: str, sep: str, data_dir: Path | None,
                 cache_dir: Path | None, teachers_dir: Path, device: str, split_seed: int = 0,
                 max_users: int | None = None):
    """How a grid's Ray workers load the split and the teachers this command read (a
    :class:`hetcomp.runs.grid.Inputs`)."""
    from hetcomp.device import resolve_device
    from hetcomp.runs.grid import Inputs

    source = {"path": str(path), "user_col": user_col, "item_col": item_col, "sep": _separator(sep)} if path else {}
    return Inputs(dataset, str(data_dir) if data_dir else None, str(cache_dir) if cache_dir else None,
                  str(teachers_dir), split_seed, max_users, tuple(sorted(source.items())), str(resolve_device(device)))


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
        if self.verbose:
            self.print_evaluation(trainer, epoch, valid, improved)

    def print_evaluation(self, trainer, epoch: int, valid: float, improved: bool) -> None:
        """One line for an evaluation: validation only while training (test numbers are reported once, at the
        end, never beside a choice)."""
        extra = getattr(trainer.objective, "describe", lambda: "")()
        self.progress.console.print(f"{self.label} epoch {epoch:4d}  valid R@50 {valid:.4f}{'*' if improved else ' '}"
                                    f"  {extra}", highlight=False)

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
    """One progress display on the shared console, so bars and printed lines do not tear each other."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False)


def _imported(root: Path, split: Split) -> tuple[str, ...]:
    """Teachers present on disk for this split besides the built-in ones (e.g. imported)."""
    folder = Path(root) / dataset_slug(split.meta["dataset"])
    if not folder.is_dir():
        return ()
    return tuple(p.name for p in sorted(folder.iterdir()) if (p / TRAJECTORY_FILE).is_file() and p.name not in TEACHERS)


def _parse_options(items: list[str], flag: str = "-o", what: str = "a method option",
                   example: str = "preset=code") -> dict[str, str]:
    """NAME=VALUE pairs as text; :func:`hetcomp.config.parse_options` converts and checks them per method."""
    options = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise HetCompError(f"{flag} {item}: {what} must look like NAME=VALUE, e.g. {flag} {example}")
        name, value = item.split("=", 1)
        options[name.strip()] = value
    return options


def _ensemble(decay: str, temperature: float, weighting: str, weight_power: float,
              beta: float = DEFAULT_ENSEMBLE.beta) -> EnsembleConfig:
    """The aggregation g from its options, each checked with a message that names the option."""
    check_choice("--decay", decay, DECAYS)
    check_option("--temperature", temperature, f"{DEFAULT_ENSEMBLE.temperature:g}", gt=0)
    check_choice("--weighting", weighting, WEIGHTINGS)
    check_option("--weight-power", weight_power, f"{DEFAULT_ENSEMBLE.weight_power:g}", ge=0)
    check_option("--beta", beta, f"{DEFAULT_ENSEMBLE.beta:g}", ge=0)
    return EnsembleConfig(decay, temperature, beta, weighting=weighting, weight_power=weight_power)


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


def _parse_names(text: str, known: Collection[str], kind: str) -> list[str]:
    """Comma-separated names, each among ``known``, so a typo fails before any data is loaded."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise HetCompError(f"unknown {kind} {', '.join(unknown) or '(none given)'}; choose from {', '.join(known)}")
    return names


def check_tuning_dir(tuning_dir: Path) -> Path | None:
    """``--tuning-dir`` as the runs read it (None: the default folder); another folder must exist, so that a typo
    is an error rather than runs silently at the built-in defaults."""
    if tuning_dir == TUNING_ROOT:
        return None
    if not tuning_dir.is_dir():
        raise HetCompError(f"--tuning-dir {tuning_dir}: no such folder; give the --tuning-dir that `hetcomp tune` "
                           f"wrote to (it holds <dataset>/<student>-<method>-<dim>.json), or leave it out for "
                           f"{TUNING_ROOT}")
    return tuning_dir
