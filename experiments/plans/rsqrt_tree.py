"""Every lower/upper choice of a teacher's open RSQRTSS buckets in one fork tree, each leaf ending with its digest.

Why: `rsqrt_model.py run` tries one table per training (~5 min for CiteULike's user autoencoder), and its six open
buckets have 64 choices. The square root meets those buckets only at a few dropout counts (4j), first at known
training steps (`when`); before a bucket's first input every choice is the same run, so the process forks there
(the child takes the upper 13-bit candidate, the parent the lower one, then waits for the child) and the tree
costs about a third less than 64 trainings. Each leaf stops at the committed teacher's converged epoch, where the
teacher's own end-of-training code makes its trajectory (states chosen as if training ended there), and appends
its choices and digest to ``OUT/leaves.jsonl``. A leaf whose best epoch is not that epoch cannot be the committed
teacher and records no digest. Experiment only: a choice found here goes into the library and is confirmed by a
plain ``train-teachers`` run.

    python experiments/plans/rsqrt_tree.py when /work/logs/cu-ae-events.json   # first training step per bucket
    python experiments/plans/rsqrt_tree.py tree /work/logs/rsqrt-tree --leaf-epoch 95

Both run ``hetcomp train-teachers --dataset citeulike --teachers ae --threads 1`` (HETCOMP_DATA set) in a
scratch teachers folder; ``tree`` through :mod:`hetcomp.mkl_as_amd`'s library built with a writable table (the
model at its shift elsewhere), so that each branch sets its buckets' values in its own copy of the process.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
from pathlib import Path

from hetcomp import mkl_as_amd

#: the user autoencoder's open buckets (`rsqrt_model.py buckets cu-ae.json --pinned fs-ae.json fs-iae.json
#: cu-iae.json`) by the training inputs that meet them: dropout keeps j of a user's items and scales each by 2, so
#: the row norm is sqrt(4j); j = 201, 399, 406, 418, 594, 621 (no user has exactly as many training items, so
#: evaluation never meets them)
OPEN = {804.0: 3.140625, 1596.0: 1.55859375, 1624.0: 1.5859375, 1672.0: 1.6328125, 2376.0: 2.3203125,
        2484.0: 2.42578125}
COMMAND = ["train-teachers", "--dataset", "citeulike", "--teachers", "ae", "--threads", "1",
           "--teachers-dir", "tdir"]


def _wrap_encode(on_norms) -> None:
    """Call ``on_norms(squared norms)`` before each training batch's row-norm square root (dropout on)."""
    import torch

    import hetcomp.models.base as base

    plain_sqrt, plain_encode = torch.Tensor.sqrt, base.CSRRows.encode
    inside = [False]

    def sqrt(self, *args, **kwargs):
        if inside[0]:
            on_norms(self.detach())
        return plain_sqrt(self, *args, **kwargs)

    def encode(self, rows, weight, dropout, training):
        inside[0] = training and dropout > 0
        try:
            return plain_encode(self, rows, weight, dropout, training)
        finally:
            inside[0] = False

    torch.Tensor.sqrt, base.CSRRows.encode = sqrt, encode


def _app(cache_dir: Path) -> None:
    import rich.progress

    import hetcomp.cli.teachers as cli_teachers
    from hetcomp.cli import app

    # no live display: its refresh thread could hold the console's lock at a fork
    cli_teachers.make_progress = lambda: rich.progress.Progress(auto_refresh=False, disable=True)
    sys.argv = ["hetcomp", *COMMAND, "--cache-dir", str(cache_dir)]
    app()


def when(out: Path, cache_dir: Path) -> None:
    """Each training batch that meets an open bucket: (batch number from 1, the input, the rows)."""
    import atexit

    events, batches = [], [0]

    def on_norms(norms):
        batches[0] += 1
        for value in OPEN:
            rows = (norms == value).nonzero().flatten().tolist()
            if rows:
                events.append((batches[0], value, rows))

    _wrap_encode(on_norms)
    atexit.register(lambda: out.write_text(json.dumps({"batches": batches[0], "events": events})))
    os.chdir(out.parent)
    _app(cache_dir)


