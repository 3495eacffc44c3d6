"""The one-topk evaluation against a per-user loop: ties, empty parts, crowded lists, top-M beyond max(ks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hetcomp.data import Split
from hetcomp.metrics import _top_values, evaluate_split


def ranked(scores: np.ndarray, excluded: set[int]) -> list[int]:
    """Every item, excluded ones scored −inf, by (score desc, index asc): the documented tie-break."""
    masked = [float("-inf") if i in excluded else float(s) for i, s in enumerate(scores)]
    return sorted(range(len(masked)), key=lambda i: (-masked[i], i))


def naive_evaluate(scores: np.ndarray, split: Split, ks, top_m):
    """Per user: mask, sort, then Recall@K / NDCG@K exactly as ``recall_ndcg`` documents them."""
    sums = {part: {f"{m}@{k}": 0.0 for k in ks for m in ("recall", "ndcg")} for part in ("valid", "test")}
    counts = {"valid": 0, "test": 0}
    rows = lambda matrix, u: set(matrix.indices[matrix.indptr[u]:matrix.indptr[u + 1]].tolist())  # noqa: E731
    for part, other in (("valid", "test"), ("test", "valid")):
        held, excluded = getattr(split, part), getattr(split, other)
        for u in range(split.n_users):
            n_relevant = held.indptr[u + 1] - held.indptr[u]
            if n_relevant == 0:
                continue
            order = ranked(scores[u], rows(split.train, u) | rows(excluded, u))
            relevant = rows(held, u)
            for k in ks:
                hits = [1.0 if i in relevant else 0.0 for i in order[:k]]
                sums[part][f"recall@{k}"] += sum(hits) / n_relevant
                dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
                sums[part][f"ndcg@{k}"] += dcg / sum(1 / math.log2(r + 2) for r in range(min(n_relevant, k)))
            counts[part] += 1
    result = {part: {key: value / max(counts[part], 1) for key, value in sums[part].items()} for part in sums}
    result["ranking"] = (None if not top_m else
                         [ranked(scores[u], rows(split.train, u))[:top_m] for u in range(split.n_users)])
    return result


def make_split(n_users: int, n_items: int, seed: int) -> Split:
    """Random parts that overlap, with users lacking valid or test items and users whose train row is nearly full."""
    rng = np.random.default_rng(seed)
    part = lambda density: sp.random(n_users, n_items, density, format="csr", random_state=rng,  # noqa: E731
                                     data_rvs=np.ones)
    train, valid, test = part(0.05), part(0.01), part(0.01)
    train = train.tolil()
    train[0, :] = 1
    train[0, [1, 3, 17]] = 0  # fewer unobserved items than any list
    train = train.tocsr()
    train.eliminate_zeros()
    valid, test = valid.tolil(), test.tolil()
    valid[1, :], test[2, :] = 0, 0
    valid[3, :], test[3, :] = 0, 0
    test[4, : n_items // 3] = 1  # crowds the validation list out of the shortcut
    valid[5, n_items // 2:] = 1
    valid, test = valid.tocsr(), test.tocsr()
    valid.eliminate_zeros()
    test.eliminate_zeros()
    ids = np.arange(max(n_users, n_items)).astype(str)
    return Split(train, valid, test, ids[:n_users], ids[:n_items])


def score_matrix(kind: str, split: Split, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    shape = (split.n_users, split.n_items)
    if kind == "normal":
        scores = rng.normal(size=shape)
        scores[4, split.test[4].indices] += 10  # the other part's items fill the top of the list
        scores[5, split.valid[5].indices] += 10
        return scores.astype(np.float32)
    if kind == "integer":
        return rng.integers(0, 4, size=shape).astype(np.float32)
    return np.zeros(shape, dtype=np.float32)


def assert_matches(fast, slow, top_m) -> None:
    for part in ("valid", "test"):
        assert fast[part].keys() == slow[part].keys()
        for key, value in slow[part].items():
            assert fast[part][key] == pytest.approx(value, abs=1e-12), (part, key)
    if top_m:
        assert fast["ranking"].dtype == torch.int32 and fast["ranking"].tolist() == slow["ranking"]
    else:
        assert fast["ranking"] is None


@pytest.mark.parametrize("kind", ["normal", "integer", "constant"])
@pytest.mark.parametrize("top_m", [None, 12, 80])
def test_evaluate_split_matches_a_per_user_loop(kind, top_m):
    split = make_split(n_users=23, n_items=1500, seed=1)
    scores = score_matrix(kind, split, seed=2)
    ks = (10, 50)
    fast = evaluate_split(lambda users: torch.from_numpy(scores)[users], split, ks=ks, top_m=top_m, batch_size=7)
    assert_matches(fast, naive_evaluate(scores, split, ks, top_m), top_m)


@pytest.mark.parametrize("n_items", [40, 60, 300])
def test_small_catalogues_and_lists_as_long_as_the_catalogue(n_items):
    split = make_split(n_users=9, n_items=n_items, seed=3)
    scores = score_matrix("integer", split, seed=4)
    for ks, top_m in (((5, 20), n_items), ((3, n_items), 7), ((n_items - 1,), None)):
        fast = evaluate_split(lambda users: torch.from_numpy(scores)[users], split, ks=ks, top_m=top_m,
                              batch_size=4)
        assert_matches(fast, naive_evaluate(scores, split, ks, top_m), top_m)


def test_score_tensors_are_left_as_the_score_function_returned_them():
    split = make_split(n_users=12, n_items=500, seed=5)
    full = torch.from_numpy(score_matrix("normal", split, seed=6))
    before = full.clone()
    view = evaluate_split(lambda users: full[users[0]:users[-1] + 1], split, top_m=20, batch_size=5)
    assert torch.equal(full, before)
    assert_matches(view, naive_evaluate(before.numpy(), split, (10, 50), 20), 20)
    constant = evaluate_split(lambda users: torch.zeros(split.n_items).expand(len(users), -1), split, top_m=20)
    assert_matches(constant, naive_evaluate(np.zeros((12, 500), np.float32), split, (10, 50), 20), 20)


@pytest.mark.parametrize("kind", ["normal", "integer", "constant"])
def test_top_values_returns_the_topk_values(kind):
    generator = torch.Generator().manual_seed(7)
    scores = torch.randn(6, 3001, generator=generator)
    if kind == "integer":
        scores = scores.mul(2).round()
    elif kind == "constant":
        scores = torch.zeros(6, 3001)
    scores[0, 100:] = float("-inf")  # fewer finite scores than k
    scores[1, ::2] = float("-inf")
    scores[2, -1] = 100.0  # the last item lies outside the strided groups
    for k in (1, 30, 90):
        values, items = _top_values(scores, k)
        assert torch.equal(values.sort(dim=1).values, torch.topk(scores, k, dim=1).values.sort(dim=1).values)
        assert torch.equal(scores.gather(1, items), values)
        assert all(len(set(row)) == k for row in items.tolist())


def test_a_list_left_exactly_max_k_long_is_recomputed():
    """17 better-scored test items leave exactly 50 of the 67 listed ones: the 51st may tie outside the list."""
    n_items = 1500
    train = sp.csr_matrix((np.ones(3), ([0, 0, 0], [7, 8, 9])), shape=(1, n_items))
    valid = sp.csr_matrix((np.ones(5), ([0] * 5, [0, 1, 2, 3, 4])), shape=(1, n_items))
    test_items = np.arange(1000, 1017)
    test = sp.csr_matrix((np.ones(17), ([0] * 17, test_items)), shape=(1, n_items))
    split = Split(train, valid, test, np.array(["0"]), np.arange(n_items).astype(str))
    scores = np.zeros((1, n_items), dtype=np.float32)
    scores[0, test_items] = 1.0
    scores[0, 1400:1440] = 0.5  # 10 places left to the zeros, where the tie-break puts the valid items 0-4
    fast = evaluate_split(lambda users: torch.from_numpy(scores)[users], split, top_m=30)
    assert_matches(fast, naive_evaluate(scores, split, (10, 50), 30), 30)
