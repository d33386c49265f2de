"""User-facing errors.

Anything a user can cause (a bad slide, a missing folder, a wrong model file) raises a subclass of
``UserError``; the CLI prints its message on one line and exits non-zero. Everything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input or environment; printed as one line, exit code 2."""

    exit_code = 2


class BadSlideError(UserError):
    """A slide that cannot be opened, read, or has no usable resolution."""


class BadModelFileError(UserError):
    """A model file that is missing, not ours, truncated, or of another shape."""


class BadTilesError(UserError):
    """A tile folder / data set that is missing, empty, or holds no readable image."""


class BadInputError(UserError):
    """Any other bad argument or input file (annotations, manifests, options)."""


class OutputError(UserError):
    """An output path that cannot be written."""


class WeightsUnavailableError(UserError):
    """Backbone weights that cannot be had (offline, not cached, incomplete file)."""
