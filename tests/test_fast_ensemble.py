"""HetComp's hot paths against their straightforward versions: the candidate-only top-k of g (the dynamic
top-K) against dense scores, and the DKC check's lookup-table positions against sorting."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import make_tiny_split, random_csr

from hetcomp.distill import DistillContext
from hetcomp.distill.base import EnsembleConfig
from hetcomp.distill.knowledge import DKCConfig, DynamicKnowledge, discrepancy, discrepancy_gains, list_positions
from hetcomp.ensemble import EnsembleScorer, aggregate_scores, candidate_topk, rank_importance
from hetcomp.metrics import positions_in, ranking_ndcg, topk_items
from hetcomp.trajectory import Trajectory


def random_trajectories(n_users: int, n_items: int, top_ms: list[int], n_states: int, seed: int,
                        pool: int | None = None, exclude: sp.csr_matrix | None = None) -> list[Trajectory]:
    """Random rankings (distinct items per list) drawn from the first ``pool`` items, avoiding ``exclude``."""
    rng = np.random.default_rng(seed)
    pool = pool or n_items
    out = []
    for top_m in top_ms:
        states = np.zeros((n_states, n_users, top_m), dtype=np.int32)
        for user in range(n_users):
            banned = set() if exclude is None else set(exclude.indices[exclude.indptr[user]:exclude.indptr[user + 1]])
            allowed = np.array([item for item in range(pool) if item not in banned])
            for state in range(n_states):
                states[state, user] = rng.permutation(allowed)[:top_m]
        out.append(Trajectory(torch.from_numpy(states), np.zeros(0, np.int32), np.zeros(n_users + 1, np.int64),
                              {"n_items": n_items}))
    return out


def dense_reference(trajectories: list[Trajectory], state_of: int | torch.Tensor, exclude: sp.csr_matrix, k: int,
                    importance: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Dense scores summed teacher by teacher, −inf at the excluded items, then ``topk_items``."""
    n_users, n_items = exclude.shape
    top_m = min(t.top_m for t in trajectories)
    users = torch.arange(n_users)
    scores = torch.zeros(n_users, n_items)
    for index, trajectory in enumerate(trajectories):
        state = torch.full((n_users,), state_of) if isinstance(state_of, int) else state_of[index].long()
        ranking = trajectory.states[state, users, :top_m].long()
        contribution = importance[:top_m] if weights is None else importance[:top_m] * weights[index]
        scores.scatter_add_(1, ranking, contribution.expand(n_users, top_m).contiguous())
    rows, items = exclude.nonzero()
    scores[torch.from_numpy(rows).long(), torch.from_numpy(items).long()] = float("-inf")
    return topk_items(scores, k)


