"""``hetcomp datasets list|info``: which datasets are registered and present, and what a split looks like."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.table import Table

from hetcomp.cli.common import CacheDirOption, DataDirOption, _separator, app, console, friendly_errors
from hetcomp.config import check_option
from hetcomp.data import REGISTRY, DataError, load_dataset, resolve_data_dir
from hetcomp.data.registry import locate_files

datasets_app = typer.Typer(help="List the registered datasets and inspect their splits.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")


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
