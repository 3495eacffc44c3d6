"""Prototype for issue 17's "several seeds in one process": R seeds of the w/o KD MF student trained as one
stacked model, to measure what it buys before any method is changed.

The student's own code is reused unchanged: ``torch.func.stack_module_state`` stacks R MF students (seeds
0..R-1) and ``torch.func.vmap(functional_call(...))`` evaluates ``MF.loss`` on R batches at once, so one kernel
launch serves R runs. The draws stay the runs' own: each replica permutes its interactions and samples its
negatives with its own CPU generator (R sampler calls per step: a loop over seeds, not over users). One Adam
steps the stacked parameters; Adam is elementwise, so each replica's update is its own.

Reports the seconds per epoch of one ordinary run (the project's Trainer) and of R = 1, 5, 15 stacked seeds
(seconds per epoch per seed), and how far replica 0 is from the ordinary run of seed 0 after the timed epochs
(max |Δ| of the user embeddings: the batched kernels may sum in another order). Writes ``$OUT/replicas.md``.

With ``--share N`` it measures instead whether stacking and sharing the device add up: N processes (under CUDA
MPS with ``--mps``) each train R stacked seeds, their timed epochs started together, for each R of
``--replicas``; reported as seed-epochs per second of all processes together (``$OUT/replicas-shared.md``).

Usage: OUT=<folder> python experiments/plans/replica_prototype.py [--device cuda] [--epochs 3]
       [--share 16 --mps --replicas 1,5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch
from torch.func import functional_call, stack_module_state, vmap

from hetcomp.data import load_dataset
from hetcomp.device import resolve_device
from hetcomp.distill import DistillContext, build_method
from hetcomp.models import build_model
from hetcomp.provenance import machine
from hetcomp.train import Trainer, TrainerConfig

LR = 0.007
BATCH = 1024  # w/o KD's interaction batch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ordinary(split, device: torch.device, epochs: int) -> tuple[float, torch.Tensor]:
    """The project's own w/o KD run of seed 0: seconds per epoch and its user embeddings after ``epochs``."""
    torch.manual_seed(0)
    model = build_model("mf", split.train, dim=6)
    method = build_method("none", DistillContext(split, [], device, needs_teachers=False))
    trainer = Trainer(model, split, method, TrainerConfig(lr=LR, seed=0), device)
    sync(device)
    started = time.perf_counter()
    for _ in range(epochs):
        trainer.train_epoch()
    sync(device)
    return (time.perf_counter() - started) / epochs, model.user_embedding.weight.detach().cpu()


