"""Teacher trajectories: a teacher's top-M ranking of unobserved items at states E1..E4, on disk.

Format (documented for users in ``teachers/README.md``), one ``trajectory.npz`` per teacher:

- ``states``: int32 [n_states, n_users, M]: state s, user u, the item ids ranked 1..M (best first) among the
  items u has not interacted with in training.
- ``observed``: int32 [nnz_train]: for each user, its training items ranked by the converged model, stored
  in CSR order: user u's items are ``observed[observed_indptr[u]:observed_indptr[u + 1]]``.
- ``observed_indptr``: int64 [n_users + 1].
- ``meta``: a JSON string: format, dataset, split fingerprint and digest, seed, teacher, dim, state epochs,
  metrics per state, top_m, n_users, n_items, source.

Loading validates everything against the split it will be used with, so a trajectory made on another split,
a truncated file or an out-of-range id is an error that names the problem, never a silent wrong number.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetcomp.data import Split
from hetcomp.data.sampling import NegativeSampler
from hetcomp.errors import HetCompError

FORMAT = "hetcomp-trajectory/1"
STATE_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
#: the fewest items per user and state an imported ranking may hold: HetComp's K (its dynamic top-K of the
#: ensemble, 100 by default; DKC compares top-50 lists), which trained teachers (top-200) exceed
MIN_TOP_M = 100


def required_top_m(split: Split) -> int:
    """:data:`MIN_TOP_M`, or every unobserved item of the user with the most training items when that is fewer
    (a small catalogue)."""
    return min(MIN_TOP_M, split.fewest_unobserved)


class TrajectoryError(HetCompError):
    """A trajectory file is missing, corrupt, or does not belong to the split it is used with."""


@dataclass
class Trajectory:
    """One teacher's rankings at its states (E1..E4 by default) and its converged ranking of observed items."""

    states: torch.Tensor  # int32 [n_states, n_users, M]
    observed: np.ndarray  # int32 [nnz_train]
    observed_indptr: np.ndarray  # int64 [n_users + 1]
    meta: dict = field(default_factory=dict)

    @property
    def teacher(self) -> str:
        """The model family (e.g. ``mf``)."""
        return self.meta.get("teacher", "?")

    @property
    def name(self) -> str:
        """The name it was loaded under (its folder, e.g. ``mf-s1``); the model family when not loaded by name."""
        return self.meta.get("name", self.teacher)

    @property
    def n_states(self) -> int:
        return self.states.shape[0]

    @property
    def top_m(self) -> int:
        return self.states.shape[2]

    def save(self, path: Path) -> None:
        """Write atomically (a killed write never leaves a half file under the final name)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, states=self.states.numpy().astype(np.int32), observed=self.observed.astype(np.int32),
                 observed_indptr=self.observed_indptr.astype(np.int64), meta=np.asarray(json.dumps(self.meta)))
        tmp.replace(path)


def state_epochs(converged_epoch: int, evaluated_epochs: list[int]) -> list[int]:
    """The evaluated epochs nearest to 25/50/75/100 % of the converged epoch T (ties: the earlier one)."""
    candidates = [epoch for epoch in evaluated_epochs if epoch <= converged_epoch]
    return [min(candidates, key=lambda e, f=fraction: (abs(e - f * converged_epoch), e))
            for fraction in STATE_FRACTIONS]


def rank_observed(score_fn, train, batch_size: int = 1024, device: torch.device | str = "cpu") -> np.ndarray:
    """Each user's training items sorted by score (best first, ties by lower item id), in CSR order."""
    indptr, indices = train.indptr, train.indices.astype(np.int64)
    out = np.empty(len(indices), dtype=np.int32)
    for start in range(0, train.shape[0], batch_size):
        stop = min(start + batch_size, train.shape[0])
        lo, hi = indptr[start], indptr[stop]
        rows = torch.from_numpy(np.repeat(np.arange(stop - start), np.diff(indptr[start:stop + 1])))
        items = torch.from_numpy(indices[lo:hi])
        with torch.no_grad():
            scores = score_fn(torch.arange(start, stop, device=device)).cpu()
        values = scores[rows, items].to(torch.float64)
        order = np.lexsort((items.numpy(), -values.numpy(), rows.numpy()))
        out[lo:hi] = items.numpy()[order]
    return out


def load_trajectory(path: Path, split: Split | None = None) -> Trajectory:
    """Read and validate a trajectory; with ``split``, check it was made on that split."""
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"{path}: no trajectory file here. Train the teacher with `hetcomp train-teachers` "
                              "or import rankings with `hetcomp import-teacher`.")
    try:
        with np.load(path, allow_pickle=False) as data:
            states = data["states"]
            observed = data["observed"]
            observed_indptr = data["observed_indptr"]
            meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as error:
        raise TrajectoryError(f"{path}: not a readable trajectory ({error.__class__.__name__}: {error}); the file "
                              "is corrupt or truncated: delete it and train or import the teacher again") from None
    if meta.get("format") != FORMAT:
        raise TrajectoryError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    trajectory = Trajectory(torch.from_numpy(states.astype(np.int32)), observed, observed_indptr, meta)
    _check_shapes(path, trajectory)
    if split is not None:
        check_against_split(path, trajectory, split)
    return trajectory