def per_user_states(n_teachers: int, n_users: int, n_states: int, seed: int) -> torch.Tensor:
    return torch.randint(0, n_states, (n_teachers, n_users), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("decay", ["exp", "power"])
@pytest.mark.parametrize("weights", [None, [1.3, 0.7, 1.0]])
@pytest.mark.parametrize("per_user", [False, True])
def test_topk_equals_dense_topk(decay, weights, per_user):
    n_users, n_items, k = 40, 120, 15
    exclude = random_csr(n_users, n_items, 0.1, seed=1)
    # a small pool: teachers share many items, and with uniform weights equal ranks give equal scores
    trajectories = random_trajectories(n_users, n_items, [12, 10, 14], 3, seed=2, pool=40, exclude=exclude)
    state_of = per_user_states(3, n_users, 3, seed=3) if per_user else -1
    weights = None if weights is None else torch.tensor(weights)
    scorer = EnsembleScorer(trajectories, state_of, decay, temperature=5.0, beta=0.3, weights=weights)
    expected = dense_reference(trajectories, state_of, exclude, k, scorer.importance, weights)
    assert torch.equal(scorer.topk(k, exclude, batch_size=7), expected)


def test_ties_across_teachers_are_broken_by_item_id():
    # two teachers with disjoint lists and uniform weights: the items at rank r tie, the lower id first
    n_users, n_items = 6, 50
    exclude = sp.csr_matrix((n_users, n_items), dtype=np.float32)
    first = torch.tensor([[3, 9, 1, 7]] * n_users, dtype=torch.int32).unsqueeze(0)
    second = torch.tensor([[8, 2, 5, 4]] * n_users, dtype=torch.int32).unsqueeze(0)
    trajectories = [Trajectory(states, np.zeros(0, np.int32), np.zeros(n_users + 1, np.int64), {"n_items": n_items})
                    for states in (first, second)]
    scorer = EnsembleScorer(trajectories, decay="power", beta=0.5)
    top = scorer.topk(8, exclude)
    assert top[0].tolist() == [3, 8, 2, 9, 1, 5, 4, 7]
    assert torch.equal(top, dense_reference(trajectories, -1, exclude, 8, scorer.importance, None))


@pytest.mark.parametrize("weights", [None, [1.0, 0.0], [1.0, -0.5], [1.0, float("inf")]])
def test_users_with_fewer_than_k_candidates_continue_with_zero_score_items(weights):
    n_users, n_items, k = 30, 40, 12
    exclude = random_csr(n_users, n_items, 0.15, seed=4)
    trajectories = random_trajectories(n_users, n_items, [3, 4], 2, seed=5, exclude=exclude)
    weights = None if weights is None else torch.tensor(weights)
    state_of = per_user_states(2, n_users, 2, seed=6)
    scorer = EnsembleScorer(trajectories, state_of, weights=weights)
    expected = dense_reference(trajectories, state_of, exclude, k, scorer.importance, weights)
    assert torch.equal(scorer.topk(k, exclude, batch_size=11), expected)


def test_rows_that_run_out_of_unobserved_items_and_listed_training_items():
    # 14 items, some users with 9 training items: a top-12 reaches the −inf items; lists may hold training items
    n_users, n_items, k = 20, 14, 12
    exclude = random_csr(n_users, n_items, 0.5, seed=7)
    trajectories = random_trajectories(n_users, n_items, [5, 5, 5], 2, seed=8)
    scorer = EnsembleScorer(trajectories, per_user_states(3, n_users, 2, seed=9), weights=torch.tensor([1., 2., 3.]))
    expected = dense_reference(trajectories, scorer.state_of, exclude, k, scorer.importance, scorer.weights)
    assert torch.equal(scorer.topk(k, exclude), expected)
    assert torch.equal(scorer.topk(n_items, exclude), dense_reference(trajectories, scorer.state_of, exclude, n_items,
                                                                      scorer.importance, scorer.weights))


@pytest.mark.parametrize("chunk_users", [1, 3, 64])
def test_candidate_topk_is_exact_for_any_buffer_size(chunk_users):
    n_users, n_items, k = 25, 200, 20
    exclude = random_csr(n_users, n_items, 0.05, seed=10)
    trajectories = random_trajectories(n_users, n_items, [30, 30], 2, seed=11, pool=80, exclude=exclude)
    scorer = EnsembleScorer(trajectories, per_user_states(2, n_users, 2, seed=12))
    rows, items = exclude.nonzero()
    order = np.argsort(rows, kind="stable")
    excluded = (torch.from_numpy(rows[order]).long(), torch.from_numpy(items[order]).long())
    top, exact = candidate_topk(scorer.rankings(torch.arange(n_users)), n_items, scorer.importance, k,
                                excluded=excluded, chunk_users=chunk_users)
    assert exact.all()
    assert torch.equal(top, dense_reference(trajectories, scorer.state_of, exclude, k, scorer.importance, None))


def test_context_ensemble_topk_matches_dense_for_dkc_states():
    split = make_tiny_split(n_users=50, n_items=60, per_user=10)
    trajectories = random_trajectories(split.n_users, split.n_items, [15, 15, 15], 4, seed=13, pool=45,
                                       exclude=split.train)
    context = DistillContext(split, trajectories, ensemble=EnsembleConfig(weighting="uniform"), batch_users=16)
    v = per_user_states(3, split.n_users, 4, seed=14)
    importance = rank_importance(15)
    for weights in (None, torch.tensor([0.5, 2.0, 1.0])):
        context.teacher_weights = weights
        for state_of in (v, 0, -1):
            expected = dense_reference(trajectories, state_of, split.train, 20, importance, weights)
            assert torch.equal(context.ensemble_topk(20, state_of, batch_size=16), expected)


def test_aggregate_scores_adds_in_teacher_order_with_several_threads():
    # large enough for torch's parallel path, where index_put_(accumulate=True) adds with atomics in whatever
    # order the threads reach an entry (caught only when they overlap, so a few tries)
    n_teachers, n_users, top_m, n_items = 6, 512, 200, 260
    generator = torch.Generator().manual_seed(15)
    rankings = torch.rand(n_teachers, n_users, n_items, generator=generator).argsort(2)[:, :, :top_m]
    importance = rank_importance(top_m, temperature=7.0)
    weights = torch.rand(n_teachers, generator=generator) + 0.5
    expected = torch.zeros(n_users, n_items)
    for teacher in range(n_teachers):
        expected.scatter_add_(1, rankings[teacher], (importance * weights[teacher]).expand(n_users, top_m).contiguous())
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(5):
            assert torch.equal(aggregate_scores(rankings, n_items, importance, weights), expected)
    finally:
        torch.set_num_threads(threads)


# ---- the DKC check ----------------------------------------------------------------------------------------

def distinct_rows(n_rows: int, width: int, n_items: int, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n_rows, n_items, generator=generator).argsort(1)[:, :width]


def test_list_positions_equal_sorting_positions():
    generator = torch.Generator().manual_seed(16)
    n_users, n_lists, length, n_items = 40, 3, 12, 90
    lists = torch.stack([distinct_rows(n_users, length, n_items, generator) for _ in range(n_lists)], 1)
    items = distinct_rows(n_users, 10, n_items, generator)
    items[:5, :4] = lists[:5, 1, 2:6]  # some hits for sure
    items[5, 0] = n_items + 3  # outside every list's range
    items[6, 1] = items[6, 2]  # a repeated item: the sorting path
    items[7, 3] = -1  # no item
    for table_bytes in (1, 300, 1 << 21):
        positions = list_positions(items, lists.to(torch.int32), table_bytes)
        for index in range(n_lists):
            found, position = positions_in(items, lists[:, index])
            assert torch.equal(positions[:, index], torch.where(found, position, length))


@pytest.mark.parametrize("form", ["paper", "code"])
def test_dkc_distances_equal_the_per_teacher_discrepancy(form):
    generator = torch.Generator().manual_seed(17)
    n_teachers, n_states, n_users, n_items, k = 3, 4, 50, 70, 8
    states = torch.stack([torch.stack([distinct_rows(n_users, k, n_items, generator) for _ in range(n_states)])
                          for _ in range(n_teachers)]).to(torch.int32)
    knowledge = DynamicKnowledge(states, DKCConfig(k=k, lam=3.0, form=form))
    student = distinct_rows(n_users, k, n_items, generator)
    student[::2, :5] = states[0, 1, ::2, 3:8].long()
    state_index = torch.randint(0, n_states, (n_teachers, n_users), generator=generator)
    fast = knowledge._distance_to(student, state_index)
    users = torch.arange(n_users)
    for teacher in range(n_teachers):
        slow = discrepancy(student, states[teacher, state_index[teacher], users], k, 3.0, form)
        assert torch.equal(fast[teacher], slow)
    if form == "paper":  # and the paper's D@K is bit for bit 1 − ranking_ndcg
        ideal = states[0, 0].long()
        expected = 1.0 - ranking_ndcg(student, ideal, discrepancy_gains(k, 3.0))
        assert torch.equal(discrepancy(student, ideal, k, 3.0), expected)


def test_valid_state_weights_follow_the_state_each_user_learns_from():
    from hetcomp.ensemble import teacher_weights
    from hetcomp.metrics import exclude_rows_

    split = make_tiny_split(n_users=50, n_items=60, per_user=10)
    trajectories = random_trajectories(split.n_users, split.n_items, [15, 15, 15], 4, seed=21, pool=45,
                                       exclude=split.train)
    recalls = ([0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.2, 0.2, 0.2, 0.2])
    for trajectory, recall in zip(trajectories, recalls, strict=True):
        trajectory.meta["metrics"] = [{"valid": {"recall@50": r}, "test": {}} for r in recall]
    v = per_user_states(3, split.n_users, 4, seed=22)
    weights = teacher_weights(split, trajectories, "valid-state", 2.0, v)
    converged_mean = (0.4 + 0.1 + 0.2) / 3
    for teacher in range(3):
        for user in range(split.n_users):
            expected = (recalls[teacher][int(v[teacher, user])] / converged_mean) ** 2
            assert weights[teacher, user].item() == pytest.approx(expected, rel=1e-6)
    assert torch.allclose(teacher_weights(split, trajectories, "valid-state", 2.0, -1),
                          teacher_weights(split, trajectories, "valid", 2.0))
    context = DistillContext(split, trajectories, ensemble=EnsembleConfig(weighting="valid-state", weight_power=2.0),
                             batch_users=16)
    users = torch.arange(split.n_users)
    dense = exclude_rows_(context.scorer(v)(users), split.train, users.numpy())
    assert torch.equal(context.ensemble_topk(20, v, batch_size=16), topk_items(dense, 20))
