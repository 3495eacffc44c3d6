"""DCD — Dual Correction Distillation (Y. Lee and K.-E. Kim, "Dual Correction Strategy for Ranking
Distillation in Top-N Recommender System", CIKM 2021), on top of RRD.

Every ``period`` epochs, for every user, the student's current 0-based rank r_S of each item in the ensemble's
top-W (W ≤ 500) among the user's unobserved items is compared with the item's ensemble rank r_T:

    under-ranked error e_U = tanh(max(ε(r_S − r_T), 0)),   over-ranked error e_O = tanh(max(ε(r_T − r_S), 0)).

Each batch draws, per user, n_U items ∝ e_U and n_O items ∝ e_O (without replacement; a user with no error mass
of a kind draws none) and applies the RRD form to them: the under-ranked items, in ensemble order, above the
over-ranked ones. The student thus gets told precisely what it currently ranks too low and too high:

    L = L_own + rrd_weight · L_RRD + dcd_weight · L_correction.

Only the user side is implemented; the paper's item side (each item's top users, corrected the same way) is
left out. Defaults from the authors' code: period 3, ε = 10⁻³, n_U = n_O = 10, both weights 0.001; the RRD
part takes RRD's options (K = 40, no sampling by default). The check scores every user once (in batches of
``check_users``): one sort per user and a ``searchsorted``, no per-user loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetcomp.config import knob, validate
from hetcomp.distill.base import DistillContext, DistillMethod
from hetcomp.distill.losses import relaxed_ranking_loss
from hetcomp.distill.rrd import RRD, RRDConfig
from hetcomp.distill.tools import sample_without_replacement, unobserved_ranks
from hetcomp.models.base import Batch, Recommender
from hetcomp.train import Trainer


@dataclass
class DCDConfig:
    owner = "dcd"
    k: int = knob(40, ge=1)
    sample: bool = False
    top_n: int = knob(100, ge=1)
    temperature: float = knob(10.0, gt=0)
    n_tail: int = knob(100, ge=1)
    rrd_weight: float = knob(0.001, ge=0)
    dcd_weight: float = knob(0.001, ge=0)
    period: int = knob(3, ge=1)
    epsilon: float = knob(1e-3, gt=0)
    n_under: int = knob(10, ge=1)
    n_over: int = knob(10, ge=1)
    check_users: int = knob(1024, ge=1)

    def __post_init__(self) -> None:
        validate(self)


class DCD(DistillMethod):
    """The student's own loss, RRD, and a relaxed ranking loss on the items the student currently misplaces."""

    name = "dcd"
    version = 2  # 2: its RRD term uses the fused tail log-sum-exp
    config_class = DCDConfig

    def __init__(self, context: DistillContext, config: DCDConfig | None = None) -> None:
        super().__init__(context, config)
        cfg = self.config
        self.rrd = RRD(context, RRDConfig(k=cfg.k, weight=cfg.rrd_weight, sample=cfg.sample, top_n=cfg.top_n,
                                          temperature=cfg.temperature, n_tail=cfg.n_tail))
        self.ranking = context.converged_topk
        #: [n_users, W] errors of the last check (None before the first)
        self.under_error: torch.Tensor | None = None
        self.over_error: torch.Tensor | None = None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self.under_error is None or (epoch - 1) % self.config.period == 0:
            self.refresh(trainer.model)

    @torch.no_grad()
    def refresh(self, model: Recommender) -> None:
        """Recompute every user's under- and over-ranking errors from the student's current scores."""
        was_training = model.training
        model.eval()
        width = self.ranking.shape[1]
        teacher_ranks = torch.arange(width, device=self.device)
        under = torch.zeros(self.context.n_users, width, device=self.device)
        over = torch.zeros_like(under)
        for start in range(0, self.context.n_users, self.config.check_users):  # user batches, not users
            users = torch.arange(start, min(start + self.config.check_users, self.context.n_users),
                                 device=self.device)
            ranks = unobserved_ranks(model.score(users), ~self.context.train_mask(users), self.ranking[users])
            gap = self.config.epsilon * (ranks - teacher_ranks).to(torch.float32)
            under[users] = torch.tanh(gap.clamp(min=0))
            over[users] = torch.tanh((-gap).clamp(min=0))
        model.train(was_training)
        self.under_error, self.over_error = under, over

    def correction_lists(self, users: torch.Tensor, generator: torch.Generator | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sampled (under-ranked items in ensemble order, valid, over-ranked items, valid), each [B, ≤n]."""
        width = self.ranking.shape[1]
        picks, valid = sample_without_replacement(self.under_error[users], self.config.n_under, generator)
        order = torch.where(valid, picks, picks + width).sort(dim=1).indices  # ensemble order, invalid draws last
        picks, valid = picks.gather(1, order), valid.gather(1, order)
        over_picks, over_valid = sample_without_replacement(self.over_error[users], self.config.n_over, generator)
        ranking = self.ranking[users]
        return ranking.gather(1, picks), valid, ranking.gather(1, over_picks), over_valid

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        users = batch["users"]
        if self.under_error is None:
            self.refresh(model)
        scores = model.score(users)
        rrd = self.rrd.distillation_loss(model, users, self._generator, scores)
        under, under_valid, over, over_valid = self.correction_lists(users, self._generator)
        correction = relaxed_ranking_loss(scores, under, under_valid, over, over_valid)
        return (self.own_loss(model, users) + self.config.rrd_weight * rrd
                + self.config.dcd_weight * correction)

    def state_dict(self) -> dict:
        if self.under_error is None:
            return {}
        return {"under_error": self.under_error.cpu(), "over_error": self.over_error.cpu()}

    def load_state_dict(self, state: dict) -> None:
        if "under_error" in state:
            self.under_error = state["under_error"].to(self.device)
            self.over_error = state["over_error"].to(self.device)
