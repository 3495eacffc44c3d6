"""Distillation methods: one file each, one registry line each."""

from __future__ import annotations

import importlib

from hetcomp.data import HetCompError
from hetcomp.distill.base import DistillContext, DistillMethod, EnsembleConfig, method_config

#: registry name -> "module:Class"
METHODS: dict[str, str] = {
    "none": "hetcomp.distill.none:NoKD",
    "hetcomp": "hetcomp.distill.hetcomp:HetComp",
    "rd": "hetcomp.distill.rd:RD",
    "rrd": "hetcomp.distill.rrd:RRD",
    "mtd": "hetcomp.distill.mtd:MTD",
    "cl-drd": "hetcomp.distill.cl_drd:CLDRD",
    "dcd": "hetcomp.distill.dcd:DCD",
    "kd": "hetcomp.distill.kd:KD",
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
