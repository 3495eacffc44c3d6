"""NeuMF (He et al., WWW 2017): a GMF branch and an MLP tower, fused by a final linear layer.

GMF: p_u ⊙ q_i (dim d). MLP: [a_u; b_i] (a, b of dim d/2) → d/4 → d/8 with ReLU.
score = w · [GMF; MLP] + c.
Trained with binary cross-entropy on each positive and its sampled negatives (the NCF paper's objective).
Scoring every item is the costly part of NeuMF, so: the GMF term w_g · (p_u ⊙ q_i) is one matmul
(p_u ⊙ w_g) q_iᵀ, and the first MLP layer is applied to the user and item halves separately
(W[a; b] = W_a a + W_b b), leaving a broadcast add and one small matmul per pair. The tower is narrow
(d/4 → d/8) for the same reason.
Defaults: 4 negatives per positive (NCF), Adam lr 1e-3, no weight decay, d = 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional

from hetcomp.config import knob
from hetcomp.models.base import Batch, ModelConfig, Recommender, all_item_scores, weighted_row_mean


@dataclass
class NeuMFConfig(ModelConfig):
    n_negatives: int = 4
    init_std: float = knob(0.01, gt=0)
    score_chunk: int = knob(64, ge=1)


class NeuMF(Recommender):
    name = "dnn"
    config_class = NeuMFConfig
    version = 2  # 2: with a one-unit first MLP layer (d < 8), no-gradient scores are clamps (same values ± rounding)

    def __init__(self, n_users: int, n_items: int, config: NeuMFConfig | None = None, train=None) -> None:
        super().__init__(n_users, n_items, config)
        dim = self.config.dim
        half, quarter, eighth = max(dim // 2, 1), max(dim // 4, 1), max(dim // 8, 1)
        self.user_gmf = nn.Embedding(n_users, dim)
        self.item_gmf = nn.Embedding(n_items, dim)
        self.user_mlp = nn.Embedding(n_users, half)
        self.item_mlp = nn.Embedding(n_items, half)
        self.first_user = nn.Linear(half, quarter)
        self.first_item = nn.Linear(half, quarter, bias=False)
        self.second = nn.Linear(quarter, eighth)
        self.predict = nn.Linear(dim + eighth, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
            nn.init.normal_(table.weight, std=self.config.init_std)
        for layer in (self.first_user, self.first_item, self.second):
            nn.init.xavier_uniform_(layer.weight)
        for layer in (self.first_user, self.second):
            nn.init.zeros_(layer.bias)
        nn.init.kaiming_uniform_(self.predict.weight, a=1, nonlinearity="sigmoid")
        nn.init.zeros_(self.predict.bias)

    def _tower(self, hidden: torch.Tensor) -> torch.Tensor:
        tower = torch.relu(self.second(torch.relu(hidden)))
        return tower @ self.predict.weight[0, self.config.dim:] + self.predict.bias[0]

    def score_items(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        gmf = (self.user_gmf(users).unsqueeze(1) * self.item_gmf(items)) @ self.predict.weight[0, :self.config.dim]
        hidden = self.first_user(self.user_mlp(users)).unsqueeze(1) + self.first_item(self.item_mlp(items))
        return gmf + self._tower(hidden)

    def score(self, users: torch.Tensor) -> torch.Tensor:
        """Every item for ``users``: the GMF matmul, then the tower one hidden unit at a time.

        A ``Linear`` over a [chunk, n_items, width] tensor is slow when the width is tiny (a dim-6 student's
        tower is 1 → 1); walking the second layer's units as [chunk, n_items] passes is ~10× faster there and
        still faster at d = 64, with the same values up to float rounding. Under autograd the tower's backward
        is hand-written (:class:`_TowerScores`, or :class:`_NarrowTowerScores` for a tower of one unit per layer); the
        values are the same bits either way.
        """
        gmf_users = self.user_gmf(users) * self.predict.weight[0, :self.config.dim]
        tower = (self.first_user(self.user_mlp(users)), self.first_item(self.item_mlp.weight), self.second.weight,
                 self.second.bias, self.predict.weight[0, self.config.dim:])
        if not torch.is_grad_enabled() and tower[0].shape[1] == 1:
            return _narrow_scores(gmf_users, self.item_gmf.weight, self.predict.bias[0], *tower,
                                  self.config.score_chunk)
        if torch.is_grad_enabled() and tower[0].shape[1] == tower[2].shape[0] == 1:
            return _NarrowTowerScores.apply(all_item_scores(gmf_users, self.item_gmf.weight), self.predict.bias[0],
                                            *tower, self.config.score_chunk)[0]
        out = all_item_scores(gmf_users, self.item_gmf.weight) + self.predict.bias[0]
        if torch.is_grad_enabled():
            return _TowerScores.apply(out, *tower, self.config.score_chunk)
        _add_tower_(out, *tower, self.config.score_chunk)
        return out

    def loss(self, batch: Batch) -> torch.Tensor:
        users = batch["users"]
        items = torch.cat([batch["pos"].unsqueeze(1), batch["neg"]], 1)
        labels = torch.zeros_like(items, dtype=torch.float32)
        labels[:, 0] = 1.0
        if batch.get("weight") is not None:  # padded triples (0) left out
            return weighted_row_mean(functional.binary_cross_entropy_with_logits(
                self.score_items(users, items), labels, reduction="none"), batch["weight"])
        return functional.binary_cross_entropy_with_logits(self.score_items(users, items), labels)


def _add_tower_(out: torch.Tensor, user_hidden: torch.Tensor, item_hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, tower_weight: torch.Tensor, chunk: int) -> None:
    """``out`` [B, n_items] += Σ_u t_u · relu(W_u · relu(a_user + b_item) + c_u), in place, ``chunk`` users at a time.

    ``user_hidden`` [B, q] and ``item_hidden`` [n_items, q] are the first layer's two halves, ``weight`` [e, q]
    and ``bias`` [e] the second layer, ``tower_weight`` [e] the tower's share of the prediction layer.
    """
    for start in range(0, len(user_hidden), chunk):
        stop = start + chunk
        hidden = (user_hidden[start:stop].unsqueeze(1) + item_hidden).relu_()
        for unit in range(weight.shape[0]):
            pre = hidden[..., 0] * weight[unit, 0] if hidden.shape[2] == 1 else hidden @ weight[unit]
            out[start:stop].addcmul_(pre.add_(bias[unit]).relu_(), tower_weight[unit])


def _narrow_scores(gmf_users: torch.Tensor, gmf_items: torch.Tensor, bias: torch.Tensor, user_hidden: torch.Tensor,
                   item_hidden: torch.Tensor, weight: torch.Tensor, second_bias: torch.Tensor,
                   tower_weight: torch.Tensor, chunk: int) -> torch.Tensor:
    """Scores without gradients when the tower's first layer has one unit (students below d = 8), in few passes.

    With x = a_user + b_item a scalar, each second-layer unit adds t·relu(W·relu(x) + c), a piecewise-linear
    function of x that equals t·W·clamp(x, lo, hi) + t·c with
    W > 0: lo = max(0, −c/W), hi = ∞;   W < 0, c ≥ 0: lo = 0, hi = −c/W;   W < 0, c < 0: lo = hi = −c/W;
    W = 0: the constant t·relu(c). The constants join the prediction bias in the GMF product (one ``addmm``),
    so serving costs the product, one add for x and a clamp and an add per unit. Training keeps the exact form
    (:class:`_TowerScores`), which this matches up to float rounding (tested).
    """
    units = []
    constant = bias.detach().clone()
    for w, c, t in zip(weight[:, 0].tolist(), second_bias.tolist(), tower_weight.tolist(), strict=True):
        if w == 0:
            constant += t * max(c, 0.0)
            continue
        constant += t * c
        if w > 0:
            units.append((max(0.0, -c / w), None, t * w))
        else:
            units.append((0.0 if c >= 0 else -c / w, -c / w, t * w))
    out = torch.addmm(constant, gmf_users, gmf_items.T)
    item_row = item_hidden[:, 0]
    for start in range(0, len(user_hidden), chunk):
        stop = start + chunk
        x = user_hidden[start:stop, :1] + item_row  # [b, n_items]
        for position, (low, high, slope) in enumerate(units):
            clamped = x.clamp_(low, high) if position == len(units) - 1 else x.clamp(low, high)
            out[start:stop].add_(clamped, alpha=slope)
    return out


def _relu_backward(grad: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``grad`` where ``output`` (a ReLU's) is positive, else 0: the ReLU's own fused backward kernel (one pass;
    a comparison to a bool mask and a ``where`` cost ~10× more on the CPU)."""
    return torch.ops.aten.threshold_backward(grad, output, 0)