def tree(out: Path, cache_dir: Path, shift: float, leaf_epoch: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    code = mkl_as_amd.source(mkl_as_amd.bucket_rsqrt(shift)).replace("static const uint32_t rsqrt_values",
                                                                     "uint32_t rsqrt_values")
    env = mkl_as_amd.environment(code=code)
    env["RSQRT_TREE_LIBRARY"] = str(mkl_as_amd.library(code=code))
    os.chdir(out)
    os.execve(sys.executable, [sys.executable, __file__, "grow", str(out), "--cache-dir", str(cache_dir),
                               "--shift", str(shift), "--leaf-epoch", str(leaf_epoch)], env)


def grow(out: Path, cache_dir: Path, shift: float, leaf_epoch: int) -> None:
    import torch

    import hetcomp.teachers as teachers
    from hetcomp.runs.spec import trajectory_digest

    starts, values = mkl_as_amd.bucket_rsqrt(shift)
    lower, upper = mkl_as_amd.candidates()
    live = (ctypes.c_uint32 * len(values)).in_dll(ctypes.CDLL(os.environ["RSQRT_TREE_LIBRARY"]), "rsqrt_values")
    index = {m: mkl_as_amd.bucket_of(starts, m) for m in OPEN.values()}
    assert all(live[i] == values[i] for i in index.values())  # the preloaded table is the one built here
    choice: dict[float, str] = {}
    root, first_fork = os.getpid(), [True]

    def decide(m: float) -> None:
        i = index[m]
        child = os.fork()
        if child == 0:
            choice[m], live[i] = "U", int(upper[i])
            branch = out / f"b{os.getpid()}"
            shutil.copytree(Path.cwd() / "tdir", branch / "tdir")  # the run so far: snapshots, checkpoints
            os.chdir(branch)
        else:
            choice[m], live[i] = "L", int(lower[i])
            if not first_fork[0]:
                os.waitpid(child, 0)  # depth first; the root's two first subtrees run side by side
        first_fork[0] = False

    def on_norms(norms):
        for value in torch.unique(norms).tolist():
            if OPEN.get(value) is not None and OPEN[value] not in choice:
                decide(OPEN[value])

    _wrap_encode(on_norms)
    plain_on_evaluate = teachers.TrajectoryRecorder.on_evaluate

    def on_evaluate(self, trainer, epoch, result, improved):
        plain_on_evaluate(self, trainer, epoch, result, improved)
        if epoch < leaf_epoch:
            return
        leaf = {"choice": {str(m): side for m, side in choice.items()}, "best": trainer.state.best_epoch}
        if trainer.state.best_epoch == leaf_epoch:
            trainer.model.load_state_dict(trainer.best_state)  # as the trainer's fit end does
            self.on_fit_end(trainer)
            leaf |= {"digest": trajectory_digest(self.trajectory)[:12], "states": self.trajectory.meta["state_epochs"]}
        with open(out / "leaves.jsonl", "a") as file:
            file.write(json.dumps(leaf) + "\n")
        if os.getpid() != root:
            shutil.rmtree(Path.cwd(), ignore_errors=True)
            os._exit(0)
        raise SystemExit(0)

    teachers.TrajectoryRecorder.on_evaluate = on_evaluate
    try:
        _app(cache_dir)
    finally:
        if os.getpid() == root:
            while True:
                try:
                    os.wait()
                except ChildProcessError:
                    break


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("verb", choices=["when", "tree", "grow"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--cache-dir", type=Path, default=Path("datasets/cache"))
    parser.add_argument("--shift", type=float, default=mkl_as_amd.AMD_RSQRT_MODEL_SHIFT,
                        help="the model's shift, for every other bucket")
    parser.add_argument("--leaf-epoch", type=int, default=95, help="the committed teacher's converged epoch")
    args = parser.parse_args()
    out, cache_dir = args.out.resolve(), args.cache_dir.resolve()
    if args.verb == "when":
        when(out, cache_dir)
    elif args.verb == "tree":
        tree(out, cache_dir, args.shift, args.leaf_epoch)
    else:
        grow(out, cache_dir, args.shift, args.leaf_epoch)


if __name__ == "__main__":
    main()
