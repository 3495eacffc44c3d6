"""Ranking-distillation losses on [batch, list] tensors: no loop over users or items.

Conventions: ``scores`` [B, n_items] are the student's scores; a list ``P`` is [B, L] item ids with a validity
mask (users with shorter lists are padded); ``tail`` is a bool mask [B, n_items] of the items P must beat.
Every loss sums over the list positions and averages over the users of the batch.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import chebyshev, polynomial
from torch.nn import functional
from torch.utils.checkpoint import checkpoint

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

#: terms of the power series that stands in for log(1 + y), y = e^{−|x|} ∈ (0, 1] (see :func:`_log1p_series`)
LOG1P_TERMS = 10
#: centred scores are clamped to ±this before exponentiating, so that e^{±k·z} (k ≤ LOG1P_TERMS) summed over
#: 10^5 items stays inside float64
_EXP_SPAN = 680.0 / LOG1P_TERMS
#: half-width of the score bands that share a centre (see :func:`_lambda_mrr_rest_rows`)
_BAND = 32.0


def _log1p_series(terms: int = LOG1P_TERMS) -> list[float]:
    """a_1..a_K with log(1 + y) ≈ Σ_k a_k y^k on [0, 1]: y·r(y), r the Chebyshev interpolant of log(1 + y)/y of
    degree K − 1 on 200 nodes, in the power basis. K = 10: relative error ≤ 5e-9 (values), ≤ 7e-7 (slope)."""
    nodes = np.cos(np.pi * (np.arange(200) + 0.5) / 200)
    y = (nodes + 1) / 2
    in_t = chebyshev.cheb2poly(chebyshev.chebfit(nodes, np.log1p(y) / y, terms - 1))
    in_y = np.zeros(terms)
    for degree, coefficient in enumerate(in_t):  # t = 2y − 1
        in_y[:degree + 1] += coefficient * polynomial.polypow([-1.0, 2.0], degree)[:degree + 1]
    return [0.0, *in_y.tolist()]


_LOG1P_SERIES = _log1p_series()


def _student_positions(scores: torch.Tensor, unobserved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(order [B, n]: columns by descending score, unobserved first, ties in column order; positions [B, n]: each
    column's 1-based place in ``order``): the student's positions of LambdaMRR's weights."""
    order = scores.detach().masked_fill(~unobserved, NEG_INF).argsort(dim=1, descending=True, stable=True)
    # out of place: vmap (stacked seeds) has a batching rule for scatter, not for scatter_
    positions = torch.empty_like(order).scatter(1, order, torch.arange(1, scores.shape[1] + 1,
                                                                       device=scores.device).expand_as(order))
    return order, positions