class _TowerScores(torch.autograd.Function):
    """``base`` + the tower of :func:`_add_tower_`, with a backward that recomputes the tower unit by unit.

    Autograd through the tower keeps and walks several [chunk, n_items, width] intermediates per unit (30 ms for
    64 CiteULike users at dim 6, where MF's whole score takes 4 ms); the hand-written backward holds one hidden
    tensor per chunk and reduces each unit's gradient with single passes.
    """

    generate_vmap_rule = True  # the forward and backward are plain tensor code: vmap runs them per replica

    @staticmethod
    def forward(base: torch.Tensor, user_hidden: torch.Tensor, item_hidden: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, tower_weight: torch.Tensor, chunk: int) -> torch.Tensor:
        out = base.clone()
        _add_tower_(out, user_hidden, item_hidden, weight, bias, tower_weight, chunk)
        return out

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: torch.Tensor) -> None:
        _, user_hidden, item_hidden, weight, bias, tower_weight, chunk = inputs
        ctx.chunk = chunk
        ctx.save_for_backward(user_hidden, item_hidden, weight, bias, tower_weight)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        user_hidden, item_hidden, weight, bias, tower_weight = ctx.saved_tensors
        grad = grad.contiguous()
        grads = [torch.zeros_like(x) for x in (user_hidden, item_hidden, weight, bias, tower_weight)]
        grad_user, grad_item, grad_weight, grad_bias, grad_tower = grads
        for start in range(0, len(user_hidden), ctx.chunk):
            stop = start + ctx.chunk
            upstream = grad[start:stop]
            hidden = (user_hidden[start:stop].unsqueeze(1) + item_hidden).relu_()  # [b, n_items, q]
            grad_hidden = torch.zeros_like(hidden)
            for unit in range(weight.shape[0]):
                pre = hidden[..., 0] * weight[unit, 0] if hidden.shape[2] == 1 else hidden @ weight[unit]
                active = pre.add_(bias[unit]).relu_()
                grad_tower[unit] += torch.dot(upstream.reshape(-1), active.reshape(-1))
                grad_pre = _relu_backward(upstream, active).mul_(tower_weight[unit])
                grad_bias[unit] += grad_pre.sum()
                if hidden.shape[2] == 1:
                    grad_weight[unit, 0] += torch.dot(grad_pre.reshape(-1), hidden.reshape(-1))
                    grad_hidden[..., 0].add_(grad_pre * weight[unit, 0])
                else:
                    grad_weight[unit] += (grad_pre.unsqueeze(2) * hidden).sum((0, 1))
                    grad_hidden.add_(grad_pre.unsqueeze(2) * weight[unit])
            grad_hidden = _relu_backward(grad_hidden, hidden)
            grad_user[start:stop] = grad_hidden.sum(1)
            grad_item += grad_hidden.sum(0)
        return grad, grad_user, grad_item, grad_weight, grad_bias, grad_tower, None


