"""Several seeds of one run as one stacked model (issue 17; `experiments/plans/stacked-seeds.md`).

On a GPU a student epoch is thousands of microsecond kernels; R seeds of the same run, their parameters stacked
along a leading replica dimension and their losses evaluated under ``torch.func.vmap``, make each launch serve R
runs (1.65× the throughput of 16 processes at R = 5, measured with a prototype under CUDA MPS). On the CPU it
gains nothing; it exists for the GPU.

Each replica stays its seed's ordinary run: an ordinary :class:`~hetcomp.train.Trainer` per seed keeps its own
model (whose parameters become views into the stacked ones), objective, generator, evaluation, early stopping and
callbacks; only the training step is shared. Each replica draws from its own generator in the ordinary run's
order, and the stacked step's arithmetic is the objective's own (:meth:`~hetcomp.train.Objective.arithmetic`),
so a replica follows its ordinary run up to the summation order of batched kernels (tested). A replica that has
stopped keeps its best state; its parameters go on moving with the stack, unread, until every replica stops.

Two kinds of objectives stack. A ``stackable`` one splits its random draws from its arithmetic (w/o KD: the
sampled negatives, then the student's own loss, which must read triples): its whole arithmetic runs under
``vmap``. A ``stackable_scores`` one reads the student through its scores of every item or a few items' scores
(every other method: HetComp, RRD, DCD, MTD, KD with ``listwise``, RD, CL-DRD): the scoring runs under ``vmap``,
and each replica's own objective (its DKC state, its phase, its draws) takes its rows of the [R, B, n_items]
scores. The student's own loss that such an objective asks of its replica is deferred: a placeholder stands in
while the replicas' objectives run, then every replica's triples, padded to the longest (a weight marks the
padding), go through one vmapped call. What the replicas' steps ask alike is answered for all at once: their
tail-node requests (one call over all rows), their :class:`~hetcomp.train.StepRequest` terms (DCD's corrections:
one vmapped call), and a step's first draws (``first_draws_lockstep``: own triples, KD's candidates, CL-DRD's
lists, each replica's exactly as alone) or its last (the own triples of ``own_draws_last`` methods).

Checkpoints are the ordinary ones: a replica with a ``run_dir`` writes its own ``last.pt`` / ``best.pt`` after each
evaluation, its slice of the stacked Adam state exported in the ordinary optimizer's format, so that an
interrupted stack resumes stacked (:func:`resume_groups`) or as ordinary runs, and a finished replica is handed to
``on_finished`` as soon as it stops (its run can be written before the stack ends).
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from hetcomp.distill import build_method
from hetcomp.distill.tools import padded_stack
from hetcomp.errors import HetCompError
from hetcomp.models import build_model
from hetcomp.train import FitState, StepRequest, Trainer, TrainerConfig


@contextmanager
def _quiet_vmap_fallback() -> Iterator[None]:
    """NeuMF's tower adds in place (``addcmul_``), which ``vmap`` runs replica by replica (a fallback it warns
    about once per process): the same values, a few more launches, so the warning is left out."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*batching rule for aten::addcmul_.*")
        yield


class _Arithmetic(nn.Module):
    """``functional_call`` calls ``forward``: the objective's arithmetic on a model whose parameters it is given."""

    def __init__(self, model: nn.Module, objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict) -> torch.Tensor:
        return self.objective.arithmetic(self.model, batch)


