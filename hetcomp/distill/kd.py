"""KD — the general knowledge-distillation loss menu of industrial recommendation toolkits, on the ensemble.

Candidates per user: the converged ensemble's top-K unobserved items plus ``n_neg`` unobserved items drawn
uniformly outside that top-K. The teacher's logit of a candidate is the log of its rank importance,
log exp(−r/T_rank) = −r/T_rank for the top-K item at 0-based rank r, and −2K/T_rank (below every top-K logit)
for a negative. With student scores f, temperature τ and p = softmax over the candidates:

- ``ce``: soft-label cross-entropy −Σ p_T(τ) log p_S(τ) (Hinton et al., "Distilling the Knowledge in a
  Neural Network", 2015);
- ``kl``: τ² · KL(p_T(τ) ‖ p_S(τ)), the same with Hinton's τ² scaling;
- ``bce``: binary cross-entropy between σ(f/τ) and the teacher's soft labels σ(t/τ), per candidate;
- ``l2``: squared error on the logits /τ (``on="logits"``) or on σ(logits/τ) (``on="probs"``), per candidate;
- ``pairwise_hinge``: max(0, m − (f_i − f_j)) on every candidate pair the teacher orders i above j; with
  ``label_margin`` the margin is m · (σ(t_i/τ) − σ(t_j/τ));
- ``listwise``: the teacher's top-K distribution softmax(t/τ) against the student's softmax(f/τ) over ALL the
  user's unobserved items (not just the candidates).

``losses`` picks and weights them, e.g. ``"kl:1.0,pairwise_hinge:0.5"`` (a bare name weighs 1). ``on`` only
changes ``l2``: ``bce`` is by definition on σ-probabilities and the others on logits. No own loss by default
(``own_weight`` adds it). Point-wise and pairwise terms average per user, listwise terms sum over the list;
all average over users. Defaults: K = 100, n_neg = 100, T_rank = 10, τ = 1, margin 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hetcomp.config import knob, validate
from hetcomp.distill import losses
from hetcomp.distill.base import DistillContext, DistillMethod, scores_once
from hetcomp.distill.tools import sample_unobserved, sample_unobserved_lockstep
from hetcomp.errors import HetCompError
from hetcomp.models.base import Batch, Recommender

KD_LOSSES = ("ce", "bce", "l2", "kl", "pairwise_hinge", "listwise")
ON = ("logits", "probs")


@dataclass
class KDConfig:
    owner = "kd"
    losses: str = knob("kl:1.0", check=lambda text: parse_losses(text))
    k: int = knob(100, ge=1)
    n_neg: int = knob(100, ge=1)
    rank_temperature: float = knob(10.0, gt=0)
    temperature: float = knob(1.0, gt=0)
    on: str = knob("logits", choices=ON)
    margin: float = knob(1.0, ge=0)
    label_margin: bool = False
    own_weight: float = knob(0.0, ge=0)

    #: searched by ``hetcomp tune`` besides lr and weight decay: a few loss menus, their temperatures, the lists
    search_space = {
        "losses": ("choice", ["kl:1.0", "ce:1.0", "listwise:1.0", "kl:1.0,pairwise_hinge:0.5"]),
        "k": ("int", 20, 200),
        "temperature": ("float_log", 0.5, 4.0),
        "rank_temperature": ("float_log", 2.0, 50.0),
        "own_weight": ("choice", [0.0, 0.1, 1.0]),
    }

    def __post_init__(self) -> None:
        validate(self)


def parse_losses(text: str) -> dict[str, float]:
    """"kl:1.0,pairwise_hinge:0.5" → {"kl": 1.0, "pairwise_hinge": 0.5}; an unknown name is an error."""
    chosen: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, _, weight = part.partition(":")
        name = name.strip()
        if name not in KD_LOSSES:
            raise HetCompError(f"unknown KD loss {name!r}; known losses: {', '.join(KD_LOSSES)}")
        try:
            chosen[name] = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise HetCompError(f"KD loss weight {weight!r} of {name!r} is not a number") from None
        if not math.isfinite(chosen[name]) or chosen[name] < 0:
            raise HetCompError(f"KD loss weight {weight.strip()!r} of {name!r} must be a finite number ≥ 0")
    if not chosen:
        raise HetCompError(f"no KD loss chosen; pass e.g. 'kl:1.0' with names from {', '.join(KD_LOSSES)}")
    return chosen


class KD(DistillMethod):
    """A weighted sum of the chosen KD losses on the ensemble's top-K plus sampled negatives."""

    name = "kd"
    # 2: listwise normalizer by the fused tail log-sum-exp; 3: the own loss over every training interaction of
    # the batch users (was one sampled per user)
    version = 3
    config_class = KDConfig
    adds_own_loss = True

    def __init__(self, context: DistillContext, config: KDConfig | None = None) -> None:
        super().__init__(context, config)
        cfg = self.config
        self.weights = parse_losses(cfg.losses)
        if cfg.on not in ON:
            raise HetCompError(f"unknown on={cfg.on!r}; choose one of {', '.join(ON)}")
        if cfg.temperature <= 0 or cfg.rank_temperature <= 0:
            raise HetCompError("temperatures must be positive")
        self.ranking = context.converged_topk
        self.k = min(cfg.k, self.ranking.shape[1])
        ranks = torch.arange(self.k, dtype=torch.float32, device=self.device)
        self.top_logits = -ranks / cfg.rank_temperature
        self.negative_logit = -2.0 * self.k / cfg.rank_temperature

    def candidates(self, users: torch.Tensor, generator: torch.Generator | None,
                   drawn: tuple[torch.Tensor, torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(items [B, K + n_neg], teacher logits, valid): the top-K, then the sampled negatives (``drawn``: drawn
        already, by :meth:`first_draws_lockstep`)."""
        top = self.ranking[users, :self.k]
        valid_top = torch.ones_like(top, dtype=torch.bool)
        negatives, valid_negative = drawn or sample_unobserved(self.context.sampler, users, self.config.n_neg, top,
                                                               generator)
        items = torch.cat([top, negatives], dim=1)
        teacher = torch.cat([self.top_logits.expand(len(users), -1),
                             torch.full(negatives.shape, self.negative_logit, device=self.device)], dim=1)
        return items, teacher, torch.cat([valid_top, valid_negative], dim=1)

    def term(self, name: str, student: torch.Tensor | None, teacher: torch.Tensor, valid: torch.Tensor,
             listwise: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One loss of the menu on the candidates' scores ``student`` (None for a menu of ``listwise`` alone, which
        reads the tail request's answer instead)."""
        cfg, tau = self.config, self.config.temperature
        if name == "ce":
            return losses.candidate_cross_entropy(student, teacher, valid, tau)
        if name == "kl":
            return losses.candidate_kl(student, teacher, valid, tau)
        if name == "bce":
            return losses.candidate_bce(student, teacher, valid, tau)
        if name == "l2":
            return losses.candidate_l2(student, teacher, valid, tau, cfg.on)
        if name == "pairwise_hinge":
            labels = torch.sigmoid(teacher / tau) if cfg.label_margin else None
            return losses.pairwise_hinge_loss(student, teacher, valid, cfg.margin, labels)
        return listwise()

    @classmethod
    def stacks_seeds(cls, config: KDConfig) -> bool:
        """With ``listwise`` the loss reads the scores of every item, so seeds stack on them."""
        return "listwise" in parse_losses(config.losses)

    @classmethod
    def first_draws_lockstep(cls, objectives: Sequence[KD], users: Sequence[torch.Tensor],
                             model: Recommender) -> list | None:
        """The candidates' negatives, a step's first draw, for every replica at once (each its own)."""
        if len({(id(objective.context), objective.config.n_neg) for objective in objectives}) != 1:
            return None
        return sample_unobserved_lockstep(objectives[0].context.sampler, users, objectives[0].config.n_neg,
                                          [o.ranking[part, :o.k] for o, part in zip(objectives, users, strict=True)],
                                          [o._generator for o in objectives])

    @property
    def own_draws_last(self) -> bool:
        """The own loss (``own_weight``) is the step's last draw, after the candidates'."""
        return True

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return self.loss_of_scores(None, batch, model)

    def loss_of_scores(self, scores: torch.Tensor | None, batch: Batch, model: Recommender) -> torch.Tensor:
        """The loss; ``scores`` None: the student scores every item (for ``listwise``) after the candidates' draw,
        or only the candidates."""
        users = batch["users"]
        if "listwise" not in self.weights:  # the candidates' scores alone: from ``scores`` where given
            return self.drive_steps(self._loss_steps(batch, model, lambda: scores), scores, users)
        scored = scores_once(model, users, scores)  # after the candidates' draw
        return self.drive_steps(self._loss_steps(batch, model, scored), scored, users)

    def tail_steps(self, batch: Batch, model: Recommender):
        """With ``listwise``: the candidates' draw, the listwise term's one tail request, then the other terms on
        the candidates' scores (the replica scores them itself) and the own loss."""
        return self._loss_steps(batch, model, None) if "listwise" in self.weights else None

    def answer_tail(self, scores: torch.Tensor, users: torch.Tensor, head: torch.Tensor | None,
                    listed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The listwise normalizer over every unobserved item at τ, and the listed top-K's scores."""
        tau = self.config.temperature
        return self.context.tail_and_listed_scores(scores, users, head, listed,
                                                   temperature=None if tau == 1 else tau)

    def _loss_steps(self, batch: Batch, model: Recommender, scored: Callable[[], torch.Tensor | None] | None):
        """The loss as steps (:meth:`~hetcomp.train.Objective.tail_steps`): with ``listwise`` one tail request,
        the tail's normalizer and the top-K's scores from one node (no dense gather gradient, no dense division
        outside it: the same numbers and gradients as dividing and gathering, bit for bit). ``scored`` gives the
        users' scores of every item where the candidates' are read from them (None: the student scores the
        candidates, as a stack's replica does)."""
        users = batch["users"]
        items, teacher, valid = self.candidates(users, self._generator,
                                                model.drawn_first(users) if hasattr(model, "drawn_first") else None)
        tau = self.config.temperature
        top = items[:, :self.k]
        if "listwise" in self.weights:
            normalizer, listed = yield None, top
        student = None
        if set(self.weights) != {"listwise"}:  # the other terms read the candidates' scores
            rows = scored() if scored is not None else None
            student = rows.gather(1, items) if rows is not None else model.score_items(users, items)

        def listwise() -> torch.Tensor:
            target = torch.softmax(self.top_logits / tau, dim=0).expand(len(users), -1)
            return losses.soft_target_cross_entropy(None, None, top, target, valid[:, :self.k], tau,
                                                    log_normalizer=normalizer, listed=listed)

        total = torch.zeros((), device=self.device)
        for name, weight in self.weights.items():
            total = total + weight * self.term(name, student, teacher, valid, listwise)
        if self.config.own_weight:
            total = total + self.config.own_weight * self.own_loss(model, users)
        return total
