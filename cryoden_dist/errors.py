"""Errors a user can act on.

Every error raised for bad input or a refused operation is a
:class:`CryodenError`. Its message names the input (file or store), the
field, and the fix, so the command-line interface can print it as one line
without a traceback.
"""

from __future__ import annotations


class CryodenError(Exception):
    """Base class of all errors meant for the user, not the developer."""


class InputError(CryodenError):
    """An input file or store is missing, malformed or inconsistent."""


class OutputExistsError(CryodenError):
    """The output path exists and may not be replaced."""


class MissingCTFError(CryodenError):
    """A step needs CTF parameters that the stack does not have."""


class ParameterError(CryodenError):
    """A parameter value is out of its valid range."""
