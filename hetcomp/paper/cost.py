"""The cost table: parameters and inference latency of the teachers, their ensemble and the students."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

from hetcomp.bench import timed
from hetcomp.data import Split
from hetcomp.distill import EnsembleConfig
from hetcomp.metrics import exclude_rows_, topk_items
from hetcomp.models import build_model
from hetcomp.paper.common import Reproduction
from hetcomp.paper.ledger import write_rows
from hetcomp.paper.manifest import write_manifest
from hetcomp.paper.teachers import ensure_teachers
from hetcomp.provenance import git_commit, machine
from hetcomp.teachers import teacher_dir


def inference_seconds(score_fn: Callable, split: Split, device: torch.device, k: int = 50,
                      batch_size: int = 1024) -> tuple[float, float]:
    """(seconds to score every user against every item, seconds to also take every user's top-k unobserved).

    The training items are masked in place in the fresh score table, as a serving system would.
    """

    def score_all(with_topk: bool) -> None:
        for start in range(0, split.n_users, batch_size):
            users = np.arange(start, min(start + batch_size, split.n_users))
            with torch.no_grad():
                scores = score_fn(torch.from_numpy(users).to(device))
                if with_topk:
                    topk_items(exclude_rows_(scores, split.train, users), k)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return timed(lambda: score_all(False), 3, enough=5.0), timed(lambda: score_all(True), 3, enough=5.0)


def load_teacher_model(rep: Reproduction, name: str):
    folder = teacher_dir(rep.teachers_dir, rep.split.meta["dataset"], name)
    saved = json.loads((folder / "config.json").read_text())
    model = build_model(saved["teacher"], rep.split.train, **saved["config"])
    model.load_state_dict(torch.load(folder / "best.pt", map_location="cpu", weights_only=True))
    return model


def cost_table(rep: Reproduction, students: Sequence[str] = ("mf", "ml", "dnn"), dim: int = 6) -> dict:
    """Parameters and inference latency (all users x all items, and with top-50) of teachers, ensemble, students."""
    started = time.perf_counter()
    trajectories = ensure_teachers(rep)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        teacher_cost = []
        for trajectory in trajectories:
            model = load_teacher_model(rep, trajectory.name).to(device).eval()
            score, top = inference_seconds(model.score, rep.split, device)
            teacher_cost.append((trajectory.name, model.n_parameters(), score, top))
            rows.append({"device": device.type, "model": f"teacher {trajectory.name}", "dim": model.config.dim,
                         "parameters": model.n_parameters(), "score_seconds": score, "top50_seconds": top})
        _, aggregate = inference_seconds(EnsembleConfig().scorer(rep.split, trajectories, device=device), rep.split,
                                         device)
        rows.append({"device": device.type, "model": "ensemble (every teacher's top-50, then g)", "dim": "-",
                     "parameters": sum(c[1] for c in teacher_cost), "score_seconds": sum(c[2] for c in teacher_cost),
                     "top50_seconds": sum(c[3] for c in teacher_cost) + aggregate})
        for student in students:
            model = build_model(student, rep.split.train, dim=dim).to(device).eval()
            score, top = inference_seconds(model.score, rep.split, device)
            rows.append({"device": device.type, "model": f"student {student}", "dim": dim,
                         "parameters": model.n_parameters(), "score_seconds": score, "top50_seconds": top})
    columns = ("device", "model", "dim", "parameters", "score_seconds", "top50_seconds")
    write_rows(rep.out_dir / "cost.csv", [{**r, "score_seconds": f"{r['score_seconds']:.4g}",
                                           "top50_seconds": f"{r['top50_seconds']:.4g}"} for r in rows], columns)
    lines = [f"# Cost — {rep.label}: parameters and inference latency", "", f"- command: `{rep.command}`",
             f"- commit: {git_commit()}", f"- machine: {machine()}", "",
             "Latency: best of 3 passes (1 when a pass takes over 5 s) "
             f"over all {rep.split.n_users:,} users in batches of 1,024, scoring all "
             f"{rep.split.n_items:,} items (score) and also taking each user's top-50 unobserved items (top-50). "
             "The ensemble must run every teacher and aggregate their top lists with g, so its cost is the "
             "teachers' sum plus g. A student's latency does not depend on its trained values.", ""]
    for device in devices:
        ensemble = next(r for r in rows if r["device"] == device.type and r["model"].startswith("ensemble"))
        lines += [f"## {device.type.upper()}", "",
                  "| model | dim | parameters | score s | top-50 s | ensemble / this (top-50) |",
                  "|---|---|---|---|---|---|"]
        for row in (r for r in rows if r["device"] == device.type):
            ratio = ensemble["top50_seconds"] / row["top50_seconds"]
            lines.append(f"| {row['model']} | {row['dim']} | {row['parameters']:,} | {row['score_seconds']:.3g} | "
                         f"{row['top50_seconds']:.3g} | {ratio:.1f}× |")
        lines.append("")
    (rep.out_dir / "cost.md").write_text("\n".join(lines))
    write_manifest(rep, "cost", [], [], time.perf_counter() - started)
    return {"rows": rows}
