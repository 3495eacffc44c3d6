"""HetComp's knowledge construction and losses against naive versions, and the method contract suite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_split, train_tiny_teachers

from hetcomp.distill import METHODS, DistillContext, build_method
from hetcomp.distill.knowledge import DKCConfig, DynamicKnowledge, discrepancy
from hetcomp.distill.losses import fine_loss, overall_loss
from hetcomp.errors import HetCompError
from hetcomp.models import build_model
from hetcomp.provenance import git_commit, source_digest
from hetcomp.runs import distill
from hetcomp.train import Trainer, TrainerConfig

SPLIT = make_tiny_split(n_users=100, n_items=70, per_user=14)
#: options that fit the toy catalogue (70 items) where a method's defaults assume a real one
SMALL_OPTIONS = {"hetcomp": {"k": 20, "pos_k": 5, "dkc_k": 10, "period": 2}}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return train_tiny_teachers(SPLIT, tmp_path_factory.mktemp("teachers"), ("mf", "gnn", "ae"), top_m=40,
                               max_epochs=30)


# ---- D@K and DKC on hand-built rankings -------------------------------------------------------------------

def naive_discrepancy(student, teacher, k, lam, form):
    gains = [2 ** math.exp(-r / lam) - 1 for r in range(k)]
    if form == "paper":
        dcg = sum(gains[teacher.index(item)] / math.log2(p + 2) for p, item in enumerate(student[:k])
                  if item in teacher[:k])
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(gains))
    else:
        dcg = sum(gains[p] / math.log2(p + 2) for p, item in enumerate(student[:k]) if item in teacher[:k])
        idcg = sum(g / math.log2(p + 2) for p, g in enumerate(gains))
    return 1 - dcg / idcg


@pytest.mark.parametrize("form", ["paper", "code"])
def test_discrepancy_matches_naive(form):
    rng = np.random.default_rng(0)
    student = torch.from_numpy(np.stack([rng.permutation(30)[:8] for _ in range(6)]))
    teacher = torch.from_numpy(np.stack([rng.permutation(30)[:8] for _ in range(6)]))
    fast = discrepancy(student, teacher, k=8, lam=3.0, form=form)
    for row in range(6):
        slow = naive_discrepancy(student[row].tolist(), teacher[row].tolist(), 8, 3.0, form)
        assert fast[row].item() == pytest.approx(slow)
    assert discrepancy(teacher, teacher, k=8, lam=3.0, form=form).abs().max() < 1e-12


def test_dkc_advances_a_student_that_reaches_the_next_state_only():
    n_users, k = 3, 5
    base = torch.arange(100).view(1, 1, 1, 100)
    states = torch.stack([torch.arange(s * 10, s * 10 + k) for s in range(4)])  # state s = items 10s..10s+4
    teacher_states = states.view(1, 4, 1, k).expand(1, 4, n_users, k).clone()
    knowledge = DynamicKnowledge(teacher_states, DKCConfig(k=k, lam=2.0))
    far = torch.arange(90, 95)
    student = far.repeat(n_users, 1)
    knowledge.step(student, epoch=10)  # first check only records d
    assert knowledge.v.tolist() == [[0, 0, 0]]
    student[0] = states[1]  # user 0 now ranks exactly like E2; user 1 stays far; user 2 moves half way
    student[2, :3] = states[1, :3]
    knowledge.step(student, epoch=20)
    assert knowledge.v[0, 0] == 1 and knowledge.v[0, 1] == 0 and knowledge.v[0, 2] == 1
    knowledge.v[:] = 3
    knowledge.step(states[3].repeat(n_users, 1), epoch=30)
    assert knowledge.v.tolist() == [[3, 3, 3]] and knowledge.converged
    del base


def test_dkc_deadline_moves_every_open_state_to_the_last():
    states = torch.arange(4 * 5).view(1, 4, 1, 5).expand(1, 4, 2, 5).clone()
    knowledge = DynamicKnowledge(states, DKCConfig(k=5, deadline=30))
    student = torch.arange(90, 95).repeat(2, 1)
    knowledge.step(student, epoch=10)
    knowledge.step(student, epoch=20)
    assert not knowledge.converged
    record = knowledge.step(student, epoch=30)
    assert knowledge.converged and record["forced"] == 2


# ---- L_O and L_F against per-user loops -------------------------------------------------------------------

def naive_overall(scores, lists, tails):
    total = 0.0
    for row, (items, tail) in enumerate(zip(lists, tails, strict=True)):
        tail_sum = sum(math.exp(scores[row, j]) for j in tail)
        total += sum(-math.log(math.exp(scores[row, i]) / (math.exp(scores[row, i]) + tail_sum)) for i in items)
    return total / len(lists)


def naive_fine(scores, lists, tails):
    total = 0.0
    for row, (items, tail) in enumerate(zip(lists, tails, strict=True)):
        tail_sum = sum(math.exp(scores[row, j]) for j in tail)
        for k, item in enumerate(items):
            below = sum(math.exp(scores[row, i]) for i in items[k:])
            total += -math.log(math.exp(scores[row, item]) / (below + tail_sum))
    return total / len(lists)


def _toy_lists():
    rng = np.random.default_rng(1)
    scores = torch.from_numpy(rng.normal(size=(4, 12))).double()
    lists = [[3, 1, 7], [0, 2], [11, 5, 4], [9]]
    width = 3
    items = torch.tensor([row + [0] * (width - len(row)) for row in lists])
    valid = torch.tensor([[True] * len(row) + [False] * (width - len(row)) for row in lists])
    tails = [[j for j in range(12) if j not in row and j % 3 != 0] for row in lists]
    tail_mask = torch.zeros(4, 12, dtype=torch.bool)
    for row, tail in enumerate(tails):
        tail_mask[row, tail] = True
    return scores, lists, items, valid, tails, tail_mask


def test_overall_and_fine_losses_match_naive():
    scores, lists, items, valid, tails, tail_mask = _toy_lists()
    assert overall_loss(scores, items, valid, tail_mask).item() == pytest.approx(naive_overall(scores, lists, tails))
    assert fine_loss(scores, items, valid, tail_mask).item() == pytest.approx(naive_fine(scores, lists, tails))


def test_fine_loss_sees_order_inside_the_list_overall_loss_does_not():
    scores, _, items, valid, _, tail_mask = _toy_lists()
    swapped = items.clone()
    swapped[0, [0, 1]] = swapped[0, [1, 0]]
    assert overall_loss(scores, items, valid, tail_mask) == pytest.approx(
        overall_loss(scores, swapped, valid, tail_mask))
    assert fine_loss(scores, items, valid, tail_mask) != pytest.approx(fine_loss(scores, swapped, valid, tail_mask))


# ---- HetComp's item sets ----------------------------------------------------------------------------------

def test_positive_dynamic_and_tail_sets_are_disjoint_and_clean(teachers):
    context = DistillContext(SPLIT, teachers)
    method = build_method("hetcomp", context, k=20, pos_k=5, dkc_k=10)
    users = torch.arange(SPLIT.n_users)
    train = context.train_mask(users)
    positives, valid = method.positive_items, method.positive_valid
    negatives = method.dynamic_topk
    rows = users.unsqueeze(1)
    assert train[rows.expand_as(positives), positives.clamp(min=0)][valid].all()  # P⁺ ⊂ observed
    assert not train[rows.expand_as(negatives), negatives].any()  # P⁻ ∩ observed = ∅
    for user in range(0, SPLIT.n_users, 17):
        p_plus = set(positives[user][valid[user]].tolist())
        p_minus = set(negatives[user].tolist())
        assert not p_plus & p_minus and len(p_minus) == 20


def test_hetcomp_prices_its_l_o_and_l_f_epochs_apart_and_leaves_its_knowledge_as_it_was(teachers):
    """cost_phases (for reproduce --price): L_O until the deadline, then L_F; inside L_F's context every user is
    in the L_F phase with the converged teachers' lists, and the knowledge is restored on leaving."""
    context = DistillContext(SPLIT, teachers)
    method = build_method("hetcomp", context, k=20, pos_k=5, dkc_k=10, deadline=100)
    v, topk = method.knowledge.v.clone(), method.dynamic_topk.clone()
    lo, lf = method.cost_phases(166.0)
    assert (lo.name, lo.epochs, lo.enter, lf.name, lf.epochs) == ("L_O", 100, None, "L_F", 66.0)
    assert not bool(method.fine_phase_users.any())
    with lf.enter():
        assert bool(method.fine_phase_users.all()) and method.knowledge.converged
        assert torch.equal(method.dynamic_topk, context.ensemble_topk(20, method.knowledge.v))
    assert torch.equal(method.knowledge.v, v) and torch.equal(method.dynamic_topk, topk)
    assert [p.epochs for p in method.cost_phases(60.0)] == [60.0, 0.0]  # stopped before the deadline
    assert [(p.name, p.epochs) for p in build_method("rrd", context, k=20).cost_phases(60.0)] == [("", 60.0)]


