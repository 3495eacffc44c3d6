"""How many operators one training step dispatches, by part, ordinary and stacked (issue 17, goal 5).

A student epoch on a GPU is host-bound (each operator a microsecond kernel behind ~10 µs of dispatch), so the ops a
step dispatches predict its GPU time better than its CPU time does, and they can be counted on any machine. Counts
top-level ``aten::`` operators (views included, nested ones not) under ``torch.profiler`` on a tiny generated
split, per step of an epoch after a warm-up epoch, split into the parts of the step (the own loss's draws, the
student's loss, its scoring, the tail node, the backward pass, the optimizer; ``other`` is the method's own
arithmetic), then the same for R seeds stacked (``hetcomp.stacked``), per replica.

Usage: python experiments/plans/step_ops.py [--methods none,hetcomp,rrd,mtd,dcd,kd,rd,cl-drd] [--students mf,dnn]
           [--replicas 5]
           [--dataset foursquare --teachers-dir teachers]   (64-user batches of the real data: fewer sampler rounds)
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import make_tiny_split, train_tiny_teachers  # noqa: E402

from hetcomp.distill import DistillContext, build_method  # noqa: E402
from hetcomp.models import build_model  # noqa: E402
from hetcomp.stacked import StackedTrainer  # noqa: E402
from hetcomp.train import Trainer, TrainerConfig  # noqa: E402

OPTIONS = {"none": {}, "hetcomp": {"k": 20, "pos_k": 5, "dkc_k": 10, "period": 2}, "rrd": {"k": 10},
           "mtd": {"k": 10}, "dcd": {"k": 10, "n_under": 3, "n_over": 3, "sides": "both"},
           "kd": {"k": 10, "n_neg": 10, "losses": "listwise:1.0", "own_weight": 0.1},
           "rd": {"k": 10, "dynamic": True, "dynamic_start": 0},
           "cl-drd": {"stages": "3,5", "list_size": 12, "top_n": 20}}
PARTS = {"sample_interactions": "own draws", "loss": "student loss", "score": "scoring",
         "tail_and_listed_scores": "tail node", "tail_logsumexp": "tail node"}


def _context(split, teachers, method: str, batch_users: int) -> DistillContext:
    return DistillContext(split, teachers if method != "none" else [], "cpu", batch_users=batch_users,
                          needs_teachers=method != "none")


def _trainer(context: DistillContext, student: str, method: str, seed: int) -> Trainer:
    """A seed's trainer; a stack's share one context, as ``hetcomp.runs.execute.train_stack``'s do."""
    torch.manual_seed(seed)
    model = build_model(student, context.split.train, dim=4)
    objective = build_method(method, context, **OPTIONS[method])
    return Trainer(model, context.split, objective, TrainerConfig(lr=0.01, seed=seed,
                                                                  top_m=objective.evaluation_top_m), "cpu")


def _marked(owner, name: str, label: str):
    """Wrap ``owner.name`` so that the ops it dispatches fall under a profiler range named after ``label``;
    returns what undoes it."""
    function = owner.__dict__[name] if name in vars(owner) else None
    bound = getattr(owner, name)

    def marked(*args, **kwargs):
        with record_function("PART:" + label):
            return bound(*args, **kwargs)

    setattr(owner, name, marked)
    return lambda: setattr(owner, name, function) if function is not None else delattr(owner, name)


def _count(epoch) -> collections.Counter:
    epoch()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        epoch()
    parts: collections.Counter = collections.Counter()
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue
        part = "other"
        while parent is not None:
            if parent.name.startswith("PART:"):
                part = parent.name[5:]
                break
            if parent.name.startswith("autograd::engine"):
                part = "backward"
                break
            if "Optimizer.step" in parent.name:
                part = "optimizer"
                break
            parent = parent.cpu_parent
        parts[part] += 1
    return parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", default="none,hetcomp,rrd,mtd,dcd,kd,rd,cl-drd")
    parser.add_argument("--students", default="mf,dnn")
    parser.add_argument("--replicas", type=int, default=5)
    parser.add_argument("--dataset", default=None, help="a registered dataset (with --teachers-dir); default: a "
                                                        "tiny generated split, 10%% dense (more sampler rounds)")
    parser.add_argument("--teachers-dir", type=Path, default=Path("teachers"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    batch_users = 16
    if args.dataset is None:
        split = make_tiny_split(n_users=80, n_items=120)
        teachers = train_tiny_teachers(split, Path(tempfile.mkdtemp()), ("mf", "ml"), top_m=40, max_epochs=20)
    else:
        from hetcomp.data import load_dataset
        from hetcomp.teachers import load_teachers

        split = load_dataset(args.dataset)
        teachers = load_teachers(split, args.teachers_dir, ["mf", "ml", "dnn", "gnn", "ae", "iae"])
        batch_users = 64
    order = ["own draws", "student loss", "scoring", "tail node", "other", "backward", "optimizer"]
    print(f"| student | method | ops per step | {' | '.join(order)} | stacked ×{args.replicas}, per replica |")
    print("|---|---|---|" + "---|" * len(order) + "---|")
    for student in args.students.split(","):
        for method in args.methods.split(","):
            ordinary = _trainer(_context(split, teachers, method, batch_users), student, method, 0)
            steps = sum(1 for _ in ordinary.objective.batches(1, torch.Generator().manual_seed(0)))
            context, model_class = ordinary.objective.context, type(ordinary.model)
            undo = [_marked(owner, name, PARTS[name])
                    for owner, name in ((context, "sample_interactions"), (context, "tail_and_listed_scores"),
                                        (context, "tail_logsumexp"), (model_class, "loss"), (model_class, "score"))]
            counts = _count(ordinary.train_epoch)
            for step in reversed(undo):
                step()
            shared = _context(split, teachers, method, batch_users)
            stack = StackedTrainer([_trainer(shared, student, method, seed) for seed in range(args.replicas)])
            epoch = lambda stack=stack: stack.train_epoch(stack.trainers)  # noqa: E731
            stacked = sum(_count(epoch).values()) / steps / args.replicas
            total = sum(counts.values()) / steps
            cells = " | ".join(f"{counts[part] / steps:.0f}" for part in order)
            print(f"| {student} | {method} | {total:.0f} | {cells} | {stacked:.0f} ({total / stacked:.2f}×) |")


if __name__ == "__main__":
    main()
