"""Recommender models: one file per family, one registry name per model.

Classes are imported on first use, so that commands which never build a LightGCN do not pay for importing
torch_geometric (several seconds).
"""

from __future__ import annotations

import dataclasses
import importlib

import scipy.sparse as sp

from hetcomp.data.errors import HetCompError
from hetcomp.models.base import ModelConfig, Recommender

#: registry name -> "module:Class"; adding a model is one file and one line here.
MODELS: dict[str, str] = {
    "mf": "hetcomp.models.mf:MF",
    "ml": "hetcomp.models.cml:CML",
    "dnn": "hetcomp.models.neumf:NeuMF",
    "gnn": "hetcomp.models.lightgcn:LightGCN",
    "ae": "hetcomp.models.vae:MultVAE",
    "iae": "hetcomp.models.item_ae:ItemAE",
}

__all__ = ["MODELS", "ModelConfig", "Recommender", "build_model", "model_class", "model_config"]


def model_class(name: str) -> type[Recommender]:
    """The class registered under ``name``; an unknown name lists the known ones."""
    if name not in MODELS:
        raise HetCompError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    module, attribute = MODELS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def model_config(name: str, **overrides) -> ModelConfig:
    """The default config of model ``name`` with ``overrides`` (unknown keys are an error)."""
    config_class = model_class(name).config_class
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = set(overrides) - known
    if unknown:
        raise HetCompError(f"model {name!r} has no setting {', '.join(sorted(unknown))}; "
                           f"its settings are {', '.join(sorted(known))}")
    return config_class(**overrides)


def build_model(name: str, train: sp.csr_matrix, **overrides) -> Recommender:
    """Build model ``name`` for a training matrix, with its default config updated by ``overrides``."""
    config = model_config(name, **overrides)
    n_users, n_items = train.shape
    return model_class(name)(n_users, n_items, config, train=train)
