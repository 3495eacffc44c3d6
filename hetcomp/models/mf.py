"""BPR matrix factorization (Rendle et al., UAI 2009).

score(u, i) = p_u · q_i, with user and item embeddings p, q in R^d.
Loss: BPR, -log σ(score(u, i⁺) - score(u, i⁻)) over sampled negatives, plus λ/2 ‖p_u, q_i⁺, q_i⁻‖² / B on the
batch's embeddings. The L2 term is in the loss rather than Adam's ``weight_decay``: Adam rescales the decay of
rows absent from a batch into full-size steps toward zero, which kept BPR-MF at popularity-level accuracy here.
Defaults: Adam, lr 1e-3, λ = 1e-4 (HetComp's teacher setting), one negative, batch 1024, d = 64;
init N(0, 0.01) as in the authors' released code. At most 300 epochs: on CiteULike validation R@50 gains
under 0.005 between epochs 180 and 290, and the CPU budget of six teachers is 30 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hetcomp.config import knob
from hetcomp.models.base import Batch, ModelConfig, Recommender, all_item_scores, bpr_loss


@dataclass
class MFConfig(ModelConfig):
    reg: float = knob(1e-4, ge=0)
    init_std: float = knob(0.01, gt=0)
    max_epochs: int = 300


class MF(Recommender):
    name = "mf"
    config_class = MFConfig

    def __init__(self, n_users: int, n_items: int, config: MFConfig | None = None, train=None) -> None:
        super().__init__(n_users, n_items, config)
        self.user_embedding = nn.Embedding(n_users, self.config.dim)
        self.item_embedding = nn.Embedding(n_items, self.config.dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.user_embedding.weight, std=self.config.init_std)
        nn.init.normal_(self.item_embedding.weight, std=self.config.init_std)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        return all_item_scores(self.user_embedding(users), self.item_embedding.weight)

    def score_items(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (self.user_embedding(users).unsqueeze(1) * self.item_embedding(items)).sum(-1)

    def loss(self, batch: Batch) -> torch.Tensor:
        """BPR plus L2 on the rows used; a ``weight`` [B] in the batch marks padded triples (0) to leave out."""
        users = batch["users"]
        positive = self.score_items(users, batch["pos"].unsqueeze(1)).squeeze(1)
        negative = self.score_items(users, batch["neg"])
        weight = batch.get("weight")
        if weight is not None:
            norms = (self.user_embedding(users).pow(2).sum(1) + self.item_embedding(batch["pos"]).pow(2).sum(1)
                     + self.item_embedding(batch["neg"]).pow(2).sum((1, 2)))
            reg = (weight * norms).sum() / (2 * weight.sum())
            return bpr_loss(positive, negative, weight) + self.config.reg * reg
        reg = (self.user_embedding(users).pow(2).sum() + self.item_embedding(batch["pos"]).pow(2).sum()
               + self.item_embedding(batch["neg"]).pow(2).sum()) / (2 * len(users))
        return bpr_loss(positive, negative) + self.config.reg * reg
