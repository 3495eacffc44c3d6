"""What every distillation method shares: the teachers' knowledge, user batches, and the student's own loss.

A method is an :class:`~hetcomp.train.Objective` (batches + loss + optional per-epoch / per-evaluation hooks)
built from a :class:`DistillContext`. The shared :class:`~hetcomp.train.Trainer` trains the student with it.
Adding a method = one file with a subclass of :class:`DistillMethod` and one line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from hetcomp.data import Split
from hetcomp.data.sampling import NegativeSampler
from hetcomp.distill.losses import tail_logsumexp, tail_logsumexp_and_listed
from hetcomp.ensemble import (
    EnsembleConfig,
    EnsembleScorer,
    ensemble_observed_order,
    state_weight_table,
    teacher_weights,
    weights_at_states,
)
from hetcomp.errors import HetCompError
from hetcomp.metrics import csr_rows_dense
from hetcomp.models.base import Batch, Recommender
from hetcomp.train import Objective


class DistillContext:
    """The teachers' knowledge about one split, computed once and shared by methods.

    Holds the trajectories, the converged ensemble's top-K unobserved items, each user's observed items in
    ensemble order (padded), the training mask and a negative sampler.
    """

    def __init__(self, split: Split, trajectories: list, device: torch.device | str = "cpu",
                 ensemble: EnsembleConfig | None = None, batch_users: int = 64, needs_teachers: bool = True) -> None:
        if needs_teachers and not trajectories:
            raise HetCompError("distillation needs teacher trajectories; train them with `hetcomp train-teachers`")
        self.split = split
        self.trajectories = trajectories
        self.device = torch.device(device)
        self.ensemble = ensemble or EnsembleConfig()
        self.batch_users = batch_users
        self.n_users, self.n_items = split.n_users, split.n_items
        self.active_users = torch.from_numpy(np.flatnonzero(np.diff(split.train.indptr) > 0))
        self.sampler = NegativeSampler(split.train, self.device)
        self.train_indptr = torch.from_numpy(split.train.indptr.astype(np.int64))
        self.train_indices = torch.from_numpy(split.train.indices.astype(np.int64))

    @cached_property
    def teacher_weights(self) -> torch.Tensor:
        """The converged teachers' weights in g (read on first use: w/o KD has no teachers to weigh)."""
        if not self.trajectories:
            raise HetCompError("this method reads the teachers' knowledge, but the run was given no teacher "
                               "trajectories; train them with `hetcomp train-teachers`")
        return teacher_weights(self.split, self.trajectories, self.ensemble.weighting, self.ensemble.weight_power)

    @cached_property
    def state_weights(self) -> torch.Tensor:
        """``valid-state`` weights [n_teachers, n_states], measured once (DKC rebuilds only gather from them)."""
        return state_weight_table(self.split, self.trajectories, self.ensemble.weight_power)

    @property
    def teacher_names(self) -> list[str]:
        return [t.name for t in self.trajectories]

    def scorer(self, state_of: int | torch.Tensor = -1) -> EnsembleScorer:
        weights = self.teacher_weights
        if self.ensemble.weighting == "valid-state":  # the weights follow the states the users learn from
            weights = weights_at_states(self.state_weights, state_of)
        return EnsembleScorer(self.trajectories, state_of, self.ensemble.decay, self.ensemble.temperature,
                              self.ensemble.beta, weights, self.device)

    def ensemble_topk(self, k: int, state_of: int | torch.Tensor = -1, batch_size: int = 1024) -> torch.Tensor:
        """Top-k unobserved items [n_users, k] of g over the chosen states (converged by default).

        HetComp rebuilds this after every DKC check that moves a state, so it ranks only the items in the
        teachers' lists (:meth:`~hetcomp.ensemble.EnsembleScorer.topk`): the same ranking, ties included, as
        ``topk_items`` over the dense scores with the training items at −inf.
        """
        return self.scorer(state_of).topk(k, self.split.train, batch_size)

    @cached_property
    def converged_topk(self) -> torch.Tensor:
        """The converged ensemble's top-500 unobserved items per user (every baseline's supervision)."""
        return self.ensemble_topk(min(500, self.split.fewest_unobserved))

    @cached_property
    def observed_order(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each user's training items in ensemble order, padded: (items [U, max_len], valid mask)."""
        order = torch.from_numpy(ensemble_observed_order(self.trajectories, self.split.train,
                                                         self.ensemble.decay, self.ensemble.temperature,
                                                         self.ensemble.beta, self.teacher_weights))
        lengths = self.train_indptr[1:] - self.train_indptr[:-1]
        width = int(lengths.max())
        position = torch.arange(width).unsqueeze(0)
        valid = position < lengths.unsqueeze(1)
        index = (self.train_indptr[:-1].unsqueeze(1) + position).clamp(max=max(len(order) - 1, 0))
        items = torch.where(valid, order[index], torch.full_like(index, -1))
        return items.to(self.device), valid.to(self.device)

    def observed_order_of(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The users' rows of :attr:`observed_order`, cut to the longest of them: (items [B, L], valid)."""
        items, valid = (x[users] for x in self.observed_order)
        width = max(int(valid.sum(1).max()), 1) if len(users) else 1
        return items[:, :width], valid[:, :width]

    def _excluded(self, users: torch.Tensor, head: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(items, valid) [B, L] to leave out of the users' tails: their padded training items, then ``head``."""
        excluded, valid = (x[users] for x in self.observed_order)
        if head is None:
            return excluded, valid
        return torch.cat([excluded, head], 1), torch.cat([valid, torch.ones_like(head, dtype=torch.bool)], 1)

    def tail_logsumexp(self, scores: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        """log Σ e^f over each user's unobserved items (a softmax normalizer), without a dense [B, n_items] mask."""
        return tail_logsumexp(scores, *self._excluded(users))

    def tail_and_listed_scores(self, scores: torch.Tensor, users: torch.Tensor, head: torch.Tensor | None,
                               listed: torch.Tensor, bound: float | None = None,
                               temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(log Σ e^{f/τ} over the unobserved items outside ``head`` [B, H] (None: every unobserved item), the
        scores of ``listed`` [B, L]) in one autograd node (:func:`~hetcomp.distill.losses.tail_logsumexp_and_listed`);
        both clamped by ``bound``; the listed scores are not divided by ``temperature``."""
        return tail_logsumexp_and_listed(scores, *self._excluded(users, head), listed, bound, temperature)

    def train_mask(self, users: torch.Tensor) -> torch.Tensor:
        """Dense bool [B, n_items] of the users' training items."""
        return csr_rows_dense(self.split.train, users.cpu().numpy(), self.device)

    def sample_interactions(self, users: torch.Tensor, generator: torch.Generator, n_negatives: int = 1) -> Batch:
        """Every training interaction of ``users`` (a user once per epoch, so one pass over the data per epoch)
        with ``n_negatives`` sampled negatives each (for a student's own loss)."""
        repeated, positives, _ = self._interactions(users)
        negatives = self.sampler.sample(repeated, n_negatives, generator)
        return {"users": repeated.to(self.device), "pos": positives.to(self.device), "neg": negatives.to(self.device)}

    def sample_interactions_lockstep(self, users: list[torch.Tensor], generators: list[torch.Generator],
                                     n_negatives: int = 1) -> list[Batch]:
        """:meth:`sample_interactions` for several user batches, each with its own generator (stacked seeds'
        replicas): each batch gets what it would alone, the negatives drawn in lockstep
        (:meth:`~hetcomp.data.sampling.NegativeSampler.sample_lockstep`)."""
        repeated, positives, length = self._interactions(torch.cat(users))
        ends = length.cumsum(0)[torch.tensor([len(part) for part in users]).cumsum(0) - 1]
        sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()  # each batch's number of interactions
        parts = list(zip(repeated.split(sizes), positives.split(sizes), strict=True))
        negatives = self.sampler.sample_lockstep([user for user, _ in parts], n_negatives, generators)
        return [{"users": user.to(self.device), "pos": positive.to(self.device), "neg": negative.to(self.device)}
                for (user, positive), negative in zip(parts, negatives, strict=True)]

    def _interactions(self, users: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(each training interaction's user, its item, each user's number of them) for ``users``, in their
        order (CPU tensors)."""
        users_cpu = users.cpu()
        start = self.train_indptr[users_cpu]
        length = self.train_indptr[users_cpu + 1] - start
        first = torch.repeat_interleave(start - (torch.cumsum(length, 0) - length), length)
        positives = self.train_indices[first + torch.arange(int(length.sum()))]
        return torch.repeat_interleave(users_cpu, length), positives, length


def scores_once(model: Recommender, users: torch.Tensor, scores: torch.Tensor | None) -> Callable[[], torch.Tensor]:
    """The users' scores of every item (``scores``, or the student's when None), computed at the first call and
    then reused: a loss given as steps scores where its ordinary order first needs them (after its first draws),
    and what else reads them gets the same tensor."""
    computed: list[torch.Tensor] = []

    def scored() -> torch.Tensor:
        if not computed:
            computed.append(model.score(users) if scores is None else scores)
        return computed[0]

    return scored


def own_batch(model: Recommender, triples: Batch) -> Batch:
    """A batch of training triples in the form the student's own loss reads (its ``batch_kind``): triples and
    user batches as they are (a user model reads ``users``), an item model (the item autoencoder) the distinct
    positive items, whose user columns it reconstructs."""
    if model.batch_kind == "items":
        return {"items": torch.unique(triples["pos"])}
    return triples


class DistillMethod(Objective):
    """Base class: user batches (each user once per epoch), options from ``config_class``."""

    name: str = ""
    #: False: the student uses the distillation recipe (lr 1e-2, no weight decay); True: the model's own lr and
    #: weight decay, as when it is trained as a teacher (w/o KD)
    uses_own_recipe: bool = False
    #: False for a method that learns from the data alone (w/o KD): its runs need no teachers and their identity
    #: names none, so retraining the teachers leaves them valid
    reads_teachers: bool = True
    #: bump when a change of this method's code changes its results: ``reproduce`` then retrains its rows
    #: instead of reusing them (the configuration hash holds the version from 2 on, so version-1 rows keep theirs)
    version: int = 1

    @dataclass
    class Config:
        pass

    config_class = Config

    #: top-M unobserved items each evaluation should also return (HetComp's DKC reads the student's ranking)
    evaluation_top_m: int | None = None

    #: True when no draw follows the own loss's in a step (its loss draws nothing else after it): stacked seeds
    #: may then draw every replica's own-loss triples at once, at the end of the step (``hetcomp.stacked``)
    own_draws_last: bool = False
    #: True when a step always draws the own loss's triples before anything else it draws: stacked seeds may then
    #: draw every replica's at once, before the step (``hetcomp.stacked``)
    own_draws_first: bool = False

    #: True when the loss is the student's own loss plus a distillation term (``L_own + weight · L_KD``): at a
    #: small weight such a method is w/o KD, whose tuned recipe its study therefore also tries
    adds_own_loss: bool = False

    @classmethod
    def first_draws_lockstep(cls, objectives: Sequence[DistillMethod], users: Sequence[torch.Tensor],
                             model: Recommender) -> list | None:
        """Stacked seeds: every replica's first draws of a step (``objectives``, one per replica, drawing for
        ``users``, its batch), made at once before the steps run, each replica's what it would draw alone; the
        replica's step then takes its part (``model.drawn_first(users)``) instead of drawing. By default the own
        loss's triples, for a method whose step draws them first (``own_draws_first``); None: nothing ahead."""
        first = objectives[0]
        if (not first.own_draws_first or model.batch_kind != "triples"
                or len({id(objective.context) for objective in objectives}) != 1):
            return None
        return first.context.sample_interactions_lockstep(list(users), [o._generator for o in objectives],
                                                          getattr(model.config, "n_negatives", 1))

    @classmethod
    def tuning_start(cls, tuned: Callable[[str], dict]) -> dict:
        """Settings a new tuning study tries first besides the defaults, e.g. read from another method's tuned
        settings with ``tuned(method)`` ({} when that method has none)."""
        return {}

    @classmethod
    def tuning_reads(cls) -> tuple[str, ...]:
        """The methods (of the same student) whose tuned settings :meth:`tuning_start` and
        :meth:`tuning_alternatives` ask for, found by asking them (with no method tuned yet), so it cannot drift
        from what they read: a plan of studies runs those studies first."""
        asked: list[str] = []

        def tuned(method: str) -> dict:
            asked.append(method)
            return {}

        cls.tuning_start(tuned)
        cls.tuning_alternatives(tuned)
        special = cls.special_case()
        return tuple(dict.fromkeys([*asked, *([special[0]] if special else [])]))

    @classmethod
    def stacks_seeds(cls, config) -> bool:
        """Whether runs of this method at ``config`` (its config dataclass) can train their seeds as one stacked
        model (:mod:`hetcomp.stacked`), known before any objective is built (a grid groups a row's seeds by it):
        by default when the class sets ``stackable`` or ``stackable_scores`` to True; a method that stacks on the
        scores at some settings only overrides this, and its ``stackable_scores`` follows."""
        return cls.stackable is True or cls.stackable_scores is True

    @property
    def stackable_scores(self) -> bool:
        """:meth:`stacks_seeds` at this objective's settings, for a method that stacks on the scores (a class that
        stacks at every setting sets the attribute instead)."""
        return not self.stackable and type(self).stacks_seeds(self.config)

    @classmethod
    def trains_as(cls, config: dict, options: dict) -> tuple[str, dict] | None:
        """(method, options) of another method that a run of this one trains exactly as (the same parameters after
        every step, tested), given this run's full ``config`` and the ``options`` its command line sets; None when
        there is none. A finished run of that twin then serves as this run (see ``hetcomp.runs.execute``)."""
        return None

    @classmethod
    def special_case(cls) -> tuple[str, Callable[[dict], dict]] | None:
        """Another method that this one trains exactly as at one of its own settings, and how that method's chosen
        settings (``{"lr": …, "weight_decay": …, <option>: …}``) read as this one's (DCD at ``dcd_weight=0`` is RRD,
        bit for bit). A finished study of this method then chooses them where that method's own study reached a
        higher validation value than any of this study's trials: the point exists in this method's space (a
        log-scale range cannot hold the 0), so its choice is never below the method it extends. None: no such
        method."""
        return None

    @classmethod
    def tuning_alternatives(cls, tuned: Callable[[str], dict]) -> list[dict]:
        """Other informed guesses a new study tries right after its first trial, each a change of that trial
        (one trial of the budget each). A method with ``adds_own_loss`` tries w/o KD's tuned lr and weight decay:
        its own loss is w/o KD's, and the distillation recipe (lr 1e-2, no weight decay) may starve it."""
        own = tuned("none") if cls.adds_own_loss else {}
        recipe = {name: own[name] for name in ("lr", "weight_decay") if name in own}
        return [recipe] if recipe else []

    def __init__(self, context: DistillContext, config=None) -> None:
        self.context = context
        self.config = config if config is not None else self.config_class()
        self.device = context.device

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        users = self.context.active_users
        order = users[torch.randperm(len(users), generator=generator)]
        self._generator = generator
        for start in range(0, len(order), self.context.batch_users):
            yield {"users": order[start:start + self.context.batch_users].to(self.device)}

    def own_loss(self, model: Recommender, users: torch.Tensor) -> torch.Tensor:
        """The student's own collaborative-filtering loss on every training interaction of the batch's users, so
        one pass over the data per epoch, as the authors' codes of RD, DE-RRD and DCD train the base model beside
        the distillation term. (Until version bumps of 2026-12 it saw one sampled interaction per user per epoch,
        ~1/15 of CiteULike's: it starved the own loss and kept RD and CL-DRD at or below w/o KD.)"""
        n_negatives = getattr(model.config, "n_negatives", 1)
        if hasattr(model, "defer_own_draws"):  # a stacked replica (hetcomp.stacked)
            if self.own_draws_last:
                deferred = model.defer_own_draws(self.context, users, self._generator, n_negatives)
                if deferred is not None:
                    return deferred
            elif self.own_draws_first:
                drawn = model.drawn_first(users)
                if drawn is not None:
                    return model.loss(own_batch(model, drawn))
        return model.loss(own_batch(model, self.context.sample_interactions(users, self._generator, n_negatives)))

    def describe(self) -> str:
        """One line for progress logs (e.g. HetComp's phase and states)."""
        return ""
