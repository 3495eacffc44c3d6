"""The ``hetcomp`` command line: thin typer commands over the library, one short module per command.

Each command module registers its commands on the shared :data:`app` when imported. They are imported in
:data:`COMMAND_MODULES` order, which is the order of ``hetcomp --help`` (groups such as ``datasets`` are listed
after the commands); an explicit list rather than import statements, so that sorting imports cannot reorder it.
"""

from importlib import import_module

from hetcomp.cli.common import app

COMMAND_MODULES = ("teachers", "distill", "tune", "evaluate", "reproduce", "bench", "datasets")
for _module in COMMAND_MODULES:
    import_module(f"{__name__}.{_module}")

__all__ = ["app", "main"]


def main() -> None:
    """Run the command line (for callers that want a function rather than the typer app)."""
    app()
