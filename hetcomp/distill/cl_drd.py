"""CL-DRD — curriculum learning for dense retrieval distillation (H. Zeng, H. Zamani, V. Vinay, "Curriculum
Learning for Dense Retrieval Distillation", SIGIR 2022), applied to the converged ensemble's ranking.

A predefined easy-to-hard curriculum over rank positions, following the authors' released training code. Each
user's list has ``list_size`` items in three groups; stage s (lengths n_1 < n_2 < … from ``stages``) changes
how many are in the finely ordered head:

- the ensemble's top-n_s unobserved items, label 1/rank (rank from 1): their exact order matters;
- ⌊(size − n_s)/2⌋ "hard" items drawn uniformly from ensemble ranks (n_s, N], label −0.25;
- the rest drawn uniformly from the unobserved items outside the ensemble's top-N, label −0.5.

With the defaults the lists are 5 + 12 + 13, then 10 + 10 + 10, then 20 + 5 + 5, the authors' three steps. The
loss is their LambdaMRR (:func:`hetcomp.distill.losses.lambda_mrr_loss`): a logistic loss on each pair the labels
order, weighted by |1/p_i − 1/p_j| with p the student's current positions in the list, so the label values only
fix the order and the pairs the student has near its top weigh most:

    L = L_own + weight · mean_{pairs} |1/p_i − 1/p_j| · log(1 + e^{−(f_i − f_j)}).

Each stage lasts ``stage_epochs`` epochs, the last one until training ends. Defaults: stages 5, 10, 20 and lists
of 30 (the authors' code), N = 100, weight 1, 30 epochs a stage (our choice; the paper trains one pass a step).
Lengths are clamped to the ensemble ranking that exists; a group with nothing to draw from is left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetcomp.config import knob, validate
from hetcomp.distill.base import DistillContext, DistillMethod
from hetcomp.distill.losses import lambda_mrr_loss
from hetcomp.distill.tools import sample_uniform_from_mask, sample_unobserved
from hetcomp.errors import HetCompError
from hetcomp.models.base import Batch, Recommender
from hetcomp.train import Trainer


@dataclass
class CLDRDConfig:
    owner = "cl-drd"
    stages: str = knob("5,10,20", check=lambda text: parse_stages(text))  # list lengths, one per stage
    stage_epochs: int = knob(30, ge=1)
    list_size: int = knob(30, ge=2)
    top_n: int = knob(100, ge=1)
    weight: float = knob(1.0, ge=0)

    def __post_init__(self) -> None:
        validate(self)


HARD_LABEL, NEGATIVE_LABEL = -0.25, -0.5  # the authors' labels; below every 1/rank, and only their order matters


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
    """The student's own loss plus LambdaMRR on a list whose finely ordered head grows stage by stage."""

    name = "cl-drd"
    version = 2  # 2: negatives by rejection sampling (sample_unobserved), another random stream
    config_class = CLDRDConfig

    def __init__(self, context: DistillContext, config: CLDRDConfig | None = None) -> None:
        super().__init__(context, config)
        self.stage_sizes = parse_stages(self.config.stages)
        if self.config.stage_epochs < 1:
            raise HetCompError("stage_epochs must be at least 1")
        if self.config.list_size <= max(self.stage_sizes):
            raise HetCompError(f"list_size ({self.config.list_size}) must exceed the longest stage "
                               f"({max(self.stage_sizes)}) so that every list has items to rank below its head")
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
        """The current stage's list per user: (items [B, size], labels [B, size], valid [B, size])."""
        n, top_n, batch = self.list_length, self.top_n, len(users)
        n_hard = (self.config.list_size - n) // 2
        n_negative = self.config.list_size - n - n_hard
        head = self.ranking[users, :top_n]
        every = torch.ones_like(head, dtype=torch.bool)
        ranks = torch.arange(1, n + 1, dtype=torch.float32, device=self.device)
        groups = [(head[:, :n], (1.0 / ranks).expand(batch, n), every[:, :n])]
        if top_n > n:
            picks, valid = sample_uniform_from_mask(every[:, n:], n_hard, generator)
            groups.append((head[:, n:].gather(1, picks), torch.full(picks.shape, HARD_LABEL, device=self.device),
                           valid))
        items, valid = sample_unobserved(self.context.sampler, users, n_negative, head, generator)
        groups.append((items, torch.full(items.shape, NEGATIVE_LABEL, device=self.device), valid))
        return tuple(torch.cat(parts, dim=1) for parts in zip(*groups, strict=True))

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        users = batch["users"]
        items, labels, valid = self.candidates(users, self._generator)
        pairwise = lambda_mrr_loss(model.score_items(users, items), labels, valid)
        return self.own_loss(model, users) + self.config.weight * pairwise

    def describe(self) -> str:
        return f"stage {self.stage + 1}/{len(self.stage_sizes)}  list {self.list_length}"
