"""The training-curves figure, drawn from curves.csv."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hetcomp.errors import HetCompError
from hetcomp.paper.common import CURVE_METHODS, LABELS, Reproduction
from hetcomp.paper.ledger import read_rows


def curves_figure(rep: Reproduction, student: str = "mf", methods: Sequence[str] = CURVE_METHODS) -> Path:
    """Test Recall@50 every evaluation for ``methods`` (mean over the seeds in curves.csv), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    points = [r for r in read_rows(rep.out_dir / "curves.csv") if r["student"] == student]
    if not points:
        raise HetCompError(f"no curves for the {student} student in {rep.out_dir / 'curves.csv'}: run "
                           f"`hetcomp reproduce --dataset {rep.dataset} --table 2` first")
    figure, axis = pyplot.subplots(figsize=(6, 4))
    for method in methods:
        by_epoch: dict[int, list[float]] = {}
        for point in points:
            if point["method"] == method:
                by_epoch.setdefault(int(point["epoch"]), []).append(float(point["test_recall@50"]))
        if by_epoch:
            epochs = sorted(by_epoch)
            seeds = max(len(v) for v in by_epoch.values())
            axis.plot(epochs, [np.mean(by_epoch[e]) for e in epochs],
                      label=f"{LABELS.get(method, method)} ({seeds} seed{'s' if seeds > 1 else ''})")
    axis.set_xlabel("epoch")
    axis.set_ylabel("test Recall@50")
    axis.set_title(f"{rep.label}: {student.upper()} student, dim 6")
    axis.grid(alpha=0.3)
    axis.legend()
    path = rep.out_dir / f"curves-{student}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)
    return path
