"""RD — Ranking Distillation (J. Tang and K. Wang, "Ranking Distillation: Learning Compact Ranking Models With
High Performance for Recommender System", KDD 2018).

Point-wise: the teacher's (here the converged ensemble's) top-K unobserved items t_0..t_{K−1} become extra
positives for the student, each pushed up with a weight that shrinks with its teacher rank r:

    L = L_own + weight · mean_u Σ_r w_r · (−log σ(f(u, t_r))),    w_r ∝ exp(−r/λ),  Σ_r w_r = 1.

Optional dynamic weighting (``dynamic``, from epoch ``dynamic_start``): an item the student already ranks at or
above the teacher's position needs no push, one it ranks far below needs more. With r̂_r the student's current
0-based rank of t_r among the user's unobserved items (the number of unobserved items it scores higher, counted
exactly for the batch, no sampling as in the original), w_r ← w_r · tanh(max(μ(r̂_r − r), 0)), renormalized to
sum 1; a user whose every item is already placed well gets no distillation term. Ranks from
:func:`saturating_rank` on, where the tanh is exactly 1.0, are not counted out (:func:`ranks_outside`'s cap).

``own_loss="pointwise"``: the student's own part as the authors' code trains it (github.com/graytowne/rank_distill,
``losses.weighted_sigmoid_log_loss``, on Caser's sampler of 3 negatives per positive): binary cross-entropy on each
training interaction and ``own_negatives`` sampled unobserved items, −log σ(f_pos) − Σ_n log(1 − σ(f_n)) averaged
over interactions, on the same logit scale as the distillation term. The default ``"model"`` keeps the student's
own loss (BPR for MF, as the HetComp paper trains every student), which is what RD's studies and rows so far used.

Defaults from the authors' code: K = 10, λ = 1, μ = 0.1, dynamic from epoch 10 (off by default), weight 1.
RD trains the student mostly on its own loss (the point-wise term is light), so, as in its paper, the student keeps
its own optimizer recipe (for MF: lr 1e-3 and its L2), like w/o KD. Chosen on validation: an MF student at dim 6
on CiteULike reached valid R@50 0.1381 with it against 0.1171 with the distillation recipe (lr 1e-2).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from hetcomp.config import knob, validate
from hetcomp.distill.base import DistillContext, DistillMethod
from hetcomp.distill.losses import pointwise_log_loss, weighted_pointwise_loss
from hetcomp.distill.tools import ranks_outside
from hetcomp.models.base import Batch, Recommender
from hetcomp.train import StepRequest, Trainer


@dataclass
class RDConfig:
    owner = "rd"
    k: int = knob(10, ge=1)
    lam: float = knob(1.0, gt=0)
    weight: float = knob(1.0, ge=0)
    dynamic: bool = False
    mu: float = knob(0.1, gt=0)
    dynamic_start: int = knob(10, ge=0)
    own_loss: str = knob("model", choices=("model", "pointwise"), added_later=True)
    own_negatives: int = knob(3, ge=1, added_later=True)  # per positive, with ``own_loss="pointwise"``

    #: searched by ``hetcomp tune`` besides lr and weight decay
    search_space = {
        "weight": ("float_log", 1e-2, 10.0),
        "k": ("int", 5, 50),
        "lam": ("float_log", 0.5, 10.0),
        "dynamic": ("choice", [False, True]),
        "mu": ("float_log", 0.01, 1.0),
    }

    def __post_init__(self) -> None:
        validate(self)


def position_weights(k: int, lam: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """w_r ∝ exp(−r/λ) for r = 0..k−1, summing to one: the teacher's first items matter most."""
    weights = torch.exp(-torch.arange(k, dtype=torch.float32, device=device) / lam)
    return weights / weights.sum()


#: tanh(x) rounds to exactly 1.0 from x ≈ 9.01 in float32 (≈ 19.1 in float64): past this, ranks weigh the same
TANH_SATURATED = 20.0


def saturating_rank(k: int, mu: float) -> int:
    """A student rank from which every dynamic weight's tanh is exactly 1.0 for each teacher rank r < ``k``:
    μ(r̂ − r) ≥ :data:`TANH_SATURATED`, so :func:`ranks_outside` may cap the ranks there (same weights, bit for bit)."""
    return k - 1 + math.ceil(TANH_SATURATED / mu)


def dynamic_weights(position: torch.Tensor, student_ranks: torch.Tensor, teacher_ranks: torch.Tensor,
                    mu: float = 0.1) -> torch.Tensor:
    """Position weights times tanh(max(μ(r̂ − r), 0)), renormalized per row (all-zero rows stay zero).

    ``position`` [K] or [B, K]; ``student_ranks`` r̂ and ``teacher_ranks`` r broadcast to [B, K].
    """
    push = torch.tanh((mu * (student_ranks - teacher_ranks).to(position.dtype)).clamp(min=0))
    combined = position * push
    return combined / combined.sum(1, keepdim=True).clamp(min=torch.finfo(combined.dtype).tiny)


