"""w/o KD: the student trained on the data alone, with its own loss (the reference every method must beat)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetcomp.distill.base import DistillMethod, own_batch
from hetcomp.models.base import Batch, Recommender


@dataclass
class NoKDConfig:
    owner = "method none"
    #: nothing of its own to search: ``hetcomp tune`` searches lr and weight decay only
    search_space = {}


class NoKD(DistillMethod):
    """One pass over the training interactions per epoch, like a teacher: the student's loss, no teacher."""

    name = "none"
    config_class = NoKDConfig
    uses_own_recipe = True
    reads_teachers = False
    stackable = True

    def batches(self, epoch: int, generator: torch.Generator):
        context = self.context
        lengths = context.train_indptr[1:] - context.train_indptr[:-1]
        users = torch.repeat_interleave(torch.arange(context.n_users), lengths)
        order = torch.randperm(len(users), generator=generator)
        self._generator = generator
        size = 1024
        for start in range(0, len(order), size):
            chosen = order[start:start + size]
            yield {"users": users[chosen].to(self.device), "pos": context.train_indices[chosen].to(self.device)}

    def loss(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return self.arithmetic(model, self.draw(model, batch))

    def draw(self, model: Recommender, batch: Batch) -> Batch:
        negatives = self.context.sampler.sample(batch["users"], model.config.n_negatives, self._generator)
        return {**batch, "neg": negatives.to(self.device)}

    def arithmetic(self, model: Recommender, batch: Batch) -> torch.Tensor:
        return model.loss(own_batch(model, batch))
