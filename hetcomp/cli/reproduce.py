"""``hetcomp reproduce``: the paper's tables and figures; the paper layer decides which runs are missing."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from hetcomp.cli.common import (
    CacheDirOption,
    DataDirOption,
    ItemColOption,
    PathOption,
    ProgressCallback,
    SepOption,
    TeachersDirOption,
    TuningDirOption,
    UserColOption,
    _grid_inputs,
    _parse_names,
    _parse_seeds,
    _separator,
    app,
    check_tuning_dir,
    console,
    friendly_errors,
    make_progress,
)
from hetcomp.config import check_option
from hetcomp.data import load_dataset
from hetcomp.device import resolve_device
from hetcomp.distill import METHODS
from hetcomp.errors import HetCompError
from hetcomp.paper.common import TABLE2_DEFAULT_METHODS
from hetcomp.teachers import trained_top_m


@app.command("reproduce")
@friendly_errors
def reproduce_command(
    dataset: str = typer.Option("citeulike", help="Registered dataset name (or csv / recbole with --path)."),
    table: str = typer.Option(None, help="2 (accuracy of every method), 1 (discrepancy study) or cost."),
    figure: str = typer.Option(None, help="curves: test R@50 every 10 epochs of w/o KD, DCD and HetComp (PNG)."),
    students: str = typer.Option("mf,ml,dnn", help="Comma-separated students (Table 2, cost)."),
    seeds: str = typer.Option("5", help="Student seeds of Table 2: a count N (seeds 0 .. N-1) or a list, e.g. 1,2."),
    methods: str = typer.Option(",".join(TABLE2_DEFAULT_METHODS), help="Methods of Table 2 (the paper's seven, "
                                                                         "CL-DRD being cl-drd-full, and the KD "
                                                                         "menu); add cl-drd for the option row "
                                                                         "CL-DRD (sampled)."),
    quick: bool = typer.Option(False, "--quick", help="The same pipeline on the first 300 users with short "
                                                      "schedules (minutes; checks the pipeline, not the paper)."),
    no_train: bool = typer.Option(False, "--no-train", help="Table 2 from finished runs only: list the missing "
                                                             "runs instead of training them."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
    runs_dir: Path = typer.Option(Path("experiments/runs"), help="Where run folders are written."),
    results_dir: Path = typer.Option(Path("experiments/results"), help="Tables go to <results-dir>/<dataset>/."),
    tuning_dir: Path = TuningDirOption,
    jobs: int = typer.Option(1, help="Table 2: train this many student runs at once, as Ray tasks on a local "
                                     "cluster of this many CPUs, each run with cores/jobs threads (e.g. 2 on a "
                                     "2-core machine; local processes where Ray is not installed); 1 trains "
                                     "them one by one in this process."),
    ray_address: str = typer.Option(None, "--ray-address", help="Send the runs to an existing Ray cluster (auto, "
                                    "ray://HOST:PORT); every node must see --runs-dir, --teachers-dir and the data."),
    top_m: int = typer.Option(None, help="Items kept per user and state in the trajectory of a teacher trained "
                                         "here (default 200, or fewer when the catalogue is too small)."),
    durations_from: Path = typer.Option(None, "--durations-from", help="Table 2 with --jobs: queue the runs "
                                        "longest first by the wall times in this table2.csv (e.g. a committed "
                                        "one; default: the results folder's own ledger). Order only, never "
                                        "results."),
    replace_other_teachers: bool = typer.Option(False, "--replace-other-teachers", help="Table 2: let runs "
                                                "with these teachers replace ledger rows that other teachers "
                                                "made (by default that is refused, naming the rows)."),
    allow_untuned: bool = typer.Option(False, "--allow-untuned", help="Table 2: train cells that no `hetcomp "
                                       "tune` study chose settings for beside cells that one did, at the "
                                       "built-in settings (marked on the page; by default that is refused, "
                                       "naming the studies to run)."),
    leave_busy: bool = typer.Option(False, "--leave-busy", help="Table 2, one job: leave the runs that another "
                                    "process (a reproduce beside this one) is training now to it and end once "
                                    "the free runs are done; its page lists them as not finished, and the call "
                                    "that ends last writes the whole table (by default this call waits for "
                                    "them)."),
    stack_seeds: bool = typer.Option(False, "--stack-seeds", help="Table 2: train the seeds of each run whose "
                                     "method stacks (every method; KD with listwise) as one stacked "
                                     "model, one task per run; for a GPU, where a stack's epoch costs little more "
                                     "than one run's (on a CPU it gains nothing). Each seed keeps its own folder, "
                                     "row and checkpoints."),
    stack_methods: str = typer.Option(None, "--stack-methods", help="With --stack-seeds: stack only these "
                                      "methods' seeds (comma-separated, e.g. hetcomp,rrd,none, which gained most "
                                      "on an H200; default: every method that stacks)."),
    stack_size: int = typer.Option(None, "--stack-size", help="With --stack-seeds: at most this many seeds a "
                                   "stack, a row's seeds split as evenly as can be (5 at 3: 3 + 2), so that no "
                                   "task runs much longer than the rest (default: a row's seeds in one)."),
    price: bool = typer.Option(False, "--price", help="Table 2: train nothing, write nothing; time a few epochs "
                               "and an evaluation of each (student, method) cell's run on this machine, at the "
                               "threads --jobs gives a run, and print what the grid would take with today's code "
                               "(epochs from the ledger's rows or the studies' chosen trials)."),
) -> None:
    """Regenerate the paper's tables and figures from real data; finished runs are reused, so it resumes."""
    from hetcomp.paper import common, cost, curves, ledger, table1, table2

    check_option("--jobs", jobs, 2, ge=1)
    check_option("--top-m", top_m, 200, ge=1)
    if durations_from is not None and not durations_from.is_file():
        raise HetCompError(f"--durations-from {durations_from}: no such file; give a table2.csv (e.g. "
                           "experiments/results/tuned/citeulike/table2.csv) or leave it out")
    sep = _separator(sep)
    tuned_from = check_tuning_dir(tuning_dir)
    stacked: bool | frozenset[str] = stack_seeds
    if stack_methods is not None:
        if not stack_seeds:
            raise HetCompError("--stack-methods chooses among the runs --stack-seeds stacks: add --stack-seeds")
        stacked = frozenset(_parse_names(stack_methods, list(METHODS), "method in --stack-methods"))
    if stack_size is not None:
        if not stack_seeds:
            raise HetCompError("--stack-size sizes the stacks of --stack-seeds: add --stack-seeds")
        check_option("--stack-size", stack_size, 2, ge=1)
    if leave_busy and (jobs > 1 or ray_address):
        raise HetCompError("--leave-busy is for a call that trains its runs one by one (--jobs 1): with --jobs or "
                           "--ray-address the runs of one call are queued together; leave one of them out")
    if price and (table != "2" or no_train):
        raise HetCompError("--price prices the runs of --table 2 (and trains none itself): use it with --table 2 "
                           "and without --no-train")
    if price and (stack_seeds or ray_address):
        raise HetCompError("--price times ordinary runs on this machine: leave out --stack-seeds and --ray-address "
                           "(or run it on a node of the cluster, with --jobs as there)")
    if (table is None) == (figure is None):
        raise HetCompError("choose what to regenerate: --table 2, --table 1, --table cost or --figure curves")
    if table not in (None, "1", "2", "cost"):
        raise HetCompError(f"unknown --table {table!r}; tables: 1, 2, cost (or --figure curves)")
    if figure not in (None, "curves"):
        raise HetCompError(f"unknown --figure {figure!r}; figures: curves (or --table 1, 2, cost)")
    source = {"path": str(path), "user_col": user_col, "item_col": item_col, "sep": sep} if path else {}
    max_users = common.QUICK_USERS if quick else None
    split = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir, max_users=max_users, **source)
    top_m = trained_top_m(split, top_m)
    student_names = _parse_names(students, ("mf", "ml", "dnn", "gnn", "ae", "iae"), "student")
    method_names = _parse_names(methods, list(METHODS), "method")
    command = "hetcomp " + " ".join(sys.argv[1:])
    inputs = _grid_inputs(dataset, path, user_col, item_col, sep, data_dir, cache_dir, teachers_dir, device,
                          max_users=max_users)

    with make_progress() as progress:
        def bar(label: str, total: int) -> ProgressCallback:
            return ProgressCallback(progress, label, total, verbose=False)

        rep = common.Reproduction(dataset, split, teachers_dir, runs_dir, results_dir, resolve_device(device),
                                  common.Schedule.short() if quick else common.Schedule(), command, not no_train,
                                  bar, lambda text: progress.console.print(text, highlight=False),
                                  source={"dataset": dataset, **source}, inputs=inputs, jobs=jobs,
                                  ray_address=ray_address, teacher_top_m=top_m, durations_from=durations_from,
                                  replace_other_teachers=replace_other_teachers, stack_seeds=stacked,
                                  allow_untuned=allow_untuned, leave_busy=leave_busy,
                                  stack_size=stack_size,
                                  tuning_dir=tuned_from)
        if figure == "curves":
            written = [curves.curves_figure(rep, s) for s in student_names
                       if any(r["student"] == s for r in ledger.read_rows(rep.out_dir / "curves.csv"))]
            if not written:
                raise HetCompError(f"no curves in {rep.out_dir / 'curves.csv'}; run --table 2 first")
        elif table == "2" and price:
            from hetcomp.paper.price import price_markdown, price_table2

            seed_list = _parse_seeds(seeds)
            prices = price_table2(rep, student_names, seed_list, method_names)
            progress.stop()
            print(price_markdown(rep, prices, len(seed_list)), end="")
            return
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
