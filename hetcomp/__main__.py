"""``python -m hetcomp``: the same command line as ``hetcomp`` (used by ``reproduce --jobs`` for its children)."""

from hetcomp.cli import app

app()
