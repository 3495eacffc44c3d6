"""Recommender models: one file per family, one registry name per model (imported on first use)."""

from __future__ import annotations

import scipy.sparse as sp

from hetcomp.models.base import ModelConfig, Recommender
from hetcomp.registry import checked_config, lookup

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
    return lookup(MODELS, name, "model")


def model_config(name: str, **overrides) -> ModelConfig:
    """The default config of model ``name`` with ``overrides`` (unknown keys are an error)."""
    return checked_config(model_class(name).config_class, overrides, f"model {name!r}")


def build_model(name: str, train: sp.csr_matrix, **overrides) -> Recommender:
    """Build model ``name`` for a training matrix, with its default config updated by ``overrides``."""
    config = model_config(name, **overrides)
    n_users, n_items = train.shape
    return model_class(name)(n_users, n_items, config, train=train)
