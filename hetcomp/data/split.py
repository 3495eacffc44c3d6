"""Filtering and splitting interactions into train / valid / test CSR matrices.

``protocol="authors"`` reproduces the HetComp authors' loader exactly (see :func:`authors_split`), so numbers
are comparable with published ones. ``"random"`` and ``"leave-last-out"`` are offered for other studies.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from hetcomp.data.errors import DataError
from hetcomp.data.interactions import Interactions

PROTOCOLS = ("authors", "random", "leave-last-out")


@dataclass
class Split:
    """Train / valid / test interactions as binary CSR matrices of shape [n_users, n_items].

    ``user_ids[u]`` / ``item_ids[i]`` give the raw id (as a string) of index u / i. ``fingerprint`` identifies
    the dataset file and split parameters; trajectories and runs record it so that mixing splits is an error.
    """

    train: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix
    user_ids: np.ndarray
    item_ids: np.ndarray
    meta: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return self.train.shape[0]

    @property
    def n_items(self) -> int:
        return self.train.shape[1]

    @property
    def fewest_unobserved(self) -> int:
        """How many unobserved items the user with the most training items has: the longest ranking of unobserved
        items that every user can fill (a bound on teachers' top-M and on knowledge lists)."""
        return self.n_items - int(np.diff(self.train.indptr).max())

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def digest(self) -> str:
        """sha256 over the index arrays of the three matrices: equal digests mean byte-identical splits."""
        digest = hashlib.sha256()
        for matrix in (self.train, self.valid, self.test):
            digest.update(np.asarray(matrix.shape, dtype=np.int64).tobytes())
            digest.update(matrix.indptr.astype(np.int64).tobytes())
            digest.update(matrix.indices.astype(np.int64).tobytes())
        return digest.hexdigest()

    def stats(self) -> dict:
        """Users, items, interactions and density of each part (users = rows with at least one entry)."""
        out = {"users": self.n_users, "items": self.n_items}
        for part, matrix in (("train", self.train), ("valid", self.valid), ("test", self.test)):
            out[part] = {
                "users": int((np.diff(matrix.indptr) > 0).sum()),
                "interactions": int(matrix.nnz),
                "density": float(matrix.nnz) / float(self.n_users * self.n_items),
            }
        total = self.train.nnz + self.valid.nnz + self.test.nnz
        out["interactions"] = int(total)
        out["density"] = total / float(self.n_users * self.n_items)
        return out


def _first_appearance_index(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map values to 0..n-1 in order of first appearance; returns (codes, unique values in that order)."""
    uniques, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank[inverse.reshape(-1)], uniques[order]


def _dedupe_keep_first(users: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each (user, item) pair, in file order (binarization)."""
    keys = users.astype(np.int64) * (int(items.max()) + 1) + items.astype(np.int64)
    _, first = np.unique(keys, return_index=True)
    return np.sort(first)


def _index_and_filter(interactions: Interactions, min_user_interactions: int):
    """Binarize, drop users with too few interactions, and index users and items by first appearance."""
    if len(interactions) == 0:
        raise DataError("the dataset has no interactions")
    users, raw_users = _first_appearance_index(interactions.users)
    items, raw_items = _first_appearance_index(interactions.items)
    keep = _dedupe_keep_first(users, items)
    users, items = users[keep], items[keep]
    stamps = interactions.timestamps[keep] if interactions.timestamps is not None else None
    counts = np.bincount(users)
    kept = counts[users] >= min_user_interactions
    if not kept.any():
        raise DataError(f"no user has at least {min_user_interactions} interactions: the filter left the "
                        "dataset empty (lower --min-user-interactions or check the file)")
    users, items = users[kept], items[kept]
    stamps = stamps[kept] if stamps is not None else None
    user_codes, user_order = _first_appearance_index(users)
    item_codes, item_order = _first_appearance_index(items)
    return (user_codes, item_codes, stamps,
            np.asarray(raw_users[user_order]).astype(str), np.asarray(raw_items[item_order]).astype(str))


def _csr(users: np.ndarray, items: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    matrix = sp.csr_matrix((np.ones(len(users), dtype=np.float32), (users, items)), shape=shape)
    matrix.sum_duplicates()
    matrix.sort_indices()
    return matrix


def _group_by_user(users: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """A stable order of interactions grouped by user (file order within a user) and the group offsets."""
    order = np.argsort(users, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(users, minlength=n_users))])
    return order, offsets


def authors_split(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, seed: int = 0,
                  test_ratio: float = 0.2, valid_ratio: float = 0.2):
    """The HetComp authors' split, step for step.

    ``numpy.random.seed(seed)`` once; for each user in index order, shuffle the user's items (file order)
    with ``numpy.random.shuffle``; test = first ``int(test_ratio * n)``, valid = next ``int(valid_ratio * n)``
    (the authors use the test count for both), train = the rest. Then drop valid/test items that occur in no
    training row, and drop a user from both valid and test when either became empty.

    The per-user shuffle is a loop over users because the legacy global RNG stream must be consumed exactly
    as the authors' code does; it runs once per split and is cached.
    """
    np.random.seed(seed)
    order, offsets = _group_by_user(users, n_users)
    part = np.empty(len(users), dtype=np.int8)  # 0 train, 1 valid, 2 test
    shuffled = np.empty(len(users), dtype=np.int64)
    for user in range(n_users):
        start, stop = offsets[user], offsets[user + 1]
        block = order[start:stop].copy()
        np.random.shuffle(block)
        n = stop - start
        n_test, n_valid = int(n * test_ratio), int(n * valid_ratio)
        shuffled[start:stop] = block
        part[start:start + n_test] = 2
        part[start + n_test:start + n_test + n_valid] = 1
        part[start + n_test + n_valid:stop] = 0
    u, i = users[shuffled], items[shuffled]
    train = _csr(u[part == 0], i[part == 0], (n_users, n_items))
    return _finish(train, u, i, part, n_users, n_items)


def _finish(train: sp.csr_matrix, u: np.ndarray, i: np.ndarray, part: np.ndarray, n_users: int, n_items: int):
    """Remove held-out items never seen in training; drop users whose valid or test set became empty."""
    in_train = np.asarray(train.sum(axis=0)).ravel() > 0
    held = (part > 0) & in_train[i]
    valid_users = np.bincount(u[held & (part == 1)], minlength=n_users) > 0
    test_users = np.bincount(u[held & (part == 2)], minlength=n_users) > 0
    evaluable = valid_users & test_users
    held &= evaluable[u]
    valid = _csr(u[held & (part == 1)], i[held & (part == 1)], (n_users, n_items))
    test = _csr(u[held & (part == 2)], i[held & (part == 2)], (n_users, n_items))
    return train, valid, test


def random_split(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int, seed: int = 0,
                 test_ratio: float = 0.2, valid_ratio: float = 0.2):
    """A plain seeded split of all interactions (not per user), then the same clean-up as the authors'."""
    rng = np.random.default_rng(seed)
    draw = rng.random(len(users))
    part = np.where(draw < test_ratio, 2, np.where(draw < test_ratio + valid_ratio, 1, 0)).astype(np.int8)
    train = _csr(users[part == 0], items[part == 0], (n_users, n_items))
    return _finish(train, users, items, part, n_users, n_items)


def leave_last_out_split(users: np.ndarray, items: np.ndarray, stamps: np.ndarray | None, n_users: int,
                         n_items: int):
    """Per user, the latest interaction is test and the one before is valid (ties keep file order)."""
    if stamps is None:
        raise DataError("leave-last-out needs timestamps, and this dataset has none; use --protocol authors "
                        "or random")
    order = np.lexsort((np.arange(len(users)), stamps, users))
    u, i = users[order], items[order]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(u, minlength=n_users))])
    position_from_end = offsets[u + 1] - 1 - np.arange(len(u))
    part = np.where(position_from_end == 0, 2, np.where(position_from_end == 1, 1, 0)).astype(np.int8)
    train = _csr(u[part == 0], i[part == 0], (n_users, n_items))
    return _finish(train, u, i, part, n_users, n_items)


