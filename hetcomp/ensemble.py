"""The rank aggregation g: combine teachers' rankings into one ranking (the "Ensemble" and π^d of HetComp).

Each teacher state gives item i an importance that decays with its rank r (0-based) in that state's top-M
(items outside get none); importances are summed over teachers (optionally weighted) and the ensemble ranks
items by the sum. Decays: ``exp`` = exp(−r/T) (default T = 50, chosen on validation, see the teachers results),
``power`` = (r+1)^−β (β = 0.05 in the same lab's later code). Teacher weights: uniform (the released code) or
by validation recall (:func:`teacher_weights`). Everything is batched over users.

Sums are added in teacher order on every device and thread count (see :func:`accumulate_rows_`), so the
ensemble's ranking, ties included, does not depend on how many threads computed it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp.config import knob, validate
from hetcomp.data import Split
from hetcomp.errors import HetCompError
from hetcomp.metrics import evaluate_split, exclude_rows_, topk_items
from hetcomp.trajectory import Trajectory

DECAYS = ("exp", "power")
WEIGHTINGS = ("valid", "valid-state", "uniform")


@dataclass
class EnsembleConfig:
    """How the teachers' rankings are aggregated (g): the rank decay and the teacher weights.

    Defaults chosen on validation R@50 of the converged ensemble on CiteULike (teachers results page). They are
    the only statement of g's defaults: every function, option and page that has one reads it from here.
    """

    owner = "the ensemble"
    decay: str = knob("exp", choices=DECAYS)
    temperature: float = knob(50.0, gt=0)
    beta: float = knob(0.05, ge=0)
    # teacher weights (valid R@50 / mean)^power from the converged state ("valid") or from the state each user
    # learns from ("valid-state": the early states of a teacher weigh what they achieved), or "uniform" as released
    weighting: str = knob("valid", choices=WEIGHTINGS)
    weight_power: float = knob(8.0, ge=0)

    def __post_init__(self) -> None:
        validate(self)

    def scorer(self, split: Split, trajectories: list, state_of: int | torch.Tensor = -1,
               device: torch.device | str = "cpu") -> EnsembleScorer:
        """g over the chosen states of ``trajectories`` (converged by default), weighted as configured."""
        weights = teacher_weights(split, trajectories, self.weighting, self.weight_power, state_of)
        return EnsembleScorer(trajectories, state_of, self.decay, self.temperature, self.beta, weights, device)


def rank_importance(top_m: int, decay: str = EnsembleConfig.decay, temperature: float = EnsembleConfig.temperature,
                    beta: float = EnsembleConfig.beta, device: torch.device | str = "cpu") -> torch.Tensor:
    """Importance of ranks 0..top_m−1 under the chosen decay (non-increasing, positive)."""
    ranks = torch.arange(top_m, dtype=torch.float32, device=device)
    if decay == "exp":
        return torch.exp(-ranks / temperature)
    if decay == "power":
        return (ranks + 1).pow(-beta)
    raise HetCompError(f"unknown rank decay {decay!r}; choose one of {', '.join(DECAYS)}")


def accumulate_rows_(scores: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``scores[b, index[b, j]] += values[b, j]`` in place, each row's entries added in the order of j.

    Why not ``index_put_(accumulate=True)`` everywhere: on a multi-threaded CPU it adds float32 with parallel
    atomics, so a sum of several teachers' importances rounds differently from run to run (and so can the
    ranking). The CPU's ``scatter_add_`` along dim 1 loops over a row's entries in order (rows in parallel);
    CUDA's ``index_put_`` sorts stably before adding. Both are deterministic and add in index order.
    """
    if scores.device.type == "cpu":
        return scores.scatter_add_(1, index, values)
    rows = torch.arange(len(index), device=scores.device).view(-1, 1).expand_as(index)
    return scores.index_put_((rows, index), values, accumulate=True)


def _contributions(importance: torch.Tensor, top_m: int, n_teachers: int,
                   weights: torch.Tensor | None) -> torch.Tensor:
    """Each ranked entry's importance [n_teachers or 1, B or 1, M], scaled by its teacher's weight."""
    contribution = importance[:top_m].view(1, 1, top_m)
    if weights is not None:
        weights = weights.view(n_teachers, -1, 1) if weights.dim() == 2 else weights.view(n_teachers, 1, 1)
        contribution = contribution * weights
    return contribution


