"""DCD — Dual Correction Distillation (Y. Lee and K.-E. Kim, "Dual Correction Strategy for Ranking
Distillation in Top-N Recommender System", CIKM 2021), on top of RRD.

Every ``period`` epochs the student's rank of each entry of the teacher's lists is compared with the teacher's:

- user side: for user u and each item in the ensemble's top-W list of u (W ≤ 500), r_T = the item's position
  in that list and r_S = its 0-based rank by the student's scores *within the same list* (``rank_scope="topn"``)
  or among all the user's unobserved items (``rank_scope="all"``, DCD version 2);
- item side: for item i and each user of the teacher's top-user list of i (below), r_T = the user's position in
  that list and r_S = the user's rank by the student's scores s(·, i) within the list;
- under-ranked error e_U = tanh(max(ε(r_S − r_T), 0)), over-ranked error e_O = tanh(max(ε(r_T − r_S), 0)).

Each batch draws, per user, n_U list items ∝ e_U and n_O ∝ e_O without replacement (a row with less error mass
draws fewer) and applies the relaxed ranking (Plackett–Luce) loss: the under-ranked items, in teacher order,
above the over-ranked ones. The item side does the same with the sampled users' scores of the item:

    L = L_own + rrd_weight · L_RRD + dcd_weight · (L_user-correction + L_item-correction).

What follows the authors' code (github.com/dudwns511/DCD_CIKM21, ``run_dcd.py``, function ``DCD``; loss in
``Utils/dcd_loss.py``, ``relaxed_ranking_loss``):

- the errors are refreshed every 3 epochs (``epoch % 3 == 0``), on the teacher's top-500 items per user and
  top-500 users per item;
- the student's rank is taken *within* the teacher's list: the student scores only the listed items
  (``forward_multi_items`` / ``forward_multi_users``), its order of them (``argsort``) gives r_S. Our "topn"
  does the same with ties counted as in :func:`~hetcomp.distill.tools.ranks_within_rows` (strictly higher
  scores), the code breaks them by ``argsort``;
- the tanh errors, and draws ∝ error without replacement (``torch.multinomial``; we use the same law by
  exponential keys, Gumbel-top-k in another form, which also tolerates rows with too little error mass instead
  of raising), the under-ranked draws sorted back into teacher order, the over-ranked ones unordered;
- the loss −Σ_k log(e^{f_k} / (Σ_{l≥k} e^{f_l} + Σ_{over} e^{f})) on the sampled items (user side) and on the
  sampled users (item side), one n (``p_n``) and one weight per side (``UCD_lmbda``, ``ICD_lmbda``).

What is ours:

- the teacher is the converged ensemble g, and the item side's top users are not a teacher score column (which
  g does not have) but the transpose of the users' top-W lists (:func:`~hetcomp.distill.tools.transpose_lists`):
  per item, the users that have it in their list, ordered by its position there (then user id), the first
  ``item_width`` (500, as the code) kept; items in no list have no item-side term;
- batches are user batches (each active user once per epoch, as for every method here); the item side takes
  an equal share of the items that have a user list, so every such item is corrected once per epoch (the code
  corrects the distinct positive items of each 1,024-interaction batch, so popular items more often). The
  shares group items of similar list length (a per-epoch shuffle, a stable sort by length, the groups dealt to
  the batches in random order), so a batch pads its lists to ~its own length, not always to 500;
- the RRD term (``rrd_weight``, RRD's options) is kept, as method.md and the HetComp paper describe DCD; the
  released ``run_dcd.py`` adds only the two corrections to the base loss. ``rrd_weight=0`` drops it;
- one ``dcd_weight`` for both sides and n_U, n_O apart (the code: one p_n, two λ), means over the batch's
  users / items (the code sums, so its λ are ours divided by the rows per batch);
- ε, n_U, n_O and the weights are *not* set in the released code (they come from an ``opt`` whose parser is
  not released) and the paper's values were not available to us: the defaults below are placeholders to be
  chosen on validation within :attr:`DCDConfig.search_space`;
- ``rank_scope="all"`` (version 2's user-side rank among all ~25k unobserved items, a full-row sort per user)
  is kept as an option for the user side; the item side always ranks within its list (a rank among all users
  would need the transposed full score matrix);
- ``sides`` switches each side off (``"user"`` alone with ``rank_scope="all"`` is version 2). With
  ``dcd_weight=0`` nothing is refreshed or sampled, so DCD trains exactly as RRD with ``weight=rrd_weight``;
  that point is outside the searched log-scale range, so a finished study chooses RRD's tuned settings at
  ``dcd_weight=0`` where RRD's study reached more on validation than every correction tried
  (:meth:`DCD.special_case`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from hetcomp.config import knob, validate
from hetcomp.distill.base import DistillContext, DistillMethod, scores_once
from hetcomp.distill.losses import relaxed_ranking_loss, relaxed_ranking_rows
from hetcomp.distill.rrd import RRD, RRDConfig
from hetcomp.distill.tools import (
    csr_rows_padded,
    exponential_noise,
    padded_stack,
    ranks_outside,
    ranks_within_groups,
    ranks_within_rows,
    sample_disjoint_without_replacement,
    transpose_lists,
)
from hetcomp.models.base import Batch, Recommender
from hetcomp.train import StepRequest, Trainer


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
    sides: str = knob("both", choices=("both", "user", "item"))
    rank_scope: str = knob("topn", choices=("topn", "all"))
    item_width: int = knob(500, ge=1)
    check_users: int = knob(1024, ge=1)

    #: what a tuner searches, on validation: name -> ("float_log" | "float" | "int", low, high) or
    #: ("choice", [values]). ε scales rank gaps of up to 500 (1e-4: nearly linear, 1e-1: saturated after ~20
    #: places); the weights span our mean-over-rows convention around the authors' summed one; period 1..10
    #: around the code's 3; k (the RRD component's list) over RRD's own range, so DCD can match a tuned RRD
    search_space = {
        "k": ("int", 10, 100),
        "epsilon": ("float_log", 1e-4, 1e-1),
        "n_under": ("int", 2, 50),
        "n_over": ("int", 2, 50),
        "rrd_weight": ("float_log", 1e-4, 1e-1),
        "dcd_weight": ("float_log", 1e-4, 1.0),
        "period": ("int", 1, 10),
        "sides": ("choice", ["both", "user", "item"]),
    }

    def __post_init__(self) -> None:
        validate(self)


def draw_corrections(under: torch.Tensor, over: torch.Tensor, lists: torch.Tensor, n_under: int, n_over: int,
                     generator: torch.Generator | None = None, noise: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row, entries of ``lists`` [..., W] drawn ∝ the errors [..., W] without replacement: (under-ranked ids
    in list order, valid, over-ranked ids, valid), each [..., ≤n]. Entries of zero error are never drawn. An entry
    is under- or over-ranked, never both, so both draws share one noise draw (``noise``: drawn already)."""
    width = lists.shape[-1]
    (picks, valid), (over_picks, over_valid) = sample_disjoint_without_replacement(under, over, n_under, n_over,
                                                                                   generator, noise)
    order = torch.where(valid, picks, picks + width).sort(dim=-1).indices  # list order, invalid draws last
    picks, valid = picks.gather(-1, order), valid.gather(-1, order)
    return lists.gather(-1, picks), valid, lists.gather(-1, over_picks), over_valid