def split_interactions(interactions: Interactions, dataset: str, checksum: str, seed: int = 0,
                       protocol: str = "authors", min_user_interactions: int = 5,
                       test_ratio: float = 0.2, valid_ratio: float = 0.2) -> Split:
    """Filter, index and split interactions under ``protocol`` into a :class:`Split`."""
    if protocol not in PROTOCOLS:
        raise DataError(f"unknown split protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    users, items, stamps, user_ids, item_ids = _index_and_filter(interactions, min_user_interactions)
    n_users, n_items = len(user_ids), len(item_ids)
    if protocol == "authors":
        train, valid, test = authors_split(users, items, n_users, n_items, seed, test_ratio, valid_ratio)
    elif protocol == "random":
        train, valid, test = random_split(users, items, n_users, n_items, seed, test_ratio, valid_ratio)
    else:
        train, valid, test = leave_last_out_split(users, items, stamps, n_users, n_items)
    if test.nnz == 0 or valid.nnz == 0:
        raise DataError(f"dataset {dataset!r}: the split left no evaluable user (every user lost its valid or "
                        "test items); the dataset is too small or too sparse for this protocol")
    params = {"dataset": dataset, "checksum": checksum, "protocol": protocol, "seed": seed,
              "min_user_interactions": min_user_interactions, "test_ratio": test_ratio,
              "valid_ratio": valid_ratio}
    meta = dict(params)
    meta["fingerprint"] = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return Split(train, valid, test, user_ids, item_ids, meta)


def save_split(split: Split, path: Path) -> None:
    """Write a split to ``path`` (npz), atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for part in ("train", "valid", "test"):
        matrix = getattr(split, part)
        arrays[f"{part}_indptr"] = matrix.indptr
        arrays[f"{part}_indices"] = matrix.indices
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, shape=np.asarray(split.train.shape), user_ids=split.user_ids, item_ids=split.item_ids,
             meta=np.asarray(json.dumps(split.meta)), **arrays)
    tmp.replace(path)


def load_split_file(path: Path) -> Split:
    """Read a split written by :func:`save_split`."""
    with np.load(path, allow_pickle=False) as data:
        shape = tuple(int(x) for x in data["shape"])
        parts = []
        for part in ("train", "valid", "test"):
            indices = data[f"{part}_indices"]
            parts.append(sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices,
                                        data[f"{part}_indptr"]), shape=shape))
        return Split(*parts, user_ids=data["user_ids"], item_ids=data["item_ids"],
                     meta=json.loads(str(data["meta"])))