class Loss(torch.nn.Module):
    """``functional_call`` calls ``forward``: here the student's own loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model.loss(batch)


def stacked(split, device: torch.device, replicas: int, epochs: int,
            start_at: float | None = None) -> tuple[float, torch.Tensor]:
    """R seeds as one stacked model: seconds per epoch (all seeds) and replica 0's user embeddings.

    With ``start_at`` (a ``time.time()``), one untimed warm-up epoch runs first and the timed epochs wait for it.
    """
    models = []
    for seed in range(replicas):
        torch.manual_seed(seed)
        models.append(Loss(build_model("mf", split.train, dim=6).to(device)))
    params, buffers = stack_module_state(models)
    base = Loss(build_model("mf", split.train, dim=6)).to("meta")
    optimizer = torch.optim.Adam(params.values(), lr=LR)

    def one(p, b, batch):
        return functional_call(base, (p, b), (batch,))

    batched_loss = vmap(one, in_dims=(0, 0, 0))
    context = DistillContext(split, [], device, needs_teachers=False)
    lengths = context.train_indptr[1:] - context.train_indptr[:-1]
    users = torch.repeat_interleave(torch.arange(context.n_users), lengths)
    generators = [torch.Generator().manual_seed(seed) for seed in range(replicas)]
    warm_up = 0 if start_at is None else 1
    for epoch in range(warm_up + epochs):
        if epoch == warm_up:
            sync(device)
            while start_at is not None and time.time() < start_at:
                time.sleep(0.01)
            started = time.perf_counter()
        orders = torch.stack([torch.randperm(len(users), generator=g) for g in generators])
        for start in range(0, len(users), BATCH):
            chosen = orders[:, start:start + BATCH]
            batch_users = users[chosen].to(device)
            negatives = torch.stack([context.sampler.sample(batch_users[r], 1, generators[r])
                                     for r in range(replicas)])
            batch = {"users": batch_users, "pos": context.train_indices[chosen].to(device), "neg": negatives}
            optimizer.zero_grad(set_to_none=True)
            batched_loss(params, buffers, batch).sum().backward()
            optimizer.step()
    sync(device)
    return (time.perf_counter() - started) / epochs, params["model.user_embedding.weight"][0].detach().cpu()


def shared_worker(device_name: str, replicas: int, epochs: int, start_at: float, queue) -> None:
    torch.set_num_threads(1)
    seconds, _ = stacked(load_dataset("citeulike"), torch.device(device_name), replicas, epochs, start_at)
    queue.put(seconds * epochs)


def share(args: argparse.Namespace) -> None:
    """N processes of R stacked seeds each, timed together: do stacking and sharing the device add up?"""
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_overhead import multi_process_service

    out = Path(os.environ.get("OUT", ".")) / "replicas-shared.md"
    with multi_process_service(args.mps) as sharing:
        lines = [f"# Stacked seeds in processes sharing {args.device} ({sharing})", "",
                 f"machine: {machine()}, {os.cpu_count()} CPUs; w/o KD MF dim 6, {args.epochs} timed epochs", "",
                 "| processes | seeds stacked in each | seed-epochs/s, all together | s per epoch per process |",
                 "|---|---|---|---|"]
        context = multiprocessing.get_context("spawn")
        for replicas in (int(r) for r in args.replicas.split(",")):
            queue = context.Queue()
            start_at = time.time() + 15 + 0.5 * args.share  # every process loads, stacks and warms up first
            processes = [context.Process(target=shared_worker,
                                         args=(args.device, replicas, args.epochs, start_at, queue))
                         for _ in range(args.share)]
            for process in processes:
                process.start()
            seconds = [queue.get() for _ in processes]
            for process in processes:
                process.join()
            lines.append(f"| {args.share} | {replicas} | {args.share * replicas * args.epochs / max(seconds):.2f} | "
                         f"{sum(seconds) / len(seconds) / args.epochs:.3f} |")
            out.write_text("\n".join(lines) + "\n")
            print(lines[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--replicas", default="1,5,15")
    parser.add_argument("--share", type=int, default=0, help="processes sharing the device (0: one process)")
    parser.add_argument("--mps", action="store_true", help="with --share: the processes under CUDA MPS")
    args = parser.parse_args()
    if args.share:
        share(args)
        return
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    split = load_dataset("citeulike")
    out = Path(os.environ.get("OUT", ".")) / "replicas.md"
    lines = [f"# w/o KD MF (dim 6) seeds stacked in one process, {device}", "",
             f"machine: {machine()}; {args.epochs} timed epochs each", "",
             "| what | s per epoch | s per epoch per seed | replica 0 vs the ordinary seed-0 run, max abs diff |",
             "|---|---|---|---|"]
    one_run, reference = ordinary(split, device, args.epochs)
    lines.append(f"| the ordinary run (Trainer) | {one_run:.3f} | {one_run:.3f} | - |")
    out.write_text("\n".join(lines) + "\n")
    for replicas in (int(r) for r in args.replicas.split(",")):
        seconds, first = stacked(split, device, replicas, args.epochs)
        lines.append(f"| {replicas} stacked seeds | {seconds:.3f} | {seconds / replicas:.3f} | "
                     f"{(first - reference).abs().max().item():.2e} |")
        out.write_text("\n".join(lines) + "\n")
        print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
