"""Time batches of CL-DRD without sampling (LambdaMRR of the ensemble's list against every unobserved item):
``method.loss`` and ``backward`` on a student's saved weights (a trained student's scores spread as in a real run;
a fresh one's are near ties), one thread, after one warm-up batch. Prints the seconds, the loss sum and the last
gradient's norm, so two packages (``PYTHONPATH=<worktree>``) can be compared value for value.

Usage: python experiments/plans/cl_drd_unsampled_batches.py --dataset foursquare --student mf \
           --weights <runs>/foursquare/mf-rrd-6-0-<id>/student.pt [--teachers-dir teachers] [--batches 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from epoch_parts import one_thread_inputs  # this folder's script: run as a script, not a module

import hetcomp
from hetcomp.distill import DistillContext, build_method
from hetcomp.models import build_model
from hetcomp.provenance import machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="foursquare")
    parser.add_argument("--student", default="mf")
    parser.add_argument("--dim", type=int, default=6)
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--teachers-dir", type=Path, default=Path("teachers"))
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args()
    split, trajectories = one_thread_inputs(args.dataset, args.teachers_dir)
    method = build_method("cl-drd-full", DistillContext(split, trajectories, "cpu"), top_n=100,
                          stages="5,10,20")
    method.on_epoch_start(None, 1)
    model = build_model(args.student, split.train, dim=args.dim)
    model.load_state_dict(torch.load(args.weights))
    draws = method.batches(1, torch.Generator().manual_seed(0))
    batches = [batch for _, batch in zip(range(args.batches + 1), draws, strict=False)]
    loss_sum, started = 0.0, 0.0
    for index, batch in enumerate(batches):
        if index == 1:
            started = time.perf_counter()
        model.zero_grad(set_to_none=True)
        loss = method.loss(model, batch)
        loss.backward()
        loss_sum += loss.item() if index else 0.0
    seconds = time.perf_counter() - started
    norm = sum(parameter.grad.norm() ** 2 for parameter in model.parameters() if parameter.grad is not None) ** 0.5
    print(f"{Path(hetcomp.__file__).parent.parent}, {machine()}: {len(batches) - 1} batches {seconds:.2f} s, "
          f"loss sum {loss_sum:.9f}, last gradient norm {norm:.9f}")


if __name__ == "__main__":
    main()
