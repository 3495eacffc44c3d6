"""Stacked seeds of a real method in processes sharing one GPU (issue 17, goal 5): what the whole table gains.

N processes (under CUDA MPS with ``--mps``) each train the same student run, either as one ordinary run
(``--replicas 1``: the project's Trainer) or as R seeds stacked (:class:`hetcomp.stacked.StackedTrainer`), their
timed epochs started together (a barrier, once every process has loaded and trained one warm-up epoch);
reported as seed-epochs per second of all processes together, the figure that divides the table's epochs. Needs
the dataset and its trained teachers.
Writes ``$OUT/stacked-share.md`` as it goes.

Usage: OUT=<folder> python experiments/plans/stacked_share.py --dataset citeulike --teachers-dir <folder>
           [--methods hetcomp,rrd] [--student mf] [--replicas 1,5] [--share 16] [--mps] [--epochs 3]
           [--device cuda] [--deadline 300] [--option kd.losses=listwise:1.0 ...]
(``--option METHOD.NAME=VALUE``: a method's setting other than its default, a JSON value or else a string; e.g.
KD stacks only with its listwise term.)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
import time
from pathlib import Path
from queue import Empty

import torch

from hetcomp.data import load_dataset
from hetcomp.device import resolve_device
from hetcomp.distill import DistillContext
from hetcomp.provenance import machine
from hetcomp.stacked import StackedTrainer, seed_trainers
from hetcomp.teachers import load_teachers


def worker(args: argparse.Namespace, method: str, replicas: int, ready, queue) -> None:
    torch.set_num_threads(1)
    device = resolve_device(args.device)
    split = load_dataset(args.dataset)
    context = DistillContext(split, load_teachers(split, args.teachers_dir), device)
    trainers = seed_trainers(split, context, args.student, method, range(replicas), **method_options(args, method))
    if replicas == 1:
        epoch = trainers[0].train_epoch
    else:
        stacked = StackedTrainer(trainers)

        def epoch() -> None:
            stacked.train_epoch(stacked.trainers)
    epoch()  # warm-up: allocations, kernels' first launch
    if device.type == "cuda":
        torch.cuda.synchronize()
    try:
        ready.wait(timeout=180)  # every process loaded, built and warmed up: the timed epochs start together
    except threading.BrokenBarrierError:
        return  # another process died: this row reports the missing ones
    started = time.perf_counter()
    for _ in range(args.epochs):
        epoch()
    if device.type == "cuda":
        torch.cuda.synchronize()
    queue.put(time.perf_counter() - started)


def method_options(args: argparse.Namespace, method: str) -> dict:
    """``--option METHOD.NAME=VALUE`` settings of ``method`` (VALUE as JSON where it parses, else a string)."""
    options = {}
    for text in args.option:
        key, _, value = text.partition("=")
        owner, _, name = key.partition(".")
        if owner == method:
            try:
                options[name] = json.loads(value)
            except json.JSONDecodeError:
                options[name] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", default="citeulike")
    parser.add_argument("--teachers-dir", type=Path, default=Path("teachers"))
    parser.add_argument("--methods", default="hetcomp,rrd")
    parser.add_argument("--student", default="mf")
    parser.add_argument("--replicas", default="1,5")
    parser.add_argument("--share", type=int, default=16)
    parser.add_argument("--mps", action="store_true")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds; later rows are skipped")
    parser.add_argument("--option", action="append", default=[], help="METHOD.NAME=VALUE, e.g. kd.own_weight=0.1")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_overhead import multi_process_service

    began = time.perf_counter()
    out = Path(os.environ.get("OUT", ".")) / "stacked-share.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with multi_process_service(args.mps) as sharing:
        lines = [f"# Stacked seeds of real methods in {args.share} processes sharing {args.device} ({sharing})", "",
                 f"machine: {machine()}, {os.cpu_count()} CPUs; {args.dataset}, {args.student} dim 6, "
                 f"{args.epochs} timed epochs after one warm-up; seeds 0..R-1; each method's defaults but the "
                 f"options; command: `{' '.join(sys.argv)}`",
                 "", "| method | seeds per process | seed-epochs/s, all together | s per epoch per process |",
                 "|---|---|---|---|"]
        out.write_text("\n".join(lines) + "\n")
        context = multiprocessing.get_context("spawn")
        for method in args.methods.split(","):
            for replicas in (int(r) for r in args.replicas.split(",")):
                if time.perf_counter() - began > args.deadline:
                    lines.append(f"| {method} | {replicas} | skipped: past the {args.deadline:.0f} s deadline | |")
                    continue
                queue = context.Queue()
                ready = context.Barrier(args.share)
                processes = [context.Process(target=worker, args=(args, method, replicas, ready, queue))
                             for _ in range(args.share)]
                for process in processes:
                    process.start()
                seconds = []
                for _ in processes:  # a process that dies reports nothing: the row says so instead of hanging
                    try:
                        seconds.append(queue.get(timeout=180 + 60 * args.epochs))
                    except Empty:
                        ready.abort()  # frees the processes still waiting for the one that died
                        break
                for process in processes:
                    process.join(10)
                    if process.is_alive():
                        process.kill()
                if len(seconds) < len(processes):
                    lines.append(f"| {method} | {replicas} | failed: {len(processes) - len(seconds)} process(es) "
                                 "reported nothing | |")
                    out.write_text("\n".join(lines) + "\n")
                    continue
                lines.append(f"| {method} | {replicas} | {args.share * replicas * args.epochs / max(seconds):.2f} | "
                             f"{sum(seconds) / len(seconds) / args.epochs:.3f} |")
                out.write_text("\n".join(lines) + "\n")
                print(lines[-1], flush=True)
        out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
