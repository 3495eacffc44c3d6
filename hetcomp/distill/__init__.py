"""Distillation methods: one file each, one registry line each."""

from __future__ import annotations

import importlib

from hetcomp.data import HetCompError
from hetcomp.distill.base import DistillContext, DistillMethod, EnsembleConfig, method_config

#: registry name -> "module:Class"
METHODS: dict[str, str] = {
    "none": "hetcomp.distill.none:NoKD",
    "hetcomp": "hetcomp.distill.hetcomp:HetComp",
}

__all__ = ["METHODS", "DistillContext", "DistillMethod", "EnsembleConfig", "build_method", "method_class"]


def method_class(name: str) -> type[DistillMethod]:
    if name not in METHODS:
        raise HetCompError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}")
    module, attribute = METHODS[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def build_method(name: str, context: DistillContext, **options) -> DistillMethod:
    """Build method ``name`` on a context; ``options`` override its config (unknown ones are an error)."""
    cls = method_class(name)
    return cls(context, method_config(cls.config_class, **options))
