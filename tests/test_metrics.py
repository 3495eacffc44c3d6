"""Vectorized metrics against a naive per-user loop; tie-breaking; ranking NDCG; negative sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import random_csr

from hetcomp.data import HetCompError, Split
from hetcomp.data.sampling import NegativeSampler
from hetcomp.metrics import csr_rows_dense, evaluate_split, exclude_rows_, ranking_ndcg, topk_items


def naive_metrics(scores: np.ndarray, train, heldout, other, ks):
    """Per user: sort every non-excluded item by (score desc, index asc), then Recall / NDCG by definition."""
    sums = {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")}
    users = [u for u in range(heldout.shape[0]) if heldout[u].nnz > 0]
    for u in users:
        excluded = set(train[u].indices) | set(other[u].indices)
        candidates = [i for i in range(scores.shape[1]) if i not in excluded]
        ranked = sorted(candidates, key=lambda i: (-scores[u, i], i))
        relevant = set(heldout[u].indices)
        for k in ks:
            top = ranked[:k]
            hits = [1.0 if i in relevant else 0.0 for i in top]
            sums[f"recall@{k}"] += sum(hits) / len(relevant)
            dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
            idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(relevant), k)))
            sums[f"ndcg@{k}"] += dcg / idcg
    return {key: value / len(users) for key, value in sums.items()}


@pytest.mark.parametrize("with_ties", [False, True])
def test_evaluate_matches_naive_loop(with_ties):
    rng = np.random.default_rng(0)
    n_users, n_items = 37, 60
    train = random_csr(n_users, n_items, 0.15, 1)
    heldout = random_csr(n_users, n_items, 0.05, 2)
    other = random_csr(n_users, n_items, 0.05, 3)
    heldout = heldout - heldout.multiply(train) - heldout.multiply(other)
    other = other - other.multiply(train)
    heldout.eliminate_zeros()
    other.eliminate_zeros()
    scores = rng.normal(size=(n_users, n_items)).astype(np.float32)
    if with_ties:
        scores = np.round(scores * 2) / 2  # many equal scores
    ks = (3, 10, 50)  # some users have more held-out items than 3, most have fewer than 10
    score_fn = lambda users: torch.from_numpy(scores)[users]  # noqa: E731
    split = Split(train, heldout.tocsr(), other.tocsr(), np.arange(n_users).astype(str), np.arange(n_items).astype(str))
    fast = evaluate_split(score_fn, split, ks=ks, top_m=12, batch_size=8)
    for part, held, excluded in (("valid", heldout, other), ("test", other, heldout)):
        slow = naive_metrics(scores, train, held, excluded, ks)
        for key in slow:
            assert fast[part][key] == pytest.approx(slow[key], abs=1e-9), (part, key)
    for user in range(n_users):  # the top-M ranking excludes exactly the training items
        candidates = [i for i in range(n_items) if i not in set(train[user].indices)]
        assert fast["ranking"][user].tolist() == sorted(candidates, key=lambda i: (-scores[user, i], i))[:12]


def test_topk_breaks_ties_by_lower_index_and_masks():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [0.0] * 6])
    exclude = torch.tensor([[False, False, True, False, False, False], [False] * 6])
    top = topk_items(scores, 4, exclude)
    assert top[0].tolist() == [1, 4, 5, 0]
    assert top[1].tolist() == [0, 1, 2, 3]
    with pytest.raises(HetCompError, match="larger than the number of items"):
        topk_items(scores, 7)


def test_ranking_ndcg_matches_definition():
    ideal = torch.tensor([[5, 2, 9, 1]])
    gains = torch.tensor([4.0, 3.0, 2.0, 1.0])
    identical = ranking_ndcg(ideal, ideal, gains)
    assert identical.item() == pytest.approx(1.0)
    swapped = torch.tensor([[2, 5, 7, 1]])
    dcg = 3 / math.log2(2) + 4 / math.log2(3) + 0 + 1 / math.log2(5)
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate([4, 3, 2, 1]))
    assert ranking_ndcg(swapped, ideal, gains).item() == pytest.approx(dcg / idcg)
    disjoint = torch.tensor([[11, 12, 13, 14]])
    assert ranking_ndcg(disjoint, ideal, gains).item() == 0.0


def test_negative_sampler_excludes_observed_items():
    train = random_csr(50, 30, 0.6, 0)
    sampler = NegativeSampler(train)
    users = torch.arange(50).repeat(40)
    negatives = sampler.sample(users, n_negatives=3, generator=torch.Generator().manual_seed(0))
    assert negatives.shape == (2000, 3)
    dense = torch.from_numpy(train.toarray() > 0)
    assert not dense[users.unsqueeze(1).expand(-1, 3), negatives].any()
    again = sampler.sample(users, n_negatives=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(negatives, again)


def test_exclude_rows_in_place_matches_the_dense_mask():
    matrix = sp.random(6, 9, density=0.3, format="csr", random_state=3)
    rows = np.array([4, 1, 5])
    scores = torch.randn(3, 9, generator=torch.Generator().manual_seed(0))
    expected = scores.masked_fill(csr_rows_dense(matrix, rows), float("-inf"))
    out = exclude_rows_(scores, matrix, rows)
    assert out is scores and torch.equal(scores, expected)


@pytest.mark.parametrize("levels", [None, 40])
def test_topk_items_on_wide_rows_matches_the_exact_keys(levels):
    """Wide rows take the grouped top-k; with ties (quantized scores) and excluded items it must still equal the
    exact integer-key ranking, best first."""
    from hetcomp.metrics import _exact_topk

    generator = torch.Generator().manual_seed(3)
    scores = torch.randn(64, 3000, generator=generator)
    if levels is not None:
        scores = (scores * levels).round() / levels
    exclude = torch.rand(64, 3000, generator=generator) < 0.05
    fast = topk_items(scores, 50, exclude)
    assert torch.equal(fast, _exact_topk(scores.masked_fill(exclude, float("-inf")), 50))
