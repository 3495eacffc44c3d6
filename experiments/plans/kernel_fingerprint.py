"""A short hash of each CPU kernel the teachers' training goes through, to find which one two machines compute
differently (why a teacher's digest moves between an AMD and an Intel CPU: `teachers-citeulike-notes.md`).

Run it on both machines with the same environment as the teachers (e.g. through `python -m hetcomp.mkl_as_amd` on
an Intel CPU, natively on an AMD one; `ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2` for Foursquare's)
and compare the lines: the ops whose hashes differ are the candidates. Deterministic inputs, one and two threads;
each case runs twice, and one whose two results differ prints ``varies`` (LightGCN's training at two threads).

Usage: python experiments/plans/kernel_fingerprint.py [--threads 1,2] [--steps 5]

The last lines are whole teachers: a few batches of each teacher model's training through hetcomp's own Trainer
(fused Adam, its batches) on a synthetic CiteULike-sized matrix.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch
from torch.nn import functional

from hetcomp.provenance import machine


def mkl_branches() -> str:
    """MKL's own answers after it has dispatched: its CPU branch (0 generic, as on AMD), its vector maths' branch
    (``MKL_VML_DEBUG_CPU_TYPE`` sets it; ``hetcomp.mkl_as_amd`` sets 0, the generic one), the reproducibility
    branch it would pick, and its feature bits. On an AMD machine these say at once which VML branch it takes."""
    import ctypes
    from pathlib import Path

    torch.randn(8, 8) @ torch.randn(8, 8)
    torch.rand(64).sqrt()
    try:
        mkl = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        features = ctypes.c_uint64.in_dll(mkl, "__intel_mkl_feature_indicator_x").value
        return (f"MKL branch {mkl.mkl_serv_cpu_detect()}, VML branch {mkl.mkl_vml_serv_cpu_detect()}, "
                f"CBWR auto branch {mkl.mkl_serv_cbwr_get_auto_branch()}, "
                f"Zen by its own check {mkl.mkl_serv_cpuiszen()}, features {features:#x}")
    except (OSError, AttributeError, ValueError) as error:
        return f"MKL's answers not readable here ({error})"


def digest(*tensors: torch.Tensor) -> str:
    hashed = hashlib.sha256()
    for tensor in tensors:
        hashed.update(tensor.detach().contiguous().numpy().tobytes())
    return hashed.hexdigest()[:10]


def inputs(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def products() -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    """sgemm at the shapes of the teachers (NeuMF towers, LightGCN, the autoencoders' encoders and decoders with
    CiteULike's 5,551 users x 16,980 items), both layouts, with their gradients."""
    cases = {}
    for name, (m, k, n) in {"ae_decoder": (128, 300, 16980), "ae_decoder_grad": (300, 128, 16980),
                            "iae_decoder": (256, 128, 5551), "iae_encoder_grad": (5551, 256, 128),
                            "score_all": (256, 64, 16980), "tower": (1024, 128, 64), "square": (1000, 1000, 100)
                            }.items():
        def case(m=m, k=k, n=n):
            a, b = inputs(1, m, k), inputs(2, k, n)
            return a @ b, a @ b.T.contiguous().T, torch.addmm(inputs(3, n), a, b)
        cases[f"sgemm_{name}"] = case

    def linear_backward():
        x, w = inputs(4, 256, 128).requires_grad_(), inputs(5, 5551, 128).requires_grad_()
        functional.linear(x, w, inputs(6, 5551)).pow(2).sum().backward()
        return x.grad, w.grad
    cases["linear_backward"] = linear_backward
    return cases


def elementwise() -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    x = inputs(7, 1 << 20) * 3
    cases: dict[str, Callable[[], tuple[torch.Tensor, ...]]] = {
        name: (lambda name=name: (getattr(torch, name)(x),))
        for name in ("exp", "expm1", "log1p", "sigmoid", "tanh", "sin", "erf")}
    cases["log"] = lambda: (torch.log(x.abs() + 1e-3),)
    cases["sqrt"] = lambda: (torch.sqrt(x.abs()),)
    cases["pow_2"] = lambda: (x.pow(2),)
    cases["softplus"] = lambda: (functional.softplus(x),)
    cases["log_softmax"] = lambda: (functional.log_softmax(x[: 128 * 8192].view(128, 8192), dim=1),)
    cases["bce_logits"] = lambda: (functional.binary_cross_entropy_with_logits(
        x[:65536].view(256, 256), (inputs(8, 256, 256) > 1).float(), weight=inputs(9, 256, 256).abs()),)
    cases["sum"] = lambda: (x.sum(), x.view(1024, 1024).sum(1), x.view(1024, 1024).sum(0))
    return cases


def sparse_and_random() -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    def embedding_bag():
        weight = inputs(10, 16980, 128).requires_grad_()
        generator = torch.Generator().manual_seed(11)
        columns = torch.randint(0, 16980, (40000,), generator=generator)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long),
                             torch.randint(0, 40000, (255,), generator=generator).sort().values])
        out = functional.embedding_bag(columns, weight, offsets, mode="sum",
                                       per_sample_weights=torch.rand(40000, generator=generator))
        out.pow(2).sum().backward()
        return out, weight.grad

    def index_add():
        generator = torch.Generator().manual_seed(12)
        where = torch.randint(0, 5551, (100000,), generator=generator)
        return (torch.zeros(5551).index_add_(0, where, inputs(13, 100000)),
                torch.zeros(5551, 64).index_add_(0, where[:20000], inputs(14, 20000, 64)))

    def spmm():
        generator = torch.Generator().manual_seed(15)
        rows, cols = torch.randint(0, 5551, (200000,), generator=generator), torch.randint(0, 16980, (200000,),
                                                                                           generator=generator)
        matrix = torch.sparse_coo_tensor(torch.stack([rows, cols]), inputs(16, 200000), (5551, 16980),
                                         check_invariants=True).coalesce()
        dense = inputs(17, 16980, 64)
        return torch.sparse.mm(matrix, dense), torch.sparse.mm(matrix.to_sparse_csr(), dense)

    def random():
        torch.manual_seed(18)
        return torch.rand(1 << 16), torch.randn(1 << 16), torch.empty(1 << 16).bernoulli_(0.5), \
            torch.randint(0, 1000, (1 << 16,)).float(), functional.dropout(torch.ones(1 << 16), 0.5)

    def adam(fused: bool):
        parameter = torch.nn.Parameter(inputs(19, 5551, 128))
        optimizer = torch.optim.Adam([parameter], lr=1e-3, fused=fused)  # fused: as hetcomp's Trainer
        for step in range(3):
            parameter.grad = inputs(20 + step, 5551, 128)
            optimizer.step()
        return (parameter,)

    return {"embedding_bag": embedding_bag, "index_add": index_add, "sparse_mm": spmm, "random": random,
            "adam": lambda: adam(False), "adam_fused": lambda: adam(True)}


