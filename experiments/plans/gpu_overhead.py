"""Where a student epoch's time goes on a GPU (issue 17, goal 5): is it the device's work or the launches?

Measures, for the w/o KD MF student (dim 6, no teachers needed) on CiteULike: the epoch time at several user
batch sizes (the work per epoch is the same, the number of launches falls with the batch), one epoch under
torch.profiler (kernels launched, device time against wall time), and the epochs per second of N processes
training at once on the same device. Writes a Markdown table to ``$OUT/overhead.md`` as it goes.

Usage: OUT=<folder> python experiments/plans/gpu_overhead.py [--device cuda] [--deadline 110]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import torch

from hetcomp.data import load_dataset
from hetcomp.device import resolve_device
from hetcomp.distill import DistillContext, build_method
from hetcomp.models import build_model
from hetcomp.provenance import machine
from hetcomp.train import Trainer, TrainerConfig


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_trainer(device: torch.device, batch_users: int) -> Trainer:
    split = load_dataset("citeulike")
    context = DistillContext(split, [], device, batch_users=batch_users, needs_teachers=False)
    method = build_method("none", context)
    model = build_model("mf", split.train, dim=6)
    return Trainer(model, split, method, TrainerConfig(lr=0.007), device)


def epoch_seconds(trainer: Trainer, device: torch.device, epochs: int = 3) -> float:
    trainer.train_epoch()  # warm-up: allocator, kernels' first launch
    sync(device)
    started = time.perf_counter()
    for _ in range(epochs):
        trainer.train_epoch()
    sync(device)
    return (time.perf_counter() - started) / epochs


def worker(device_name: str, epochs: int, start_at: float, queue) -> None:
    torch.set_num_threads(1)
    device = torch.device(device_name)
    trainer = make_trainer(device, 64)
    trainer.train_epoch()
    sync(device)
    while time.time() < start_at:  # every process starts its timed epochs together
        time.sleep(0.01)
    started = time.perf_counter()
    for _ in range(epochs):
        trainer.train_epoch()
    sync(device)
    queue.put(time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deadline", type=float, default=110.0, help="seconds; later steps are skipped")
    parser.add_argument("--processes", default="1,4,8,16")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per process in the sharing test")
    args = parser.parse_args()
    began = time.perf_counter()
    torch.set_num_threads(1)  # like every run of a shared-device grid; the device does the arithmetic
    device = resolve_device(args.device)
    out = Path(os.environ.get("OUT", ".")) / "overhead.md"
    lines = [f"# Student epoch overhead on {device}", "", f"machine: {machine()}, {os.cpu_count()} CPUs", ""]

    def write(*new: str) -> None:
        lines.extend(new)
        out.write_text("\n".join(lines) + "\n")
        print(*new, sep="\n", flush=True)

    write("| w/o KD MF dim 6, one process | epoch s |", "|---|---|")
    for batch in (64, 256, 1024, 5219):
        write(f"| {batch}-user batches | {epoch_seconds(make_trainer(device, batch), device):.3f} |")
    trainer = make_trainer(device, 64)
    trainer.train_epoch()
    sync(device)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    started = time.perf_counter()
    with torch.profiler.profile(activities=activities) as profile:
        trainer.train_epoch()
        sync(device)
    wall = time.perf_counter() - started
    events = profile.key_averages()
    device_us = sum(e.self_device_time_total for e in events if getattr(e, "self_device_time_total", 0))
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
    write("", f"one 64-user-batch epoch under the profiler: {wall:.3f} s wall, {device_us / 1e6:.3f} s of device "
          f"time, {launches} kernel launches", "", "top operators by CPU time:", "```",
          events.table(sort_by="self_cpu_time_total", row_limit=12), "```", "",
          "| processes sharing the device (64-user batches) | epochs/s, all together | s per epoch, each |",
          "|---|---|---|")
    context = multiprocessing.get_context("spawn")
    for count in (int(n) for n in args.processes.split(",")):
        if time.perf_counter() - began > args.deadline:
            write(f"| {count} | skipped: past the {args.deadline:.0f} s deadline | |")
            continue
        queue = context.Queue()
        start_at = time.time() + 8 + 0.3 * count  # time for every process to load and warm up
        processes = [context.Process(target=worker, args=(str(device), args.epochs, start_at, queue))
                     for _ in range(count)]
        for process in processes:
            process.start()
        seconds = [queue.get() for _ in processes]
        for process in processes:
            process.join()
        each = sum(seconds) / len(seconds) / args.epochs
        write(f"| {count} | {count * args.epochs / max(seconds):.2f} | {each:.3f} |")


if __name__ == "__main__":
    main()
