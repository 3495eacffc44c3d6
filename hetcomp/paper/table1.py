"""Table 1: the discrepancy between a distilled student and three kinds of supervision."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from hetcomp.data import Split
from hetcomp.distill.base import DistillContext
from hetcomp.distill.knowledge import discrepancy
from hetcomp.distill.losses import fine_loss, tail_logsumexp
from hetcomp.ensemble import EnsembleConfig
from hetcomp.errors import HetCompError
from hetcomp.metrics import csr_rows_dense, evaluate_split
from hetcomp.models import build_model
from hetcomp.paper.common import MF_SEEDS, TABLE1_METHOD, Reproduction
from hetcomp.paper.ledger import write_rows
from hetcomp.paper.manifest import write_manifest
from hetcomp.paper.runs import run_spec, student_run
from hetcomp.paper.teachers import ensure_teachers
from hetcomp.provenance import git_commit, machine
from hetcomp.runs import RunStore
from hetcomp.teachers import TEACHERS, load_teachers, seeded_name

#: Table 1's two aggregations g of an ensemble: the released code's and this project's default
TABLE1_ENSEMBLES = {"uniform (released code)": EnsembleConfig(weighting="uniform"),
                    "valid-weighted (ours)": EnsembleConfig()}


def supervision_nll(score_fn: Callable, split: Split, supervision: torch.Tensor, device,
                    batch_size: int = 1024) -> float:
    """Plackett–Luce negative log-likelihood of the supervision's top-K list under the student, per list position.

    For each user: (1/K) Σ_k −log( e^{f(π_k)} / (Σ_{l≥k} e^{f(π_l)} + Σ_{j unobserved, not listed} e^{f(j)}) ),
    averaged over users: how improbable the student finds the supervision's ordering (lower = closer).
    """
    total, count = 0.0, 0
    k = supervision.shape[1]
    for start in range(0, split.n_users, batch_size):
        users = torch.arange(start, min(start + batch_size, split.n_users))
        with torch.no_grad():
            scores = score_fn(users.to(device)).float()
        listed = supervision[users].long().to(scores.device)
        observed = csr_rows_dense(split.train, users.numpy(), scores.device)
        scores = scores.masked_fill(observed, -1e30)
        valid = torch.ones_like(listed, dtype=torch.bool)
        tail = tail_logsumexp(scores, listed, valid)
        per_user = fine_loss(scores, listed, valid, tail_lse=tail) * len(users) / k
        total += float(per_user)
        count += len(users)
    return total / max(count, 1)


def table1(rep: Reproduction, seed: int = 0, dim: int = 6, k: int = 50) -> dict:
    """Supervision (a) one MF teacher, (b) an ensemble of MF teachers of different seeds, (c) the heterogeneous
    ensemble: its test R@50, and an MF student's D@10, D@50 and NLL with respect to it after distillation."""
    started = time.perf_counter()
    mf_names = [seeded_name("mf", s, 0) for s in MF_SEEDS]
    supervisions = {"(a) one MF teacher": ["mf"], f"(b) ensemble of {len(mf_names)} MF teachers": mf_names,
                    "(c) heterogeneous ensemble": list(TEACHERS)}
    ensure_teachers(rep, sorted(set(sum(supervisions.values(), []))))
    rows = []
    cells = [(label, names, g_label, ensemble) for label, names in supervisions.items()
             for g_label, ensemble in TABLE1_ENSEMBLES.items()
             if len(names) > 1 or ensemble == EnsembleConfig()]  # one teacher: every g is the teacher itself
    for label, names, g_label, ensemble in cells:
        trajectories = load_teachers(rep.split, rep.teachers_dir, names)
        context = DistillContext(rep.split, trajectories, rep.device, ensemble)
        supervision = context.ensemble_topk(k).cpu()
        quality = evaluate_split(context.scorer(), rep.split, device=rep.device)["test"]
        spec = run_spec(rep, trajectories, "mf", TABLE1_METHOD, seed, dim, ensemble=ensemble)
        result = student_run(rep, trajectories, spec)
        if result is None:
            raise HetCompError(f"Table 1 needs the run `{spec.command()}`, which is not finished (--no-train)")
        run_dir = RunStore(rep.runs_dir).folder(spec)
        model = build_model("mf", rep.split.train, dim=dim)
        model.load_state_dict(torch.load(run_dir / "student.pt", map_location="cpu", weights_only=True))
        model = model.to(rep.device).eval()
        ranking = evaluate_split(model.score, rep.split, top_m=k, device=rep.device)["ranking"]
        d10 = float(discrepancy(ranking[:, :10], supervision[:, :10], 10).mean())
        d50 = float(discrepancy(ranking, supervision, 50).mean())
        nll = supervision_nll(model.score, rep.split, supervision, rep.device)
        rows.append({"dataset": rep.label, "supervision": label, "g": g_label if len(names) > 1 else "-",
                     "teachers": ",".join(names),
                     "supervision_R@50": f"{quality['recall@50']:.6f}", "D@10": f"{d10:.6f}", "D@50": f"{d50:.6f}",
                     "NLL": f"{nll:.6f}", "student_R@50": f"{result['test']['recall@50']:.6f}",
                     "command": result["command"], "seed": seed})
    columns = ("dataset", "supervision", "g", "teachers", "supervision_R@50", "D@10", "D@50", "NLL", "student_R@50",
               "seed", "command")
    write_rows(rep.out_dir / "table1.csv", rows, columns)
    lines = [f"# Table 1 — {rep.label}: the student's discrepancy to its supervision after distillation", "",
             f"- command: `{rep.command}`", f"- seed: {seed} (student); teachers seed 0, MF teachers of (b) seeds "
             f"{', '.join(map(str, MF_SEEDS))}", f"- commit: {git_commit()}", f"- machine: {machine()}", "",
             f"The student (MF, dim {dim}) is trained by {TABLE1_METHOD.upper()} on each supervision's top items. "
             "R@50: the supervision's own test Recall@50. D@K = 1 − NDCG@K of the student's top-K against the "
             "supervision's (the paper's graded form, λ = 10). NLL: the Plackett–Luce negative log-likelihood of "
             "the supervision's top-50 under the student, per position (our normalization; the paper's is not "
             "stated, so only the order of the rows compares).", "",
             "g: the aggregation of an ensemble's rankings, with the released code's uniform teacher weights and "
             "with this project's validation-weighted ones (the default), side by side.", "",
             "| supervision | g | R@50 | D@10 | D@50 | NLL | student test R@50 |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['supervision']} | {row['g']} | {float(row['supervision_R@50']):.4f} | "
                     f"{float(row['D@10']):.4f} | "
                     f"{float(row['D@50']):.4f} | {float(row['NLL']):.4f} | {float(row['student_R@50']):.4f} |")
    lines += ["", "Commands of the student runs:", ""] + [f"- {r['supervision']}, g {r['g']}: `{r['command']}`"
                                                          for r in rows]
    (rep.out_dir / "table1.md").write_text("\n".join(lines) + "\n")
    write_manifest(rep, "table1", [], [seed], time.perf_counter() - started)
    return {"rows": rows}
