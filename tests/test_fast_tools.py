"""The batched ranking and sampling tools: exact ranks with ties and ±inf (no dense mask), and rejection sampling of
unobserved items (uniform, without replacement) against the dense reference paths."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from hetcomp.data.sampling import NegativeSampler
from hetcomp.distill import tools
from hetcomp.distill.tools import sample_unobserved
from hetcomp.metrics import csr_rows_dense


def reference_ranks(scores: torch.Tensor, unobserved: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """A plain reference: one numpy sort per whole row and a ``searchsorted``."""
    masked = scores.detach().masked_fill(~unobserved, float("-inf"))
    ordered = torch.from_numpy(np.sort(masked.contiguous().numpy(), axis=1))
    own = scores.detach().gather(1, items).contiguous()
    not_higher = torch.searchsorted(ordered, own, right=True)
    return scores.shape[1] - not_higher


def _tied_case(seed: int, batch: int, n_items: int, length: int, dtype: torch.dtype):
    """Integer-valued scores (many ties) with ±inf entries, random observed items, and listed items that may be
    observed or repeated."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(-4, 5, size=(batch, n_items)).astype(np.float64)
    scores[rng.random((batch, n_items)) < 0.05] = -np.inf
    scores[rng.random((batch, n_items)) < 0.02] = np.inf
    unobserved = rng.random((batch, n_items)) < 0.7
    unobserved[0] = False  # a row with every item observed
    items = rng.integers(0, n_items, size=(batch, length))
    return (torch.from_numpy(scores).to(dtype), torch.from_numpy(unobserved), torch.from_numpy(items))