def _check_shapes(path: Path, trajectory: Trajectory) -> None:
    states, meta = trajectory.states, trajectory.meta
    if states.ndim != 3:
        raise TrajectoryError(f"{path}: states must be [n_states, n_users, M], found shape {tuple(states.shape)}")
    if states.shape[1] != meta.get("n_users") or trajectory.observed_indptr.shape != (meta.get("n_users", -1) + 1,):
        raise TrajectoryError(f"{path}: arrays do not match the {meta.get('n_users')} users the metadata states "
                              f"(states {tuple(states.shape)}, observed_indptr {trajectory.observed_indptr.shape})")
    if len(trajectory.observed) != int(trajectory.observed_indptr[-1]):
        raise TrajectoryError(f"{path}: observed has {len(trajectory.observed)} entries, observed_indptr says "
                              f"{int(trajectory.observed_indptr[-1])}")
    n_items = meta.get("n_items", 0)
    if states.numel() and (int(states.min()) < 0 or int(states.max()) >= n_items):
        raise TrajectoryError(f"{path}: item ids outside [0, {n_items}) in states")


def check_against_split(path: Path, trajectory: Trajectory, split: Split) -> None:
    """The trajectory must come from this split: same fingerprint, shapes, and no training item in a ranking."""
    meta = trajectory.meta
    if meta.get("split_fingerprint") != split.fingerprint:
        raise TrajectoryError(
            f"{path}: this trajectory was made on split {meta.get('split_fingerprint')} ({meta.get('dataset')}, "
            f"seed {meta.get('seed')}), but the data is split {split.fingerprint} ({split.meta['dataset']}, seed "
            f"{split.meta['seed']}). Retrain or re-import the teacher for this split.")
    if (meta["n_users"], meta["n_items"]) != (split.n_users, split.n_items):
        raise TrajectoryError(f"{path}: made for {meta['n_users']} users x {meta['n_items']} items, the split has "
                              f"{split.n_users} x {split.n_items}")
    if not np.array_equal(trajectory.observed_indptr, split.train.indptr.astype(np.int64)):
        raise TrajectoryError(f"{path}: the observed-item rows do not match the split's training rows")
    _check_observed(path, trajectory.observed, split)
    sampler = NegativeSampler(split.train)
    users = torch.arange(split.n_users).view(1, -1, 1).expand_as(trajectory.states).reshape(-1)
    if sampler.is_observed(users, trajectory.states.reshape(-1).long()).any():
        raise TrajectoryError(f"{path}: a state ranks a user's training item; rankings must hold unobserved items")


def _check_observed(path: Path, observed: np.ndarray, split: Split) -> None:
    """Each user's observed row must be a permutation of exactly that user's training items."""
    rows = np.repeat(np.arange(split.n_users, dtype=np.int64), np.diff(split.train.indptr))
    given = np.sort(rows * split.n_items + observed.astype(np.int64))
    wanted = rows * split.n_items + split.train.indices.astype(np.int64)  # CSR: sorted within each row
    wrong = np.flatnonzero(given != wanted)
    if len(wrong):
        raise TrajectoryError(f"{path}: the observed items of user {int(rows[wrong[0]])} (raw id "
                              f"{split.user_ids[rows[wrong[0]]]}) are not exactly that user's training items; "
                              "each user's 'observed' row must rank its own training items, each once")


def _check_rankings(path: Path, states: np.ndarray, split: Split) -> None:
    """An imported ranking must be long enough for distillation and list each item at most once per user."""
    need = required_top_m(split)
    if states.shape[2] < need:
        raise TrajectoryError(f"{path}: ranks {states.shape[2]} items per user and state; distillation needs at "
                              f"least {need} (HetComp's K: it keeps the ensemble's top-{MIN_TOP_M} per user, "
                              "trained teachers keep 200): export a longer ranking")
    ordered = np.sort(states, axis=2)
    repeated = np.argwhere((ordered[:, :, 1:] == ordered[:, :, :-1]).any(2))
    if len(repeated):
        state, user = (int(x) for x in repeated[0])
        raise TrajectoryError(f"{path}: state {state + 1} ranks an item twice for user {user} (raw id "
                              f"{split.user_ids[user]}); each ranking must list distinct items")


def make_trajectory(states: list[torch.Tensor], observed: np.ndarray, split: Split, meta: dict) -> Trajectory:
    """Assemble a trajectory with the split's identity filled into its metadata."""
    full = {"format": FORMAT, "dataset": split.meta["dataset"], "split_fingerprint": split.fingerprint,
            "split_digest": split.digest(), "seed": split.meta["seed"], "n_users": split.n_users,
            "n_items": split.n_items, "top_m": int(states[0].shape[1]), "n_states": len(states)}
    full.update(meta)
    return Trajectory(torch.stack([s.to(torch.int32).cpu() for s in states]), observed.astype(np.int32),
                      split.train.indptr.astype(np.int64), full)


