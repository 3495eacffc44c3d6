"""Recall@K and NDCG@K over full rankings, batched over users, plus NDCG between two rankings.

Ties are broken deterministically by the lower item index, on CPU and CUDA alike (see :func:`topk_items`;
the exact reference is an int64 key per item: an order-preserving integer image of the float32 score in the
high 32 bits and the reversed item index in the low 32 bits, so no two keys are equal).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp.data.sampling import contains_keys, sorted_pair_keys
from hetcomp.errors import HetCompError

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def sortable_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys that order like (score descending, item index ascending) under a descending sort."""
    bits = (scores.to(torch.float32) + 0.0).contiguous().view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    n_items = scores.shape[-1]
    index_part = (n_items - 1) - torch.arange(n_items, device=scores.device, dtype=torch.int64)
    return ordered.to(torch.int64) * (1 << 32) + index_part


def topk_items(scores: torch.Tensor, k: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the k best items per row, best first; ``exclude`` (bool, same shape) are ranked last.

    Fast path: the k + 1 best scores by the grouped top-k of :func:`_top_values`, sorted, and a stable re-sort of
    the first k by (score desc, index asc). Only rows whose k-th and (k+1)-th scores are equal (a tie across the
    cut: rare for trained models, every row of a constant scorer) are recomputed with the exact integer keys of
    :func:`sortable_keys`; elsewhere the top-k set is unique, so the grouping cannot change it.
    """
    n_items = scores.shape[-1]
    if k > n_items:
        raise HetCompError(f"K = {k} is larger than the number of items ({n_items}); choose K <= {n_items}")
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    values, items = _top_values(scores, min(k + 1, n_items))
    values, order = values.sort(dim=-1, descending=True)
    items = items.gather(-1, order)
    if k < n_items:
        ambiguous = values[:, k] == values[:, k - 1]
        values, items = values[:, :k], items[:, :k]
    else:
        ambiguous = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    items = _canonical_order(values, items)[1]
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        items[rows] = _exact_topk(scores[rows], k)
    return items


def _exact_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best items per row by the exact integer keys: the reference that every fast path must match."""
    return torch.topk(sortable_keys(scores), k, dim=-1).indices


def _canonical_order(values: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, items) of a top-k list re-sorted by (value desc, index asc): ``topk`` leaves ties unordered."""
    items, order = items.sort(dim=1)
    values = values.gather(1, order)
    order = values.sort(dim=1, descending=True, stable=True).indices
    return values.gather(1, order), items.gather(1, order)


def _row_nonzeros(matrix: sp.csr_matrix, rows: np.ndarray,
                  device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions in ``rows``, column ids) of the nonzeros of the given CSR rows, as index tensors."""
    sub = matrix[rows]
    row_index = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
    return torch.from_numpy(row_index).to(device), torch.from_numpy(sub.indices.astype(np.int64)).to(device)


def csr_rows_dense(matrix: sp.csr_matrix, rows: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense bool tensor [len(rows), n_cols] of the given CSR rows, built with one scatter."""
    out = torch.zeros((len(rows), matrix.shape[1]), dtype=torch.bool, device=device)
    out[_row_nonzeros(matrix, rows, device)] = True
    return out


def exclude_rows_(scores: torch.Tensor, matrix: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor:
    """Set ``scores`` [len(rows), n_cols] to −inf, in place, at the nonzeros of the given CSR rows.

    For scores the caller owns (a fresh model output): one sparse write instead of building a dense
    [B, n_cols] mask and copying the scores through ``masked_fill``.
    """
    return scores.index_put_(_row_nonzeros(matrix, rows, scores.device),
                             torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))


def _discounts(k: int, device: torch.device) -> torch.Tensor:
    return 1.0 / torch.log2(torch.arange(2, k + 2, device=device, dtype=torch.float64))


def recall_ndcg(topk: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int],
                n_relevant: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-user Recall@K and NDCG@K from a top-k ranking [B, >=max(ks)] and a dense relevance mask [B, n_items].

    Recall@K = hits / |R_u|; NDCG@K uses gain 1, discount 1/log2(rank+1) and IDCG over min(|R_u|, K) items.
    Users with no relevant item get NaN (callers evaluate only users that have some). ``n_relevant`` (the
    row counts, when the caller knows them) saves a pass over the dense mask.
    """
    n_relevant = relevant.sum(1) if n_relevant is None else n_relevant
    return _recall_ndcg_from_hits(relevant.gather(1, topk), n_relevant, ks)


def _recall_ndcg_from_hits(hits: torch.Tensor, n_relevant: torch.Tensor,
                           ks: Sequence[int]) -> dict[str, torch.Tensor]:
    """:func:`recall_ndcg` from the hits [B, >=max(ks)] of the ranking (whether each entry is relevant)."""
    hits = hits.to(torch.float64)
    n_relevant = n_relevant.to(torch.float64)
    discounts = _discounts(hits.shape[1], hits.device)
    ideal_cumulative = torch.cumsum(discounts, 0)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        out[f"recall@{k}"] = hits[:, :k].sum(1) / n_relevant
        dcg = (hits[:, :k] * discounts[:k]).sum(1)
        ideal_count = n_relevant.clamp(max=k).to(torch.int64).clamp(min=1)
        out[f"ndcg@{k}"] = dcg / ideal_cumulative[ideal_count - 1]
    return out


def positions_in(items: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each entry of ``items`` [B, L]: is it in its row of ``reference`` [B, L'] (no repeats), and where.

    Sort-and-search per row, O(B · L · log L') instead of an [B, L, L'] comparison. Returns (found, position);
    position is meaningless where not found.
    """
    ordered, order = reference.sort(dim=1)
    slot = torch.searchsorted(ordered, items.contiguous()).clamp(max=reference.shape[1] - 1)
    found = ordered.gather(1, slot) == items
    return found, order.gather(1, slot)


def ranking_ndcg(ranking: torch.Tensor, ideal: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """NDCG of ``ranking`` [B, K] against ``ideal`` [B, K'] taken as the perfect order.

    An item at position r of ``ideal`` has gain ``gains[r]`` (non-increasing in r); items absent from
    ``ideal`` have gain 0. DCG discounts by 1/log2(position+2) in ``ranking``; IDCG is the DCG of ``ideal``
    itself over the first K positions. Returns NDCG per row.
    """
    k = ranking.shape[1]
    found, position_in_ideal = positions_in(ranking, ideal)
    gain = torch.where(found, gains.to(torch.float64)[position_in_ideal], torch.zeros((), dtype=torch.float64,
                                                                                        device=ranking.device))
    discounts = _discounts(max(k, ideal.shape[1]), ranking.device)
    dcg = (gain * discounts[:k]).sum(1)
    idcg = (gains.to(torch.float64)[: min(k, ideal.shape[1])] * discounts[: min(k, ideal.shape[1])]).sum()
    return dcg / idcg


def _top_values(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1, sorted=False)`` for wide rows: the same values, any of equally scored items.

    Item i falls in group i mod G (G ≈ sqrt(k · n_items); the last n_items mod G items stay aside). The k groups
    with the highest maxima hold every score above the k-th of those maxima and k scores at least equal to it,
    so the k best scores lie in their union with the items set aside: one ``amax`` pass and two ``topk`` over
    ~sqrt(k · n_items) entries instead of one over n_items (1,024 CiteULike users, k = 67: 44 against 58 ms).
    """
    n_items = scores.shape[1]
    group_size = max(1, round(math.sqrt(n_items / k)))
    n_groups = n_items // group_size
    if group_size < 4 or n_groups <= k:
        return torch.topk(scores, k, dim=1, sorted=False)
    body = n_groups * group_size
    best_groups = torch.topk(scores[:, :body].unflatten(1, (group_size, n_groups)).amax(1), k, dim=1,
                             sorted=False).indices
    offsets = torch.arange(0, body, n_groups, device=scores.device)
    candidates = (best_groups.unsqueeze(2) + offsets).flatten(1)
    if body < n_items:
        rest = torch.arange(body, n_items, device=scores.device).expand(len(scores), -1)
        candidates = torch.cat([candidates, rest], dim=1)
    values, where = torch.topk(scores.gather(1, candidates), k, dim=1, sorted=False)
    return values, candidates.gather(1, where)


#: list entries per row beyond max(ks) + 1, for the other part's held-out items that a part drops from it
_HELD_OUT_MARGIN = 16


def evaluate_split(score_fn: ScoreFn, split, ks: Sequence[int] = (10, 50), top_m: int | None = None,
                   batch_size: int = 256, device: torch.device | str = "cpu") -> dict:
    """Validation and test metrics (and optionally every user's top-M unobserved items) from one scoring pass.

    Validation excludes train ∪ test items, test excludes train ∪ valid items (method.md); the top-M ranking
    excludes only the training items (the knowledge a teacher hands on). Returns
    ``{"valid": {...}, "test": {...}, "ranking": int32 tensor [n_users, top_m] or None}``.

    One ``topk`` per batch serves all three, as it dominates the cost: a list of the best items apart from the
    training ones, put in (score desc, index asc) order; the ranking is its head, and each part's top-K is the
    head of what remains once the other part's held-out items are dropped. Rows that the list does not decide
    (a tie across the cut, or fewer than K + 1 entries left) are recomputed as before, so results are exact.
    """
    k_max = max(ks)
    for k in (k_max, top_m or 0):
        if k > split.n_items:
            raise HetCompError(f"K = {k} is larger than the number of items ({split.n_items}); "
                               f"choose K <= {split.n_items}")
    sums = {part: {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")} for part in ("valid", "test")}
    counts = {"valid": 0, "test": 0}
    sizes = {part: torch.from_numpy(np.diff(getattr(split, part).indptr)) for part in ("valid", "test")}
    keys = {part: sorted_pair_keys(getattr(split, part), device) for part in ("valid", "test")}
    rankings = []
    for start in range(0, split.n_users, batch_size):
        users = np.arange(start, min(start + batch_size, split.n_users))
        with torch.no_grad():
            scores = score_fn(torch.from_numpy(users).to(device))
            if scores.shape != (len(users), split.n_items):
                raise HetCompError(f"score function returned shape {tuple(scores.shape)}, expected "
                                   f"({len(users)}, {split.n_items}) = (users in batch, items)")
            ranking = _evaluate_batch(scores.contiguous(), split, users, ks, top_m, keys, sizes, sums, counts)
        if ranking is not None:
            rankings.append(ranking)
    result = {part: {key: value / max(counts[part], 1) for key, value in sums[part].items()} for part in sums}
    result["ranking"] = torch.cat(rankings) if rankings else None
    return result


def _evaluate_batch(scores: torch.Tensor, split, users: np.ndarray, ks: Sequence[int], top_m: int | None,
                    keys: dict[str, torch.Tensor], sizes: dict[str, torch.Tensor], sums: dict,
                    counts: dict[str, int]) -> torch.Tensor | None:
    """Adds one batch's metric sums to ``sums`` / ``counts``; returns its int32 CPU ranking (or None).

    The training items are set to −inf in ``scores`` in place and restored at the end, so a score function may
    return a view of its own data.
    """
    n_items = scores.shape[1]
    k_max = max(ks)
    train_at = _row_nonzeros(split.train, users, scores.device)
    saved = scores[train_at]
    scores.index_put_(train_at, torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device))
    try:
        most_held_out = max(int(sizes[part][users].max()) for part in sizes)
        length = min(n_items, max(k_max + 1 + min(most_held_out, _HELD_OUT_MARGIN), (top_m or 0) + 1))
        values, items = _canonical_order(*_top_values(scores, length))
        user_index = torch.from_numpy(users).to(scores.device).unsqueeze(1)
        keys = {part: part_keys.to(scores.device) for part, part_keys in keys.items()}
        member = {part: contains_keys(keys[part], user_index * n_items + items) for part in keys}
        ranking = None
        if top_m:
            ranking = items[:, :top_m].clone()
            if top_m < length:
                tied = (values[:, top_m] == values[:, top_m - 1]).nonzero().squeeze(1)
                if tied.numel():
                    ranking[tied] = _exact_topk(scores[tied], top_m)
            ranking = ranking.to(torch.int32).cpu()
        for part, other in (("valid", "test"), ("test", "valid")):
            batch_sizes = sizes[part][users]
            rows = batch_sizes.nonzero().squeeze(1).to(scores.device)
            if rows.numel() == 0:
                continue
            hits = torch.zeros((rows.numel(), k_max), dtype=torch.bool, device=scores.device)
            decided = torch.zeros(rows.numel(), dtype=torch.bool, device=scores.device)
            if k_max < length:
                dropped = member[other][rows]
                kept = dropped.to(torch.uint8).sort(dim=1, stable=True).indices[:, :k_max + 1]
                head = values[rows].gather(1, kept)
                decided = ((~dropped).sum(1) > k_max) & (head[:, k_max] != head[:, k_max - 1])
                hits = member[part][rows].gather(1, kept[:, :k_max])
            undecided = (~decided).nonzero().squeeze(1)
            if undecided.numel():
                redo = rows[undecided]
                redo_users = users[redo.cpu().numpy()]
                top = topk_items(exclude_rows_(scores[redo], getattr(split, other), redo_users), k_max)
                hits[undecided] = contains_keys(keys[part], user_index[redo] * n_items + top)
            n_relevant = batch_sizes[batch_sizes > 0].to(scores.device)
            for key, metric in _recall_ndcg_from_hits(hits, n_relevant, ks).items():
                sums[part][key] += float(metric.sum())
            counts[part] += rows.numel()
        return ranking
    finally:
        scores.index_put_(train_at, saved)
