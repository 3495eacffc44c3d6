"""`hetcomp bench`: wall-clock timings of the toolkit's hot paths on a real dataset."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from hetcomp.data import load_dataset
from hetcomp.device import keep_freed_memory, peak_memory_mb
from hetcomp.distill import METHODS, DistillContext, build_method
from hetcomp.errors import HetCompError
from hetcomp.metrics import evaluate_split
from hetcomp.models import build_model
from hetcomp.provenance import machine, packages
from hetcomp.stacked import StackedTrainer, seed_trainers
from hetcomp.teachers import load_teachers
from hetcomp.train import OwnLoss, Trainer, TrainerConfig
from hetcomp.trajectory import TrajectoryError


def timed(function: Callable[[], object], repeat: int = 1, enough: float = float("inf")) -> float:
    """Best wall time of ``repeat`` calls (seconds); a call slower than ``enough`` seconds is not repeated."""
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        if torch.cuda.is_available():  # CUDA work is asynchronous: wait for it before reading the clock
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
        if best > enough:
            break
    return best


def run_bench(dataset: str, data_dir: Path | None, cache_dir: Path | None, teachers_dir: Path,
              device: torch.device, teacher: str = "mf", student: str = "mf", methods: list[str] | None = None,
              report: Callable[[str, float], None] = lambda name, seconds: None) -> dict[str, float]:
    """Time loading, evaluation, a teacher epoch, a student epoch per method and one DKC check."""
    torch.set_flush_denormal(True)
    keep_freed_memory()
    out: dict[str, float] = {"machine": machine(), "packages": packages()}  # type: ignore[dict-item]

    def record(name: str, seconds: float) -> None:
        out[name] = seconds
        report(name, seconds)

    record("load and split (no cache)", timed(lambda: load_dataset(dataset, data_dir=data_dir, use_cache=False)))
    split = load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir)
    record("load split (cached)", timed(lambda: load_dataset(dataset, data_dir=data_dir, cache_dir=cache_dir), 3))
    generator = torch.Generator().manual_seed(0)
    for dim, who in ((64, "a dim-64 teacher"), (6, "a dim-6 student")):
        user_factors = torch.randn(split.n_users, dim, generator=generator).to(device)
        item_factors = torch.randn(split.n_items, dim, generator=generator).to(device)
        score = lambda batch, u=user_factors, v=item_factors: u[batch] @ v.T  # noqa: E731
        record(f"full evaluation, valid + test R/N@10/50, all users ({who}'s scores)",
               timed(lambda s=score: evaluate_split(s, split, device=device), 2))
    record("full-tail floor of a student epoch (dim 6, 64-user batches: score, exp, sum, gradient products)",
           timed(lambda: full_tail_floor(split.n_users, split.n_items, 6, 64, device), 2))
    model = build_model(teacher, split.train, dim=64)
    objective = OwnLoss(model, split, model.config.batch_size, model.config.n_negatives, device)
    trainer = Trainer(model, split, objective, TrainerConfig(lr=model.config.lr), device)
    record(f"teacher epoch ({teacher}, dim 64)", timed(trainer.train_epoch))
    _time_stacked(split, student, "none", DistillContext(split, [], device, needs_teachers=False), record)
    try:
        trajectories = load_teachers(split, teachers_dir)
    except TrajectoryError as error:
        report(f"student epochs and DKC skipped: {error}", float("nan"))
        return _with_peak_memory(out, device, report)
    context = DistillContext(split, trajectories, device)
    for name in methods or METHODS:
        method = build_method(name, context)
        student_model = build_model(student, split.train, dim=6)
        student_trainer = Trainer(student_model, split, method, TrainerConfig(top_m=method.evaluation_top_m),
                                  device)
        record(f"student epoch ({student} dim 6, {name})", timed(student_trainer.train_epoch))
        if name != "none":
            _time_stacked(split, student, name, context, record)
        if name in STACKING_VARIANTS:  # a method whose defaults do not stack: its variant that does, both ways
            variant, options = STACKING_VARIANTS[name]
            trainer = seed_trainers(split, context, student, name, [0], **options)[0]
            record(f"student epoch ({student} dim 6, {name} {variant})", timed(trainer.train_epoch))
            _time_stacked(split, student, name, context, record, variant, options)
        if hasattr(method, "knowledge"):
            ranking = student_trainer.evaluate(top_m=method.knowledge.config.k)["ranking"].to(device)
            method.knowledge.step(ranking, 10)
            record(f"DKC check ({len(trajectories)} teachers x {split.n_users} users)",
                   timed(lambda m=method, r=ranking: m.knowledge.step(r, 20), 3))
            record("rebuild of the dynamic top-K (g over current states)",
                   timed(lambda m=method: context.ensemble_topk(m.config.k, m.knowledge.v)))
    return _with_peak_memory(out, device, report)


STACKED_SEEDS = 5
#: settings under which a method whose defaults do not stack does (KD: with its listwise term, the menu every
#: CiteULike study chose), timed besides its defaults: (label, options)
STACKING_VARIANTS = {"kd": ("listwise", {"losses": "listwise:1.0", "own_weight": 0.1})}


def _time_stacked(split, student: str, method: str, context: DistillContext, record: Callable[[str, float], None],
                  variant: str = "", options: dict | None = None) -> None:
    """One epoch of seeds 0..4 of ``method`` (with ``options``) as one stacked model, per seed (nothing where it
    cannot stack)."""
    first = seed_trainers(split, context, student, method, [0], **(options or {}))
    if not (first[0].objective.stackable or first[0].objective.stackable_scores):
        return
    try:
        stacked = StackedTrainer(first + seed_trainers(split, context, student, method, range(1, STACKED_SEEDS),
                                                       **(options or {})))
    except HetCompError:  # a student that cannot be stacked
        return
    label = f"{method} {variant}" if variant else method
    record(f"student epoch ({student} dim 6, {label}), {STACKED_SEEDS} seeds stacked, per seed",
           timed(lambda: stacked.train_epoch(stacked.trainers)) / STACKED_SEEDS)


def full_tail_floor(n_users: int, n_items: int, dim: int = 6, batch_users: int = 64,
                    device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The passes over [batch, n_items] that any epoch of a loss over every item costs (RRD, HetComp's L_O / L_F,
    the KD menu's full softmax): per user batch, the scores (one product), log Σ e^s (exponentials and a sum) and
    its gradient (the softmax, then the user and item products), on random factors. No method can train an epoch
    of such a loss in less on this machine without fusing these passes; bench reports it beside the epochs.
    Returns the last batch's (user, item) gradients of log Σ e^s summed over its users (tested against autograd)."""
    generator = torch.Generator().manual_seed(0)
    users = (torch.randn(n_users, dim, generator=generator) * 0.1).to(device)
    items = (torch.randn(n_items, dim, generator=generator) * 0.1).to(device)
    grad_users = grad_items = torch.empty(0)
    for start in range(0, n_users, batch_users):
        batch = users[start:start + batch_users]
        scores = batch @ items.T
        peak = scores.amax(1, keepdim=True)
        softmax = scores.sub_(peak).mul_(1.4426950408889634).exp2_()  # e^x as 2^(x·log2 e): the faster kernel
        softmax.div_(softmax.sum(1, keepdim=True))
        grad_users, grad_items = softmax @ items, softmax.T @ batch
    return grad_users, grad_items


def _with_peak_memory(out: dict, device: torch.device, report: Callable[[str, float], None]) -> dict:
    out["peak memory (MB)"] = peak_memory_mb()
    report("peak memory (MB)", out["peak memory (MB)"])
    if device.type == "cuda":
        out["peak GPU memory (MB)"] = torch.cuda.max_memory_allocated(device) / 2**20
        report("peak GPU memory (MB)", out["peak GPU memory (MB)"])
    return out
