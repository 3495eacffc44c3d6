"""One epoch-based trainer for every model, teacher or student.

What is optimized comes from an :class:`Objective` (its batches and its loss): a model's own loss for teachers
(:class:`OwnLoss`), a distillation method for students. Evaluation, early stopping, checkpoints for resume and
the per-epoch hooks are the trainer's; progress, logging and trajectory capture are callbacks.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetcomp.config import knob, validate
from hetcomp.data import Split
from hetcomp.data.sampling import NegativeSampler
from hetcomp.device import keep_freed_memory
from hetcomp.errors import HetCompError
from hetcomp.metrics import evaluate_split
from hetcomp.models.base import Batch, Recommender


@dataclass
class TrainerConfig:
    """Optimization and model selection. Model selection: best validation Recall@50 (``monitor``)."""

    owner = "the trainer"
    lr: float = knob(1e-3, gt=0)
    weight_decay: float = knob(0.0, ge=0)
    max_epochs: int = knob(500, ge=1)
    eval_every: int = knob(10, ge=1)
    patience: int = knob(5, ge=1)
    monitor: str = "recall@50"
    ks: tuple[int, ...] = knob((10, 50), ge=1)
    top_m: int | None = knob(None, ge=1)
    # [256, n_items] scores stay under glibc's reused-buffer size (see keep_freed_memory)
    eval_batch_size: int = knob(256, ge=1)
    seed: int = knob(0, ge=0)

    def __post_init__(self) -> None:
        validate(self)


class StepRequest:
    """A term of a loss given as steps (:meth:`Objective.tail_steps`) that reads a few of the student's scores
    besides the tail node's, e.g. DCD's corrections: the ordinary run answers it alone (:meth:`answer`, with the
    model it holds), stacked seeds answer the requests of one :attr:`key` from every replica at once
    (:meth:`stacked`, under ``vmap`` over the replicas' parameters; ``hetcomp.stacked``)."""

    #: requests with equal keys can be answered together (the same kind of term, padded to common shapes)
    key: tuple = ()

    def answer(self) -> torch.Tensor:
        """The term, computed with the request's own model (the ordinary run's arithmetic)."""
        raise NotImplementedError

    @classmethod
    def stacked(cls, requests: list[StepRequest]
                ) -> tuple[dict[str, torch.Tensor], Callable[[Callable, dict[str, torch.Tensor]], torch.Tensor]]:
        """For one request per replica (in replica order): their inputs stacked along a leading replica dimension
        (padded to common shapes) and ``term(score_items, inputs)``, one replica's term from its slice of the
        inputs and its student's ``score_items`` (what ``vmap`` maps over the replicas)."""
        raise NotImplementedError

    @classmethod
    def answer_all(cls, requests: list[StepRequest]) -> list[torch.Tensor] | None:
        """For one request per replica: every answer at once without the student (e.g. ranks read off scores the
        stack already has), or None to answer through :meth:`stacked`."""
        return None


@dataclass
class CostPhase:
    """A part of a run for pricing: its name, how many of the run's epochs it spans, and what puts the objective
    in it for timing (None: the objective as it is; else a context manager factory)."""

    name: str
    epochs: float
    enter: Callable[[], contextlib.AbstractContextManager] | None = None


class Objective:
    """What the trainer optimizes: a stream of batches per epoch and a loss per batch."""

    #: True when :meth:`loss` is :meth:`arithmetic` of :meth:`draw`: its random draws apart from arithmetic that
    #: ``torch.func.vmap`` can batch over seeds (:class:`hetcomp.stacked.StackedTrainer`)
    stackable: bool = False
    #: True when the loss can be computed by :meth:`loss_of_scores` from the student's scores of every item: stacked,
    #: the replicas' scores come from one vmapped call and each replica's own objective takes its rows (and draws
    #: from its own generator in the ordinary run's order)
    stackable_scores: bool = False

    def batches(self, epoch: int, generator: torch.Generator) -> Iterable[Batch]:
        raise NotImplementedError

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, model: Recommender, batch: Batch) -> Batch:
        """A stackable objective's random draws for ``batch`` (e.g. sampled negatives), added to it."""
        return batch

    def arithmetic(self, model: Recommender, batch: Batch) -> torch.Tensor:
        """A stackable objective's loss on a drawn batch: no draws, no data-dependent shapes."""
        raise NotImplementedError

    def loss_of_scores(self, scores: torch.Tensor | None, batch: Batch, model: Recommender) -> torch.Tensor:
        """A ``stackable_scores`` objective's loss from the student's scores [B, n_items] of the batch's users
        (None: scored where its ordinary loss scores them, so that its draws keep their order); ``model`` serves
        anything else it reads of the student (e.g. its own loss)."""
        raise NotImplementedError

    def tail_steps(self, batch: Batch, model: Recommender):
        """The loss of a ``stackable_scores`` objective as a generator of steps, or None: it yields each request
        for the fused tail node, ``(head, listed)`` for the batch's users' score rows (``head`` None: the tail
        of every unobserved item), receives ``(tail_lse, listed_scores)`` and returns the loss (``model`` serves
        what else it reads of the student, as in :meth:`loss_of_scores`). It may also yield a :class:`StepRequest`
        (a term on a few scores of its own), receiving that term. Stacked seeds then answer every replica's
        request with one call over all replicas' rows (``hetcomp.stacked``); None: :meth:`loss_of_scores` as
        usual."""
        return None

    def drive_steps(self, steps, scores: torch.Tensor | Callable[[], torch.Tensor], users: torch.Tensor
                    ) -> torch.Tensor:
        """The loss that ``steps`` (:meth:`tail_steps`) return, each request answered for ``users``' rows of
        ``scores`` (a callable: computed after the steps' first part, e.g. after an own loss's draws)."""
        try:
            request = next(steps)
            scores = scores() if callable(scores) else scores
            while True:
                answer = request.answer() if isinstance(request, StepRequest) else self.answer_tail(scores, users,
                                                                                                      *request)
                request = steps.send(answer)
        except StopIteration as done:
            return done.value

    def answer_tail(self, scores: torch.Tensor, users: torch.Tensor, head: torch.Tensor,
                    listed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused tail node's answer to a :meth:`tail_steps` request for ``users``' rows of ``scores``."""
        raise NotImplementedError

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Per-epoch hook (e.g. a curriculum step)."""

    def on_evaluate(self, trainer: Trainer, epoch: int, result: dict) -> None:
        """Hook after each evaluation (e.g. HetComp's knowledge construction)."""

    def parameters(self) -> list[torch.nn.Parameter]:
        """Trainable parameters the objective owns (e.g. MTD's per-user teacher weights), optimized with the model."""
        return []

    def may_stop(self) -> bool:
        """Whether early stopping may end training now (HetComp: not before every user reaches the last state)."""
        return True

    def cost_phases(self, epochs: float) -> list[CostPhase]:
        """The parts of a run of ``epochs`` epochs whose epochs cost differently, for pricing it (``reproduce
        --price`` times a few epochs of each): by default one, the objective as it starts."""
        return [CostPhase("", epochs)]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (resume)."""


class OwnLoss(Objective):
    """A model trained on the data with its own loss; batches follow the model's ``batch_kind``."""

    def __init__(self, model: Recommender, split: Split, batch_size: int, n_negatives: int,
                 device: torch.device) -> None:
        self.kind = model.batch_kind
        self.batch_size = batch_size
        self.n_negatives = n_negatives
        self.device = device
        coo = split.train.tocoo()
        self.users = torch.from_numpy(coo.row.astype(np.int64))
        self.items = torch.from_numpy(coo.col.astype(np.int64))
        self.active_users = torch.from_numpy(np.flatnonzero(np.diff(split.train.indptr) > 0))
        self.active_items = torch.from_numpy(np.flatnonzero(np.diff(split.train.tocsc().indptr) > 0))
        self.sampler = NegativeSampler(split.train) if self.kind == "triples" else None

    def batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        if self.kind == "triples":
            order = torch.randperm(len(self.users), generator=generator)
            for start in range(0, len(order), self.batch_size):
                chosen = order[start:start + self.batch_size]
                users = self.users[chosen]
                negatives = self.sampler.sample(users, self.n_negatives, generator)
                yield {"users": users.to(self.device), "pos": self.items[chosen].to(self.device),
                       "neg": negatives.to(self.device)}
        else:
            pool = self.active_users if self.kind == "users" else self.active_items
            order = pool[torch.randperm(len(pool), generator=generator)]
            for start in range(0, len(order), self.batch_size):
                yield {self.kind: order[start:start + self.batch_size].to(self.device)}

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return model.loss(batch)


class CheckpointError(HetCompError):
    """A resume checkpoint (``last.pt`` / ``best.pt``) cannot be read or does not fit the model being trained."""


class Callback:
    """Hooks called by :meth:`Trainer.fit`; every method is optional."""

    def on_fit_start(self, trainer: Trainer) -> None: ...

    def on_epoch_end(self, trainer: Trainer, epoch: int, loss: float) -> None: ...

    def on_evaluate(self, trainer: Trainer, epoch: int, result: dict, improved: bool) -> None: ...

    def on_fit_end(self, trainer: Trainer) -> None: ...


@dataclass
class FitState:
    """Everything needed to resume: the loop counters and the history of evaluations."""

    epoch: int = 0
    best_epoch: int = 0
    best_value: float = -math.inf
    bad_evaluations: int = 0
    stopped: bool = False
    seconds: float = 0.0
    eval_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)
    #: this process's CPU time in training and evaluation (every thread's; a core shared with other work inflates
    #: ``seconds`` but not this); None for a run resumed from a checkpoint made before it was counted
    cpu_seconds: float | None = 0.0

    def add_cpu(self, spent: float) -> None:
        if self.cpu_seconds is not None:
            self.cpu_seconds += spent


