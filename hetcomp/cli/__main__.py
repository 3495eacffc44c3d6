"""``python -m hetcomp.cli``: the same command line as ``hetcomp`` (as when the CLI was one module)."""

from hetcomp.cli import main

main()
