"""Errors a user can act on: each message names what went wrong and how to fix it."""


class HetCompError(Exception):
    """Base class for every user-facing error of the toolkit (the CLI prints these without a traceback)."""


class DataError(HetCompError):
    """A dataset could not be found, verified or parsed."""
