"""Where one student epoch's wall time goes, without the profiler (whose per-operator times misattribute on the
CPU: it charged ~8 ms to a [64, n_items] division that takes 0.8 ms timed in place): the method's batches, its
loss (forward), the backward pass and the optimizer step, timed around each call of one epoch after a warm-up
epoch; then, for the same epoch's batches, the forward's parts (the methods' own functions, wrapped).

The epoch is also given in the process's CPU time: on a machine whose cores other work shares, the wall time
counts the moments the process waits for a core.

Usage: python experiments/plans/epoch_parts.py --dataset foursquare --method kd --student mf \
           [--teachers-dir teachers] [-o k=68 -o losses=listwise:1.0 ...] [--lr 0.002]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from hetcomp.cli.common import _parse_options
from hetcomp.config import parse_options
from hetcomp.data import load_dataset
from hetcomp.distill import DistillContext, build_method, method_class
from hetcomp.distill.dcd import DCD, CorrectionRequest
from hetcomp.models import build_model
from hetcomp.provenance import machine
from hetcomp.train import Trainer, TrainerConfig
from hetcomp.trajectory import load_trajectory

TEACHERS = ("mf", "ml", "dnn", "gnn", "ae", "iae")
PARTS = ("candidates", "own_loss", "score", "tail_and_listed_scores", "tail_logsumexp", "refresh", "correction_lists",
         "item_correction_lists", "sample_interactions")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="foursquare")
    parser.add_argument("--method", default="kd")
    parser.add_argument("--student", default="mf")
    parser.add_argument("--teachers-dir", type=Path, default=Path("teachers"))
    parser.add_argument("-o", dest="options", action="append", default=[])
    parser.add_argument("--lr", type=float, default=0.002)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    split, trajectories = one_thread_inputs(args.dataset, args.teachers_dir)
    options = parse_options(method_class(args.method).config_class, _parse_options(args.options), args.method)
    method = build_method(args.method, DistillContext(split, trajectories, "cpu"), **options)
    torch.manual_seed(args.seed)
    model = build_model(args.student, split.train, dim=6)
    trainer = Trainer(model, split, method, TrainerConfig(lr=args.lr, seed=args.seed), "cpu")
    trainer.train_epoch()

    spent = dict.fromkeys(("batches", "loss", "backward", "step"), 0.0)
    started, started_cpu = time.perf_counter(), time.process_time()
    method.on_epoch_start(trainer, 2)
    batches = iter(method.batches(2, trainer.generator))
    while True:
        clock = time.perf_counter()
        batch = next(batches, None)
        spent["batches"] += time.perf_counter() - clock
        if batch is None:
            break
        trainer.optimizer.zero_grad(set_to_none=True)
        clock = time.perf_counter()
        loss = method.loss(model, batch)
        spent["loss"] += time.perf_counter() - clock
        clock = time.perf_counter()
        loss.backward()
        spent["backward"] += time.perf_counter() - clock
        clock = time.perf_counter()
        trainer.optimizer.step()
        model.after_step()
        spent["step"] += time.perf_counter() - clock
    epoch, epoch_cpu = time.perf_counter() - started, time.process_time() - started_cpu

    parts: dict[str, float] = {}
    for owner in (method, method.context, model):
        for name in PARTS:
            if hasattr(owner, name) and name not in parts:
                parts[name] = 0.0
                setattr(owner, name, _timed(getattr(owner, name), name, parts))
    if isinstance(method, DCD):  # the corrections' scoring and loss, answered after their draws
        parts["correction_answers"] = 0.0
        CorrectionRequest.answer = _timed(CorrectionRequest.answer, "correction_answers", parts)
    for batch in method.batches(3, trainer.generator):
        trainer.optimizer.zero_grad(set_to_none=True)
        method.loss(model, batch)
    print(f"{args.method} {args.student} on {args.dataset}, {machine()}")
    print(f"epoch {epoch:.3f} s ({epoch_cpu:.3f} s of this process's CPU time, which a shared machine inflates "
          "less): " + ", ".join(f"{k} {v:.3f}" for k, v in spent.items()))
    print("forward parts: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items() if v))


def one_thread_inputs(dataset: str, teachers_dir: Path) -> tuple:
    """(the split, the six teachers' trajectories from ``teachers_dir/<dataset>``), torch held to one thread."""
    torch.set_num_threads(1)
    split = load_dataset(dataset)
    folder = teachers_dir / split.meta["dataset"]
    return split, [load_trajectory(folder / name / "trajectory.npz") for name in TEACHERS]


def _timed(function, name: str, parts: dict[str, float]):
    def timed(*args, **kwargs):
        clock = time.perf_counter()
        result = function(*args, **kwargs)
        parts[name] += time.perf_counter() - clock
        return result
    return timed


if __name__ == "__main__":
    main()