def _from_rrd(settings: dict) -> dict:
    """RRD's settings as DCD's: the same recipe and list options, RRD's weight as ``rrd_weight``, no correction."""
    return {("rrd_weight" if name == "weight" else name): value for name, value in settings.items()} | {
        "dcd_weight": 0.0}


def correction_loss(score_items: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], side: str,
                    rows: torch.Tensor, under: torch.Tensor, under_valid: torch.Tensor, over: torch.Tensor,
                    over_valid: torch.Tensor, count: torch.Tensor | None = None) -> torch.Tensor:
    """One side's relaxed ranking loss on its sampled entries: ``rows`` [B] are users (user side: ``under`` and
    ``over`` [B, ≤n] are items) or items (item side: they are users), scored by the student's ``score_items``;
    the under-ranked entries in list order above the over-ranked ones. The mean over the rows, or the rows' sum
    divided by ``count`` (stacked seeds' padded rows count for nothing)."""
    listed = torch.cat([under, over], 1)
    if side == "user":
        local = score_items(rows, listed.clamp(min=0))
    else:  # each (user, item) pair scored on its own: one item per row, its users as the batch
        local = score_items(listed.clamp(min=0).reshape(-1),
                            rows.repeat_interleave(listed.shape[1]).unsqueeze(1)).view(listed.shape)
    positions = torch.arange(local.shape[1], device=local.device).expand_as(local)
    width = under.shape[1]
    parts = (local, positions[:, :width], under_valid, positions[:, width:], over_valid)
    return relaxed_ranking_loss(*parts) if count is None else relaxed_ranking_rows(*parts).sum() / count


