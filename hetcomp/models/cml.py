"""Collaborative metric learning (Hsieh et al., WWW 2017).

Users and items live in one Euclidean space; score(u, i) = -||p_u - q_i||².
Loss: hinge with margin m, [m + ||p_u - q_{i⁺}||² - ||p_u - q_{i⁻}||²]_+ averaged over sampled negatives.
After every step all embeddings are projected back into the unit ball (||·|| ≤ 1), CML's norm constraint.
Defaults: squared distance, margin 1.0 (the unit ball makes distances ≤ 4), 10 negatives per positive,
Adam lr 5e-3 (tuned on validation: 1e-3 needs ~3× the epochs), no weight decay (the ball is the
regularizer), d = 64.

``score`` returns s · (−||p_u − q_i||²) with the scale s = ``score_scale`` (default 10). The ranking and CML's own
hinge loss (on raw distances) do not depend on s, but the distillation losses are softmaxes over the whole
catalogue: inside the unit ball the raw scores span at most 4, so e^4 ≈ 55 would be the largest probability ratio
a student could express between two of ~25k items, and a teacher's top-100 could never stand out of the tail.
With s = 10 the scores span [−40, 0], the range HetComp's released code clamps its MF scores to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hetcomp.config import knob
from hetcomp.models.base import Batch, ModelConfig, Recommender, all_item_scores, weighted_row_mean


@dataclass
class CMLConfig(ModelConfig):
    lr: float = 5e-3
    margin: float = knob(1.0, ge=0)
    n_negatives: int = 10
    init_std: float = knob(0.1, gt=0)
    score_scale: float = knob(10.0, gt=0)


class CML(Recommender):
    name = "ml"
    config_class = CMLConfig

    def __init__(self, n_users: int, n_items: int, config: CMLConfig | None = None, train=None) -> None:
        super().__init__(n_users, n_items, config)
        self.user_embedding = nn.Embedding(n_users, self.config.dim)
        self.item_embedding = nn.Embedding(n_items, self.config.dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_embedding.weight, std=self.config.init_std)
        nn.init.normal_(self.item_embedding.weight, std=self.config.init_std)
        self.after_step()

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """One matmul: −s·||p − q||² = [2s·p, −s, −s·||p||²] · [q, ||q||², 1].

        Written this way scoring every item costs what MF's inner product does (one [B, d+2] × [d+2, n] product)
        instead of a product plus three [B, n] passes for the norms and the scale.
        """
        scale = self.config.score_scale
        user = self.user_embedding(users)
        items = self.item_embedding.weight
        user_side = torch.cat([2 * scale * user, torch.full_like(user[:, :1], -scale),
                               -scale * (user * user).sum(1, keepdim=True)], dim=1)
        item_side = torch.cat([items, (items * items).sum(1, keepdim=True), torch.ones_like(items[:, :1])], dim=1)
        return all_item_scores(user_side, item_side)

    def distances(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """||p_u − q_i||² of ``items`` [B, L] for ``users`` [B]."""
        difference = self.user_embedding(users).unsqueeze(1) - self.item_embedding(items)
        return (difference * difference).sum(-1)

    def score_items(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return -self.config.score_scale * self.distances(users, items)

    def loss(self, batch: Batch) -> torch.Tensor:
        users = batch["users"]
        positive = self.distances(users, batch["pos"].unsqueeze(1))
        negative = self.distances(users, batch["neg"])
        if batch.get("weight") is not None:  # padded triples (0) left out
            return weighted_row_mean(torch.relu(self.config.margin + positive - negative), batch["weight"])
        return torch.relu(self.config.margin + positive - negative).mean()

    @torch.no_grad()
    def after_step(self) -> None:
        for table in (self.user_embedding.weight, self.item_embedding.weight):
            norms = table.norm(dim=1, keepdim=True).clamp(min=1.0)
            table.div_(norms)
