"""Running one distillation: student + method + shared trainer, with its outputs on disk (resumable)."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from hetcomp.data import HetCompError, Split
from hetcomp.device import peak_memory_mb
from hetcomp.distill import DistillContext, EnsembleConfig, build_method, method_class
from hetcomp.models import build_model, model_config
from hetcomp.teachers import TEACHERS
from hetcomp.train import Callback, Trainer, TrainerConfig


def run_name(student: str, method: str, dim: int, seed: int, options: dict | None = None) -> str:
    """``<student>-<method>-<dim>-<seed>``, plus a short hash of the non-default settings (method options,
    lr, batch size, weight decay, ensemble) so that two configurations never share one run folder."""
    name = f"{student}-{method}-{dim}-{seed}"
    if options:
        digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:8]
        name += f"-{digest}"
    return name


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def source_digest(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """sha256 (12 hex) of the package's Python sources, names included."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


#: the sources this process runs, read once at import: a long ``reproduce`` trains every run with the code it
#: loaded, while ``git_commit()`` reports the HEAD of the moment; runs record both
CODE_DIGEST = source_digest()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.system()} {cpu}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def read_metrics(path: Path) -> dict:
    """A finished run's ``metrics.json``; an unreadable one is an error naming it and how to retrain."""
    try:
        finished = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise HetCompError(f"{path}: this finished run's metrics cannot be read ({error.__class__.__name__}: "
                           f"{error}); the file is truncated or corrupt: delete it to retrain the run") from None
    if not isinstance(finished, dict):
        raise HetCompError(f"{path}: not a run's metrics (a JSON object); delete it to retrain the run")
    return finished


#: the distillation recipe of a student (Adam), unless its method trains on the student's own loss mostly
KD_LR = 1e-2
KD_WEIGHT_DECAY = 0.0


def default_recipe(student: str, method: str) -> tuple[float, float]:
    """(lr, weight decay) a student trains with by default: the model's own for methods that say so (w/o KD, RD),
    else the distillation recipe."""
    if method_class(method).uses_own_recipe:
        config = model_config(student)
        return config.lr, config.weight_decay
    return KD_LR, KD_WEIGHT_DECAY