class Trainer:
    """Trains ``model`` on ``objective``; evaluates every ``eval_every`` epochs; stops early; resumes.

    With ``run_dir`` the trainer writes ``last.pt`` (model, optimizer, RNG and loop state) after every
    evaluation and ``best.pt`` (the best model), and :meth:`fit` continues from ``last.pt`` when present. A
    checkpoint that cannot be read or applied is a :class:`CheckpointError` naming it (deleting ``last.pt`` and
    ``best.pt`` restarts the run): never an automatic restart, which would silently throw away hours of training.
    """

    def __init__(self, model: Recommender, split: Split, objective: Objective, config: TrainerConfig,
                 device: torch.device | str = "cpu", callbacks: list[Callback] | None = None,
                 run_dir: Path | None = None) -> None:
        self.device = torch.device(device)
        torch.set_flush_denormal(True)  # denormal floats (e.g. tiny softmax tails) slow CPU kernels several-fold
        keep_freed_memory()
        self.model = model.to(self.device)
        self.split = split
        self.objective = objective
        self.config = config
        self.callbacks = callbacks or []
        self.run_dir = Path(run_dir) if run_dir is not None else None
        parameters = [*self.model.parameters(), *self.objective.parameters()]
        self.optimizer = torch.optim.Adam(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=True)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.state = FitState()
        #: the epoch this call's :meth:`fit` continued from (0: it started afresh)
        self.resumed_from_epoch = 0
        self.best_state: dict | None = None

    def train_epoch(self) -> float:
        """One pass over the objective's batches; returns the mean batch loss."""
        self.model.train()
        epoch = self.state.epoch + 1
        self.objective.on_epoch_start(self, epoch)
        total, count = 0.0, 0
        for batch in self.objective.batches(epoch, self.generator):
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.objective.loss(self.model, batch)
            loss.backward()
            self.optimizer.step()
            self.model.after_step()
            total += float(loss.detach())
            count += 1
        self.state.epoch = epoch
        return total / max(count, 1)

    def evaluate(self, top_m: int | None = None) -> dict:
        """Validation and test metrics of the current model (and its top-M unobserved items if asked)."""
        self.model.eval()
        return evaluate_split(self.model.score, self.split, self.config.ks, top_m=top_m,
                              batch_size=self.config.eval_batch_size, device=self.device)

    def fit(self) -> FitState:
        """Train until early stopping or ``max_epochs``; resumes from ``run_dir/last.pt`` when present."""
        self._resume()
        for callback in self.callbacks:
            callback.on_fit_start(self)
        while not self.state.stopped and self.state.epoch < self.config.max_epochs:
            started, started_cpu = time.perf_counter(), time.process_time()
            loss = self.train_epoch()
            if not math.isfinite(loss):
                raise FloatingPointError(f"the training loss became {loss} at epoch {self.state.epoch}; "
                                         "lower the learning rate")
            self.state.seconds += time.perf_counter() - started
            self.state.add_cpu(time.process_time() - started_cpu)
            for callback in self.callbacks:
                callback.on_epoch_end(self, self.state.epoch, loss)
            if self.state.epoch % self.config.eval_every == 0 or self.state.epoch == self.config.max_epochs:
                self._evaluate_and_select(loss)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        for callback in self.callbacks:
            callback.on_fit_end(self)
        return self.state

    def _evaluate_and_select(self, loss: float) -> None:
        started, started_cpu = time.perf_counter(), time.process_time()
        result = self.evaluate(top_m=self.config.top_m)
        self.state.eval_seconds += time.perf_counter() - started
        self.state.add_cpu(time.process_time() - started_cpu)
        value = result["valid"][self.config.monitor]
        improved = value > self.state.best_value
        if improved:
            self.state.best_value, self.state.best_epoch, self.state.bad_evaluations = value, self.state.epoch, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.state.bad_evaluations += 1
        self.state.history.append({"epoch": self.state.epoch, "loss": loss, "seconds": round(self.state.seconds, 3),
                                   "valid": result["valid"], "test": result["test"]})
        self.objective.on_evaluate(self, self.state.epoch, result)
        self.state.stopped = self.state.bad_evaluations >= self.config.patience and self.objective.may_stop()
        for callback in self.callbacks:
            callback.on_evaluate(self, self.state.epoch, result, improved)
        self._checkpoint(improved)

    def _checkpoint(self, improved: bool) -> None:
        if self.run_dir is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if improved:
            _atomic_save(self.best_state, self.run_dir / "best.pt")
        # compact copies: a stacked replica's parameters are views whose storage holds every replica's
        model_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        _atomic_save({"model": model_state, "optimizer": self.optimizer.state_dict(),
                      "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
                      "state": asdict(self.state), "objective": self.objective.state_dict()},
                     self.run_dir / "last.pt")
        (self.run_dir / "history.json").write_text(json.dumps(self.state.history, indent=1))

    def _resume(self) -> None:
        if self.run_dir is None or not (self.run_dir / "last.pt").is_file():
            return
        # on the CPU: the RNG states must stay CPU byte tensors; the model, the optimizer (it follows its
        # parameters) and the objective move their own parts to the device
        # a checkpoint that cannot be read is an error naming it, not a silent restart: the run may be hours old
        last, best = self.run_dir / "last.pt", self.run_dir / "best.pt"
        with _reading_checkpoint(last, self.run_dir):
            saved = torch.load(last, map_location="cpu", weights_only=False)
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.generator.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            self.state = FitState(**{"cpu_seconds": None, **saved["state"]})  # uncounted before: unknown
            self.resumed_from_epoch = self.state.epoch
            self.objective.load_state_dict(saved.get("objective", {}))
        if best.is_file():
            with _reading_checkpoint(best, self.run_dir):
                self.best_state = torch.load(best, map_location=self.device, weights_only=False)
                self.model.load_state_dict(self.best_state)  # it must fit the model too
                self.model.load_state_dict(saved["model"])


