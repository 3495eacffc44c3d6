"""``hetcomp train-teachers`` and ``hetcomp import-teacher``: the two ways a teacher's trajectory comes to disk."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
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
    _parse_names,
    app,
    console,
    friendly_errors,
    load_split,
    make_progress,
)
from hetcomp.config import check_option
from hetcomp.device import resolve_device, seed_everything
from hetcomp.errors import HetCompError
from hetcomp.experiments import committed_teacher_digests
from hetcomp.models import model_config
from hetcomp.provenance import cpu
from hetcomp.runs.spec import trajectory_digest
from hetcomp.teachers import (
    TEACHERS,
    check_teacher_name,
    dataset_teacher_settings,
    seeded_name,
    shares_state_epochs,
    train_teacher,
    trained_top_m,
    trajectory_file,
)
from hetcomp.trajectory import import_rankings, load_trajectory


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
    top_m: int = typer.Option(None, help="Items kept per user and state in the trajectory (default 200, or fewer "
                                         "when the catalogue is too small)."),
    eval_every: int = typer.Option(None, help="Evaluate and snapshot every N epochs (the trajectory's "
                                              "states are chosen among these); default: the dataset's "
                                              "setting, else each model's."),
    threads: int = typer.Option(None, help="CPU threads (default: torch's, one per core). A teacher's rankings "
                                           "are bit-identical only for the same thread count (recorded in its "
                                           "trajectory); LightGCN's with more than one thread not even run to "
                                           "run (its propagation sums in a thread-dependent order)."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
    require_committed: bool = typer.Option(False, "--require-committed", help="Stop with an error at the first "
                                           "teacher whose digest differs from the committed teachers page (the "
                                           "studies' and tables' teachers), instead of warning and going on."),
) -> None:
    """Train the heterogeneous teachers and save each one's trajectory (E1..E4); finished ones are skipped."""
    check_option("--dim", dim, 64, ge=1)
    check_option("--threads", threads, 2, ge=1)
    if threads is not None:
        torch.set_num_threads(threads)
    check_option("--seed", seed, 0, ge=0)
    check_option("--train-seed", train_seed, 1, ge=0)
    check_option("--top-m", top_m, 200, ge=1)
    check_option("--eval-every", eval_every, 10, ge=1)
    names = _parse_names(teachers, TEACHERS, "teacher")
    split = load_split(dataset, seed, path, user_col, item_col, sep, data_dir, cache_dir)
    top_m = trained_top_m(split, top_m)
    target = resolve_device(device)
    command = "hetcomp " + " ".join(sys.argv[1:])
    train_seed = seed if train_seed is None else train_seed
    page, committed = committed_teacher_digests(split.meta["dataset"])
    with make_progress() as progress:
        for model in names:
            name = seeded_name(model, train_seed, seed)
            path = trajectory_file(teachers_dir, split.meta["dataset"], name)
            if path.is_file():
                same = _say_digest(progress.console, load_trajectory(path, split), committed.get(name), page,
                                   f"{name}: already complete at {path}, skipped (delete it to retrain)")
                _stop_unless(same or not require_committed, name, page)
                continue
            seed_everything(train_seed)
            config = model_config(model, dim=dim)
            bar = ProgressCallback(progress, name, config.max_epochs)
            trajectory = train_teacher(split, model, teachers_dir, dim=dim, seed=train_seed, device=target,
                                       top_m=top_m, callbacks=[bar], command=command, name=name,
                                       **dataset_teacher_settings(dataset, eval_every))
            test = trajectory.meta["metrics"][-1]["test"]
            epochs = trajectory.meta["state_epochs"]
            same = _say_digest(progress.console, trajectory, committed.get(name), page,
                               f"{name}: converged at epoch {trajectory.meta['converged_epoch']}, states at "
                               f"{epochs}, test R@50 {test['recall@50']:.4f}, "
                               f"{trajectory.meta['train_seconds']:.0f} s -> {path}")
            if shares_state_epochs(trajectory):
                progress.console.print(f"[yellow]warning[/]: {name}'s states share epochs {epochs}: it converged "
                                       "within a few evaluations; retrain it with a smaller --eval-every so that "
                                       "E1..E4 differ")
            _stop_unless(same or not require_committed, name, page)


def _stop_unless(fine: bool, name: str, page: Path) -> None:
    if not fine:
        raise HetCompError(f"--require-committed: {name}'s digest differs from {page}'s (warning above), so the "
                           "committed studies and rows cannot go on with it; the remaining teachers were not "
                           f"trained. Its trajectory is kept: delete {name}'s folder before retraining it with the "
                           "settings the warning names")


def _say_digest(out, trajectory, committed: tuple[str, str] | None, page: Path, line: str) -> bool:
    """``line`` with the teacher's digest, and a warning where the committed teachers page lists another one for
    it: runs, studies and ledger rows made with the committed teacher are then not reused with this one. Returns
    whether the digest is the committed one (or the page lists none)."""
    digest = trajectory_digest(trajectory)[:12]
    out.print(f"{line}; digest {digest}", highlight=False)
    if committed is None or committed[0] == digest:
        return True
    threads = trajectory.meta.get("threads", "-")
    out.print(f"[yellow]warning[/]: {trajectory.name}'s rankings differ from the committed teacher's ({page} lists "
              f"digest {committed[0]}, trained with {committed[1]} thread(s); this one {digest}, {threads}): "
              "runs, tuning studies and ledger rows made with the committed teachers will not be reused with it. "
              "A teacher's rankings depend on the thread count (--threads) and on the CPU's vector kernels (this "
              f"machine's: {cpu()}); on an AVX-512 CPU, ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 set "
              "before the command give an AVX2 machine's rankings, and on an Intel CPU `python -m hetcomp.mkl_as_amd "
              "hetcomp train-teachers ...` gives the matrix products and vector maths of an AMD one")
    return False


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

