"""Shared fixtures: tiny generated data, and the shared CiteULike file where present."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from hetcomp.data import Split
from hetcomp.data.interactions import Interactions
from hetcomp.data.split import split_interactions

SHARED_RAW = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "raw"


def shared_data_dir() -> Path | None:
    """The real-data folder: $HETCOMP_DATA if set and present, else ../shared/data/raw, else None."""
    for candidate in (os.environ.get("HETCOMP_DATA"), SHARED_RAW):
        if candidate and (Path(candidate) / "citeulike" / "users.dat").is_file():
            return Path(candidate)
    return None


@pytest.fixture
def citeulike_dir() -> Path:
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("the shared CiteULike file (citeulike/users.dat) is not present: set HETCOMP_DATA to the "
                    "folder that holds it, e.g. ../shared/data/raw")
    return folder


def make_tiny_split(n_users: int = 60, n_items: int = 40, per_user: int = 12, seed: int = 0) -> Split:
    """A small random dataset split with the authors' protocol (every user has >= 5 items)."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.7
    popularity /= popularity.sum()
    for user in range(n_users):
        chosen = rng.choice(n_items, size=per_user, replace=False, p=popularity)
        users.extend([user] * per_user)
        items.extend(chosen.tolist())
    interactions = Interactions(np.asarray(users), np.asarray(items))
    return split_interactions(interactions, "tiny", "0" * 64, seed=seed)


@pytest.fixture
def tiny_split() -> Split:
    return make_tiny_split()


def random_csr(n_rows: int, n_cols: int, density: float, seed: int) -> sp.csr_matrix:
    matrix = sp.random(n_rows, n_cols, density=density, format="csr", random_state=seed, dtype=np.float32)
    matrix.data[:] = 1.0
    return matrix


def train_tiny_teachers(split: Split, root: Path, names: tuple[str, ...], top_m: int, max_epochs: int) -> list:
    """Small dim-8 teachers of ``split`` (seed 0 each) for tests that distill from real trajectories."""
    import torch

    from hetcomp.teachers import train_teacher

    out = []
    for name in names:
        torch.manual_seed(0)
        out.append(train_teacher(split, name, root, dim=8, top_m=top_m, max_epochs=max_epochs, eval_every=2,
                                 lr=1e-2))
    return out