def import_rankings(path: Path, split: Split, teacher: str, top_m: int | None = None) -> Trajectory:
    """Turn rankings produced by another tool into a trajectory for ``split``.

    Accepted inputs (documented in ``teachers/README.md``):

    - ``.npz`` with ``states`` int [n_states, n_users, M] of internal item indices (the split's order, see
      ``hetcomp datasets info``), and optionally ``observed`` int [nnz_train] in the CSR layout of this format;
    - ``.csv`` with a header ``state,user,rank,item`` using the dataset's raw user and item ids; ``state`` is
      1..n_states, or ``observed`` for the converged model's order of the user's training items; ``rank``
      starts at 1.

    Training items inside a state, unknown ids, users with fewer than M ranked items, an item twice in a ranking,
    fewer than :func:`required_top_m` items per ranking and observed rows that are not exactly the user's
    training items are errors.
    Without observed rankings the training items keep their id order and the metadata says so.
    """
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"{path}: no such file to import")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                states = np.asarray(data["states"])
                observed = np.asarray(data["observed"]) if "observed" in data else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            raise TrajectoryError(f"{path}: cannot read 'states' from this npz ({error})") from None
        if states.ndim != 3 or states.shape[1] != split.n_users:
            raise TrajectoryError(f"{path}: states must be [n_states, {split.n_users} users, M], found "
                                  f"{states.shape}")
    elif path.suffix == ".csv":
        states, observed = _read_ranking_csv(path, split)
    else:
        raise TrajectoryError(f"{path}: import reads .npz or .csv files, not {path.suffix!r}")
    if top_m is not None:
        states = states[:, :, :top_m]
    if states.size and (states.min() < 0 or states.max() >= split.n_items):
        raise TrajectoryError(f"{path}: item indices outside [0, {split.n_items})")
    _check_rankings(path, states, split)
    observed_ranked = observed is not None
    if observed is None:
        observed = split.train.indices.astype(np.int32)
    elif len(observed) != split.train.nnz:
        raise TrajectoryError(f"{path}: observed has {len(observed)} entries, the split has {split.train.nnz} "
                              "training interactions")
    meta = {"teacher": teacher, "dim": None, "train_seed": None, "imported_from": str(path),
            "observed_ranked": observed_ranked, "state_epochs": list(range(1, states.shape[0] + 1)),
            "metrics": []}
    trajectory = make_trajectory([torch.from_numpy(s.astype(np.int32)) for s in states], observed, split, meta)
    check_against_split(path, trajectory, split)
    return trajectory


def _read_ranking_csv(path: Path, split: Split) -> tuple[np.ndarray, np.ndarray | None]:
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str)
    except (OSError, ValueError) as error:
        raise TrajectoryError(f"{path}: not a readable CSV ({error})") from None
    if list(table.columns[:4]) != ["state", "user", "rank", "item"]:
        raise TrajectoryError(f"{path}: the header must be 'state,user,rank,item', found {','.join(table.columns)}")
    users = pd.Index(split.user_ids).get_indexer(table["user"].str.strip())
    items = pd.Index(split.item_ids).get_indexer(table["item"].str.strip())
    for kind, codes in (("user", users), ("item", items)):
        if (codes < 0).any():
            line = int(np.flatnonzero(codes < 0)[0]) + 2
            raise TrajectoryError(f"{path}: line {line}: {kind} id {table[kind].iloc[line - 2]!r} is not in the "
                                  f"split (ids are the dataset's raw ids)")
    try:
        ranks = table["rank"].astype(int).to_numpy()
    except ValueError:
        raise TrajectoryError(f"{path}: the rank column must hold integers starting at 1") from None
    is_observed = table["state"].str.strip() == "observed"
    observed = None
    if is_observed.any():
        mask = is_observed.to_numpy()
        order = np.lexsort((ranks[mask], users[mask]))
        observed = items[mask][order].astype(np.int32)  # checked against the split with every import (_check_observed)
    try:
        state_numbers = table["state"][~is_observed].astype(int).to_numpy()
    except ValueError:
        raise TrajectoryError(f"{path}: state must be an integer 1..n or 'observed'") from None
    mask = (~is_observed).to_numpy()
    n_states = int(state_numbers.max())
    counts = np.bincount((state_numbers - 1) * split.n_users + users[mask], minlength=n_states * split.n_users)
    top_m = int(counts.min())
    if top_m == 0 or counts.max() != top_m:
        raise TrajectoryError(f"{path}: every state must rank the same number of items for every user "
                              f"(found between {int(counts.min())} and {int(counts.max())})")
    states = np.empty((n_states, split.n_users, top_m), dtype=np.int32)
    order = np.lexsort((ranks[mask], users[mask], state_numbers))
    states.reshape(-1)[:] = items[mask][order]
    return states, observed
