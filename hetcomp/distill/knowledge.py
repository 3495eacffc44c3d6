"""HetComp's dynamic knowledge construction (DKC): which trajectory state each user learns from.

State v [n_teachers, n_users] (0-based: 0 = E1 … n_states−1 = converged) starts at 0. Every ``period`` epochs
the student's current top-K is compared with the *next* state of each teacher by D@K = 1 − NDCG@K; the
discrepancy d remembered when the user started its current state, over the one now, is γ. γ > α means the
student has moved markedly closer to the next state since it started this one: the user advances.
Everything works on [n_teachers, n_users] tensors at once.

With a fixed α a user whose student has plateaued may never advance, and the paper's schedule (L_F once
every user learns from the converged teachers) would never start; the released code avoids this with a
decaying threshold. Our ``deadline`` (default epoch 300) moves every remaining state to the last one at that
check, and the log records how many were forced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hetcomp.config import knob, validate
from hetcomp.errors import HetCompError
from hetcomp.metrics import positions_in

FORMS = ("paper", "code")


def discrepancy_gains(k: int, lam: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gain of rank r = 0..k−1: 2^{exp(−r/λ)} − 1."""
    ranks = torch.arange(k, dtype=torch.float64, device=device)
    return torch.pow(2.0, torch.exp(-ranks / lam)) - 1


def discrepancy(student: torch.Tensor, teacher: torch.Tensor, k: int = 50, lam: float = 10.0,
                form: str = "paper") -> torch.Tensor:
    """D@K = 1 − NDCG@K of the student's top-K against a teacher ranking, per row ([..., K] inputs).

    ``paper``: the teacher's top-K is the ideal list; item i has relevance exp(−r_teacher(i)/λ), gain 2^rel − 1.
    ``code`` (the authors' release): an item the teacher has in its top-K earns the gain of the *student's*
    position t, 2^{exp(−t/λ)} − 1, so the teacher's order inside its top-K is ignored; IDCG = all K gains.
    """
    student, teacher = student[..., :k], teacher[..., :k]
    shape = student.shape[:-1]
    found, position = positions_in(student.reshape(-1, k), teacher.reshape(-1, k))
    return discrepancy_from_positions(torch.where(found, position, k), lam, form).reshape(shape)


def discrepancy_from_positions(position: torch.Tensor, lam: float = 10.0, form: str = "paper") -> torch.Tensor:
    """D@K per row from where each of the student's K items sits in the teacher's top-K ([rows, K], K: absent).

    The arithmetic of :func:`~hetcomp.metrics.ranking_ndcg` (paper) step by step, so that a DKC check that
    finds the positions another way (:func:`list_positions`) gets the very same bits as :func:`discrepancy`.
    An absent item looks up a trailing 0 (the gain, or the ``code`` form's "found"), as ``where`` would give.
    """
    k = position.shape[1]
    device = position.device
    gains = discrepancy_gains(k, lam, device)
    discounts = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=device))
    absent = torch.zeros(1, dtype=torch.float64, device=device)

    def look_up(table: torch.Tensor) -> torch.Tensor:
        return torch.cat([table, absent]).index_select(0, position.reshape(-1)).view(position.shape)

    if form == "paper":
        ndcg = (look_up(gains) * discounts).sum(1) / (gains * discounts).sum()
    elif form == "code":
        found = look_up(torch.ones(k, dtype=torch.float64, device=device))
        ndcg = (found * gains * discounts).sum(1) / (gains * discounts).sum()
    else:
        raise HetCompError(f"unknown D@K form {form!r}; choose one of {', '.join(FORMS)}")
    return 1.0 - ndcg


