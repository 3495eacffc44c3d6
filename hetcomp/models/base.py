"""The interface every recommender implements, teacher (dim 64) or student (dim 6).

A model scores a batch of users against all items (``score``) or against given items (``score_items``),
computes its own training loss on a batch (``loss``), and says what a training batch is (``batch_kind``):

- ``"triples"``: ``{"users": [B], "pos": [B], "neg": [B, n_neg]}`` from the training interactions;
- ``"users"``: ``{"users": [B]}`` (models that read a user's whole training row, e.g. Mult-VAE);
- ``"items"``: ``{"items": [B]}`` (models that read an item's user column, e.g. the item autoencoder).

Models that need the training interactions (graph, rows, columns) get the training CSR at construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional

from hetcomp.config import knob, validate

Batch = dict[str, torch.Tensor]


@dataclass
class ModelConfig:
    """Hyper-parameters shared by every model; each model's config extends it with its own.

    ``lr``, ``weight_decay``, ``batch_size`` and ``n_negatives`` are training settings, but their good values
    depend on the model, so each model's defaults live beside its maths.

    A teacher's config is part of every student run's configuration hash (``hetcomp.paper.identity``): a field
    added later, with a default that keeps the old behaviour, belongs in ``LATER_TEACHER_SETTINGS`` there too, or
    every committed Table 2 row stops matching once the teachers are retrained.
    """

    dim: int = knob(64, ge=1)
    lr: float = knob(1e-3, gt=0)
    weight_decay: float = knob(0.0, ge=0)
    batch_size: int = knob(1024, ge=1)
    n_negatives: int = knob(1, ge=1)
    max_epochs: int = knob(500, ge=1)
    eval_every: int = knob(10, ge=1)

    def __post_init__(self) -> None:
        validate(self)


class Recommender(nn.Module):
    """Base class: subclasses set ``name``, ``batch_kind`` and ``config_class`` and implement the methods."""

    name: str = ""
    batch_kind: str = "triples"
    config_class: type[ModelConfig] = ModelConfig
    #: bumped when the model's scores change (even in the last bits): a run specification holds its student's
    #: version, so runs of the old model are never reused for the new one
    version: int = 1

    def __init__(self, n_users: int, n_items: int, config: ModelConfig | None = None,
                 train: sp.csr_matrix | None = None) -> None:
        super().__init__()
        self.n_users = n_users
        self.n_items = n_items
        self.config = config if config is not None else self.config_class()

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Scores [len(users), n_items] (higher = better)."""
        raise NotImplementedError

    def score_items(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``items`` [B, L] for ``users`` [B]; the default slices :meth:`score`."""
        return self.score(users).gather(1, items)

    def loss(self, batch: Batch) -> torch.Tensor:
        """The model's own training loss on a batch of kind ``batch_kind``."""
        raise NotImplementedError

    def after_step(self) -> None:
        """Hook run after each optimizer step (e.g. CML's projection onto the unit ball)."""

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sparse_tensor(matrix: sp.csr_matrix) -> torch.Tensor:
    """A scipy sparse matrix as a coalesced torch sparse COO tensor (float32)."""
    coo = matrix.tocoo()
    coo.sum_duplicates()
    indices = torch.from_numpy(np.vstack([coo.row, coo.col]).astype(np.int64))
    return torch.sparse_coo_tensor(indices, torch.from_numpy(coo.data.astype(np.float32)), size=coo.shape,
                                   is_coalesced=True, check_invariants=False)


class CSRRows(nn.Module):
    """A binary CSR matrix kept as two index buffers, gathering row batches without torch's slow sparse slicing."""

    def __init__(self, matrix: sp.csr_matrix) -> None:
        super().__init__()
        matrix = matrix.tocsr()
        self.shape = matrix.shape
        self.register_buffer("indptr", torch.from_numpy(matrix.indptr.astype(np.int64)), persistent=False)
        self.register_buffer("indices", torch.from_numpy(matrix.indices.astype(np.int64)), persistent=False)

    def gather(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch-local row index, column) of every non-zero in ``rows``, in row order."""
        starts = self.indptr[rows]
        lengths = self.indptr[rows + 1] - starts
        local = torch.repeat_interleave(torch.arange(len(rows), device=rows.device), lengths)
        first = torch.cumsum(lengths, 0) - lengths
        positions = torch.arange(int(lengths.sum()), device=rows.device) - first[local] + starts[local]
        return local, self.indices[positions]

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows as a dense float32 matrix [len(rows), n_cols]."""
        local, columns = self.gather(rows)
        out = torch.zeros(len(rows), self.shape[1], device=rows.device)
        out[local, columns] = 1.0
        return out

    def encode(self, rows: torch.Tensor, weight: torch.Tensor, dropout: float, training: bool) -> torch.Tensor:
        """``normalize(dropout(x_rows)) @ weight`` for the binary rows x, with ``weight`` [n_cols, hidden].

        Input dropout uses inverted scaling; rows are L2-normalized after it. Computed with ``embedding_bag``
        over the non-zeros: O(nnz × hidden) forward and backward, never a dense [batch, n_cols] input.
        """
        local, columns = self.gather(rows)
        values = torch.ones(len(columns), device=rows.device)
        if training and dropout > 0:
            keep = torch.rand(values.shape, device=values.device) >= dropout
            local, columns, values = local[keep], columns[keep], values[keep] / (1 - dropout)
        norms = torch.zeros(len(rows), device=values.device).index_add_(0, local, values * values).sqrt()
        values = values / norms.clamp(min=1e-12)[local]
        offsets = torch.searchsorted(local, torch.arange(len(rows), device=rows.device))
        return functional.embedding_bag(columns, weight, offsets, mode="sum", per_sample_weights=values)


def all_item_scores(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """``users @ items.T`` ([B, d] × [n_items, d] → [B, n_items]), written so that its backward is fast.

    Autograd gives the gradient of a transposed right operand the operand's own (column-major) layout, through
    a product of the [n_items, B] transposed output gradient that is ~10× slower on the CPU than the row-major
    one (15 ms against 1.2 ms for a batch of 64 users of CiteULike). A contiguous copy of ``items.T`` (n_items
    × d: small) moves the gradient into the fast form; the values are the same (to the bit where MKL takes its AMD
    kernels; on an Intel CPU its AVX-512 kernels for the two layouts round differently, ~1 ulp).
    """
    return users @ items.T.contiguous()


def weighted_row_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` [L, ...] over the entries of the rows that ``weight`` [L] marks (1 for a row, 0 for
    padding): a triples batch padded to a common length, as stacked seeds' own losses are (``hetcomp.stacked``)."""
    rows = values.reshape(len(values), -1)
    return (rows * weight.unsqueeze(1)).sum() / (weight.sum() * rows.shape[1])


def bpr_loss(positive: torch.Tensor, negative: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Bayesian personalized ranking: -log sigmoid(s(u, pos) - s(u, neg)), averaged; ``negative`` is [B, n]
    (``weight``: see :func:`weighted_row_mean`)."""
    if weight is not None:
        return weighted_row_mean(-torch.nn.functional.logsigmoid(positive.unsqueeze(1) - negative), weight)
    return -torch.nn.functional.logsigmoid(positive.unsqueeze(1) - negative).mean()
