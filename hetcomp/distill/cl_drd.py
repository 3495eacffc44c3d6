"""CL-DRD — curriculum learning for dense retrieval distillation (H. Zeng, H. Zamani, V. Vinay, "Curriculum
Learning for Dense Retrieval Distillation", SIGIR 2022), applied to the converged ensemble's ranking.

A predefined easy-to-hard curriculum over rank positions. Stage s (lengths n_1 < n_2 < … from ``stages``) fixes
how many of the ensemble's top unobserved items are finely ordered, in three label groups (from the authors'
released code, github.com/HansiZeng/CL-DRD: ``dataset/nway_dataset.py`` label modes 8, 9, 10 and
``losses/lambda_rank.py``):

- the head: the ensemble's top-n_s unobserved items, label 1/rank (rank from 1): their exact order matters;
- the "hard" items: ensemble ranks (n_s, N], label −0.25: below the head, no order among them;
- the negatives: unobserved items outside the ensemble's top-N, label −0.5: below everything listed.

The loss is the authors' LambdaMRR: a logistic loss on every pair the labels order, weighted by |1/p_i − 1/p_j|
with p the student's current positions, so the label values only fix the order and the pairs the student has
near its top weigh most.

**The authors' sampled groups** (version 2 of this method, unchanged): each user's list has ``list_size`` items:
the head, ⌊(size − n_s)/2⌋ hard items drawn uniformly from ensemble ranks (n_s, N] and the rest drawn uniformly
from the unobserved items outside the top-N; with the defaults 5 + 12 + 13, then 10 + 10 + 10, then 20 + 5 + 5,
the authors' three steps; LambdaMRR with p the positions inside the list, mean over the batch's pairs; default
weight 1.

**As the HetComp paper ran it, without the sampling step: ``--method cl-drd-full``** (:mod:`hetcomp.distill.
cl_drd_full`: every member of each group used, every other unobserved item a negative, a per-user sum). The HetComp
authors report (README of github.com/SeongKu-Kang/HetComp_WWW23) that the sampling of top-ranked unobserved items
was unnecessary and that removing it considerably improved the ranking-matching baselines (RRD, MTD, CL-DRD, DCD),
so they ran all of them without it; their released code contains no CL-DRD, and how the groups look without
sampling is not published. That form, Table 2's CL-DRD row (this one is the option row "CL-DRD (sampled)"), is a
method of its own, with its own study and row, because it costs ~0.2 s per batch of 64 users on one CPU thread
(~12 s an epoch for Foursquare's MF student, against ~1 s for this one) and its weight lives on another scale;
this class computes both (``sampling``), and ``cl-drd`` itself keeps ``sampling`` true.

Each stage lasts ``stage_epochs`` epochs, the last one until training ends. Defaults: stages 5, 10, 20 (the
authors' code), N = 100, 30 epochs a stage (our choice; the paper trains one pass a step). Lengths are clamped
to the ensemble ranking that exists; a group with nothing in it is left out. ``search_space`` on the config
declares the ranges to tune on validation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from hetcomp.config import knob, validate
from hetcomp.distill.base import DistillContext, DistillMethod
from hetcomp.distill.losses import lambda_mrr_loss, lambda_mrr_rest_loss
from hetcomp.distill.tools import (
    padded_stack,
    sample_uniform_from_mask,
    sample_unobserved,
    sample_unobserved_lockstep,
)
from hetcomp.errors import HetCompError
from hetcomp.models.base import Batch, Recommender
from hetcomp.train import StepRequest, Trainer


@dataclass
class CurriculumConfig:
    """The curriculum both forms of CL-DRD share (this one and ``cl-drd-full``)."""

    stages: str = knob("5,10,20", check=lambda text: parse_stages(text))  # head lengths n_s, one per stage
    stage_epochs: int = knob(30, ge=1)
    top_n: int = knob(100, ge=1)


@dataclass
class CLDRDConfig(CurriculumConfig):
    owner = "cl-drd"
    list_size: int = knob(30, ge=2)
    weight: float | None = knob(None, ge=0)  # None: 1 (the unsampled form, cl-drd-full, has its own default)
    #: always true here (a field so that the rows' identities stand): the unsampled form is ``--method cl-drd-full``
    sampling: bool = True

    #: what ``hetcomp tune`` may search, on validation: name → ("float_log" | "float" | "int", low, high) or
    #: ("choice", [values]) (the weight's range, made when one study served both forms, is kept so that the
    #: committed studies stand)
    search_space: ClassVar[dict] = {
        "stage_epochs": ("int", 5, 60),
        "weight": ("float_log", 1e-4, 10.0),
        "stages": ("choice", ["3,5,10", "5,10,20", "10,15,25"]),  # every stage below list_size (30)
        "top_n": ("choice", [50, 100, 200]),
    }

    def __post_init__(self) -> None:
        validate(self)
        if not self.sampling:
            raise HetCompError("cl-drd without its sampling step is a method of its own, with its own study and "
                               "row: use --method cl-drd-full (and leave out sampling)")


HARD_LABEL, NEGATIVE_LABEL = -0.25, -0.5  # the authors' labels; below every 1/rank, and only their order matters


@dataclasses.dataclass
class ListRequest(StepRequest):
    """The LambdaMRR term of a step's sampled lists (``items``, ``labels``, ``valid`` [B, L] for ``users``):
    answered with the ordinary run's ``model``, or for every replica of a stack in one vmapped call (a replica's
    lists padded with invalid entries where shapes differ, which pair with nothing)."""

    model: Recommender
    users: torch.Tensor
    items: torch.Tensor
    labels: torch.Tensor
    valid: torch.Tensor
    key = ("cl-drd-lists",)

    def answer(self) -> torch.Tensor:
        return lambda_mrr_loss(self.model.score_items(self.users, self.items), self.labels, self.valid)

    @classmethod
    def stacked(cls, requests: list[ListRequest]) -> tuple[dict[str, torch.Tensor], Callable]:
        def term(score_items: Callable, replica: dict[str, torch.Tensor]) -> torch.Tensor:
            return lambda_mrr_loss(score_items(replica["users"], replica["items"]), replica["labels"],
                                   replica["valid"])

        return {name: padded_stack([getattr(request, name) for request in requests])
                for name in ("users", "items", "labels", "valid")}, term


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
    # 2: negatives by rejection sampling (sample_unobserved), another random stream
    # 3: the own loss over every training interaction of the batch users (was one sampled per user)
    version = 3
    config_class = CLDRDConfig
    adds_own_loss = True
    #: the lists' draws come first (made for every replica at once, :meth:`first_draws_lockstep`) and the own loss
    #: draws last: seeds stack (on the scores of every item, without sampling)
    stackable_scores = True
    own_draws_last = True

    def __init__(self, context: DistillContext, config: CLDRDConfig | None = None) -> None:
        super().__init__(context, config)
        self.stage_sizes = parse_stages(self.config.stages)
        if self.config.stage_epochs < 1:
            raise HetCompError("stage_epochs must be at least 1")
        if self.config.sampling and self.config.list_size <= max(self.stage_sizes):
            raise HetCompError(f"list_size ({self.config.list_size}) must exceed the longest stage "
                               f"({max(self.stage_sizes)}) so that every list has items to rank below its head")
        self.ranking = context.converged_topk
        self.top_n = min(self.config.top_n, self.ranking.shape[1])
        self.stage = 0
        self.weight = self.config.weight if self.config.weight is not None else (1.0 if self.config.sampling
                                                                                 else 0.01)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.stage = min((epoch - 1) // self.config.stage_epochs, len(self.stage_sizes) - 1)

    @property
    def list_length(self) -> int:
        """n_s of the current stage (clamped to the ensemble's top-N)."""
        return min(self.stage_sizes[self.stage], self.top_n)

    def candidates(self, users: torch.Tensor,
                   generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The current stage's list per user: (items [B, size], labels [B, size], valid [B, size])."""
        groups, head, n_negative = self._head_and_hard(users, generator)
        return self._with_negatives(groups, *sample_unobserved(self.context.sampler, users, n_negative, head,
                                                                 generator))

    def _head_and_hard(self, users: torch.Tensor, generator: torch.Generator | None) -> tuple[list, torch.Tensor, int]:
        """The list's first draws: (its head's and sampled hard items' groups of (items, labels, valid), the
        ensemble's top-N that the negatives avoid, how many negatives to draw)."""
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
        return groups, head, n_negative

    def _with_negatives(self, groups: list, items: torch.Tensor,
                        valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        groups = [*groups, (items, torch.full(items.shape, NEGATIVE_LABEL, device=self.device), valid)]
        return tuple(torch.cat(parts, dim=1) for parts in zip(*groups, strict=True))

    @classmethod
    def first_draws_lockstep(cls, objectives: Sequence[CLDRD], users: Sequence[torch.Tensor],
                             model: Recommender) -> list | None:
        """With sampling, every replica's list: each replica's hard items (its own noise), then every replica's
        negatives at once (``sample_unobserved_lockstep``), each what it would draw alone."""
        if not objectives[0].config.sampling or len({id(objective.context) for objective in objectives}) != 1:
            return None
        firsts = [objective._head_and_hard(part, objective._generator)
                  for objective, part in zip(objectives, users, strict=True)]
        if len({n_negative for _, _, n_negative in firsts}) != 1:
            return None
        negatives = sample_unobserved_lockstep(objectives[0].context.sampler, users, firsts[0][2],
                                               [head for _, head, _ in firsts], [o._generator for o in objectives])
        return [objective._with_negatives(groups, *drawn)
                for objective, (groups, _, _), drawn in zip(objectives, firsts, negatives, strict=True)]

    def listed(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Without sampling, the current stage's listed items per user: (the ensemble's top-N [B, N], labels: 1/rank
        for the head, the hard label after it, valid [B, N]); every other unobserved item is a negative."""
        n, head = self.list_length, self.ranking[users, :self.top_n]
        labels = torch.full(head.shape, HARD_LABEL, device=self.device)
        labels[:, :n] = 1.0 / torch.arange(1, n + 1, dtype=torch.float32, device=self.device)
        return head, labels, torch.ones_like(head, dtype=torch.bool)

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return self.loss_of_scores(None, batch, model)

    def tail_steps(self, batch: Batch, model: Recommender):
        """With sampling: the lists' draws, a :class:`ListRequest` for their LambdaMRR term, then the own loss."""
        return self._sampled_steps(batch, model) if self.config.sampling else None

    def _sampled_steps(self, batch: Batch, model: Recommender):
        users = batch["users"]
        drawn = model.drawn_first(users) if hasattr(model, "drawn_first") else None
        items, labels, valid = drawn or self.candidates(users, self._generator)
        pairwise = yield ListRequest(model, users, items, labels, valid)
        return self.own_loss(model, users) + self.weight * pairwise

    def loss_of_scores(self, scores: torch.Tensor | None, batch: Batch, model: Recommender) -> torch.Tensor:
        """The loss; ``scores`` (a stack's) serve the form without sampling, the sampled form scores its lists."""
        users = batch["users"]
        if self.config.sampling:
            return self.drive_steps(self._sampled_steps(batch, model), None, users)
        items, labels, valid = self.listed(users)
        scores = model.score(users) if scores is None else scores
        per_user = lambda_mrr_rest_loss(scores, ~self.context.train_mask(users), items, labels, valid)
        return self.own_loss(model, users) + self.weight * per_user.mean()

    def describe(self) -> str:
        return f"stage {self.stage + 1}/{len(self.stage_sizes)}  list {self.list_length}"