@dataclasses.dataclass
class RanksRequest(StepRequest):
    """Dynamic weighting's student ranks of the listed ``items`` [B, K] among the unobserved items
    (:func:`~hetcomp.distill.tools.ranks_outside`, from the detached ``scores`` [B, n_items]; ``excluded`` the
    users' padded training items): answered alone, or for every replica of a stack in one call over all their rows
    (each row's ranks its own; the training items padded to the widest, the padding left out)."""

    scores: torch.Tensor
    items: torch.Tensor
    excluded: torch.Tensor
    excluded_valid: torch.Tensor
    cap: int

    @property
    def key(self) -> tuple:
        return ("rd-ranks", self.cap)

    def answer(self) -> torch.Tensor:
        return ranks_outside(self.scores, self.items, self.excluded, self.excluded_valid, cap=self.cap)

    @classmethod
    def answer_all(cls, requests: list[RanksRequest]) -> list[torch.Tensor]:
        width = max(request.excluded.shape[1] for request in requests)

        def widened(value: torch.Tensor, fill: int | bool) -> torch.Tensor:
            return torch.cat([value, value.new_full((len(value), width - value.shape[1]), fill)], 1)

        ranks = ranks_outside(torch.cat([request.scores for request in requests]),
                              torch.cat([request.items for request in requests]),
                              torch.cat([widened(request.excluded, 0) for request in requests]),
                              torch.cat([widened(request.excluded_valid, False) for request in requests]),
                              cap=requests[0].cap)
        return list(ranks.split([len(request.items) for request in requests]))


class RD(DistillMethod):
    """The student's own loss plus rank-weighted point-wise positives from the ensemble's top-K."""

    uses_own_recipe = True

    name = "rd"
    config_class = RDConfig
    # 2: the own loss over every training interaction of the batch users (was one sampled per user); 3: with
    # dynamic weighting, the listed items' scores come from ``score_items`` and the full score matrix (for the
    # ranks) is computed without gradient (was: gathered from it under autograd, whose backward cost two
    # [batch, n_items] products a step; the same values up to float rounding)
    version = 3
    adds_own_loss = True
    #: dynamic weighting's ranks read the scores of every item (without gradient) and the own loss draws last (its
    #: only draw): seeds stack on the scores
    stackable_scores = True
    own_draws_last = True

    def __init__(self, context: DistillContext, config: RDConfig | None = None) -> None:
        super().__init__(context, config)
        self.k = min(self.config.k, context.converged_topk.shape[1])
        self.teacher_items = context.converged_topk[:, :self.k]
        self.position = position_weights(self.k, self.config.lam, self.device)
        self.epoch = 0

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.epoch = epoch

    @property
    def dynamic_active(self) -> bool:
        return self.config.dynamic and self.epoch >= self.config.dynamic_start

    def own_loss(self, model: Recommender, users: torch.Tensor) -> torch.Tensor:
        if self.config.own_loss == "model":
            return super().own_loss(model, users)
        triples = self.context.sample_interactions(users, self._generator, self.config.own_negatives)
        items = torch.cat([triples["pos"].unsqueeze(1), triples["neg"]], 1)
        return pointwise_log_loss(model.score_items(triples["users"], items))

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return self.loss_of_scores(None, batch, model)

    def loss_of_scores(self, scores: torch.Tensor | None, batch: Batch, model: Recommender) -> torch.Tensor:
        """The loss; ``scores`` (read only for the ranks) or, when None and dynamic weighting is on, the student's
        scores of every item computed without gradient."""
        return self.drive_steps(self._loss_steps(batch, model, scores), None, batch["users"])

    def tail_steps(self, batch: Batch, model: Recommender):
        """With dynamic weighting, the ranks as a :class:`RanksRequest` (stacked seeds: one call over every
        replica's rows of the stack's scores, which a replica's ``score`` returns); else no request at all."""
        return self._loss_steps(batch, model, None)

    def _loss_steps(self, batch: Batch, model: Recommender, scores: torch.Tensor | None):
        users = batch["users"]
        items = self.teacher_items[users]
        listed = model.score_items(users, items)
        if self.dynamic_active:
            if scores is None:
                with torch.no_grad():  # the ranks only weigh the term: the whole score matrix needs no gradient
                    scores = model.score(users)
            student_ranks = yield RanksRequest(scores.detach(), items, *self.context.observed_order_of(users),
                                               saturating_rank(self.k, self.config.mu))
            teacher_ranks = torch.arange(self.k, device=self.device)
            weights = dynamic_weights(self.position, student_ranks, teacher_ranks, self.config.mu)
        else:
            weights = self.position.expand_as(listed)
        valid = torch.ones_like(items, dtype=torch.bool)
        return self.own_loss(model, users) + self.config.weight * weighted_pointwise_loss(listed, weights, valid)