@dataclasses.dataclass
class CorrectionRequest(StepRequest):
    """One side's correction term of a step, its noise drawn, its entries not yet (:func:`draw_corrections`, then
    :func:`correction_loss`): ``rows`` [B] with their ``lists`` [B, W] (the other kind's ids) and errors. Answered
    with the ordinary run's ``model``, or for every replica of a stack at once: the draws over the replicas' rows
    in one go, padded to common shapes (padding has no error, so it is never drawn), then the loss vmapped."""

    model: Recommender
    side: str
    rows: torch.Tensor
    under_error: torch.Tensor
    over_error: torch.Tensor
    lists: torch.Tensor
    noise: torch.Tensor
    n_under: int
    n_over: int

    @property
    def key(self) -> tuple:
        return ("dcd-correction", self.side, self.n_under, self.n_over)

    def answer(self) -> torch.Tensor:
        drawn = draw_corrections(self.under_error, self.over_error, self.lists, self.n_under, self.n_over,
                                 noise=self.noise)
        return correction_loss(self.model.score_items, self.side, self.rows, *drawn)

    @classmethod
    def stacked(cls, requests: list[CorrectionRequest]) -> tuple[dict[str, torch.Tensor], Callable]:
        def padded(name: str, fill: float) -> torch.Tensor:
            return padded_stack([getattr(request, name) for request in requests], fill)

        first = requests[0]
        drawn = draw_corrections(padded("under_error", 0.0), padded("over_error", 0.0), padded("lists", 0),
                                 first.n_under, first.n_over, noise=padded("noise", 1.0))
        inputs = dict(zip(("under", "under_valid", "over", "over_valid"), drawn, strict=True))
        inputs["rows"] = padded("rows", 0)
        inputs["count"] = torch.tensor([len(request.rows) for request in requests], dtype=torch.float32,
                                       device=first.rows.device)
        side = first.side

        def term(score_items: Callable, replica: dict[str, torch.Tensor]) -> torch.Tensor:
            return correction_loss(score_items, side, **replica)

        return inputs, term