def test_tail_logsumexp_equals_the_masked_version():
    from hetcomp.distill.losses import masked_logsumexp, tail_logsumexp

    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 40, generator=generator) * 8
    excluded = torch.stack([torch.randperm(40, generator=generator)[:7] for _ in range(5)])
    valid = torch.rand(5, 7, generator=generator) > 0.3
    mask = torch.ones(5, 40, dtype=torch.bool)
    for row in range(5):
        mask[row, excluded[row][valid[row]]] = False
    assert torch.allclose(tail_logsumexp(scores, excluded, valid), masked_logsumexp(scores, mask), atol=1e-5)


@pytest.mark.parametrize("bound", [None, 6.0])
def test_fused_tail_logsumexp_has_the_value_and_gradient_of_the_autograd_version(bound):
    from hetcomp.distill.losses import masked_logsumexp, tail_logsumexp

    generator = torch.Generator().manual_seed(1)
    scores = (torch.randn(6, 50, generator=generator, dtype=torch.float64) * 5).requires_grad_()
    excluded = torch.stack([torch.randperm(50, generator=generator)[:9] for _ in range(6)])
    valid = torch.rand(6, 9, generator=generator) > 0.3
    mask = torch.ones(6, 50, dtype=torch.bool)
    for row in range(6):
        mask[row, excluded[row][valid[row]]] = False
    weights = torch.rand(6, generator=generator, dtype=torch.float64)
    reference_scores = scores if bound is None else scores.clamp(-bound, bound)
    reference = masked_logsumexp(reference_scores, mask)
    (expected_grad,) = torch.autograd.grad((reference * weights).sum(), scores)
    fused = tail_logsumexp(scores, excluded, valid, bound=bound)
    (fused_grad,) = torch.autograd.grad((fused * weights).sum(), scores)
    assert torch.allclose(fused, reference, atol=1e-12)
    assert torch.allclose(fused_grad, expected_grad, atol=1e-12)
    if bound is not None:
        assert (fused_grad[scores.detach().abs() > bound] == 0).all() and (scores.detach().abs() > bound).any()


