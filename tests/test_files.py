"""Files on disk that cannot be read: each is an error naming the file and the way out (a cache is rebuilt), and
a killed teacher resumed with other settings is refused at the start."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import make_tiny_split

from hetcomp.data import HetCompError, load_dataset
from hetcomp.models import build_model
from hetcomp.runs import distill
from hetcomp.teachers import train_teacher
from hetcomp.train import Callback, CheckpointError, train_model
from hetcomp.trajectory import TrajectoryError, make_trajectory

SPLIT = make_tiny_split(n_users=30, n_items=60, per_user=10)


class Kill(Callback):
    """Stops training like a killed process, right after the checkpoint of epoch ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_epoch_end(self, trainer, epoch: int, loss: float) -> None:
        if epoch > self.at:
            raise KeyboardInterrupt


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_truncated_training_checkpoint_is_named_with_the_fix(tmp_path):
    model = build_model("mf", SPLIT.train, dim=4)
    train_model(model, SPLIT, run_dir=tmp_path, max_epochs=2, eval_every=1)
    truncate(tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'last.pt'}: cannot resume .* Delete last.pt and best.pt"):
        train_model(build_model("mf", SPLIT.train, dim=4), SPLIT, run_dir=tmp_path, max_epochs=3, eval_every=1)
    (tmp_path / "last.pt").unlink()  # the fix it names: the run restarts
    train_model(build_model("mf", SPLIT.train, dim=4), SPLIT, run_dir=tmp_path, max_epochs=2, eval_every=1)
    with pytest.raises(CheckpointError, match=r"last.pt: cannot resume .*size mismatch.* other settings"):
        train_model(build_model("mf", SPLIT.train, dim=8), SPLIT, run_dir=tmp_path, max_epochs=3, eval_every=1)
    truncate(tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match=rf"{tmp_path / 'best.pt'}: cannot resume"):
        train_model(build_model("mf", SPLIT.train, dim=4), SPLIT, run_dir=tmp_path, max_epochs=3, eval_every=1)


@pytest.mark.parametrize("change", [{"top_m": 15}, {"dim": 8}, {"seed": 1}])
def test_killed_teacher_resumed_with_other_settings_is_refused_at_the_start(tmp_path, change):
    settings = {"dim": 4, "top_m": 20, "seed": 0}
    with pytest.raises(KeyboardInterrupt):
        train_teacher(SPLIT, "mf", tmp_path, max_epochs=4, eval_every=1, callbacks=[Kill(2)], **settings)
    folder = tmp_path / "tiny" / "mf"
    assert (folder / "last.pt").is_file() and not (folder / "trajectory.npz").exists()
    key, value = next(iter(change.items()))
    shown = key.replace("_", "-")
    with pytest.raises(TrajectoryError, match=rf"{folder} holds an unfinished run .* started with .*{shown} "
                                              rf"{settings[key]}, but this call asks for .*{shown} {value}"):
        train_teacher(SPLIT, "mf", tmp_path, max_epochs=4, eval_every=1, **{**settings, **change})
    if key == "top_m":  # a folder from before config.json recorded top_m: the snapshots tell
        config = json.loads((folder / "config.json").read_text())
        del config["top_m"]
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(TrajectoryError, match="top-m 20, but this call asks for top-m 15"):
            train_teacher(SPLIT, "mf", tmp_path, max_epochs=4, eval_every=1, **{**settings, **change})
    trajectory = train_teacher(SPLIT, "mf", tmp_path, max_epochs=4, eval_every=1, **settings)  # same: resumes
    assert trajectory.top_m == 20 and trajectory.meta["epochs_trained"] == 4


def random_teacher(name: str, seed: int):
    rng = np.random.default_rng(seed)
    scores = rng.random((4, SPLIT.n_users, SPLIT.n_items))
    rows, items = SPLIT.train.nonzero()
    scores[:, rows, items] = -1.0
    states = [torch.from_numpy(np.argsort(-s, axis=1, kind="stable")[:, :20]) for s in scores]
    trajectory = make_trajectory(states, SPLIT.train.indices, SPLIT, {"teacher": name, "metrics": []})
    trajectory.meta["name"] = name
    return trajectory


def test_truncated_metrics_of_a_finished_run_is_named_with_the_fix(tmp_path):
    teachers = [random_teacher("mf", 0)]
    first = distill(SPLIT, teachers, "mf", "rd", dim=4, runs_root=tmp_path, max_epochs=2, eval_every=1)
    metrics = next(tmp_path.rglob("metrics.json"))
    truncate(metrics)
    with pytest.raises(HetCompError, match=rf"{metrics}: cannot read .* delete {metrics.parent} to train"):
        distill(SPLIT, teachers, "mf", "rd", dim=4, runs_root=tmp_path, max_epochs=2, eval_every=1)
    metrics.unlink()
    again = distill(SPLIT, teachers, "mf", "rd", dim=4, runs_root=tmp_path, max_epochs=2, eval_every=1)
    assert again["test"] == first["test"]


def test_truncated_split_cache_is_rebuilt_with_a_warning(tmp_path):
    data = tmp_path / "toy.csv"
    data.write_text("u,i\n" + "\n".join(f"{u},{(u * 7 + k) % 13}" for u in range(20) for k in range(8)))
    options = {"path": data, "user_col": "u", "item_col": "i", "cache_dir": tmp_path / "cache"}
    first = load_dataset("csv", **options)
    (cache,) = (tmp_path / "cache" / "splits").iterdir()
    truncate(cache)
    with pytest.warns(UserWarning, match=rf"{cache}: the cached split cannot be read .* rebuilding"):
        again = load_dataset("csv", **options)
    assert again.digest() == first.digest() and cache.is_file()
    assert load_dataset("csv", **options).digest() == first.digest()