def _lambda_mrr_rest_rows(scores: torch.Tensor, unobserved: torch.Tensor, listed: torch.Tensor,
                          labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """:func:`lambda_mrr_rest_loss` for one chunk of rows: the per-row sums [B] (float64)."""
    rows, n_items = scores.shape
    order, positions = _student_positions(scores, unobserved)
    listed = listed.clamp(min=0)
    f = scores.to(torch.float64)
    f_listed = f.gather(1, listed)  # [B, N]
    inv_listed = 1.0 / positions.gather(1, listed).to(torch.float64)
    # the listed part: pairs inside the list, exact
    pair = (labels.unsqueeze(2) > labels.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    weight = (inv_listed.unsqueeze(2) - inv_listed.unsqueeze(1)).abs()
    logistic = functional.softplus(f_listed.unsqueeze(1) - f_listed.unsqueeze(2))  # −log σ(f_i − f_j) at [i, j]
    inside = torch.where(pair, weight * logistic, torch.zeros((), dtype=f.dtype, device=f.device)).sum((1, 2))
    # the rest: every unobserved, unlisted item j, below every listed item i. In the student's order
    # (p_j = sorted index + 1) the j above i form a prefix, those below a suffix of the row
    rest = unobserved.clone()
    rest[torch.arange(rows, device=f.device).unsqueeze(1).expand_as(listed)[valid], listed[valid]] = False
    r = rest.gather(1, order).to(torch.float64)  # [B, n] sorted
    f_sorted = f.gather(1, order)
    inv_p = 1.0 / torch.arange(1, n_items + 1, dtype=torch.float64, device=f.device)
    at = positions.gather(1, listed) - 1  # each listed item's sorted index; r = 0 there, so inclusive cumulative
    # sums at it are the exclusive sums over the items strictly above (prefix) or below (suffix) it

    at_reversed = n_items - 1 - at  # the same items in the reversed (ascending) order

    def prefix(values: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(values, 1).gather(1, at)

    def suffix(reversed_values: torch.Tensor) -> torch.Tensor:  # values given in ascending order (no flip per call)
        return torch.cumsum(reversed_values, 1).gather(1, at_reversed)

    # above: softplus(x) = x + log(1 + e^{−x}), x = f_j − f_i ≥ 0, weight 1/p_j − 1/p_i
    rf = r * f_sorted
    linear = (prefix(rf * inv_p) - f_listed * prefix(r * inv_p) - inv_listed * prefix(rf)
              + f_listed * inv_listed * prefix(r))
    # the log(1 + e^{−|x|}) parts (above and below) as Σ_k a_k e^{−k|x|}, each term a product of an i- and a j-factor,
    # on scores centred at c: each listed item takes the centre of its band of width 2·_BAND (band 0 starts at the
    # row's lowest unobserved score), so |f_i − c| ≤ _BAND; a j clamped at ±_EXP_SPAN is then > _EXP_SPAN − _BAND
    # from i and adds < e^{−36} per pair, i.e. nothing in float64. One band (one pass) unless scores spread > 64.
    # r ∈ {0, 1}, so (r·e^{±z})^k = r·e^{±kz}: the powers carry the mask
    low = scores.detach().masked_fill(~unobserved, float("inf")).amin(1, keepdim=True).to(torch.float64)
    band = ((f_listed.detach() - low) / (2 * _BAND)).floor().clamp(min=0)
    inv_p_reversed = inv_p.flip(0)
    f_reversed, r_reversed = f_sorted.flip(1), r.flip(1)
    curved = torch.zeros_like(f_listed)
    for index in torch.unique(band[valid]).tolist():
        centre = low + (2 * index + 1) * _BAND
        z_listed = (f_listed - centre).clamp(-_EXP_SPAN, _EXP_SPAN)
        down_1 = r * torch.exp(-(f_sorted - centre).clamp(-_EXP_SPAN, _EXP_SPAN))  # r·e^{−z_j}, descending order
        up_1 = r_reversed * torch.exp((f_reversed - centre).clamp(-_EXP_SPAN, _EXP_SPAN))  # r·e^{z_j}, ascending
        e_listed = torch.exp(z_listed)
        down, up, e_k = down_1, up_1, e_listed
        part = torch.zeros_like(f_listed)
        for k, a_k in enumerate(_LOG1P_SERIES[1:], start=1):
            if k > 1:
                down, up, e_k = down * down_1, up * up_1, e_k * e_listed
            above = e_k * (prefix(down * inv_p) - inv_listed * prefix(down))
            below = (inv_listed * suffix(up) - suffix(up * inv_p_reversed)) / e_k
            part = part + a_k * (above + below)
        curved = torch.where(band == index, part, curved)
    across = torch.where(valid, linear + curved, torch.zeros((), dtype=f.dtype, device=f.device)).sum(1)
    return inside + across


def lambda_mrr_rest_loss(scores: torch.Tensor, unobserved: torch.Tensor, listed: torch.Tensor,
                         labels: torch.Tensor, valid: torch.Tensor, chunk_elements: int = 1 << 18) -> torch.Tensor:
    """LambdaMRR of a labelled list against every other unobserved item, per user (the pairs, no sampling).

    The list ``listed`` [B, N] (item ids, unobserved, distinct; ``labels`` [B, N], ``valid``) sits above all of the
    user's other unobserved items (``unobserved`` [B, n_items] bool), which share the lowest label. Over every pair
    (i, j) whose labels order i above j, with p the student's 1-based position among the user's unobserved items
    (``scores`` detached, ties in column order, as :func:`lambda_mrr_loss`):

        L_u = Σ_{(i,j)} |1/p_i − 1/p_j| · softplus(f_j − f_i).

    Returns L_u [B] (sums, not means: the caller picks the normalization). Linear in n_items per user, no
    [B, N, n_items] tensor: pairs inside the list are summed exactly; for j outside it, sorting the row by the
    student's score splits the j above i (a prefix, f_j ≥ f_i, weight 1/p_j − 1/p_i) from those below (a
    suffix, weight 1/p_i − 1/p_j). softplus(x) = max(x, 0) + log(1 + e^{−|x|}); the max part is a sum of
    products of i- and j-terms (exact, via prefix sums), and log(1 + y), y = e^{−|x|}, is replaced by its
    power series fit Σ_{k≤10} a_k y^k (relative error ≤ 5e-9, slope ≤ 7e-7), each y^k = e^{∓k f_i}·e^{±k f_j}
    again a product, summed with prefix/suffix sums in float64. To keep e^{±k z} finite the scores are centred
    per band of 64 score units (one band, one pass, unless a row's scores spread wider) and clamped at ±68,
    which changes only pairs more than 36 apart, by less than e^{−36} each.
    Rows are processed in chunks of about ``chunk_elements`` scores, each under activation checkpointing, so
    the memory held for the backward pass is that of one chunk.
    """
    rows = max(1, chunk_elements // max(scores.shape[1], 1))
    parts = []
    for start in range(0, scores.shape[0], rows):
        chunk = slice(start, start + rows)
        arguments = (scores[chunk], unobserved[chunk], listed[chunk], labels[chunk], valid[chunk])
        if scores.requires_grad and scores.shape[0] > rows:
            parts.append(checkpoint(_lambda_mrr_rest_rows, *arguments, use_reentrant=False))
        else:
            parts.append(_lambda_mrr_rest_rows(*arguments))
    return torch.cat(parts).to(scores.dtype)
