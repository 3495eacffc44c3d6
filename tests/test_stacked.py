"""Stacked seeds (hetcomp.stacked): each replica is its seed's ordinary run, up to batched kernels' rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_split, train_tiny_teachers

from hetcomp.distill import DistillContext, build_method
from hetcomp.distill.cl_drd import ListRequest
from hetcomp.distill.dcd import CorrectionRequest
from hetcomp.distill.rd import RanksRequest
from hetcomp.errors import HetCompError
from hetcomp.models import build_model
from hetcomp.stacked import StackedTrainer, resume_groups
from hetcomp.train import Callback, Trainer, TrainerConfig

SPLIT = make_tiny_split(n_users=80, n_items=120)


def _trainer(student: str, seed: int, run_dir=None, callbacks=None, **config) -> Trainer:
    torch.manual_seed(seed)
    model = build_model(student, SPLIT.train, dim=4)
    objective = build_method("none", DistillContext(SPLIT, [], "cpu", needs_teachers=False))
    settings = {"lr": 0.01, "max_epochs": 12, "eval_every": 2, "patience": 2, "seed": seed, **config}
    return Trainer(model, SPLIT, objective, TrainerConfig(**settings), "cpu", callbacks, run_dir)


@pytest.mark.parametrize("student", ["mf", "ml", "dnn"])
def test_each_replica_follows_the_ordinary_run_of_its_seed(student):
    seeds = (0, 1, 2)
    ordinary = []
    for seed in seeds:
        trainer = _trainer(student, seed)
        trainer.fit()
        ordinary.append(trainer)
    replicas = [_trainer(student, seed) for seed in seeds]
    states = StackedTrainer(replicas).fit()
    for alone, replica, state in zip(ordinary, replicas, states, strict=True):
        assert (state.epoch, state.best_epoch) == (alone.state.epoch, alone.state.best_epoch)
        assert [h["epoch"] for h in state.history] == [h["epoch"] for h in alone.state.history]
        for mine, theirs in zip(state.history, alone.state.history, strict=True):
            assert mine["valid"]["recall@50"] == pytest.approx(theirs["valid"]["recall@50"], abs=1e-6)
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        for mine, theirs in zip(replica.model.parameters(), alone.model.parameters(), strict=True):
            assert torch.allclose(mine, theirs, atol=1e-5)  # both end at their best state
    assert len({state.best_value for state in states}) > 1  # the seeds differ


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return train_tiny_teachers(SPLIT, tmp_path_factory.mktemp("teachers"), ("mf", "ml"), top_m=40, max_epochs=20)


def _hetcomp_trainer(student: str, seed: int, teachers, **options) -> Trainer:
    torch.manual_seed(seed)
    model = build_model(student, SPLIT.train, dim=4)
    objective = build_method("hetcomp", DistillContext(SPLIT, teachers, "cpu", batch_users=16), k=20, pos_k=5,
                             dkc_k=10, period=2, **options)
    config = TrainerConfig(lr=0.01, max_epochs=16, eval_every=2, patience=2, seed=seed,
                           top_m=objective.evaluation_top_m)
    return Trainer(model, SPLIT, objective, config, "cpu")


@pytest.mark.parametrize("options", [{}, {"deadline": 4, "fine_form": "code"}, {"deadline": 6, "switch": "user"}])
@pytest.mark.parametrize("student", ["mf", "ml", "dnn"])
def test_hetcomp_replicas_stack_on_the_scores_and_follow_their_ordinary_runs(student, teachers, options):
    """HetComp draws nothing: the replicas' scores come from one vmapped call, each replica's own DKC state and
    lists give its tail requests, answered for every replica at once (L_O, then L_F with the release's two
    prefix terms; per-user phases mixing inside a batch take the per-replica path); each follows its ordinary
    run, DKC moves included."""
    ordinary = []
    for seed in (0, 1):
        trainer = _hetcomp_trainer(student, seed, teachers, **options)
        trainer.fit()
        ordinary.append(trainer)
    replicas = [_hetcomp_trainer(student, seed, teachers, **options) for seed in (0, 1)]
    answer_tail, rows_asked = replicas[0].objective.answer_tail, []
    replicas[0].objective.answer_tail = lambda scores, *rest: rows_asked.append(len(scores)) or answer_tail(scores,
                                                                                                           *rest)
    states = StackedTrainer(replicas).fit()
    for alone, replica, state in zip(ordinary, replicas, states, strict=True):
        assert (state.epoch, state.best_epoch) == (alone.state.epoch, alone.state.best_epoch)
        for mine, theirs in zip(state.history, alone.state.history, strict=True):
            assert mine["valid"]["recall@50"] == pytest.approx(theirs["valid"]["recall@50"], abs=1e-6)
        assert replica.objective.knowledge.log == alone.objective.knowledge.log  # the same DKC decisions
        assert torch.equal(replica.objective.knowledge.v, alone.objective.knowledge.v)
        assert ("L_F" in replica.objective.describe()) == ("deadline" in options)  # the fine phase reached
    assert max(rows_asked) == 2 * 16  # both replicas' rows of a batch in one call of the tail node


@pytest.mark.parametrize(("method", "options"), [("rrd", {"k": 10}),
                                                ("rd", {"k": 5, "dynamic": True, "dynamic_start": 2}),
                                                ("cl-drd", {"stages": "3,5", "stage_epochs": 3, "list_size": 12,
                                                            "top_n": 20}),
                                                ("cl-drd-full", {"stages": "3,5", "stage_epochs": 3,
                                                                 "top_n": 20}),
                                                ("dcd", {"k": 10, "n_under": 3, "n_over": 3, "sides": "both"}),
                                                ("kd", {"k": 10, "n_neg": 10, "losses": "listwise:1.0,kl:0.5",
                                                        "own_weight": 0.1, "temperature": 1.5}),
                                                ("mtd", {"k": 10})])
@pytest.mark.parametrize("student", ["mf", "ml", "dnn"])
def test_methods_with_an_own_loss_stack_on_the_scores_and_their_replicas_slices(student, method, options, teachers,
                                                                              monkeypatch):
    """RRD and DCD (without DE-RRD's sampling), KD with its listwise term, MTD and RD (its ranks) read the scores
    of every item besides the student's own loss and a few items' scores, CL-DRD its sampled lists' scores: the
    scores come from the vmapped call,
    the rest (drawn from each replica's generator, in the ordinary order) from the replica's slice of the stacked
    parameters, or, for DCD's corrections, from one vmapped call over every replica's sampled entries of a side.
    MTD's logit table, a parameter of its objective, stays each replica's own."""
    def trainer(seed: int, context: DistillContext | None = None, **changes) -> Trainer:
        torch.manual_seed(seed)
        model = build_model(student, SPLIT.train, dim=4)
        context = context or DistillContext(SPLIT, teachers, "cpu", batch_users=16)
        objective = build_method(method, context, **{**options, **changes})
        return Trainer(model, SPLIT, objective, TrainerConfig(lr=0.01, max_epochs=10, eval_every=2, patience=2,
                                                              seed=seed), "cpu")

    ordinary = []
    for seed in (0, 1):
        alone = trainer(seed)
        alone.fit()
        ordinary.append(alone)
    shared = DistillContext(SPLIT, teachers, "cpu", batch_users=16)  # as train_stack's: RRD's and MTD's own
    # triples then come from one lockstep draw of every replica's
    stacked = StackedTrainer([trainer(seed, shared) for seed in (0, 1)])
    own_loss_call, calls = stacked._own_loss_call, []
    stacked._own_loss_call = lambda *args: calls.append(1) or own_loss_call(*args)
    lockstep, drawn_together = shared.sample_interactions_lockstep, []
    shared.sample_interactions_lockstep = lambda *args: drawn_together.append(1) or lockstep(*args)
    first = stacked.trainers[0].objective
    answer_tail, rows_asked = getattr(first, "answer_tail", None), []
    if answer_tail is not None:
        first.answer_tail = lambda scores, *rest: rows_asked.append(len(scores)) or answer_tail(scores, *rest)
    stacked_keys = []
    for request_class in (CorrectionRequest, ListRequest):
        monkeypatch.setattr(request_class, "stacked", classmethod(
            lambda cls, requests, stack=request_class.stacked.__func__: stacked_keys.append(
                (len(requests), requests[0].key[:2])) or stack(cls, requests)))
    ranks_asked, answer_all = [], RanksRequest.answer_all.__func__
    monkeypatch.setattr(RanksRequest, "answer_all", classmethod(
        lambda cls, requests: ranks_asked.append(len(requests)) or answer_all(cls, requests)))
    first_draws, method_class = [], type(stacked.trainers[0].objective)
    draw_first = method_class.first_draws_lockstep.__func__
    monkeypatch.setattr(method_class, "first_draws_lockstep", classmethod(
        lambda cls, *args: (lambda drawn: first_draws.append(drawn is not None) or drawn)(draw_first(cls, *args))))
    states = stacked.fit()
    assert calls  # the replicas' own losses ran as one vmapped call per step, not once per replica
    # a step's first draws for every replica at once: DCD's own triples, KD's candidates' negatives, CL-DRD's lists
    drawn_first = method in ("dcd", "kd") or method == "cl-drd"
    assert all(first_draws) == drawn_first and first_draws
    # DCD's corrections and CL-DRD's lists: both replicas' sampled entries (of a side) scored and lost in one call
    expected = ({(2, ("dcd-correction", "user")), (2, ("dcd-correction", "item"))} if method == "dcd" else
                {(2, ("cl-drd-lists",))} if method == "cl-drd" else set())
    assert set(stacked_keys) == expected
    assert (set(ranks_asked) == {2}) == (method == "rd")  # RD's dynamic ranks: both replicas' rows in one call
    # every replica's own triples of a step in one lockstep draw: RRD's, MTD's and KD's after their other draws,
    # DCD's before the step (its correction lists draw after its own loss)
    assert drawn_together
    # RRD's, DCD's, KD's and MTD's tail (RD reads the scores for its ranks only, CL-DRD's sampled lists not at
    # all): both replicas' rows at once
    assert (max(rows_asked, default=0) == 2 * 16) == (method not in ("rd", "cl-drd", "cl-drd-full"))
    for alone, state in zip(ordinary, states, strict=True):
        assert (state.epoch, state.best_epoch) == (alone.state.epoch, alone.state.best_epoch)
        for mine, theirs in zip(state.history, alone.state.history, strict=True):
            assert mine["valid"]["recall@50"] == pytest.approx(theirs["valid"]["recall@50"], abs=1e-6)
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
    if method == "mtd":
        assert not torch.equal(*(t.objective.logits for t in stacked.trainers))  # each replica learnt its own
    if method in ("mtd", "rd", "cl-drd", "cl-drd-full"):
        return
    # KD on candidates only, RRD and DCD with DE-RRD's sampling: no scores of every item to stack on
    change = {"losses": "kl:1.0"} if method == "kd" else {"sample": True}
    unstackable = trainer(0, **change)
    assert not type(unstackable.objective).stacks_seeds(unstackable.objective.config)
    with pytest.raises(HetCompError, match=f"{method} cannot be stacked yet"):
        StackedTrainer([unstackable])


def test_what_cannot_be_stacked_is_an_error_naming_why():
    with pytest.raises(HetCompError, match="must differ"):
        StackedTrainer([_trainer("mf", 0), _trainer("mf", 0)])
    with pytest.raises(HetCompError, match="same lr"):
        StackedTrainer([_trainer("mf", 0), _trainer("mf", 1, lr=0.02)])
    with pytest.raises(HetCompError, match="iae student cannot be stacked"):
        StackedTrainer([_trainer("iae", 0), _trainer("iae", 1)])
    with pytest.raises(HetCompError, match="gnn student cannot be stacked yet"):
        StackedTrainer([_trainer("gnn", 0), _trainer("gnn", 1)])
    from hetcomp.distill.none import NoKD

    class DrawsInside(NoKD):  # a method that has not split its draws from its arithmetic
        name = "draws-inside"
        stackable = False

    unsplit = _trainer("mf", 0)
    unsplit.objective = DrawsInside(unsplit.objective.context)
    with pytest.raises(HetCompError, match="draws-inside cannot be stacked yet"):
        StackedTrainer([unsplit])


class _Interrupt(Callback):
    """Stops the process's training (as a kill would) right after the evaluation of ``epoch``, before the
    replica's checkpoint of that evaluation is written."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_evaluate(self, trainer, epoch, result, improved) -> None:
        if epoch == self.epoch:
            raise KeyboardInterrupt


def _same_runs(states, references) -> None:
    for state, reference in zip(states, references, strict=True):
        assert (state.epoch, state.best_epoch) == (reference.epoch, reference.best_epoch)
        for mine, theirs in zip(state.history, reference.history, strict=True):
            assert mine["valid"]["recall@50"] == pytest.approx(theirs["valid"]["recall@50"], abs=1e-6)
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)


def test_an_interrupted_stack_resumes_from_its_replicas_checkpoints_stacked_or_alone(tmp_path):
    """Each replica checkpoints as an ordinary run (its slice of the stacked Adam moments included). A kill while
    the replicas write their checkpoints leaves them one evaluation apart: they resume as one stack per epoch, or
    as ordinary runs, and end where the uninterrupted stack ends."""
    seeds = (0, 1, 2)
    settings = {"max_epochs": 16, "patience": 3}
    reference = StackedTrainer([_trainer("mf", seed, **settings) for seed in seeds]).fit()
    for resume_stacked in (True, False):
        folders = [tmp_path / f"{resume_stacked}-{seed}" for seed in seeds]
        interrupted = [_trainer("mf", seed, folder, [_Interrupt(6)] if seed == 1 else None, **settings)
                       for seed, folder in zip(seeds, folders, strict=True)]
        with pytest.raises(KeyboardInterrupt):
            StackedTrainer(interrupted).fit()
        assert all((folder / "last.pt").is_file() for folder in folders)
        again = [_trainer("mf", seed, folder, **settings) for seed, folder in zip(seeds, folders, strict=True)]
        if resume_stacked:
            groups = resume_groups(again)
            assert [[t.config.seed for t in group] for group in groups] == [[0], [1, 2]]  # epochs 6 and 4
            for group in groups:
                StackedTrainer(group).fit()
        else:
            for trainer in again:
                trainer.fit()
        assert [t.resumed_from_epoch for t in again] == [6, 4, 4]
        _same_runs([t.state for t in again], reference)


def test_each_replica_is_handed_over_at_its_best_state_as_soon_as_it_stops():
    seen = []

    def on_finished(trainer: Trainer) -> None:
        best = trainer.best_state
        seen.append((trainer.config.seed, trainer.state.epoch,
                     all(torch.equal(v, best[k]) for k, v in trainer.model.state_dict().items())))

    replicas = [_trainer("mf", seed, max_epochs=40, patience=2) for seed in (0, 1, 2)]
    states = StackedTrainer(replicas).fit(on_finished)
    assert sorted(seed for seed, _, _ in seen) == [0, 1, 2]
    assert all(at_best for _, _, at_best in seen)
    assert [epoch for _, epoch, _ in seen] == sorted(state.epoch for state in states)  # in the order they stopped
    assert len({state.epoch for state in states}) > 1  # the seeds stop at different epochs


@pytest.mark.parametrize("student", ["mf", "ml", "dnn"])
def test_a_padded_triples_batch_with_a_weight_gives_the_unpadded_loss_and_gradients(student):
    """Stacked seeds compute their own losses in one vmapped call over triples padded to the longest replica's:
    each student's loss leaves the padding (weight 0) out."""
    torch.manual_seed(0)
    model = build_model(student, SPLIT.train, dim=4)
    generator = torch.Generator().manual_seed(0)
    batch = {"users": torch.randint(80, (30,), generator=generator),
             "pos": torch.randint(120, (30,), generator=generator),
             "neg": torch.randint(120, (30, 3), generator=generator)}
    padded = {key: torch.cat([value, torch.zeros((7, *value.shape[1:]), dtype=value.dtype)])
              for key, value in batch.items()}
    padded["weight"] = torch.cat([torch.ones(30), torch.zeros(7)])
    values, gradients = [], []
    for each in (batch, padded):
        model.zero_grad()
        loss = model.loss(each)
        loss.backward()
        values.append(loss.detach())
        gradients.append([p.grad.clone() for p in model.parameters()])
    assert values[0] == pytest.approx(values[1].item(), rel=1e-6)
    for plain, weighted in zip(*gradients, strict=True):
        assert torch.allclose(plain, weighted, atol=1e-7)


def test_deferred_own_losses_are_added_with_their_coefficients_in_one_call_or_one_by_one(teachers):
    """A replica's total is affine in its own loss; the stack adds ∂total/∂placeholder · own, the replicas' own
    losses in one vmapped call when each asked the same number of times, else one call each."""
    def trainer(seed: int) -> Trainer:
        torch.manual_seed(seed)
        model = build_model("mf", SPLIT.train, dim=4)
        objective = build_method("rrd", DistillContext(SPLIT, teachers, "cpu", batch_users=16), k=10)
        return Trainer(model, SPLIT, objective, TrainerConfig(seed=seed), "cpu")

    stack = StackedTrainer([trainer(0), trainer(1)])
    generator = torch.Generator().manual_seed(0)
    batches = [{"users": torch.randint(80, (n,), generator=generator),
                "pos": torch.randint(120, (n,), generator=generator),
                "neg": torch.randint(120, (n, 2), generator=generator)} for n in (9, 14)]
    alone = [stack._replicas[index]._call("loss", batch).detach() for index, batch in enumerate(batches)]
    for both in (True, False):
        stack._deferred = []
        first = stack._defer_own_loss(0, batches[0])
        totals = [0.5 * first + 1.0, torch.tensor(3.0)]
        if both:
            totals[1] = 2.0 * stack._defer_own_loss(1, batches[1]) + 3.0
        combined = stack._with_own_losses(torch.stack(totals), stack._deferred)
        stack._deferred = None
        assert combined[0].item() == pytest.approx(1.0 + 0.5 * alone[0].item(), rel=1e-6)
        assert combined[1].item() == pytest.approx(3.0 + (2.0 * alone[1].item() if both else 0.0), rel=1e-6)


@pytest.mark.parametrize("n_negatives", [1, 3])
def test_lockstep_draws_give_each_replica_exactly_its_own_draws(n_negatives):
    """Own-loss triples of several replicas drawn at once: each replica's generator makes the same calls as when
    it draws alone (its collisions redrawn round by round), so each gets the same triples, bit for bit, and its
    generator ends in the same state. The tiny split is dense (many collisions, several rounds)."""
    context = DistillContext(SPLIT, [], "cpu", needs_teachers=False)
    users = [torch.randperm(80, generator=torch.Generator().manual_seed(seed))[:size]
             for seed, size in ((0, 16), (1, 16), (2, 5))]
    alone_generators = [torch.Generator().manual_seed(10 + seed) for seed in range(3)]
    alone = [context.sample_interactions(part, generator, n_negatives)
             for part, generator in zip(users, alone_generators, strict=True)]
    generators = [torch.Generator().manual_seed(10 + seed) for seed in range(3)]
    together = context.sample_interactions_lockstep(users, generators, n_negatives)
    for mine, theirs in zip(together, alone, strict=True):
        assert all(torch.equal(mine[key], theirs[key]) for key in ("users", "pos", "neg"))
    for mine, theirs in zip(generators, alone_generators, strict=True):
        assert torch.equal(mine.get_state(), theirs.get_state())
