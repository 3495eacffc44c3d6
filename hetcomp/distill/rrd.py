"""RRD — Relaxed Ranking Distillation (S. Kang, J. Hwang, W. Kweon, H. Yu, "DE-RRD: A Knowledge Distillation
Framework for Recommender System", CIKM 2020).

A relaxed Plackett–Luce likelihood: the "interesting" items P_1..P_K must appear in the teacher's order and
all above the "uninteresting" items N, whose own order is left free:

    L_RRD = −Σ_k log( e^{f(u,P_k)} / (Σ_{l≥k} e^{f(u,P_l)} + Σ_{j∈N} e^{f(u,j)}) ),
    L = L_own + weight · mean_u L_RRD.

Default (``sample=False``, as HetComp ran it, since sampling the top items hurt this baseline): P = the
ensemble's top-K unobserved items and N = every other unobserved item. ``sample=True`` restores DE-RRD's
sampling: K items drawn without replacement from the ensemble's top-N with probability ∝ exp(−rank/T), kept in
teacher order, and ``n_tail`` items drawn uniformly from the unobserved items outside the top-N.
Defaults from the authors' code: K = 40, weight 0.001 on top of the student's own loss; N = 100, T = 10,
|N| = 100 when sampling. K and N are clamped to the ensemble ranking that exists (at most 500 items).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetcomp.config import knob, validate
from hetcomp.distill.base import DistillContext, DistillMethod, scores_once
from hetcomp.distill.losses import fine_loss_of, relaxed_ranking_loss
from hetcomp.distill.tools import sample_unobserved, sample_without_replacement
from hetcomp.models.base import Batch, Recommender


@dataclass
class RRDConfig:
    owner = "rrd"
    k: int = knob(40, ge=1)
    weight: float = knob(0.001, ge=0)
    sample: bool = False
    top_n: int = knob(100, ge=1)
    temperature: float = knob(10.0, gt=0)
    n_tail: int = knob(100, ge=1)

    #: searched by ``hetcomp tune`` besides lr and weight decay (the sampling variant keeps its defaults)
    search_space = {"weight": ("float_log", 1e-4, 1e-1), "k": ("int", 10, 100)}

    def __post_init__(self) -> None:
        validate(self)


class RRD(DistillMethod):
    """The student's own loss plus the relaxed ranking loss of the ensemble's top items (reused by DCD)."""

    name = "rrd"
    # 2: tail log-sum-exp over padded training lists (no dense mask; float32 sum of the tail); 3: the own loss
    # over every training interaction of the batch users (was one sampled per user)
    version = 3
    config_class = RRDConfig
    adds_own_loss = True

    def __init__(self, context: DistillContext, config: RRDConfig | None = None) -> None:
        super().__init__(context, config)
        cfg = self.config
        self.ranking = context.converged_topk
        width = self.ranking.shape[1]
        self.top_n = min(cfg.top_n, width)
        self.k = min(cfg.k, self.top_n if cfg.sample else width)
        self.interest = torch.exp(-torch.arange(self.top_n, dtype=torch.float32, device=self.device)
                                  / cfg.temperature)

    def sampled_lists(self, users: torch.Tensor,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """DE-RRD's sampling: (interesting items [B, K] in teacher order, tail items [B, ≤n_tail], tail valid)."""
        head = self.ranking[users, :self.top_n]
        picks, _ = sample_without_replacement(self.interest.expand(len(users), -1), self.k, generator)
        interesting = head.gather(1, picks.sort(dim=1).values)
        tail, tail_valid = sample_unobserved(self.context.sampler, users, self.config.n_tail, head, generator)
        return interesting, tail, tail_valid

    def distillation_loss(self, model: Recommender, users: torch.Tensor, generator: torch.Generator | None,
                          scores: torch.Tensor | None = None) -> torch.Tensor:
        """mean_u L_RRD for ``users``; ``scores`` [B, n_items] may be passed when the caller has them already."""
        if not self.config.sample:
            scores = model.score(users) if scores is None else scores
            return self.drive_steps(self._term_steps(users), scores, users)
        items, tail, tail_valid = self.sampled_lists(users, generator)
        valid = torch.ones_like(items, dtype=torch.bool)
        if scores is not None:
            return relaxed_ranking_loss(scores, items, valid, tail, tail_valid)
        local = model.score_items(users, torch.cat([items, tail], dim=1))  # only the K + |N| sampled items
        positions = torch.arange(local.shape[1], device=local.device).expand(len(users), -1)
        return relaxed_ranking_loss(local, positions[:, :self.k], valid, positions[:, self.k:], tail_valid)

    def _term_steps(self, users: torch.Tensor):
        """L_RRD of the users without sampling, as steps (:meth:`~hetcomp.train.Objective.tail_steps`): P = the
        ensemble's top-K, N = every other unobserved item."""
        items = self.ranking[users, :self.k]
        valid = torch.ones_like(items, dtype=torch.bool)
        tail_lse, listed = yield items, items
        return fine_loss_of(listed, valid, tail_lse)

    def answer_tail(self, scores: torch.Tensor, users: torch.Tensor, head: torch.Tensor,
                    listed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.context.tail_and_listed_scores(scores, users, head, listed)

    def tail_steps(self, batch: Batch, model: Recommender):
        """Without DE-RRD's sampling: the own loss (first, its draws in the ordinary order), then the term's one
        tail request."""
        return None if self.config.sample else self._loss_steps(batch["users"], model)

    def _loss_steps(self, users: torch.Tensor, model: Recommender):
        own = self.own_loss(model, users)
        term = yield from self._term_steps(users)
        return own + self.config.weight * term

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return self.loss_of_scores(None, batch, model)

    @classmethod
    def stacks_seeds(cls, config: RRDConfig) -> bool:
        """Without DE-RRD's sampling the term reads the scores of every item, so seeds stack on them."""
        return not config.sample

    @property
    def own_draws_last(self) -> bool:
        """Without DE-RRD's sampling the own loss's are the loss's only draws."""
        return not self.config.sample

    def loss_of_scores(self, scores: torch.Tensor | None, batch: Batch, model: Recommender) -> torch.Tensor:
        """The loss; ``scores`` None: the student scores the users after its own loss has drawn."""
        users = batch["users"]
        if not self.config.sample:
            return self.drive_steps(self._loss_steps(users, model), scores_once(model, users, scores), users)
        own = self.own_loss(model, users)
        return own + self.config.weight * self.distillation_loss(model, users, self._generator, scores)
