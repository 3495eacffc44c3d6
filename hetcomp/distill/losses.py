"""Ranking-distillation losses on [batch, list] tensors: no loop over users or items.

Conventions: ``scores`` [B, n_items] are the student's scores; a list ``P`` is [B, L] item ids with a validity
mask (users with shorter lists are padded); ``tail`` is a bool mask [B, n_items] of the items P must beat.
Every loss sums over the list positions and averages over the users of the batch.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import types
from typing import NamedTuple

import numpy as np
import torch
from numpy.polynomial import polynomial
from torch.nn import functional

NEG_INF = float("-inf")


def masked_logsumexp(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log Σ_{j: mask} e^{scores_j} per row (−inf for an empty mask)."""
    return torch.logsumexp(scores.masked_fill(~mask, NEG_INF), dim=1)


_LOG2E = 1.4426950408889634


class _TailLogSumExp(torch.autograd.Function):
    """log Σ_{j ∉ excluded} e^{clamp(s_j)} per row and the clamped scores of listed items, in a few in-place passes.

    Autograd through ``clamp → sub → exp → sum`` and a ``gather`` keeps several [B, n_items] intermediates alive
    and runs a backward pass for each (the gather's alone allocates, zeroes and adds a dense gradient); here the
    forward keeps one buffer of exponentials and the backward turns it, in place, into the softmax gradient and
    scatters the listed items' gradients into it. ``exp2`` of x·log2(e) replaces ``exp`` (about twice as fast on
    the CPU). Excluded entries are zeroed before the sum, so no mass is subtracted and nothing cancels.
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, excluded: torch.Tensor, excluded_valid: torch.Tensor,
                bound: float | None, listed: torch.Tensor,
                temperature: float | None) -> tuple[torch.Tensor, torch.Tensor]:
        tail = scores if temperature is None else scores / temperature
        peak = tail.amax(1, keepdim=True)
        clipped = bound is not None and bool((peak > bound).any() or (tail.amin() < -bound))
        if bound is not None:
            peak = peak.clamp(-bound, bound)
        if clipped:  # scalar bounds first: a clamp to per-row bounds is ~6× slower
            exponentials = tail.clamp(-bound, bound).sub_(peak).mul_(_LOG2E)
        else:
            exponentials = torch.add(peak * -_LOG2E, tail, alpha=_LOG2E)  # (s − peak)·log2(e) in one pass
        del tail
        exponentials.exp2_()
        rows = torch.arange(scores.shape[0], device=scores.device).unsqueeze(1).expand_as(excluded)
        exponentials.index_put_((rows[excluded_valid], excluded[excluded_valid]),
                                torch.zeros((), dtype=scores.dtype, device=scores.device))
        total = exponentials.sum(1).clamp_(min=torch.finfo(scores.dtype).tiny)
        listed = listed.clamp(min=0)
        listed_scores = scores.gather(1, listed)
        if bound is not None:
            listed_scores.clamp_(-bound, bound)
        ctx.bound = bound if clipped else None
        ctx.temperature = temperature
        ctx.save_for_backward(scores, exponentials, total, listed)
        return torch.log(total) + peak.squeeze(1), listed_scores

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_lse: torch.Tensor, grad_listed: torch.Tensor):
        scores, exponentials, total, listed = ctx.saved_tensors
        grad = exponentials.mul_((grad_lse / total).unsqueeze(1))  # the buffer is not needed again
        if ctx.temperature is not None:  # the division's backward, in place: the same rounding as autograd's
            grad.div_(ctx.temperature)
        if listed.numel():
            grad.scatter_add_(1, listed, grad_listed)
        if ctx.bound is not None:  # clamped scores do not move: the clamp's (hardtanh's) fused backward, one
            # pass where two comparisons, an "or" and a masked fill took ~20× longer on the CPU
            grad = torch.ops.aten.hardtanh_backward(grad, scores, -ctx.bound, ctx.bound)
        return grad, None, None, None, None, None


def tail_logsumexp(scores: torch.Tensor, excluded: torch.Tensor, excluded_valid: torch.Tensor,
                   bound: float | None = None) -> torch.Tensor:
    """log Σ_{j ∉ excluded} e^{scores_j} per row, without building a dense mask (the student's hot path).

    The tail is "every item except a short list per row" (the user's training items and the listed items).
    With ``bound`` the scores are first clamped to [−bound, bound] (HetComp's released code clamps at 40), with
    the clamp's zero gradient outside. The row maximum is subtracted before exponentiating; an empty tail gives
    log of the smallest positive float. ``excluded`` [B, L] may repeat an item; its invalid entries are ignored.
    """
    return tail_logsumexp_and_listed(scores, excluded, excluded_valid, scores.new_zeros((len(scores), 0),
                                                                                         dtype=torch.int64),
                                     bound)[0]


def tail_logsumexp_and_listed(scores: torch.Tensor, excluded: torch.Tensor, excluded_valid: torch.Tensor,
                              listed: torch.Tensor, bound: float | None = None,
                              temperature: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(:func:`tail_logsumexp`, the scores of ``listed`` [B, L] items clamped like :func:`listed_scores`).

    One autograd node for both, whose backward adds the listed items' gradients into the tail's gradient buffer
    instead of a dense gather gradient (padding −1 in ``listed`` reads column 0: give it zero weight in the loss).
    With ``temperature`` τ the tail is log Σ e^{s/τ} (the division inside the node, its backward in place) while
    the listed scores stay undivided: the same numbers and, for distinct listed items, the same gradients bit for
    bit as ``tail_logsumexp(scores / τ)`` beside a ``gather`` of ``scores``, without their two dense backward
    passes. Not with ``bound``.
    """
    if temperature is not None and bound is not None:
        raise ValueError("tail_logsumexp_and_listed: temperature and bound together are not supported")
    return _TailLogSumExp.apply(scores, excluded, excluded_valid, bound, listed, temperature)


def listed_scores(scores: torch.Tensor, items: torch.Tensor, bound: float | None = None) -> torch.Tensor:
    """The scores of ``items`` [B, L] (padding −1 reads column 0), clamped to [−bound, bound] when given."""
    listed = scores.gather(1, items.clamp(min=0))
    return listed if bound is None else listed.clamp(-bound, bound)


def _mean_over_users(per_position: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    per_position = torch.where(valid, per_position, torch.zeros((), device=per_position.device))
    return per_position.sum(1).mean()


def overall_loss(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, tail: torch.Tensor | None = None,
                 tail_lse: torch.Tensor | None = None) -> torch.Tensor:
    """L_O: every item of the list above every tail item, no order inside the list.

    −Σ_k log( e^{f_k} / (e^{f_k} + Σ_{j∈tail} e^{f_j}) ) = Σ_k softplus(LSE_tail − f_k).
    Pass ``tail_lse`` (log Σ_tail e^f per row) instead of ``tail`` to share it between lists.
    """
    if tail_lse is None:
        tail_lse = masked_logsumexp(scores, tail)
    return overall_loss_of(listed_scores(scores, items), valid, tail_lse)


def overall_loss_of(listed: torch.Tensor, valid: torch.Tensor, tail_lse: torch.Tensor) -> torch.Tensor:
    """:func:`overall_loss` from the listed items' scores [B, L] and the tail's log-sum-exp [B]."""
    return _mean_over_users(functional.softplus(tail_lse.unsqueeze(1) - listed), valid)


def fine_loss(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor, tail: torch.Tensor | None = None,
              tail_lse: torch.Tensor | None = None) -> torch.Tensor:
    """L_F: Plackett–Luce keeping the list's exact order and placing it above the tail.

    −Σ_k log( e^{f_k} / (Σ_{l≥k} e^{f_l} + Σ_{j∈tail} e^{f_j}) ); invalid (padding) positions are left out.
    """
    if tail_lse is None:
        tail_lse = masked_logsumexp(scores, tail)
    return fine_loss_of(listed_scores(scores, items), valid, tail_lse)


def fine_loss_of(listed: torch.Tensor, valid: torch.Tensor, tail_lse: torch.Tensor) -> torch.Tensor:
    """:func:`fine_loss` from the listed items' scores [B, L] (in list order) and the tail's log-sum-exp [B]."""
    listed = listed.masked_fill(~valid, NEG_INF)
    suffix = torch.logcumsumexp(listed.flip(1), dim=1).flip(1)
    denominator = torch.logaddexp(suffix, tail_lse.unsqueeze(1))
    return _mean_over_users(denominator - listed, valid)


def relaxed_ranking_loss(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor,
                         tail_items: torch.Tensor, tail_valid: torch.Tensor) -> torch.Tensor:
    """RRD (Kang et al., CIKM 2020): the list in order above a given set of tail items, no order in the tail.

    Same form as :func:`fine_loss` with the tail given as item ids [B, L'] (sampled or all the rest).
    """
    return relaxed_ranking_rows(scores, items, valid, tail_items, tail_valid).mean()


def relaxed_ranking_rows(scores: torch.Tensor, items: torch.Tensor, valid: torch.Tensor,
                         tail_items: torch.Tensor, tail_valid: torch.Tensor) -> torch.Tensor:
    """:func:`relaxed_ranking_loss` of each row [B], before the mean (a row with nothing valid gives 0)."""
    tail_scores = scores.gather(1, tail_items.clamp(min=0)).masked_fill(~tail_valid, NEG_INF)
    tail_lse = torch.logsumexp(tail_scores, dim=1)
    listed = scores.gather(1, items.clamp(min=0)).masked_fill(~valid, NEG_INF)
    suffix = torch.logcumsumexp(listed.flip(1), dim=1).flip(1)
    per_position = torch.logaddexp(suffix, tail_lse.unsqueeze(1)) - listed
    return torch.where(valid, per_position, torch.zeros((), device=per_position.device)).sum(1)


def items_mask(items: torch.Tensor, valid: torch.Tensor | None, n_items: int,
               base: torch.Tensor | None = None, value: bool = True) -> torch.Tensor:
    """Dense bool [B, n_items] set to ``value`` at the valid entries of ``items``, on a copy of ``base``
    (default: all ``not value``)."""
    if base is None:
        mask = torch.full((items.shape[0], n_items), not value, dtype=torch.bool, device=items.device)
    else:
        mask = base.clone()
    rows = torch.arange(items.shape[0], device=items.device).unsqueeze(1).expand_as(items)
    if valid is None:
        mask[rows, items] = value
    else:
        mask[rows[valid], items[valid]] = value
    return mask


# ---- losses of the ranking-distillation baselines ---------------------------------------------------------

#: stands in for −∞ where a softmax over a padded list must stay finite (an all-padding row gives no NaN)
_MASKED_LOGIT = -1e9


def _masked_log_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log-softmax over the valid entries of each row; 0 at the padding."""
    out = torch.log_softmax(logits.masked_fill(~valid, _MASKED_LOGIT), dim=1)
    return torch.where(valid, out, torch.zeros((), dtype=out.dtype, device=out.device))


def _mean_over_rows_with(per_row: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_row`` over the rows where ``present``; 0 when no row is."""
    per_row = torch.where(present, per_row, torch.zeros((), dtype=per_row.dtype, device=per_row.device))
    return per_row.sum() / present.sum().clamp(min=1)


def pointwise_log_loss(scores: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of rows [positive, negatives…]: −log σ(f_pos) − Σ_n log(1 − σ(f_n)), mean over rows."""
    return (functional.softplus(-scores[:, 0]) + functional.softplus(scores[:, 1:]).sum(1)).mean()


def weighted_pointwise_loss(listed: torch.Tensor, weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """RD: the listed items are positives, each weighted: Σ_r w_r · (−log σ(f_r)), averaged over users.

    ``listed`` [B, L] are the student's scores of the teacher's items, ``weights`` [B, L] their weights.
    """
    return _mean_over_users(-weights * functional.logsigmoid(listed), valid)


def lambda_mrr_loss(scores: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """CL-DRD's LambdaMRR loss: a logistic loss on every pair with label_i > label_j, weighted by |1/p_i − 1/p_j|.

    p is each item's 1-based position in the *student's* current ordering of its row (``scores`` [B, L], detached):
    the labels only say which item should be above which, the student's positions say how much a swap would move
    a reciprocal-rank metric. Summed over the valid pairs of the batch and divided by their number (the mean over
    pairs of the authors' code). Ties in ``scores`` take positions in column order.
    """
    positions = _student_positions(scores, valid)[1]
    reciprocal = 1.0 / positions.to(scores.dtype)
    weight = (reciprocal.unsqueeze(2) - reciprocal.unsqueeze(1)).abs()
    pair = (labels.unsqueeze(2) > labels.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    logistic = functional.softplus(scores.unsqueeze(1) - scores.unsqueeze(2))  # −log σ(f_i − f_j) at [i, j]
    total = torch.where(pair, weight * logistic, torch.zeros((), dtype=scores.dtype, device=scores.device)).sum()
    return total / pair.sum().clamp(min=1)


def soft_target_cross_entropy(scores: torch.Tensor | None, unobserved: torch.Tensor | None, items: torch.Tensor,
                              targets: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0,
                              log_normalizer: torch.Tensor | None = None,
                              listed: torch.Tensor | None = None) -> torch.Tensor:
    """−Σ_l target_l · log softmax(f/τ)_{item_l}, the softmax over each user's unobserved items only.

    MTD's loss (targets = the teachers' mixture) and KD's ``listwise`` (targets = the teacher's top-K
    distribution). ``scores``/``unobserved`` are [B, n_items]; ``items``/``targets``/``valid`` [B, L]; an item
    listed twice counts twice (so a mixture may be passed teacher by teacher). Averaged over users. The listed
    items must be unobserved. ``log_normalizer`` [B] = log Σ_{unobserved} e^{f/τ} replaces the dense mask
    (e.g. from :meth:`~hetcomp.distill.base.DistillContext.tail_logsumexp`, the students' fast path); ``listed``
    [B, L], the scores of ``items`` already taken (undivided, e.g. from
    :meth:`~hetcomp.distill.base.DistillContext.tail_and_listed_scores`), replaces their ``gather``.
    """
    if log_normalizer is None:
        log_normalizer = masked_logsumexp(scores / temperature, unobserved)
    if listed is None:
        listed = scores.gather(1, items.clamp(min=0))
    log_probs = listed / temperature - log_normalizer.unsqueeze(1)
    return _mean_over_users(-targets * log_probs, valid)


def candidate_cross_entropy(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
                            temperature: float = 1.0) -> torch.Tensor:
    """−Σ p_T log p_S with both softmaxes over each user's valid candidates at temperature τ; user mean."""
    log_student = _masked_log_softmax(student / temperature, valid)
    target = _masked_log_softmax(teacher / temperature, valid).exp() * valid
    return _mean_over_users(-target * log_student, valid)


def candidate_kl(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
                 temperature: float = 1.0) -> torch.Tensor:
    """τ² · KL(p_T ‖ p_S) over the valid candidates (Hinton et al.'s scaling keeps gradients τ-independent)."""
    log_student = _masked_log_softmax(student / temperature, valid)
    log_teacher = _masked_log_softmax(teacher / temperature, valid)
    return temperature ** 2 * _mean_over_users(log_teacher.exp() * (log_teacher - log_student), valid)


def _mean_over_valid(per_entry: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per user the mean over its valid entries, then the mean over users that have any."""
    count = valid.sum(1)
    per_entry = torch.where(valid, per_entry, torch.zeros((), dtype=per_entry.dtype, device=per_entry.device))
    return _mean_over_rows_with(per_entry.sum(1) / count.clamp(min=1), count > 0)


def candidate_bce(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy of σ(student/τ) against the soft labels σ(teacher/τ); mean per user, then over users."""
    labels = torch.sigmoid(teacher / temperature)
    per_entry = functional.binary_cross_entropy_with_logits(student / temperature, labels, reduction="none")
    return _mean_over_valid(per_entry, valid)


def candidate_l2(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, temperature: float = 1.0,
                 on: str = "logits") -> torch.Tensor:
    """Squared error on logits/τ (``on="logits"``) or on σ(logits/τ) (``on="probs"``); mean per user, then users."""
    student, teacher = student / temperature, teacher / temperature
    if on == "probs":
        student, teacher = torch.sigmoid(student), torch.sigmoid(teacher)
    return _mean_over_valid((student - teacher) ** 2, valid)


def pairwise_hinge_loss(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, margin: float = 1.0,
                        labels: torch.Tensor | None = None) -> torch.Tensor:
    """max(0, m_ij − (f_i − f_j)) over every valid pair the teacher orders i above j; mean per user, then users.

    m_ij = ``margin``, or ``margin`` · (label_i − label_j) when soft ``labels`` [B, L] are given.
    """
    pair = (teacher.unsqueeze(2) > teacher.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    needed = margin if labels is None else margin * (labels.unsqueeze(2) - labels.unsqueeze(1))
    hinge = functional.relu(needed - (student.unsqueeze(2) - student.unsqueeze(1)))
    hinge = torch.where(pair, hinge, torch.zeros((), dtype=hinge.dtype, device=hinge.device))
    count = pair.sum((1, 2))
    return _mean_over_rows_with(hinge.sum((1, 2)) / count.clamp(min=1), count > 0)


# ---- LambdaMRR of a listed head against every other unobserved item (CL-DRD without sampling) -------------

#: Taylor order of the binned rest term, and the width of its buckets in warped score (see
#: :func:`lambda_mrr_rest_loss`, :func:`_warped_scores`): near a listed score |f_j − c| ≤ 0.25 and softplus is
#: analytic within π of the real line, so the terms after order 6 fall like (0.25/π)^7 ~ 2e-8; farther away
#: both the bucket and the radius grow. Measured against the direct pairwise sums in float64 (normal and Cauchy
#: scores of spread 0.001 to 100, random lists and the student's own top): ≤ 2e-9 relative on the values and the
#: gradients.
_TAYLOR_ORDER = 6
_BUCKET = 0.5
#: the row passes of the rest term by the CPU kernels (:mod:`hetcomp.distill.rest_kernel`) where numba is installed
#: (a dependency; without it torch's passes give the same bits, slower); the tests switch it off to compare them
_FUSED_REST = importlib.util.find_spec("numba") is not None


def _sigmoid_derivative_factors(order: int) -> list[np.ndarray]:
    """Q_k (power basis) with σ^{(k)} = σ(1 − σ)·Q_k(σ), k = 1..order: σ' = σ(1 − σ), so Q_{k+1} = d/dσ[σ(1 − σ)Q_k]."""
    factors = [np.array([1.0])]
    while len(factors) < order:
        factors.append(polynomial.polyder(polynomial.polymul([0.0, 1.0, -1.0], factors[-1])))
    return factors


_SIGMOID_FACTORS = _sigmoid_derivative_factors(_TAYLOR_ORDER + 1)


def _rest_kernels() -> types.ModuleType:
    """:mod:`hetcomp.distill.rest_kernel`, imported at its first use: numba's import (and the kernels' compilation
    or cache load) stays off ``hetcomp``'s start-up and off every method but the unsampled CL-DRD."""
    from hetcomp.distill import rest_kernel

    return rest_kernel


@functools.cache
def _sigmoid_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:data:`_SIGMOID_FACTORS` as :func:`hetcomp.distill.rest_kernel.taylor_terms` reads them, made once: the
    Q_k padded into rows [order − 1, width], their lengths, and m! for m = 0..order + 1."""
    needed = _TAYLOR_ORDER  # Q_0 .. Q_{order − 1}: the terms' orders 2 .. order + 1
    lengths = np.array([len(factor) for factor in _SIGMOID_FACTORS[:needed]], dtype=np.int64)
    coefficients = np.zeros((needed, int(lengths.max())))
    for k, factor in enumerate(_SIGMOID_FACTORS[:needed]):
        coefficients[k, :len(factor)] = factor
    factorials = np.array([float(math.factorial(m)) for m in range(_TAYLOR_ORDER + 2)])
    return coefficients, lengths, factorials


def _softplus_taylor(x: torch.Tensor, order: int, sign: torch.Tensor | None = None) -> torch.Tensor:
    """softplus^{(m)}(x)/m! for m = 0..order, on a new last axis (times ``sign`` where given). σ(1 − σ) is taken
    as σ(x)·σ(−x), which keeps its relative precision in both tails (1 − σ(x) would cancel for large x)."""
    s = torch.sigmoid(x)
    both = s * torch.sigmoid(-x)
    if sign is not None:
        both = both * sign
    terms = [functional.softplus(x), s] if sign is None else [functional.softplus(x) * sign, s * sign]
    for m in range(2, order + 1):
        coefficients = _SIGMOID_FACTORS[m - 2]  # softplus^{(m)} = σ^{(m−1)}
        value = torch.full_like(s, float(coefficients[-1]))
        for coefficient in coefficients[-2::-1]:
            value = value * s + float(coefficient)
        terms.append(both * value / math.factorial(m))
    return torch.stack(terms, -1)


def _student_positions(scores: torch.Tensor, unobserved: torch.Tensor,
                       by_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [B, n]: columns by descending score, unobserved first, ties in column order; positions [B, n]: each
    column's 1-based place in ``order``): the student's positions of LambdaMRR's weights. ``by_keys``: float32
    rows on the CPU sorted by :func:`_descending_order_by_keys` (numpy: not for tensors under ``vmap``)."""
    order = _student_order(scores, unobserved, by_keys)
    # out of place: vmap (stacked seeds) has a batching rule for scatter, not for scatter_
    positions = torch.empty_like(order).scatter(1, order, torch.arange(1, scores.shape[1] + 1,
                                                                       device=scores.device).expand_as(order))
    return order, positions


def _student_order(scores: torch.Tensor, unobserved: torch.Tensor, by_keys: bool = False) -> torch.Tensor:
    """The order of :func:`_student_positions` alone."""
    if by_keys and scores.device.type == "cpu" and scores.dtype == torch.float32 and scores.shape[1] < 1 << 31:
        return _descending_order_by_keys(scores.detach(), unobserved)
    return scores.detach().masked_fill(~unobserved, NEG_INF).argsort(dim=1, descending=True, stable=True)


def _descending_order_by_keys(scores: torch.Tensor, unobserved: torch.Tensor) -> torch.Tensor:
    """The order of :func:`_student_positions` for float32 scores on the CPU, by one sort of unique int64 keys
    (numpy's sort, or the CPU kernel's radix sort; ~7× torch's stable argsort of 28k-item rows). Key = (the negated
    score's bits mapped to an int of the same order, then the column): unique, so any sort gives the stable
    order; a training item's score is −inf first, as for the argsort."""
    if _FUSED_REST:  # the same keys, radix-sorted by a kernel: the same order
        kernels = _rest_kernels()
        return torch.from_numpy(kernels.student_order(scores.contiguous().numpy(), unobserved.contiguous().numpy(),
                                                      torch.get_num_threads()))
    negated = (-(scores + 0.0)).masked_fill(~unobserved, math.inf)  # + 0.0: −0.0 and 0.0 tie, as floats do
    bits = negated.view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # int order = float order (NaN aside)
    keys = (ordered << 31) | torch.arange(scores.shape[1], dtype=torch.int64)
    return torch.from_numpy(np.sort(keys.numpy(), axis=1)) & ((1 << 31) - 1)


def _warped_scores(scores: torch.Tensor, listed_scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A monotone map u of each row's ``scores`` [B, n] (float64) whose unit steps are one unit of score near a
    listed item's score and widen as √(1 + d²/π²) at a distance d from the nearest one: du/df = 1/√(1 + d²/π²),
    i.e. u moves by π·asinh(d/π) from the nearest listed score. Buckets of equal width in u then hold the
    expansion's |δ|/radius constant, since softplus(x + δ) around x = c − f_i converges within √(x² + π²)."""
    anchors, at_anchor, midpoints = _warp_anchors(listed_scores, valid)
    # the nearest anchor: the first whose midpoint with the next is at or above the score (the lower one on a tie)
    nearest = torch.searchsorted(midpoints, scores.contiguous())
    return at_anchor.gather(1, nearest) + math.pi * torch.asinh((scores - anchors.gather(1, nearest)) / math.pi)


def _warp_anchors(listed_scores: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_warped_scores`' anchors: the valid listed scores sorted (a padded place takes the row's highest, or 0)
    [B, N], u at each of them [B, N], and the midpoints between neighbours [B, N − 1] (all float64)."""
    fallback = torch.where(valid, listed_scores, NEG_INF).amax(1, keepdim=True)
    anchors = torch.where(valid, listed_scores, torch.nan_to_num(fallback, neginf=0.0)).sort(1).values
    gaps = anchors[:, 1:] - anchors[:, :-1]
    at_anchor = torch.cat((torch.zeros_like(anchors[:, :1]),
                           torch.cumsum(2 * math.pi * torch.asinh(gaps / (2 * math.pi)), 1)), 1)
    return anchors, at_anchor, (anchors[:, :-1] + gaps / 2).contiguous()


class _Segments(NamedTuple):
    """The rest items' segments of a chunk of rows (see :func:`_rest_pairs`)."""

    centre: torch.Tensor  # [B, S] float64: the middle of each segment's rest scores (0 without any)
    moments: torch.Tensor  # [B, S, order + 1, 2] float64: Σ δ^m and Σ δ^m / p_j over each segment's rest items
    above: torch.Tensor  # [B, S]: the listed items at or above each segment
    listed_above: torch.Tensor  # [B, N]: the listed items at or above each listed item's place
    at: torch.Tensor  # [B, N]: each listed item's 0-based place in the student's order
    order: torch.Tensor  # [B, n]: the columns in the student's order (:func:`_student_positions`)
    segment: torch.Tensor  # [B, n]: each sorted place's segment
    delta: torch.Tensor  # [B, n] float64: f_j − c at each sorted place (0 off the rest)
    rest: torch.Tensor | None = None  # [B, n] bool: a rest item at each sorted place (torch's passes)
    kind: torch.Tensor | None = None  # [B, n] int8: each sorted place's kind (the kernels: rest_kernel.REST, …)


def _rest_pairs(scores: torch.Tensor, unobserved: torch.Tensor, listed: torch.Tensor, valid: torch.Tensor,
                with_gradient: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The pairs of :func:`lambda_mrr_rest_loss` between each listed item and every other unobserved item: the
    per-row sums [B] (float64), the listed items' positions p_i [B, N], and, when asked, the sums' gradient with
    respect to ``scores`` [B, n] (float64 by torch, ``scores``' dtype by the CPU kernels)."""
    rows, n_items = scores.shape
    order_m, device, f64 = _TAYLOR_ORDER, scores.device, torch.float64
    f_listed = scores.detach().gather(1, listed).to(f64)  # the listed scores alone, not the row, made float64
    fused = _fused_rows(scores)
    if fused:  # the kernels find the listed items' places themselves
        pieces = _segments_by_kernel(scores, unobserved, listed, valid, _student_order(scores, unobserved, True),
                                     f_listed)
    else:
        pieces = _segments_by_torch(scores, unobserved, listed, valid, f_listed)
    order = pieces.order
    n_segments = pieces.centre.shape[1]
    at = pieces.at
    inv_listed = 1.0 / (at + 1).to(f64)
    # Σ_{j in segment} w_ij softplus(f_j − f_i) = sign · Σ_m D_m(c − f_i) (Σ δ^m / p_i − Σ δ^m / p_j), sign = +1
    # where the segment is below i
    x = pieces.centre.unsqueeze(1) - f_listed.unsqueeze(2)
    if fused:  # torch's σ and softplus, then the kernel's terms (the same bits as _softplus_taylor's passes)
        taylor = torch.empty(rows, listed.shape[1], n_segments, order_m + 2, dtype=f64)
        _rest_kernels().taylor(torch.sigmoid(x).numpy(), torch.sigmoid(-x).numpy(), functional.softplus(x).numpy(),
                               pieces.above.numpy(), pieces.listed_above.numpy(), valid.contiguous().numpy(),
                               *_sigmoid_table(), taylor.numpy(), torch.get_num_threads())
    else:
        below = pieces.above.unsqueeze(1) >= pieces.listed_above.unsqueeze(2)  # [B, N, S]: segment below i
        sign = torch.where(below, 1.0, -1.0).to(f64) * valid.unsqueeze(2)
        taylor = _softplus_taylor(x, order_m + 1, sign)
    taylor = taylor.view(rows, -1, n_segments * (order_m + 2))  # [B, N, S·(order + 2)], D_0 .. D_{order + 1}
    # the value reads D_0..D_order; the gradient D_1..D_{order+1}, since d/dx of D_m is (m + 1) D_{m+1}: one
    # product with both, the moments shifted by one order (and scaled) for the second
    orders = torch.arange(1, order_m + 2, dtype=f64, device=device)
    moments = pieces.moments
    zero = moments.new_zeros(rows, n_segments, 1, 2)
    both = torch.cat((torch.cat((moments, zero), 2), torch.cat((zero, moments * orders.view(1, 1, -1, 1)), 2)), 3)
    pulled = taylor @ both.view(rows, n_segments * (order_m + 2), 4)  # [B, N, 4]
    value = (pulled[..., 0] * inv_listed - pulled[..., 1]).sum(1)
    if not with_gradient:
        return value, at + 1, None
    gradient_listed = pulled[..., 3] - pulled[..., 2] * inv_listed
    # each rest item j of a segment: Σ_m δ_j^m (a_m − b_m / p_j), a and b summed over the listed items
    weights = torch.stack((inv_listed, torch.ones_like(inv_listed)), 1)
    a_and_b = (weights @ taylor).view(rows, 2, n_segments, order_m + 2)[..., 1:] * orders  # [B, 2, S, order + 1]
    if fused:
        gradient = torch.empty(rows, n_items, dtype=scores.dtype)
        _rest_kernels().gradient(order.numpy(), pieces.segment.numpy(), pieces.kind.numpy(), pieces.delta.numpy(),
                                 a_and_b[:, 0].contiguous().numpy(), a_and_b[:, 1].contiguous().numpy(),
                                 gradient.numpy(), torch.get_num_threads())
        return value, at + 1, gradient.scatter_add_(1, listed, torch.where(valid, gradient_listed, 0.0).to(
            scores.dtype))
    tables = a_and_b.permute(1, 3, 0, 2).contiguous()  # [2, order + 1, B, S]: a_m and b_m per segment
    inv_p = 1.0 / torch.arange(1, n_items + 1, dtype=f64, device=device)
    gradient_sorted = torch.zeros(rows, n_items, dtype=f64, device=device)
    for m in range(order_m, -1, -1):  # Horner over m, from the top order
        gradient_sorted.mul_(pieces.delta).add_(tables[0, m].gather(1, pieces.segment)).sub_(
            tables[1, m].gather(1, pieces.segment) * inv_p)
    gradient_sorted.mul_(pieces.rest)
    gradient = torch.zeros(rows, n_items, dtype=f64, device=device).scatter_(1, order, gradient_sorted)
    gradient.scatter_add_(1, listed, torch.where(valid, gradient_listed, 0.0))
    return value, at + 1, gradient


def _fused_rows(scores: torch.Tensor) -> bool:
    """Whether :func:`_rest_pairs` runs its row passes by the CPU kernels of :mod:`hetcomp.distill.rest_kernel`
    (CPU tensors, float32 or float64); torch's passes elsewhere (CUDA)."""
    return _FUSED_REST and scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64)


def _segments_by_kernel(scores: torch.Tensor, unobserved: torch.Tensor, listed: torch.Tensor, valid: torch.Tensor,
                        order: torch.Tensor, f_listed: torch.Tensor) -> _Segments:
    """:class:`_Segments` by the CPU kernels: two passes a row, the rows split over torch's threads."""
    anchors, at_anchor, midpoints = _warp_anchors(f_listed, valid)
    values = scores.detach().contiguous().numpy()
    order_np = order.numpy()
    segment, kind, at, centre, above, moments, delta = _rest_kernels().segments(
        values, order_np, unobserved.contiguous().numpy(), listed.contiguous().numpy(), valid.contiguous().numpy(),
        anchors.numpy(), at_anchor.numpy(), midpoints.numpy(), _BUCKET, _TAYLOR_ORDER, torch.get_num_threads())
    above = torch.from_numpy(above)
    segment = torch.from_numpy(segment)
    at = torch.from_numpy(at)
    return _Segments(torch.from_numpy(centre), torch.from_numpy(moments), above,
                     above.gather(1, segment.gather(1, at).long()), at, order, segment, torch.from_numpy(delta),
                     kind=torch.from_numpy(kind))


def _segments_by_torch(scores: torch.Tensor, unobserved: torch.Tensor, listed: torch.Tensor, valid: torch.Tensor,
                       f_listed: torch.Tensor) -> _Segments:
    """:class:`_Segments` by torch passes over [B, n] (any device)."""
    rows, n_items = scores.shape
    order, positions = _student_positions(scores, unobserved, by_keys=True)
    order_m, device, f64 = _TAYLOR_ORDER, scores.device, torch.float64
    f = scores.detach().to(f64)
    row_of = torch.arange(rows, device=device).unsqueeze(1).expand_as(listed)
    is_listed = torch.zeros(rows, n_items, dtype=torch.bool, device=device)
    is_listed[row_of[valid], listed[valid]] = True
    rest = (unobserved & ~is_listed).gather(1, order)  # [B, n], the student's order from here on
    f_sorted = f.gather(1, order)
    bottom = f_sorted.gather(1, (unobserved.sum(1, keepdim=True) - 1).clamp(min=0))
    warped = _warped_scores(torch.where(unobserved.gather(1, order), f_sorted, bottom), f_listed, valid)
    # segments: runs of the sorted row with one warped bucket and the same listed items above them, so that
    # every listed item is wholly above or wholly below each segment (the trained items, last, share one)
    bucket = ((warped[:, :1] - warped) / _BUCKET).floor()
    listed_above = torch.cumsum(is_listed.gather(1, order), 1)  # listed items at or above each place
    key = bucket.long() * (listed.shape[1] + 1) + listed_above
    segment = torch.zeros(rows, n_items, dtype=torch.long, device=device)
    segment[:, 1:] = torch.cumsum(key[:, 1:] != key[:, :-1], 1)
    n_segments = int(segment[:, -1].max()) + 1

    # each segment's centre c: the middle of its rest items' scores, so |δ| = |f_j − c| is at most half its width
    def extreme(fill: float, reduce: str) -> torch.Tensor:
        return torch.full((rows, n_segments), fill, dtype=f64, device=device).scatter_reduce(
            1, segment, torch.where(rest, f_sorted, fill), reduce)

    low, high = extreme(math.inf, "amin"), extreme(-math.inf, "amax")
    segment_centre = torch.where(high >= low, (low + high) / 2, 0.0)
    delta = torch.where(rest, f_sorted - segment_centre.gather(1, segment), 0.0)
    inv_p = 1.0 / torch.arange(1, n_items + 1, dtype=f64, device=device)
    segment_above = torch.zeros(rows, n_segments, dtype=torch.long, device=device).scatter_(1, segment, listed_above)
    # each segment's moments Σ δ^m and Σ δ^m / p_j over its rest items, m = 0..order: [B, S, order + 1, 2]
    summed = torch.empty(2 * (order_m + 1), rows, n_items, dtype=f64, device=device)  # δ^m, δ^m / p_j, m = 0, 1, …
    powers = summed[0::2]  # zero outside the rest
    powers[0] = rest
    for m in range(order_m + 1):
        if m:
            torch.mul(powers[m - 1], delta, out=powers[m])
        torch.mul(powers[m], inv_p, out=summed[2 * m + 1])
    moments = _segment_sums(summed, segment, n_segments).view(rows, n_segments, order_m + 1, 2)
    at = positions.gather(1, listed) - 1  # each listed item's sorted index
    return _Segments(segment_centre, moments, segment_above, listed_above.gather(1, at), at, order, segment, delta,
                     rest=rest)


def _segment_sums(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Σ of ``values`` [K, B, n] over each row's segments (``segment`` [B, n]: ids from 0, non-decreasing along
    the row, so each segment is one run): [B, S, K]. On the CPU by numpy's ``add.reduceat`` over the runs (exact,
    ~5× the K scatter-adds it replaces), elsewhere by scatter-adds."""
    n_values, rows, _ = values.shape
    if values.device.type != "cpu":
        return _segment_sums_by_scatter(values, segment, n_segments)
    flat = (segment + torch.arange(rows).unsqueeze(1) * n_segments).view(-1).numpy()
    starts = np.flatnonzero(np.diff(flat, prepend=-1))  # each present segment's first place
    sums = np.zeros((rows * n_segments, n_values))
    sums[flat[starts]] = np.add.reduceat(values.reshape(n_values, -1).numpy(), starts, axis=1).T
    return torch.from_numpy(sums).view(rows, n_segments, n_values)


def _segment_sums_by_scatter(values: torch.Tensor, segment: torch.Tensor, n_segments: int) -> torch.Tensor:
    """:func:`_segment_sums` by scatter-adds (any device, any segment order)."""
    sums = values.new_zeros(values.shape[0], values.shape[1], n_segments)
    return sums.scatter_add_(2, segment.unsqueeze(0).expand_as(values), values).permute(1, 2, 0)


class _RestPairs(torch.autograd.Function):
    """:func:`_rest_pairs` over a batch's rows, chunk by chunk, with its gradient made in the forward pass (it reuses
    the segments' sums) into one [B, n] tensor: autograd keeps that tensor instead of every intermediate pass, and
    no chunk goes through a slice of ``scores`` (whose backward would fill a zero [B, n] gradient per chunk). Returns
    (the sums [B], the listed items' positions [B, N], not differentiable)."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, unobserved: torch.Tensor, listed: torch.Tensor, valid: torch.Tensor,
                rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        with_gradient = ctx.needs_input_grad[0]
        gradient = torch.empty_like(scores) if with_gradient else None
        values, positions = [], []
        for start in range(0, scores.shape[0], rows):
            chunk = slice(start, start + rows)
            value, listed_positions, part = _rest_pairs(scores[chunk], unobserved[chunk], listed[chunk], valid[chunk],
                                                        with_gradient)
            values.append(value)
            positions.append(listed_positions)
            if with_gradient:
                gradient[chunk] = part
        ctx.save_for_backward(gradient)
        positions = torch.cat(positions)
        ctx.mark_non_differentiable(positions)
        return torch.cat(values), positions

    @staticmethod
    def backward(ctx, grad_value: torch.Tensor, _grad_positions: torch.Tensor | None) -> tuple:
        gradient, = ctx.saved_tensors
        return gradient * grad_value.unsqueeze(1).to(gradient.dtype), None, None, None, None


def _listed_pairs(f_listed: torch.Tensor, listed_positions: torch.Tensor, labels: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
    """The pairs inside the list, exact (autograd): Σ |1/p_i − 1/p_j| softplus(f_j − f_i) over the valid pairs
    whose labels order i above j, per row (float64; ``f_listed`` [B, N] the listed items' scores, float64)."""
    inv_listed = 1.0 / listed_positions.to(torch.float64)
    pair = (labels.unsqueeze(2) > labels.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    weight = (inv_listed.unsqueeze(2) - inv_listed.unsqueeze(1)).abs()
    logistic = functional.softplus(f_listed.unsqueeze(1) - f_listed.unsqueeze(2))  # −log σ(f_i − f_j) at [i, j]
    zero = torch.zeros((), dtype=torch.float64, device=f_listed.device)
    return torch.where(pair, weight * logistic, zero).sum((1, 2))


def lambda_mrr_rest_loss(scores: torch.Tensor, unobserved: torch.Tensor, listed: torch.Tensor,
                         labels: torch.Tensor, valid: torch.Tensor, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """LambdaMRR of a labelled list against every other unobserved item, per user (the pairs, no sampling).

    The list ``listed`` [B, N] (item ids, unobserved, distinct; ``labels`` [B, N], ``valid``) sits above all of the
    user's other unobserved items (``unobserved`` [B, n_items] bool), which share the lowest label. Over every pair
    (i, j) whose labels order i above j, with p the student's 1-based position among the user's unobserved items
    (``scores`` detached, ties in column order, as :func:`lambda_mrr_loss`):

        L_u = Σ_{(i,j)} |1/p_i − 1/p_j| · softplus(f_j − f_i).

    Returns L_u [B] (sums, not means: the caller picks the normalization). Linear in n_items per user, no
    [B, N, n_items] tensor. Pairs inside the list are summed exactly. For the rest, the row in the student's order
    is cut into segments, each inside one score bucket (0.5 wide near a listed item's score, wider away from
    every one: :func:`_warped_scores`) with the same listed items above it, so a listed item i is above or below
    a whole segment (weight ±(1/p_i − 1/p_j)). With c the middle of a segment's scores, softplus(f_j − f_i) =
    Σ_m D_m(c − f_i) (f_j − c)^m, D_m = softplus^{(m)}/m!, to order 6 (relative error ≤ ~1e-8), so each segment
    contributes through its moments Σ (f_j − c)^m and Σ (f_j − c)^m / p_j: a few passes over the row, then
    [B, N, segments] products. The gradient is the same expansion one order up (σ for softplus), made in the
    forward pass. Rows are processed in chunks of about ``chunk_elements`` scores. On the CPU the passes over the
    rows (segments, moments, the rest items' slopes) are numba kernels (:mod:`hetcomp.distill.rest_kernel`) that
    keep torch's order of operations: the same bits either way, ~2× faster.
    """
    listed = listed.clamp(min=0)
    rows = max(1, chunk_elements // max(scores.shape[1], 1))
    rest, listed_positions = _RestPairs.apply(scores, unobserved, listed, valid, rows)
    f_listed = _listed_scores(scores, listed, several_chunks=scores.shape[0] > rows)
    parts = [rest[chunk] + _listed_pairs(f_listed[chunk], listed_positions[chunk], labels[chunk], valid[chunk])
             for chunk in (slice(start, start + rows) for start in range(0, scores.shape[0], rows))]
    return torch.cat(parts).to(scores.dtype)


def _listed_scores(scores: torch.Tensor, listed: torch.Tensor, several_chunks: bool) -> torch.Tensor:
    """The listed items' scores [B, N] as float64, gathered once for the batch (each chunk's rows sliced from it).

    The gradients stay the bits of the former slice of ``scores`` per chunk, where a score's gradient was the sum
    of the rest term's, the listed pairs' (+0.0 off the list) and, with several chunks, the other chunks'
    zero-padded slices (+0.0). Where the rows span several chunks the listed scores are gathered before the
    conversion (only [B, N] converted): a listed score's float64 gradient is then rounded to ``scores``' dtype
    before, not after, it is added to +0.0, so one that rounds to −0.0 gives +0.0, as any further +0.0 made it
    anyway. A single chunk converts the row first, as before."""
    if several_chunks:
        return scores.gather(1, listed).to(torch.float64)
    return scores.to(torch.float64).gather(1, listed)
