"""Name registries shared by models and distillation methods: lazy class lookup and checked configs."""

from __future__ import annotations

import dataclasses
import importlib

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
    """``config_class(**overrides)``; an unknown setting is an error that lists the known ones."""
    known = {field.name for field in dataclasses.fields(config_class)}
    unknown = set(overrides) - known
    if unknown:
        raise HetCompError(f"{owner} has no setting {', '.join(sorted(unknown))}; "
                           f"its settings are {', '.join(sorted(known)) or '(none)'}")
    return config_class(**overrides)