class _Call(nn.Module):
    """``functional_call`` calls ``forward``: any method of the student (``score`` for the vmapped scoring)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, method: str, *args) -> torch.Tensor:
        return getattr(self.model, method)(*args)


class _Replica:
    """One replica's student for what an objective reads besides the scores (its own loss, a few items' scores):
    ``loss``, ``score`` and ``score_items`` compute with the replica's slice of the stacked parameters, so that
    their gradients reach the stack; anything else (``config``, ``eval()``...) is the replica's own model's."""

    def __init__(self, module: _Call, trainer: StackedTrainer, index: int, model: nn.Module) -> None:
        self._module, self._trainer, self._index, self._model = module, trainer, index, model

    def _call(self, method: str, *args) -> torch.Tensor:
        params, buffers = self._trainer.prefixed()
        return functional_call(self._module, ({k: v[self._index] for k, v in params.items()},
                                              {k: v[self._index] for k, v in buffers.items()}), (method, *args))

    def loss(self, batch: dict) -> torch.Tensor:
        """The student's own loss on ``batch``: while the stack collects own losses (triples), a placeholder that
        it replaces by this replica's share of one vmapped call over every replica's triples."""
        placeholder = self._trainer._defer_own_loss(self._index, batch)
        return self._call("loss", batch) if placeholder is None else placeholder

    def defer_own_draws(self, context, users: torch.Tensor, generator: torch.Generator,
                        n_negatives: int) -> torch.Tensor | None:
        """A placeholder for the own loss on ``users``' triples, drawn later with every replica's at once (an
        objective asks this only where no draw follows in its step); None: draw and compute now."""
        return self._trainer._defer_own_draws(self._index, (context, users, generator, n_negatives))

    def drawn_first(self, users: torch.Tensor):
        """This replica's first draws of the step for ``users`` where the stack made every replica's at once
        before it (``DistillMethod.first_draws_lockstep``); None: draw them now."""
        return self._trainer._take_drawn_first(self._index, users)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """The replica's scores of every item: during a step, for its batch's users, its rows of the stack's
        vmapped scores (no second scoring); else computed with its slice of the parameters."""
        rows = self._trainer._step_rows(self._index, users)
        return self._call("score", users) if rows is None else rows

    def score_items(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self._call("score_items", users, items)

    def __getattr__(self, name: str):
        return getattr(self._model, name)


class _StepScores:
    """A step's stacked scores of every item, [R, B, n_items]: computed at the first use (with gradients, even when
    that use is inside an objective's ``no_grad`` block, e.g. RD's ranks) and then reused. A replica's rows come
    from one ``unbind``, whose backward stacks the replicas' gradients once (indexing would build a gradient of
    the whole [R, B, n_items] per replica)."""

    def __init__(self, score: Callable[[torch.Tensor], torch.Tensor], users: torch.Tensor) -> None:
        self._score, self._users = score, users
        self._all: torch.Tensor | None = None
        self._rows: tuple[torch.Tensor, ...] | None = None

    def all(self) -> torch.Tensor:
        if self._all is None:
            with torch.enable_grad():
                self._all = self._score(self._users)
        return self._all

    def rows(self, index: int) -> torch.Tensor:
        if self._rows is None:
            self._rows = self.all().unbind(0)
        return self._rows[index]


class StackedTrainer:
    """Trains the replicas of ``trainers`` (one ordinary trainer per seed, same model, objective and settings but
    the seed) as one stacked model; :meth:`fit` returns each replica's :class:`~hetcomp.train.FitState`."""

    def __init__(self, trainers: Sequence[Trainer]) -> None:
        self.trainers = list(trainers)
        _check_stackable(self.trainers)
        first = self.trainers[0]
        self.device = first.device
        params, buffers = stack_module_state([t.model for t in self.trainers])
        self.params = {name: value.detach().requires_grad_() for name, value in params.items()}
        self.buffers = buffers
        shapes = copy.deepcopy(first.model).to("meta")
        self.on_scores = not first.objective.stackable  # else: stackable_scores
        if self.on_scores:
            call = self._student_call = _Call(shapes)
            self._stacked = vmap(lambda p, b, users: functional_call(call, (p, b), ("score", users)))
            self._replicas = [_Replica(call, self, index, t.model) for index, t in enumerate(self.trainers)]
            self._own_loss_call = vmap(lambda p, b, batch: functional_call(call, (p, b), ("loss", batch)))
            self._deferred: list | None = None  # own losses asked for during a step (see _defer_own_loss)
            self._drawn_first: dict | None = None  # draws made before a step (see _draw_first)
            self._step: tuple | None = None  # the step's stacked scores and each replica's users (see _step_rows)
            self._check_scoring()
        else:
            base = _Arithmetic(shapes, first.objective)
            self._stacked = vmap(lambda p, b, batch: functional_call(base, (p, b), (batch,)))
        config = first.config
        # an objective's own parameters (MTD's logit table) stay each replica's: Adam updates every tensor
        # elementwise, so one optimizer over the stacked and the replicas' tensors is each replica's own
        objective_params = [p for t in self.trainers for p in t.objective.parameters()]
        self.optimizer = torch.optim.Adam([*self.params.values(), *objective_params], lr=config.lr,
                                          weight_decay=config.weight_decay, fused=True)
        self._import_optimizer_states()
        # last, once nothing can refuse the stack (a refused one leaves the trainers as they were, to train alone):
        # each replica's parameters become views of the stacked ones
        for index, trainer in enumerate(self.trainers):
            for name, module, attribute in _parameter_slots(trainer.model):
                module._parameters[attribute] = nn.Parameter(self.params[name].detach()[index])

    def train_epoch(self, trainers: Sequence[Trainer]) -> list[float]:
        """One epoch of every replica (those in ``trainers`` are counted); returns their mean batch losses."""
        epoch = trainers[0].state.epoch + 1
        for trainer in self.trainers:
            trainer.model.train()
            trainer.objective.on_epoch_start(trainer, epoch)
        streams = [t.objective.batches(epoch, t.generator) for t in self.trainers]
        totals = torch.zeros(len(self.trainers), device=self.device)
        count = 0
        try:
            for batches in zip(*streams, strict=True):
                self.optimizer.zero_grad(set_to_none=True)
                losses = self._losses(batches)
                losses.sum().backward()
                self.optimizer.step()
                for trainer in self.trainers:
                    trainer.model.after_step()
                totals += losses.detach()
                count += 1
        except ValueError as error:
            if not str(error).startswith("zip()"):  # a loss's own error: as it is
                raise
            raise HetCompError(f"the replicas' batch streams differ in length ({error}); stacked seeds need "
                               "objectives whose batches per epoch do not depend on the seed") from None
        means = (totals / max(count, 1)).tolist()
        return [means[self.trainers.index(t)] for t in trainers]

    def prefixed(self) -> tuple[dict, dict]:
        """The stacked parameters and buffers under the names ``functional_call`` gives the wrapped student."""
        return ({f"model.{k}": v for k, v in self.params.items()},
                {f"model.{k}": v for k, v in self.buffers.items()})

    def _losses(self, batches: Sequence[dict]) -> torch.Tensor:
        """[R]: every replica's loss on its batch, the stacked parameters under one vmapped call."""
        if self.on_scores:
            users = [batch["users"] for batch in batches]
            scores = _StepScores(self._scores, torch.stack(users))
            self._deferred = []
            self._drawn_first = self._draw_first(users)
            self._step = (scores, users)
            try:
                totals = torch.stack(self._losses_of_scores(scores, batches))
                return self._with_own_losses(totals, self._deferred)
            finally:
                self._deferred = self._drawn_first = self._step = None
        drawn = [t.objective.draw(t.model, batch) for t, batch in zip(self.trainers, batches, strict=True)]
        return self._stacked(*self.prefixed(), {key: torch.stack([d[key] for d in drawn]) for key in drawn[0]})

    def _losses_of_scores(self, scores: _StepScores, batches: Sequence[dict]) -> list[torch.Tensor]:
        """Each replica's loss from its rows of ``scores`` [R, B, n_items] (scored at the first use: a step that
        reads none, e.g. CL-DRD's sampled lists or RD without dynamic weighting, scores nothing). Replicas whose
        objective gives its loss as steps (:meth:`~hetcomp.train.Objective.tail_steps`) run them in lockstep: the
        requests of one round that have the same widths go to the fused tail node as one call over those
        replicas' rows (a view of the stacked scores when every replica asks), those of one
        :class:`~hetcomp.train.StepRequest` key to one call when every replica asks, each replica then continuing
        with its answer."""
        losses: list[torch.Tensor | None] = [None] * len(self.trainers)
        pending: dict[int, tuple] = {}
        for index, (trainer, batch) in enumerate(zip(self.trainers, batches, strict=True)):
            steps = trainer.objective.tail_steps(batch, self._replicas[index])
            if steps is None:
                losses[index] = trainer.objective.loss_of_scores(scores.rows(index), batch, self._replicas[index])
                continue
            try:
                pending[index] = (steps, next(steps))
            except StopIteration as done:
                losses[index] = done.value
        while pending:
            rounds: dict[tuple, list[int]] = {}
            for index, (_, request) in pending.items():
                if isinstance(request, StepRequest):
                    key = request.key
                else:  # a tail request; a head None: every unobserved item's tail
                    head, listed = request
                    key = ("tail", None if head is None else head.shape[1], listed.shape[1])
                rounds.setdefault(key, []).append(index)
            for key, members in rounds.items():
                requests = [pending[index][1] for index in members]
                if isinstance(requests[0], StepRequest):
                    answers = self._answer_step_requests(members, requests)
                else:
                    answers = self._answer_tails(scores, batches, members, requests, key[1] is None)
                for index, answer in zip(members, answers, strict=True):
                    steps = pending[index][0]
                    try:
                        pending[index] = (steps, steps.send(answer))
                    except StopIteration as done:
                        losses[index] = done.value
                        del pending[index]
        return losses

    def _answer_tails(self, scores: _StepScores, batches: Sequence[dict], members: list[int], requests: list,
                      every_item: bool) -> list[tuple]:
        """The tail requests of ``members`` (one width) as one call of the fused tail node over their rows (a view
        of the stacked scores when every replica asks); each member's part of the answer."""
        every = members == list(range(len(self.trainers)))
        rows = scores.all().flatten(0, 1) if every else torch.cat([scores.rows(index) for index in members])
        answer = self.trainers[members[0]].objective.answer_tail(
            rows, torch.cat([batches[index]["users"] for index in members]),
            None if every_item else torch.cat([head for head, _ in requests]),
            torch.cat([listed for _, listed in requests]))
        size = len(batches[members[0]]["users"])
        return [tuple(value[position * size:(position + 1) * size] for value in answer)
                for position in range(len(members))]

    def _answer_step_requests(self, members: list[int], requests: list[StepRequest]) -> list[torch.Tensor]:
        """Requests of one key: when every replica asks, all at once (:meth:`~hetcomp.train.StepRequest.answer_all`)
        or in one vmapped call over the stacked parameters and the requests' padded inputs
        (:meth:`~hetcomp.train.StepRequest.stacked`); else each with its replica's slice."""
        if members != list(range(len(self.trainers))) or len(members) < 2:
            return [request.answer() for request in requests]
        answers = type(requests[0]).answer_all(requests)
        if answers is not None:
            return answers
        inputs, term = type(requests[0]).stacked(requests)
        call = self._student_call

        def one(params: dict, buffers: dict, replica: dict) -> torch.Tensor:
            return term(lambda *args: functional_call(call, (params, buffers), ("score_items", *args)), replica)

        with _quiet_vmap_fallback():
            return list(vmap(one)(*self.prefixed(), inputs).unbind(0))

    def _draw_first(self, users: list[torch.Tensor]) -> dict[int, tuple] | None:
        """Every replica's first draws of the step for its batch's ``users``, made at once where its method can
        (``first_draws_lockstep``: each replica gets what it would draw alone), keyed by replica; None otherwise.
        Made before the steps run, they keep each replica's order of draws."""
        objectives = [trainer.objective for trainer in self.trainers]
        lockstep = getattr(type(objectives[0]), "first_draws_lockstep", None)
        drawn = lockstep(objectives, users, self.trainers[0].model) if lockstep is not None else None
        return None if drawn is None else {index: (users[index], value) for index, value in enumerate(drawn)}

    def _step_rows(self, index: int, users: torch.Tensor) -> torch.Tensor | None:
        """Replica ``index``'s rows of the step's stacked scores when ``users`` are its batch's; else None."""
        if self._step is None or self._step[1][index] is not users:
            return None
        return self._step[0].rows(index)

    def _take_drawn_first(self, index: int, users: torch.Tensor):
        """Replica ``index``'s draws of :meth:`_draw_first` for ``users`` (once); None when none were made."""
        if not self._drawn_first or index not in self._drawn_first or self._drawn_first[index][0] is not users:
            return None
        return self._drawn_first.pop(index)[1]

    def _defer_own_loss(self, index: int, batch: dict) -> torch.Tensor | None:
        """A placeholder for replica ``index``'s own loss on ``batch`` (None: compute it now, e.g. outside a step
        or for a batch that is not triples), recorded for :meth:`_with_own_losses`."""
        if self._deferred is None or set(batch) != {"users", "pos", "neg"}:
            return None
        return self._placeholder(index, batch)

    def _defer_own_draws(self, index: int, draw: tuple) -> torch.Tensor | None:
        """As :meth:`_defer_own_loss`, for triples not drawn yet: ``draw`` is (context, users, generator,
        n_negatives) of ``DistillContext.sample_interactions``."""
        if self._deferred is None or self.trainers[index].model.batch_kind != "triples":
            return None
        return self._placeholder(index, draw)

    def _placeholder(self, index: int, payload) -> torch.Tensor:
        """A leaf standing in for replica ``index``'s own loss on ``payload`` (triples, or their draw) until
        :meth:`_with_own_losses`."""
        placeholder = torch.zeros((), device=self.device, requires_grad=True)
        self._deferred.append((index, payload, placeholder))
        return placeholder

    def _draw_deferred(self, deferred: list) -> list:
        """``deferred`` with its pending draws made: every replica's at once where each replica has one and they
        share their context and negatives (``sample_interactions_lockstep``: each gets what it would alone),
        else one by one. Each replica's are its last draws of the step, so drawing them now keeps its order."""
        draws = [(position, entry) for position, entry in enumerate(deferred) if isinstance(entry[1], tuple)]
        if not draws:
            return deferred
        done = list(deferred)
        indices = [index for _, (index, _, _) in draws]
        contexts = {id(draw[0]) for _, (_, draw, _) in draws}
        negatives = {draw[3] for _, (_, draw, _) in draws}
        if sorted(indices) == list(range(len(self.trainers))) and len(contexts) == 1 and len(negatives) == 1:
            context = draws[0][1][1][0]
            batches = context.sample_interactions_lockstep([draw[1] for _, (_, draw, _) in draws],
                                                           [draw[2] for _, (_, draw, _) in draws], negatives.pop())
        else:
            batches = [draw[0].sample_interactions(draw[1], draw[2], draw[3]) for _, (_, draw, _) in draws]
        for (position, (index, _, placeholder)), batch in zip(draws, batches, strict=True):
            done[position] = (index, batch, placeholder)
        return done

    def _with_own_losses(self, totals: torch.Tensor, deferred: list) -> torch.Tensor:
        """``totals`` [R] with each deferred own loss in place of its placeholder: the replicas' triples padded to
        the longest (a weight marks the padding) and the student's loss vmapped over them, one call per own loss a
        replica asked for. Each total is affine in its own loss (``own + weight · term`` or ``own_weight · own +
        …`` in every method), so adding ∂total/∂placeholder · own gives the total's value and gradients exactly."""
        if not deferred:
            return totals
        deferred = self._draw_deferred(deferred)
        placeholders = [placeholder for _, _, placeholder in deferred]
        coefficients = dict(zip(map(id, placeholders), torch.autograd.grad(
            totals.sum(), placeholders, retain_graph=True, allow_unused=True, materialize_grads=True), strict=True))
        calls: dict[int, list] = {}
        for index, batch, placeholder in deferred:
            calls.setdefault(index, []).append((batch, placeholder))
        if sorted(calls) != list(range(len(self.trainers))) or len({len(c) for c in calls.values()}) != 1:
            for index, batch, placeholder in deferred:  # replicas that asked differently: one call each
                own = self._replicas[index]._call("loss", batch)
                totals = totals.index_add(0, torch.tensor([index], device=totals.device),
                                          (coefficients[id(placeholder)] * own).unsqueeze(0))
            return totals
        for slot in range(len(calls[0])):
            pairs = [calls[index][slot] for index in range(len(self.trainers))]
            own = self._own_losses([batch for batch, _ in pairs])
            totals = totals + torch.stack([coefficients[id(placeholder)] for _, placeholder in pairs]) * own
        return totals

    def _own_losses(self, batches: Sequence[dict]) -> torch.Tensor:
        """[R]: each replica's own loss on its triples, in one vmapped call over the padded batches."""
        stacked = {key: padded_stack([batch[key] for batch in batches]) for key in ("users", "pos", "neg")}
        stacked["weight"] = padded_stack([torch.ones(len(batch["users"]), device=self.device) for batch in batches])
        with _quiet_vmap_fallback():
            return self._own_loss_call(*self.prefixed(), stacked)

    def _scores(self, users: torch.Tensor) -> torch.Tensor:
        """[R, B, n_items]: every replica's scores of every item for its users [R, B], in one vmapped call."""
        with _quiet_vmap_fallback():
            return self._stacked(*self.prefixed(), users)

    def _check_scoring(self) -> None:
        """The student's scoring must run under vmap with gradients (an autograd Function needs a vmap rule)."""
        users = torch.zeros(len(self.trainers), 1, dtype=torch.int64, device=self.device)
        try:
            self._scores(users).sum().backward()
        except RuntimeError as error:
            raise HetCompError(f"the {self.trainers[0].model.name} student's scoring cannot be stacked yet "
                               f"({str(error).splitlines()[0][:120]})") from None
        for value in self.params.values():
            value.grad = None

    def _ordinary_params(self, trainer: Trainer) -> list[torch.Tensor]:
        """The model's parameters in the replica's ordinary optimizer, in the stacked parameters' order (both follow
        ``named_parameters``; the ordinary optimizer was built on the model, then the objective's parameters,
        before the model was stacked)."""
        ordinary = trainer.optimizer.param_groups[0]["params"]
        if len(ordinary) != len(self.params) + len(trainer.objective.parameters()):
            raise HetCompError("a replica's optimizer holds other parameters than its model's and objective's")
        return ordinary[:len(self.params)]

    def _import_optimizer_states(self) -> None:
        """Resumed replicas (:func:`resume_groups`) bring their Adam moments in their ordinary optimizers:
        stacked here (an objective's own parameters keep theirs)."""
        resumed = [bool(t.optimizer.state) for t in self.trainers]
        if not any(resumed):
            return
        if not all(resumed):
            raise HetCompError("stacked seeds resume together: every replica needs its optimizer state or none")
        columns = zip(*[[t.optimizer.state[p] for p in self._ordinary_params(t)] for t in self.trainers], strict=True)
        for stacked, states in zip(self.params.values(), columns, strict=True):
            self.optimizer.state[stacked] = {
                "step": states[0]["step"].clone(),
                **{key: torch.stack([state[key] for state in states]).to(stacked.device)
                   for key in ("exp_avg", "exp_avg_sq")}}
        for trainer in self.trainers:
            for parameter in trainer.objective.parameters():
                self.optimizer.state[parameter] = trainer.optimizer.state[parameter]

    def _export_optimizer_state(self, trainer: Trainer) -> None:
        """The replica's slice of the stacked Adam moments into its ordinary optimizer, which its checkpoint saves
        (compact copies: a saved view would carry every replica's storage), and its objective's parameters' own."""
        index = self.trainers.index(trainer)
        for stacked, ordinary in zip(self.params.values(), self._ordinary_params(trainer), strict=True):
            state = self.optimizer.state.get(stacked)
            if state:
                trainer.optimizer.state[ordinary] = {"step": state["step"].clone(),
                                                     **{key: state[key][index].clone()
                                                        for key in ("exp_avg", "exp_avg_sq")}}
        for parameter in trainer.objective.parameters():
            if self.optimizer.state.get(parameter):
                trainer.optimizer.state[parameter] = self.optimizer.state[parameter]

    def _finish(self, trainer: Trainer, on_finished, more: bool) -> None:
        """A replica that stopped: at its best state for its callbacks and ``on_finished``; then, while other
        replicas still train (``more``), its slice goes back to where the stack left it."""
        current = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()} if more else None
        if trainer.best_state is not None:
            trainer.model.load_state_dict(trainer.best_state)
        for callback in trainer.callbacks:
            callback.on_fit_end(trainer)
        if on_finished is not None:
            on_finished(trainer)
        if current is not None:
            trainer.model.load_state_dict(current)

    def fit(self, on_finished=None) -> list[FitState]:
        """Train until every replica has stopped early or reached ``max_epochs``; each ends at its best state.
        ``on_finished(trainer)`` is called for each replica as soon as it stops, its model at its best state."""
        for trainer in self.trainers:
            for callback in trainer.callbacks:
                callback.on_fit_start(trainer)
        max_epochs = self.trainers[0].config.max_epochs
        active = []
        for trainer in self.trainers:  # a resumed replica may have stopped before its run was written
            if trainer.state.stopped or trainer.state.epoch >= max_epochs:
                self._finish(trainer, on_finished, more=True)
            else:
                active.append(trainer)
        while active and active[0].state.epoch < max_epochs:
            started, started_cpu = time.perf_counter(), time.process_time()
            losses = self.train_epoch(active)
            share = (time.perf_counter() - started) / len(active)  # the stack's epoch, shared by its runs
            cpu_share = (time.process_time() - started_cpu) / len(active)
            for trainer, loss in zip(active, losses, strict=True):
                if not math.isfinite(loss):
                    raise FloatingPointError(f"the training loss of seed {trainer.config.seed} became {loss} at "
                                             f"epoch {trainer.state.epoch + 1}; lower the learning rate")
                trainer.state.epoch += 1
                trainer.state.seconds += share
                trainer.state.add_cpu(cpu_share)
                for callback in trainer.callbacks:
                    callback.on_epoch_end(trainer, trainer.state.epoch, loss)
                if trainer.state.epoch % trainer.config.eval_every == 0 or trainer.state.epoch == max_epochs:
                    if trainer.run_dir is not None:
                        self._export_optimizer_state(trainer)
                    trainer._evaluate_and_select(loss)
            ended = [t for t in active if t.state.stopped or t.state.epoch >= max_epochs]
            active = [t for t in active if t not in ended]
            for trainer in ended:
                self._finish(trainer, on_finished, more=bool(active))
        for trainer in self.trainers:
            if trainer.best_state is not None:
                trainer.model.load_state_dict(trainer.best_state)
        return [t.state for t in self.trainers]


