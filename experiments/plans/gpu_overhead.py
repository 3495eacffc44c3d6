"""Where a student epoch's time goes on a GPU (issue 17, goal 5): is it the device's work or the launches?

Measures, for the w/o KD MF student (dim 6, no teachers needed; 78 steps of 1,024 interactions per epoch) on
CiteULike: one process's epoch time, one epoch under torch.profiler (kernels launched, device time against wall
time), and the epochs per second of N processes training at once on the same device, optionally under CUDA's
multi-process service (``--mps``: a user-space daemon started for this test and stopped after it, which lets
the processes' kernels run side by side instead of time-slicing the device; the card's settings are untouched).
Writes a Markdown table to ``$OUT/overhead.md`` as it goes.

Usage: OUT=<folder> python experiments/plans/gpu_overhead.py [--device cuda] [--deadline 110] [--mps]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import time
from contextlib import contextmanager
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


def make_trainer(device: torch.device) -> Trainer:
    split = load_dataset("citeulike")
    context = DistillContext(split, [], device, needs_teachers=False)
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
    trainer = make_trainer(device)
    trainer.train_epoch()
    sync(device)
    while time.time() < start_at:  # every process starts its timed epochs together
        time.sleep(0.01)
    started = time.perf_counter()
    for _ in range(epochs):
        trainer.train_epoch()
    sync(device)
    queue.put(time.perf_counter() - started)


@contextmanager
def multi_process_service(on: bool):
    """CUDA MPS for the duration of the block (its pipe and log folders under /tmp); yields a label."""
    if not on:
        yield "time-sliced (no MPS)"
        return
    control = shutil.which("nvidia-cuda-mps-control")
    if control is None:
        yield "MPS asked for, but nvidia-cuda-mps-control is not installed: time-sliced"
        return
    for name in ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY"):
        os.environ[name] = f"/tmp/{name.lower()}"
        os.makedirs(os.environ[name], exist_ok=True)
    started = subprocess.run([control, "-d"], capture_output=True, text=True)
    try:
        yield "MPS" if started.returncode == 0 else f"MPS failed to start ({started.stderr.strip()}): time-sliced"
    finally:
        subprocess.run([control], input="quit\n", text=True, capture_output=True)
        # the server exits after the control daemon: a service started at once after this one (the next test)
        # found no GPU on 2026-12-04, so give the old one time to go
        time.sleep(5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--deadline", type=float, default=110.0, help="seconds; later steps are skipped")
    parser.add_argument("--processes", default="1,4,8,16")
    parser.add_argument("--epochs", type=int, default=5, help="timed epochs per process in the sharing test")
    parser.add_argument("--mps", action="store_true", help="the sharing test alone, under CUDA MPS")
    args = parser.parse_args()
    with multi_process_service(args.mps) as sharing:  # before anything touches CUDA in this process
        measure(args, sharing)


def measure(args: argparse.Namespace, sharing: str) -> None:
    began = time.perf_counter()
    torch.set_num_threads(1)  # like every run of a shared-device grid; the device does the arithmetic
    device = resolve_device(args.device)
    out = Path(os.environ.get("OUT", ".")) / "overhead.md"
    lines = [f"# Student epoch overhead on {device}", "", f"machine: {machine()}, {os.cpu_count()} CPUs", ""]

    def write(*new: str) -> None:
        lines.extend(new)
        out.write_text("\n".join(lines) + "\n")
        print(*new, sep="\n", flush=True)

    if not args.mps:  # this process would hold a CUDA context outside the service
        trainer = make_trainer(device)
        write(f"one process: {epoch_seconds(trainer, device):.3f} s per epoch")
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
        launches = sum(e.count for e in events
                       if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        write("", f"one epoch under the profiler: {wall:.3f} s wall, {device_us / 1e6:.3f} s of device time, "
              f"{launches} kernel launches", "", "top operators by CPU time:", "```",
              events.table(sort_by="self_cpu_time_total", row_limit=12), "```", "")
    write(f"| processes sharing the device, {sharing} | epochs/s, all together | s per epoch, each |", "|---|---|---|")
    share(args, device, began, write)


def share(args: argparse.Namespace, device: torch.device, began: float, write) -> None:
    """The sharing test: N processes start their timed epochs together; one row per N."""
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
