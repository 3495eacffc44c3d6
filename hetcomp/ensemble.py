"""The rank aggregation g: combine teachers' rankings into one ranking (the "Ensemble" and π^d of HetComp).

Each teacher state gives item i an importance that decays with its rank r (0-based) in that state's top-M
(items outside get none); importances are summed over teachers (optionally weighted) and the ensemble ranks
items by the sum. Decays: ``exp`` = exp(−r/T) (default T = 50, chosen on validation, see the teachers results),
``power`` = (r+1)^−β (β = 0.05 in the same lab's later code). Teacher weights: uniform (the released code) or
by validation recall (:func:`hetcomp.teachers.teacher_weights`). Everything is batched over users.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hetcomp.data import HetCompError

DECAYS = ("exp", "power")


def rank_importance(top_m: int, decay: str = "exp", temperature: float = 50.0, beta: float = 0.05,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Importance of ranks 0..top_m−1 under the chosen decay (non-increasing, positive)."""
    ranks = torch.arange(top_m, dtype=torch.float32, device=device)
    if decay == "exp":
        return torch.exp(-ranks / temperature)
    if decay == "power":
        return (ranks + 1).pow(-beta)
    raise HetCompError(f"unknown rank decay {decay!r}; choose one of {', '.join(DECAYS)}")


def aggregate_scores(rankings: torch.Tensor, n_items: int, importance: torch.Tensor,
                     weights: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ensemble scores [B, n_items] from rankings [n_teachers, B, M] (item ids, best first).

    ``weights`` ([n_teachers] or [n_teachers, B]) scale each teacher's importances; default 1.
    """
    n_teachers, batch, top_m = rankings.shape
    contribution = importance[:top_m].view(1, 1, top_m).expand(n_teachers, batch, top_m)
    if weights is not None:
        weights = weights.view(n_teachers, -1, 1) if weights.dim() == 2 else weights.view(n_teachers, 1, 1)
        contribution = contribution * weights
    scores = torch.zeros(batch, n_items, device=rankings.device)
    rows = torch.arange(batch, device=rankings.device).view(1, batch, 1).expand_as(rankings)
    scores.index_put_((rows.reshape(-1), rankings.reshape(-1).long()), contribution.reshape(-1), accumulate=True)
    return scores


class EnsembleScorer:
    """A score function over users from the chosen state of each trajectory (converged E4 by default).

    ``state_of`` is an int (one state index for every teacher), or an int tensor [n_teachers, n_users] of
    0-based state indices per teacher and user (HetComp's v).
    """

    def __init__(self, trajectories: Sequence, state_of: int | torch.Tensor = -1, decay: str = "exp",
                 temperature: float = 50.0, beta: float = 0.05, weights: torch.Tensor | None = None,
                 device: torch.device | str = "cpu") -> None:
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
        users_cpu = users.cpu()
        parts = []
        for index, trajectory in enumerate(self.trajectories):
            states = trajectory.states[:, users_cpu, :self.top_m]  # [n_states, B, M]
            if isinstance(self.state_of, int):
                parts.append(states[self.state_of])
            else:
                chosen = self.state_of[index, users_cpu].long()
                parts.append(states[chosen, torch.arange(len(users_cpu))])
        return torch.stack(parts).to(self.device)

    def __call__(self, users: torch.Tensor) -> torch.Tensor:
        return aggregate_scores(self.rankings(users), self.n_items, self.importance, self.weights)


def ensemble_observed_order(trajectories: Sequence, train, decay: str = "exp", temperature: float = 50.0,
                            beta: float = 0.05, weights: torch.Tensor | None = None) -> np.ndarray:
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