@pytest.mark.parametrize("bound", [None, 6.0])
def test_fused_listed_scores_have_the_gradient_of_a_gather(bound):
    from hetcomp.distill.losses import listed_scores, masked_logsumexp, tail_logsumexp_and_listed

    generator = torch.Generator().manual_seed(3)
    scores = (torch.randn(4, 30, generator=generator, dtype=torch.float64) * 5).requires_grad_()
    excluded = torch.stack([torch.randperm(30, generator=generator)[:6] for _ in range(4)])
    valid = torch.ones(4, 6, dtype=torch.bool)
    listed = torch.cat([excluded[:, :4], torch.full((4, 2), -1)], 1)  # two padding entries per row
    mask = torch.ones(4, 30, dtype=torch.bool)
    mask[torch.arange(4).unsqueeze(1), excluded] = False
    weights = torch.rand(4, 6, generator=generator, dtype=torch.float64) * (listed >= 0)

    def objective(tail, picked):
        return (tail * torch.arange(1.0, 5.0, dtype=torch.float64)).sum() + (picked * weights).sum()

    clamped = scores if bound is None else scores.clamp(-bound, bound)
    expected = objective(masked_logsumexp(clamped, mask), listed_scores(scores, listed, bound))
    (expected_grad,) = torch.autograd.grad(expected, scores)
    fused = objective(*tail_logsumexp_and_listed(scores, excluded, valid, listed, bound))
    (fused_grad,) = torch.autograd.grad(fused, scores)
    assert torch.allclose(fused, expected, atol=1e-12) and torch.allclose(fused_grad, expected_grad, atol=1e-12)


