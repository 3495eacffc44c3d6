"""Ranking-distillation losses on [batch, list] tensors: no loop over users or items.

Conventions: ``scores`` [B, n_items] are the student's scores; a list ``P`` is [B, L] item ids with a validity
mask (users with shorter lists are padded); ``tail`` is a bool mask [B, n_items] of the items P must beat.
Every loss sums over the list positions and averages over the users of the batch.
"""

from __future__ import annotations

import torch
from torch.nn import functional

NEG_INF = float("-inf")


def masked_logsumexp(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log Σ_{j: mask} e^{scores_j} per row (−inf for an empty mask)."""
    return torch.logsumexp(scores.masked_fill(~mask, NEG_INF), dim=1)


def _mean_over_users(per_position: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    per_position = torch.where(valid, per_position, torch.zeros((), device=per_position.device))
    return per_position.sum(1).mean()


def overall_loss(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """L_O: every item of the list above every tail item, no order inside the list.

    −Σ_k log( e^{f_k} / (e^{f_k} + Σ_{j∈tail} e^{f_j}) ) = Σ_k softplus(LSE_tail − f_k).
    """
    tail_lse = masked_logsumexp(scores, tail)
    listed = scores.gather(1, items.clamp(min=0))
    return _mean_over_users(functional.softplus(tail_lse.unsqueeze(1) - listed), valid)


def fine_loss(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, tail: torch.Tensor) -> torch.Tensor:
    """L_F: Plackett–Luce keeping the list's exact order and placing it above the tail.

    −Σ_k log( e^{f_k} / (Σ_{l≥k} e^{f_l} + Σ_{j∈tail} e^{f_j}) ); invalid (padding) positions are left out.
    """
    tail_lse = masked_logsumexp(scores, tail)
    listed = scores.gather(1, items.clamp(min=0)).masked_fill(~valid, NEG_INF)
    suffix = torch.logcumsumexp(listed.flip(1), dim=1).flip(1)
    denominator = torch.logaddexp(suffix, tail_lse.unsqueeze(1))
    return _mean_over_users(denominator - listed, valid)


def relaxed_ranking_loss(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor,
                         tail_items: torch.Tensor, tail_valid: torch.Tensor) -> torch.Tensor:
    """RRD (Kang et al., CIKM 2020): the list in order above a given set of tail items, no order in the tail.

    Same form as :func:`fine_loss` with the tail given as item ids [B, L'] (sampled or all the rest).
    """
    tail_scores = scores.gather(1, tail_items.clamp(min=0)).masked_fill(~tail_valid, NEG_INF)
    tail_lse = torch.logsumexp(tail_scores, dim=1)
    listed = scores.gather(1, items.clamp(min=0)).masked_fill(~valid, NEG_INF)
    suffix = torch.logcumsumexp(listed.flip(1), dim=1).flip(1)
    return _mean_over_users(torch.logaddexp(suffix, tail_lse.unsqueeze(1)) - listed, valid)


def items_mask(items: torch.Tensor, valid: torch.Tensor, n_items: int) -> torch.Tensor:
    """Dense bool [B, n_items]: True at the valid entries of ``items``."""
    mask = torch.zeros(items.shape[0], n_items, dtype=torch.bool, device=items.device)
    rows = torch.arange(items.shape[0], device=items.device).unsqueeze(1).expand_as(items)
    mask[rows[valid], items[valid]] = True
    return mask
