"""The contract every model passes: shapes, consistency, seeded determinism, the loss falls, train items masked."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_split

from hetcomp.data import HetCompError
from hetcomp.models import MODELS, build_model, model_config
from hetcomp.train import OwnLoss, Trainer, TrainerConfig

SPLIT = make_tiny_split(n_users=80, n_items=50, per_user=12)


def build(name: str, seed: int = 0, dim: int = 8):
    torch.manual_seed(seed)
    return build_model(name, SPLIT.train, dim=dim)


def trainer_for(model, seed: int = 0, lr: float = 1e-2) -> Trainer:
    config = model.config
    objective = OwnLoss(model, SPLIT, 32, config.n_negatives, torch.device("cpu"))
    return Trainer(model, SPLIT, objective, TrainerConfig(lr=lr, seed=seed, eval_every=1000))


@pytest.mark.parametrize("name", list(MODELS))
def test_shapes_and_score_items_agree(name):
    model = build(name).eval()
    users = torch.tensor([0, 3, 7])
    scores = model.score(users)
    assert scores.shape == (3, SPLIT.n_items) and scores.dtype == torch.float32
    items = torch.tensor([[1, 2, 3], [0, 10, 49], [5, 5, 6]])
    assert torch.allclose(model.score_items(users, items), scores.gather(1, items), atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("dim", [6, 16])
def test_score_gradients_match_score_items(name, dim):
    """Distillation losses backpropagate through ``score``; its fast paths must give score_items' gradients."""
    model = build(name, dim=dim).train()
    users = torch.tensor([0, 3, 7, 3])
    items = torch.tensor([[1, 2, 3], [0, 10, 49], [5, 5, 6], [7, 8, 9]])
    gradients = []
    for scores in (lambda: model.score(users).gather(1, items), lambda: model.score_items(users, items)):
        torch.manual_seed(1)
        model.zero_grad()
        scores().pow(2).sum().backward()
        gradients.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
    for through_score, through_items in zip(*gradients, strict=True):
        assert torch.allclose(through_score, through_items, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_student_size_and_reset(name):
    small, large = build(name, dim=6), build(name, dim=64)
    assert small.n_parameters() < large.n_parameters()
    torch.manual_seed(0)
    small.reset_parameters()
    before = [p.detach().clone() for p in small.parameters()]
    with torch.no_grad():
        for parameter in small.parameters():
            parameter.add_(1.0)
    torch.manual_seed(0)
    small.reset_parameters()
    assert all(torch.equal(a, b) for a, b in zip(before, small.parameters(), strict=True))


@pytest.mark.parametrize("name", list(MODELS))
def test_seeded_training_is_deterministic(name):
    outputs = []
    for _ in range(2):
        model = build(name, seed=3)
        trainer = trainer_for(model, seed=3)
        trainer.train_epoch()
        trainer.train_epoch()
        model.eval()
        outputs.append(model.score(torch.arange(10)))
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", list(MODELS))
def test_loss_falls_and_ranking_beats_random(name):
    model = build(name)
    trainer = trainer_for(model)
    first = trainer.train_epoch()
    for _ in range(25):
        last = trainer.train_epoch()
    assert last < first
    result = trainer.evaluate()
    random_recall = 10 / SPLIT.n_items  # expected Recall@10 of a random ranking, roughly
    assert result["valid"]["recall@10"] > random_recall


@pytest.mark.parametrize("name", list(MODELS))
def test_rankings_never_contain_training_items(name):
    model = build(name)
    ranking = trainer_for(model).evaluate(top_m=20)["ranking"]
    train = SPLIT.train.toarray() > 0
    rows = np.arange(SPLIT.n_users)[:, None]
    assert not train[rows, ranking.numpy()].any()


def test_unknown_model_and_setting_are_clear_errors():
    with pytest.raises(HetCompError, match="known models: mf"):
        model_config("transformer")
    with pytest.raises(HetCompError, match="has no setting colour"):
        model_config("mf", colour=1)


def test_a_killed_run_resumes_to_the_same_model(tmp_path):
    def run(max_epochs: int, run_dir=None):
        torch.manual_seed(0)
        model = build("mf")
        objective = OwnLoss(model, SPLIT, 32, 1, torch.device("cpu"))
        config = TrainerConfig(lr=1e-2, seed=0, eval_every=2, max_epochs=max_epochs, patience=100)
        trainer = Trainer(model, SPLIT, objective, config, run_dir=run_dir)
        trainer.fit()
        return trainer

    straight = run(8)
    run(4, tmp_path)  # "killed" after its epoch-4 checkpoint
    resumed = run(8, tmp_path)
    assert resumed.state.epoch == 8 and len(resumed.state.history) == 4
    assert [h["valid"] for h in resumed.state.history] == [h["valid"] for h in straight.state.history]
    assert torch.equal(resumed.model.score(torch.arange(5)), straight.model.score(torch.arange(5)))


@pytest.mark.parametrize("signs", [(1.0, 0.5), (1.0, -0.5), (-1.0, 0.5), (-1.0, -0.5), (0.0, 0.5), (0.0, -0.5)])
def test_narrow_dnn_tower_serves_the_trained_scores(signs):
    """A d < 8 NeuMF scores without gradients through clamps; with gradients through the exact tower."""
    from hetcomp.models.neumf import NeuMF

    split = make_tiny_split(n_users=30, n_items=50)
    torch.manual_seed(0)
    model = build_model("dnn", split.train, dim=6)
    assert isinstance(model, NeuMF) and model.first_user.out_features == 1
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.7)
    with torch.no_grad():
        model.second.weight.fill_(signs[0])
        model.second.bias.fill_(signs[1])
    users = torch.arange(30)
    with torch.enable_grad():
        exact = model.score(users).detach()
    with torch.no_grad():
        served = model.score(users)
    assert torch.allclose(served, exact, atol=1e-6, rtol=1e-5)
    assert torch.equal(served.argsort(1, descending=True)[:, :5], exact.argsort(1, descending=True)[:, :5])


