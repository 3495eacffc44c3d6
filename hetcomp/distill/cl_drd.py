"""CL-DRD — curriculum learning for dense retrieval distillation (H. Zeng, H. Zamani, V. Vinay, "Curriculum
Learning for Dense Retrieval Distillation", SIGIR 2022), applied to the converged ensemble's ranking.

A predefined easy-to-hard curriculum over rank positions. In stage s (lengths n_1 < n_2 < … from ``stages``)
each user's candidate list has three groups with graded labels:

- the ensemble's top-n_s unobserved items, label 1/rank (rank from 1): their exact order matters;
- a coarse middle group of m = n_s items drawn uniformly from ensemble ranks (n_s, N], label 1/(2N);
- m items drawn uniformly from the unobserved items outside the ensemble's top-N, label 0.

Every pair (i, j) of the list with label_i > label_j gets a logistic loss log(1 + e^{−(f_i − f_j)}) weighted by
label_i − label_j (LambdaRank style), normalized by the user's total weight; averaged over users:

    L = L_own + weight · mean_u Σ_{ij} w_ij log(1 + e^{−(f_i − f_j)}) / Σ_{ij} w_ij.

Each stage lasts ``stage_epochs`` epochs, the last one until training ends. Defaults: stage lengths 5, 10, 20
(three stages, as in the authors' code), N = 100, weight 1, 30 epochs a stage (our choice); all are options.
Lengths are clamped to the ensemble ranking that exists; a group with nothing to draw from is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetcomp.data import HetCompError
from hetcomp.distill.base import DistillContext, DistillMethod
from hetcomp.distill.losses import graded_pairwise_logistic_loss, items_mask
from hetcomp.distill.tools import sample_uniform_from_mask
from hetcomp.models.base import Batch, Recommender
from hetcomp.train import Trainer


@dataclass
class CLDRDConfig:
    stages: str = "5,10,20"
    stage_epochs: int = 30
    top_n: int = 100
    weight: float = 1.0


def parse_stages(text: str | int) -> list[int]:
    """"5,10,20" → [5, 10, 20]: positive list lengths, one per stage (a lone number, e.g. from the CLI, is one)."""
    try:
        sizes = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise HetCompError(f"stages must be comma-separated positive list lengths such as '5,10,20', not {text!r}")
    return sizes


class CLDRD(DistillMethod):
    """The student's own loss plus a graded pairwise loss on a candidate list that grows stage by stage."""

    name = "cl-drd"
    config_class = CLDRDConfig

    def __init__(self, context: DistillContext, config: CLDRDConfig | None = None) -> None:
        super().__init__(context, config)
        self.stage_sizes = parse_stages(self.config.stages)
        if self.config.stage_epochs < 1:
            raise HetCompError("stage_epochs must be at least 1")
        self.ranking = context.converged_topk
        self.top_n = min(self.config.top_n, self.ranking.shape[1])
        self.stage = 0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.stage = min((epoch - 1) // self.config.stage_epochs, len(self.stage_sizes) - 1)

    @property
    def list_length(self) -> int:
        """n_s of the current stage (clamped to the ensemble's top-N)."""
        return min(self.stage_sizes[self.stage], self.top_n)

    def candidates(self, users: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The current stage's list per user: (items [B, L], labels [B, L], valid [B, L])."""
        n, top_n, batch = self.list_length, self.top_n, len(users)
        head = self.ranking[users, :top_n]
        every = torch.ones_like(head, dtype=torch.bool)
        ranks = torch.arange(1, n + 1, dtype=torch.float32, device=self.device)
        groups = [(head[:, :n], (1.0 / ranks).expand(batch, n), every[:, :n])]
        if top_n > n:
            picks, valid = sample_uniform_from_mask(every[:, n:], n, generator)
            groups.append((head[:, n:].gather(1, picks), torch.full(picks.shape, 0.5 / top_n, device=self.device),
                           valid))
        outside = ~self.context.train_mask(users) & ~items_mask(head, every, self.context.n_items)
        items, valid = sample_uniform_from_mask(outside, n, generator)
        groups.append((items, torch.zeros(items.shape, device=self.device), valid))
        return tuple(torch.cat(parts, dim=1) for parts in zip(*groups, strict=True))

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        users = batch["users"]
        items, labels, valid = self.candidates(users, self._generator)
        pairwise = graded_pairwise_logistic_loss(model.score_items(users, items), labels, valid)
        return self.own_loss(model, users) + self.config.weight * pairwise

    def describe(self) -> str:
        return f"stage {self.stage + 1}/{len(self.stage_sizes)}  list {self.list_length}"
