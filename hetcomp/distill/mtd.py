"""MTD — multi-teacher distillation with a learnable, user-specific importance of each teacher (the MTD baseline
of Kang et al., WWW 2023, HetComp's Table 2). This is the project's own construction from the paper's description:
the paper does not publish its MTD implementation, and tables mark the row (†).

Each teacher t's converged ranking (its trajectory's last state) turns into a target distribution over its top-K
unobserved items, p_t(i|u) ∝ exp(−rank_t(i)/T). A learnable logit table a [n_users, n_teachers] (zeros at the
start: every teacher equal) gives user u's teacher importance α_u = softmax(a_u), and the student matches the
mixture p(i|u) = Σ_t α_{u,t} p_t(i|u) with a listwise cross-entropy over all of the user's unobserved items:

    L = L_own + weight · mean_u ( −Σ_i p(i|u) · log softmax_{j ∉ O_u}(f(u, j))_i ).

The table is trained with the student (``parameters()``) and saved for resume. The loss also moves α towards
the teachers the student reproduces most easily, so α can collapse onto one of them and overfit sparse users:
the behaviour the HetComp paper reports for this baseline, deliberately left as is.
Defaults: K = 50 (clamped to the teachers' saved top-M), T = 10, weight 1.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hetcomp.config import knob, validate
from hetcomp.distill.base import DistillContext, DistillMethod, scores_once
from hetcomp.distill.losses import soft_target_cross_entropy
from hetcomp.models.base import Batch, Recommender


@dataclass
class MTDConfig:
    owner = "mtd"
    k: int = knob(50, ge=1)
    temperature: float = knob(10.0, gt=0)
    weight: float = knob(1.0, ge=0)

    #: searched by ``hetcomp tune`` besides lr and weight decay
    search_space = {"k": ("int", 10, 100), "temperature": ("float_log", 1.0, 100.0), "weight": ("float_log", 0.1, 10.0)}

    def __post_init__(self) -> None:
        validate(self)


class MTD(DistillMethod):
    """The student's own loss plus a listwise loss on the user-weighted mixture of the teachers' rankings."""

    name = "mtd"
    # 2: normalizer by the fused tail log-sum-exp instead of a masked log-softmax; 3: the own loss over every
    # training interaction of the batch users (was one sampled per user)
    version = 3
    config_class = MTDConfig
    adds_own_loss = True

    def __init__(self, context: DistillContext, config: MTDConfig | None = None) -> None:
        super().__init__(context, config)
        cfg = self.config
        self.k = min(cfg.k, *(t.top_m for t in context.trajectories))
        #: [n_teachers, n_users, K]: each teacher's converged top-K unobserved items
        self.teacher_items = torch.stack([t.states[-1, :, :self.k].long() for t in context.trajectories]).to(
            self.device)
        target = torch.exp(-torch.arange(self.k, dtype=torch.float32, device=self.device) / cfg.temperature)
        self.teacher_target = target / target.sum()
        self.logits = nn.Parameter(torch.zeros(context.n_users, len(context.trajectories), device=self.device))

    def parameters(self) -> list[nn.Parameter]:
        return [self.logits]

    def teacher_weights(self, users: torch.Tensor) -> torch.Tensor:
        """α [B, n_teachers]: each user's importance of each teacher (rows sum to one)."""
        return torch.softmax(self.logits[users], dim=1)

    def mixture(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixture as (items [B, n_teachers·K], mass [B, n_teachers·K]); an item two teachers rank appears twice."""
        alpha = self.teacher_weights(users)
        items = self.teacher_items[:, users].transpose(0, 1).reshape(len(users), -1)
        mass = (alpha.unsqueeze(2) * self.teacher_target).reshape(len(users), -1)
        return items, mass

    #: the listwise term reads the scores of every item and the own loss draws last: seeds stack on the scores,
    #: each replica with its own logit table (an objective parameter the stack's optimizer trains as it is)
    stackable_scores = True
    own_draws_last = True  # the own loss is its only draw

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return self.loss_of_scores(None, batch, model)

    def loss_of_scores(self, scores: torch.Tensor | None, batch: Batch, model: Recommender) -> torch.Tensor:
        scored = scores_once(model, batch["users"], scores)
        return self.drive_steps(self._loss_steps(batch, model, scored), scored, batch["users"])

    def tail_steps(self, batch: Batch, model: Recommender):
        """The mixture, the normalizer as a tail request over every unobserved item (stacked seeds answer all
        replicas' rows in one call), then the listwise term on the student's scores and the own loss."""
        return self._loss_steps(batch, model, scores_once(model, batch["users"], None))

    def answer_tail(self, scores: torch.Tensor, users: torch.Tensor, head: torch.Tensor | None,
                    listed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.context.tail_and_listed_scores(scores, users, head, listed)

    def _loss_steps(self, batch: Batch, model: Recommender, scored: Callable[[], torch.Tensor]):
        """The loss as steps (:meth:`~hetcomp.train.Objective.tail_steps`): its one request lists nothing, so the
        normalizer is :meth:`~hetcomp.distill.base.DistillContext.tail_logsumexp`'s node, bit for bit; the mixture's
        items (which repeat across teachers) are read off ``scored()``, the student's scores of every item."""
        users = batch["users"]
        items, mass = self.mixture(users)
        normalizer, _ = yield None, users.new_zeros((len(users), 0))
        listwise = soft_target_cross_entropy(scored(), None, items, mass, torch.ones_like(items, dtype=torch.bool),
                                             log_normalizer=normalizer)
        return self.own_loss(model, users) + self.config.weight * listwise

    def describe(self) -> str:
        alpha = torch.softmax(self.logits.detach()[self.context.active_users.to(self.device)], dim=1).mean(0)
        return "alpha " + " ".join(f"{name}:{value:.2f}" for name, value in zip(self.context.teacher_names,
                                                                               alpha.tolist(), strict=True))

    def state_dict(self) -> dict:
        return {"logits": self.logits.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        if "logits" in state:
            with torch.no_grad():
                self.logits.copy_(state["logits"].to(self.device))