@pytest.mark.parametrize("n_users", [1, 7, 30])
def test_narrow_dnn_tower_trains_as_the_general_tower(n_users):
    """A d < 8 NeuMF keeps its one-unit tower's passes for the backward (``_NarrowTowerScores``) instead of
    recomputing them per chunk (``_TowerScores``): the same scores and the same gradients, bit for bit, over
    several chunks of users and where the units' ReLUs cut."""
    from hetcomp.models.base import all_item_scores
    from hetcomp.models.neumf import NeuMF, _TowerScores

    split = make_tiny_split(n_users=30, n_items=50)
    torch.manual_seed(0)
    model = build_model("dnn", split.train, dim=6, score_chunk=4)
    assert isinstance(model, NeuMF) and model.first_user.out_features == model.second.out_features == 1
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.7)
    users = torch.randperm(30)[:n_users]
    upstream = torch.randn(n_users, 50)

    def general() -> torch.Tensor:
        gmf_users = model.user_gmf(users) * model.predict.weight[0, :6]
        tower = (model.first_user(model.user_mlp(users)), model.first_item(model.item_mlp.weight),
                 model.second.weight, model.second.bias, model.predict.weight[0, 6:])
        base = all_item_scores(gmf_users, model.item_gmf.weight) + model.predict.bias[0]
        return _TowerScores.apply(base, *tower, model.config.score_chunk)

    results = []
    for score in (general, lambda: model.score(users)):
        model.zero_grad()
        scores = score()
        scores.backward(upstream)
        results.append((scores.detach(), [p.grad.clone() for p in model.parameters()]))
    (general_scores, general_grads), (narrow_scores, narrow_grads) = results
    assert torch.equal(narrow_scores, general_scores)
    assert all(torch.equal(a, b) for a, b in zip(narrow_grads, general_grads, strict=True))
    assert any(g.abs().sum() > 0 for g in narrow_grads)
