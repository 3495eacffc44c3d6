"""Name registries shared by models and distillation methods: lazy class lookup and checked configs."""

from __future__ import annotations

import importlib

from hetcomp.config import check_value, unknown_settings
from hetcomp.errors import HetCompError


def lookup(registry: dict[str, str], name: str, kind: str) -> type:
    """Import and return the class registered as ``"module:Class"`` under ``name``; an unknown name lists all.

    Classes are imported on first use, so that a command never pays for importing what it does not run
    (torch_geometric takes seconds).
    """
    if name not in registry:
        raise HetCompError(f"unknown {kind} {name!r}; known {kind}s: {', '.join(registry)}")
    module, attribute = registry[name].split(":")
    return getattr(importlib.import_module(module), attribute)


def checked_config(config_class: type, overrides: dict, owner: str):
    """``config_class(**overrides)``; an unknown setting is an error that lists the known ones, and a value of
    the wrong type or out of its declared range one that names it (:mod:`hetcomp.config`)."""
    unknown_settings(config_class, overrides, owner)
    for name, value in overrides.items():
        check_value(config_class, name, value, owner)
    return config_class(**overrides)