def list_positions(items: torch.Tensor, lists: torch.Tensor, table_bytes: int = 1 << 21) -> torch.Tensor:
    """Position of each of ``items`` [U, K] in each of its user's ``lists`` [U, T, L], L if absent: [U, T, K].

    List entries are distinct within a list (as in :func:`~hetcomp.metrics.positions_in`, which sorts and
    binary-searches every list: 6 × 5k of them, twice, per DKC check on CiteULike). Here each chunk of users
    writes where its items sit into one small reusable lookup table, reads it at every list entry and clears
    it; the hits are then scattered back to the items' side. Rows with a repeated item (never a top-K, but
    possible input) take the sorting path.
    """
    n_users, n_lists, length = lists.shape
    n_items = items.shape[1]
    device = items.device
    out = torch.full((n_users, n_lists, n_items + 1), length, dtype=torch.int64, device=device)  # 0: no hit
    if lists.numel() and items.numel():
        width = max(int(lists.max()), int(items.max())) + 1
        dtype = torch.int8 if n_items < 127 else torch.int16 if n_items < 32767 else torch.int32
        chunk = max(1, min(n_users, table_bytes // (width * dtype.itemsize)))
        written = torch.where(items >= 0, items, width).long()  # column ``width``: never read by a list
        read = lists.reshape(n_users, n_lists * length).long()
        slot = torch.arange(1, n_items + 1, dtype=dtype, device=device).expand(chunk, n_items)
        blank = torch.zeros(chunk, n_items, dtype=dtype, device=device)
        table = torch.zeros(chunk, width + 1, dtype=dtype, device=device)
        hit = torch.empty(n_users, n_lists * length, dtype=dtype, device=device)  # item position + 1, 0: none
        kept = torch.empty(n_users, n_items, dtype=dtype, device=device)  # not its own slot: a repeated item
        for start in range(0, n_users, chunk):
            stop = min(start + chunk, n_users)
            rows, index = table[:stop - start], written[start:stop]
            rows.scatter_(1, index, slot[:stop - start])
            torch.gather(rows, 1, index, out=kept[start:stop])
            torch.gather(rows, 1, read[start:stop], out=hit[start:stop])
            rows.scatter_(1, index, blank[:stop - start])
        out.scatter_(2, hit.view(n_users, n_lists, length).long(),
                     torch.arange(length, device=device).expand(n_users, n_lists, length))
        repeated = ((kept != slot[:1]) & (written < width)).any(1).nonzero().squeeze(1)
        for index in range(n_lists if len(repeated) else 0):
            found, position = positions_in(items[repeated], lists[repeated, index])
            out[repeated, index, 1:] = torch.where(found, position, length)
    return out[..., 1:]


@dataclass
class DKCConfig:
    """DKC settings. Defaults follow method.md (the paper); the released code's variants are options."""

    owner = "DKC"
    alpha: float = knob(1.05, gt=0)
    period: int = knob(10, ge=1)
    k: int = knob(50, ge=1)
    lam: float = knob(10.0, gt=0)
    form: str = knob("paper", choices=("paper", "code"))
    decay_threshold: bool = False  # code: threshold α·0.995^⌊epoch/p⌋
    switch_when_below_one: bool = False  # code: also move on when γ < 1
    deadline: int | None = knob(300, ge=1)  # ours: at this epoch every open state jumps to the last (None: never)

    def __post_init__(self) -> None:
        validate(self)


class DynamicKnowledge:
    """The DKC state machine over all teachers and users.

    ``teacher_states``: int tensor [n_teachers, n_states, n_users, ≥K] of each state's top unobserved items.
    """

    def __init__(self, teacher_states: torch.Tensor, config: DKCConfig | None = None) -> None:
        self.config = config or DKCConfig()
        self.states = teacher_states[..., :self.config.k].contiguous()  # rows looked up by index
        n_teachers, self.n_states, n_users, _ = self.states.shape
        device = self.states.device
        self.v = torch.zeros(n_teachers, n_users, dtype=torch.int64, device=device)
        self.d = torch.full((n_teachers, n_users), math.nan, dtype=torch.float64, device=device)
        self.checks = 0
        self.log: list[dict] = []

    @property
    def converged(self) -> bool:
        """Every user learns from every teacher's final state."""
        return bool((self.v == self.n_states - 1).all())

    def mean_state(self) -> list[float]:
        """Mean 1-based state per teacher (4.0 = every user at E4)."""
        return [round(float(x) + 1, 3) for x in self.v.double().mean(1)]

    def _distance_to(self, student_topk: torch.Tensor, state_index: torch.Tensor) -> torch.Tensor:
        """D@K between the student's top-K [n_users, K] and state ``state_index`` [T, U] of every teacher."""
        n_teachers, n_users = state_index.shape
        device = student_topk.device
        users = torch.arange(n_users, device=device)
        k = self.config.k
        if student_topk.shape[1] == k and self.states.shape[-1] == k:  # all teachers at once, same bits
            row = (torch.arange(n_teachers, device=device).view(1, -1) * self.n_states + state_index.t()) * n_users
            lists = self.states.reshape(-1, k).index_select(0, (row + users.view(-1, 1)).reshape(-1))
            position = list_positions(student_topk, lists.view(n_users, n_teachers, k))
            distance = discrepancy_from_positions(position.reshape(-1, k), self.config.lam, self.config.form)
            return distance.view(n_users, n_teachers).t().contiguous()
        out = torch.empty(n_teachers, n_users, dtype=torch.float64, device=device)
        for teacher in range(n_teachers):  # a loop over the (six) teachers only; users are batched
            target = self.states[teacher, state_index[teacher], users]
            out[teacher] = discrepancy(student_topk, target, self.config.k, self.config.lam, self.config.form)
        return out

    def step(self, student_topk: torch.Tensor, epoch: int) -> dict:
        """One DKC check with the student's current top-K unobserved items [n_users, ≥K]."""
        config = self.config
        student_topk = student_topk[:, :config.k].to(self.states.device).long()
        last = self.n_states - 1
        open_ = self.v < last
        nxt = torch.clamp(self.v + 1, max=last)
        current = self._distance_to(student_topk, nxt)
        first = open_ & torch.isnan(self.d)
        self.d = torch.where(first, current, self.d)
        gamma = self.d / current.clamp(min=1e-12)
        threshold = config.alpha * (0.995 ** (epoch // config.period) if config.decay_threshold else 1.0)
        move = open_ & ~first & (gamma > threshold)
        if config.switch_when_below_one:
            move |= open_ & ~first & (gamma < 1)
        self.v = torch.where(move, self.v + 1, self.v)
        forced = 0
        if config.deadline is not None and epoch >= config.deadline:
            forced = int((self.v < last).sum())
            self.v = torch.full_like(self.v, last)
            self.d = torch.full_like(self.d, math.nan)
        elif move.any():
            after = torch.clamp(self.v + 1, max=last)
            fresh = self._distance_to(student_topk, after)
            self.d = torch.where(move, torch.where(self.v < last, fresh, torch.nan), self.d)
        self.checks += 1
        record = {"epoch": epoch, "moved": int(move.sum()), "forced": forced, "mean_state": self.mean_state(),
                  "mean_gamma": float(gamma[open_ & ~first].mean()) if (open_ & ~first).any() else None}
        self.log.append(record)
        return record

    def state_dict(self) -> dict:
        return {"v": self.v.cpu(), "d": self.d.cpu(), "checks": self.checks, "log": self.log}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.v = state["v"].to(self.v.device)
            self.d = state["d"].to(self.d.device)
            self.checks = state["checks"]
            self.log = state["log"]