def teachers(steps: int) -> dict[str, Callable[[], tuple[torch.Tensor, ...]]]:
    """Each teacher model (dim 64, seed 0) after ``steps`` batches of hetcomp's own Trainer on a synthetic
    CiteULike-sized matrix (numpy's seeded generator draws the same on every machine): its parameters and the
    scores of 256 users. The first teacher whose line differs between two machines is the one to look into."""
    import numpy as np
    import scipy.sparse as sp

    from hetcomp.models import build_model
    from hetcomp.teachers import TEACHERS
    from hetcomp.train import OwnLoss, Trainer, TrainerConfig

    rng = np.random.default_rng(0)
    n_users, n_items, nnz = 5551, 16980, 200_000
    train = sp.csr_matrix((np.ones(nnz, dtype=np.float32), (rng.integers(0, n_users, nnz),
                                                            rng.integers(0, n_items, nnz))), shape=(n_users, n_items))
    train.data[:] = 1.0
    split = SimpleNamespace(train=train)

    class FirstBatches(OwnLoss):
        """The model's own loss over the first ``steps`` batches of an epoch: the Trainer's epoch, cut short."""

        def batches(self, epoch, generator):
            return itertools.islice(super().batches(epoch, generator), steps)

    def run(name: str) -> tuple[torch.Tensor, ...]:
        torch.manual_seed(0)
        model = build_model(name, train, dim=64)
        config = model.config
        objective = FirstBatches(model, split, config.batch_size, config.n_negatives, torch.device("cpu"))
        Trainer(model, split, objective, TrainerConfig(lr=config.lr, weight_decay=config.weight_decay, max_epochs=1,
                                                       seed=0)).train_epoch()
        model.eval()
        with torch.no_grad():
            return (*model.parameters(), model.score(torch.arange(256)))

    return {f"teacher_{name}": (lambda name=name: run(name)) for name in TEACHERS}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--steps", type=int, default=5, help="training batches of each teacher model")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")  # a notice, not a fault
    torch.set_flush_denormal(True)  # as hetcomp's Trainer sets it, for every line alike
    print(f"# {machine()}")
    print(f"# {mkl_branches()}")
    cases = {**products(), **elementwise(), **sparse_and_random(), **teachers(args.steps)}
    for threads in [int(count) for count in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for name, case in cases.items():
            first, again = digest(*case()), digest(*case())  # a kernel that differs run to run says so
            print(f"{threads} {name:22} {first if first == again else 'varies'}", flush=True)


if __name__ == "__main__":
    main()