def aggregate_scores(rankings: torch.Tensor, n_items: int, importance: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ensemble scores [B, n_items] from rankings [n_teachers, B, M] (item ids, best first).

    ``weights`` ([n_teachers] or [n_teachers, B]) scale each teacher's importances; default 1.
    """
    n_teachers, batch, top_m = rankings.shape
    contribution = _contributions(importance, top_m, n_teachers, weights).expand(n_teachers, batch, top_m)
    scores = torch.zeros(batch, n_items, device=rankings.device)
    # a user's row lists its teachers' entries in teacher order: the sums are added in that order
    return accumulate_rows_(scores, rankings.transpose(0, 1).reshape(batch, -1).long(),
                            contribution.transpose(0, 1).reshape(batch, -1))


def candidate_topk(rankings: torch.Tensor, n_items: int, importance: torch.Tensor, k: int,
                   weights: torch.Tensor | None = None, excluded: tuple[torch.Tensor, torch.Tensor] | None = None,
                   chunk_users: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k items of g without dense scores: ``(items [B, k], exact [B])``.

    Only an item in some teacher's top-M can score above zero, so the top-k is found among each user's
    ≤ n_teachers·M candidates instead of all n_items: the same items, in the same order, as
    :func:`~hetcomp.metrics.topk_items` over the dense scores of :func:`aggregate_scores` (score descending,
    then item id ascending; the sums are added in the same order). A user with fewer than k positive
    candidates continues, as the dense ranking does, with the zero-score items by ascending id. Rows with
    ``exact`` False (too few zero-score items left for that) must be ranked densely.

    ``rankings``: [n_teachers, B, M] item ids; ``weights`` as in :func:`aggregate_scores`, finite (sums of
    finite terms are never NaN); ``excluded``: (row, item) pairs at −inf (the training items), rows sorted.
    """
    n_teachers, batch, top_m = rankings.shape
    device = rankings.device
    if excluded is None:
        excluded = (torch.zeros(0, dtype=torch.int64, device=device),) * 2
    excluded_rows, excluded_items = excluded[0].to(device), excluded[1].to(device).long()
    items = rankings.transpose(0, 1).reshape(batch, n_teachers * top_m).long()
    contribution = _contributions(importance, top_m, n_teachers, weights).expand(n_teachers, -1, top_m)
    values, owner = _candidate_sums(items, n_items, contribution, excluded_rows, excluded_items, chunk_users)
    # one entry per (user, item): the one whose position won the owner table
    counted = (owner == torch.arange(items.shape[1], dtype=torch.int32, device=device)) & (values > 0)
    n_positive = counted.sum(1)
    # a positive float32 orders like its bits: key = bits · 2³² − item is unique per item and orders like
    # (score desc, item asc) under a descending sort; the other entries get keys below 0
    keys = (torch.where(counted, values.view(torch.int32), -1).long() << 32) - items
    top = keys.topk(min(k, keys.shape[1]), dim=1).values
    chosen = torch.cat([(-top) & 0xFFFFFFFF, top.new_zeros(batch, k - top.shape[1])], 1)
    exact = n_positive >= k
    short = (~exact).nonzero().squeeze(1)
    if len(short) and k <= n_items:
        n_before = n_positive[short].unsqueeze(1)
        filled, enough = _zero_score_items(items[short], values[short], k - n_before.squeeze(1), n_items,
                                           short, batch, excluded_rows, excluded_items)
        column = torch.arange(k, device=device)
        zero_part = filled.gather(1, (column - n_before).clamp(min=0))
        chosen[short] = torch.where(column < n_before, chosen[short], zero_part)
        exact[short] = enough
    return chosen, exact


def _candidate_sums(items: torch.Tensor, n_items: int, contribution: torch.Tensor, excluded_rows: torch.Tensor,
                    excluded_items: torch.Tensor, chunk_users: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """g at every candidate (−inf at excluded items) and, per entry, which entry of its (user, item) won.

    Sums go into one reusable [chunk_users, n_items] buffer, small enough on a CPU (4 MB) to stay in cache (each
    pass over it touches most of its lines), reset by writing zeros at the touched entries only. A user's
    entries are in teacher order, so its sums are added as in :func:`aggregate_scores` (:func:`accumulate_rows_`).
    """
    batch, width = items.shape
    device = items.device
    if chunk_users is None:
        chunk_users = max(1, (1 << 20) // max(n_items, 1)) if device.type == "cpu" else batch
    chunk_users = max(1, min(chunk_users, batch))
    per_user = contribution.shape[1] > 1
    contribution = contribution.transpose(0, 1).expand(batch if per_user else chunk_users, -1, -1)
    contribution = contribution.reshape(-1, width).contiguous()
    excluded_flat = (excluded_rows % chunk_users) * n_items + excluded_items
    starts = torch.arange(0, batch + chunk_users, chunk_users, device=device)
    bounds = torch.searchsorted(excluded_rows, starts).tolist()
    buffer = torch.zeros(chunk_users, n_items, device=device)
    owners = buffer.view(torch.int32)  # the same memory, read as int32 to mark one entry per (user, item)
    position = torch.arange(width, dtype=torch.int32, device=device).expand(chunk_users, width)
    zeros = torch.zeros(chunk_users, width, device=device)
    values = torch.empty(batch, width, device=device)
    owner = torch.empty(batch, width, dtype=torch.int32, device=device)
    for chunk, start in enumerate(range(0, batch, chunk_users)):
        stop = min(start + chunk_users, batch)
        rows, index = buffer[:stop - start], items[start:stop]
        accumulate_rows_(rows, index, contribution[start:stop] if per_user else contribution[:stop - start])
        out = excluded_flat[bounds[chunk]:bounds[chunk + 1]]
        buffer.view(-1).index_fill_(0, out, float("-inf"))
        torch.gather(rows, 1, index, out=values[start:stop])
        owners[:stop - start].scatter_(1, index, position[:stop - start])  # any one writer wins
        torch.gather(owners[:stop - start], 1, index, out=owner[start:stop])
        rows.scatter_(1, index, zeros[:stop - start])
        buffer.view(-1).index_fill_(0, out, 0.0)
    return values, owner


def _zero_score_items(items: torch.Tensor, values: torch.Tensor, need: torch.Tensor, n_items: int,
                      rows: torch.Tensor, batch: int, excluded_rows: torch.Tensor,
                      excluded_items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest ids of score-0 items of ``rows`` (of ``batch``): ([R, max need], has each row ``need``).

    Score 0 = not excluded and not a candidate with a nonzero sum; a row blocks at most its candidates and
    excluded items, so its k lowest lie below k + that many: a small [R, L] mask, not a dense row.
    """
    device = items.device
    n_rows = len(rows)
    k = int(need.max())
    row_of = torch.full((batch,), -1, dtype=torch.int64, device=device)
    row_of[rows] = torch.arange(n_rows, device=device)
    mine = row_of[excluded_rows]
    keep = mine >= 0
    mine, their_items = mine[keep], excluded_items[keep]
    most_excluded = int(torch.bincount(mine, minlength=n_rows).max()) if len(mine) else 0
    limit = min(n_items, k + items.shape[1] + most_excluded)
    blocked = torch.zeros(n_rows, limit + 1, dtype=torch.bool, device=device)  # column ``limit``: beyond it
    blocked.scatter_(1, torch.where((values != 0) & (items < limit), items, limit), True)
    blocked[mine, their_items.clamp(max=limit)] = True
    free = ~blocked[:, :limit]
    rank = free.cumsum(1)
    enough = (rank[:, -1] if limit else torch.zeros(n_rows, dtype=torch.int64, device=device)) >= need
    slot = torch.where(free & (rank <= k), rank - 1, k)
    filled = torch.zeros(n_rows, k + 1, dtype=torch.int64, device=device)
    filled.scatter_(1, slot, torch.arange(limit, device=device).expand(n_rows, limit))
    return filled[:, :k], enough


class EnsembleScorer:
    """A score function over users from the chosen state of each trajectory (converged E4 by default).

    ``state_of`` is an int (one state index for every teacher), or an int tensor [n_teachers, n_users] of
    0-based state indices per teacher and user (HetComp's v).
    """

    def __init__(self, trajectories: Sequence, state_of: int | torch.Tensor = -1, decay: str = EnsembleConfig.decay,
                 temperature: float = EnsembleConfig.temperature, beta: float = EnsembleConfig.beta,
                 weights: torch.Tensor | None = None, device: torch.device | str = "cpu") -> None:
        if not trajectories:
            raise HetCompError("an ensemble needs at least one teacher trajectory")
        self.device = torch.device(device)
        self.trajectories = trajectories
        self.n_items = trajectories[0].meta["n_items"]
        self.top_m = min(t.top_m for t in trajectories)
        self.importance = rank_importance(self.top_m, decay, temperature, beta, self.device)
        self.weights = None if weights is None else weights.to(self.device)
        # the states live on the CPU, so the per-user choice of state is read there
        self.state_of = state_of if isinstance(state_of, int) else state_of.cpu()

    def rankings(self, users: torch.Tensor) -> torch.Tensor:
        """The teachers' current rankings for ``users``: [n_teachers, B, M]."""
        return self.user_rankings(users).transpose(0, 1)

    def user_rankings(self, users: torch.Tensor) -> torch.Tensor:
        """The teachers' current rankings for ``users``, user-major: [B, n_teachers, M].

        Row lookups in each [n_states·n_users, M] table (``index_select``), ~10x faster than fancy indexing.
        """
        users_cpu = users.cpu().long()
        parts = []
        for index, trajectory in enumerate(self.trajectories):
            n_states, n_users, _ = trajectory.states.shape
            if isinstance(self.state_of, int):
                state = torch.full_like(users_cpu, self.state_of)
            else:
                state = self.state_of[index, users_cpu].long()
            state = torch.where(state < 0, state + n_states, state)  # −1 = the last state; out of range: an error
            table = trajectory.states.reshape(n_states * n_users, -1)
            parts.append(table.index_select(0, state * n_users + users_cpu)[:, :self.top_m])
        return torch.stack(parts, 1).to(self.device)

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        weights = self.weights
        if weights is not None and weights.dim() == 2:  # per user: this batch's columns
            weights = weights[:, users.to(weights.device)]
        return aggregate_scores(self.rankings(users), self.n_items, self.importance, weights)

    def topk(self, k: int, exclude: sp.csr_matrix, batch_size: int = 1024) -> torch.Tensor:
        """Top-k items [n_users, k] of every user (rows of ``exclude``), its nonzeros ranked last.

        Equals :func:`~hetcomp.metrics.topk_items` over ``self(users)`` with ``exclude``'s items at −inf, but
        ranks only the candidates in the teachers' lists (:func:`candidate_topk`; CiteULike, K = 100: 0.12 s
        instead of 0.67 s on one thread); rows it cannot settle that way are ranked densely.
        """
        dense_only = k > self.n_items or (self.weights is not None and not bool(torch.isfinite(self.weights).all()))
        per_user = self.weights is not None and self.weights.dim() == 2
        indptr = torch.from_numpy(exclude.indptr.astype(np.int64))
        indices = torch.from_numpy(exclude.indices.astype(np.int64))
        parts = []
        for start in range(0, exclude.shape[0], batch_size):
            users = np.arange(start, min(start + batch_size, exclude.shape[0]))
            rankings = self.user_rankings(torch.from_numpy(users)).transpose(0, 1)
            stop = start + len(users)
            rows = torch.repeat_interleave(torch.arange(len(users)), indptr[start + 1:stop + 1] - indptr[start:stop])
            excluded = (rows, indices[int(indptr[start]):int(indptr[stop])])
            weights = self.weights[:, start:stop] if per_user else self.weights
            if dense_only:
                items, exact = None, torch.zeros(len(users), dtype=torch.bool, device=self.device)
            else:
                items, exact = candidate_topk(rankings, self.n_items, self.importance, k, weights, excluded)
            dense = (~exact).nonzero().squeeze(1)
            if len(dense):
                scores = aggregate_scores(rankings[:, dense], self.n_items, self.importance,
                                          weights[:, dense] if per_user else weights)
                ranked = topk_items(exclude_rows_(scores, exclude, users[dense.cpu().numpy()]), k)
                items = ranked if items is None else items.index_copy_(0, dense, ranked)
            parts.append(items)
        return torch.cat(parts)


def ensemble_observed_order(trajectories: Sequence, train, decay: str = EnsembleConfig.decay,
                            temperature: float = EnsembleConfig.temperature, beta: float = EnsembleConfig.beta,
                            weights: torch.Tensor | None = None) -> np.ndarray:
    """Each user's training items ordered by g over the teachers' converged rankings of them (CSR order).

    Returns int64 item ids aligned with ``train.indptr``: the user's P⁺ list, best first.
    """
    indptr = train.indptr.astype(np.int64)
    rows = np.repeat(np.arange(train.shape[0]), np.diff(indptr))
    position = np.arange(len(rows)) - indptr[rows]
    longest = int(np.diff(indptr).max()) if len(rows) else 0
    importance = rank_importance(max(longest, 1), decay, temperature, beta).numpy().astype(np.float64)
    total = np.zeros(len(rows), dtype=np.float64)
    for index, trajectory in enumerate(trajectories):
        # sorting a teacher's entries by (row, item) lines them up with the CSR entries (sorted indices)
        order = np.lexsort((trajectory.observed.astype(np.int64), rows))
        weight = 1.0 if weights is None else float(weights[index])
        total += weight * importance[position[order]]
    csr_items = train.indices.astype(np.int64)
    final = np.lexsort((csr_items, -total, rows))
    return csr_items[final]


def trajectory_state_metrics(split: Split, trajectory: Trajectory, state: int) -> dict:
    """Metrics of one state: those recorded at training time, else computed from its top-M ranking.

    The ranking-based fallback (for imported teachers) scores the top-M items by rank and everything else
    equally, so it is exact whenever the top-M holds the K best items after excluding the other held-out part.
    """
    recorded = trajectory.meta.get("metrics") or []
    if state < len(recorded):
        return recorded[state]
    result = evaluate_split(EnsembleScorer([trajectory], state_of=state), split)
    return {"valid": result["valid"], "test": result["test"]}


def teacher_weights(split: Split, trajectories: list[Trajectory], weighting: str = EnsembleConfig.weighting,
                    power: float = EnsembleConfig.weight_power, state_of: int | torch.Tensor = -1
                    ) -> torch.Tensor | None:
    """Per-teacher weights of g: None (uniform, as released) or (valid R@50 / mean)^power.

    ``valid``: each teacher's converged (E4) valid R@50, one weight per teacher ([n_teachers]). ``valid-state``:
    the valid R@50 of the state a user learns from (``state_of``, an int or [n_teachers, n_users]), over the same
    mean of the converged ones, so a teacher's early state weighs what it achieved then ([n_teachers] or
    [n_teachers, n_users]); at the converged states both agree. Validation-only: a teacher much better than the
    others (here the item autoencoder) should count for more; the power was chosen on validation R@50.
    """
    if weighting == "uniform":
        return None
    if weighting not in WEIGHTINGS:
        raise HetCompError(f"unknown teacher weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if weighting == "valid-state":
        return weights_at_states(state_weight_table(split, trajectories, power), state_of)
    converged = torch.tensor([trajectory_state_metrics(split, t, t.n_states - 1)["valid"]["recall@50"]
                              for t in trajectories], dtype=torch.float32)
    return (converged / converged.mean()) ** power


def state_weight_table(split: Split, trajectories: list[Trajectory],
                       power: float = EnsembleConfig.weight_power) -> torch.Tensor:
    """``valid-state`` weights of every teacher at every state, [n_teachers, n_states]: (valid R@50 of the state /
    mean of the teachers' converged valid R@50)^power. Computed once per context: each DKC rebuild only gathers.
    A teacher with fewer states repeats its last one, so the last column holds every converged recall."""
    n_states = max(t.n_states for t in trajectories)
    by_state = torch.stack([torch.tensor([trajectory_state_metrics(split, t, min(s, t.n_states - 1))["valid"]
                                          ["recall@50"] for s in range(n_states)], dtype=torch.float32)
                            for t in trajectories])  # [n_teachers, n_states]
    return (by_state / by_state[:, -1].mean()) ** power


def weights_at_states(table: torch.Tensor, state_of: int | torch.Tensor) -> torch.Tensor:
    """Each teacher's weight at the state it is at: [n_teachers] for one state, [n_teachers, n_users] per user."""
    if isinstance(state_of, int):
        return table[:, state_of]
    return table.gather(1, state_of.long().cpu().remainder(table.shape[1]))
