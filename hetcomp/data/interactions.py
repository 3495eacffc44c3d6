"""The raw interaction log, in file order, before any filtering or splitting."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interactions:
    """Parallel arrays of raw user ids, raw item ids (strings or ints) and optional timestamps, in file order.

    Raw ids are kept as they appear in the file; the split re-indexes them, so parsers never guess an
    indexing scheme. Order matters: the authors' split indexes users and items by first appearance.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray | None = None

    def __post_init__(self) -> None:
        if len(self.users) != len(self.items):
            raise ValueError("users and items must have the same length")
        if self.timestamps is not None and len(self.timestamps) != len(self.users):
            raise ValueError("timestamps must have the same length as users")

    def __len__(self) -> int:
        return len(self.users)