def _padded_observed(unobserved: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's observed items as padded lists (-1 padding), reversed so that no order is assumed: (items, valid)."""
    rows = [torch.nonzero(~row).flatten().flip(0) for row in unobserved]
    width = max(1, max(len(r) for r in rows))
    items = torch.full((len(rows), width), -1, dtype=torch.int64)
    for index, row in enumerate(rows):
        items[index, :len(row)] = row
    return items, items >= 0


@pytest.mark.parametrize("seed,batch,n_items,length", [(0, 6, 30, 5), (1, 9, 50, 50), (2, 4, 17, 40), (3, 3, 200, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ranks_are_identical_to_the_whole_row_sort(seed, batch, n_items, length, dtype):
    scores, unobserved, items = _tied_case(seed, batch, n_items, length, dtype)
    expected = reference_ranks(scores, unobserved, items)
    got = tools.ranks_outside(scores, items, *_padded_observed(unobserved))
    assert got.dtype == torch.int64 and torch.equal(got, expected)
    assert (expected[0] == 0).all()


@pytest.mark.parametrize("seed,batch,n_items,length", [(0, 6, 30, 5), (1, 9, 50, 50), (3, 3, 200, 1)])
@pytest.mark.parametrize("cap", [0, 1, 3, 10, 150, 10_000])
def test_capped_ranks_are_exact_below_the_cap_and_at_least_it_above(seed, batch, n_items, length, cap):
    scores, unobserved, items = _tied_case(seed, batch, n_items, length, torch.float32)
    expected = reference_ranks(scores, unobserved, items)
    got = tools.ranks_outside(scores, items, *_padded_observed(unobserved), cap=cap)
    assert torch.equal(got.clamp(max=cap), expected.clamp(max=cap))


@pytest.mark.parametrize("mu", [0.005, 0.03, 0.3, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rd_weights_from_capped_ranks_are_bit_identical(mu, dtype):
    """RD's dynamic weights saturate (tanh = 1.0 exactly), so capping the ranks there changes no bit of them."""
    from hetcomp.distill.rd import dynamic_weights, position_weights, saturating_rank

    rng = np.random.default_rng(7)
    k, n_items = 7, 5_000
    scores = torch.from_numpy(rng.normal(size=(16, n_items)) * 3).to(dtype)
    unobserved = torch.from_numpy(rng.random((16, n_items)) < 0.9)
    items = torch.stack([torch.from_numpy(rng.choice(np.flatnonzero(row.numpy()), k, replace=False))
                         for row in unobserved])
    items[:, :3] = scores.masked_fill(~unobserved, float("-inf")).topk(3, dim=1).indices  # some near the top
    observed = _padded_observed(unobserved)
    exact = tools.ranks_outside(scores, items, *observed)
    capped = tools.ranks_outside(scores, items, *observed, cap=saturating_rank(k, mu))
    position = position_weights(k, 2.0).to(dtype)
    teacher = torch.arange(k)
    assert not torch.equal(exact, capped)  # the cap is really used (ranks run to ~4,500)
    assert torch.equal(dynamic_weights(position, capped, teacher, mu), dynamic_weights(position, exact, teacher, mu))


def test_ranks_ignore_gradients_and_match_naive_counts():
    scores, unobserved, items = _tied_case(4, 5, 25, 8, torch.float32)
    scores.requires_grad_(True)
    got = tools.ranks_outside(scores, items, *_padded_observed(unobserved))
    for row in range(5):
        for position, item in enumerate(items[row].tolist()):
            naive = sum(1 for j in range(25) if unobserved[row, j] and scores[row, j] > scores[row, item])
            assert got[row, position].item() == naive


# ---- sampling of unobserved items -------------------------------------------------------------------------

def _sampler(observed: list[list[int]], n_items: int) -> tuple[sp.csr_matrix, NegativeSampler]:
    rows = [u for u, items in enumerate(observed) for _ in items]
    cols = [i for items in observed for i in items]
    train = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(observed), n_items))
    return train, NegativeSampler(train)


def _random_catalogue(seed: int, n_users: int, n_items: int, per_user: int, head: int):
    rng = np.random.default_rng(seed)
    observed = [sorted(rng.choice(n_items, per_user, replace=False).tolist()) for _ in range(n_users)]
    train, sampler = _sampler(observed, n_items)
    excluded = torch.stack([torch.from_numpy(rng.choice(np.setdiff1d(np.arange(n_items), row), head, replace=False))
                            for row in observed])
    return observed, train, sampler, excluded


def _check_draws(items, valid, users, observed, excluded, expected_counts):
    assert valid.sum(1).tolist() == expected_counts
    for row, user in enumerate(users.tolist()):
        drawn = items[row][valid[row]].tolist()
        assert len(set(drawn)) == len(drawn)
        assert not set(drawn) & set(observed[user])
        if excluded is not None:
            assert not set(drawn) & set(excluded[row].tolist())


def test_sample_unobserved_returns_n_distinct_allowed_items():
    observed, _, sampler, head = _random_catalogue(0, 30, 300, 25, 40)
    users = torch.tensor([3, 0, 29, 3, 17])
    items, valid = sample_unobserved(sampler, users, 60, head[users], torch.Generator().manual_seed(1))
    assert items.shape == (5, 60) and items.dtype == torch.int64
    _check_draws(items, valid, users, observed, head[users], [60] * 5)
    items, valid = sample_unobserved(sampler, users, 60, None, torch.Generator().manual_seed(1))
    _check_draws(items, valid, users, observed, None, [60] * 5)
    repeated = torch.cat([head[users], head[users][:, :7], torch.tensor([[observed[u][0]] for u in users.tolist()])], 1)
    items, valid = sample_unobserved(sampler, users, 60, repeated, torch.Generator().manual_seed(2))
    _check_draws(items, valid, users, observed, repeated, [60] * 5)
    empty, empty_valid = sample_unobserved(sampler, users, 0, head[users])
    assert empty.shape == empty_valid.shape == (5, 0)


def test_sample_unobserved_draws_the_same_with_the_dense_or_the_searched_exclusion(monkeypatch):
    """The excluded items' dense membership table (small key ranges) and the binary search among their sorted keys
    (wide ranges) answer alike, so a seed draws the same items whichever one a batch gets."""
    observed, _, sampler, head = _random_catalogue(4, 30, 300, 25, 40)
    users = torch.tensor([3, 0, 29, 3, 17, 8])
    repeated = torch.cat([head[users], head[users][:, :9]], 1)
    dense = sample_unobserved(sampler, users, 50, repeated, torch.Generator().manual_seed(3))
    lookups = _counted(monkeypatch, tools, "contains_keys")
    monkeypatch.setattr(tools, "DENSE_MEMBERSHIP_LIMIT", 0)
    searched = sample_unobserved(sampler, users, 50, repeated, torch.Generator().manual_seed(3))
    assert lookups and torch.equal(dense[0], searched[0]) and torch.equal(dense[1], searched[1])
    _check_draws(*searched, users, observed, repeated, [50] * 6)


def test_sample_unobserved_is_deterministic_for_a_seed():
    _, _, sampler, head = _random_catalogue(1, 20, 500, 30, 50)
    users = torch.arange(20)
    first = sample_unobserved(sampler, users, 40, head, torch.Generator().manual_seed(7))
    again = sample_unobserved(sampler, users, 40, head, torch.Generator().manual_seed(7))
    other = sample_unobserved(sampler, users, 40, head, torch.Generator().manual_seed(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_sample_unobserved_falls_back_to_the_dense_path_on_tiny_catalogues():
    observed = [[0, 1, 2, 3], [0], [5, 6, 7]]
    _, sampler = _sampler(observed, 10)
    users = torch.tensor([0, 1, 2, 0])
    excluded = torch.tensor([[4, 5], [4, 4], [8, 9], [9, 3]])  # repeats and an observed item are fine
    items, valid = sample_unobserved(sampler, users, 4, excluded, torch.Generator().manual_seed(0))
    _check_draws(items, valid, users, observed, excluded, [4, 4, 4, 4])
    items, valid = sample_unobserved(sampler, users, 20, excluded, torch.Generator().manual_seed(0))
    assert items.shape == (4, 10)  # the dense path draws at most one per column
    _check_draws(items, valid, users, observed, excluded, [4, 8, 5, 5])


def _counted(patch, owner, name: str) -> list:
    """The arguments of every call of ``owner.name`` while ``patch`` (a monkeypatch context) holds."""
    calls, function = [], getattr(owner, name)
    patch.setattr(owner, name, lambda *args, **kwargs: calls.append(args) or function(*args, **kwargs))
    return calls


def test_sample_unobserved_lockstep_gives_each_request_what_it_would_draw_alone(monkeypatch):
    """Stacked seeds draw their replicas' unobserved items in lockstep: each request (its users, excluded items and
    generator) gets exactly its draws alone, with requests of other sizes, excluded widths (or none), rejection
    rounds of other widths, an empty request and one that takes the dense path; the look-ups run once a round."""
    observed, _, sampler, head = _random_catalogue(3, 40, 200, 60, 30)
    crowded = [list(range(150)), *observed[1:]]  # user 0 allows few items: more rounds and wider draws
    _, sampler = _sampler(crowded, 200)
    requests = [(torch.tensor([0, 5, 9, 0]), head[[0, 5, 9, 0]], 11),
                (torch.tensor([7, 3]), None, 12),
                (torch.tensor([12, 0, 1, 2, 3, 30]), head[[12, 0, 1, 2, 3, 30], :10], 13),
                (torch.tensor([], dtype=torch.int64), head[:0], 14)]
    for n in (20, 45):  # 45: user 0 allows 50 - 30 excluded items < 2n, so the first and third take the dense path
        alone = [sample_unobserved(sampler, users, n, excluded, torch.Generator().manual_seed(seed))
                 for users, excluded, seed in requests]
        with monkeypatch.context() as patch:
            draws, rounds = _counted(patch, torch, "randint"), _counted(patch, tools, "_first_occurrences")
            together = tools.sample_unobserved_lockstep(
                sampler, [users for users, _, _ in requests], n, [excluded for _, excluded, _ in requests],
                [torch.Generator().manual_seed(seed) for _, _, seed in requests])
        for (items, valid), (items_alone, valid_alone) in zip(together, alone, strict=True):
            assert torch.equal(items, items_alone) and torch.equal(valid, valid_alone)
        if n == 20:  # three requests' rounds of different widths, padded together: one look-up per round
            assert len({args[1][1] for args in draws}) > 1 and len(rounds) < len(draws)


def test_observed_rows_from_the_sampler_keys_match_the_training_matrix():
    _, train, sampler, _ = _random_catalogue(2, 15, 40, 7, 3)
    users = torch.tensor([14, 0, 3, 3])
    assert torch.equal(tools._observed_dense(sampler, users), csr_rows_dense(train, users.numpy()))


def test_first_occurrences_keep_the_leftmost_of_each_value_per_row():
    values = torch.randint(0, 6, (7, 15), generator=torch.Generator().manual_seed(0))
    first = tools._first_occurrences(values, 6)
    for row in range(7):
        seen = set()
        for column, value in enumerate(values[row].tolist()):
            assert first[row, column].item() == (value not in seen)
            seen.add(value)


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / counts.size
    return float(((counts - expected) ** 2 / expected).sum())


def test_sample_unobserved_is_uniform_without_replacement(monkeypatch):
    # 100 items, 78 observed, 2 excluded: 20 allowed, n = 10 rejects most draws, so some rows need more rounds
    observed = [list(range(78))]
    _, sampler = _sampler(observed, 100)
    rounds = []
    randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *args, **kwargs: rounds.append(args) or randint(*args, **kwargs))
    n_rows = 20000
    users = torch.zeros(n_rows, dtype=torch.int64)
    excluded = torch.tensor([[78, 79]]).expand(n_rows, -1)
    items, valid = sample_unobserved(sampler, users, 10, excluded, torch.Generator().manual_seed(3))
    assert len(rounds) >= 2 and valid.all()
    assert ((items >= 80) & (items < 100)).all()
    assert (items.sort(dim=1).values.diff(dim=1) > 0).all()
    allowed = 20
    # every allowed item equally often in every position (first and last drawn), and overall
    for column in (items[:, 0], items[:, -1], items.reshape(-1)):
        counts = np.bincount(column.numpy() - 80, minlength=allowed)
        assert _chi_square(counts) < 19 + 6 * np.sqrt(2 * 19)  # df = 19; mean 19, sd ≈ 6.2
    # ordered pairs of the first two draws: all 380 equally likely
    pairs = (items[:, 0] - 80) * allowed + (items[:, 1] - 80)
    counts = np.bincount(pairs.numpy(), minlength=allowed * allowed)
    off_diagonal = np.array([counts[a * allowed + b] for a, b in itertools.permutations(range(allowed), 2)])
    assert counts.sum() == off_diagonal.sum()
    assert _chi_square(off_diagonal) < 379 + 6 * np.sqrt(2 * 379)


def test_key_bitmap_answers_as_the_sorted_keys_search_and_the_sampler_draws_the_same_items():
    """The bitmap membership (the sampler's fast path) against ``searchsorted`` on the sorted keys: the same answer
    for present, absent and out-of-range keys (padding −1 included), and the same negatives for the same seed
    whichever path the sampler takes (a bitmap over the limit falls back to the search)."""
    from hetcomp.data.sampling import KeyBitmap, contains_keys

    rng = np.random.default_rng(7)
    observed = [sorted(rng.choice(53, int(rng.integers(1, 40)), replace=False).tolist()) for _ in range(37)]
    train, fast = _sampler(observed, 53)
    assert fast.observed_bitmap is not None
    n_keys = train.shape[0] * train.shape[1]
    keys = torch.cat([fast.observed_keys, torch.arange(-9, n_keys + 9), torch.tensor([-1, n_keys, 2**40])])
    assert torch.equal(fast.observed_bitmap.contains(keys), contains_keys(fast.observed_keys, keys))
    assert KeyBitmap.build(fast.observed_keys, n_keys, limit=(n_keys + 7) // 8 - 1) is None

    slow = NegativeSampler(train)
    slow.observed_bitmap = None  # the searchsorted path
    users = torch.from_numpy(rng.integers(0, 37, 500))
    draws = [sampler.sample(users, 4, torch.Generator().manual_seed(3)) for sampler in (fast, slow)]
    assert torch.equal(draws[0], draws[1])
    assert not fast.is_observed(users.repeat_interleave(4), draws[0].view(-1)).any()


def test_bench_full_tail_floor_computes_the_log_sum_exp_gradient():
    """The floor bench times is the real work of a full-tail loss: its gradients are autograd's of Σ_u log Σ_i e^s."""
    from hetcomp.bench import full_tail_floor

    grad_users, grad_items = full_tail_floor(10, 30, dim=4, batch_users=4)
    generator = torch.Generator().manual_seed(0)
    users = (torch.randn(10, 4, generator=generator) * 0.1).requires_grad_()
    items = (torch.randn(30, 4, generator=generator) * 0.1).requires_grad_()
    torch.logsumexp(users[8:] @ items.T, dim=1).sum().backward()
    assert torch.allclose(grad_users, users.grad[8:], atol=1e-6) and torch.allclose(grad_items, items.grad, atol=1e-6)
