"""``hetcomp distill``: one student run from the teachers' trajectories (the run layer does the work)."""

from __future__ import annotations

from pathlib import Path

import typer

from hetcomp.cli.common import (
    BetaOption,
    CacheDirOption,
    DataDirOption,
    DatasetHelp,
    DecayOption,
    ItemColOption,
    PathOption,
    ProgressCallback,
    SepOption,
    TeachersDirOption,
    TemperatureOption,
    TuningDirOption,
    UserColOption,
    WeightingOption,
    WeightPowerOption,
    _ensemble,
    _imported,
    _parse_names,
    _parse_options,
    _source,
    app,
    check_tuning_dir,
    console,
    friendly_errors,
    load_split,
    make_progress,
)
from hetcomp.config import check_option, check_value, parse_options
from hetcomp.device import resolve_device, seed_everything
from hetcomp.distill import METHODS, method_class
from hetcomp.errors import HetCompError
from hetcomp.runs import distill
from hetcomp.runs.spec import (
    DEFAULT_BATCH_USERS,
    DEFAULT_EVAL_EVERY,
    DEFAULT_MAX_EPOCHS,
    DEFAULT_PATIENCE,
    KD_LR,
    KD_WEIGHT_DECAY,
    student_options,
)
from hetcomp.teachers import TEACHERS, load_teachers


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
                                     help="Method option NAME=VALUE (repeatable), e.g. -o preset=code; unset "
                                          "ones take the settings `hetcomp tune` chose, if any."),
    model_option: list[str] = typer.Option([], "--model-option", "-m",
                                           help="Student model setting NAME=VALUE (repeatable), e.g. -m "
                                                "n_negatives=1 for the ML student; unset ones keep the model's "
                                                "defaults (lr, weight decay, epochs and batches are options above)."),
    kd_loss: str = typer.Option(None, "--kd-loss", help="For --method kd: weighted losses, e.g. "
                                "kl:1.0,pairwise_hinge:0.5 (ce, bce, l2, kl, pairwise_hinge, listwise)."),
    max_epochs: int = typer.Option(DEFAULT_MAX_EPOCHS,
                                   help="Upper bound on epochs (early stopping usually ends sooner)."),
    eval_every: int = typer.Option(DEFAULT_EVAL_EVERY,
                                   help="Evaluate on validation every N epochs (early stopping, DKC)."),
    patience: int = typer.Option(DEFAULT_PATIENCE,
                                 help="Stop after this many evaluations without a better validation R@50."),
    batch_users: int = typer.Option(DEFAULT_BATCH_USERS, help="Users per batch (each user once per epoch)."),
    lr: float = typer.Option(None, help="Adam learning rate of the student (default: the one `hetcomp tune` chose, "
                                        f"else {KD_LR:g} for KD methods, the model's own for --method none)."),
    weight_decay: float = typer.Option(None, help="Adam weight decay of the student (default: the one `hetcomp tune` "
                                                  f"chose, else {KD_WEIGHT_DECAY:g} for KD methods, the model's own "
                                                  "for --method none)."),
    decay: str = DecayOption, temperature: float = TemperatureOption, weighting: str = WeightingOption,
    weight_power: float = WeightPowerOption, beta: float = BetaOption,
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    path: Path = PathOption, user_col: str = UserColOption, item_col: str = ItemColOption, sep: str = SepOption,
    data_dir: Path = DataDirOption,
    cache_dir: Path = CacheDirOption,
    teachers_dir: Path = TeachersDirOption,
    runs_dir: Path = typer.Option(Path("experiments/runs"), help="Where run folders are written."),
    tuning_dir: Path = TuningDirOption,
) -> None:
    """Train a small student from the teachers' trajectories with HetComp or a baseline."""
    config_class = method_class(method).config_class
    options = parse_options(config_class, _parse_options(option))
    model_options = student_options(student, _parse_options(model_option, "-m", "a student model setting",
                                                            "n_negatives=1"))
    if kd_loss is not None:
        if method != "kd":
            raise HetCompError("--kd-loss applies to --method kd only")
        check_value(config_class, "losses", kd_loss, label=f"--kd-loss {kd_loss}: ")
        options["losses"] = kd_loss
    check_option("--dim", dim, 6, ge=1)
    check_option("--seed", seed, 0, ge=0)
    check_option("--split-seed", split_seed, 0, ge=0)
    check_option("--max-epochs", max_epochs, DEFAULT_MAX_EPOCHS, ge=1)
    check_option("--eval-every", eval_every, DEFAULT_EVAL_EVERY, ge=1)
    check_option("--patience", patience, DEFAULT_PATIENCE, ge=1)
    check_option("--batch-users", batch_users, DEFAULT_BATCH_USERS, ge=1)
    check_option("--lr", lr, KD_LR, gt=0)
    check_option("--weight-decay", weight_decay, f"{KD_WEIGHT_DECAY:g}", ge=0)
    tuned_from = check_tuning_dir(tuning_dir)
    ensemble = _ensemble(decay, temperature, weighting, weight_power, beta)
    split = load_split(dataset, split_seed, path, user_col, item_col, sep, data_dir, cache_dir)
    known = TEACHERS + _imported(teachers_dir, split)
    names = _parse_names(teachers, known, "teacher")
    # w/o KD learns from the data alone: it needs no trained teachers
    trajectories = load_teachers(split, teachers_dir, names) if method_class(method).reads_teachers else []
    seed_everything(seed)
    with make_progress() as progress:
        bar = ProgressCallback(progress, f"{student}-{method}", max_epochs)
        result = distill(split, trajectories, student, method, dim, seed, resolve_device(device), runs_dir,
                         options, ensemble, batch_users, lr=lr, weight_decay=weight_decay, max_epochs=max_epochs,
                         eval_every=eval_every, patience=patience, callbacks=[bar],
                         source=_source(dataset, path, user_col, item_col, sep),
                         say=lambda text: progress.console.print(text, highlight=False),
                         model_options=model_options, tuning_dir=tuned_from)
    test = result["test"]
    console.print(f"{student}-{method} dim {dim} seed {seed}: best epoch {result['best_epoch']}, test "
                  f"R@10 {test['recall@10']:.4f} N@10 {test['ndcg@10']:.4f} R@50 {test['recall@50']:.4f} "
                  f"N@50 {test['ndcg@50']:.4f} ({result['wall_seconds']:.0f} s{_cpu(result)})")
    if "trained_as" in result:
        twin = result["trained_as"]
        console.print(f"{method} at these settings trains exactly as {twin.get('method', 'another method')}: "
                      f"the finished run {twin['run']} serves as this one (its command: {twin['command']})")


def _cpu(result: dict) -> str:
    """", 812 s of CPU" where the run counted it (a finished run from before did not)."""
    cpu = result.get("cpu_seconds")
    return "" if cpu is None else f", {cpu:.0f} s of CPU"
