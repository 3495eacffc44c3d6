"""The unsampled CL-DRD's rest term on one synthetic chunk of Foursquare's shape, by torch's passes and by the CPU
kernels: milliseconds a call (forward with its gradient, then the backward), and whether the two agree to the bit.

Usage: python experiments/plans/rest_chunk.py [--rows 9] [--items 28483] [--listed 100] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from hetcomp.distill import losses
from hetcomp.provenance import machine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=9)  # a chunk of lambda_mrr_rest_loss at 28,483 items
    parser.add_argument("--items", type=int, default=28483)
    parser.add_argument("--listed", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(args.rows, args.items, generator=generator)
    unobserved = torch.rand(args.rows, args.items, generator=generator) < 0.995
    # the list: a noisy copy's top, as an ensemble's top sits near (not at) the student's
    noisy = scores + 0.5 * torch.randn(args.rows, args.items, generator=generator)
    listed = noisy.masked_fill(~unobserved, -torch.inf).topk(args.listed, 1).indices
    labels = (1.0 / torch.arange(1, args.listed + 1, dtype=torch.float64)).expand(args.rows, -1)
    valid = torch.ones(args.rows, args.listed, dtype=torch.bool)

    def run(fused: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        losses._FUSED_REST = fused
        trained = scores.clone().requires_grad_()
        for repeat in range(args.repeats + 1):  # the first: warm-up (and the kernels' compilation or cache load)
            if repeat == 1:
                started = time.perf_counter()
            trained.grad = None
            value = losses.lambda_mrr_rest_loss(trained, unobserved, listed, labels, valid)
            value.sum().backward()
        return (time.perf_counter() - started) / args.repeats * 1e3, value.detach(), trained.grad

    by_torch, value_torch, gradient_torch = run(False)
    by_kernels, value_kernels, gradient_kernels = run(True)
    print(f"rest term, {args.rows} rows x {args.items} items, N = {args.listed}; {machine()}")
    print(f"torch's passes {by_torch:.1f} ms, CPU kernels {by_kernels:.1f} ms ({by_torch / by_kernels:.2f}x); "
          f"same bits: values {torch.equal(value_torch, value_kernels)}, "
          f"gradients {torch.equal(gradient_torch, gradient_kernels)}")


if __name__ == "__main__":
    main()
