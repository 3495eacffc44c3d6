"""``hetcomp bench``: timings of the hot paths on this machine, optionally appended to a Markdown log."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from hetcomp.cli.common import (
    CacheDirOption,
    DataDirOption,
    TeachersDirOption,
    _parse_names,
    app,
    console,
    friendly_errors,
)
from hetcomp.device import resolve_device
from hetcomp.distill import METHODS


@app.command("bench")
@friendly_errors
def bench_command(
    dataset: str = typer.Option("citeulike", help="Registered dataset name."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    methods: str = typer.Option(None, help="Methods whose student epoch is timed, comma-separated (any of "
                                f"{', '.join(METHODS)}; default: all)."),
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
                       methods=_parse_names(methods, list(METHODS), "method") if methods else None, report=report)
    console.print(f"machine: {result.get('machine', '')}")
    console.print(f"packages: {result.get('packages', '')}")
    if append is not None:
        lines = [f"\n## {time.strftime('%Y-%m-%d %H:%M')} — `hetcomp {' '.join(sys.argv[1:])}`",
                 f"machine: {result.get('machine', '')}, device {target}",
                 f"packages: {result.get('packages', '')}", "",
                 "| what | seconds (MB for memory) |", "|---|---|"]
        lines += [f"| {name} | {value:.3f} |" for name, value in rows if value == value]
        append.parent.mkdir(parents=True, exist_ok=True)
        with open(append, "a") as handle:
            handle.write("\n".join(lines) + "\n")
        console.print(f"appended to {append}")