def resume_groups(trainers: Sequence[Trainer]) -> list[list[Trainer]]:
    """Each trainer resumed from its ``run_dir``'s ``last.pt`` (where there is one), grouped by the epoch it
    resumes at, first seen first: the stacks to build (replicas of one stack move in step, and a process killed
    while the replicas wrote their checkpoints leaves some one evaluation behind)."""
    groups: dict[int, list[Trainer]] = {}
    for trainer in trainers:
        trainer._resume()
        groups.setdefault(trainer.state.epoch, []).append(trainer)
    return list(groups.values())


def seed_trainers(split, context, student: str, method: str, seeds: Sequence[int], dim: int = 6,
                  **options) -> list[Trainer]:
    """Ordinary trainers of ``method`` for ``student`` at ``dim``, one per seed (each model initialized under its
    seed), the method's defaults and ``options``: the replicas of a stack, or the runs it is compared with."""
    trainers = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = build_model(student, split.train, dim=dim)
        objective = build_method(method, context, **options)
        trainers.append(Trainer(model, split, objective, TrainerConfig(seed=seed, top_m=objective.evaluation_top_m),
                                context.device))
    return trainers


def _parameter_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(dotted name, owning module, attribute) of every parameter, as ``named_parameters`` names them."""
    return [(f"{prefix}.{attribute}" if prefix else attribute, module, attribute)
            for prefix, module in model.named_modules() for attribute in module._parameters
            if module._parameters[attribute] is not None]


def _check_stackable(trainers: Sequence[Trainer]) -> None:
    if len(trainers) < 1:
        raise HetCompError("stacked seeds need at least one trainer")
    first = trainers[0]
    objective = type(first.objective)
    if not (first.objective.stackable or first.objective.stackable_scores):
        raise HetCompError(f"{getattr(objective, 'name', objective.__name__)} cannot be stacked yet: its loss "
                           "draws inside its arithmetic (an objective declares stackable once it splits them)")
    if first.objective.stackable and first.model.batch_kind != "triples":
        raise HetCompError(f"the {first.model.name} student cannot be stacked: its own loss reads "
                           f"{first.model.batch_kind}, whose shapes differ between seeds")
    if any(True for _ in first.model.buffers()):
        raise HetCompError(f"the {first.model.name} student cannot be stacked yet: its buffers (e.g. a graph) would "
                           "be copied per seed")
    same = ("lr", "weight_decay", "max_epochs", "eval_every", "patience")
    for trainer in trainers[1:]:
        if type(trainer.model) is not type(first.model) or trainer.model.config != first.model.config:
            raise HetCompError("stacked seeds need the same student model and settings in every replica")
        if type(trainer.objective) is not objective:
            raise HetCompError("stacked seeds need the same method in every replica")
        differ = [name for name in same if getattr(trainer.config, name) != getattr(first.config, name)]
        if differ:
            raise HetCompError(f"stacked seeds need the same {', '.join(differ)} in every replica")
    seeds = [t.config.seed for t in trainers]
    if len(set(seeds)) != len(seeds):
        raise HetCompError(f"stacked seeds must differ (got {seeds})")
    epochs = sorted({t.state.epoch for t in trainers})
    if len(epochs) > 1:
        raise HetCompError(f"stacked seeds move in step, but these replicas are at epochs {epochs} "
                           "(resume_groups makes one stack per epoch)")
