"""The package's layers import only downward: core (data, models, trainer, methods…) ← runs ← paper ← cli,
and no module-level import cycle anywhere."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hetcomp"
#: a module's layer by the first part of its name under hetcomp; anything else is core (0)
LAYERS = {"runs": 1, "tune": 1, "tune_plan": 1, "tune_space": 1, "tune_page": 1, "paper": 2, "experiments": 2,
          "cli": 3, "__main__": 3}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Module → the hetcomp modules it imports at module level (imports inside functions are deliberate
    late bindings, e.g. Ray's worker entry point)."""
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hetcomp"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names if alias.name.startswith("hetcomp")}
        graph[name] = {target for target in found if target in modules and target != name}
    return graph


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], 0) if len(parts) > 1 else 0


def test_every_import_points_down_or_sideways():
    upward = [(module, target) for module, targets in _imports().items() for target in targets
              if _layer(target) > _layer(module)]
    assert not upward, upward


def test_no_module_level_import_cycle():
    graph = _imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1 and not _package_and_member(path[path.index(target):]):
                cycles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def _package_and_member(cycle: list[str]) -> bool:
    """A package's ``__init__`` re-exporting its own submodules, which import each other through it, is Python's
    usual shape, not a layering cycle: allowed when every module of the cycle is in one package."""
    return len({module.rsplit(".", 1)[0] if module.count(".") > 1 else module for module in cycle}) <= 1 or all(
        module.startswith(cycle[0] + ".") or module == cycle[0] for module in cycle)