def distill(split: Split, trajectories: list, student: str = "mf", method: str = "hetcomp", dim: int = 6,
            seed: int = 0, device: torch.device | str = "cpu", runs_root: Path = Path("experiments/runs"),
            method_options: dict | None = None, ensemble: EnsembleConfig | None = None, batch_users: int = 64,
            lr: float | None = None, weight_decay: float | None = None, max_epochs: int = 1000, eval_every: int = 10,
            patience: int = 5, callbacks: list[Callback] | None = None, command: str = "",
            train: bool = True) -> dict | None:
    """Train a student with ``method``; returns (and writes) its metrics. A finished run is reused; with
    ``train=False`` only reused (None when the run is not finished).

    Batches are ``batch_users`` users, each user once per epoch (the released code instead rescored ~900
    users per 1,024 interactions, each user ~13 times per epoch: 13× the compute). With one update per user
    per epoch, the released lr of 1e-3 moves user embeddings ~10× less per epoch; lr 1e-2 restores the per-epoch
    movement (on CiteULike with three teachers, valid R@50 after 10 epochs: 0.069 at lr 1e-3, 0.093 at 1e-2;
    512-user batches at 1e-2: 0.069). No weight decay (the release used Adam's 1e-5): Adam adds the decay to the
    gradient of *every* row at every step, while a user's distillation gradient arrives once per epoch and, with
    losses averaged over the batch's users, 64× smaller than the release's per-user sums; the decay then
    dominates the user embeddings (an MF student at dim 6 on CiteULike, code preset: test R@50 0.2498 with 1e-5,
    above 0.29 with 0). A method that trains the student on
    its own loss only (w/o KD) uses the model's own recipe instead (its lr and weight decay, as a teacher):
    for the MF student that gave valid R@50 0.1307 at lr 1e-3 against 0.1085 at 1e-2.
    ``lr`` / ``weight_decay`` given explicitly override either default.
    """
    settings = dict(method_options or {})  # what, besides the defaults, identifies this run
    if lr is not None:
        settings["lr"] = lr
    if batch_users != 64:
        settings["batch_users"] = batch_users
    if weight_decay is not None:
        settings["weight_decay"] = weight_decay
    if ensemble is not None and ensemble != EnsembleConfig():
        settings["ensemble"] = vars(ensemble)
    names = [t.name for t in trajectories]
    if names != list(TEACHERS):
        settings["teachers"] = names
    if split.meta.get("seed", 0) != 0:
        settings["split_seed"] = split.meta["seed"]
    if (version := method_class(method).version) != 1:  # a changed method never reuses an older run's folder
        settings["method_version"] = version
    name = run_name(student, method, dim, seed, settings)
    run_dir = Path(runs_root) / split.meta["dataset"].replace(":", "-") / name
    metrics_file = run_dir / "metrics.json"
    default_lr, default_weight_decay = default_recipe(student, method)
    lr = default_lr if lr is None else lr
    weight_decay = default_weight_decay if weight_decay is None else weight_decay
    if metrics_file.is_file():
        finished = read_metrics(metrics_file)
        if (finished.get("lr"), finished.get("weight_decay")) != (lr, weight_decay):
            raise HetCompError(f"{run_dir} was trained with lr {finished.get('lr')} and weight decay "
                               f"{finished.get('weight_decay')}, but this run asks for lr {lr} and weight decay "
                               f"{weight_decay} (a default changed since); move the folder away to retrain")
        capped = finished.get("stopped_by") == "max_epochs"
        if capped and finished.get("max_epochs") != max_epochs:
            raise HetCompError(f"{run_dir} holds a run stopped by its epoch cap ({finished['max_epochs']}), not by "
                               f"early stopping; delete the folder to train with --max-epochs {max_epochs}")
        return finished
    if not train:
        return None
    torch.manual_seed(seed)
    model = build_model(student, split.train, dim=dim)
    context = DistillContext(split, trajectories, device, ensemble, batch_users)
    objective = build_method(method, context, **(method_options or {}))
    config = TrainerConfig(lr=lr, weight_decay=weight_decay, max_epochs=max_epochs, eval_every=eval_every,
                           patience=patience, top_m=objective.evaluation_top_m, seed=seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, split, objective, config, device, callbacks, run_dir)
    started = time.perf_counter()
    state = trainer.fit()
    final = trainer.evaluate()
    history = state.history
    result = {
        "run": name, "dataset": split.meta["dataset"], "split_fingerprint": split.fingerprint, "student": student,
        "method": method, "dim": dim, "seed": seed, "split_seed": split.meta.get("seed", 0),
        "teachers": context.teacher_names,
        "method_options": method_options or {}, "ensemble": vars(context.ensemble), "lr": lr,
        "batch_users": batch_users, "weight_decay": weight_decay,
        "best_epoch": state.best_epoch, "epochs": state.epoch, "max_epochs": max_epochs,
        "stopped_by": "early stopping" if state.stopped else "max_epochs",
        "valid": final["valid"], "test": final["test"],
        "n_parameters": model.n_parameters(), "train_seconds": round(state.seconds, 1),
        "eval_seconds": round(state.eval_seconds, 1),
        # training + evaluation over every resumed segment (a resumed run's own call is shorter)
        "wall_seconds": round(state.seconds + state.eval_seconds, 1),
        "this_call_seconds": round(time.perf_counter() - started, 1),
        "seconds_per_epoch": round(state.seconds / max(state.epoch, 1), 3),
        "peak_memory_mb": round(peak_memory_mb()),  # of this process (the whole run when it ran alone)
        "command": command, "commit": git_commit(), "code_digest": CODE_DIGEST, "machine": machine(),
        "curve": [{"epoch": h["epoch"], "valid_recall@50": h["valid"]["recall@50"],
                   "test_recall@50": h["test"]["recall@50"]} for h in history],
    }
    if hasattr(objective, "knowledge"):
        result["dkc_log"] = objective.knowledge.log
    torch.save(model.state_dict(), run_dir / "student.pt")
    tmp = metrics_file.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(metrics_file)
    (run_dir / "last.pt").unlink(missing_ok=True)
    return result
