"""Distillation methods: one file each, one registry line each."""

from __future__ import annotations

from hetcomp.distill.base import DistillContext, DistillMethod, EnsembleConfig
from hetcomp.registry import checked_config, lookup

#: registry name -> "module:Class"
METHODS: dict[str, str] = {
    "none": "hetcomp.distill.none:NoKD",
    "hetcomp": "hetcomp.distill.hetcomp:HetComp",
    "rd": "hetcomp.distill.rd:RD",
    "rrd": "hetcomp.distill.rrd:RRD",
    "mtd": "hetcomp.distill.mtd:MTD",
    "cl-drd": "hetcomp.distill.cl_drd:CLDRD",
    "cl-drd-full": "hetcomp.distill.cl_drd_full:CLDRDFull",
    "dcd": "hetcomp.distill.dcd:DCD",
    "kd": "hetcomp.distill.kd:KD",
}

__all__ = ["METHODS", "DistillContext", "DistillMethod", "EnsembleConfig", "build_method", "method_class"]


def method_class(name: str) -> type[DistillMethod]:
    return lookup(METHODS, name, "method")


def build_method(name: str, context: DistillContext, **options) -> DistillMethod:
    """Build method ``name`` on a context; ``options`` override its config (unknown ones are an error)."""
    cls = method_class(name)
    return cls(context, checked_config(cls.config_class, options, f"method {name!r}"))
