"""Every registered student model under every registered distillation method: two epochs on a toy split with
tiny (generated) teachers must finish with finite metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_split

from hetcomp.distill import METHODS
from hetcomp.models import MODELS
from hetcomp.runs import distill
from hetcomp.trajectory import make_trajectory

SPLIT = make_tiny_split(n_users=30, n_items=60, per_user=10)
#: options that fit the toy catalogue where a method's defaults assume a real one
SMALL_OPTIONS = {"hetcomp": {"k": 10, "pos_k": 3, "dkc_k": 5, "period": 1}}


def random_teacher(name: str, seed: int, top_m: int = 20, n_states: int = 4):
    """A teacher whose states rank random unobserved items (no training: the matrix tests the plumbing)."""
    rng = np.random.default_rng(seed)
    scores = rng.random((n_states, SPLIT.n_users, SPLIT.n_items))
    scores[:, SPLIT.train.nonzero()[0], SPLIT.train.nonzero()[1]] = -1.0
    states = [torch.from_numpy(np.argsort(-s, axis=1, kind="stable")[:, :top_m]) for s in scores]
    trajectory = make_trajectory(states, SPLIT.train.indices, SPLIT, {"teacher": name, "metrics": []})
    trajectory.meta["name"] = name
    return trajectory


TEACHERS = [random_teacher("mf", 0), random_teacher("ae", 1)]


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("student", list(MODELS))
def test_every_student_under_every_method(student, method, tmp_path):
    torch.manual_seed(0)
    result = distill(SPLIT, TEACHERS, student, method, dim=4, runs_root=tmp_path, max_epochs=2, eval_every=1,
                     batch_users=16, method_options=SMALL_OPTIONS.get(method, {}))
    assert result["epochs"] == 2
    for part in ("valid", "test"):
        assert all(math.isfinite(value) for value in result[part].values()), result[part]


def test_hetcomp_names_a_teacher_too_short_or_with_other_states_instead_of_crashing(tmp_path):
    from hetcomp.data import HetCompError

    short = [*TEACHERS, random_teacher("short", 2, top_m=3)]
    with pytest.raises(HetCompError, match=r"compares top-5 rankings, but teacher short \(top-3\)"):
        distill(SPLIT, short, "mf", "hetcomp", dim=4, runs_root=tmp_path, max_epochs=1,
                method_options=SMALL_OPTIONS["hetcomp"])
    fewer = [*TEACHERS, random_teacher("two", 3, n_states=2)]
    with pytest.raises(HetCompError, match="same number of states .*two: 2"):
        distill(SPLIT, fewer, "mf", "hetcomp", dim=4, runs_root=tmp_path, max_epochs=1,
                method_options=SMALL_OPTIONS["hetcomp"])
