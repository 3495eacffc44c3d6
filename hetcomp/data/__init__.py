"""Datasets: the registry, parsers, the authors' split, a split cache and negative sampling."""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import numpy as np

from hetcomp.data.errors import DataError
from hetcomp.data.interactions import Interactions
from hetcomp.data.parsers import make_csv_parser, parse_recbole_inter
from hetcomp.data.registry import (
    FILE_FORMATS,
    REGISTRY,
    combined_checksum,
    get_spec,
    load_registered,
    resolve_data_dir,
)
from hetcomp.data.split import Split, load_split_file, save_split, split_interactions
from hetcomp.errors import HetCompError  # re-exported: its home was this package
from hetcomp.provenance import dataset_slug

CACHE_ENV = "HETCOMP_CACHE"

__all__ = ["DataError", "HetCompError", "Interactions", "REGISTRY", "Split", "get_spec", "load_dataset",
           "load_interactions", "resolve_cache_dir", "resolve_data_dir"]


def resolve_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """Where cached splits go: the argument, else ``$HETCOMP_CACHE``, else ``./datasets/cache``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path("datasets") / "cache"


def load_interactions(name: str, data_dir: str | Path | None = None, path: str | Path | None = None,
                      user_col: str = "user_id", item_col: str = "item_id", sep: str = ",",
                      time_col: str | None = None, download: bool = True) -> tuple[Interactions, str, str]:
    """Read a dataset's interactions. Returns (interactions, dataset label, file checksum).

    ``name`` is a registered dataset, or ``recbole`` / ``csv`` with ``path`` naming the file.
    """
    if name in FILE_FORMATS:
        if path is None:
            raise DataError(f"dataset format {name!r} reads a file you name: pass --path FILE")
        file = Path(path)
        if not file.is_file():
            raise DataError(f"{file}: no such file (given with --path for format {name!r})")
        parser = parse_recbole_inter if name == "recbole" else make_csv_parser(user_col, item_col, sep, time_col)
        interactions = parser([file])
        return interactions, f"{name}:{file.stem}", combined_checksum([file])
    interactions, _, checksum = load_registered(name, data_dir, download=download)
    return interactions, name, checksum


def first_users(interactions: Interactions, n_users: int) -> Interactions:
    """The interactions of the first ``n_users`` distinct users in file order (a small slice for quick runs)."""
    _, first = np.unique(interactions.users, return_index=True)
    keep = np.isin(interactions.users, interactions.users[np.sort(first)[:n_users]])
    stamps = None if interactions.timestamps is None else interactions.timestamps[keep]
    return Interactions(interactions.users[keep], interactions.items[keep], stamps)


def load_dataset(name: str, data_dir: str | Path | None = None, seed: int = 0, protocol: str = "authors",
                 cache_dir: str | Path | None = None, use_cache: bool = True, min_user_interactions: int = 5,
                 path: str | Path | None = None, max_users: int | None = None, **source_options) -> Split:
    """Load, filter and split a dataset, reusing a cached split with the same file checksum and parameters.

    ``max_users`` keeps only the first users of the file (its label gets ``-first<N>``)."""
    interactions, label, checksum = load_interactions(name, data_dir, path=path, **source_options)
    if max_users is not None:
        interactions, label = first_users(interactions, max_users), f"{label}-first{max_users}"
    cache_file = None
    if use_cache:
        # csv / recbole splits cached before numeric ids were normalized (5096.0 = 5096) are not reused
        ids = "-ids2" if name in FILE_FORMATS else ""
        key = f"{dataset_slug(label)}-{protocol}-seed{seed}-min{min_user_interactions}{ids}-{checksum[:16]}.npz"
        cache_file = resolve_cache_dir(cache_dir) / "splits" / key
        if cache_file.is_file():
            try:
                return load_split_file(cache_file)
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                # only a cache: rebuilt from the dataset file, and said so
                warnings.warn(f"{cache_file}: the cached split cannot be read ({error.__class__.__name__}: "
                              f"{error}); rebuilding it from the dataset file", stacklevel=2)
                cache_file.unlink(missing_ok=True)
    split = split_interactions(interactions, label, checksum, seed=seed, protocol=protocol,
                               min_user_interactions=min_user_interactions)
    if cache_file is not None:
        try:
            save_split(split, cache_file)
        except OSError:
            pass
    return split