@contextlib.contextmanager
def _reading_checkpoint(path: Path, run_dir: Path):
    """Turn any failure to read or apply a resume checkpoint into an error naming the file and the way out."""
    try:
        yield
    except (OSError, RuntimeError, EOFError, KeyError, TypeError, ValueError, AttributeError,
            pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise CheckpointError(f"{path}: cannot resume from this checkpoint ({error.__class__.__name__}: "
                              f"{' '.join(str(error).split())[:300]}); it is truncated, corrupt or "
                              f"from other settings. Delete last.pt and best.pt in {run_dir} to restart the run "
                              "from its first epoch") from None


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train_model(model: Recommender, split: Split, device: torch.device | str = "cpu", seed: int = 0,
                callbacks: list[Callback] | None = None, run_dir: Path | None = None, top_m: int | None = None,
                **overrides) -> Trainer:
    """Train a model with its own loss and its config's optimization defaults (overridable)."""
    config = model.config
    trainer_config = TrainerConfig(lr=config.lr, weight_decay=config.weight_decay, max_epochs=config.max_epochs,
                                   eval_every=config.eval_every, seed=seed, top_m=top_m)
    for key, value in overrides.items():
        setattr(trainer_config, key, value)
    validate(trainer_config)
    objective = OwnLoss(model, split, config.batch_size, config.n_negatives, torch.device(device))
    trainer = Trainer(model, split, objective, trainer_config, device, callbacks, run_dir)
    trainer.fit()
    return trainer
