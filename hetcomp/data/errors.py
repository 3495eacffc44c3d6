"""Errors a user can act on: each message names what went wrong and how to fix it."""

from hetcomp.errors import HetCompError


class DataError(HetCompError):
    """A dataset could not be found, verified or parsed."""
