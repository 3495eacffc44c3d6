"""The toolkit's one error class: every layer raises it (or a subclass), so it lives below all of them."""


class HetCompError(Exception):
    """Base class for every user-facing error of the toolkit (the CLI prints these without a traceback)."""