class _NarrowTowerScores(torch.autograd.Function):
    """:class:`_TowerScores` for a tower of one unit per layer (students below d = 8), keeping its forward's
    [B, n_items] hidden and active passes for the backward instead of recomputing them.

    Recomputing bounds the memory of a wide tower ([chunk, n_items, width] per chunk); a one-unit tower's passes
    are each the size of the scores, and its backward made from them is a third cheaper. Same forward values,
    same gradients bit for bit (the same operations on the same chunks, in the same order); the two passes come
    back as non-differentiable outputs so that vmap can batch the function over a stack of students.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(products: torch.Tensor, score_bias: torch.Tensor, user_hidden: torch.Tensor,
                item_hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tower_weight: torch.Tensor,
                chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = products + score_bias
        hidden = (user_hidden.unsqueeze(1) + item_hidden).relu_()  # [B, n_items, 1]
        active = (hidden[..., 0] * weight[0, 0]).add_(bias[0]).relu_()  # [B, n_items]
        out.addcmul_(active, tower_weight[0])
        return out, hidden, active

    @staticmethod
    def setup_context(ctx, inputs: tuple, output: tuple) -> None:
        _, _, user_hidden, item_hidden, weight, bias, tower_weight, chunk = inputs
        _, hidden, active = output
        ctx.chunk = chunk
        ctx.mark_non_differentiable(hidden, active)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(user_hidden, item_hidden, weight, bias, tower_weight, hidden, active)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor, *_):
        user_hidden, item_hidden, weight, bias, tower_weight, hidden_all, active_all = ctx.saved_tensors
        grad_user, grad_item, grad_weight, grad_bias, grad_tower = (
            torch.zeros_like(x) for x in (user_hidden, item_hidden, weight, bias, tower_weight))
        grad = grad.contiguous()  # only the scores are differentiable: their gradient is always given
        for start in range(0, len(user_hidden), ctx.chunk):
            stop = start + ctx.chunk
            upstream = grad[start:stop]
            hidden = hidden_all[start:stop]
            active = active_all[start:stop]
            grad_tower[0] += torch.dot(upstream.reshape(-1), active.reshape(-1))
            grad_pre = _relu_backward(upstream, active).mul_(tower_weight[0])
            grad_bias[0] += grad_pre.sum()
            grad_weight[0, 0] += torch.dot(grad_pre.reshape(-1), hidden.reshape(-1))
            grad_hidden = _relu_backward(grad_pre.mul_(weight[0, 0]).unsqueeze(2), hidden)
            grad_user[start:stop] = grad_hidden.sum(1)
            grad_item += grad_hidden.sum(0)
        return grad, grad.sum(), grad_user, grad_item, grad_weight, grad_bias, grad_tower, None
