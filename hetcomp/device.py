"""Device selection and seeding, shared by every command."""

from __future__ import annotations

import random

import numpy as np
import torch

from hetcomp.data.errors import HetCompError


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` = CUDA when available, else CPU; ``cuda`` without a GPU is an error that says so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HetCompError(f"--device {name} asked for CUDA, but torch sees no GPU here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as error:
        raise HetCompError(f"unknown device {name!r} ({error}); use auto, cpu or cuda") from None


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns a torch generator for the trainer's own sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)
