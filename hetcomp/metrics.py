"""Recall@K and NDCG@K over full rankings, batched over users, plus NDCG between two rankings.

Ties are broken deterministically by the lower item index, on CPU and CUDA alike (see :func:`topk_items`;
the exact reference is an int64 key per item: an order-preserving integer image of the float32 score in the
high 32 bits and the reversed item index in the low 32 bits, so no two keys are equal).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp.data.errors import HetCompError

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

    Fast path: a float ``topk`` of k + 1 entries and a stable re-sort of the first k by (score desc, index asc).
    Only rows whose k-th and (k+1)-th scores are equal (a tie across the cut: rare for trained models, every
    row of a constant scorer) are recomputed with the exact integer keys of :func:`sortable_keys`.
    """
    n_items = scores.shape[-1]
    if k > n_items:
        raise HetCompError(f"K = {k} is larger than the number of items ({n_items}); choose K <= {n_items}")
    if exclude is not None:
        scores = scores.masked_fill(exclude, float("-inf"))
    values, items = torch.topk(scores, min(k + 1, n_items), dim=-1)
    if k < n_items:
        ambiguous = values[:, k] == values[:, k - 1]
        values, items = values[:, :k], items[:, :k]
    else:
        ambiguous = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    items, order = items.sort(dim=1)
    values = values.gather(1, order)
    order = values.sort(dim=1, descending=True, stable=True).indices
    items = items.gather(1, order)
    if ambiguous.any():
        rows = ambiguous.nonzero().squeeze(1)
        items[rows] = torch.topk(sortable_keys(scores[rows]), k, dim=-1).indices
    return items


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
    hits = relevant.gather(1, topk).to(torch.float64)
    n_relevant = (relevant.sum(1) if n_relevant is None else n_relevant).to(torch.float64)
    discounts = _discounts(topk.shape[1], topk.device)
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


def evaluate_split(score_fn: ScoreFn, split, ks: Sequence[int] = (10, 50), top_m: int | None = None,
                   batch_size: int = 1024, device: torch.device | str = "cpu") -> dict:
    """Validation and test metrics (and optionally every user's top-M unobserved items) from one scoring pass.

    Validation excludes train ∪ test items, test excludes train ∪ valid items (method.md); the top-M ranking
    excludes only the training items (the knowledge a teacher hands on). Returns
    ``{"valid": {...}, "test": {...}, "ranking": int32 tensor [n_users, top_m] or None}``.
    """
    k_max = max(ks)
    for k in (k_max, top_m or 0):
        if k > split.n_items:
            raise HetCompError(f"K = {k} is larger than the number of items ({split.n_items}); "
                               f"choose K <= {split.n_items}")
    sums = {part: {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")} for part in ("valid", "test")}
    counts = {"valid": 0, "test": 0}
    sizes = {part: torch.from_numpy(np.diff(getattr(split, part).indptr)) for part in ("valid", "test")}
    rankings = []
    for start in range(0, split.n_users, batch_size):
        users = np.arange(start, min(start + batch_size, split.n_users))
        with torch.no_grad():
            scores = score_fn(torch.from_numpy(users).to(device))
        if scores.shape != (len(users), split.n_items):
            raise HetCompError(f"score function returned shape {tuple(scores.shape)}, expected "
                               f"({len(users)}, {split.n_items}) = (users in batch, items)")
        scores = scores.masked_fill(csr_rows_dense(split.train, users, scores.device), float("-inf"))
        if top_m:
            rankings.append(topk_items(scores, top_m).to(torch.int32).cpu())
        held = {"valid": csr_rows_dense(split.valid, users, scores.device),
                "test": csr_rows_dense(split.test, users, scores.device)}
        for part, other in (("valid", "test"), ("test", "valid")):
            batch_sizes = sizes[part][users]
            rows = batch_sizes.nonzero().squeeze(1).to(scores.device)
            if rows.numel() == 0:
                continue
            top = topk_items(scores[rows].masked_fill_(held[other][rows], float("-inf")), k_max)
            n_relevant = batch_sizes[batch_sizes > 0].to(scores.device)
            for key, values in recall_ndcg(top, held[part][rows], ks, n_relevant).items():
                sums[part][key] += float(values.sum())
            counts[part] += rows.numel()
    result = {part: {key: value / max(counts[part], 1) for key, value in sums[part].items()} for part in sums}
    result["ranking"] = torch.cat(rankings) if rankings else None
    return result