def _errors(student_ranks: torch.Tensor, teacher_ranks: torch.Tensor, epsilon: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(under-ranked, over-ranked) errors tanh(max(±ε(r_S − r_T), 0))."""
    gap = epsilon * (student_ranks - teacher_ranks).to(torch.float32)
    return torch.tanh(gap.clamp(min=0)), torch.tanh((-gap).clamp(min=0))


class DCD(DistillMethod):
    """The student's own loss, RRD, and relaxed ranking losses on what the student currently misplaces, from
    the users' side and the items' side."""

    name = "dcd"
    # 3: the item side; the student's rank within the teacher's top-N list by default (v2: among all unobserved
    # items, user side only); each item of the item side corrected once per epoch. 4: both draws of a batch from
    # one exponential-key noise draw (the same law, other random numbers; ~6× fewer logarithms); item shares
    # grouped by list length; the user side scores its sampled items alone (other float rounding). 5: the own
    # loss over every training interaction of the batch users (was one sampled per user)
    version = 5
    config_class = DCDConfig
    adds_own_loss = True
    own_draws_first = True  # its corrections draw after the own loss, in the same step

    def __init__(self, context: DistillContext, config: DCDConfig | None = None) -> None:
        super().__init__(context, config)
        cfg = self.config
        self.rrd = RRD(context, RRDConfig(k=cfg.k, weight=cfg.rrd_weight, sample=cfg.sample, top_n=cfg.top_n,
                                          temperature=cfg.temperature, n_tail=cfg.n_tail))
        self.ranking = context.converged_topk
        self.active = cfg.dcd_weight > 0
        self.user_side = self.active and cfg.sides in ("both", "user")
        self.item_side = self.active and cfg.sides in ("both", "item")
        if self.item_side:
            #: each item's top users (by the item's place in their lists), as CSR: the entries of item i are
            #: ``item_entries[item_indptr[i]:item_indptr[i + 1]]``, each a flat index u·W + place into the users'
            #: lists (so u = entry // W); ``item_places`` [E] is each entry's 0-based place in its item's list
            self.item_indptr, self.item_entries = transpose_lists(self.ranking, context.n_items, cfg.item_width)
            counts = self.item_indptr[1:] - self.item_indptr[:-1]
            self.item_places = (torch.arange(len(self.item_entries), device=self.device)
                                - torch.repeat_interleave(self.item_indptr[:-1], counts))
            self.item_pool = torch.nonzero(counts).squeeze(1).cpu()
            self.item_counts = counts.cpu()
        #: errors of the last check, user side [n_users, W] and item side [E] (None before the first)
        self.under_error: torch.Tensor | None = None
        self.over_error: torch.Tensor | None = None
        self.item_under_error: torch.Tensor | None = None
        self.item_over_error: torch.Tensor | None = None

    @classmethod
    def tuning_start(cls, tuned: Callable[[str], dict]) -> dict:
        """A tuned RRD (its list, weight and recipe) under the default correction: DCD extends RRD, so its
        study starts where RRD's ended."""
        rrd = tuned("rrd")
        start = {name: rrd[name] for name in ("lr", "weight_decay", "k") if name in rrd}
        return start | ({"rrd_weight": rrd["weight"]} if "weight" in rrd else {})

    @classmethod
    def tuning_alternatives(cls, tuned: Callable[[str], dict]) -> list[dict]:
        """The same start with the smallest correction weight the space holds: DCD at zero correction is RRD,
        so the study also tries (nearly) the RRD it extends and leaves it only where validation says so."""
        return [{"dcd_weight": DCDConfig.search_space["dcd_weight"][1]}]

    @classmethod
    def special_case(cls) -> tuple[str, Callable[[dict], dict]]:
        """RRD: DCD with ``dcd_weight=0`` refreshes and samples nothing and trains exactly as RRD with
        ``weight=rrd_weight`` (tested), so RRD's tuned settings are DCD's with RRD's weight as ``rrd_weight``."""
        return "rrd", _from_rrd

    @classmethod
    def trains_as(cls, config: dict, options: dict) -> tuple[str, dict] | None:
        """RRD with ``weight=rrd_weight`` and DCD's list options, when ``dcd_weight`` is 0 (the correction
        options then play no part)."""
        if config.get("dcd_weight") != 0:
            return None

        def rrd_names(settings: dict) -> dict:  # the inverse of _from_rrd's renaming
            return {("weight" if name == "rrd_weight" else name): value for name, value in settings.items()}

        shared = {field.name for field in dataclasses.fields(RRDConfig)}
        as_rrd = {name: value for name, value in rrd_names(options).items() if name in shared}
        ours = rrd_names(config)
        # the RRD these options make must be this run's RRD part, defaults included
        made = dataclasses.asdict(RRDConfig(**as_rrd))
        return ("rrd", as_rrd) if all(ours.get(name) == value for name, value in made.items()) else None

    @property
    def checked(self) -> bool:
        return self.under_error is not None or self.item_under_error is not None

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        if self.active and (not self.checked or (epoch - 1) % self.config.period == 0):
            self.refresh(trainer.model)

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        """User batches as every method's; with the item side each also takes its share of the items."""
        user_batches = list(super().batches(epoch, generator))
        if not self.item_side or not user_batches:
            yield from user_batches
            return
        # shuffled, then grouped by list length (stable: random order among equal lengths), so each batch pads
        # its items' user lists to about their own length instead of the longest list's 500
        items = self.item_pool[torch.randperm(len(self.item_pool), generator=generator)]
        items = items[torch.sort(self.item_counts[items], stable=True).indices]
        share = math.ceil(len(items) / len(user_batches))
        groups = torch.randperm(len(user_batches), generator=generator).tolist()
        for index, batch in zip(groups, user_batches, strict=True):
            yield {**batch, "items": items[index * share:(index + 1) * share].to(self.device)}

    @torch.no_grad()
    def refresh(self, model: Recommender) -> None:
        """Recompute the under- and over-ranking errors of both sides from the student's current scores."""
        cfg = self.config
        was_training = model.training
        model.eval()
        listed = torch.empty(self.ranking.shape, device=self.device)  # the student's scores of the user lists
        full_rows = self.user_side and cfg.rank_scope == "all"  # version 2: a full-row sort per user
        ranks = torch.empty(self.ranking.shape, dtype=torch.int64, device=self.device) if full_rows else None
        for start in range(0, self.context.n_users, cfg.check_users):  # user batches, not users
            users = torch.arange(start, min(start + cfg.check_users, self.context.n_users), device=self.device)
            items = self.ranking[users]
            if full_rows:
                scores = model.score(users)
                listed[users] = scores.gather(1, items)
                ranks[users] = ranks_outside(scores, items, *self.context.observed_order_of(users))
            else:
                listed[users] = model.score_items(users, items)
        if self.user_side:
            if not full_rows:
                ranks = ranks_within_rows(listed)
            self.under_error, self.over_error = _errors(ranks, torch.arange(ranks.shape[1], device=self.device),
                                                        cfg.epsilon)
        if self.item_side:  # the same pairs (u, i) as the user lists: the scores are already there
            ranks = ranks_within_groups(listed.view(-1)[self.item_entries], self.item_indptr)
            self.item_under_error, self.item_over_error = _errors(ranks, self.item_places, cfg.epsilon)
        model.train(was_training)

    def correction_lists(self, users: torch.Tensor, generator: torch.Generator | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """User side: sampled (under-ranked items in ensemble order, valid, over-ranked items, valid)."""
        return draw_corrections(self.under_error[users], self.over_error[users], self.ranking[users],
                                self.config.n_under, self.config.n_over, generator)

    def _request(self, model: Recommender, side: str, rows: torch.Tensor, under: torch.Tensor, over: torch.Tensor,
                 lists: torch.Tensor, generator: torch.Generator | None) -> CorrectionRequest:
        """A side's request, its noise drawn now (where the draw would be), its entries when answered."""
        return CorrectionRequest(model, side, rows, under, over, lists,
                                 exponential_noise(under.shape, generator, under.device), self.config.n_under,
                                 self.config.n_over)

    def item_lists(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(top users [B, L] in list order, under-ranked errors, over-ranked errors, valid) of ``items``, padded
        (padding has zero error, so it is never drawn)."""
        entries, valid = csr_rows_padded(self.item_indptr, items)
        users = self.item_entries[entries] // self.ranking.shape[1]
        zero = torch.zeros((), device=self.device)
        under = self.item_under_error[entries] if self.item_under_error is not None else None
        over = self.item_over_error[entries] if self.item_over_error is not None else None
        if under is not None:
            under, over = torch.where(valid, under, zero), torch.where(valid, over, zero)
        return torch.where(valid, users, -1), under, over, valid

    def item_correction_lists(self, items: torch.Tensor, generator: torch.Generator | None
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Item side: sampled (under-ranked users in list order, valid, over-ranked users, valid)."""
        users, under, over, _ = self.item_lists(items)
        return draw_corrections(under, over, users, self.config.n_under, self.config.n_over, generator)

    def user_correction(self, model: Recommender, users: torch.Tensor, scores: Callable[[], torch.Tensor] | None,
                        generator: torch.Generator | None) -> torch.Tensor | CorrectionRequest:
        """The user side's term on the sampled items: for a model with its own ``score_items``, the request that
        scores just those ~20 items per user (the gradient skips a dense [B, n_items] pass); for others, the loss
        from the batch's full ``scores()``."""
        if type(model).score_items is Recommender.score_items:
            return relaxed_ranking_loss(scores(), *self.correction_lists(users, generator))
        return self._request(model, "user", users, self.under_error[users], self.over_error[users],
                             self.ranking[users], generator)

    def user_correction_loss(self, model: Recommender, users: torch.Tensor,
                             scores: Callable[[], torch.Tensor] | None, generator: torch.Generator | None
                             ) -> torch.Tensor:
        """Mean over ``users`` of the relaxed ranking loss on the sampled items (:meth:`user_correction`)."""
        term = self.user_correction(model, users, scores, generator)
        return term.answer() if isinstance(term, CorrectionRequest) else term

    def item_correction(self, model: Recommender, items: torch.Tensor,
                        generator: torch.Generator | None) -> CorrectionRequest:
        """The item side's term: the request for the sampled users' scores of each item."""
        users, under, over, _ = self.item_lists(items)
        return self._request(model, "item", items, under, over, users, generator)

    def item_correction_loss(self, model: Recommender, items: torch.Tensor,
                             generator: torch.Generator | None) -> torch.Tensor:
        """Mean over ``items`` of the relaxed ranking loss on the sampled users' scores of the item."""
        return self.item_correction(model, items, generator).answer()

    @classmethod
    def stacks_seeds(cls, config: DCDConfig) -> bool:
        """Its RRD part without DE-RRD's sampling reads the scores of every item, so seeds stack on them."""
        return not config.sample

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return self.loss_of_scores(None, batch, model)

    def loss_of_scores(self, scores: torch.Tensor | None, batch: Batch, model: Recommender) -> torch.Tensor:
        """The loss; ``scores`` None: the student scores the users after its own loss has drawn."""
        scored = scores_once(model, batch["users"], scores)
        return self.drive_steps(self._loss_steps(batch, model, scored), scored, batch["users"])

    def tail_steps(self, batch: Batch, model: Recommender):
        """Without DE-RRD's sampling: the own loss (its draws first), the RRD term's one tail request, then each
        side's correction (its draws, then a :class:`CorrectionRequest` for the sampled entries' scores)."""
        return None if self.config.sample else self._loss_steps(batch, model, None)

    def answer_tail(self, scores: torch.Tensor, users: torch.Tensor, head: torch.Tensor,
                    listed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rrd.answer_tail(scores, users, head, listed)

    def _loss_steps(self, batch: Batch, model: Recommender, scored: Callable[[], torch.Tensor] | None):
        """The loss as steps (:meth:`~hetcomp.train.Objective.tail_steps`); ``scored`` gives the users' scores
        of every item to what reads them besides the tail request (DE-RRD's sampled lists, the user side of a
        student without its own ``score_items``); None in a stack, whose replicas score items themselves."""
        users = batch["users"]
        own = self.own_loss(model, users)
        if self.config.sample:
            term = self.rrd.distillation_loss(model, users, self._generator, scored())
        else:
            term = yield from self.rrd._term_steps(users)
        loss = own + self.config.rrd_weight * term
        if not self.active:
            return loss
        if not self.checked:
            self.refresh(model)
        if self.user_side:
            term = self.user_correction(model, users, scored, self._generator)
            if isinstance(term, CorrectionRequest):
                term = yield term
            loss = loss + self.config.dcd_weight * term
        items = batch.get("items")
        if self.item_side and items is not None and len(items):
            loss = loss + self.config.dcd_weight * (yield self.item_correction(model, items, self._generator))
        return loss

    def state_dict(self) -> dict:
        names = ("under_error", "over_error", "item_under_error", "item_over_error")
        return {name: getattr(self, name).cpu() for name in names if getattr(self, name) is not None}

    def load_state_dict(self, state: dict) -> None:
        for name, value in state.items():
            setattr(self, name, value.to(self.device))