@pytest.mark.parametrize("temperature", [None, 1.82])
def test_fused_tail_at_a_temperature_equals_dividing_and_gathering_bit_for_bit(temperature):
    """KD's listwise term: the tail of f/τ and the undivided top-K scores from one node give the loss and the
    gradient of ``tail_logsumexp(f / τ)`` beside a ``gather`` of f, to the last bit (float32, distinct items)."""
    from hetcomp.distill.losses import soft_target_cross_entropy, tail_logsumexp, tail_logsumexp_and_listed

    generator = torch.Generator().manual_seed(5)
    scores = torch.randn(6, 400, generator=generator).requires_grad_()
    observed = torch.stack([torch.randperm(400, generator=generator)[:30] for _ in range(6)])
    observed_valid = torch.rand(6, 30, generator=generator) > 0.2
    top = torch.stack([torch.randperm(400, generator=generator)[:20] for _ in range(6)])
    target = torch.softmax(torch.randn(20, generator=generator), 0).expand(6, -1)
    valid = torch.ones(6, 20, dtype=torch.bool)
    tau = temperature or 1.0

    reference = soft_target_cross_entropy(scores, None, top, target, valid, tau, log_normalizer=tail_logsumexp(
        scores if temperature is None else scores / temperature, observed, observed_valid))
    (reference_grad,) = torch.autograd.grad(reference, scores)
    normalizer, listed = tail_logsumexp_and_listed(scores, observed, observed_valid, top, temperature=temperature)
    fused = soft_target_cross_entropy(None, None, top, target, valid, tau, log_normalizer=normalizer, listed=listed)
    (fused_grad,) = torch.autograd.grad(fused, scores)
    assert torch.equal(fused, reference) and torch.equal(fused_grad, reference_grad)
    with pytest.raises(ValueError, match="temperature and bound"):
        tail_logsumexp_and_listed(scores, observed, observed_valid, top, bound=6.0, temperature=2.0)


def test_fused_tail_logsumexp_of_an_empty_tail_is_finite():
    from hetcomp.distill.losses import tail_logsumexp

    scores = torch.randn(2, 4, requires_grad=True)
    everything = torch.arange(4).expand(2, 4)
    value = tail_logsumexp(scores, everything, torch.ones(2, 4, dtype=torch.bool))
    value.sum().backward()
    assert torch.isfinite(value).all() and (scores.grad == 0).all()


def test_all_item_scores_has_the_gradients_of_the_plain_product():
    from hetcomp.models.base import all_item_scores

    generator = torch.Generator().manual_seed(2)
    users = torch.randn(5, 3, generator=generator, requires_grad=True)
    items = torch.randn(11, 3, generator=generator, requires_grad=True)
    upstream = torch.randn(5, 11, generator=generator)
    plain = torch.autograd.grad(((users @ items.T) * upstream).sum(), (users, items))
    fast_scores = all_item_scores(users, items)
    fast = torch.autograd.grad((fast_scores * upstream).sum(), (users, items))
    # the same bits with MKL's AMD kernels; an Intel CPU's AVX-512 kernels round the two layouts differently
    assert torch.allclose(fast_scores, users @ items.T, rtol=1e-6, atol=1e-7)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, fast, strict=True))


@pytest.mark.parametrize("phase", ["overall", "fine"])
def test_hetcomp_loss_matches_a_per_user_computation(teachers, phase):
    context = DistillContext(SPLIT, teachers)
    method = build_method("hetcomp", context, k=20, pos_k=5, dkc_k=10)
    if phase == "fine":
        method.knowledge.v[:] = method.knowledge.n_states - 1
    torch.manual_seed(0)
    model = build_model("mf", SPLIT.train, dim=4)
    users = torch.tensor([0, 7, 31, 99])
    fast = method.loss(model, {"users": users}).item()
    scores = model.score(users).detach().double()
    order, valid = context.observed_order
    total = 0.0
    for row, user in enumerate(users.tolist()):
        observed = set(SPLIT.train.indices[SPLIT.train.indptr[user]:SPLIT.train.indptr[user + 1]].tolist())
        positives = order[user][valid[user]].tolist()[:5]
        negatives = method.dynamic_topk[user].tolist()
        tail = [j for j in range(SPLIT.n_items) if j not in observed and j not in negatives]
        row_scores = scores[row:row + 1]
        if phase == "overall":
            total += 0.01 * naive_overall(row_scores, [positives + negatives], [tail])
        else:
            total += 0.005 * (naive_fine(row_scores, [positives], [tail]) + naive_fine(row_scores, [negatives], [tail]))
    assert fast == pytest.approx(total / len(users), rel=1e-4)


# ---- the method contract: every registered method --------------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_method_contract(name, teachers):
    outputs = []
    for _ in range(2):
        torch.manual_seed(0)
        context = DistillContext(SPLIT, teachers, batch_users=16)
        method = build_method(name, context, **SMALL_OPTIONS.get(name, {}))
        model = build_model("mf", SPLIT.train, dim=4)
        trainer = Trainer(model, SPLIT, method, TrainerConfig(lr=1e-2, seed=0, top_m=method.evaluation_top_m))
        losses = [trainer.train_epoch() for _ in range(15)]
        assert all(math.isfinite(x) for x in losses)
        assert losses[-1] < losses[0]
        outputs.append(model.score(torch.arange(5)).detach())
    assert torch.equal(outputs[0], outputs[1])


def test_hetcomp_reaches_final_states_and_beats_no_kd(teachers, tmp_path):
    options = {"k": 20, "pos_k": 5, "dkc_k": 10, "period": 4, "preset": "code"}
    results = {}
    for method in ("none", "hetcomp"):
        results[method] = distill(SPLIT, teachers, "mf", method, dim=4, runs_root=tmp_path, max_epochs=300,
                                  eval_every=4, lr=1e-2, batch_users=16,
                                  method_options=options if method == "hetcomp" else {})
    log = results["hetcomp"]["dkc_log"]
    assert log[-1]["mean_state"] == [4.0, 4.0, 4.0]
    print({m: r["test"] for m, r in results.items()})
    assert results["hetcomp"]["test"]["ndcg@10"] > results["none"]["test"]["ndcg@10"]


def test_source_digest_follows_the_code(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    before = source_digest(tmp_path)
    (tmp_path / "a.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != before
    (tmp_path / "a.py").write_text("x = 1\n")
    assert source_digest(tmp_path) == before


def test_a_run_refuses_to_train_once_the_sources_changed_on_disk(tmp_path, monkeypatch):
    """A long plan whose checkout is edited under it must not train with a mix of old and new modules: training
    stops with an error naming the fix; a finished run is still read back."""
    from hetcomp import provenance

    finished = distill(SPLIT, [], "mf", "none", dim=4, runs_root=tmp_path, max_epochs=2, eval_every=1)
    monkeypatch.setattr(provenance, "source_digest", lambda *args: "0123456789ab")
    assert distill(SPLIT, [], "mf", "none", dim=4, runs_root=tmp_path, max_epochs=2, eval_every=1) == finished
    with pytest.raises(HetCompError, match="sources changed on disk since this process started.*Rerun the command"):
        distill(SPLIT, [], "mf", "none", dim=4, runs_root=tmp_path, max_epochs=3, eval_every=1)


def test_a_run_records_the_installed_packages_that_make_its_bits(tmp_path):
    """Two machines with the same CPU dispatch can still train apart (other MKL, numpy or numba builds): each
    finished run names those versions, read from what is installed, not written by hand."""
    import importlib.metadata

    result = distill(SPLIT, [], "mf", "none", dim=4, runs_root=tmp_path, max_epochs=2, eval_every=1)
    named = dict(part.rsplit(" ", 1) for part in result["packages"].split(", "))
    assert named["torch"] == torch.__version__ and named["numpy"] == np.__version__
    assert named["scipy"] == importlib.metadata.version("scipy")
    assert "python" in named and ("MKL" in named) == torch.backends.mkl.is_available()


def test_commit_stamp_says_when_the_sources_differ_from_it(tmp_path):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    assert git_commit(tmp_path) == "unknown"
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    (tmp_path / "notes.md").write_text("outside the package\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "."], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_commit(package) == head
    (tmp_path / "notes.md").write_text("edited, but not code\n")
    assert git_commit(package) == head
    (package / "a.py").write_text("x = 2\n")
    assert git_commit(package) == f"{head}+dirty"
    (package / "a.py").write_text("x = 1\n")
    (package / "b.py").write_text("y = 1\n")  # a new module runs too
    assert git_commit(package) == f"{head}+dirty"
